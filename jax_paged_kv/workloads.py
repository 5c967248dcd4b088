"""Shared workloads of the demo and the benchmarks: model presets, request mixes, cache pairs.

A documented module so that the demo (``python -m jax_paged_kv.demo``) and the programs in
``benchmarks/`` measure the same thing without reaching into each other:

* :data:`MODELS` / :func:`model_config`: random-weight Llama-family presets by name;
* :func:`sharegpt_like_lengths` / :func:`make_requests`: prompt and output lengths drawn from a
  ShareGPT-like (log-normal) distribution, as engine requests;
* :func:`equal_memory_configs`: a paged and a contiguous cache with the same KV memory;
* :func:`run_engine`: one request mix through an :class:`~jax_paged_kv.Engine`, all requests
  queued at once (capacity: tokens/s, concurrency, KV utilisation); :func:`save_plot` draws a
  list of runs;
* :func:`poisson_arrivals` / :func:`serve_arrivals` / :func:`run_arrivals`: the same requests
  arriving over time (latency under load: time to first token, end-to-end latency, queueing);
  :func:`save_latency_plot` draws their latency distributions.

Latency runs use a *simulated clock driven by the engine's real step times*: each
:meth:`~jax_paged_kv.Engine.step` advances the clock by its measured wall time, minus any time
spent compiling a new shape in that step (so latencies are those of a warm server, without a
warm-up pass), and when the engine is idle the clock jumps to the next arrival instead of
sleeping. Requests join the engine through its public :meth:`~jax_paged_kv.Engine.add_request`
at the first step boundary at or after their arrival (a synchronous engine loop cannot see a
request before its current step ends), and their latencies count from the arrival itself.
"""

from __future__ import annotations

import bisect
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

from jax_paged_kv.cache.config import CacheConfig, CacheStrategy
from jax_paged_kv.models.llama import LlamaConfig
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine
from jax_paged_kv.serving.engine.metrics import compile_timer

SHAREGPT_PROMPT_MEAN = 161
SHAREGPT_OUTPUT_MEAN = 338

# The engine settings of the demo and the serving benchmark: chunked prefill of up to 256
# tokens a row and 512 a call (most prompts of the mix prefill in one step; prefill widths of
# 2 rows, 8, ...), 16 decode steps per jitted loop, decode batch widths in multiples of 8
# (padding rows cost as much as live ones on a CPU), and few block-table widths (16, 64 or all
# 128 columns of a 2048-token cache): every new shape costs a compilation.
ENGINE_KWARGS = dict(prefill_chunk=256, prefill_token_budget=512, decode_steps=16,
                     batch_bucket_min=2, block_bucket_min=16, bucket_factor=4,
                     decode_width_step=8)

MODELS = {
    # name: (vocab, hidden, intermediate, layers, heads, kv_heads)
    "tiny": (512, 128, 256, 2, 4, 2),
    "small": (1024, 256, 512, 4, 8, 2),
    "base": (4096, 512, 1376, 8, 8, 4),
    # A Llama-sized vocabulary and MQA: weight reads, not per-row attention, dominate a step.
    "wide": (32000, 512, 2048, 2, 8, 1),
}


