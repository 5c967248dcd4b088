"""The main job: a realistic request mix through the engine, paged vs contiguous at equal memory.

Run ``python -m jax_paged_kv.demo`` (CPU, no downloads, about 1-3 minutes). It builds a small
random-weight Llama-family model, draws prompt and output lengths from a ShareGPT-like
distribution (log-normal, published means about 161 prompt and 338 output tokens), serves every
request with continuous batching on a paged cache and then on a contiguous cache with the *same
KV memory*, and reports throughput, peak concurrent sequences and KV memory utilisation (tokens
stored / token slots allocated), plus a saved plot. An untimed first pass compiles every shape
both strategies use (``--no-warmup`` skips it), so the reported tokens/s are steady state.
``--help`` lists flags for bigger runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from jax_paged_kv.cache.config import CacheConfig, CacheStrategy
from jax_paged_kv.models.llama import LlamaConfig, init_params
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


def summary_rows(results: Sequence[dict]) -> list[dict]:
  base = next(r for r in results if r["strategy"] == "contiguous")
  rows = []
  for r in results:
    rows.append({
        "strategy": r["strategy"], "slots": r["slots"], "KV MiB": f"{r['pool_mib']:.1f}",
        "tokens/s": f"{r['tokens_per_s']:.0f}",
        "vs contiguous": f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x",
        "peak seqs": r["peak_running"], "mean seqs": f"{r['mean_running']:.1f}",
        "KV util": f"{100 * r['kv_utilization']:.1f}%", "preempt": r["preemptions"],
        "wall s": f"{r['wall_s']:.1f}", "compile s": f"{r['compile_s']:.1f}",
    })
  return rows


COLUMNS = ["strategy", "slots", "KV MiB", "tokens/s", "vs contiguous", "peak seqs",
           "mean seqs", "KV util", "preempt", "wall s", "compile s"]


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m jax_paged_kv.demo", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--requests", type=int, default=100, help="number of requests")
  p.add_argument("--model", choices=sorted(MODELS), default="tiny", help="model size")
  p.add_argument("--slabs", type=int, default=6,
                 help="KV memory = this many contiguous max_seq_len slabs (both strategies)")
  p.add_argument("--max-seq-len", type=int, default=2048)
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--max-batch", type=int, default=64, help="most sequences per paged step")
  p.add_argument("--prefill-chunk", type=int, default=128)
  p.add_argument("--decode-steps", type=int, default=16, help="decode steps per jitted loop")
  p.add_argument("--reserve-ratio", type=float, default=0.5,
                 help="admission: share of running requests' remaining budget kept free")
  p.add_argument("--prompt-mean", type=float, default=SHAREGPT_PROMPT_MEAN)
  p.add_argument("--output-mean", type=float, default=SHAREGPT_OUTPUT_MEAN)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--plot", default=os.path.join("benchmarks", "out", "demo.png"))
  p.add_argument("--no-compile-cache", action="store_true",
                 help="do not use JAX's persistent compilation cache")
  p.add_argument("--no-warmup", action="store_true",
                 help="skip the untimed first pass that compiles every shape (then tokens/s "
                      "only subtract each shape's first call, which misestimates a cold run)")
  p.add_argument("--kv-quant", choices=["none", "int8", "fp8", "int4"], default="none",
                 help="store K/V quantised (same KV memory, more tokens; see the README)")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  return p


def main(argv: Sequence[str] | None = None) -> list[dict]:
  args = build_parser().parse_args(argv)
  if not args.no_compile_cache:
    cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "jax_paged_kv", "xla")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
  model = model_config(args.model)
  params = init_params(model, jax.random.PRNGKey(args.seed), scale=2.0)
  max_prompt = args.max_seq_len // 2
  requests = make_requests(args.requests, model.vocab_size, args.seed,
                           prompt_mean=args.prompt_mean, output_mean=args.output_mean,
                           max_prompt=max_prompt, max_output=args.max_seq_len - max_prompt)
  p_lens = np.asarray([len(p) for p, _ in requests])
  o_lens = np.asarray([s.max_new_tokens for _, s in requests])
  paged_cc, contig_cc = equal_memory_configs(
      model, slabs=args.slabs, max_seq_len=args.max_seq_len, block_size=args.block_size,
      paged_max_seqs=max(args.max_batch, args.slabs),
      kv_quant=None if args.kv_quant == "none" else args.kv_quant)
  print(f"model: {args.model} {dataclasses.asdict(model)}")
  print(f"workload: {len(requests)} requests, prompt mean {p_lens.mean():.0f} "
        f"(max {p_lens.max()}), output mean {o_lens.mean():.0f} (max {o_lens.max()}) tokens")
  print(f"KV memory: {paged_cc.pool_bytes / 2**20:.1f} MiB for both strategies "
        f"({paged_cc.usable_blocks} blocks of {args.block_size} tokens = "
        f"{contig_cc.max_seqs} contiguous slabs of {args.max_seq_len}; "
        f"K/V stored as {paged_cc.kv_quant or paged_cc.dtype.name})")
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  common = dict(prefill_chunk=args.prefill_chunk, prefill_token_budget=4 * args.prefill_chunk,
                decode_steps=args.decode_steps, batch_bucket_min=8, block_bucket_min=8,
                bucket_factor=2, decode_width_step=8)
  runs = [(paged_cc, args.max_batch), (contig_cc, contig_cc.max_seqs)]
  if not args.no_warmup:  # compile every shape both strategies use; the timed pass is warm
    for cc, batch in runs:
      run_engine(params, model, cc, requests, desc=f"{cc.strategy.value} (warm-up)",
                 progress=not args.quiet, max_batch=batch, reserve_ratio=args.reserve_ratio,
                 **common)
  results = []
  for cc, batch in runs:
    results.append(run_engine(params, model, cc, requests, desc=cc.strategy.value,
                              progress=not args.quiet, max_batch=batch,
                              reserve_ratio=args.reserve_ratio, **common))
  rows = summary_rows(results)
  print()
  print(format_table(rows, COLUMNS))
  paged, contig = results
  same = sum(a == b for a, b in zip(paged["outputs"], contig["outputs"], strict=True))
  print(f"\npaged / contiguous throughput at equal KV memory: "
        f"{paged['tokens_per_s'] / contig['tokens_per_s']:.2f}x "
        f"(peak {paged['peak_running']} vs {contig['peak_running']} concurrent sequences); "
        f"KV utilisation {100 * paged['kv_utilization']:.1f}% vs "
        f"{100 * contig['kv_utilization']:.1f}%")
  print(f"identical outputs under both strategies: {same}/{len(requests)} requests")
  if jax.default_backend() == "cpu":
    print("note: on a CPU a decode step costs about the same per row whatever the batch, so "
          "fitting more sequences buys little throughput; on a GPU, where a step's cost is "
          "nearly flat in the batch, the same run is 2.02x faster paged (H100, "
          "benchmarks/RESULTS.md)")
  path = save_plot(results, args.plot, f"{len(requests)} ShareGPT-like requests, "
                   f"{paged_cc.pool_bytes / 2**20:.0f} MiB KV, {args.model} model")
  print(f"plot saved to {path}")
  return results


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  cells = [[str(r[c]) for c in columns] for r in rows]
  widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
  lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
  lines.append("-" * len(lines[0]))
  lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True)) for r in cells]
  return "\n".join(lines)


if __name__ == "__main__":
  main()
