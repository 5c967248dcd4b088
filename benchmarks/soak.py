"""Soak: long random workloads through the engine and the cache ops, checked at every step.

    PYTHONPATH=. python -m benchmarks.soak                      # both soaks, 2000 steps each
    PYTHONPATH=. python -m benchmarks.soak --steps 20000 --seed 3
    PYTHONPATH=. python -m benchmarks.soak --only engine --steps 500 --json soak.json

**Engine soak.** Requests arrive at random engine steps (Poisson arrivals between
:meth:`~jax_paged_kv.Engine.step` calls) with random prompt and output lengths; most are
greedy, some sampled with their own seed, some carry a stop token. The pool is small and the
engine admits eagerly (``watermark=0, reserve_ratio=0``), so requests are preempted and
recomputed. After every step :func:`~jax_paged_kv.check_invariants` must hold; at the end every
block must be free and every reference count zero, and every request's tokens must equal an
unconstrained run of the same requests (all queued at once, on a pool big enough that nothing
is preempted). Sampled requests are compared too: a request's ``n``-th token is sampled with
``fold_in(key(seed), n)`` (:mod:`jax_paged_kv.serving.decoding`),
whatever its batch-mates and however
often it was recomputed.

**Cache soak.** A random mix of ``allocate_sequences``, ``append_kv``, ``fork_sequence`` (a
parent may get several children in one call), ``truncate_sequences`` and ``free_sequences`` on
a small pool, every op under ``jax.jit`` (they return ``(cache, status)`` and never raise),
some calls invalid on purpose or too big for the pool. A plain-Python model keeps, per live
sequence, the token ids appended to it and its logical blocks with reference counts (forks
share blocks, copy-on-write separates them). After every op: the status says "rejected" exactly
when the model does, a rejected call left the cache bitwise unchanged (telemetry aside),
``check_invariants`` holds, the free count and every block's reference count match the model,
the block tables share physical blocks exactly where the model shares logical ones, and
``lookup_kv`` of every slot returns the K/V values of the model's token ids. At the end
everything is freed: every block free, every reference count zero.

``tests/test_soak.py`` runs both at CI size through :func:`engine_soak` and :func:`cache_soak`.
The program prints the figures as a table (and ``--json`` writes them) and exits non-zero if
any check failed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from jax_paged_kv import (
  CacheConfig,
  allocate_sequences,
  append_kv,
  check_invariants,
  fork_sequence,
  free_sequences,
  init_cache,
  lookup_kv,
  reorder_sequences,
  truncate_sequences,
)
from jax_paged_kv.models import LlamaConfig, init_params
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine

# The shape of tests/llama_fixtures.SMALL: 2 layers, GQA 2:1, a tiny vocabulary.
SOAK_MODEL = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, rope_theta=500.0)
MAX_PROBLEMS = 20  # messages kept per soak (the counters keep counting)


@dataclasses.dataclass
class SoakReport:
  """What a soak did and what it found.

  Attributes:
    name: ``"engine"`` or ``"cache"``.
    figures: ordered ``{name: count}``, e.g. steps run, preemptions, blocks leaked, mismatches.
    problems: the first :data:`MAX_PROBLEMS` failed checks, in words (empty if all held).
    seconds: wall time of the soak.
    outputs: engine soak only: ``{request index: (prompt, sampling, tokens)}`` of the
      constrained run (key ``(request index, sample)`` for the samples of one with ``n > 1``),
      for extra oracles (the CI test checks greedy requests against float64 numpy).
  """

  name: str
  figures: dict[str, int]
  problems: list[str]
  seconds: float
  outputs: dict[int | tuple[int, int], tuple[list[int], SamplingParams, list[int]]] = (
      dataclasses.field(default_factory=dict))

  @property
  def ok(self) -> bool:
    return not self.problems

  def problem(self, msg: str) -> None:
    if len(self.problems) < MAX_PROBLEMS:
      self.problems.append(msg)


def _leak_figures(cache) -> dict[str, int]:
  """Blocks not back on the free list, nonzero reference counts and live slots of a cache."""
  usable = cache.config.num_blocks - 1
  return {
      "blocks leaked": usable - int(cache.allocator.num_free),
      "nonzero ref counts": int(np.count_nonzero(np.asarray(cache.allocator.ref_counts))),
      "live slots": int(np.count_nonzero(np.asarray(cache.active))),
  }


# ---------------------------------------------------------------------------------------------
# engine soak


def make_requests(rng: np.random.Generator, steps: int, *, vocab: int, max_seq_len: int,
                  arrival_rate: float, max_prompt: int, max_new: int,
                  sampled_fraction: float = 0.3, stop_fraction: float = 0.2,
                  feature_fraction: float = 0.0, feature_seed: int = 0):
  """Random arrivals: ``[(arrival_step, prompt, SamplingParams)]`` over ``steps`` steps.

  Each step gets ``Poisson(arrival_rate)`` requests; prompt and output lengths are uniform
  (their sum fits ``max_seq_len``); a ``sampled_fraction`` samples (temperature, top-k, top-p
  and seed drawn at random), a ``stop_fraction`` has one random stop token. A
  ``feature_fraction`` also takes some of min-p, the repetition / presence / frequency
  penalties, logprobs with top alternatives, prompt logprobs, and 2 or 3 parallel samples
  (``n``), drawn from their own generator (``feature_seed``), so the other draws are those of
  a run without them.
  """
  extra = np.random.default_rng(feature_seed)
  reqs = []
  for step in range(steps):
    for _ in range(rng.poisson(arrival_rate)):
      n_prompt = int(rng.integers(1, max_prompt + 1))
      n_new = int(rng.integers(1, min(max_new, max_seq_len - n_prompt) + 1))
      prompt = rng.integers(0, vocab, n_prompt).tolist()
      kw: dict = dict(max_new_tokens=n_new)
      if rng.random() < sampled_fraction:
        kw.update(temperature=float(rng.choice([0.6, 1.0, 1.5])),
                  top_k=int(rng.choice([0, 8, 32])), top_p=float(rng.choice([1.0, 0.9, 0.7])),
                  seed=int(rng.integers(0, 2**31 - 1)))
      if rng.random() < stop_fraction:
        kw.update(stop_tokens=(int(rng.integers(0, vocab)),))
      if extra.random() < feature_fraction:
        if extra.random() < 0.5:
          kw.update(min_p=float(extra.choice([0.05, 0.2])))
        if extra.random() < 0.5:
          kw.update(repetition_penalty=float(extra.choice([0.8, 1.3])),
                    presence_penalty=float(extra.choice([0.0, 0.5])),
                    frequency_penalty=float(extra.choice([0.0, -0.5, 1.0])))
        if extra.random() < 0.5:
          kw.update(logprobs=True, top_logprobs=int(extra.choice([0, 3])))
        if extra.random() < 0.5:
          kw.update(prompt_logprobs=True)
        if extra.random() < 0.3:
          kw.update(n=int(extra.choice([2, 3])))
      reqs.append((step, prompt, SamplingParams(**kw)))
  return reqs


def _same_scores(got, want, atol: float = 1e-4) -> bool:
  """Whether two requests' logprobs, top alternatives and prompt logprobs agree (to ``atol``;
  two alternatives within ``atol`` of each other may come in either order)."""
  for field in ("logprobs", "prompt_logprobs"):
    a, b = getattr(got, field), getattr(want, field)
    if (a is None) != (b is None):
      return False
    if a is not None:
      a, b = np.asarray(a, float), np.asarray(b, float)
      if a.shape != b.shape or not np.allclose(a, b, atol=atol, rtol=0, equal_nan=True):
        return False
  a, b = got.top_logprobs, want.top_logprobs
  if (a is None) != (b is None):
    return False
  if len(a or ()) != len(b or ()):
    return False
  for x, y in zip(a or (), b or (), strict=True):
    vx, vy = np.asarray([v for _, v in x]), np.asarray([v for _, v in y])
    if vx.shape != vy.shape or not np.allclose(vx, vy, atol=atol, rtol=0):
      return False
    for j, ((tx, _), (ty, _)) in enumerate(zip(x, y, strict=True)):
      # Two tokens may swap places only in a near tie: with a neighbour in the list, or, in
      # the last place, with the first token left out (the values already agree).
      tie = j == len(vy) - 1 or any(abs(vy[j] - vy[k]) <= atol for k in (j - 1, j + 1)
                                    if 0 <= k < len(vy))
      if tx != ty and not tie:
        return False
  return True


def engine_soak(steps: int = 300, *, seed: int = 0, model: LlamaConfig = SOAK_MODEL,
                params=None, usable_blocks: int = 16, max_seqs: int = 4, max_seq_len: int = 48,
                block_size: int = 4, arrival_rate: float = 0.6, max_prompt: int = 24,
                max_new: int = 16, prefill_chunk: int = 8, decode_steps: int = 4,
                feature_fraction: float = 0.3, preemption: str = "recompute",
                progress: Callable[[str], object] | None = None,
                progress_every: int = 100) -> SoakReport:
  """Random arrivals into a preempting engine; checks every step and against an unconstrained run.

  Args:
    steps: engine steps during which requests arrive (the run then drains the queue, so it
      takes somewhat more steps; ``figures["engine steps"]`` counts them).
    seed: seeds the workload (and the parameters if ``params`` is None).
    model, params: the model (default: :data:`SOAK_MODEL` with random parameters).
    usable_blocks, max_seqs, max_seq_len, block_size: the constrained cache.
    arrival_rate: mean requests arriving per step.
    max_prompt, max_new: prompt and output length bounds.
    prefill_chunk, decode_steps: engine knobs (one compiled shape per step kind).
    feature_fraction: share of requests that also use min-p, penalties, logprobs (with top
      alternatives), prompt logprobs or parallel samples; their scores must match the
      unconstrained run's too.
    preemption: the constrained engine's ``preemption`` (``"recompute"`` or ``"swap"``).
    progress: called with a status line every ``progress_every`` steps.

  Returns:
    A :class:`SoakReport` with figures ``engine steps``, ``requests``, ``sampled requests``,
    ``preemptions``, ``generated tokens``, ``invariant failures``, ``blocks leaked``,
    ``nonzero ref counts``, ``mismatches`` (requests whose tokens differ from the
    unconstrained run) and ``reference preemptions`` (must be 0).
  """
  t0 = time.perf_counter()
  rng = np.random.default_rng(seed)
  if params is None:
    params = init_params(model, jax.random.PRNGKey(seed), scale=2.0)
  requests = make_requests(rng, steps, vocab=model.vocab_size, max_seq_len=max_seq_len,
                           arrival_rate=arrival_rate, max_prompt=max_prompt, max_new=max_new,
                           feature_fraction=feature_fraction, feature_seed=seed + 7919)
  rep = SoakReport("engine", {}, [], 0.0)
  # One compiled shape per step kind: full batch width, every table column.
  knobs = dict(prefill_chunk=prefill_chunk, decode_steps=decode_steps, batch_bucket_min=max_seqs,
               bucket_blocks=False)

  def config(num_blocks):
    return model.cache_config(num_blocks=num_blocks, max_seqs=max_seqs, max_seq_len=max_seq_len,
                              block_size=block_size)

  small = config(1 + usable_blocks)
  engine = Engine(params, model, small, watermark=0.0, reserve_ratio=0.0,
                  preemption=preemption, **knobs)
  by_step = collections.defaultdict(list)
  for arrival, prompt, sampling in requests:
    by_step[arrival].append((prompt, sampling))
  ids: dict[int, int] = {}  # request index -> engine request id
  invariant_failures = free_drift = 0
  step = 0
  while step < steps or engine.has_work:
    for prompt, sampling in by_step.get(step, ()):
      ids[len(ids)] = engine.add_request(prompt, sampling)
    if engine.has_work:
      engine.step()
      inv = check_invariants(engine.cache)
      if not bool(inv.ok):
        invariant_failures += 1
        rep.problem(f"engine step {engine.metrics.steps}: invariants fail: {inv.failures()}")
      # The scheduler's free count (host mirror, or the device's once blocks are shared) is
      # the device's own after every step: a stale one overcommits the pool.
      host, device = engine.ledger.free_blocks(), int(engine.cache.allocator.num_free)
      if host != device:
        free_drift += 1
        rep.problem(f"engine step {engine.metrics.steps}: the engine counts {host} free "
                    f"blocks, the device {device}")
    step += 1
    if progress is not None and step % progress_every == 0:
      m = engine.metrics
      progress(f"engine step {m.steps}: {len(ids)}/{len(requests)} arrived, "
               f"{len(engine.finished)} finished, {engine.num_running} running, "
               f"{engine.num_waiting} waiting, {m.preemptions} preemptions")
  done = engine.finished
  outputs = sum(s.n for _, _, s in requests)  # a request with n > 1 has n samples
  if len(done) != outputs:
    rep.problem(f"{len(done)} of {outputs} outputs ({len(requests)} requests) finished")

  # The unconstrained run: every request queued at once; room for max_seqs full sequences.
  # A request with n samples goes in as n requests of its own with seeds seed .. seed + n - 1
  # (what its samples must equal), so nothing is shared there.
  big = config(1 + max_seqs * small.max_blocks_per_seq)
  ref_engine = Engine(params, model, big, watermark=0.0, reserve_ratio=1.0, **knobs)
  ref_ids = [[ref_engine.add_request(p, dataclasses.replace(s, n=1, seed=s.seed + j,
                                                            prompt_logprobs=s.prompt_logprobs
                                                            and j == 0))
              for j in range(s.n)] for _, p, s in requests]
  ref = {o.request_id: o for o in ref_engine.run()}
  if progress is not None:
    progress(f"reference run: {ref_engine.metrics.steps} steps, "
             f"{ref_engine.metrics.preemptions} preemptions")

  mismatches = 0
  for i, (_, prompt, sampling) in enumerate(requests):
    for j in range(sampling.n):  # sample j of request i: id ids[i] + j, the reference ref_ids[i][j]
      rid = ids[i] + j
      got = done[rid].tokens if rid in done else None
      want = ref[ref_ids[i][j]].tokens
      rep.outputs[i if sampling.n == 1 else (i, j)] = (prompt, sampling, got)
      name = f"request {i}" + (f" sample {j}" if sampling.n > 1 else "")
      if got == want and not _same_scores(done[rid], ref[ref_ids[i][j]]):
        mismatches += 1
        rep.problem(f"{name}: logprobs, top alternatives or prompt logprobs differ from the "
                    "unconstrained run's")
      elif got != want:
        mismatches += 1
        rep.problem(f"{name} ({'sampled' if sampling.temperature else 'greedy'}, "
                    f"{done[rid].num_preemptions if rid in done else '?'} preemptions): "
                    f"{got} != unconstrained {want}")
  m = engine.metrics
  if sum(o.num_preemptions for o in done.values()) != m.preemptions:
    rep.problem("per-request preemption counts do not add up to metrics.preemptions")
  leaks = _leak_figures(engine.cache)
  for name, n in leaks.items():
    if n:
      rep.problem(f"engine cache at the end: {n} {name}")
  rep.figures = {
      "engine steps": m.steps,
      "requests": len(requests),
      "sampled requests": sum(s.temperature > 0 for _, _, s in requests),
      "requests with min-p, penalties or logprobs": sum(
          s.min_p > 0 or s.has_penalties or s.logprobs or s.prompt_logprobs
          for _, _, s in requests),
      "requests with n > 1 samples": sum(s.n > 1 for _, _, s in requests),
      "prompt tokens shared by samples": m.shared_prompt_tokens,
      "preemptions": m.preemptions,
      "generated tokens": m.generated_tokens,
      "invariant failures": invariant_failures,
      "free count drifts": free_drift,
      **leaks,
      "mismatches": mismatches,
      "reference preemptions": ref_engine.metrics.preemptions,
  }
  if ref_engine.metrics.preemptions:
    rep.problem(f"the unconstrained run preempted {ref_engine.metrics.preemptions} times")
  rep.seconds = time.perf_counter() - t0
  return rep


# ---------------------------------------------------------------------------------------------
# cache soak


def kv_values(token_ids, layers: int, heads: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
  """The K and V a token id stands for: ``float32[..., layers, heads, head_dim]``, exact.

  ``k = id + c / 64`` with ``c`` the flat (layer, head, dim) index (< 64 here) and ``v = -k``;
  ids are taken modulo ``2**17`` so every value is exact in float32.
  """
  ids = np.asarray(token_ids, np.float64) % 2**17
  c = np.arange(layers * heads * head_dim).reshape(layers, heads, head_dim) / 64
  k = ids[..., None, None, None] + c
  return k.astype(np.float32), (-k).astype(np.float32)


class CacheModel:
  """Plain-Python model of a paged cache: token ids and logical blocks of each live sequence.

  Logical blocks are integers (never the cache's physical ids); forks share them and hold one
  reference each; a write into a shared partly filled block first moves the writer to a fresh
  block (copy-on-write). Each op method returns whether the cache must accept the call and, if
  so, applies it.
  """

  def __init__(self, cfg: CacheConfig):
    self.cfg = cfg
    self.bs = cfg.block_size
    self.tokens: dict[int, list[int]] = {}  # live slot -> token ids
    self.blocks: dict[int, list[int]] = {}  # live slot -> logical blocks
    self.refs: collections.Counter[int] = collections.Counter()
    self._next_block = 0
    self.pool_rejections = 0
    self.cow_copies = 0

  @property
  def num_free(self) -> int:
    return self.cfg.num_blocks - 1 - sum(1 for r in self.refs.values() if r > 0)

  def _new_block(self) -> int:
    self._next_block += 1
    self.refs[self._next_block] = 1
    return self._next_block

  def _release(self, b: int) -> None:
    self.refs[b] -= 1
    if self.refs[b] == 0:
      del self.refs[b]

  def _distinct(self, ids) -> bool:
    return len(set(ids)) == len(ids)

  def allocate(self, ids) -> bool:
    if not self._distinct(ids) or any(s in self.tokens for s in ids):
      return False
    for s in ids:
      self.tokens[s], self.blocks[s] = [], []
    return True

  def append(self, ids, new_tokens) -> bool:
    if not self._distinct(ids) or any(s not in self.tokens for s in ids):
      return False
    if any(len(self.tokens[s]) + len(t) > self.cfg.max_seq_len
           for s, t in zip(ids, new_tokens, strict=True)):
      return False
    bs = self.bs
    cow = {s: bool(t) and len(self.tokens[s]) % bs != 0 and self.refs[self.blocks[s][-1]] > 1
           for s, t in zip(ids, new_tokens, strict=True)}  # decided before any row moves
    need = sum(math.ceil((len(self.tokens[s]) + len(t)) / bs)
               - math.ceil(len(self.tokens[s]) / bs) + cow[s]
               for s, t in zip(ids, new_tokens, strict=True))
    if need > self.num_free:
      self.pool_rejections += 1
      return False
    for s, t in zip(ids, new_tokens, strict=True):
      if cow[s]:
        self.cow_copies += 1
        self._release(self.blocks[s][-1])
        self.blocks[s][-1] = self._new_block()
      self.tokens[s] += t
      while len(self.blocks[s]) < math.ceil(len(self.tokens[s]) / bs):
        self.blocks[s].append(self._new_block())
    return True

  def fork(self, parents, children) -> bool:
    # One parent may be forked into several children (beam search); children are distinct.
    if (not self._distinct(children)
        or any(p not in self.tokens for p in parents) or any(c in self.tokens for c in children)):
      return False
    for p, c in zip(parents, children, strict=True):
      self.tokens[c] = list(self.tokens[p])
      self.blocks[c] = list(self.blocks[p])
      for b in self.blocks[c]:
        self.refs[b] += 1
    return True

  def reorder(self, ids, srcs) -> bool:
    # Each id takes what its source held before the call (sources may repeat, or be an id).
    if (not self._distinct(ids) or any(s not in self.tokens for s in ids)
        or any(s not in self.tokens for s in srcs)):
      return False
    old = {s: (list(self.tokens[s]), list(self.blocks[s])) for s in set(srcs)}
    for src in srcs:
      for b in old[src][1]:
        self.refs[b] += 1
    for s, src in zip(ids, srcs, strict=True):
      for b in self.blocks[s]:
        self._release(b)
      self.tokens[s], self.blocks[s] = list(old[src][0]), list(old[src][1])
    return True

  def truncate(self, ids, counts) -> bool:
    if (not self._distinct(ids) or any(s not in self.tokens for s in ids)
        or any(not 0 <= n <= len(self.tokens[s]) for s, n in zip(ids, counts, strict=True))):
      return False
    for s, n in zip(ids, counts, strict=True):
      self.tokens[s] = self.tokens[s][:len(self.tokens[s]) - n]
      keep = math.ceil(len(self.tokens[s]) / self.bs)
      for b in self.blocks[s][keep:]:
        self._release(b)
      self.blocks[s] = self.blocks[s][:keep]
    return True

  def free(self, ids) -> bool:
    if not self._distinct(ids) or any(s not in self.tokens for s in ids):
      return False
    for s in ids:
      for b in self.blocks.pop(s):
        self._release(b)
      del self.tokens[s]
    return True


def _pad(xs, width: int, fill: int = -1) -> np.ndarray:
  return np.asarray(list(xs) + [fill] * (width - len(xs)), np.int32)


# The cache ops under jax.jit (one compiled shape per batch width and append length).
_OPS = dict(
    allocate=jax.jit(lambda c, ids: allocate_sequences(c, ids)),
    append=jax.jit(lambda c, k, v, ids, n: append_kv(c, k, v, ids, num_new=n)),
    fork=jax.jit(lambda c, parents, children: fork_sequence(c, parents, children)),
    reorder=jax.jit(lambda c, ids, srcs: reorder_sequences(c, ids, srcs)),
    truncate=jax.jit(lambda c, ids, n: truncate_sequences(c, ids, n)),
    free=jax.jit(lambda c, ids: free_sequences(c, ids)),
)


@jax.jit
def _read_all(cache):
  """``lookup_kv`` of every slot and layer: k, v ``[max_seqs, max_len, layers, heads, dim]``."""
  ids = jnp.arange(cache.config.max_seqs, dtype=jnp.int32)
  ks, vs = [], []
  for layer in range(cache.config.num_layers):
    k, v, lens = lookup_kv(cache, ids, layer)
    ks.append(k)
    vs.append(v)
  return jnp.stack(ks, 2), jnp.stack(vs, 2), lens


def _unchanged(a, b) -> bool:
  """Bitwise equality of two caches, telemetry aside."""
  a = a.replace(telemetry=b.telemetry)
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
             for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                             strict=True))


def cache_soak(steps: int = 400, *, seed: int = 0, num_blocks: int = 1 + 14, max_seqs: int = 8,
               max_seq_len: int = 32, block_size: int = 4, width: int = 3, max_new: int = 6,
               invalid_fraction: float = 0.05, progress: Callable[[str], object] | None = None,
               progress_every: int = 500) -> SoakReport:
  """A random allocate/append/fork/truncate/free workload under jit against :class:`CacheModel`.

  Args:
    steps: cache ops to run (then everything left is freed).
    seed: seeds the workload.
    num_blocks, max_seqs, max_seq_len, block_size: the cache (2 layers, 2 KV heads, dim 4).
    width: rows per op call (padded with ``-1``).
    max_new: most tokens one row appends in one call.
    invalid_fraction: share of calls made invalid on purpose (an inactive or in-use slot, a
      duplicate id, a count out of range); the pool running dry comes on its own.
    progress: called with a status line every ``progress_every`` ops.

  Returns:
    A :class:`SoakReport` with figures ``ops``, ``allocations``, ``appends``, ``forks``,
    ``truncations``, ``frees`` (accepted calls), ``rejected calls``, ``pool exhausted``,
    ``copy-on-write copies``, ``peak shared blocks``, ``invariant failures``,
    ``status mismatches``, ``mismatches`` (slots whose contents or blocks differ from the model),
    ``blocks leaked`` and ``nonzero ref counts``.
  """
  t0 = time.perf_counter()
  rng = np.random.default_rng(seed)
  cfg = CacheConfig(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=num_blocks,
                    max_seqs=max_seqs, max_seq_len=max_seq_len, block_size=block_size,
                    dtype=jnp.float32)
  L, H, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
  model = CacheModel(cfg)
  cache = init_cache(cfg)
  rep = SoakReport("cache", {}, [], 0.0)
  count = collections.Counter()
  next_token = [1]
  peak_shared = 0

  def fresh_tokens(n):
    t = list(range(next_token[0], next_token[0] + n))
    next_token[0] += n
    return t

  def call(op, *args):
    """Runs ``op`` under jit; returns (new cache, any row failed)."""
    out = _OPS[op](cache, *args)
    return out[0], bool(np.any(np.asarray(out[-1])))

  def check(step, op):
    nonlocal peak_shared
    inv = check_invariants(cache)
    if not bool(inv.ok):
      count["invariant failures"] += 1
      rep.problem(f"op {step} ({op}): invariants fail: {inv.failures()}")
    if int(cache.allocator.num_free) != model.num_free:
      count["mismatches"] += 1
      rep.problem(f"op {step} ({op}): num_free {int(cache.allocator.num_free)} != model "
                  f"{model.num_free}")
    tables = np.asarray(cache.block_tables)
    refs = np.asarray(cache.allocator.ref_counts)
    k, v, lens = (np.asarray(x) for x in _read_all(cache))
    phys_of, log_of = {}, {}
    for s in range(max_seqs):
      toks = model.tokens.get(s)
      n = 0 if toks is None else len(toks)
      want_k = np.zeros(k.shape[1:], np.float32)
      want_v = np.zeros(v.shape[1:], np.float32)
      if n:
        want_k[:n], want_v[:n] = kv_values(toks, L, H, D)
      bad = int(lens[s]) != n or not (np.array_equal(k[s], want_k)
                                      and np.array_equal(v[s], want_v))
      for j, lb in enumerate(model.blocks.get(s, [])):
        pb = int(tables[s, j])
        if phys_of.setdefault(lb, pb) != pb or log_of.setdefault(pb, lb) != lb:
          bad = True  # sharing differs from the model's
        if refs[pb] != model.refs[lb]:
          bad = True
      if bad:
        count["mismatches"] += 1
        rep.problem(f"op {step} ({op}): slot {s} differs from the model (len {int(lens[s])} "
                    f"vs {n})")
    peak_shared = max(peak_shared, int(np.sum(refs > 1)))

  def pick(pool, lo=1, hi=None):
    pool = list(pool)
    hi = min(width, len(pool)) if hi is None else min(hi, len(pool))
    if hi < lo:
      return []
    return [int(x) for x in rng.choice(pool, int(rng.integers(lo, hi + 1)), replace=False)]

  for step in range(steps):
    live = sorted(model.tokens)
    idle = [s for s in range(max_seqs) if s not in model.tokens]
    bad = rng.random() < invalid_fraction
    weights = dict(allocate=2 if idle else 0, append=5 if live else 0,
                   fork=2 if live and idle else 0, reorder=1.5 if live else 0,
                   truncate=2 if live else 0,
                   free=1.5 if live else 0)
    names = list(weights)
    p = np.asarray([weights[n] for n in names], float)
    op = names[int(rng.choice(len(names), p=p / p.sum()))]
    before = cache
    if op == "allocate":
      ids = pick(idle)
      if bad and live:
        ids = (ids + [int(rng.choice(live))])[-width:]  # an active slot: SLOT_IN_USE
      accepted = model.allocate(ids)
      cache, failed = call(op, _pad(ids, width))
    elif op == "append":
      ids = pick(live)
      if bad:
        ids = (ids + [int(rng.choice(idle or live))])[-width:]  # inactive, or live (maybe a repeat)
      counts = [int(rng.integers(0, max_new + 1)) for _ in ids]
      new = [fresh_tokens(n) for n in counts]
      # Stale values past num_new (and in padding rows) must never be stored.
      k = np.full((L, width, max_new, H, D), -7.0, np.float32)
      v = np.full((L, width, max_new, H, D), 7.0, np.float32)
      for r, t in enumerate(new):
        if t:
          kt, vt = kv_values(t, L, H, D)  # [n, L, H, D]
          k[:, r, :len(t)] = kt.transpose(1, 0, 2, 3)
          v[:, r, :len(t)] = vt.transpose(1, 0, 2, 3)
      accepted = model.append(ids, new)
      cache, failed = call(op, k, v, _pad(ids, width), _pad(counts, width, 0))
    elif op == "fork":
      n = int(rng.integers(1, min(width, len(live), len(idle)) + 1))
      # Half the time one parent gets several children in the same call (beam search).
      parents = [int(x) for x in rng.choice(live, n, replace=bool(rng.integers(2)))]
      children = [int(x) for x in rng.choice(idle, n, replace=False)]
      if bad:
        children[-1] = int(rng.choice(live))  # an active child: SLOT_IN_USE
      accepted = model.fork(parents, children)
      cache, failed = call(op, _pad(parents, width), _pad(children, width))
    elif op == "reorder":
      ids = pick(live)
      # Beam search's reorder: sources among the rows (repeats, a row its own source), or
      # any live sequence.
      srcs = [int(x) for x in rng.choice(ids if rng.integers(2) else live, len(ids))]
      if bad:
        if idle and rng.integers(2):
          srcs[-1] = int(rng.choice(idle))  # an inactive source: INACTIVE_SLOT
        else:
          ids = ids[:width - 1] + ids[:1]  # a repeated sequence: DUPLICATE_SLOT
          srcs = srcs[:width - 1] + srcs[:1]
      accepted = model.reorder(ids, srcs)
      cache, failed = call(op, _pad(ids, width), _pad(srcs, width))
    elif op == "truncate":
      ids = pick(live)
      counts = [int(rng.integers(0, len(model.tokens[s]) + 1)) for s in ids]
      if bad:
        counts[-1] = len(model.tokens[ids[-1]]) + 1  # more than it holds: INVALID_COUNT
      accepted = model.truncate(ids, counts)
      cache, failed = call(op, _pad(ids, width), _pad(counts, width, 0))
    else:
      ids = pick(live)
      if bad and idle:
        ids = (ids + [int(rng.choice(idle))])[-width:]  # double free: INACTIVE_SLOT
      accepted = model.free(ids)
      cache, failed = call(op, _pad(ids, width))
    if failed == accepted:
      count["status mismatches"] += 1
      rep.problem(f"op {step} ({op}): status says {'rejected' if failed else 'accepted'}, the "
                  f"model says {'accepted' if accepted else 'rejected'}")
    if accepted:
      count[op] += 1
    else:
      count["rejected calls"] += 1
      if not _unchanged(cache, before):
        count["mismatches"] += 1
        rep.problem(f"op {step} ({op}): a rejected call changed the cache")
    check(step, op)
    if progress is not None and (step + 1) % progress_every == 0:
      progress(f"cache op {step + 1}/{steps}: {len(model.tokens)} live sequences, "
               f"{model.num_free} blocks free, {count['mismatches']} mismatches")

  # Drain: free every live sequence, then nothing may be held.
  live = sorted(model.tokens)
  for i in range(0, len(live), width):
    ids = live[i:i + width]
    model.free(ids)
    cache, failed = call("free", _pad(ids, width))
    if failed:
      rep.problem(f"final free of {ids} was rejected")
    check(steps, "final free")
  leaks = _leak_figures(cache)
  for name, n in leaks.items():
    if n:
      rep.problem(f"cache at the end: {n} {name}")
  failed_allocs = int(cache.telemetry.failed_allocations)
  if failed_allocs != model.pool_rejections:
    rep.problem(f"telemetry counts {failed_allocs} pool-exhausted calls, the model "
                f"{model.pool_rejections}")
  rep.figures = {
      "ops": steps,
      "allocations": count["allocate"],
      "appends": count["append"],
      "forks": count["fork"],
      "reorders": count["reorder"],
      "truncations": count["truncate"],
      "frees": count["free"],
      "rejected calls": count["rejected calls"],
      "pool exhausted": model.pool_rejections,
      "copy-on-write copies": model.cow_copies,
      "peak shared blocks": peak_shared,
      "invariant failures": count["invariant failures"],
      "status mismatches": count["status mismatches"],
      "mismatches": count["mismatches"],
      **leaks,
  }
  rep.seconds = time.perf_counter() - t0
  return rep


# ---------------------------------------------------------------------------------------------
# the program


def table(reports: list[SoakReport]) -> str:
  """The figures of one or more soaks as a text table (figure, then one column per soak)."""
  names = list(dict.fromkeys(n for r in reports for n in r.figures))
  rows = [[n] + [str(r.figures.get(n, "")) for r in reports] for n in names]
  rows.append(["seconds"] + [f"{r.seconds:.1f}" for r in reports])
  rows.append(["checks"] + ["ok" if r.ok else f"{len(r.problems)} FAILED" for r in reports])
  return report.text_table(["figure"] + [f"{r.name} soak" for r in reports], rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=2000,
                 help="engine steps with arrivals, and cache ops (default 2000)")
  p.add_argument("--cache-steps", type=int, default=None,
                 help="cache ops, if different from --steps")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--only", choices=["engine", "cache"], default=None)
  p.add_argument("--preemption", choices=["recompute", "swap"], default="recompute",
                 help="the engine soak's preemption")
  p.add_argument("--json", default=None, metavar="PATH", help="also write the figures here")
  p.add_argument("--quiet", action="store_true", help="no progress lines")
  args = p.parse_args(argv)
  say = None if args.quiet else functools.partial(print, flush=True)
  every = max(1, args.steps // 20)
  reports = []
  if args.only in (None, "engine"):
    reports.append(engine_soak(args.steps, seed=args.seed, preemption=args.preemption,
                               progress=say, progress_every=every))
  if args.only in (None, "cache"):
    n = args.cache_steps or args.steps
    reports.append(cache_soak(n, seed=args.seed, progress=say, progress_every=max(1, n // 20)))
  print(f"\nsoak, seed {args.seed}; machine: {report.machine_name()}\n")
  print(table(reports))
  for r in reports:
    for msg in r.problems:
      print(f"{r.name}: {msg}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({r.name: {"figures": r.figures, "problems": r.problems, "seconds": r.seconds}
                 for r in reports}, f, indent=1)
  return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
  sys.exit(main())