def sharegpt_like_lengths(n: int, rng: np.random.Generator, *,
                          prompt_mean: float = SHAREGPT_PROMPT_MEAN,
                          output_mean: float = SHAREGPT_OUTPUT_MEAN,
                          max_prompt: int = 1024, max_output: int = 1024,
                          sigma: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
  """Log-normal prompt and output lengths whose means *after* clipping to ``[4, max]`` are the
  given ones (the location parameter is calibrated on a fixed large sample).

  ShareGPT conversations are heavy-tailed: most prompts and answers are short, a few are long.

  Returns:
    ``(prompt_lens int64[n], output_lens int64[n])``.
  """
  z = np.random.default_rng(12345).standard_normal(100_000)

  def calibrated_mu(mean, hi):
    lo_mu, hi_mu = np.log(4.0) - 3 * sigma, np.log(hi) + 3 * sigma
    for _ in range(40):
      mu = (lo_mu + hi_mu) / 2
      if np.clip(np.exp(mu + sigma * z), 4, hi).mean() < mean:
        lo_mu = mu
      else:
        hi_mu = mu
    return mu

  def draw(mean, hi):
    mu = calibrated_mu(mean, hi)
    return np.clip(np.round(rng.lognormal(mu, sigma, n)), 4, hi).astype(np.int64)
  return draw(prompt_mean, max_prompt), draw(output_mean, max_output)


def make_requests(n: int, vocab: int, seed: int = 0, **length_kwargs):
  """``n`` requests ``(prompt tokens, SamplingParams)`` with ShareGPT-like lengths.

  Every request samples (temperature 1, top-p 0.95) with its own seed and has no stop token,
  so it produces exactly its drawn output length (like vLLM's ``ignore_eos`` benchmarks).
  """
  rng = np.random.default_rng(seed)
  p_lens, o_lens = sharegpt_like_lengths(n, rng, **length_kwargs)
  return [(rng.integers(0, vocab, int(p)).tolist(),
           SamplingParams(temperature=1.0, top_p=0.95, seed=seed * 100003 + i,
                          max_new_tokens=int(o)))
          for i, (p, o) in enumerate(zip(p_lens, o_lens, strict=True))]


def model_config(name: str) -> LlamaConfig:
  v, h, i, layers, heads, kv = MODELS[name]
  return LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=i, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv, rope_theta=10000.0)


def equal_memory_configs(model: LlamaConfig, *, slabs: int, max_seq_len: int,
                         block_size: int, paged_max_seqs: int,
                         kv_quant: str | None = None) -> tuple[CacheConfig, CacheConfig]:
  """A paged and a contiguous cache with the same pool bytes: ``slabs`` contiguous slots.

  With ``kv_quant`` both keep the KV memory of ``slabs`` unquantised slabs and fit more
  blocks (paged) or slabs (contiguous) into it.
  """
  contiguous = model.cache_config(
      num_blocks=1 + slabs * -(-max_seq_len // block_size), max_seqs=slabs,
      max_seq_len=max_seq_len, block_size=block_size, strategy=CacheStrategy.CONTIGUOUS)
  paged = model.cache_config(num_blocks=contiguous.num_blocks, max_seqs=paged_max_seqs,
                             max_seq_len=max_seq_len, block_size=block_size)
  assert paged.pool_bytes == contiguous.pool_bytes
  if kv_quant is not None:
    budget = paged.pool_bytes
    common = dict(num_layers=paged.num_layers, num_kv_heads=paged.num_kv_heads,
                  head_dim=paged.head_dim, max_seq_len=max_seq_len, block_size=block_size,
                  dtype=paged.dtype, kv_quant=kv_quant)
    paged = CacheConfig.from_memory_budget(budget, max_seqs=paged_max_seqs, **common)
    contiguous = CacheConfig.from_memory_budget(budget, strategy=CacheStrategy.CONTIGUOUS,
                                                **common)
  return paged, contiguous


def run_engine(params, model: LlamaConfig, cache_config: CacheConfig, requests, *,
               desc: str, progress: bool = True, **engine_kwargs) -> dict:
  """Serves ``requests`` on a fresh engine; returns a dict of results and traces.

  ``compile_s`` is every second JAX spent tracing, lowering and compiling during the run (the
  engine's step programs and the small cache ops it calls eagerly), from JAX's compile events:
  ``tokens_per_s`` excludes it, ``tokens_per_s_incl_compile`` does not. In a process that
  served the same shapes before it is 0.
  """
  engine = Engine(params, model, cache_config, **engine_kwargs)
  for prompt, samp in requests:
    engine.add_request(prompt, samp)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(requests), desc=desc, unit="req", dynamic_ncols=True)
  t0 = time.perf_counter()
  with compile_timer() as spent:
    outs = engine.run(bar.update if bar else None)
  wall = time.perf_counter() - t0
  if bar:
    bar.close()
  m = engine.metrics
  steady = max(wall - spent[0], 1e-9)
  return {
      "strategy": cache_config.strategy.value,
      "slots": cache_config.max_seqs,
      "pool_blocks": cache_config.num_blocks,
      "pool_mib": cache_config.pool_bytes / 2**20,
      "requests": len(outs),
      "generated_tokens": m.generated_tokens,
      "prompt_tokens": m.prompt_tokens,
      "wall_s": wall,
      "compile_s": spent[0],
      "tokens_per_s": m.generated_tokens / steady,
      "tokens_per_s_incl_compile": m.generated_tokens / wall,
      "peak_running": m.peak_running,
      "mean_running": float(np.mean(m.running_trace)) if m.running_trace else 0.0,
      "kv_utilization": m.utilization,
      "preemptions": m.preemptions,
      "engine_steps": m.steps,
      "decode_steps": m.decode_steps,
      "running_trace": m.running_trace,
      "util_trace": m.util_trace,
      "time_trace": m.time_trace,
      "outputs": [o.tokens for o in outs],
  }


