"""Block-size tuning: KV utilisation and decode-step time for block sizes 8 ... 128.

Small blocks waste less memory (a sequence's last block is on average half empty, so the waste
per sequence is about ``block_size / 2`` tokens) but give the attention more, smaller pieces to
gather; large blocks are the opposite. Measured for each block size:

* **KV utilisation** (``tokens_stored / allocated_slots`` from :func:`jax_paged_kv.cache_stats`)
  of a paged cache holding the ShareGPT-like request mix of :mod:`jax_paged_kv.demo` caught
  mid-flight: each of ``--seqs`` sequences holds its prompt plus a uniformly drawn part of its
  output, averaged over ``--snapshots`` draws. Checked against the hand count
  ``sum(len) / sum(ceil(len / block) * block)``.
* **Decode-step time** of the model's jitted :func:`jax_paged_kv.serving.decoding.decode_step` (the
  ``small`` model, XLA attention, cache donated) on ``--batch`` rows at those lengths, median of
  round-robin repeats, as a ratio to block 16 (the default) measured in the same run.

    python -m benchmarks.block_size [--quick]

Saves ``benchmarks/results/block_size.json``, ``benchmarks/plots/block_size.png`` and the
RESULTS.md section (``benchmarks.report``).
"""

from __future__ import annotations

import argparse
import math

import jax
import numpy as np
from tqdm.auto import tqdm

from benchmarks import report
from jax_paged_kv import (
  CacheConfig,
  allocate_sequences,
  cache_stats,
  check_invariants,
  init_cache,
  reserve,
)
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import decode_step
from jax_paged_kv.workloads import MODELS, model_config, sharegpt_like_lengths

BLOCK_SIZES = (8, 16, 32, 64, 128)
DEFAULT_BLOCK = 16
MAX_SEQ_LEN = 2048  # the serving benchmark's: prompts and outputs clipped to 1024 each
KERNEL_MULTIPLE = 16  # block sizes the GPU and TPU kernels take at bfloat16
STEP_SLACK = 0.10  # a block size is "as fast" if its step is within 10% of the fastest


def snapshot_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
  """``int64[n]``: ShareGPT-like requests caught at a uniform point of their generation."""
  half = MAX_SEQ_LEN // 2
  prompts, outputs = sharegpt_like_lengths(n, rng, max_prompt=half, max_output=half)
  return prompts + np.floor(rng.uniform(size=n) * (outputs + 1)).astype(np.int64)


def filled_cache(config: CacheConfig, lengths: np.ndarray):
  """A cache whose sequences ``0 .. n-1`` hold ``lengths`` tokens (reserved, nothing written)."""
  cache = init_cache(config)
  ids = np.arange(len(lengths), dtype=np.int32)
  cache, _ = allocate_sequences(cache, ids)
  # One static max_new per config: a single compilation serves every snapshot.
  cache, _, _ = reserve(cache, ids, lengths.astype(np.int32), max_new=config.max_seq_len)
  return cache, ids


