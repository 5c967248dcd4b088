"""What an engine run reports: each request's output and the run's counters (host-side)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import jax

# JAX's compile-time events: tracing, lowering and XLA compilation of any jitted function.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_timers = threading.local()  # this thread's running compile_timer sinks
_listener_lock = threading.Lock()
_listening = False


def _on_event(name: str, seconds: float, **_) -> None:
  if name in COMPILE_EVENTS:
    for sink in getattr(_timers, "sinks", ()):
      sink[0] += seconds


@contextlib.contextmanager
def compile_timer() -> Iterator[list[float]]:
  """Counts the seconds JAX spends tracing, lowering and compiling inside the block.

  Yields a one-element list whose entry grows by the duration of each of JAX's compile
  events fired on this thread (JAX compiles on the calling thread), so calls that hit JAX's
  caches add nothing and a warm process reports 0; nested timers all count. One process-wide
  listener serves every timer.
  """
  global _listening
  with _listener_lock:
    if not _listening:
      jax.monitoring.register_event_duration_secs_listener(_on_event)
      _listening = True
  sink = [0.0]
  sinks = _timers.__dict__.setdefault("sinks", [])
  sinks.append(sink)
  try:
    yield sink
  finally:  # by identity: another timer's sink may hold an equal value
    del sinks[next(i for i, x in enumerate(sinks) if x is sink)]


@dataclasses.dataclass
class RequestOutput:
  """A finished (or in-flight) request.

  Attributes:
    request_id: the id :meth:`Engine.add_request` returned.
    prompt: the prompt tokens.
    tokens: generated tokens (a stop token, if hit, is the last one).
    logprobs: with ``SamplingParams(logprobs=True)``, each token's log-probability under the
      model's raw distribution (:func:`~jax_paged_kv.serving.decoding.token_logprobs`), one
      per token; else None.
    prompt_logprobs: with ``SamplingParams(prompt_logprobs=True)``, each prompt token's
      log-probability given the tokens before it (None for the first; fewer than the prompt's
      tokens if the request was aborted during its prefill); else None.
    top_logprobs: with ``SamplingParams(top_logprobs=k)``, per token the ``k`` most likely
      tokens at its position as ``((token, logprob), ...)``, most likely first
      (:func:`~jax_paged_kv.serving.decoding.top_token_logprobs`); else None.
    finish_reason: ``"stop"`` (a stop token), ``"length"`` (``max_new_tokens``), ``"abort"``
      (:meth:`Engine.abort_request`), or None while it runs.
    num_preemptions: times the request was preempted (then recomputed or swapped back in).
    index: which of its request's ``SamplingParams(n=...)`` samples this is (OpenAI's
      ``choices[i].index``); sample ``i`` of the request whose id
      :meth:`Engine.add_request` returned has id ``request_id + i``.
    arrival_time, first_scheduled_time, first_token_time, finish_time:
      ``time.perf_counter()`` stamps of :meth:`Engine.add_request`, the first admission into
      the cache (its queueing time ends there), the first generated token and the finish.
  """

  request_id: int
  prompt: list[int]
  tokens: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  num_preemptions: int = 0
  arrival_time: float = 0.0
  first_scheduled_time: float | None = None
  first_token_time: float | None = None
  finish_time: float | None = None
  logprobs: list[float] | None = None  # last: positional construction keeps its meaning
  top_logprobs: list[tuple[tuple[int, float], ...]] | None = None
  prompt_logprobs: list[float | None] | None = None
  index: int = 0


@dataclasses.dataclass(frozen=True)
class StreamDelta:
  """What one request produced in one engine step (:meth:`Engine.stream`).

  Attributes:
    request_id: the id :meth:`Engine.add_request` returned.
    tokens: the tokens generated in this step (possibly none, in the request's last delta).
    finish_reason: None while it runs; else as :attr:`RequestOutput.finish_reason` (this is
      the request's last delta).
    logprobs: the tokens' log-probabilities if the request asked for them, else None.
    top_logprobs: the tokens' top alternatives (as :attr:`RequestOutput.top_logprobs`) if the
      request asked for them, else None.
    prompt_logprobs: in a request's first delta with tokens (or its last, if it was aborted
      before its first token), its :attr:`RequestOutput.prompt_logprobs` if it asked for them,
      else None.
    index: as :attr:`RequestOutput.index` (which of a request's ``n`` samples).
  """

  request_id: int
  tokens: tuple[int, ...]
  finish_reason: str | None = None
  logprobs: tuple[float, ...] | None = None
  top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
  prompt_logprobs: tuple[float | None, ...] | None = None
  index: int = 0


@dataclasses.dataclass
class EngineMetrics:
  """Counters of an engine run (host-side numbers).

  Attributes:
    steps: engine steps taken.
    prefill_calls / decode_calls: jitted calls of each kind.
    decode_steps: decode iterations executed inside the decode loops.
    prompt_tokens: prompt tokens prefilled (recomputation included; prefix-cache hits
      excluded).
    cached_prompt_tokens: prompt tokens taken from the prefix cache instead of prefilled.
    prefix_hits: admissions that shared at least one cached block.
    shared_prompt_tokens: prompt tokens a parallel sample (``SamplingParams(n=...)``) took
      from another sample's blocks instead of prefilling them (prefix cache off; with it on,
      such shares count as prefix hits).
    evicted_blocks: blocks that cached-prefix eviction returned to the free list.
    generated_tokens: tokens generated.
    peak_running: most sequences in the cache at once.
    peak_blocks: most blocks held at once (``PAGED``; from the host's block accounting after
      every prefill and decode call, cached prefix blocks included).
    peak_running_blocks: most distinct blocks referenced by running requests at once (as
      ``peak_blocks`` but without the cached blocks of finished requests, which are evictable
      at any time; equal to it without prefix caching).
    preemptions: requests preempted (each is recomputed or swapped back in later).
    aborted_requests: requests stopped by :meth:`Engine.abort_request` before they finished.
    swapped_out_blocks / swapped_bytes: blocks (and their bytes, scales included) that swap
      preemption copied to host memory; each comes back once, unless its request is aborted
      while swapped out.
    swap_out_seconds / swap_in_seconds: wall time of those copies (out: gather, copy to host
      and free; in: copy back and scatter into fresh blocks).
    util_tokens / util_slots: sums over steps of ``tokens_stored`` and ``allocated_slots`` (as
      :func:`~jax_paged_kv.cache_stats` counts them, from the host mirror of the lengths);
      their ratio is the KV memory utilisation.
    running_trace / util_trace / time_trace: per-step concurrency, utilisation and time (one
      entry per step each; ``Engine(trace_steps=n)`` keeps only about the last ``n``).
    compile_seconds: seconds JAX spent tracing, lowering and compiling inside
      :meth:`Engine.step` (the step programs and the small cache ops the engine calls
      eagerly), from JAX's compile events (:func:`compile_timer`): 0 when everything the
      steps run was compiled earlier in the process.
    wall_seconds: wall time inside :meth:`Engine.step`, compilation included.
  """

  steps: int = 0
  prefill_calls: int = 0
  decode_calls: int = 0
  decode_steps: int = 0
  prompt_tokens: int = 0
  cached_prompt_tokens: int = 0
  prefix_hits: int = 0
  shared_prompt_tokens: int = 0
  evicted_blocks: int = 0
  generated_tokens: int = 0
  peak_running: int = 0
  peak_blocks: int = 0
  peak_running_blocks: int = 0
  preemptions: int = 0
  aborted_requests: int = 0
  swapped_out_blocks: int = 0
  swapped_bytes: int = 0
  swap_out_seconds: float = 0.0
  swap_in_seconds: float = 0.0
  util_tokens: int = 0
  util_slots: int = 0
  running_trace: list[int] = dataclasses.field(default_factory=list)
  util_trace: list[float] = dataclasses.field(default_factory=list)
  time_trace: list[float] = dataclasses.field(default_factory=list)
  compile_seconds: float = 0.0
  wall_seconds: float = 0.0

  @property
  def prefix_hit_rate(self) -> float:
    """Share of prompt tokens (recomputation included) served from the prefix cache."""
    total = self.cached_prompt_tokens + self.prompt_tokens
    return self.cached_prompt_tokens / total if total else 0.0

  @property
  def utilization(self) -> float:
    """``sum(tokens_stored) / sum(allocated_slots)`` over the sampled steps."""
    return self.util_tokens / self.util_slots if self.util_slots else 1.0
