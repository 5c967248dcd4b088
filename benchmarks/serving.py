"""The ShareGPT-like request mix through the engine, paged vs contiguous at equal KV memory.

Both strategies get the same pool bytes (``--slabs`` contiguous ``max_seq_len`` slabs), the same
requests and the same engine settings (``workloads.ENGINE_KWARGS``). Two measurements, each
repeated ``--repeats`` times (interleaved: capacity paged, capacity contiguous, latency paged,
latency contiguous) after an untimed warm-up pass that compiles every shape:

* **Capacity**: every request queued at once. Generated tokens/s (compilation excluded), the
  ratio paged / contiguous measured in the same repeat, peak and mean concurrent sequences, KV
  utilisation (tokens stored / token slots allocated, averaged over engine steps), preemptions.
  Goals: paged KV utilisation >= 97%; throughput >= 2x where a step's cost is nearly flat in
  the batch (a GPU).
* **Latency under load**: the same requests arrive as a Poisson process at ``--load`` times the
  contiguous server's capacity measured in the same repeat (requests/s in its capacity run),
  and join each engine through ``Engine.add_request`` as they arrive, on a simulated clock
  advanced by each engine step's measured wall time (``workloads.serve_arrivals``; idle gaps
  are skipped, compilation is excluded). Time to first token (TTFT), end-to-end latency and
  queueing time (arrival to admission) at p50 and p90, throughput. Goal: paged p90 TTFT at
  least 2x lower than contiguous on a CPU.

Reported figures are medians over the repeats.

    python -m benchmarks.serving [--quick] [--requests 100] [--model tiny] [--slabs 6] [--load 0.9]

Saves ``benchmarks/results/serving.json``, ``benchmarks/plots/serving.png`` (concurrency and KV
utilisation over time, throughput), ``benchmarks/plots/serving_latency.png`` (latency CDFs of
the first repeat) and the RESULTS.md section (``benchmarks.report``); on a GPU the name is
``serving_gpu``.
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

LATENCY_KEYS = ("ttft_p50", "ttft_p90", "e2e_p50", "e2e_p90", "queue_p50", "queue_p90",
                "tokens_per_s")


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
  p.add_argument("--decode-steps", type=int, default=workloads.ENGINE_KWARGS["decode_steps"])
  p.add_argument("--reserve-ratio", type=float, default=0.5)
  p.add_argument("--load", type=float, default=0.9,
                 help="arrival rate / the contiguous server's capacity (same repeat)")
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
  load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  model = workloads.model_config(args.model)
  params = init_params(model, jax.random.PRNGKey(args.seed), scale=2.0)
  half = args.max_seq_len // 2
  requests = workloads.make_requests(args.requests, model.vocab_size, args.seed, max_prompt=half,
                                     max_output=args.max_seq_len - half)
  p_mean = np.mean([len(r[0]) for r in requests])
  o_mean = np.mean([r[1].max_new_tokens for r in requests])
  rows, lat_rows, runs = [], [], []
  for bs in args.block_size:
    paged_cc, contig_cc = workloads.equal_memory_configs(
        model, slabs=args.slabs, max_seq_len=args.max_seq_len, block_size=bs,
        paged_max_seqs=max(args.max_batch, args.slabs))
    common = dict(workloads.ENGINE_KWARGS, decode_steps=args.decode_steps)
    strategies = (("paged", paged_cc, args.max_batch), ("contiguous", contig_cc, args.slabs))

    def kwargs(name, batch, common=common):
      kw = dict(common, reserve_ratio=args.reserve_ratio) if name == "paged" else common
      return dict(kw, max_batch=batch)

    if not args.no_warmup:  # compile every shape; the timed repeats are then all warm
      for name, cc, batch in strategies:
        workloads.run_engine(params, model, cc, requests, desc=f"{name} bs{bs} warm-up",
                             **kwargs(name, batch))
    results = {"paged": [], "contiguous": []}
    latency = {"paged": [], "contiguous": []}
    rates = []
    for rep in range(args.repeats):
      for name, cc, batch in strategies:
        r = workloads.run_engine(params, model, cc, requests, desc=f"{name} bs{bs} #{rep + 1}",
                                 **kwargs(name, batch))
        results[name].append(r)
        runs.append({k: v for k, v in r.items() if not isinstance(v, list)}
                    | {"block": bs, "kind": "capacity"})
      c = results["contiguous"][-1]
      rate = args.load * len(requests) / max(c["wall_s"] - c["compile_s"], 1e-9)
      rates.append(rate)
      arrivals = workloads.poisson_arrivals(len(requests), rate, seed=args.seed + rep)
      for name, cc, batch in strategies:
        r = workloads.run_arrivals(params, model, cc, requests, arrivals,
                                   desc=f"{name} bs{bs} #{rep + 1} arrivals",
                                   **kwargs(name, batch))
        latency[name].append(r)
        runs.append({k: v for k, v in r.items() if np.isscalar(v)}
                    | {"block": bs, "kind": "latency", "rate": rate})
    base = report.median([r["tokens_per_s"] for r in results["contiguous"]])
    per_repeat = [p["tokens_per_s"] / c["tokens_per_s"]
                  for p, c in zip(results["paged"], results["contiguous"], strict=True)]
    ttft_ratio = [c["ttft_p90"] / p["ttft_p90"]
                  for p, c in zip(latency["paged"], latency["contiguous"], strict=True)]
    if bs == args.block_size[0]:
      name = report.result_name("serving")
      plot = save_plot([results["paged"][0], results["contiguous"][0]], args, bs, paged_cc,
                       name)
      lat_plot = save_latency_plot([latency["paged"][0], latency["contiguous"][0]], args, bs,
                                   paged_cc, rates[0], f"{name}_latency")
      first = dict(bs=bs, per_repeat=per_repeat, ttft_ratio=ttft_ratio, rates=rates,
                   compiled=sum(r["compiled_steps"] for rs in latency.values() for r in rs),
                   steps=sum(r["steps"] for rs in latency.values() for r in rs))
    for name, rs in results.items():
      # Every column is the median over the repeats (the counts are the same in each repeat
      # unless timing changed the schedule).
      med = {k: report.median([r[k] for r in rs])
             for k in ("tokens_per_s", "peak_running", "mean_running", "kv_utilization",
                       "preemptions", "decode_steps", "wall_s", "compile_s")}
      r0 = rs[0]
      rows.append({
          "strategy": name, "block": bs, "slots": r0["slots"],
          "KV MiB": f"{r0['pool_mib']:.1f}", "tokens/s": f"{med['tokens_per_s']:.0f}",
          "vs contiguous": f"{med['tokens_per_s'] / base:.2f}x",
          "peak seqs": f"{med['peak_running']:g}", "mean seqs": f"{med['mean_running']:.1f}",
          "KV util": f"{100 * med['kv_utilization']:.1f}%",
          "preempt": f"{med['preemptions']:g}", "decode steps": f"{med['decode_steps']:g}",
          "wall s": f"{med['wall_s']:.1f}", "compile s": f"{med['compile_s']:.1f}",
      })
    for name, rs in latency.items():
      med = {k: report.median([r[k] for r in rs]) for k in LATENCY_KEYS}
      lat_rows.append({
          "strategy": name, "block": bs, "rate req/s": f"{report.median(rates):.1f}",
          "TTFT p50 s": f"{med['ttft_p50']:.3f}", "TTFT p90 s": f"{med['ttft_p90']:.3f}",
          "E2E p50 s": f"{med['e2e_p50']:.2f}", "E2E p90 s": f"{med['e2e_p90']:.2f}",
          "queue p50 s": f"{med['queue_p50']:.3f}", "queue p90 s": f"{med['queue_p90']:.3f}",
          "tokens/s": f"{med['tokens_per_s']:.0f}",
          "peak seqs": max(r["peak_running"] for r in rs),
          "busy seqs": f"{report.median([r['busy_seqs'] for r in rs]):.1f}",
      })
  cols = ["strategy", "block", "slots", "KV MiB", "tokens/s", "vs contiguous", "peak seqs",
          "mean seqs", "KV util", "preempt", "decode steps", "wall s", "compile s"]
  lat_cols = ["strategy", "block", "rate req/s", "TTFT p50 s", "TTFT p90 s", "E2E p50 s",
              "E2E p90 s", "queue p50 s", "queue p90 s", "tokens/s", "peak seqs", "busy seqs"]
  print(f"\n{args.requests} requests (prompt mean {p_mean:.0f}, output mean {o_mean:.0f}), "
        f"model {args.model} {workloads.MODELS[args.model]}, median of {args.repeats}; "
        f"machine: {machine} (load average {load_avg:.1f} at the start)\n")
  print("capacity (every request queued at once):")
  print(report.text_table(cols, rows))
  print("\nlatency under load (Poisson arrivals):")
  print(report.text_table(lat_cols, lat_rows))
  bs = first["bs"]
  paged = next(r for r in rows if r["strategy"] == "paged" and r["block"] == bs)
  contig = next(r for r in rows if r["strategy"] == "contiguous" and r["block"] == bs)
  lp = next(r for r in lat_rows if r["strategy"] == "paged" and r["block"] == bs)
  lc = next(r for r in lat_rows if r["strategy"] == "contiguous" and r["block"] == bs)
  ttft = report.median(first["ttft_ratio"])
  warm = ("after an untimed warm-up pass that compiles every shape"
          if not args.no_warmup else "compilation excluded")
  notes = (
      f"{args.requests} ShareGPT-like requests (log-normal lengths, prompt mean {p_mean:.0f}, "
      f"output mean {o_mean:.0f} tokens, sampled, no stop token) through the "
      f"continuous-batching engine, `{args.model}` model, float32, "
      f"`{default_implementation()}` attention, block {bs}. Both strategies get the same KV "
      f"memory ({args.slabs} contiguous slabs of {args.max_seq_len} tokens); {warm}, medians "
      f"of {args.repeats} interleaved repeats; load average {load_avg:.1f} at the start.\n\n"
      f"**Latency under load** (second table): the same requests arrive as a Poisson process "
      f"at {args.load:.2f}x the contiguous server's capacity measured in the same repeat "
      f"(median {report.median(first['rates']):.1f} requests/s), each fed to the engine with "
      "`Engine.add_request` on arrival; latencies run on a clock advanced by each engine "
      "step's measured wall time (`workloads.serve_arrivals`: idle gaps skipped, compilation "
      f"excluded; {first['compiled']} of {first['steps']} timed steps compiled). Paged p90 time "
      f"to first token {lp['TTFT p90 s']} s vs {lc['TTFT p90 s']} s (each the median over the "
      "repeats); contiguous / paged p90 TTFT within a repeat: **median "
      f"{ttft:.1f}x lower** (goal >= 2x; per repeat "
      + ", ".join(f"{x:.1f}x" for x in first["ttft_ratio"])
      + f"), p90 queueing {lp['queue p90 s']} s vs {lc['queue p90 s']} s, end-to-end p50 "
      f"{lp['E2E p50 s']} s vs {lc['E2E p50 s']} s and p90 {lp['E2E p90 s']} s vs "
      f"{lc['E2E p90 s']} s: arriving requests start at once instead of waiting for one of "
      f"{args.slabs} contiguous slots.\n\n"
      f"**Capacity** (first table): paged / contiguous throughput **{paged['vs contiguous']}** "
      "(the ratio of the median tokens/s; within each repeat "
      + ", ".join(f"{x:.2f}x" for x in first["per_repeat"]) + "), paged KV "
      f"utilisation **{paged['KV util']}** (goal >= 97%), {paged['peak seqs']} vs "
      f"{contig['peak seqs']} sequences at peak. Paged runs "
      f"{float(contig['decode steps']) / float(paged['decode steps']):.1f}x fewer decode steps "
      "(more "
      "sequences per step); whether that buys throughput depends on how much a step's cost "
      "grows with its batch (nearly linear on a small CPU, so not there; nearly flat on a "
      "GPU, where a step's fixed cost dominates).")
  print(notes)
  name = report.result_name("serving")
  markdown = (report.markdown_table(lat_cols, lat_rows)
              + f"\n\n![Latency under load: paged vs contiguous]({lat_plot})\n\n"
              + report.markdown_table(cols, rows))
  path = report.save(name, script="serving",
                     title="Serving a request mix: paged vs contiguous at equal "
                     "KV memory", markdown=markdown, notes=notes,
                     plot=plot, data={"args": vars(args), "rows": rows,
                                      "latency_rows": lat_rows, "runs": runs,
                                      "latency_plot": lat_plot})
  print(f"wrote {path}")
  return rows, lat_rows


def _figure_path(args, name):
  """Where a figure goes: ``plots/`` (committed), or ``out/`` for a ``--quick`` run."""
  folder = report.OUT_DIR if args.quick else report.PLOTS_DIR
  folder.mkdir(parents=True, exist_ok=True)
  return folder / f"{name}.png", f"{folder.name}/{name}.png"


def save_plot(results, args, block_size, cache_config, name) -> str:
  """Concurrency and utilisation over time plus throughput (the demo's figure)."""
  path, rel = _figure_path(args, name)
  workloads.save_plot(results, os.fspath(path),
                      f"{args.requests} ShareGPT-like requests, "
                      f"{cache_config.pool_bytes / 2**20:.0f} MiB KV, {args.model} model, "
                      f"block {block_size}")
  return rel


def save_latency_plot(results, args, block_size, cache_config, rate, name) -> str:
  """Latency CDFs (TTFT, end-to-end, queueing) of one repeat."""
  path, rel = _figure_path(args, name)
  workloads.save_latency_plot(results, os.fspath(path),
                              f"{args.requests} ShareGPT-like requests, Poisson arrivals at "
                              f"{rate:.1f}/s, {cache_config.pool_bytes / 2**20:.0f} MiB KV, "
                              f"{args.model} model, block {block_size}")
  return rel


if __name__ == "__main__":
  main()
