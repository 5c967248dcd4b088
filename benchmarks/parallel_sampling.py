"""Parallel sampling: ``n`` samples of a prompt sharing its blocks, against ``n`` separate requests.

For each ``n`` in ``--n`` (default 1 2 4 8), ``--prompts`` prompts of ``--prompt-len`` tokens
each get ``n`` sampled continuations (temperature 1, top-p 0.95, ``--new-tokens`` each), served
two ways by engines with the same settings and a pool with room for every sequence unshared:

* **shared**: one request per prompt with ``SamplingParams(n=n)``: the prompt is prefilled once
  and the samples share its full blocks;
* **separate**: ``n`` requests per prompt with seeds ``seed .. seed + n - 1`` (what a client
  without ``n`` sends). Sample ``i`` of the shared run must equal separate request ``i``
  (checked, token for token).

Reported: prompt tokens prefilled, peak blocks held, generated tokens/s and requests' mean time
to first token in steady state (an untimed pass compiles every shape first; median of
``--repeats``, the two ways alternating), and the first pass's wall and compile seconds (the
cold start).

    python -m benchmarks.parallel_sampling [--quick] [--n 1 2 4 8] [--prompt-len 512]

Saves ``benchmarks/results/parallel_sampling.json``, ``benchmarks/plots/parallel_sampling.png``
and its RESULTS.md section (``--quick`` writes to ``benchmarks/out/`` instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from benchmarks import report
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine
from jax_paged_kv.serving.engine.metrics import compile_timer
from jax_paged_kv.workloads import MODELS, model_config


def serve(params, model, cc, prompts, n: int, shared: bool, args) -> dict:
  """One pass: every prompt's ``n`` samples, as one ``n``-sample request or ``n`` requests."""
  engine = Engine(params, model, cc, prefill_chunk=128, prefill_token_budget=512,
                  decode_steps=8, batch_bucket_min=8, decode_width_step=8, track_stats=False)
  base = SamplingParams(temperature=1.0, top_p=0.95, seed=args.seed,
                        max_new_tokens=args.new_tokens)
  for p in prompts:
    if shared:
      engine.add_request(p, dataclasses.replace(base, n=n))
    else:
      for i in range(n):
        engine.add_request(p, dataclasses.replace(base, seed=args.seed + i))
  with compile_timer() as compiling:
    t0 = time.perf_counter()
    outs = engine.run()
    wall = time.perf_counter() - t0
  m = engine.metrics
  steady = max(wall - compiling[0], 1e-9)
  return {"wall_s": wall, "compile_s": compiling[0], "prefill_tokens": m.prompt_tokens,
          "shared_tokens": m.shared_prompt_tokens, "peak_blocks": m.peak_blocks,
          "tokens_per_s": m.generated_tokens / steady,
          "ttft_s": float(np.mean([o.first_token_time - o.arrival_time for o in outs])),
          "outputs": [o.tokens for o in outs]}


