"""Prefix caching: many requests sharing a long system prompt, with and without the cache.

Two workloads, each served with ``enable_prefix_caching`` off and on (same requests, same
engine settings, greedy):

* **shared**: ``--requests`` requests = one ``--system``-token system prompt + a distinct
  ``--suffix``-token (mean) user suffix each;
* **distinct**: the same number of requests with no shared prefix at all (the cost of the
  index when nothing hits; goal <= 2% throughput loss).

Reported: prompt tokens actually prefilled, peak blocks held (``EngineMetrics.peak_blocks``,
the finished requests' cached, evictable blocks included) and peak blocks referenced by running
requests (``peak_running_blocks``), generated tokens/s and end-to-end requests/s (compilation
excluded: an untimed warm-up pass compiles every shape; median of ``--repeats``, off and on
interleaved), mean time to first token, hit rate and evictions. Goal on ``shared``: prefill
tokens and peak blocks at most 1/4 of the uncached run.

Then two preemption measurements:

* **swap throughput**: :func:`~jax_paged_kv.swap_out` / :func:`~jax_paged_kv.swap_in` of one
  sequence of a larger cache (8 layers, 8 KV heads, head_dim 128; bfloat16, float32 on CPU, and
  int8), GB/s of the blocks moved (median of 5);
* **recompute vs swap**: the ``distinct`` prompts cut to ``--preempt-prompt`` (64) tokens,
  ``--preempt-new`` (192) new tokens each, in a pool with room for about a quarter of them
  (``reserve_ratio=0``): preemptions, tokens recomputed, bytes swapped, throughput of
  ``preemption="swap"`` against ``"recompute"`` (same outputs, checked).

    python -m benchmarks.prefix_cache [--quick] [--part all|prefix|preemption] [--requests 64]

Saves ``benchmarks/results/prefix_cache.json`` and ``prefix_cache_preemption.json`` and their
RESULTS.md sections; ``--quick`` (16 requests, a 256-token system prompt) writes to
``benchmarks/out/`` instead.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

import jax_paged_kv as pk
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


_PROGRESS = None  # a tqdm bar over every engine run of main(), or None


def serve(params, model, cc, prompts, args, caching: bool, new_tokens: int | None = None,
          prefill_token_budget: int = 512, **engine_kwargs) -> dict:
  if _PROGRESS is not None:
    _PROGRESS.set_postfix_str(f"{len(prompts)} requests, cache {'on' if caching else 'off'}"
                              f"{', ' + engine_kwargs['preemption'] if engine_kwargs else ''}")
  engine = Engine(params, model, cc, enable_prefix_caching=caching, prefill_chunk=128,
                  prefill_token_budget=prefill_token_budget, decode_steps=8,
                  max_batch=args.max_batch,
                  batch_bucket_min=8, block_bucket_min=8, decode_width_step=8,
                  track_stats=False, **engine_kwargs)
  for p in prompts:
    engine.add_request(p, SamplingParams(max_new_tokens=new_tokens or args.new_tokens))
  t0 = time.perf_counter()
  engine.run()
  wall = time.perf_counter() - t0
  m = engine.metrics
  outs = sorted(engine.finished.values(), key=lambda o: o.request_id)
  steady = max(wall - m.compile_seconds, 1e-9)
  if _PROGRESS is not None:
    _PROGRESS.update(1)
  return {
      "caching": caching,
      "prefill_tokens": m.prompt_tokens,
      "cached_tokens": m.cached_prompt_tokens,
      "hit_rate": m.prefix_hit_rate,
      "evicted_blocks": m.evicted_blocks,
      "peak_blocks": m.peak_blocks,
      "peak_running_blocks": m.peak_running_blocks,
      "peak_running": m.peak_running,
      "wall_s": wall,
      "compile_s": m.compile_seconds,
      "tokens_per_s": m.generated_tokens / steady,
      "requests_per_s": len(outs) / steady,
      "ttft_s": float(np.mean([o.first_token_time - o.arrival_time for o in outs])),
      "preemptions": m.preemptions,
      "swapped_bytes": m.swapped_bytes,
      "swap_seconds": m.swap_out_seconds + m.swap_in_seconds,
      "outputs": [o.tokens for o in outs],
  }


def swap_throughput(sizes: list[int], repeats: int = 5) -> list[dict]:
  """GB/s of swap_out / swap_in of one sequence of ``sizes`` tokens (median of ``repeats``)."""
  rows = []
  # XLA:CPU updates bfloat16 arrays through float32, touching the whole pool (README, Limits):
  # float32 pools there, bfloat16 elsewhere.
  dtype = jax.numpy.float32 if jax.default_backend() == "cpu" else jax.numpy.bfloat16
  for kv_quant in (None, "int8"):
    bs = 16
    cfg = pk.CacheConfig(num_layers=8, num_kv_heads=8, head_dim=128, block_size=bs,
                         num_blocks=1 + max(sizes) // bs, max_seqs=2, max_seq_len=max(sizes),
                         dtype=dtype, kv_quant=kv_quant)
    for n in sizes:
      cache = pk.init_cache(cfg)
      cache, _ = pk.allocate_sequences(cache, np.int32(0))
      k = jax.random.normal(jax.random.PRNGKey(n), (cfg.num_layers, 1, n, 8, 128), dtype)
      cache, _ = pk.append_kv(cache, k, -k, np.int32([0]))
      outs, ins = [], []
      for _ in range(repeats + 1):  # the first round compiles
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        cache, sw = pk.swap_out(cache, 0)
        jax.block_until_ready((cache, sw.blocks))
        t1 = time.perf_counter()
        cache, _ = pk.swap_in(cache, 0, sw)
        jax.block_until_ready(cache)
        t2 = time.perf_counter()
        outs.append(t1 - t0)
        ins.append(t2 - t1)
      gb = sw.nbytes / 1e9
      rows.append({"cache": kv_quant or jax.numpy.dtype(dtype).name, "tokens": n,
                   "blocks": sw.num_blocks,
                   "MB": f"{1e3 * gb:.1f}", "memory kind": sw.memory_kind or "numpy",
                   "swap-out GB/s": f"{gb / report.median(outs[1:]):.2f}",
                   "swap-in GB/s": f"{gb / report.median(ins[1:]):.2f}"})
      del cache, sw
  return rows


def prefix_part(args, model, params, loads, machine) -> tuple[str, str, dict]:
  """The shared and distinct workloads with prefix caching off and on."""
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
    base_running = runs[False][0]["peak_running_blocks"]
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
          "peak running blocks": r0["peak_running_blocks"],
          "running vs off": f"{r0['peak_running_blocks'] / base_running:.3f}",
          "hit rate": f"{100 * r0['hit_rate']:.1f}%", "evicted": r0["evicted_blocks"],
          "tokens/s": f"{tps:.0f}", "throughput vs off": f"{tps / base['tokens_per_s']:.3f}x",
          "mean TTFT s": f"{ttft:.3f}", "TTFT vs off": f"{ttft / base['ttft_s']:.3f}x",
      })
      data[f"{name}_{'on' if caching else 'off'}"] = [
          {k: v for k, v in r.items() if k != "outputs"} for r in rs]
  distinct_pairs = [on["tokens_per_s"] / off["tokens_per_s"] for off, on in
                    zip(data["distinct_off"], data["distinct_on"], strict=True)]
  cols = list(rows[0])
  print(f"\n{args.requests} requests, system prompt {args.system} tokens, suffix mean "
        f"{args.suffix}, {args.new_tokens} new tokens, model {args.model}, block {bs}, median "
        f"of {args.repeats}; machine: {machine}\n")
  print(report.text_table(cols, rows))
  shared_on = next(r for r in rows if r["workload"] == "shared" and r["prefix cache"] == "on")
  shared_off_blocks = data["shared_off"][0]["peak_running_blocks"]
  whole = float(np.mean([-(-(len(q) + args.new_tokens) // bs) for q in loads["shared"]]))
  distinct_on = next(r for r in rows if r["workload"] == "distinct" and r["prefix cache"] == "on")
  notes = (f"{args.requests} greedy requests through the engine, `{args.model}` model, block "
           f"{bs}, a pool with room for every request unshared. **shared**: one "
           f"{args.system}-token system prompt + a distinct suffix (mean {args.suffix} tokens) "
           f"each; **distinct**: the same lengths, no common prefix. Outputs are identical with "
           f"and without the cache (checked). Shared workload with the cache: prefill tokens "
           f"**{shared_on['vs off']}** and peak blocks **{shared_on['blocks vs off']}** of the "
           f"uncached run (goal <= 0.25 each), throughput {shared_on['throughput vs off']}, "
           f"mean time to first token {shared_on['TTFT vs off']}. No shared prefix: throughput "
           f"{distinct_on['throughput vs off']} of the uncached run (median of {args.repeats}; "
           f"the repeats' on/off ratios: {', '.join(f'{x:.3f}' for x in distinct_pairs)}; goal "
           ">= 0.98x; CPU timings on a shared machine are noisy). Peak blocks count the "
           "finished requests' cached (evictable) blocks; peak running blocks only those of "
           f"running requests: **{shared_on['running vs off']}** of the uncached run. The two "
           "runs do not hold equally many requests at once: the uncached one is prefill-bound "
           f"(512 prompt tokens a step), so at its peak it holds {shared_off_blocks} blocks, "
           f"what {shared_off_blocks / whole:.1f} whole requests take ({whole:.0f} blocks "
           "each), while with the cache prefills are short and many requests decode at once, "
           "each with its own suffix blocks beside the shared system prompt.")
  print(notes)
  data["rows"] = rows
  return report.markdown_table(cols, rows), notes, data


def plot_prefix(rows, args) -> str:
  """Cache on / off ratios of the two workloads (bars; 1 = no change)."""
  plt = report.pyplot()
  metrics = [("vs off", "prefill tokens"), ("running vs off", "peak running blocks"),
             ("throughput vs off", "tokens/s"), ("TTFT vs off", "mean TTFT")]
  fig, ax = plt.subplots(figsize=(8, 3.8))
  width = 0.38
  for i, name in enumerate(("shared", "distinct")):
    on = next(r for r in rows if r["workload"] == name and r["prefix cache"] == "on")
    vals = [float(str(on[k]).rstrip("x")) for k, _ in metrics]
    xs = np.arange(len(metrics)) + (i - 0.5) * width
    bars = ax.bar(xs, vals, width, label=f"{name} prefix")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
  ax.axhline(1.0, color="k", lw=0.8)
  ax.axhline(0.25, color="C3", lw=0.8, ls="--", label="goal for tokens and blocks (0.25)")
  ax.set_xticks(np.arange(len(metrics)), [m for _, m in metrics])
  ax.set_yscale("log")
  ax.yaxis.set_major_formatter(plt.FormatStrFormatter("%g"))
  ax.yaxis.set_minor_formatter(plt.NullFormatter())
  ax.set_ylabel("prefix cache on / off")
  ax.legend(fontsize=8)
  ax.set_title(f"Prefix caching: {args.requests} requests, with / without a shared "
               f"{args.system}-token prompt")
  fig.tight_layout()
  return report.save_figure(fig, "prefix_cache")


def plot_concurrency(rows) -> str:
  """Peak running blocks against requests in flight, cache off and on, and their ratio."""
  plt = report.pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
  for on in ("off", "on"):
    rs = [r for r in rows if r["prefix cache"] == on]
    a.plot([r["running at once"] for r in rs], [r["peak running blocks"] for r in rs], "o-",
           label=f"prefix cache {on}")
  rs = [r for r in rows if r["prefix cache"] == "on"]
  b.plot([r["running at once"] for r in rs], [float(r["running blocks vs off"]) for r in rs],
         "o-", label="on / off")
  b.axhline(0.25, color="C3", lw=0.8, ls="--", label="goal 0.25")
  for ax in (a, b):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("requests in flight")
    ax.legend(fontsize=8)
  a.set_yscale("log")
  a.yaxis.set_major_formatter(plt.FormatStrFormatter("%g"))
  a.set_ylabel("peak running blocks")
  b.set_ylabel("peak blocks, cache on / off")
  fig.suptitle("Prefix caching at equal load: memory per request in flight")
  fig.tight_layout()
  return report.save_figure(fig, "prefix_cache_concurrency")


def preemption_part(args, model, params, loads, machine) -> tuple[str, str, dict]:
  """Swap throughput, then recompute vs swap preemption in the engine."""
  bs = args.block_size
  data = {"args": vars(args)}
  sizes = [256, 1024] if args.quick else [256, 1024, 4096]
  swap_rows = swap_throughput(sizes)
  print(f"\nswap throughput; machine: {machine}\n")
  print(report.text_table(list(swap_rows[0]), swap_rows))
  data["swap"] = swap_rows
  pre_prompts = [q[:args.preempt_prompt] for q in loads["distinct"]]
  per_req = -(-(args.preempt_prompt + args.preempt_new) // bs)
  pre_cc = model.cache_config(num_blocks=1 + max(per_req, len(pre_prompts) * per_req // 4),
                              max_seqs=args.max_batch, max_seq_len=per_req * bs,
                              block_size=bs)
  pre = {}
  for policy in ("recompute", "swap"):
    kw = dict(preemption=policy, watermark=0.0, reserve_ratio=0.0)
    serve(params, model, pre_cc, pre_prompts, args, False, args.preempt_new, **kw)  # warm-up
    pre[policy] = [serve(params, model, pre_cc, pre_prompts, args, False, args.preempt_new,
                         **kw) for _ in range(args.repeats)]
  assert pre["recompute"][0]["outputs"] == pre["swap"][0]["outputs"], "outputs differ"
  base_tps = report.median([r["tokens_per_s"] for r in pre["recompute"]])
  prompt_total = sum(len(q) for q in pre_prompts)
  pre_rows = []
  for policy, rs in pre.items():
    r0 = rs[0]
    tps = report.median([r["tokens_per_s"] for r in rs])
    pre_rows.append({
        "preemption": policy, "preemptions": r0["preemptions"],
        "tokens recomputed": r0["prefill_tokens"] - prompt_total,
        "MB swapped": f"{r0['swapped_bytes'] / 1e6:.2f}",
        "swap s": f"{report.median([r['swap_seconds'] for r in rs]):.3f}",
        "tokens/s": f"{tps:.0f}", "throughput vs recompute": f"{tps / base_tps:.3f}x"})
    data[f"preempt_{policy}"] = [{k: v for k, v in r.items() if k != "outputs"} for r in rs]
  print(f"\nrecompute vs swap preemption, median of {args.repeats}\n")
  print(report.text_table(list(pre_rows[0]), pre_rows))
  big = swap_rows[len(sizes) - 1]
  rec, swp = pre_rows
  notes = (f"Swap throughput (first table): one sequence of a cache with 8 layers, 8 KV heads, "
           f"head_dim 128 ({swap_rows[0]['cache']}, and int8 with its scales) swapped to "
           f"`{big['memory kind']}` memory and back (`swap_out` / `swap_in`, eager, median of "
           f"5): {big['swap-out GB/s']} GB/s out and {big['swap-in GB/s']} GB/s in for "
           f"{big['tokens']} tokens ({big['MB']} MB). On CPU the copy is a memcpy; the time is "
           "the gather / scatter of the blocks, the free / allocate and the dispatches. Second "
           f"table: {len(pre_prompts)} greedy requests, `{args.model}` model, "
           f"{args.preempt_prompt}-token prompts and {args.preempt_new} new tokens each, in a "
           "pool with room for about a quarter of them (`reserve_ratio=0`, so requests are "
           f"admitted when their prompt fits and preempted when decoding runs out of blocks). "
           f"Recompute: {rec['preemptions']} preemptions, {rec['tokens recomputed']} tokens "
           f"recomputed; swap: {swp['preemptions']} preemptions, {swp['MB swapped']} MB swapped "
           f"out and back in {swp['swap s']} s, nothing recomputed, the same outputs (checked), "
           f"throughput {swp['throughput vs recompute']} of recompute (median of "
           f"{args.repeats}).")
  print(notes)
  markdown = (report.markdown_table(list(swap_rows[0]), swap_rows) + "\n\n"
              + report.markdown_table(list(pre_rows[0]), pre_rows))
  return markdown, notes, data


def concurrency_part(args, model, params, loads, machine) -> tuple[str, str, dict]:
  """Peak blocks of the shared workload with the cache off and on at equal concurrency.

  The main table's two runs hold different numbers of requests at once (the uncached run is
  prefill-bound); here both are capped at ``max_batch`` of each of ``--concurrency`` requests
  at once, so peak blocks compare the memory of equally many running requests. For the
  requests to be in flight together, each answers ``--concurrency-new-tokens`` tokens (a chat
  answer, not the main table's short 16) and a step may prefill ``n`` prompts' worth of tokens
  (else the uncached run admits one 1,000-token prompt every two steps and holds fewer than
  ``n`` whole requests at its peak). Peak blocks come from the engine's host accounting:
  deterministic, one run each.
  """
  bs = args.block_size
  new = args.concurrency_new_tokens
  longest = max(len(q) for q in loads["shared"]) + new
  max_len = bs * -(-longest // bs)
  rows, data = [], {"args": vars(args)}
  for n in args.concurrency:
    cc = model.cache_config(num_blocks=1 + args.requests * (max_len // bs), max_seqs=n,
                            max_seq_len=max_len, block_size=bs)
    sub = argparse.Namespace(**{**vars(args), "max_batch": n})
    budget = n * (args.system + 2 * args.suffix)
    off = serve(params, model, cc, loads["shared"], sub, False, new, budget)
    on = serve(params, model, cc, loads["shared"], sub, True, new, budget)
    assert off["outputs"] == on["outputs"], "outputs differ"
    for r in (off, on):
      rows.append({"running at once": n, "prefix cache": "on" if r["caching"] else "off",
                   "peak running requests": r["peak_running"],
                   "peak blocks": r["peak_blocks"],
                   "peak running blocks": r["peak_running_blocks"],
                   "running blocks vs off":
                       f"{r['peak_running_blocks'] / off['peak_running_blocks']:.3f}",
                   "prefill tokens": r["prefill_tokens"]})
      data[f"{n}_{'on' if r['caching'] else 'off'}"] = {
          k: v for k, v in r.items() if k != "outputs"}
  own = -(-(2 * args.suffix + new) // bs)
  ratios = ", ".join(f"{r['running at once']}: **{r['running blocks vs off']}**" for r in rows
                     if r["prefix cache"] == "on")
  notes = (f"The shared workload of the table above ({args.requests} requests, one "
           f"{args.system}-token system prompt + a distinct ~{args.suffix}-token suffix, "
           f"`{args.model}` model, block {bs}, {machine}), each answering {new} tokens, with "
           "the engine capped at the same number of running requests with and without the "
           "cache (`max_batch`) and a prefill budget of that many prompts a step, so that both "
           "runs hold equally many requests: what prefix caching saves per request. With the "
           f"cache, n requests hold the system prompt's {args.system // bs} blocks once plus "
           f"their own (at most ~{own} each); without it, each holds all of them, so the ratio "
           "falls like 1/n. Peak running blocks with the cache / without, by requests at once: "
           f"{ratios} (goal <= 0.25). Outputs identical (checked).")
  data["rows"] = rows
  return report.markdown_table(list(rows[0]), rows), notes, data


def index_part(args, machine) -> tuple[str, str, dict]:
  """Host cost of the prefix index per block (hash, lookup, registration) as it grows."""
  from jax_paged_kv.serving.engine.prefix import PrefixIndex

  rng = np.random.default_rng(args.seed)
  bs, tokens = args.block_size, args.system + 2 * args.suffix
  rows = []
  for n in (64, 1024, 8192):
    index = PrefixIndex(bs, b"benchmark")
    prompts = [rng.integers(0, 32000, tokens).tolist() for _ in range(n)]
    t0 = time.perf_counter()
    for slot, t in enumerate(prompts):
      hashes = index.hashes(t, None)
      index.match(t, None, len(hashes), hashes)
      index.register(slot, t, None, len(t))
    dt = time.perf_counter() - t0
    blocks = n * (tokens // bs)
    rows.append({"requests": n, "blocks indexed": len(index.entries),
                 "us per block": f"{1e6 * dt / blocks:.2f}",
                 "ms per request": f"{1e3 * dt / n:.3f}"})
  notes = (f"The prefix index lives on the host, as vLLM's does: the engine holds the token ids "
           "there, SHA-256 is host work, and the device sees only the reference-count updates "
           f"of fork / truncate / free, each O(request). Measured here ({machine}): hashing, "
           f"looking up and registering {tokens}-token prompts ({tokens // bs} blocks of {bs}) "
           f"costs {rows[0]['us per block']} us per block with {rows[0]['blocks indexed']} "
           f"blocks indexed and {rows[-1]['us per block']} with {rows[-1]['blocks indexed']} "
           "(one dict lookup per block: nothing scans the pool or the index; the slight growth "
           "is the larger dict's cache misses), i.e. "
           f"{rows[0]['ms per request']} ms per request, small beside the prefill it saves.")
  print(report.text_table(list(rows[0]), rows))
  print(notes)
  return report.markdown_table(list(rows[0]), rows), notes, {"rows": rows}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="16 requests, 256-token system prompt")
  p.add_argument("--part", choices=("all", "prefix", "concurrency", "preemption", "index"),
                 default="all", help="run only one of the measurements")
  p.add_argument("--concurrency", type=int, nargs="+", default=[4, 8, 16, 32, 64],
                 help="running requests at once for the equal-concurrency peak blocks")
  p.add_argument("--concurrency-new-tokens", type=int, default=128,
                 help="new tokens per request in the equal-concurrency part")
  p.add_argument("--requests", type=int, default=None, help="default 64 (16 with --quick)")
  p.add_argument("--system", type=int, default=None, help="default 1000 (256 with --quick)")
  p.add_argument("--suffix", type=int, default=24, help="mean suffix tokens")
  p.add_argument("--new-tokens", type=int, default=16)
  p.add_argument("--model", choices=sorted(workloads.MODELS), default="tiny")
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--max-batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--preempt-prompt", type=int, default=64,
                 help="prompt tokens of the recompute-vs-swap run")
  p.add_argument("--preempt-new", type=int, default=None,
                 help="new tokens of the recompute-vs-swap run (default 192, 64 with --quick)")
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  args.preempt_new = args.preempt_new or (64 if args.quick else 192)
  args.requests = args.requests or (16 if args.quick else 64)
  args.system = args.system or (256 if args.quick else 1000)
  args.repeats = args.repeats or (1 if args.quick else 3)
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(os.path.expanduser("~"), ".cache", "jax_paged_kv", "xla"))
  machine = report.machine_name()
  global _PROGRESS
  from tqdm.auto import tqdm
  runs = {"prefix": 2 * (2 + 2 * args.repeats), "concurrency": 2 * len(args.concurrency),
          "preemption": 2 * (1 + args.repeats), "index": 0}
  total = sum(n for k, n in runs.items() if args.part in ("all", k))
  _PROGRESS = tqdm(total=total, desc="prefix_cache engine runs", unit="run",
                   disable=total == 0)
  model = workloads.model_config(args.model)
  params = init_params(model, jax.random.PRNGKey(args.seed), scale=2.0)
  loads = make_workloads(args, model.vocab_size)
  if args.part in ("all", "prefix"):
    markdown, notes, data = prefix_part(args, model, params, loads, machine)
    path = report.save("prefix_cache", title="Prefix caching: a shared system prompt",
                       markdown=markdown, notes=notes, data=data,
                       plot=plot_prefix(data["rows"], args))
    print(f"wrote {path}")
  if args.part in ("all", "concurrency"):
    markdown, notes, data = concurrency_part(args, model, params, loads, machine)
    path = report.save("prefix_cache_concurrency",
                       title="Prefix caching: peak blocks at equal concurrency",
                       markdown=markdown, notes=notes, data=data, script="prefix_cache",
                       plot=plot_concurrency(data["rows"]))
    print(f"wrote {path}")
  if args.part in ("all", "index"):
    markdown, notes, data = index_part(args, machine)
    path = report.save("prefix_cache_index", title="Prefix caching: the host index's cost",
                       markdown=markdown, notes=notes, data=data, script="prefix_cache")
    print(f"wrote {path}")
  if args.part in ("all", "preemption"):
    markdown, notes, data = preemption_part(args, model, params, loads, machine)
    path = report.save("prefix_cache_preemption", title="Preemption: recompute vs swap",
                       markdown=markdown, notes=notes, data=data, script="prefix_cache")
    print(f"wrote {path}")

if __name__ == "__main__":
  main()
