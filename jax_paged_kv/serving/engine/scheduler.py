"""Admission, the prefill/decode split and preemption: which requests run, and how far.

The scheduler owns the request queues and the free sequence slots, and decides from the host
:class:`~jax_paged_kv.serving.engine.blocks.BlockLedger` alone (never from the device) what fits:

* **Admission** (``PAGED``): a waiting request is admitted, in arrival order, while a slot is
  free and its expected blocks fit beside what every running request is still expected to take
  (``reserve_ratio`` of its remaining ``max_new_tokens``, SGLang's "new token ratio"), keeping a
  watermark free. (A request the engine defers, to share blocks another one is still
  prefilling, waits at the head of the queue; a parallel sample waiting so lets the requests
  behind it in.)
* **Prefill**: up to ``chunk`` prompt tokens per request, ``budget`` in all, for the rows whose
  new blocks fit now.
* **Decode**: as many steps (at most ``max_steps``) as the worst case of every row's growth fits.
* **Preemption**: when nothing fits, the most recently admitted request gives its blocks back
  and goes to the front of the queue, to be recomputed (prompt plus the tokens it produced).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from jax_paged_kv.cache.swap import SwappedSequence
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine.blocks import BlockLedger
from jax_paged_kv.serving.engine.metrics import RequestOutput


@dataclasses.dataclass
class Request:
  """A request inside the engine: its output so far and what is left to prefill."""

  out: RequestOutput
  sampling: SamplingParams
  slot: int = -1
  context: list[int] = dataclasses.field(default_factory=list)  # tokens to prefill
  prefilled: int = 0  # tokens of ``context`` in the cache
  admit_order: int = 0
  cache_salt: str | None = None  # prefix caching: requests share blocks only with equal salts
  pending: frozenset = frozenset()  # prefix caching: hashes of the full blocks it will write
  # prefix caching: (context, salt, hashes of the context's full blocks), computed once
  block_hashes: tuple | None = dataclasses.field(default=None, repr=False)
  swapped: SwappedSequence | None = None  # swap preemption: its blocks, in host memory
  # Recompute under approximate (token) eviction: context positions >= replay_from (the
  # tokens it had generated) are prefilled one per step, as they were decoded.
  replay_from: int | None = None
  # Parallel sampling (SamplingParams(n > 1)): the request's samples, this one included (one
  # list shared by all); a sample shares the prompt's full blocks of another one in the cache.
  group: list[Request] | None = dataclasses.field(default=None, repr=False)

  @property
  def prefilling(self) -> bool:
    return self.prefilled < len(self.context)


class Scheduler:
  """Request queues, free sequence slots and the admission / budget / preemption policies.

  Args:
    ledger: the host block accounting.
    max_batch: most requests running at once.
    watermark_blocks: blocks kept free at admission (``PAGED``).
    reserve_ratio: share of a running request's remaining ``max_new_tokens`` it is expected to
      still need, at admission.
  """

  def __init__(self, ledger: BlockLedger, *, max_batch: int, watermark_blocks: int,
               reserve_ratio: float, fixed_chunks: bool = False):
    self.ledger = ledger
    # Token eviction (StreamingLLM) makes what a prompt query sees depend on where its chunk
    # starts: with fixed_chunks every prefill chunk starts at a multiple of the chunk size
    # (a row the budget cannot take whole waits), and replayed generated tokens go one by one.
    self.fixed_chunks = fixed_chunks
    self.max_batch = max_batch
    self.watermark_blocks = watermark_blocks
    self.reserve_ratio = reserve_ratio
    self.waiting: collections.deque[Request] = collections.deque()
    self.running: list[Request] = []
    self.free_slots = list(range(ledger.config.max_seqs - 1, -1, -1))  # pop() gives slot 0
    self._admitted = 0
    # Hooks the engine sets: blocks of a request already in the cache (prefix caching, parallel
    # samples), whether it should wait for blocks another request is writing, and (prefix
    # caching) a way to evict cached blocks: ``reclaim(req, blocks_short, need_slot)``.
    self.hit_blocks: Callable[[Request], int] = lambda r: 0
    # defer(req): None, or why it waits: "sibling" (a parallel sample whose sibling is
    # prefilling the prompt: the requests behind it go in meanwhile) or anything else (it holds
    # the queue).
    self.defer: Callable[[Request], str | None] = lambda r: None
    self.reclaim: Callable[[Request, int, bool], None] | None = None

  # ---- accounting ----------------------------------------------------------------------------

  def expected_blocks(self, r: Request) -> int:
    """Blocks ``r`` will hold by its end under the ``reserve_ratio`` estimate."""
    left = r.sampling.max_new_tokens - len(r.out.tokens)
    return int(self.ledger.held_at(len(r.out.prompt) + len(r.out.tokens)
                                   + math.ceil(self.reserve_ratio * left)))

  def promised_blocks(self) -> int:
    """Blocks the admitted but not fully prefilled requests will still take."""
    if not self.ledger.paged:
      return 0
    blocks = self.ledger.blocks
    return sum(int(blocks(len(r.context)) - blocks(r.prefilled))
               for r in self.running if r.prefilling)

  # ---- policies ------------------------------------------------------------------------------

  def admit(self, install: Callable[[Request], None] | None = None) -> list[Request]:
    """Moves the waiting requests that fit to ``running``; returns them (slots assigned).

    Args:
      install: called on each admitted request right after its slot is assigned, before the
        next request is considered (the engine puts it in the cache there).
    """
    admitted, held = [], []
    while self.waiting and len(self.running) < self.max_batch:
      req = self.waiting[0]
      if not self.free_slots and self.reclaim is not None:
        self.reclaim(req, 0, True)
      if not self.free_slots:
        break
      why = self.defer(req)
      if why:
        if why != "sibling":
          break
        # A parallel sample waiting for a sibling's prompt lets the requests behind it in (it
        # stays ahead of them in the queue: the first admitted once it may be).
        held.append(self.waiting.popleft())
        continue
      if self.ledger.paged:
        short = self._shortfall(req)
        if short > 0 and self.reclaim is not None:
          self.reclaim(req, short, False)
          short = self._shortfall(req)
        if short > 0:
          break
      self.waiting.popleft()
      req.slot = self.free_slots.pop()
      if req.swapped is None:  # a swapped-out request keeps what it had
        req.prefilled = 0
      req.admit_order = self._admitted
      self._admitted += 1
      self.running.append(req)
      admitted.append(req)
      if req.out.first_scheduled_time is None:
        req.out.first_scheduled_time = time.perf_counter()
      if install is not None:
        install(req)
    self.waiting.extendleft(reversed(held))
    return admitted

  def _shortfall(self, req: Request) -> int:
    """Blocks missing to admit ``req`` now (<= 0: it fits)."""
    expected = sum(max(0, self.expected_blocks(r) - self.ledger.held(r.slot))
                   for r in self.running)
    room = self.ledger.free_blocks() - expected
    wm = self.watermark_blocks if self.running else 0
    return self.expected_blocks(req) - self.hit_blocks(req) + wm - room

  def prefill_rows(self, chunk: int, budget: int,
                   max_rows: int | None = None) -> list[tuple[Request, int]]:
    """``(request, tokens)`` of this step's prefill: at most ``max_rows`` rows, only rows whose
    new blocks fit now (beside the rows before them)."""
    rows = []
    room = self.ledger.free_blocks() if self.ledger.paged else 0
    for r in self.running:
      if not r.prefilling or budget <= 0 or (max_rows is not None and len(rows) >= max_rows):
        continue
      end = len(r.context)
      if r.replay_from is not None:
        end = r.replay_from if r.prefilled < r.replay_from else r.prefilled + 1
      n = min(chunk, end - r.prefilled)
      if self.fixed_chunks and n > budget:
        continue  # never a cut chunk: its boundaries would depend on the batch-mates
      n = min(n, budget)
      if self.ledger.paged:
        grow = int(self.ledger.blocks(r.prefilled + n) - self.ledger.blocks(r.prefilled))
        if grow > room:
          continue
        room -= grow
      rows.append((r, n))
      budget -= n
    return rows

  def decode_budget(self, reqs: Sequence[Request], max_steps: int) -> int:
    """Most decode steps (<= ``max_steps``) whose worst-case block needs fit the pool."""
    if not self.ledger.paged:
      return max_steps
    lens = self.ledger.lens[[r.slot for r in reqs]]
    left = np.asarray([r.sampling.max_new_tokens - len(r.out.tokens) for r in reqs])
    room = self.ledger.free_blocks() - self.promised_blocks()
    for steps in range(max_steps, 0, -1):
      grow = self.ledger.blocks(lens + np.minimum(steps, left)) - self.ledger.blocks(lens)
      if int(grow.sum()) <= room:
        return steps
    return 0

  def victim(self) -> Request:
    """The request to preempt: the most recently admitted one (it has done the least work,
    and the older requests, finishing first, free the most blocks soonest)."""
    return max(self.running, key=lambda r: r.admit_order)

  # ---- transitions (the engine updates the cache first) --------------------------------------

  def release(self, r: Request) -> None:
    """``r`` left the cache (finished or preempted): its slot is free again."""
    self.ledger.clear(r.slot)
    self.free_slots.append(r.slot)
    self.running.remove(r)

  def requeue(self, r: Request, swapped: SwappedSequence | None = None) -> None:
    """A preempted ``r`` goes to the front of the queue, to recompute everything it had, or,
    with ``swapped`` (its blocks in host memory), to have them copied back."""
    r.slot = -1
    r.swapped = swapped
    if swapped is None:
      r.context = r.out.prompt + r.out.tokens
      r.prefilled = 0
      if self.fixed_chunks:
        r.replay_from = len(r.out.prompt)
    r.out.num_preemptions += 1
    self.waiting.appendleft(r)