def plot(rows, ns) -> str:
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  for way, style in (("separate", "o--"), ("shared", "s-")):
    rs = [next(r for r in rows if r["n"] == n and r["way"] == way) for n in ns]
    axes[0].plot(ns, [r["prefill tokens"] for r in rs], style, label=way)
    axes[1].plot(ns, [r["peak blocks"] for r in rs], style, label=way)
    axes[2].plot(ns, [float(r["tokens/s"]) for r in rs], style, label=way)
  for ax, title in zip(axes, ("prompt tokens prefilled", "peak blocks held",
                              "generated tokens/s (steady)"), strict=True):
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("samples per prompt (n)")
    ax.set_title(title)
    ax.legend()
  fig.suptitle("n samples per prompt: SamplingParams(n) vs n separate requests")
  fig.tight_layout()
  return report.save_figure(fig, "parallel_sampling")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="model tiny, n 1 4, 2 prompts, 1 repeat")
  p.add_argument("--model", choices=sorted(MODELS), default=None, help="default small")
  p.add_argument("--n", type=int, nargs="+", default=None, help="default 1 2 4 8")
  p.add_argument("--prompts", type=int, default=None, help="default 4 (2 with --quick)")
  p.add_argument("--prompt-len", type=int, default=None, help="default 512 (128 with --quick)")
  p.add_argument("--new-tokens", type=int, default=None, help="default 64 (16 with --quick)")
  p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  q = args.quick
  args.model = args.model or ("tiny" if q else "small")
  ns = args.n or ([1, 4] if q else [1, 2, 4, 8])
  args.prompts = args.prompts or (2 if q else 4)
  args.prompt_len = args.prompt_len or (128 if q else 512)
  args.new_tokens = args.new_tokens or (16 if q else 64)
  args.repeats = args.repeats or (1 if q else 3)
  model = model_config(args.model)
  params = init_params(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(args.seed)
  prompts = [rng.integers(0, model.vocab_size, args.prompt_len).tolist()
             for _ in range(args.prompts)]
  bs = args.block_size
  per_seq = -(-(args.prompt_len + args.new_tokens) // bs)
  machine = report.machine_name()
  rows, data = [], {"args": vars(args), "runs": {}}
  bar = tqdm(total=len(ns) * 2 * (1 + args.repeats), desc="parallel sampling", unit="pass")
  for n in ns:
    seqs = n * args.prompts
    cc = model.cache_config(num_blocks=1 + seqs * per_seq, max_seqs=max(8, seqs),
                            max_seq_len=per_seq * bs, block_size=bs)
    runs = {True: [], False: []}
    for _ in range(1 + args.repeats):  # the first pass of each way compiles its shapes
      for shared in (False, True):
        bar.set_postfix_str(f"n={n}, {'shared' if shared else 'separate'}")
        runs[shared].append(serve(params, model, cc, prompts, n, shared, args))
        bar.update()
    assert runs[True][0]["outputs"] == runs[False][0]["outputs"], f"n={n}: outputs differ"
    base = report.median([r["tokens_per_s"] for r in runs[False][1:]])
    for shared in (False, True):
      cold, warm = runs[shared][0], runs[shared][1:]
      tps = report.median([r["tokens_per_s"] for r in warm])
      rows.append({
          "n": n, "way": "shared" if shared else "separate",
          "prefill tokens": cold["prefill_tokens"], "peak blocks": cold["peak_blocks"],
          "blocks vs separate": f"{cold['peak_blocks'] / runs[False][0]['peak_blocks']:.2f}",
          "tokens/s": f"{tps:.0f}", "vs separate": f"{tps / base:.2f}x",
          "mean TTFT s": f"{report.median([r['ttft_s'] for r in warm]):.3f}",
          "first pass s": f"{cold['wall_s']:.2f}", "compile s": f"{cold['compile_s']:.2f}"})
      data["runs"][f"n{n}_{'shared' if shared else 'separate'}"] = [
          {k: v for k, v in r.items() if k != "outputs"} for r in runs[shared]]
  bar.close()
  columns = list(rows[0])
  print(f"\nmachine: {machine}\n")
  print(report.text_table(columns, rows))
  top = max(ns)
  sh = next(r for r in rows if r["n"] == top and r["way"] == "shared")
  sep = next(r for r in rows if r["n"] == top and r["way"] == "separate")
  notes = (
      f"Model `{args.model}` (random weights), {args.prompts} prompts of {args.prompt_len} "
      f"tokens, {args.new_tokens} sampled tokens per sample (temperature 1, top-p 0.95), block "
      f"{bs}, a pool with room for every sequence unshared, the same engine settings both ways. "
      "Sample i of `SamplingParams(n)` gave the tokens of separate request i in every run "
      f"(checked). Steady state: median of {args.repeats} passes after a compiling one, the "
      f"two ways alternating, on {machine}; first pass: the cold start. At n = {top}: "
      f"**{sh['prefill tokens']}** prompt tokens prefilled instead of {sep['prefill tokens']} "
      f"(each prompt once, plus the partial last block of each further sample), peak blocks "
      f"**{sh['blocks vs separate']}** of the separate requests', generated tokens/s "
      f"{sh['vs separate']}.")
  report.save(report.result_name("parallel_sampling"), script="parallel_sampling",
              title="Parallel sampling: SamplingParams(n) vs n separate requests",
              markdown=report.markdown_table(columns, rows), notes=notes,
              plot=plot(rows, ns), data=data)
  return 0


if __name__ == "__main__":
  main()
