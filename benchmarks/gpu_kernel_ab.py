"""A/B timing of our GPU kernel's variants on the ANCHORS decode shapes, in one short run.

Each variant is a knob dict for :func:`jax_paged_kv.attention.pallas_gpu.paged_attention_gpu`
(the default knobs are variant ``default``). Every variant is first checked against the XLA
reference on the same inputs, then all variants are timed round-robin (``--rounds`` rounds of a
median over ``--repeats`` samples of ``--inner`` back-to-back calls), so drift on the machine hits
them alike. Reported: median time per call, fraction of the copy ceiling, and time relative to
``default`` measured in the same run.

    PYTHONPATH=. python benchmarks/gpu_kernel_ab.py                       # the built-in variants
    PYTHONPATH=. python benchmarks/gpu_kernel_ab.py --variant '{"num_stages": 2}'
    PYTHONPATH=. python benchmarks/gpu_kernel_ab.py --interpret --tiny    # CPU smoke test

On a GPU it saves ``benchmarks/results/gpu_kernel_ab.json`` (GPU section of RESULTS.md); smoke
runs write ``benchmarks/out/`` only.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks import report
from benchmarks.gpu_decode import Config, copy_ceiling, make_inputs, max_err, time_fn
from jax_paged_kv.attention import pallas_gpu
from jax_paged_kv.attention.reference import paged_attention_xla

# The built-in comparison. The first H100 run (results/gpu_kernel_ab.json) also timed a
# `prefetch_tables` variant that carried the next step's table entries through the loop: it was
# 3-4% slower (Triton's pipeliner already hides the dependent lookup) and was removed.
VARIANTS = {
    "default": {},
    "2 stages": {"num_stages": 2},
    "block_k 64": {"block_k": 64},
}


def configs(tiny: bool) -> list[Config]:
  if tiny:
    return [Config("B2 L64", (64,) * 2, 16, q_heads=8, kv_heads=2, head_dim=64)]
  return [Config(f"B{b} L{n}", (n,) * b, 16) for b, n in ((32, 2048), (8, 8192), (128, 512))]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--interpret", action="store_true")
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--variant", action="append", default=[],
                 help="extra variant as a JSON knob dict (repeatable)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--inner", type=int, default=None)
  args = p.parse_args(argv)
  slow = args.interpret or args.tiny
  args.repeats = args.repeats or (2 if slow else 7)
  args.inner = args.inner or (1 if slow else 10)
  if not args.interpret and jax.default_backend() not in pallas_gpu.GPU_BACKENDS:
    sys.exit("no GPU backend: run on a GPU machine, or pass --interpret --tiny")
  variants = dict(VARIANTS)
  for v in args.variant:
    variants[v] = json.loads(v)
  t0 = time.perf_counter()

  def log(msg):
    print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

  ceiling = copy_ceiling(args.tiny, args)
  log(f"{report.machine_name()}; copy ceiling {ceiling / 1e9:.0f} GB/s")
  rows, raw = [], []
  for cfg in configs(args.tiny):
    x = make_inputs(cfg, jnp.bfloat16)
    call_args = (x.q, x.k_pool, x.v_pool, x.layer, x.tables, x.kv_lens, x.q_lens)
    want = jax.jit(functools.partial(paged_attention_xla, scale=x.scale))(
        *(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in call_args))
    fns, errs = {}, {}
    for name, knobs in variants.items():
      f = jax.jit(functools.partial(pallas_gpu.paged_attention_gpu, scale=x.scale,
                                    interpret=args.interpret, **knobs))
      errs[name] = max_err(f(*call_args), want)
      fns[name] = functools.partial(f, *call_args)
    samples = {name: [] for name in variants}
    for _ in range(args.rounds):
      for name, fn in fns.items():
        t, _ = time_fn(fn, jax.block_until_ready, warmup=2, repeats=args.repeats,
                       inner=args.inner)
        samples[name].append(t)
    base = statistics.median(samples["default"])
    for name in variants:
      t = statistics.median(samples[name])
      ok = errs[name] <= 3e-2
      rows.append({"config": cfg.name, "variant": name, "us": f"{t * 1e6:.1f}",
                   "fraction of copy": f"{x.kv_bytes / t / ceiling:.2f}",
                   "vs default": f"{t / base:.3f}", "correct": "yes" if ok else "NO"})
      raw.append({"config": cfg.name, "variant": name, "knobs": variants[name],
                  "samples_s": samples[name], "max_err": errs[name]})
      verdict = "ok" if ok else f"WRONG (max err {errs[name]:.3g})"
      log(f"{cfg.name} {name:>20}: {t * 1e6:8.1f} us  {t / base:.3f}x default  {verdict}")
  cols = ["config", "variant", "us", "fraction of copy", "vs default", "correct"]
  print(report.text_table(cols, rows))
  notes = (f"Our kernel's variants on the ANCHORS decode shapes (bfloat16, 32/8 heads, head_dim "
           f"128, block 16, random page permutations), timed round-robin: median of "
           f"{args.rounds} rounds x {args.repeats} samples x {args.inner} calls. 'vs default' < 1 "
           f"is faster than the default knobs in the same run. Copy ceiling "
           f"{ceiling / 1e9:.0f} GB/s." + (" INTERPRET MODE: not performance." if slow else ""))
  path = report.save("gpu_kernel_ab_interpret" if slow else "gpu_kernel_ab",
                     title="GPU kernel variants (A/B)", markdown=report.markdown_table(cols, rows),
                     notes=notes, data={"rows": raw, "variants": variants},
                     directory=report.OUT_DIR if slow else None)
  log(f"wrote {path}")
  if any(r["correct"] == "NO" for r in rows):
    sys.exit(1)


if __name__ == "__main__":
  main()