def utilization(block_size: int, snapshots: list[np.ndarray]) -> dict:
  """Mean utilisation from ``cache_stats`` over the snapshots, checked against a hand count."""
  utils, hand, blocks = [], [], []
  n = len(snapshots[0])
  cfg = CacheConfig(num_layers=1, num_kv_heads=1, head_dim=8,
                    num_blocks=1 + n * math.ceil(MAX_SEQ_LEN / block_size), max_seqs=n,
                    max_seq_len=MAX_SEQ_LEN, block_size=block_size)
  for lens in snapshots:
    need = int(np.sum(-(-lens // block_size)))
    cache, _ = filled_cache(cfg, lens)
    s = cache_stats(cache)
    assert bool(check_invariants(cache).ok)
    assert int(s.used_blocks) == need and int(s.tokens_stored) == int(lens.sum())
    utils.append(float(s.utilization))
    hand.append(lens.sum() / (need * block_size))
    blocks.append(need)
  np.testing.assert_allclose(utils, hand, rtol=1e-6)  # cache_stats vs the hand count
  return {"utilization": float(np.mean(utils)), "blocks": float(np.mean(blocks)),
          "waste_tokens_per_seq": float(np.mean([(b * block_size - s.sum()) / len(s)
                                                 for b, s in zip(blocks, snapshots,
                                                                 strict=True)]))}


def step_timers(model, params, lengths: np.ndarray, block_sizes, extra: int):
  """One timed decode-step closure per block size (compiled and warmed up), and each one's
  :func:`report.first_call` (wall, compile seconds)."""
  timers, first = {}, {}
  tokens = np.ones(len(lengths), np.int32)
  for bs in tqdm(block_sizes, desc="block_size: compile", unit="block", leave=False):
    max_len = int(lengths.max()) + extra
    max_blocks = math.ceil(max_len / bs)
    cfg = model.cache_config(num_blocks=1 + int(np.sum(-(-(lengths + extra) // bs))),
                             max_seqs=len(lengths), max_seq_len=bs * max_blocks, block_size=bs)
    cache, ids = filled_cache(cfg, lengths)
    k = jax.random.normal(jax.random.key(bs), cache.k_pool.shape, cache.k_pool.dtype)
    state = {"cache": cache.replace(k_pool=k, v_pool=0.5 * k)}

    def step(state=state, ids=ids, max_blocks=max_blocks):
      # Each call appends one token per row; ``extra`` leaves room for warmup and repeats.
      state["cache"], logits, _ = decode_step(params, state["cache"], tokens, ids, model=model,
                                              max_blocks=max_blocks)
      return logits

    first[bs] = report.first_call(step)  # the cold start: compile + one step
    report.repeat(step, repeats=0, warmup=1)
    timers[bs] = step
  return timers, first


def plot(rows) -> str:
  plt = report.pyplot()
  bs = [r["block"] for r in rows]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  ax.semilogx(bs, [100 * r["utilization"] for r in rows], "o-", color="C0",
              label="KV utilisation")
  ax.set_xscale("log", base=2)
  ax.set_xticks(bs, [str(b) for b in bs])
  ax.set_xlabel("block size (tokens)")
  ax.set_ylabel("tokens stored / slots allocated [%]", color="C0")
  ax2 = ax.twinx()
  ax2.plot(bs, [r["step_ratio"] for r in rows], "s--", color="C1", label="decode step")
  ax2.set_ylabel(f"decode-step time / block {DEFAULT_BLOCK}", color="C1")
  ax.axvline(DEFAULT_BLOCK, color="gray", lw=0.8, ls=":")
  ax.set_title("block size: memory utilisation vs step time")
  ax.grid(True, alpha=0.3)
  fig.legend(loc="lower left", bbox_to_anchor=(0.12, 0.15))
  fig.tight_layout()
  return report.save_figure(fig, "block_size")


def conclusion(rows) -> tuple[int, str]:
  """The block size the measurements recommend, and why (the rule is stated in the notes)."""
  fastest = min(r["step_ms"] for r in rows)
  # Every kernel must take the block size: the TPU kernel needs a multiple of 16 for bf16 pools
  # (one packed [16, 128] tile per page) and 16 tokens is the smallest tl.dot extent of the GPU
  # kernel (block 8 needs two pages per compute step).
  eligible = [r for r in rows if r["block"] % KERNEL_MULTIPLE == 0]
  fast = [r for r in eligible if r["step_ms"] <= (1 + STEP_SLACK) * fastest]
  best = max(fast or eligible, key=lambda r: (round(r["utilization"], 3), -r["step_ms"]))
  by = {r["block"]: r for r in rows}
  d = by[DEFAULT_BLOCK]
  text = (f"Rule: among block sizes every kernel takes at bfloat16 (multiples of "
          f"{KERNEL_MULTIPLE}: the TPU kernel's packed tile, the GPU kernel's smallest `tl.dot`), "
          f"the highest utilisation whose step is within {100 * STEP_SLACK:.0f}% of the fastest "
          f"({fastest:.2f} ms). It picks **{best['block']}**"
          f"{' (the default)' if best['block'] == DEFAULT_BLOCK else ''}. Block "
          f"{DEFAULT_BLOCK} keeps {100 * d['utilization']:.1f}% of the allocated slots busy "
          f"(block 8: {100 * by[8]['utilization']:.1f}%, 32: {100 * by[32]['utilization']:.1f}%, "
          f"128: {100 * by[128]['utilization']:.1f}%; the waste is about half a block per "
          f"sequence) at {d['step_ms']:.2f} ms per step (block 8: {by[8]['step_ratio']:.2f}x, 32: "
          f"{by[32]['step_ratio']:.2f}x, 128: {by[128]['step_ratio']:.2f}x of it). At equal KV "
          "memory the sequences that fit scale with utilisation.")
  if best["block"] != DEFAULT_BLOCK:
    text += (f" On this machine the rule favours {best['block']} over the default "
             f"{DEFAULT_BLOCK}.")
  return best["block"], text


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="fewer snapshots, rows and repeats")
  p.add_argument("--model", choices=sorted(MODELS), default="small")
  p.add_argument("--seqs", type=int, default=256, help="sequences per utilisation snapshot")
  p.add_argument("--snapshots", type=int, default=None, help="default 16 (4 with --quick)")
  p.add_argument("--batch", type=int, default=None, help="decode rows, default 32 (8 quick)")
  p.add_argument("--repeats", type=int, default=None, help="default 15 (5 with --quick)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  args.snapshots = args.snapshots or (4 if args.quick else 16)
  args.batch = args.batch or (8 if args.quick else 32)
  args.repeats = args.repeats or (5 if args.quick else 15)
  rng = np.random.default_rng(args.seed)
  snapshots = [snapshot_lengths(args.seqs, rng) for _ in range(args.snapshots)]

  util = {bs: utilization(bs, snapshots)
          for bs in tqdm(BLOCK_SIZES, desc="block_size: utilisation", unit="block")}

  model = model_config(args.model)
  params = init_params(model, jax.random.PRNGKey(0))
  lengths = snapshot_lengths(args.batch, rng)
  timers, first = step_timers(model, params, lengths, BLOCK_SIZES, extra=args.repeats + 8)
  samples = {bs: [] for bs in BLOCK_SIZES}
  for _ in tqdm(range(args.repeats), desc="block_size: decode step", unit="round"):
    for bs, step in timers.items():  # round-robin: load from elsewhere hits all alike
      samples[bs] += report.repeat(step, repeats=1, warmup=0)
  step_ms = {bs: 1e3 * report.median(v) for bs, v in samples.items()}

  base = step_ms[DEFAULT_BLOCK]
  rows = [{"block": bs, **util[bs], "step_ms": step_ms[bs], "step_ratio": step_ms[bs] / base,
           "util_ratio": util[bs]["utilization"] / util[DEFAULT_BLOCK]["utilization"],
           "first_call_s": first[bs][0], "compile_s": first[bs][1]}
          for bs in BLOCK_SIZES]
  cols = ["block", "KV util", "util vs 16", "waste tokens/seq", "decode step ms",
          "step vs 16", "first call s", "compile s"]
  table = [[r["block"], f"{100 * r['utilization']:.1f}%", f"{r['util_ratio']:.3f}",
            f"{r['waste_tokens_per_seq']:.1f}", f"{r['step_ms']:.2f}",
            f"{r['step_ratio']:.2f}", f"{r['first_call_s']:.2f}", f"{r['compile_s']:.2f}"]
           for r in rows]
  print(f"\nmachine: {report.machine_name()}\n")
  print(report.text_table(cols, table))
  chosen, why = conclusion(rows)
  mean_len = float(np.mean(np.concatenate(snapshots)))
  notes = (f"Utilisation: {args.snapshots} snapshots of {args.seqs} ShareGPT-like sequences "
           f"caught mid-generation (mean length {mean_len:.0f} tokens), from `cache_stats`, "
           "checked against the hand count. Decode step: `decode_step` of the "
           f"`{args.model}` model on {args.batch} such rows, XLA attention, median of "
           f"{args.repeats} round-robin repeats; ratios against block {DEFAULT_BLOCK} in the "
           f"same run. Cold start: each block size's first decode step (compile + one step) "
           f"and the JAX compile time inside it. {why}")
  print("\n" + notes)
  path = report.save("block_size", title="Block size: KV utilisation and decode-step time",
                     markdown=report.markdown_table(cols, table), notes=notes, plot=plot(rows),
                     data={"args": vars(args), "rows": rows, "recommended": chosen})
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
