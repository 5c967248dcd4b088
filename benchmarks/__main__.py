"""Runs every CPU benchmark and regenerates ``benchmarks/RESULTS.md``.

    python -m benchmarks                 # all of them, default sizes (several minutes)
    python -m benchmarks --quick         # small sizes, well under a minute each
    python -m benchmarks --only serving  # one (repeatable: --only decode_step --only serving)
    python -m benchmarks --list

Each benchmark writes ``benchmarks/results/<name>.json`` (and its plot under
``benchmarks/plots/``); RESULTS.md is rebuilt from every saved result, so sections of benchmarks
not run this time keep their previous numbers. The GPU benchmark is separate: run
``PYTHONPATH=. python benchmarks/gpu_decode.py`` on the GPU machine; it saves into the same file.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from tqdm.auto import tqdm

from benchmarks import report

# name -> what it measures (the module benchmarks.<name> has main(argv) with --quick).
BENCHMARKS = {
    "append_scaling": "append / allocation cost vs pool size (donated vs copied)",
    "decode_step": "one decode step, paged vs contiguous cache",
    "serving": "request mix through the engine, paged vs contiguous at equal memory",
    "block_size": "KV utilisation and step time for block sizes 8..128",
    "reliability": "bad-input fuzz cases held, tests failed, soak steps, blocks leaked, mismatches",
    "kv_quant": "int8 / fp8 / int4 KV: bytes per token, capacity, attention, accuracy, serving",
    "prefix_cache": ("shared system prompt with and without prefix caching; no-hit overhead; "
                     "swap GB/s; recompute vs swap preemption"),
    "streaming": "token eviction (attention sinks + window) vs full attention: agreement, blocks",
    "sharding": "decode step on 1-8 devices, tensor / data parallel, equal per-device work",
    "engine_overhead": "engine wall time per decode step vs the jitted decode loop alone",
    "vs_transformers": "head-to-head with HF transformers: first call, warm, peak RSS, tokens",
    "sampling": "cost per decode step of each sampling feature (top-p, min-p, penalties, logprobs)",
    "parallel_sampling": "n samples per prompt sharing its blocks vs n separate requests",
    "beam_search": "beam search in one jit on shared blocks vs copied KV vs a host-driven loop",
    "speculative": "speculative decoding (prompt lookup, draft models) vs greedy decode_loop",
}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
  p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                 help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
  p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
  args = p.parse_args(argv)
  if args.list:
    for name, what in BENCHMARKS.items():
      print(f"{name:16s} {what}")
    return 0
  names = [n for n in BENCHMARKS if not args.only or n in args.only]
  print(f"machine: {report.machine_name()}; running {', '.join(names)}"
        f"{' (--quick)' if args.quick else ''}", flush=True)
  times = {}
  bar = tqdm(names, desc="benchmarks", unit="bench", position=0, dynamic_ncols=True)
  for name in bar:
    bar.set_postfix_str(name)
    tqdm.write(f"\n=== {name}: {BENCHMARKS[name]} ===")
    t0 = time.perf_counter()
    module = importlib.import_module(f"benchmarks.{name}")
    module.main(["--quick"] if args.quick else [])
    times[name] = time.perf_counter() - t0
  bar.close()
  path = report.write_results_md()
  print("\n" + "  ".join(f"{n} {t:.0f}s" for n, t in times.items()))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