def save_plot(results: Sequence[dict], path: str, title: str) -> str:
  """Concurrency and KV utilisation over time for each strategy (matplotlib, Agg backend)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for r in results:
    t = np.asarray(r["time_trace"])
    label = f"{r['strategy']} ({r['slots']} slots)"
    axes[0].step(t, r["running_trace"], where="post", label=label)
    axes[1].plot(t, 100 * np.asarray(r["util_trace"]), label=label)
  for r in results:
    axes[2].bar(r["strategy"], r["tokens_per_s"])
    axes[2].text(r["strategy"], r["tokens_per_s"], f"{r['tokens_per_s']:.0f}", ha="center",
                 va="bottom")
  axes[0].set(title="sequences in the cache", xlabel="engine time [s]", ylabel="running")
  axes[1].set(title="KV memory utilisation", xlabel="engine time [s]",
              ylabel="tokens stored / slots allocated [%]", ylim=(0, 105))
  axes[2].set(title="throughput (excl. compile)", ylabel="generated tokens / s")
  axes[0].legend()
  axes[1].legend()
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path




# ---- latency under load ----------------------------------------------------------------------


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> np.ndarray:
  """Arrival times of ``n`` requests from a Poisson process of ``rate`` requests per second.

  Gaps are independent exponentials of mean ``1 / rate``; the first request arrives after the
  first gap.

  Returns:
    ``float64[n]`` arrival times in seconds, non-decreasing.
  """
  if not 0 < rate < float("inf"):  # also NaN
    raise ValueError(f"{rate=} must be positive and finite")
  return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, n))


def serve_arrivals(engine, requests, arrivals: Sequence[float], *,
                   progress: Callable[[int], object] | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> dict:
  """Serves ``requests`` arriving at ``arrivals`` on ``engine``, on a simulated clock.

  The clock starts at 0 and advances by each engine step's wall time (read with ``clock``, the
  clock the engine stamps its outputs with) less the compile time that step added to
  ``engine.metrics.compile_seconds``; with nothing to do it jumps to the next arrival. Before
  each step every request that has arrived by then is passed to ``engine.add_request``. A
  stamp taken inside a step (admission, first token, finish) maps to the step's simulated start
  plus its offset into the step, less that step's compile time, clamped to the step's
  simulated span (exact when the compilation preceded the stamp, as a prefill's does for the
  first token it emits; otherwise the stamp moves earlier by at most that span; the result
  counts the steps that compiled).

  Args:
    engine: an :class:`~jax_paged_kv.Engine` (or anything with ``add_request(prompt, sampling)
      -> id``, ``step() -> finished outputs``, ``has_work`` and ``metrics.compile_seconds``).
    requests: ``(prompt tokens, SamplingParams)`` pairs.
    arrivals: arrival time of each request in seconds, non-decreasing.
    progress: called with the number of requests finished by each step (a tqdm ``update``).
    clock: the wall clock of the engine's stamps.

  Returns:
    A dict of ``float64[n]`` arrays in request order: ``arrival``, ``ttft`` (time to first
    token), ``e2e`` (arrival to finish), ``queue`` (arrival to first admission), ``tpot``
    (mean time per output token after the first); ``outputs`` (the generated tokens per
    request), ``makespan`` (first arrival to last finish, s), ``steps``, ``step_start`` and
    ``step_span`` (``float64[steps]``: each step's simulated start and length), ``compiled_steps``
    (steps that compiled a new shape), ``compile_s`` and ``engine_wall_s`` (real seconds inside
    steps).
  """
  arrivals = np.asarray(arrivals, np.float64)
  n = len(requests)
  if arrivals.shape != (n,) or not np.all(np.isfinite(arrivals)) or np.any(
      np.diff(arrivals) < 0):
    raise ValueError("arrivals must be one finite, non-decreasing time per request")
  starts_wall, ends_wall, starts_sim, spans, compiles = [], [], [], [], []
  ids: dict[int, int] = {}  # engine request id -> index into requests
  outs: dict[int, object] = {}
  sim, nxt, wall_total = 0.0, 0, 0.0
  while nxt < n or engine.has_work:
    if not engine.has_work and arrivals[nxt] > sim:
      sim = float(arrivals[nxt])  # idle: the server waits for the next request
    while nxt < n and arrivals[nxt] <= sim:
      prompt, sampling = requests[nxt]
      ids[engine.add_request(prompt, sampling)] = nxt
      nxt += 1
    c0 = engine.metrics.compile_seconds
    w0 = clock()
    finished = engine.step()
    w1 = clock()
    compiled = engine.metrics.compile_seconds - c0
    span = max(w1 - w0 - compiled, 0.0)
    starts_wall.append(w0)
    ends_wall.append(w1)
    starts_sim.append(sim)
    spans.append(span)
    compiles.append(compiled)
    wall_total += w1 - w0
    sim += span
    for o in finished:
      outs[ids[o.request_id]] = o
    if progress is not None and finished:
      progress(len(finished))

  def to_sim(stamp: float, late: bool) -> float:
    # The step holding the stamp: a token stamp is <= its step's end, an admission stamp is
    # >= its step's start (they differ only for a stamp on the boundary of two steps).
    if late:
      k = min(bisect.bisect_left(ends_wall, stamp), len(spans) - 1)
    else:
      k = max(bisect.bisect_right(starts_wall, stamp) - 1, 0)
    offset = stamp - starts_wall[k] - compiles[k]
    return starts_sim[k] + min(max(offset, 0.0), spans[k])

  first = np.array([to_sim(outs[i].first_token_time, True) for i in range(n)])
  finish = np.array([to_sim(outs[i].finish_time, True) for i in range(n)])
  sched = np.array([to_sim(outs[i].first_scheduled_time, False) for i in range(n)])
  n_out = np.array([len(outs[i].tokens) for i in range(n)])
  return {
      "arrival": arrivals,
      "ttft": first - arrivals,
      "e2e": finish - arrivals,
      "queue": sched - arrivals,
      "tpot": (finish - first) / np.maximum(n_out - 1, 1),
      "outputs": [outs[i].tokens for i in range(n)],
      "makespan": float(finish.max() - arrivals.min()) if n else 0.0,
      "steps": len(spans),
      "step_start": np.asarray(starts_sim),
      "step_span": np.asarray(spans),
      "compiled_steps": int(sum(c > 0 for c in compiles)),
      "compile_s": float(sum(compiles)),
      "engine_wall_s": wall_total,
  }


def latency_summary(lat: dict) -> dict:
  """p50 / p90 / mean of a :func:`serve_arrivals` result's latencies (seconds), and its
  throughput (generated tokens per simulated second, first arrival to last finish)."""
  row = {}
  for key in ("ttft", "e2e", "queue", "tpot"):
    x = np.asarray(lat[key])
    row[f"{key}_p50"] = float(np.percentile(x, 50))
    row[f"{key}_p90"] = float(np.percentile(x, 90))
    row[f"{key}_mean"] = float(x.mean())
  tokens = sum(len(o) for o in lat["outputs"])
  row["tokens_per_s"] = tokens / lat["makespan"] if lat["makespan"] > 0 else 0.0
  row["requests_per_s"] = len(lat["outputs"]) / lat["makespan"] if lat["makespan"] > 0 else 0.0
  return row


def busy_mean(counts: Sequence[float], spans: Sequence[float], total: float) -> float:
  """Time-weighted mean of ``counts`` (one per step, held for that step's ``spans``) over
  ``total`` seconds; time outside the steps (an idle server) counts as 0. A per-step mean
  would weight a short step of a small batch like a long step of a big one."""
  counts, spans = np.asarray(counts, np.float64), np.asarray(spans, np.float64)
  if counts.shape != spans.shape:
    raise ValueError(f"{counts.shape[0]} counts for {spans.shape[0]} steps")
  return float(counts @ spans / total) if total > 0 else 0.0


def run_arrivals(params, model: LlamaConfig, cache_config: CacheConfig, requests,
                 arrivals: Sequence[float], *, desc: str, progress: bool = True,
                 **engine_kwargs) -> dict:
  """:func:`serve_arrivals` on a fresh engine; its result plus :func:`latency_summary` and the
  engine's counters (``strategy``, ``slots``, ``peak_running``, ``mean_running`` (per step),
  ``busy_seqs`` (running sequences averaged over the simulated time, first arrival to last
  finish, idle gaps included: :func:`busy_mean`), ``kv_utilization``, ``preemptions``)."""
  engine = Engine(params, model, cache_config, **engine_kwargs)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(requests), desc=desc, unit="req", dynamic_ncols=True)
  lat = serve_arrivals(engine, requests, arrivals, progress=bar.update if bar else None)
  if bar:
    bar.close()
  m = engine.metrics
  return lat | latency_summary(lat) | {
      "strategy": cache_config.strategy.value,
      "slots": cache_config.max_seqs,
      "pool_mib": cache_config.pool_bytes / 2**20,
      "peak_running": m.peak_running,
      "mean_running": float(np.mean(m.running_trace)) if m.running_trace else 0.0,
      "busy_seqs": busy_mean(m.running_trace, lat["step_span"], lat["makespan"]),
      "kv_utilization": m.utilization,
      "preemptions": m.preemptions,
  }


def save_latency_plot(results: Sequence[dict], path: str, title: str) -> str:
  """Distributions (CDFs) of time to first token, end-to-end latency and queueing time for each
  run of :func:`run_arrivals` (matplotlib, Agg backend)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  names = (("ttft", "time to first token"), ("e2e", "end-to-end latency"),
           ("queue", "queueing (arrival to admission)"))
  for ax, (key, name) in zip(axes, names, strict=True):
    for r in results:
      x = np.sort(np.asarray(r[key]))
      y = np.arange(1, len(x) + 1) / len(x)
      ax.step(x, 100 * y, where="post",
              label=f"{r['strategy']} (p90 {r[key + '_p90']:.2f} s)")
    ax.axhline(90, color="0.7", lw=0.8, ls=":")
    ax.set(title=name, xlabel="seconds", ylabel="requests [%]", ylim=(0, 101))
    ax.set_xscale("symlog", linthresh=0.01)
    ax.set_xlim(left=0)
    ax.legend(loc="lower right")
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
