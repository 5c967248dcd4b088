"""One jitted decode step of the model, paged vs contiguous cache, same model and batch.

For each batch size and context length: every row holds ``context`` tokens. The contiguous
cache gives each slot its own slab; the paged cache is measured with two table layouts:
*interleaved* (row ``b``'s ``j``-th block is ``1 + j * batch + b``, what rows that grow together
during decoding get from the free list) and *shuffled* (random permutations of the pool, the
worst case for memory locality). Both run the same jitted
:func:`~jax_paged_kv.serving.decoding.decode_step`
(cache donated, ``max_blocks`` covering the context)
and the time is the median of repeats. Goal: paged / contiguous <= 1.3.

``--fused`` adds the interleaved paged step with attention fusion
(:func:`~jax_paged_kv.fuse_write`: the decode kernel writes each layer's new K/V into its page
and attends to it in the same launch; where it cannot run, e.g. on CPU, the step falls back to
write + attend and the column equals the paged one up to noise).

    python -m benchmarks.decode_step [--quick] [--model small] [--batch 1 8 32] [--context ...]

Saves ``benchmarks/results/decode_step.json`` (``decode_step_gpu.json`` on a GPU) and the
RESULTS.md section (``benchmarks.report``).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks import report
from jax_paged_kv import CacheStrategy, allocate_sequences, fuse_write, init_cache, reserve
from jax_paged_kv.attention.api import default_implementation
from jax_paged_kv.cache.state import AllocatorState
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import decode_step
from jax_paged_kv.workloads import MODELS, model_config


def filled_cache(model, strategy, batch, context, block_size, seed=0, layout="shuffled"):
  max_seq_len = block_size * math.ceil((context + 64) / block_size)
  per_seq = math.ceil(max_seq_len / block_size)
  cc = model.cache_config(num_blocks=1 + batch * per_seq, max_seqs=batch,
                          max_seq_len=max_seq_len, block_size=block_size, strategy=strategy)
  cache = init_cache(cc)
  if strategy is CacheStrategy.PAGED:  # order the free list to get the wanted table layout
    a = cache.allocator
    stack = np.asarray(a.free_stack)
    if layout == "shuffled":
      stack = np.random.default_rng(seed).permutation(stack)
    else:  # interleaved: pop i = b * n + j must give block 1 + j * batch + b
      n = math.ceil(context / block_size)
      b, j = np.divmod(np.arange(batch * n), n)
      pops = 1 + j * batch + b
      rest = np.setdiff1d(stack, pops)
      stack = np.concatenate([rest, pops[::-1]]).astype(np.int32)  # top of the stack is last
    cache = cache.replace(allocator=AllocatorState(jnp.asarray(stack), a.num_free, a.ref_counts))
  ids = np.arange(batch, dtype=np.int32)
  cache, _ = allocate_sequences(cache, ids)
  cache, _, _ = reserve(cache, ids, context, max_new=context)
  k = jax.random.normal(jax.random.key(seed), cache.k_pool.shape, cache.k_pool.dtype)
  return cache.replace(k_pool=k, v_pool=k * 0.5), ids


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="batch 1 and 8, context 128 and 512, 7 repeats")
  p.add_argument("--model", choices=sorted(MODELS), default="small")
  p.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 8 32")
  p.add_argument("--context", type=int, nargs="+", default=None, help="default 128 512 2048")
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--repeats", type=int, default=None, help="default 20 (7 with --quick)")
  p.add_argument("--fused", action="store_true",
                 help="also time the interleaved paged step with attention fusion")
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  args.batch = args.batch or ([1, 8] if args.quick else [1, 8, 32])
  args.context = args.context or ([128, 512] if args.quick else [128, 512, 2048])
  args.repeats = args.repeats or (7 if args.quick else 20)
  model = model_config(args.model)
  params = init_params(model, jax.random.PRNGKey(0))
  machine = report.machine_name()
  rows = []
  combos = [(b, c) for b in args.batch for c in args.context]
  for batch, context in tqdm(combos, desc="decode step", unit="shape"):
    steps, first = {}, {}
    variants = [(None, CacheStrategy.CONTIGUOUS, None),
                ("interleaved", CacheStrategy.PAGED, "interleaved"),
                ("shuffled", CacheStrategy.PAGED, "shuffled")]
    if args.fused:
      variants.append(("fused", CacheStrategy.PAGED, "interleaved"))
    for name, strategy, layout in variants:
      cache, ids = filled_cache(model, strategy, batch, context, args.block_size,
                                layout=layout)
      mb = math.ceil((context + 64) / args.block_size)  # covers the appended tokens
      tokens = np.ones(batch, np.int32)
      state = {"cache": cache}

      def step(state=state, tokens=tokens, ids=ids, mb=mb, fused=name == "fused"):
        # Every call appends one token (the cache has room for repeats + warmup).
        with fuse_write("auto" if fused else False):
          state["cache"], logits, _ = decode_step(params, state["cache"], tokens, ids,
                                                  model=model, max_blocks=mb)
        return logits

      first[name] = report.first_call(step)  # the cold start: compile + one step
      report.repeat(step, repeats=0, warmup=1)
      steps[name] = step
    # Round-robin repeats: load from other processes hits all three alike.
    samples = {k: [] for k in steps}
    for _ in range(args.repeats):
      for k, step in steps.items():
        samples[k] += report.repeat(step, repeats=1, warmup=0)
    times = {k: 1e3 * report.median(v) for k, v in samples.items()}
    c_ms, i_ms, s_ms = times[None], times["interleaved"], times["shuffled"]
    rows.append({"batch": batch, "context": context, "contiguous ms": f"{c_ms:.3f}",
                 "paged ms (interleaved)": f"{i_ms:.3f}",
                 "ratio (interleaved)": f"{i_ms / c_ms:.2f}",
                 "paged ms (shuffled)": f"{s_ms:.3f}", "ratio (shuffled)": f"{s_ms / c_ms:.2f}",
                 "first call s (contiguous / paged)":
                     f"{first[None][0]:.2f} / {first['interleaved'][0]:.2f}",
                 "compile s (contiguous / paged)":
                     f"{first[None][1]:.2f} / {first['interleaved'][1]:.2f}"})
    if args.fused:
      f_ms = times["fused"]
      rows[-1].update({"fused ms (interleaved)": f"{f_ms:.3f}",
                       "fused / paged": f"{f_ms / i_ms:.2f}",
                       "fused / contiguous": f"{f_ms / c_ms:.2f}"})
  cols = ["batch", "context", "contiguous ms", "paged ms (interleaved)", "ratio (interleaved)",
          "paged ms (shuffled)", "ratio (shuffled)", "first call s (contiguous / paged)",
          "compile s (contiguous / paged)"]
  if args.fused:
    cols += ["fused ms (interleaved)", "fused / paged", "fused / contiguous"]
  print(f"\nmodel {args.model} {MODELS[args.model]}, block {args.block_size}, "
        f"median of {args.repeats}; machine: {machine}\n")
  print(report.text_table(cols, rows))
  summary = {}
  for layout in ("interleaved", "shuffled"):
    ratios = [float(r[f"ratio ({layout})"]) for r in rows]
    summary[layout] = {"median": float(np.median(ratios)), "worst": max(ratios)}
  notes = (f"One jitted `decode_step` of the `{args.model}` model "
           f"({model.num_layers} layers, {model.num_kv_heads} kv heads, head_dim "
           f"{model.head_dim}, float32, `{default_implementation()}` attention), every row "
           "holding `context` tokens, block "
           f"{args.block_size}; median of {args.repeats} round-robin repeats. Paged tables are "
           "*interleaved* (what rows growing together get from the free list) or *shuffled* "
           "(random permutation of the pool, worst locality). Paged / contiguous: interleaved "
           f"median **{summary['interleaved']['median']:.2f}** (worst "
           f"{summary['interleaved']['worst']:.2f}), shuffled median "
           f"**{summary['shuffled']['median']:.2f}** (worst {summary['shuffled']['worst']:.2f}); "
           "goal <= 1.3. Cold start: each shape's first call (compile + one step) and the JAX "
           "compile time inside it, the contiguous and the interleaved paged step (the shuffled "
           "one reuses the paged programs).")
  if args.fused:
    fp = [float(r["fused / paged"]) for r in rows]
    how = ("the fused kernel" if default_implementation() == "pallas_gpu"
           else "no fused kernel here: write + attend")
    notes += (f" With attention fusion (`fuse_write`, interleaved tables; {how}): "
              f"fused / unfused paged median **{np.median(fp):.2f}** (range {min(fp):.2f}-"
              f"{max(fp):.2f}).")
  print(notes)
  path = report.save(report.result_name("decode_step"), script="decode_step",
                     title="Decode step: paged vs contiguous cache",
                     markdown=report.markdown_table(cols, rows), notes=notes,
                     data={"model": args.model, "block_size": args.block_size,
                           "repeats": args.repeats, "rows": rows, "summary": summary})
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
