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
   admitted request is *preempted* and goes back to the front of the queue. With
   ``preemption="recompute"`` (the default, vLLM's) its blocks are freed and it is recomputed
   later (prompt plus the tokens it already produced); with ``preemption="swap"`` its blocks are
   copied to host memory (:func:`~jax_paged_kv.cache.swap.swap_out`) and copied back, bitwise,
   when it is admitted again. The newest request is the victim because it has done the least
   work (least to recompute, or to copy) and the oldest requests then finish first, freeing the
   most blocks soonest. Nothing fails;
4. frees every finished request's slot at once.

With ``enable_prefix_caching=True`` (``PAGED`` only) a request whose prompt starts with full
blocks already in the cache (same tokens, same ``cache_salt``) shares them by reference count and
prefills only the rest; a finished request's full blocks stay cached until the pool or the
sequence slots are needed (least recently used first). See
:mod:`~jax_paged_kv.serving.engine.prefix`.

Batch shapes come from a small set fixed when the engine is built (:meth:`Engine.shapes`): one
prefill shape (``prefill_rows`` rows of ``prefill_chunk`` tokens) and decode batch widths and
block-table columns read in powers of two from a floor (8 rows, 256 tokens), whatever the
workload; so a handful of compilations serve every run of an engine, and every engine with the
same cache and knobs (compiled programs are shared by the whole process). Host-side slot ids
are the cache's sequence ids; padding rows use ``-1``.

The host never waits on the device for its bookkeeping: block counts, the peak and the
utilisation statistics come from the host mirror of every sequence's length
(:class:`~jax_paged_kv.serving.engine.blocks.BlockLedger`), slots are allocated and freed in one
fixed-width call per step, and the only reads are the tokens each call generated. (Once blocks
may be shared, with prefix caching or from the first request with parallel samples, the free
count is read back after each cache update.)

:func:`generate` is the one-call convenience for a list of prompts.

Both serve any model that implements the model protocol (:mod:`jax_paged_kv.models.base`); the
engine never looks inside the model: it checks the cache against the model's geometry and the
prompts against its ``vocab_size``, and calls the jitted steps with it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_paged_kv.cache.config import NULL_BLOCK, CacheConfig, CacheStrategy
from jax_paged_kv.cache.errors import (
  PoolExhaustedError,
  SequenceTooLongError,
  Status,
  raise_for_status,
)
from jax_paged_kv.cache.ops import (
  allocate_sequences,
  fork_sequence,
  free_outside_window,
  free_sequences,
  truncate_sequences,
)
from jax_paged_kv.cache.state import PagedKVCache, init_cache
from jax_paged_kv.cache.stats import cache_stats
from jax_paged_kv.cache.swap import swap_in, swap_out
from jax_paged_kv.models.base import (
  Model,
  attention_knobs,
  cache_config_for,
  check_cache_fits,
  check_model,
  layer_windows,
)
from jax_paged_kv.models.layers import check_rope_context
from jax_paged_kv.serving.decoding import (
  MAX_TOP_LOGPROBS,
  Params,
  Penalties,
  SamplingParams,
  backend_jit,
  decode_loop,
  int_in_range,
  pow2_ceil,
  prefill_step,
  token_scores,
)
from jax_paged_kv.serving.engine.batching import Batcher
from jax_paged_kv.serving.engine.blocks import BlockLedger
from jax_paged_kv.serving.engine.metrics import (
  EngineMetrics,
  RequestOutput,
  StreamDelta,
  compile_timer,
)
from jax_paged_kv.serving.engine.prefix import PrefixIndex
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
    prefill_rows: rows of every prefill call (its one batch width; default
      ``prefill_token_budget // prefill_chunk``).
    decode_steps: decode steps per :func:`~jax_paged_kv.serving.decoding.decode_loop` call.
    implementation: paged attention implementation (None: the backend's best).
    bucket_blocks: with XLA attention, read only a bucket of block-table columns (at least
      ``block_bucket_min``, growing by ``bucket_factor``) instead of all ``max_blocks``.
    batch_bucket_min: smallest decode batch width (capped at ``max_batch``); widths grow by
      ``bucket_factor`` up to ``max_batch`` (``batch_bucket_min=max_batch`` and
      ``bucket_blocks=False`` give one compiled shape per step kind). On a CPU a step of 8 rows
      costs about one of 1 row (the weights' reads dominate), hence the default 8.
    block_bucket_min: smallest bucket of block-table columns a decode step reads (default: 256
      tokens' worth); prefill reads every column of tables up to 2048 tokens.
    bucket_factor: growth of the buckets; coarser buckets mean fewer compilations.
    decode_width_step: if set, decode batch widths are multiples of it instead of geometric
      buckets (less padding: padding rows cost as much as live ones; more compilations).
    watermark: fraction of the pool kept free at admission (PAGED).
    reserve_ratio: at admission (PAGED), every running request is expected to still need
      ``reserve_ratio`` times its remaining ``max_new_tokens`` (SGLang's "new token ratio"),
      and a request is admitted only if its prompt plus that share of its own budget fits
      beside them. ``1.0`` never preempts requests that run to their limit; ``0.0`` admits
      whenever the prompt fits (vLLM's policy) and relies on preemption.
    track_stats: record the KV utilisation every step (from the host mirror of the lengths;
      once blocks may be shared, prefix caching or parallel samples,
      :func:`~jax_paged_kv.cache_stats` is read every ``STATS_EVERY`` steps).
    trace_steps: keep only about the last ``trace_steps`` steps (between ``trace_steps`` and
      twice that) of the per-step traces ``EngineMetrics.running_trace`` / ``util_trace`` /
      ``time_trace``, so a long-running server's memory stays bounded (None: every step). The
      counters (``util_tokens``, ``peak_running``, ...) always cover the whole run.
    enable_prefix_caching: share full prompt blocks already in the cache between requests and
      keep finished requests' blocks cached (``PAGED`` only; vLLM's option name).
    preemption: ``"recompute"`` (free the victim's blocks, recompute them later) or ``"swap"``
      (copy them to host memory and back; ``PAGED`` only).
    window_eviction: free each sequence's blocks outside the attention window after every
      prefill and decode step (:func:`~jax_paged_kv.free_outside_window`), so a long
      generation holds ``O(window)`` blocks. ``"auto"`` (default): on when every layer of the
      model attends within a sliding window (exact: nothing a query can see is freed) and the
      cache is ``PAGED``; else off. It works with prefix caching (a sequence keeps only the
      blocks before its first freed block registered, so with ``sink_tokens`` its sink blocks
      stay shareable) and swap preemption (only the blocks still held are swapped).
      ``(window, sink_tokens)``: StreamingLLM's token eviction for any model (keeps the first
      ``sink_tokens`` tokens' blocks; an approximation for layers that attend further, see
      ``benchmarks/streaming.py``). None: off.
  """

  def __init__(self, params: Params, model: Model, cache_config: CacheConfig, *,
               max_batch: int | None = None, prefill_chunk: int = 64,
               prefill_token_budget: int | None = None, prefill_rows: int | None = None,
               decode_steps: int = 8, implementation: str | None = None,
               bucket_blocks: bool = True, batch_bucket_min: int = 8,
               block_bucket_min: int | None = None, bucket_factor: int = 2,
               decode_width_step: int | None = None,
               watermark: float = 0.01, reserve_ratio: float = 0.5,
               track_stats: bool = True, trace_steps: int | None = None,
               enable_prefix_caching: bool = False,
               preemption: str = "recompute",
               window_eviction: str | tuple[int, int] | None = "auto"):
    cc = cache_config
    check_cache_fits(check_model(model), cc)
    if prefill_chunk < 1 or decode_steps < 1:
      raise ValueError(f"{prefill_chunk=} and {decode_steps=} must be >= 1")
    if bucket_factor < 2:
      raise ValueError(f"{bucket_factor=} must be >= 2")
    if not 0 <= reserve_ratio <= 1:
      raise ValueError(f"{reserve_ratio=} must be in [0, 1]")
    if preemption not in ("recompute", "swap"):
      raise ValueError(f"{preemption=} must be 'recompute' or 'swap'")
    if preemption == "swap" and cc.strategy is not CacheStrategy.PAGED:
      raise ValueError("preemption='swap' needs a PAGED cache")
    self.preemption = preemption
    self._params = params
    self.model = model
    self.cache_config = cc
    if max_batch is not None:  # 0 or -1 would admit nothing, and run() would wait forever
      max_batch = int_in_range(max_batch, "max_batch", 1)
    self.max_batch = min(max_batch or cc.max_seqs, cc.max_seqs)
    self.prefill_chunk = int(prefill_chunk)
    self.prefill_token_budget = int(prefill_token_budget or 4 * prefill_chunk)
    if self.prefill_token_budget < self.prefill_chunk:
      raise ValueError(f"prefill_token_budget={self.prefill_token_budget} < "
                       f"prefill_chunk={self.prefill_chunk}")
    self.decode_steps = int(decode_steps)
    self.implementation = implementation
    self.track_stats = track_stats
    self.trace_steps = None if trace_steps is None else int_in_range(trace_steps,
                                                                     "trace_steps", 1)
    self.evict = _window_eviction(window_eviction, model, cc)
    self.ledger = BlockLedger(cc, self.evict)
    # (window, sink_tokens) given explicitly is token eviction, an approximation whose result
    # depends on chunk boundaries; "auto" evicts only what no query can see (exact).
    self._token_eviction = self.evict is not None and not isinstance(window_eviction, str)
    self.scheduler = Scheduler(self.ledger, max_batch=self.max_batch,
                               watermark_blocks=int(watermark * cc.usable_blocks),
                               reserve_ratio=float(reserve_ratio),
                               fixed_chunks=self._token_eviction)
    self.batcher = Batcher(
        max_batch=self.max_batch, table_width=cc.max_blocks_per_seq, block_size=cc.block_size,
        bucket_blocks=bucket_blocks and bool(attention_knobs(implementation, 1, cc)),
        batch_bucket_min=int(batch_bucket_min),
        block_bucket_min=None if block_bucket_min is None else int(block_bucket_min),
        bucket_factor=int(bucket_factor), decode_width_step=decode_width_step,
        prefill_rows=int(prefill_rows or self.prefill_token_budget // self.prefill_chunk))
    self.cache: PagedKVCache = init_cache(cc)
    self.metrics = EngineMetrics()
    self._next_id = 0
    self._finished: dict[int, RequestOutput] = {}
    # (kind, width, reads, penalties, all_greedy, logprobs) run so far; logprobs: False,
    # True, or the width of the top alternatives returned.
    self._compiled: set[tuple] = set()
    self._to_free: list[int] = []  # slots finished this step, freed in one call
    self._to_trim: list[tuple[int, int]] = []  # (slot, tokens) parked slots trim in one call
    # Whether any request added so far samples (temperature > 0). Until one does, the steps run
    # programs without the sampling branch (about a quarter of each program's compile time);
    # from then on the full ones, for good, so at most two sets of programs ever compile.
    self._any_sampled = False
    # Likewise for logprobs: from the first request that asks, the decode programs also return
    # each token's log-probability (a second set of decode programs, compiled at first use).
    self._any_logprobs = False
    # And from the first request that asks for top alternatives, their fixed width
    # (MAX_TOP_LOGPROBS, or the vocabulary if smaller): one more set, whatever each one asks.
    self._top_width = 0
    # Steps whose rows include one with a repetition, presence or frequency penalty take the
    # rows' token counts (Penalties; built per step, so a step without one pays nothing): one
    # more set of programs.
    # Likewise a prefill step with prompt positions to score computes every position's logits
    # (the model's all_logits) and returns the prompt tokens' log-probabilities.
    self.prefix: PrefixIndex | None = None
    if enable_prefix_caching:
      if cc.strategy is not CacheStrategy.PAGED:
        raise ValueError("enable_prefix_caching needs a PAGED cache")
      self.prefix = PrefixIndex(cc.block_size, f"{model!r}|{cc!r}".encode())
      self.ledger.device_free = cc.usable_blocks  # blocks are shared from the start
      self.scheduler.reclaim = self._reclaim
    self.scheduler.hit_blocks = self._hit_blocks
    self.scheduler.defer = self._defer

  def shapes(self) -> list[tuple[str, int, int | None]]:
    """Every ``(kind, batch width, block-table columns read or None)`` the engine can compile
    (each at its first use): a fixed set, whatever the workload. A shape has one program per
    combination of a few switches: without the sampling branch while no request added so far
    samples (temperature > 0), with it from the first one that does; with or without
    penalties (a step with a penalised row takes the token counts); a prefill shape with or
    without prompt scoring (a step scoring prompt positions computes every position's
    logits); a decode shape without logprobs, with them from the first request asking, with
    the top alternatives too from the first asking ``top_logprobs``. So at most 8 programs per
    prefill shape and 12 per decode shape, and a workload using none of these features
    compiles one per shape (two if it samples)."""
    return self.batcher.shapes()

  @property
  def compiled_shapes(self) -> set[tuple[str, int, int | None]]:
    """The shapes this engine has run so far (a subset of :meth:`shapes`)."""
    return {program[:3] for program in self._compiled}

  @property
  def _shared(self) -> bool:
    """Whether sequences may share blocks (prefix caching, or parallel samples sharing their
    prompt's blocks, from the first request with n > 1): lengths then no longer give the free
    count, which the ledger takes from the device after each cache update instead."""
    return self.ledger.device_free is not None

  @property
  def model_config(self) -> Model:
    """The model (its earlier name)."""
    return self.model

  # ---- requests ------------------------------------------------------------------------------

  def add_request(self, prompt: Sequence[int], sampling: SamplingParams | None = None, *,
                  cache_salt: str | None = None) -> int:
    """Queues a request; returns its id.

    With ``SamplingParams(n=k)`` it queues ``k`` samples of the prompt, with ids ``id`` to
    ``id + k - 1`` (:attr:`RequestOutput.index` ``0`` to ``k - 1``): each one finishes,
    streams and can be aborted on its own, and sample ``i`` gives the tokens of a request of
    its own with seed ``seed + i`` (with an int8 / int4 cache, to quantisation error: see
    the README's prefix caching). The prompt is prefilled once: a sample admitted while
    another one holds the prompt forks that one's full prompt blocks (``PAGED``: shared by
    reference count, never copied; ``CONTIGUOUS``: copied into its slab) and prefills only
    the rest (less than a block; under token eviction, from a prefill-chunk boundary; under
    the window eviction, all of it once the holder has freed blocks its queries see);
    samples queued behind one still prefilling the prompt wait for it (letting the requests
    behind them in, ahead of which they stay). With ``prompt_logprobs`` sample 0 reports
    them.

    Args:
      prompt: token ids.
      sampling: sampling parameters (default: greedy, 16 new tokens).
      cache_salt: with prefix caching, requests share cached blocks only if their salts are
        equal (e.g. one salt per tenant, so no tenant can probe another's prompts by timing).

    Raises:
      ValueError: an empty prompt or a token outside ``[0, vocab_size)``.
      SequenceTooLongError: ``len(prompt) + max_new_tokens > max_seq_len``.
      PoolExhaustedError: the sequence could never fit in the pool, even alone (with the
        window eviction: the blocks it holds at once, see ``BlockLedger.peak_need``).
    """
    sampling = sampling or SamplingParams()
    if not isinstance(sampling, SamplingParams):
      raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
    vocab = self.model.vocab_size
    # A float or bool token is refused, never truncated (1.7 is not token 1).
    prompt = [int_in_range(t, "prompt token") for t in prompt]
    cc = self.cache_config
    if not prompt:
      raise ValueError("empty prompt: a request needs at least one token")
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"prompt token {bad[0]} is outside [0, {vocab})")
    bad = [t for t in sampling.stop_tokens if t >= vocab]
    if bad:
      raise ValueError(f"stop token {bad[0]} is outside [0, {vocab}): it could never stop "
                       "the request")
    if sampling.prompt_logprobs and not _takes_all_logits(self.model):
      raise ValueError(f"prompt_logprobs: {type(self.model).__name__}.forward has no "
                       "all_logits option (every position's logits), so the prompt's "
                       "log-probabilities cannot be computed")
    if sampling.top_logprobs > vocab:
      raise ValueError(f"top_logprobs={sampling.top_logprobs} exceeds the vocabulary ({vocab})")
    total = len(prompt) + sampling.max_new_tokens
    if total > cc.max_seq_len:
      raise SequenceTooLongError(
          f"add_request: {len(prompt)} prompt tokens + max_new_tokens="
          f"{sampling.max_new_tokens} > max_seq_len={cc.max_seq_len}",
          status=Status.SEQUENCE_TOO_LONG)
    need = self.ledger.peak_need(total, self.prefill_chunk)
    if cc.strategy is CacheStrategy.PAGED and need > cc.usable_blocks:
      raise PoolExhaustedError(
          f"add_request: {total} tokens need {need} blocks at once, the pool has "
          f"{cc.usable_blocks}", status=Status.POOL_EXHAUSTED)
    self._any_sampled |= sampling.temperature > 0
    self._any_logprobs |= sampling.logprobs
    if sampling.top_logprobs:
      self._top_width = min(MAX_TOP_LOGPROBS, vocab)
    n = sampling.n
    group: list[Request] | None = None
    if n > 1:
      group = []
      if cc.strategy is CacheStrategy.PAGED and not self._shared:
        # From now on blocks may be shared: the free count is read from the device.
        self.ledger.device_free = int(self.cache.allocator.num_free)
    first, now = self._next_id, time.perf_counter()
    for i in range(n):
      s = sampling if n == 1 else dataclasses.replace(
          sampling, n=1, seed=sampling.seed + i,
          prompt_logprobs=sampling.prompt_logprobs and i == 0)
      req = Request(out=RequestOutput(first + i, list(prompt), arrival_time=now,
                                      logprobs=[] if s.logprobs else None,
                                      top_logprobs=[] if s.top_logprobs else None,
                                      prompt_logprobs=[None] if s.prompt_logprobs else None,
                                      index=i),
                    sampling=s, context=list(prompt), cache_salt=cache_salt, group=group)
      if group is not None:
        group.append(req)
      self.scheduler.waiting.append(req)
    self._next_id += n
    return first

  @property
  def has_work(self) -> bool:
    return bool(self.scheduler.waiting or self.scheduler.running)

  @property
  def params(self) -> Params:
    """The model parameters every step runs with."""
    return self._params

  @params.setter
  def params(self, params: Params) -> None:
    """Replaces the parameters (new weights, or the same ones placed on other devices).

    Only between runs: requests in flight hold K/V the old weights computed, so assigning while
    any request is waiting or running raises ``ValueError``. Cached prefix blocks were computed
    with the old weights too: they are dropped (``reset_prefix_cache``), so no later request
    reuses them.
    """
    if self.has_work:
      raise ValueError(
          f"Engine.params can change only when no request is in flight ({self.num_running} "
          f"running, {self.num_waiting} waiting): their K/V were computed with the old weights")
    self.reset_prefix_cache()
    self._params = params

  @property
  def finished(self) -> dict[int, RequestOutput]:
    """Every request finished (or aborted) so far and not yet taken by :meth:`pop_finished`,
    by request id."""
    return dict(self._finished)

  def pop_finished(self) -> dict[int, RequestOutput]:
    """Returns :attr:`finished` and forgets it, so a long-running server holds only the
    outputs it has not handed out yet (``finished`` keeps every output until then; the
    per-step traces of :attr:`metrics` are bounded by ``trace_steps``)."""
    done, self._finished = self._finished, {}
    return done

  def abort_request(self, request_id: int) -> RequestOutput | None:
    """Stops a request that has not finished (its client went away), between steps.

    A waiting request leaves the queue (a swapped-out one drops its host copy); a running one
    gives its blocks back at once, exactly as a finished one does (with prefix caching its full
    written blocks stay cached for later requests: their K/V are complete). Nothing else
    changes: the other requests' outputs are those of a run without it.

    Args:
      request_id: an id :meth:`add_request` returned.

    Returns:
      Its output so far, with ``finish_reason="abort"`` (also in :attr:`finished`), or None if
      it had already finished or been aborted.

    Raises:
      KeyError: ``request_id`` was never returned by :meth:`add_request`.
    """
    rid = int_in_range(request_id, "request_id")
    if not 0 <= rid < self._next_id:
      raise KeyError(f"abort_request: no request {rid} (ids so far: 0..{self._next_id - 1})")
    sched = self.scheduler
    r = next((q for q in sched.running if q.out.request_id == rid), None)
    if r is not None:
      self._finish(r)  # frees or parks its slot like a finish, at the flush below
      self._flush_free()
    else:
      r = next((q for q in sched.waiting if q.out.request_id == rid), None)
      if r is None:
        return None
      sched.waiting.remove(r)
      r.swapped = None  # its host copy of the blocks, if it was swapped out
      r.out.finish_time = time.perf_counter()
      self._finished[rid] = r.out
    r.out.finish_reason = "abort"
    self.metrics.aborted_requests += 1
    return r.out

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
    with compile_timer() as compiling:
      self.scheduler.admit(install=self._install)
      running = self.scheduler.running
      if any(r.prefilling for r in running):
        finished += self._prefill()
        if self.scheduler.waiting and self.scheduler.waiting[0].group is not None:
          # Samples waiting on a sibling's prompt join as soon as it is written, before the
          # sibling decodes on: it may finish in this step's decode (a short request frees its
          # blocks at once) or, under the window eviction, free blocks they would see. (They
          # take room this step's decode might have used: under memory pressure, a few more
          # preemptions; sharing the prompt saves more.)
          self.scheduler.admit(install=self._install)
      if any(not r.prefilling for r in running):
        finished += self._decode()
    m = self.metrics
    m.compile_seconds += compiling[0]
    m.steps += 1
    m.peak_running = max(m.peak_running, len(running))
    m.running_trace.append(len(running))
    if self.track_stats:
      tokens, slots = self._usage()
      m.util_tokens += tokens
      m.util_slots += slots
      m.util_trace.append(tokens / slots if slots else float("nan"))
    m.wall_seconds += time.perf_counter() - t0
    m.time_trace.append(m.wall_seconds)
    keep = self.trace_steps
    if keep is not None and len(m.running_trace) >= 2 * keep:  # amortised O(1) per step
      for trace in (m.running_trace, m.util_trace, m.time_trace):
        del trace[:-keep]
    return finished

  STATS_EVERY = 16  # steps between reads of the device's statistics (blocks shared)

  def _usage(self) -> tuple[int, int]:
    """``(tokens stored, token slots allocated)`` in the cache now.

    From the host mirror of the lengths; once blocks may be shared (prefix caching, parallel
    samples: lengths do not give the blocks held) from :func:`~jax_paged_kv.cache_stats`, read
    every ``STATS_EVERY`` steps (the last reading repeats in between).
    """
    cc = self.cache_config
    if not self._shared:
      lens = self.ledger.lens
      if cc.strategy is CacheStrategy.PAGED:  # evicted blocks hold no tokens
        gone = self.ledger.freed(lens) * cc.block_size
        return int((lens - gone).sum()), int(self.ledger.held_at(lens).sum()) * cc.block_size
      tokens = int(lens.sum())
      held = len(self.scheduler.running)  # a contiguous slot owns its slab until freed
      return tokens, held * cc.max_blocks_per_seq * cc.block_size
    if self.metrics.steps % self.STATS_EVERY == 1 or not hasattr(self, "_last_usage"):
      s = cache_stats(self.cache)
      self._last_usage = int(s.tokens_stored), int(s.allocated_slots)
    return self._last_usage

  def _slots(self, slots: Sequence[int]) -> np.ndarray:
    """``int32[max_batch]`` slot ids padded with ``-1``: one compiled allocate / free."""
    ids = np.full(max(self.max_batch, len(slots)), -1, np.int32)
    ids[:len(slots)] = slots
    return ids

  def _flush_free(self) -> None:
    """Frees the slots of the requests finished since the last call, and trims the ones parked
    for prefix caching to their registered blocks: one call each, not one per request."""
    changed = bool(self._to_free or self._to_trim)
    if self._to_free:
      self.cache, _ = free_sequences(self.cache, self._slots(self._to_free))
      self._to_free = []
    if self._to_trim:
      slots, counts = zip(*self._to_trim, strict=True)
      n = np.zeros(max(self.max_batch, len(slots)), np.int32)
      n[:len(counts)] = counts
      self.cache, _ = truncate_sequences(self.cache, self._slots(list(slots)), n)
      self._to_trim = []
    if changed:
      self._sync_free()

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

  def stream(self) -> Iterator[list[StreamDelta]]:
    """Steps until every queued request finished, yielding after each step what each request
    produced in it: token streaming for a server.

    Between two ``next()`` calls the caller may :meth:`add_request` (the new request streams
    from the next step on) or :meth:`abort_request` (its last delta, ``finish_reason="abort"``,
    comes with the next step's; one added and aborted between the same two calls yields
    nothing, :meth:`abort_request` returned its output). A request's deltas concatenate to its
    final tokens: tokens are yielded once, preemption (recompute or swap) never takes one back.

    Yields:
      A list of :class:`StreamDelta` per step, in request-id order: one for every request
      that generated tokens or finished in that step (empty when no request did, e.g. a step
      that only prefilled part of a prompt).
    """
    sent: dict[int, int] = {}  # request id -> tokens handed out so far, while it is in flight
    while self.has_work or sent:
      done = {o.request_id: o for o in self.step()} if self.has_work else {}
      now = self.in_flight()
      yield stream_deltas(sent, {rid: now.get(rid) or done.get(rid) or self._finished.get(rid)
                                 for rid in set(sent) | set(now) | set(done)})

  def in_flight(self) -> dict[int, RequestOutput]:
    """The outputs so far of the requests waiting or running, by request id."""
    sched = self.scheduler
    return {r.out.request_id: r.out for r in (*sched.running, *sched.waiting)}

  # ---- pieces --------------------------------------------------------------------------------

  def _run_program(self, key: tuple, fn, *args, **kwargs):
    """Calls ``fn``, recording ``key`` (its static shape and whether it takes penalties), its
    sampling mode and whether it returns logprobs (:attr:`compiled_shapes` keeps the
    shapes)."""
    self._compiled.add((*key, kwargs.get("all_greedy", False),
                        kwargs.get("top_logprobs") or kwargs.get("return_logprobs", False)
                        or kwargs.get("targets") is not None))
    return fn(*args, **kwargs)

  def _prefill(self) -> list[RequestOutput]:
    chunk = self.prefill_chunk
    rows = self.scheduler.prefill_rows(chunk, self.prefill_token_budget,
                                       self.batcher.prefill_rows)
    if not rows:
      # Nothing fits: make room by preempting the newest request, then retry next step.
      self._preempt()
      return []
    width = self.batcher.width(len(rows))
    tokens, seq_ids, num_new, key_index = self.batcher.prefill_arrays(rows, width, chunk)
    samp, temp, top_k, top_p, keys, min_p = self.batcher.sampling_rows([r for r, _ in rows],
                                                                       width)
    mb = self.batcher.max_blocks(max(r.prefilled + n for r, n in rows), decode=False)
    targets = self._prompt_targets(rows, width, chunk)
    penalties = self._penalties([r for r, _ in rows], samp)
    self.cache, nxt, logits, status, *prompt_lps = self._run_program(
        ("prefill", width, mb, penalties is not None), prefill_step, self.params, self.cache,
        tokens, seq_ids, num_new, temp, top_k, top_p, keys, key_index, model=self.model,
        implementation=self.implementation, max_blocks=mb, all_greedy=not self._any_sampled,
        min_p=min_p, penalties=penalties, targets=targets)
    raise_for_status(status, seq_ids, op="Engine prefill")  # host accounting guarantees room
    if self.evict is not None:  # the chunk's attention is done: drop what no later query sees
      self.cache = _evict_jit(self.cache, seq_ids, window=self.evict[0],
                              sink_tokens=self.evict[1])
    # Rows that asked for logprobs and complete their prompt here: their first token's.
    done = [r for r, n in rows if r.prefilled + n == len(r.context)]
    lps = tops = None
    if any(r.sampling.logprobs for r in done):  # and their top alternatives, if one asks
      k = self._top_width if any(r.sampling.top_logprobs for r in done) else 0
      lps, *tops = jax.device_get(_token_scores_jit(logits, nxt, k))
      tops = tops or None
    nxt = np.asarray(nxt)
    self.metrics.prefill_calls += 1
    self._sync_free()
    finished = []
    now = time.perf_counter()
    for r, n in rows:
      r.prefilled += n
      self.ledger.grow(r.slot, n)
      self.metrics.prompt_tokens += n
      if self.prefix is not None:
        self._register(r, r.context, r.prefilled)
    if prompt_lps:
      self._record_prompt_logprobs(rows, targets, np.asarray(prompt_lps[0]))
    self._note_peak()
    for i, (r, _) in enumerate(rows):
      if not r.prefilling:
        if r.out.first_token_time is None:
          r.out.first_token_time = now
        if self._emit(r, [int(nxt[i])], None if lps is None else [float(lps[i])],
                      None if tops is None else [_alternatives(tops[0][i], tops[1][i], r)]):
          finished.append(self._finish(r))
    self._flush_free()
    return finished

  def _prompt_targets(self, rows, width: int, chunk: int) -> np.ndarray | None:
    """``int32[width, chunk]``: for the rows asking for prompt logprobs, the prompt token
    after each chunk position not yet scored (else ``-1``); None if there is none (the step
    then runs the program that computes only the last logits)."""
    if not any(r.sampling.prompt_logprobs for r, _ in rows):
      return None
    targets = np.full((width, chunk), -1, np.int32)
    for i, (r, n) in enumerate(rows):
      if r.sampling.prompt_logprobs:
        prompt, done = r.out.prompt, len(r.out.prompt_logprobs)
        for j in range(n):
          pos = r.prefilled + j + 1  # the prompt position that position r.prefilled + j predicts
          if done <= pos < len(prompt):
            targets[i, j] = prompt[pos]
    return targets if np.any(targets >= 0) else None

  def _record_prompt_logprobs(self, rows, targets: np.ndarray, lps: np.ndarray) -> None:
    """Appends the scored prompt positions (in order: chunks come in order, and a
    re-prefill after preemption scores nothing twice)."""
    for i, (r, n) in enumerate(rows):
      if r.sampling.prompt_logprobs:
        for j in range(n):
          if targets[i, j] >= 0:
            assert r.prefilled - n + j + 1 == len(r.out.prompt_logprobs)
            r.out.prompt_logprobs.append(float(lps[i, j]))

  def _penalties(self, reqs: Sequence[Request], samp: Sequence[SamplingParams]):
    """The :class:`Penalties` of a step's rows (None unless one of them has a penalty): each
    row's prompt and output so far, padded to ``max_seq_len`` (one shape per batch width)."""
    if not any(s.has_penalties for s in samp):
      return None
    pad = len(samp) - len(reqs)
    return Penalties.create([r.out.prompt for r in reqs] + [[]] * pad,
                            [r.out.tokens for r in reqs] + [[]] * pad, samp,
                            self.model.vocab_size, length=self.cache_config.max_seq_len)

  def _note_peak(self) -> None:
    """Updates ``peak_blocks`` from the host's block accounting (no device read) and
    ``peak_running_blocks`` (prefix caching: from the running requests' block tables)."""
    cc = self.cache_config
    if cc.strategy is not CacheStrategy.PAGED:
      return
    m = self.metrics
    used = cc.usable_blocks - self.ledger.free_blocks()
    m.peak_blocks = max(m.peak_blocks, used)
    if self.prefix is None:  # every held block belongs to a running request
      m.peak_running_blocks = m.peak_blocks
      return
    # The blocks in the running requests' tables. Their sum over the requests bounds the
    # distinct count: when it cannot beat the peak, skip the device read.
    slots = [r.slot for r in self.scheduler.running]
    if int(self.ledger.held_at(self.ledger.lens[slots]).sum()) <= m.peak_running_blocks:
      return
    tables, lens = jax.device_get((self.cache.block_tables, self.cache.seq_lens))  # one copy
    tables = tables[slots]  # [running, table_width]
    nb = self.ledger.blocks(lens[slots])  # [running]
    held = (np.arange(tables.shape[1])[None, :] < nb[:, None]) & (tables != NULL_BLOCK)
    m.peak_running_blocks = max(m.peak_running_blocks, len(np.unique(tables[held])))

  def _emit(self, r: Request, toks: Iterable[int], lps: Sequence[float] | None = None,
            tops: Sequence[tuple] | None = None) -> bool:
    """Appends generated tokens (and, if the request asked, their logprobs ``lps`` and top
    alternatives ``tops``); True if the request is now finished."""
    s = r.sampling
    for i, t in enumerate(toks):
      r.out.tokens.append(t)
      if s.logprobs:
        r.out.logprobs.append(lps[i])
      if s.top_logprobs:
        r.out.top_logprobs.append(tops[i])
      self.metrics.generated_tokens += 1
      if t in s.stop_tokens:
        r.out.finish_reason = "stop"
        return True
      if len(r.out.tokens) >= s.max_new_tokens:
        r.out.finish_reason = "length"
        return True
    return False

  def _finish(self, r: Request) -> RequestOutput:
    if self.prefix is not None:
      self._park(r)
    else:
      self._to_free.append(r.slot)  # freed with the others at the end of the call
      self.scheduler.release(r)
    r.out.finish_time = time.perf_counter()
    self._finished[r.out.request_id] = r.out
    return r.out

  def _preempt(self) -> None:
    if self.prefix is not None:
      if self._evict_one():  # cached blocks go before running requests
        return
      self.prefix.unregister(self.scheduler.victim().slot)
    victim = self.scheduler.victim()
    if self.preemption == "swap":
      t0 = time.perf_counter()
      self.cache, swapped = swap_out(self.cache, np.int32(victim.slot))
      jax.block_until_ready(swapped.blocks)
      m = self.metrics
      m.swap_out_seconds += time.perf_counter() - t0
      m.swapped_out_blocks += swapped.num_blocks
      m.swapped_bytes += swapped.nbytes
    else:
      self.cache, _ = free_sequences(self.cache, np.int32(victim.slot))
      swapped = None
    self._sync_free()
    self.scheduler.release(victim)
    self.scheduler.requeue(victim, swapped)
    self.metrics.preemptions += 1

  def _decode(self) -> list[RequestOutput]:
    while True:
      reqs = [r for r in self.scheduler.running if not r.prefilling]
      if not reqs:
        return []
      steps = self.scheduler.decode_budget(reqs, self.decode_steps)
      if steps < self.decode_steps and self.prefix is not None and self.prefix.cached:
        self._evict_one()
        continue
      if steps > 0:
        break
      self._preempt()
    width = self.batcher.width(len(reqs), decode=True)
    state = self.batcher.decode_state(
        reqs, width, vocab_size=self.model.vocab_size
        if any(r.sampling.has_penalties for r in reqs) else None,
        history_length=self.cache_config.max_seq_len)
    max_len = max(int(self.ledger.lens[r.slot]) for r in reqs) + steps
    mb = self.batcher.max_blocks(max_len)
    key = ("decode", width, mb, state.penalties is not None)
    extra = {"return_logprobs": True} if self._any_logprobs else {}
    if self._top_width:
      extra["top_logprobs"] = self._top_width
    self.cache, state, out, n_steps, status, *lps = self._run_program(
        key, decode_loop, self.params, self.cache, state, jnp.int32(steps),
        model=self.model, max_steps=self.decode_steps,
        implementation=self.implementation, max_blocks=mb, evict=self.evict,
        all_greedy=not self._any_sampled, **extra)
    out, n_steps = np.asarray(out), int(n_steps)
    lps, tops = (np.asarray(lps[0]) if lps else None), jax.device_get(lps[1:]) or None
    raise_for_status(status, state.seq_ids, op="Engine decode")  # accounting guarantees room
    self.metrics.decode_calls += 1
    self._sync_free()
    self.metrics.decode_steps += n_steps
    finished = []
    r_toks, r_lps, r_tops = {}, {}, {}
    for i, r in enumerate(reqs):
      taken = [s for s in range(n_steps) if out[i, s] >= 0]
      r_toks[r.slot] = [int(out[i, s]) for s in taken]
      if lps is not None:
        r_lps[r.slot] = [float(lps[i, s]) for s in taken]
      if tops is not None and r.sampling.top_logprobs:
        r_tops[r.slot] = [_alternatives(tops[0][i, s], tops[1][i, s], r) for s in taken]
      self.ledger.grow(r.slot, len(taken))  # each step wrote the previous token
      if self.prefix is not None:
        self._register(r, r.out.prompt + r.out.tokens, int(self.ledger.lens[r.slot]))
    self._note_peak()  # the blocks the rows grew into, before the finished ones are freed
    for r in reqs:
      if self._emit(r, r_toks[r.slot], r_lps.get(r.slot), r_tops.get(r.slot)):
        finished.append(self._finish(r))
    self._flush_free()
    return finished

  # ---- prefix caching ------------------------------------------------------------------------

  def reset_prefix_cache(self) -> int:
    """Evicts every cached (finished) prefix block; returns the blocks freed."""
    before = self.metrics.evicted_blocks
    while self.prefix is not None and self._evict_one():
      pass
    return self.metrics.evicted_blocks - before

  def _sync_free(self) -> None:
    """Reads the device's free block count (when blocks may be shared)."""
    if self._shared:
      self.ledger.device_free = int(self.cache.allocator.num_free)

  def _register(self, r: Request, tokens, written: int) -> None:
    """Registers ``r``'s full written blocks in the prefix index. Once the window eviction has
    made holes in its table (from the first block past the sinks), only the blocks before the
    first hole stay registered: a prefix hit forks the holder's table, which must hold every
    block up to the hit."""
    cap = None
    if self.evict is not None and self.ledger.freed(self.ledger.lens[r.slot]) > 0:
      cap = -(-self.evict[1] // self.cache_config.block_size)  # the sink blocks
      if self.prefix.registered(r.slot) > cap:
        self.prefix.unregister(r.slot, cap)
    self.prefix.register(r.slot, tokens, r.cache_salt, written, max_blocks=cap)

  def _hashes(self, r: Request) -> list[bytes]:
    """The block hashes of ``r``'s context, computed once per context (the scheduler asks for
    a waiting request's prefix every step)."""
    cached = r.block_hashes
    if cached is None or cached[0] is not r.context or cached[1] != r.cache_salt:
      cached = r.block_hashes = (r.context, r.cache_salt,
                                 self.prefix.hashes(r.context, r.cache_salt))
    return cached[2]

  def _match(self, r: Request) -> tuple[int, int]:
    """``(blocks, holder)`` of the longest prefix of ``r``'s context already in the cache in
    full blocks: cached (prefix caching) or held by another of its samples (parallel
    sampling). Its last token is always computed (and every one, for a request scoring its
    prompt: no hit)."""
    if r.sampling.prompt_logprobs or (self.prefix is None and r.group is None):
      return 0, -1
    bs = self.cache_config.block_size
    cap = (len(r.context) - 1) // bs
    k, holder = 0, -1
    if self.prefix is not None:
      k, holder = self.prefix.match(r.context, r.cache_salt, cap, self._hashes(r))
      k -= k % self._hit_step
    for q in r.group or ():
      if q is r or q.slot < 0 or q.out.finish_reason is not None:
        continue  # not in the cache: waiting, or finished (cached ones are in the index)
      held = int(self.ledger.lens[q.slot])
      # The tokens both contexts start with: the prompt (then each its own tokens).
      j = min(cap, len(r.out.prompt) // bs, held // bs)
      j -= j % self._hit_step
      # Blocks the window eviction freed in q's table stay holes in the fork: only those that
      # no query of r from position j * block_size on can see (the rule of truncate).
      if j > k and self.ledger.freed(held) <= self.ledger.freed(j * bs):
        k, holder = j, q.slot
    return k, holder

  def _hit_blocks(self, r: Request) -> int:
    """Blocks of ``r``'s expected ones (:meth:`Scheduler.expected_blocks`, which leaves out the
    blocks the window eviction frees) that a shared prefix already holds: the hit less its
    holes (a swapped-out request gets its own blocks back, none shared)."""
    if r.swapped is not None:
      return 0
    k = self._match(r)[0]
    return k - int(self.ledger.freed(k * self.cache_config.block_size)) if k else 0

  @property
  def _hit_step(self) -> int:
    """Blocks a shared prefix is a multiple of: 1, or under token eviction as many as make a
    whole number of prefill chunks (the rest is prefilled from the hit on: it must start where
    a chunk of a run without the hit would, so that every query sees the keys it would have
    seen there)."""
    bs = self.cache_config.block_size
    return math.lcm(bs, self.prefill_chunk) // bs if self._token_eviction else 1

  def _defer(self, r: Request) -> str | None:
    """Why ``r`` should wait, or None: ``"sibling"``, another of its parallel samples is
    prefilling the prompt (the scheduler lets the requests behind it in meanwhile); ``"block"``,
    its next uncached block is being prefilled by another running request (it holds the queue,
    as first in line). A block is shared only once its K/V are written: waiting a few steps for
    it beats computing it twice (the samples of one prompt; many requests with one system
    prompt arriving together)."""
    if r.swapped is not None or r.sampling.prompt_logprobs:  # the latter takes no cached block
      return None
    if self.prefix is None and r.group is None:
      return None
    k = self._match(r)[0]
    cap = (len(r.context) - 1) // self.cache_config.block_size
    if k >= cap:
      return None
    if any(q is not r and q.slot >= 0 and q.prefilling and q.out.finish_reason is None
           for q in r.group or ()):
      return "sibling"
    if self.prefix is None:
      return None
    h = self._hashes(r)[k]
    return "block" if any(h in q.pending for q in self.scheduler.running if q.prefilling) else None

  def _install(self, r: Request) -> None:
    """Puts an admitted request in the cache: swaps it back in, or shares the full blocks of
    its prompt that are already in the cache (:meth:`_match`: cached by prefix caching, or
    held by another of its parallel samples), or allocates an empty slot."""
    slot = np.int32(r.slot)
    if r.swapped is not None:
      t0 = time.perf_counter()
      self.cache, _ = swap_in(self.cache, slot, r.swapped)
      jax.block_until_ready(self.cache.k_pool)
      self.metrics.swap_in_seconds += time.perf_counter() - t0
      self.ledger.lens[r.slot] = r.swapped.seq_len
      r.swapped = None
      if self.prefix is not None:
        r.pending = frozenset(self._hashes(r))
        self._register(r, r.out.prompt + r.out.tokens, int(self.ledger.lens[r.slot]))
      self._sync_free()  # when blocks may be shared, the free count is the device's
      return
    if self.prefix is not None:
      r.pending = frozenset(self._hashes(r))
    k, holder = self._match(r)
    if not k:
      self.cache, _ = allocate_sequences(self.cache, slot)
      return
    bs = self.cache_config.block_size
    self.cache, _ = fork_sequence(self.cache, np.int32(holder), slot)
    extra = int(self.ledger.lens[holder]) - k * bs
    if extra:  # holes the window eviction left below the hit are checked against its window
      self.cache, _ = truncate_sequences(self.cache, slot, np.int32(extra),
                                         window=None if self.evict is None else self.evict[0])
    self.ledger.lens[r.slot] = k * bs
    r.prefilled = k * bs
    if self.prefix is not None:
      self._register(r, r.context, k * bs)
      self.prefix.touch(holder)
      self.metrics.cached_prompt_tokens += k * bs
      self.metrics.prefix_hits += 1
    else:
      self.metrics.shared_prompt_tokens += k * bs
    self._sync_free()

  def _park(self, r: Request) -> None:
    """A finished request's full blocks stay cached in its slot (the rest is dropped)."""
    bs = self.cache_config.block_size
    written = int(self.ledger.lens[r.slot])
    self._register(r, r.out.prompt + r.out.tokens, written)
    keep = self.prefix.registered(r.slot)
    # The device update waits for the end of the call (_flush_free): one free and one trim for
    # all the requests finished in it.
    if not keep:
      self._to_free.append(r.slot)
      self.scheduler.release(r)
    else:
      if written > keep * bs:
        self._to_trim.append((r.slot, written - keep * bs))
      self.ledger.lens[r.slot] = keep * bs
      self.scheduler.running.remove(r)
      self.prefix.park(r.slot)

  def _evict(self, slot: int, num_blocks: int) -> None:
    """Drops the last ``num_blocks`` blocks of cached slot ``slot`` (all: frees the slot)."""
    bs = self.cache_config.block_size
    held = self.prefix.registered(slot)
    before = self.ledger.free_blocks()
    if num_blocks >= held:
      self.cache, _ = free_sequences(self.cache, np.int32(slot))
      self.prefix.unregister(slot)
      self.ledger.clear(slot)
      self.scheduler.free_slots.append(slot)
    else:
      self.cache, _ = truncate_sequences(self.cache, np.int32(slot), np.int32(num_blocks * bs))
      self.prefix.unregister(slot, held - num_blocks)
      self.ledger.lens[slot] = (held - num_blocks) * bs
    self._sync_free()
    self.metrics.evicted_blocks += self.ledger.free_blocks() - before

  def _evict_one(self) -> bool:
    """Frees the least recently used cached slot; False if there is none."""
    slot = self.prefix.lru()
    if slot < 0:
      return False
    self._evict(slot, self.prefix.registered(slot))
    return True

  def _reclaim(self, r: Request, blocks_short: int, need_slot: bool) -> None:
    """Evicts cached blocks, least recently used slot first and its tail blocks first, until
    ``blocks_short`` more blocks (and, if ``need_slot``, a sequence slot) are free. The cached
    slot holding ``r``'s own prefix goes last."""
    keep = self._match(r)[1]
    target = self.ledger.free_blocks() + blocks_short
    while True:
      if need_slot and self.scheduler.free_slots:
        need_slot = False
      short = target - self.ledger.free_blocks()
      if short <= 0 and not need_slot:
        return
      slot = self.prefix.lru(exclude=keep)
      if slot < 0:
        slot = self.prefix.lru()
        if slot < 0:
          return
        keep = -1
      held = self.prefix.registered(slot)
      self._evict(slot, held if need_slot else min(held, short))


def stream_deltas(sent: dict[int, int],
                  outputs: dict[int, RequestOutput | None]) -> list[StreamDelta]:
  """One step of :meth:`Engine.stream`: the deltas of ``outputs`` (every request in flight at
  the last yield or now, or finished in the step; None: finished and already taken by
  ``pop_finished``) past the ``sent`` token counts, which it updates (a finished request
  leaves it)."""
  deltas = []
  for rid in sorted(outputs):
    out, n = outputs[rid], sent.get(rid, 0)
    if out is not None and (len(out.tokens) > n or out.finish_reason is not None):
      deltas.append(StreamDelta(
          rid, tuple(out.tokens[n:]), out.finish_reason,
          None if out.logprobs is None else tuple(out.logprobs[n:]),
          None if out.top_logprobs is None else tuple(out.top_logprobs[n:]),
          tuple(out.prompt_logprobs) if out.prompt_logprobs is not None and n == 0
          and (out.tokens or out.finish_reason is not None) else None, out.index))
    if out is not None and out.finish_reason is None:
      sent[rid] = len(out.tokens)
    else:
      sent.pop(rid, None)
  return deltas


DEFAULT_MAX_SEQS = 256  # sequence slots of generate's default cache


def default_cache_config(model: Model, prompts: Sequence[Sequence[int]],
                         sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
                         block_size: int = 16) -> CacheConfig:
  """The cache :func:`generate` builds when given none: a ``PAGED`` cache with room for every
  request at once, in sizes from a short ladder.

  Every compiled program depends on the cache's shapes, so they are rounded up to powers of
  two: ``max_seq_len`` (at least 256 tokens) covers the longest request, the pool the blocks of
  all the requests (of the first ``DEFAULT_MAX_SEQS``, which is also the sequence slots, fixed).
  Calls whose longest request and total tokens fall in the same powers of two share one cache
  shape, so the second such call compiles nothing.

  Args:
    model: the model.
    prompts: token-id lists.
    sampling: one :class:`~jax_paged_kv.serving.decoding.SamplingParams` or one per prompt.
    block_size: tokens per block (a power of two keeps ``max_seq_len`` a power of two).

  Returns:
    The :class:`~jax_paged_kv.CacheConfig`.
  """
  if isinstance(sampling, SamplingParams) or sampling is None:
    sampling = [sampling or SamplingParams()] * len(prompts)
  totals = [len(p) + s.max_new_tokens for p, s in zip(prompts, sampling, strict=True)]
  if not totals:
    raise ValueError("no prompts")
  max_len = block_size * math.ceil(pow2_ceil(max(256, max(totals))) / block_size)
  # A model exact only up to some context (dynamic RoPE) refuses longer caches: when every
  # request fits that context, the default cache stops there instead.
  limit = getattr(model, "max_position_embeddings", None)
  if (limit is not None and max(totals) <= limit < max_len
      and check_rope_context(getattr(model, "rope_scaling", None), limit, max_len)):
    max_len = limit
  blocks = sorted((math.ceil(t / block_size) for t in totals), reverse=True)
  need = 1 + sum(blocks[:DEFAULT_MAX_SEQS])  # the null block, then every request at once
  return cache_config_for(check_model(model), num_blocks=pow2_ceil(need),
                          max_seqs=DEFAULT_MAX_SEQS, max_seq_len=max_len,
                          block_size=block_size)


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
    cache_config: the cache (default: :func:`default_cache_config`, a paged cache with room
      for every request at once, sized by a stable rule so that later calls with other prompts
      reuse the compiled programs).
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
  if any(s.n > 1 for s in sampling):
    raise ValueError("generate returns one continuation per prompt: for SamplingParams(n > 1) "
                     "use Engine.add_request (its samples are requests id .. id + n - 1)")
  if not prompts:
    return []
  if cache_config is None:
    cache_config = default_cache_config(model, prompts, sampling, block_size=block_size)
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


_token_scores_jit = backend_jit(static_argnums=2)(token_scores)


def _takes_all_logits(model: Model) -> bool:
  """Whether ``model.forward`` has an ``all_logits`` keyword (every position's logits)."""
  try:
    params = inspect.signature(model.forward).parameters
  except (TypeError, ValueError):
    return False
  return "all_logits" in params


def _alternatives(toks, vals, r: Request) -> tuple[tuple[int, float], ...]:
  """Request ``r``'s top alternatives at one position, from the program's ``[width]`` rows of
  tokens and log-probabilities (most likely first)."""
  k = r.sampling.top_logprobs
  return tuple((int(t), float(v)) for t, v in zip(toks[:k], vals[:k], strict=True))


@functools.partial(jax.jit, static_argnames=("window", "sink_tokens"), donate_argnums=0)
def _evict_jit(cache, seq_ids, *, window, sink_tokens):
  """:func:`~jax_paged_kv.free_outside_window` for rows the engine just ran (no host sync)."""
  return free_outside_window(cache, seq_ids, window=window, sink_tokens=sink_tokens)[0]


def _window_eviction(option, model, cc: CacheConfig) -> tuple[int, int] | None:
  """Resolves ``Engine(window_eviction=...)`` to ``(window, sink_tokens)`` or None."""
  blocked = ["a CONTIGUOUS cache (a slot owns its slab)"] if (
      cc.strategy is not CacheStrategy.PAGED) else []
  if option is None:
    return None
  if isinstance(option, str):
    if option != "auto":
      raise ValueError(f"window_eviction must be 'auto', None or (window, sink_tokens), got "
                       f"{option!r}")
    try:
      windows = layer_windows(model)
    except (AttributeError, TypeError, ValueError):  # a model without sliding-window fields
      return None
    if blocked or not windows or any(w is None for w in windows):
      return None
    return max(windows), 0
  if (not isinstance(option, tuple) or len(option) != 2
      or not all(isinstance(x, int) and not isinstance(x, bool) for x in option)
      or option[0] < 1 or option[1] < 0):
    raise ValueError(f"window_eviction must be (window >= 1, sink_tokens >= 0) ints, got "
                     f"{option!r}")
  if blocked:
    raise ValueError(f"window_eviction={option} does not work with {blocked[0]}")
  return option
