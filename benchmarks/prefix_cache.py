"""Prefix caching: many requests sharing a long system prompt, with and without the cache.

Two workloads, each served with ``enable_prefix_caching`` off and on (same requests, same
engine settings, greedy):

* **shared**: ``--requests`` requests = one ``--system``-token system prompt + a distinct
  ``--suffix``-token (mean) user suffix each;
* **distinct**: the same number of requests with no shared prefix at all (the cost of the
  index when nothing hits; goal <= 2% throughput loss).

Reported: prompt tokens actually prefilled, peak blocks held (``EngineMetrics.peak_blocks``,
cached blocks included), generated tokens/s and end-to-end requests/s (compilation excluded:
an untimed warm-up pass compiles every shape), mean time to first token, hit rate and
evictions. Goal on ``shared``: prefill tokens and peak blocks at most 1/4 of the uncached run.

    python -m benchmarks.prefix_cache [--quick] [--requests 64] [--system 1000]

Saves ``benchmarks/results/prefix_cache.json`` and its RESULTS.md section; ``--quick`` (16
requests, a 256-token system prompt) writes to ``benchmarks/out/`` instead.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from benchmarks import report
from jax_paged_kv import workloads
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine


def make_workloads(args, vocab: int) -> dict[str, list[list[int]]]:
  rng = np.random.default_rng(args.seed)
  system = rng.integers(0, vocab, args.system).tolist()
  lens = rng.integers(args.suffix // 2, 3 * args.suffix // 2 + 1, args.requests)
  shared = [system + rng.integers(0, vocab, int(n)).tolist() for n in lens]
  distinct = [rng.integers(0, vocab, len(p)).tolist() for p in shared]
  return {"shared": shared, "distinct": distinct}


def serve(params, model, cc, prompts, args, caching: bool) -> dict:
  engine = Engine(params, model, cc, enable_prefix_caching=caching, prefill_chunk=128,
                  prefill_token_budget=512, decode_steps=8, max_batch=args.max_batch,
                  batch_bucket_min=8, block_bucket_min=8, decode_width_step=8,
                  track_stats=False)
  for p in prompts:
    engine.add_request(p, SamplingParams(max_new_tokens=args.new_tokens))
  t0 = time.perf_counter()
  engine.run()
  wall = time.perf_counter() - t0
  m = engine.metrics
  outs = sorted(engine.finished.values(), key=lambda o: o.request_id)
  steady = max(wall - m.compile_seconds, 1e-9)
  return {
      "caching": caching,
      "prefill_tokens": m.prompt_tokens,
      "cached_tokens": m.cached_prompt_tokens,
      "hit_rate": m.prefix_hit_rate,
      "evicted_blocks": m.evicted_blocks,
      "peak_blocks": m.peak_blocks,
      "wall_s": wall,
      "compile_s": m.compile_seconds,
      "tokens_per_s": m.generated_tokens / steady,
      "requests_per_s": len(outs) / steady,
      "ttft_s": float(np.mean([o.first_token_time - o.arrival_time for o in outs])),
      "preemptions": m.preemptions,
      "outputs": [o.tokens for o in outs],
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="16 requests, 256-token system prompt")
  p.add_argument("--requests", type=int, default=None, help="default 64 (16 with --quick)")
  p.add_argument("--system", type=int, default=None, help="default 1000 (256 with --quick)")
  p.add_argument("--suffix", type=int, default=24, help="mean suffix tokens")
  p.add_argument("--new-tokens", type=int, default=16)
  p.add_argument("--model", choices=sorted(workloads.MODELS), default="tiny")
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--max-batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  args.requests = args.requests or (16 if args.quick else 64)
  args.system = args.system or (256 if args.quick else 1000)
  args.repeats = args.repeats or (1 if args.quick else 3)
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.expanduser("~"), ".cache", "jax_paged_kv", "xla"))
  machine = report.machine_name()
  model = workloads.model_config(args.model)
  params = init_params(model, jax.random.PRNGKey(args.seed), scale=2.0)
  loads = make_workloads(args, model.vocab_size)
  bs = args.block_size
  longest = max(len(q) for ps in loads.values() for q in ps) + args.new_tokens
  max_len = bs * -(-longest // bs)
  # Room for every request at once without sharing: the uncached run is never short of blocks.
  cc = model.cache_config(num_blocks=1 + args.requests * (max_len // bs),
                          max_seqs=args.max_batch, max_seq_len=max_len, block_size=bs)
  rows, data = [], {"args": vars(args)}
  for name, prompts in loads.items():
    for caching in (False, True):  # warm-up: compile every shape
      serve(params, model, cc, prompts, args, caching)
    runs = {False: [], True: []}
    for _ in range(args.repeats):
      for caching in (False, True):
        runs[caching].append(serve(params, model, cc, prompts, args, caching))
    assert runs[False][0]["outputs"] == runs[True][0]["outputs"], "outputs differ"
    base = {k: report.median([r[k] for r in runs[False]])
            for k in ("tokens_per_s", "requests_per_s", "ttft_s")}
    for caching in (False, True):
      rs, r0 = runs[caching], runs[caching][0]
      tps = report.median([r["tokens_per_s"] for r in rs])
      ttft = report.median([r["ttft_s"] for r in rs])
      rows.append({
          "workload": name, "prefix cache": "on" if caching else "off",
          "prefill tokens": r0["prefill_tokens"],
          "vs off": f"{r0['prefill_tokens'] / runs[False][0]['prefill_tokens']:.3f}",
          "peak blocks": r0["peak_blocks"],
          "blocks vs off": f"{r0['peak_blocks'] / runs[False][0]['peak_blocks']:.3f}",
          "hit rate": f"{100 * r0['hit_rate']:.1f}%", "evicted": r0["evicted_blocks"],
          "tokens/s": f"{tps:.0f}", "throughput vs off": f"{tps / base['tokens_per_s']:.3f}x",
          "mean TTFT s": f"{ttft:.3f}", "TTFT vs off": f"{ttft / base['ttft_s']:.3f}x",
      })
      data[f"{name}_{'on' if caching else 'off'}"] = [
          {k: v for k, v in r.items() if k != "outputs"} for r in rs]
  cols = list(rows[0])
  print(f"\n{args.requests} requests, system prompt {args.system} tokens, suffix mean "
        f"{args.suffix}, {args.new_tokens} new tokens, model {args.model}, block {bs}, median "
        f"of {args.repeats}; machine: {machine}\n")
  print(report.text_table(cols, rows))
  shared_on = next(r for r in rows if r["workload"] == "shared" and r["prefix cache"] == "on")
  distinct_on = next(r for r in rows if r["workload"] == "distinct" and r["prefix cache"] == "on")
  notes = (f"{args.requests} greedy requests through the engine, `{args.model}` model, block "
           f"{bs}, a pool with room for every request unshared. **shared**: one "
           f"{args.system}-token system prompt + a distinct suffix (mean {args.suffix} tokens) "
           f"each; **distinct**: the same lengths, no common prefix. Outputs are identical with "
           f"and without the cache (checked). Shared workload with the cache: prefill tokens "
           f"**{shared_on['vs off']}** and peak blocks **{shared_on['blocks vs off']}** of the "
           f"uncached run (goal <= 0.25 each), throughput {shared_on['throughput vs off']}, "
           f"mean time to first token {shared_on['TTFT vs off']}. No shared prefix: throughput "
           f"{distinct_on['throughput vs off']} of the uncached run (goal >= 0.98x; CPU timings "
           "on a shared machine are noisy). Peak blocks count cached (evictable) blocks too.")
  print(notes)
  path = report.save("prefix_cache", title="Prefix caching: a shared system prompt",
                     markdown=report.markdown_table(cols, rows), notes=notes, data=data,
                     directory=report.OUT_DIR if args.quick else None)
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
