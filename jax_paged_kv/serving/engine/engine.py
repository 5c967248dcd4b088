"""The engine: continuous batching on the host around the jitted steps of
:mod:`jax_paged_kv.serving.decoding`.

The :class:`Engine` keeps a queue of requests and, at every :meth:`Engine.step`:

1. admits waiting requests while a sequence slot is free and the pool has room for their prompt
   (plus a small watermark), in arrival order;
2. runs one chunked-prefill call: every admitted request with prompt left contributes up to
   ``prefill_chunk`` tokens, at most ``prefill_token_budget`` tokens in all; a request whose
   prompt completes samples its first token;
3. runs one :func:`~jax_paged_kv.serving.decoding.decode_loop` of up to ``decode_steps`` steps
   over every decoding request (ragged lengths, one compiled step); the number of steps is cut so
   the blocks the rows may need fit in the pool. If not even one step fits, the most recently
   admitted request is *preempted*: its blocks are freed and it goes back to the front of the queue,
   to be recomputed later (prompt plus the tokens it already produced). Nothing fails;
4. frees every finished request's slot at once.

Batch shapes are bucketed (rows, and with the XLA attention path the block-table columns read;
powers of two by default), so a handful of compilations serve a whole run. Host-side slot ids
are the cache's sequence ids; padding rows use ``-1``.

:func:`generate` is the one-call convenience for a list of prompts.

Both serve any model that implements the model protocol (:mod:`jax_paged_kv.models.base`); the
engine never looks inside the model: it checks the cache against the model's geometry and the
prompts against its ``vocab_size``, and calls the jitted steps with it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_paged_kv.cache.config import CacheConfig, CacheStrategy
from jax_paged_kv.cache.errors import (
  PoolExhaustedError,
  SequenceTooLongError,
  Status,
  raise_for_status,
)
from jax_paged_kv.cache.ops import allocate_sequences, free_sequences
from jax_paged_kv.cache.state import PagedKVCache, init_cache
from jax_paged_kv.cache.stats import cache_stats
from jax_paged_kv.models.base import (
  Model,
  attention_knobs,
  cache_config_for,
  check_cache_fits,
  check_model,
)
from jax_paged_kv.serving.decoding import Params, SamplingParams, decode_loop, prefill_step
from jax_paged_kv.serving.engine.batching import Batcher
from jax_paged_kv.serving.engine.blocks import BlockLedger
from jax_paged_kv.serving.engine.metrics import EngineMetrics, RequestOutput
from jax_paged_kv.serving.engine.scheduler import Request, Scheduler


class Engine:
  """A continuous-batching server loop on one cache.

  Args:
    params: model parameters.
    model: the model (:class:`~jax_paged_kv.models.base.Model`, e.g. a
      :class:`~jax_paged_kv.LlamaConfig` or your own).
    cache_config: the cache config (``PAGED`` or ``CONTIGUOUS``); must fit the model.
    max_batch: most sequences decoded at once (default ``cache_config.max_seqs``).
    prefill_chunk: prompt tokens per row per prefill call (the static ``T`` of prefill).
    prefill_token_budget: prompt tokens per prefill call over all rows (default
      ``4 * prefill_chunk``).
    decode_steps: decode steps per :func:`~jax_paged_kv.serving.decoding.decode_loop` call.
    implementation: paged attention implementation (None: the backend's best).
    bucket_blocks: with XLA attention, read only a bucket of block-table columns (at least
      ``block_bucket_min``, growing by ``bucket_factor``) instead of all ``max_blocks``.
    batch_bucket_min: smallest batch width; widths grow by ``bucket_factor`` up to
      ``max_batch`` (``batch_bucket_min=max_batch`` and ``bucket_blocks=False`` give one
      compiled shape per step kind).
    block_bucket_min, bucket_factor: see above; coarser buckets mean fewer compilations.
    decode_width_step: if set, decode batch widths are multiples of it instead of geometric
      buckets (less padding: padding rows cost as much as live ones; more compilations).
    watermark: fraction of the pool kept free at admission (PAGED).
    reserve_ratio: at admission (PAGED), every running request is expected to still need
      ``reserve_ratio`` times its remaining ``max_new_tokens`` (SGLang's "new token ratio"),
      and a request is admitted only if its prompt plus that share of its own budget fits
      beside them. ``1.0`` never preempts requests that run to their limit; ``0.0`` admits
      whenever the prompt fits (vLLM's policy) and relies on preemption.
    track_stats: sample :func:`~jax_paged_kv.cache_stats` every step (utilisation metrics).
  """

  def __init__(self, params: Params, model: Model, cache_config: CacheConfig, *,
               max_batch: int | None = None, prefill_chunk: int = 64,
               prefill_token_budget: int | None = None, decode_steps: int = 8,
               implementation: str | None = None, bucket_blocks: bool = True,
               batch_bucket_min: int = 1, block_bucket_min: int = 1, bucket_factor: int = 2,
               decode_width_step: int | None = None,
               watermark: float = 0.01, reserve_ratio: float = 0.5,
               track_stats: bool = True):
    cc = cache_config
    check_cache_fits(check_model(model), cc)
    if prefill_chunk < 1 or decode_steps < 1:
      raise ValueError(f"{prefill_chunk=} and {decode_steps=} must be >= 1")
    if bucket_factor < 2:
      raise ValueError(f"{bucket_factor=} must be >= 2")
    if not 0 <= reserve_ratio <= 1:
      raise ValueError(f"{reserve_ratio=} must be in [0, 1]")
    self.params = params
    self.model = model
    self.cache_config = cc
    self.max_batch = min(max_batch or cc.max_seqs, cc.max_seqs)
    self.prefill_chunk = int(prefill_chunk)
    self.prefill_token_budget = int(prefill_token_budget or 4 * prefill_chunk)
    if self.prefill_token_budget < self.prefill_chunk:
      raise ValueError(f"prefill_token_budget={self.prefill_token_budget} < "
                       f"prefill_chunk={self.prefill_chunk}")
    self.decode_steps = int(decode_steps)
    self.implementation = implementation
    self.track_stats = track_stats
    self.ledger = BlockLedger(cc)
    self.scheduler = Scheduler(self.ledger, max_batch=self.max_batch,
                               watermark_blocks=int(watermark * cc.usable_blocks),
                               reserve_ratio=float(reserve_ratio))
    self.batcher = Batcher(
        max_batch=self.max_batch, table_width=cc.max_blocks_per_seq, block_size=cc.block_size,
        bucket_blocks=bucket_blocks and bool(attention_knobs(implementation, 1, cc)),
        batch_bucket_min=int(batch_bucket_min), block_bucket_min=int(block_bucket_min),
        bucket_factor=int(bucket_factor), decode_width_step=decode_width_step)
    self.cache: PagedKVCache = init_cache(cc)
    self.metrics = EngineMetrics()
    self._next_id = 0
    self._finished: dict[int, RequestOutput] = {}
    self._seen_shapes: set[tuple] = set()

  @property
  def model_config(self) -> Model:
    """The model (its earlier name)."""
    return self.model

  # ---- requests ------------------------------------------------------------------------------

  def add_request(self, prompt: Sequence[int], sampling: SamplingParams | None = None) -> int:
    """Queues a request; returns its id.

    Raises:
      ValueError: an empty prompt or a token outside ``[0, vocab_size)``.
      SequenceTooLongError: ``len(prompt) + max_new_tokens > max_seq_len``.
      PoolExhaustedError: the sequence could never fit in the pool, even alone.
    """
    sampling = sampling or SamplingParams()
    prompt = [int(t) for t in prompt]
    cc = self.cache_config
    if not prompt:
      raise ValueError("empty prompt: a request needs at least one token")
    bad = [t for t in prompt if not 0 <= t < self.model.vocab_size]
    if bad:
      raise ValueError(f"prompt token {bad[0]} is outside [0, {self.model.vocab_size})")
    total = len(prompt) + sampling.max_new_tokens
    if total > cc.max_seq_len:
      raise SequenceTooLongError(
          f"add_request: {len(prompt)} prompt tokens + max_new_tokens="
          f"{sampling.max_new_tokens} > max_seq_len={cc.max_seq_len}",
          status=Status.SEQUENCE_TOO_LONG)
    if (cc.strategy is CacheStrategy.PAGED
        and math.ceil(total / cc.block_size) > cc.usable_blocks):
      raise PoolExhaustedError(
          f"add_request: {total} tokens need {math.ceil(total / cc.block_size)} blocks, the "
          f"pool has {cc.usable_blocks}", status=Status.POOL_EXHAUSTED)
    rid = self._next_id
    self._next_id += 1
    req = Request(out=RequestOutput(rid, prompt, arrival_time=time.perf_counter()),
                  sampling=sampling, context=list(prompt))
    self.scheduler.waiting.append(req)
    return rid

  @property
  def has_work(self) -> bool:
    return bool(self.scheduler.waiting or self.scheduler.running)

  @property
  def finished(self) -> dict[int, RequestOutput]:
    """Every request finished so far, by request id."""
    return dict(self._finished)

  @property
  def num_running(self) -> int:
    return len(self.scheduler.running)

  @property
  def num_waiting(self) -> int:
    return len(self.scheduler.waiting)

  # ---- the step ------------------------------------------------------------------------------

  def step(self) -> list[RequestOutput]:
    """One engine step: admit, one prefill call, one decode loop, free finished requests.

    Returns:
      The requests that finished during this step.
    """
    t0 = time.perf_counter()
    finished: list[RequestOutput] = []
    for req in self.scheduler.admit():
      self.cache, _ = allocate_sequences(self.cache, np.int32(req.slot))
    running = self.scheduler.running
    if any(r.prefilling for r in running):
      finished += self._prefill()
    if any(not r.prefilling for r in running):
      finished += self._decode()
    m = self.metrics
    m.steps += 1
    m.peak_running = max(m.peak_running, len(running))
    m.running_trace.append(len(running))
    if self.track_stats:
      s = cache_stats(self.cache)
      tokens, slots = int(s.tokens_stored), int(s.allocated_slots)
      m.util_tokens += tokens
      m.util_slots += slots
      m.util_trace.append(tokens / slots if slots else float("nan"))
    m.wall_seconds += time.perf_counter() - t0
    m.time_trace.append(m.wall_seconds)
    return finished

  def run(self, progress: Callable[[int], object] | None = None) -> list[RequestOutput]:
    """Steps until every queued request finished.

    Args:
      progress: called with the number of requests that finished in each step (e.g. a tqdm
        bar's ``update``).

    Returns:
      Every request finished during the run, ordered by request id.
    """
    done = []
    while self.has_work:
      fin = self.step()
      done += fin
      if progress is not None and fin:
        progress(len(fin))
    return sorted(done, key=lambda o: o.request_id)

  # ---- pieces --------------------------------------------------------------------------------

  def _timed(self, key: tuple, fn, *args, **kwargs):
    """Calls ``fn``; the first call per static shape counts as compile time."""
    if key in self._seen_shapes:
      return fn(*args, **kwargs)
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    jax.block_until_ready(res)
    self.metrics.compile_seconds += time.perf_counter() - t0
    self._seen_shapes.add(key)
    return res

  def _prefill(self) -> list[RequestOutput]:
    chunk = self.prefill_chunk
    rows = self.scheduler.prefill_rows(chunk, self.prefill_token_budget)
    if not rows:
      # Nothing fits: make room by preempting the newest request, then retry next step.
      self._preempt()
      return []
    width = self.batcher.width(len(rows))
    tokens, seq_ids, num_new, key_index = self.batcher.prefill_arrays(rows, width, chunk)
    _, temp, top_k, top_p, keys = self.batcher.sampling_rows([r for r, _ in rows], width)
    mb = self.batcher.max_blocks(max(r.prefilled + n for r, n in rows))
    self.cache, nxt, _, status = self._timed(
        ("prefill", width, mb), prefill_step, self.params, self.cache, tokens, seq_ids,
        num_new, temp, top_k, top_p, keys, key_index, model=self.model,
        implementation=self.implementation, max_blocks=mb)
    raise_for_status(status, seq_ids, op="Engine prefill")  # host accounting guarantees room
    nxt = np.asarray(nxt)
    self.metrics.prefill_calls += 1
    finished = []
    now = time.perf_counter()
    for i, (r, n) in enumerate(rows):
      r.prefilled += n
      self.ledger.grow(r.slot, n)
      self.metrics.prompt_tokens += n
      if not r.prefilling:
        if r.out.first_token_time is None:
          r.out.first_token_time = now
        if self._emit(r, [int(nxt[i])]):
          finished.append(self._finish(r))
    return finished

  def _emit(self, r: Request, toks: Iterable[int]) -> bool:
    """Appends generated tokens; True if the request is now finished."""
    s = r.sampling
    for t in toks:
      r.out.tokens.append(t)
      self.metrics.generated_tokens += 1
      if t in s.stop_tokens:
        r.out.finish_reason = "stop"
        return True
      if len(r.out.tokens) >= s.max_new_tokens:
        r.out.finish_reason = "length"
        return True
    return False

  def _finish(self, r: Request) -> RequestOutput:
    self.cache, _ = free_sequences(self.cache, np.int32(r.slot))
    self.scheduler.release(r)
    r.out.finish_time = time.perf_counter()
    self._finished[r.out.request_id] = r.out
    return r.out

  def _preempt(self) -> None:
    victim = self.scheduler.victim()
    self.cache, _ = free_sequences(self.cache, np.int32(victim.slot))
    self.scheduler.release(victim)
    self.scheduler.requeue(victim)
    self.metrics.preemptions += 1

  def _decode(self) -> list[RequestOutput]:
    while True:
      reqs = [r for r in self.scheduler.running if not r.prefilling]
      if not reqs:
        return []
      steps = self.scheduler.decode_budget(reqs, self.decode_steps)
      if steps > 0:
        break
      self._preempt()
    width = self.batcher.width(len(reqs), decode=True)
    state = self.batcher.decode_state(reqs, width)
    max_len = max(int(self.ledger.lens[r.slot]) for r in reqs) + steps
    mb = self.batcher.max_blocks(max_len)
    key = ("decode", width, mb, state.stop_tokens.shape[1])
    self.cache, state, out, n_steps, status = self._timed(
        key, decode_loop, self.params, self.cache, state, jnp.int32(steps),
        model=self.model, max_steps=self.decode_steps,
        implementation=self.implementation, max_blocks=mb)
    out, n_steps = np.asarray(out), int(n_steps)
    raise_for_status(status, state.seq_ids, op="Engine decode")  # accounting guarantees room
    self.metrics.decode_calls += 1
    self.metrics.decode_steps += n_steps
    finished = []
    for i, r in enumerate(reqs):
      toks = [int(t) for t in out[i, :n_steps] if t >= 0]
      self.ledger.grow(r.slot, len(toks))  # each step wrote the previous token
      if self._emit(r, toks):
        finished.append(self._finish(r))
    return finished


def generate(params: Params, model: Model, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
             cache_config: CacheConfig | None = None, block_size: int = 16,
             progress: bool = False, **engine_kwargs) -> list[list[int]]:
  """Generates a continuation of every prompt with continuous batching.

  Args:
    params: model parameters.
    model: the model (:class:`~jax_paged_kv.models.base.Model`).
    prompts: token-id lists.
    sampling: one :class:`~jax_paged_kv.serving.decoding.SamplingParams` for all prompts, or
      one each (default: greedy, 16 new tokens).
    cache_config: the cache (default: a paged cache with room for every request at once).
    block_size: block size of the default cache.
    progress: show a tqdm progress bar.
    **engine_kwargs: passed to :class:`Engine`.

  Returns:
    The generated tokens of each prompt, in order.
  """
  prompts = [list(p) for p in prompts]
  if isinstance(sampling, SamplingParams) or sampling is None:
    sampling = [sampling or SamplingParams()] * len(prompts)
  if len(sampling) != len(prompts):
    raise ValueError(f"{len(sampling)} sampling params for {len(prompts)} prompts")
  if not prompts:
    return []
  if cache_config is None:
    totals = [len(p) + s.max_new_tokens for p, s in zip(prompts, sampling, strict=True)]
    max_len = block_size * math.ceil(max(totals) / block_size)
    blocks = sum(math.ceil(t / block_size) for t in totals)
    cache_config = cache_config_for(
        check_model(model), num_blocks=1 + blocks, max_seqs=min(len(prompts), 256),
        max_seq_len=max_len, block_size=block_size)
  engine = Engine(params, model, cache_config, **engine_kwargs)
  ids = [engine.add_request(p, s) for p, s in zip(prompts, sampling, strict=True)]
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(prompts), desc="generate", unit="req")
  outs = {o.request_id: o for o in engine.run(bar.update if bar else None)}
  if bar:
    bar.close()
  return [outs[i].tokens for i in ids]
