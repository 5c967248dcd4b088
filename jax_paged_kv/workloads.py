"""Shared workloads of the demo and the benchmarks: model presets, request mixes, cache pairs.

A documented module so that the demo (``python -m jax_paged_kv.demo``) and the programs in
``benchmarks/`` measure the same thing without reaching into each other:

* :data:`MODELS` / :func:`model_config`: random-weight Llama-family presets by name;
* :func:`sharegpt_like_lengths` / :func:`make_requests`: prompt and output lengths drawn from a
  ShareGPT-like (log-normal) distribution, as engine requests;
* :func:`equal_memory_configs`: a paged and a contiguous cache with the same KV memory;
* :func:`run_engine`: one request mix through an :class:`~jax_paged_kv.Engine`, with its
  figures; :func:`save_plot` draws a list of runs.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from jax_paged_kv.cache.config import CacheConfig, CacheStrategy
from jax_paged_kv.models.llama import LlamaConfig
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine

SHAREGPT_PROMPT_MEAN = 161
SHAREGPT_OUTPUT_MEAN = 338

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
  """Serves ``requests`` on a fresh engine; returns a dict of results and traces."""
  engine = Engine(params, model, cache_config, **engine_kwargs)
  for prompt, samp in requests:
    engine.add_request(prompt, samp)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(requests), desc=desc, unit="req", dynamic_ncols=True)
  t0 = time.perf_counter()
  outs = engine.run(bar.update if bar else None)
  wall = time.perf_counter() - t0
  if bar:
    bar.close()
  m = engine.metrics
  steady = max(wall - m.compile_seconds, 1e-9)
  return {
      "strategy": cache_config.strategy.value,
      "slots": cache_config.max_seqs,
      "pool_blocks": cache_config.num_blocks,
      "pool_mib": cache_config.pool_bytes / 2**20,
      "requests": len(outs),
      "generated_tokens": m.generated_tokens,
      "prompt_tokens": m.prompt_tokens,
      "wall_s": wall,
      "compile_s": m.compile_seconds,
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


