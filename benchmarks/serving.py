"""The ShareGPT-like request mix through the engine, paged vs contiguous at equal KV memory.

Both strategies get the same pool bytes (``--slabs`` contiguous ``max_seq_len`` slabs) and the
same requests; reported: generated tokens/s (compilation excluded), the ratio paged /
contiguous measured in the same run, peak and mean concurrent sequences, KV utilisation
(tokens stored / token slots allocated, averaged over engine steps) and preemptions. Each
strategy runs ``--repeats`` times (interleaved) and the median throughput is reported.
Goals: throughput ratio >= 2 (from fitting more sequences), paged KV utilisation >= 97%.

    python -m benchmarks.serving [--quick] [--requests 100] [--model tiny] [--slabs 6]

Saves ``benchmarks/results/serving.json``, ``benchmarks/plots/serving.png`` (concurrency and KV
utilisation over time, throughput) and the RESULTS.md section (``benchmarks.report``); on a GPU
the name is ``serving_gpu``.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from benchmarks import report
from jax_paged_kv import workloads
from jax_paged_kv.attention.api import default_implementation
from jax_paged_kv.models import init_params


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="24 requests, one repeat")
  p.add_argument("--requests", type=int, default=None, help="default 100 (24 with --quick)")
  p.add_argument("--model", choices=sorted(workloads.MODELS), default="tiny")
  p.add_argument("--slabs", type=int, default=6)
  p.add_argument("--max-seq-len", type=int, default=2048)
  p.add_argument("--block-size", type=int, nargs="+", default=[16])
  p.add_argument("--max-batch", type=int, default=64)
  p.add_argument("--decode-steps", type=int, default=16)
  p.add_argument("--reserve-ratio", type=float, default=0.5)
  p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-warmup", action="store_true",
                 help="skip the untimed first pass of each strategy that compiles every shape")
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  args.requests = args.requests or (24 if args.quick else 100)
  args.repeats = args.repeats or (1 if args.quick else 3)
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.expanduser("~"), ".cache", "jax_paged_kv", "xla"))
  machine = report.machine_name()
  model = workloads.model_config(args.model)
  params = init_params(model, jax.random.PRNGKey(args.seed), scale=2.0)
  half = args.max_seq_len // 2
  requests = workloads.make_requests(args.requests, model.vocab_size, args.seed, max_prompt=half,
                                max_output=args.max_seq_len - half)
  p_mean = np.mean([len(r[0]) for r in requests])
  o_mean = np.mean([r[1].max_new_tokens for r in requests])
  rows, runs = [], []
  for bs in args.block_size:
    paged_cc, contig_cc = workloads.equal_memory_configs(
        model, slabs=args.slabs, max_seq_len=args.max_seq_len, block_size=bs,
        paged_max_seqs=max(args.max_batch, args.slabs))
    common = dict(prefill_chunk=128, prefill_token_budget=512, decode_steps=args.decode_steps,
                  batch_bucket_min=8, block_bucket_min=8, bucket_factor=2, decode_width_step=8)
    strategies = (("paged", paged_cc, args.max_batch), ("contiguous", contig_cc, args.slabs))

    def serve(name, cc, batch, desc, common=common):
      kw = dict(common, reserve_ratio=args.reserve_ratio) if name == "paged" else common
      return workloads.run_engine(params, model, cc, requests, desc=desc, max_batch=batch, **kw)

    if not args.no_warmup:  # compile every shape; the timed repeats are then all warm
      for name, cc, batch in strategies:
        serve(name, cc, batch, f"{name} bs{bs} warm-up")
    results = {"paged": [], "contiguous": []}
    for rep in range(args.repeats):
      for name, cc, batch in strategies:
        r = serve(name, cc, batch, f"{name} bs{bs} #{rep + 1}")
        results[name].append(r)
        runs.append({k: v for k, v in r.items() if not isinstance(v, list)} | {"block": bs})
    base = report.median([r["tokens_per_s"] for r in results["contiguous"]])
    per_repeat = [p["tokens_per_s"] / c["tokens_per_s"]
                  for p, c in zip(results["paged"], results["contiguous"], strict=True)]
    if bs == args.block_size[0]:
      plot = save_plot([results["paged"][0], results["contiguous"][0]], args, bs, paged_cc,
                       report.result_name("serving"))
    for name, rs in results.items():
      tps = report.median([r["tokens_per_s"] for r in rs])
      r0 = rs[0]
      rows.append({
          "strategy": name, "block": bs, "slots": r0["slots"],
          "KV MiB": f"{r0['pool_mib']:.1f}", "tokens/s": f"{tps:.0f}",
          "vs contiguous": f"{tps / base:.2f}x", "peak seqs": r0["peak_running"],
          "mean seqs": f"{r0['mean_running']:.1f}",
          "KV util": f"{100 * report.median([r['kv_utilization'] for r in rs]):.1f}%",
          "preempt": r0["preemptions"], "decode steps": r0["decode_steps"],
          "wall s": f"{report.median([r['wall_s'] for r in rs]):.1f}",
          "compile s": f"{r0['compile_s']:.1f}",
      })
  cols = ["strategy", "block", "slots", "KV MiB", "tokens/s", "vs contiguous", "peak seqs",
          "mean seqs", "KV util", "preempt", "decode steps", "wall s", "compile s"]
  print(f"\n{args.requests} requests (prompt mean {p_mean:.0f}, output mean {o_mean:.0f}), "
        f"model {args.model} {workloads.MODELS[args.model]}, median of {args.repeats}; "
        f"machine: {machine}\n")
  print(report.text_table(cols, rows))
  paged = next(r for r in rows if r["strategy"] == "paged")
  contig = next(r for r in rows if r["strategy"] == "contiguous")
  notes = (f"{args.requests} ShareGPT-like requests (log-normal lengths, prompt mean "
           f"{p_mean:.0f}, output mean {o_mean:.0f} tokens, sampled, no stop token) through the "
           f"continuous-batching engine, `{args.model}` model, float32, "
           f"`{default_implementation()}` attention. Both strategies get the "
           f"same KV memory ({args.slabs} contiguous slabs of {args.max_seq_len} tokens); "
           + ("tokens/s after an untimed warm-up pass that compiles every shape, median of "
              if not args.no_warmup else "tokens/s exclude compilation, median of ")
           + f"{args.repeats} interleaved repeats. Paged / contiguous throughput "
           f"**{paged['vs contiguous']}** (goal >= 2x; per repeat "
           + ", ".join(f"{x:.2f}x" for x in per_repeat) + "), paged KV utilisation "
           f"**{paged['KV util']}** (tokens stored / slots allocated, mean over engine steps; "
           "goal >= 97%). Paged runs "
           f"{contig['decode steps'] / paged['decode steps']:.1f}x fewer decode steps (more "
           "sequences per step); whether that buys throughput depends on how much a step's "
           "cost grows with its batch (nearly linear on a small CPU; nearly flat on a GPU, "
           "where a step's fixed cost dominates).")
  print(notes)
  name = report.result_name("serving")
  path = report.save(name, script="serving",
                     title="Serving a request mix: paged vs contiguous at equal "
                     "KV memory", markdown=report.markdown_table(cols, rows), notes=notes,
                     plot=plot, data={"args": vars(args), "rows": rows, "runs": runs})
  print(f"wrote {path}")
  return rows


def save_plot(results, args, block_size, cache_config, name) -> str:
  """Concurrency and utilisation over time plus throughput (the demo's figure)."""
  path = report.PLOTS_DIR / f"{name}.png"
  report.PLOTS_DIR.mkdir(exist_ok=True)
  workloads.save_plot(results, os.fspath(path),
                 f"{args.requests} ShareGPT-like requests, "
                 f"{cache_config.pool_bytes / 2**20:.0f} MiB KV, {args.model} model, "
                 f"block {block_size}")
  return f"plots/{name}.png"


if __name__ == "__main__":
  main()
