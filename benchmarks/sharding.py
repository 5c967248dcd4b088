"""One decode step on 1, 2, 4, 8 devices, tensor and data parallel, at equal per-device work.

Per device there is always the same work: a Llama-style model with ``--heads-per-device`` query
and ``--kv-per-device`` KV heads of ``--head-dim``, a ``--hidden``-wide residual and an MLP of
``--mlp-per-device`` columns, and a paged cache of ``--batch`` rows of ``--context`` tokens.

* **Tensor parallel** on ``n`` devices: one model ``n`` times wider (heads and MLP columns
  times ``n``), split over the devices (:func:`jax_paged_kv.sharding.param_shardings`), one
  cache split over kv heads; the batch stays ``--batch``. The sharded program adds the two
  all-reduces per layer and runs attention per heads shard.
* **Data parallel** on ``n`` devices: ``n`` copies of the one-device model, ``n`` independent
  caches (:func:`jax_paged_kv.sharding.map_shards`), a batch of ``--batch`` rows on each.

Each call is one :func:`jax_paged_kv.decode_step` (``decode_loop``'s body: append one token to
every row, attend, logits) of the whole mesh, jitted with the cache donated; the time is the
median of round-robin repeats. Reported: the time relative to one device running its share
alone (the ratio a machine with a core per device would show as overhead) and, since a CPU
mesh shares its cores, that ratio divided by ``n / min(n, cores)``, the slowdown an ideal
sharded program would show on this machine's cores; and the bytes each device holds (cache and
weights). On a 2-core CPU this measures the sharded program's cost, not a speedup.

    python -m benchmarks.sharding [--quick] [--devices 1 2 4 8] [--context 256]

On CPU it runs with 8 virtual devices (``JAX_NUM_CPU_DEVICES=8``; it restarts itself with
that setting when JAX already started with fewer). On a GPU/TPU machine it takes the devices it
has (``benchmarks/gpu_session.sh``). Saves ``benchmarks/results/sharding.json``
(``sharding_gpu`` on a GPU) and the RESULTS.md section; ``--quick`` writes to ``benchmarks/out``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import subprocess
import sys

import jax
import numpy as np
from tqdm.auto import tqdm

from benchmarks import report
from jax_paged_kv import allocate_sequences, init_cache, reserve
from jax_paged_kv import sharding as shd
from jax_paged_kv.attention import default_implementation
from jax_paged_kv.models import LlamaConfig, init_params
from jax_paged_kv.serving.decoding import decode_step

CPU_DEVICES = 8


def model_for(args, n: int) -> LlamaConfig:
  """The model whose share on each of ``n`` tensor-parallel devices is the one-device model."""
  return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                     intermediate_size=args.mlp_per_device * n, num_layers=args.layers,
                     num_heads=args.heads_per_device * n, num_kv_heads=args.kv_per_device * n,
                     head_dim=args.head_dim)


def filled_cache(model: LlamaConfig, args, seed: int):
  """A cache of ``batch`` rows holding ``context`` random tokens each, room to grow."""
  bs = args.block_size
  max_len = bs * math.ceil((args.context + args.steps + 8) / bs)
  cc = model.cache_config(num_blocks=1 + args.batch * (max_len // bs), max_seqs=args.batch,
                          max_seq_len=max_len, block_size=bs)
  cache = init_cache(cc)
  ids = np.arange(args.batch, dtype=np.int32)
  cache, _ = allocate_sequences(cache, ids)
  cache, _, _ = reserve(cache, ids, args.context, max_new=args.context)
  k = jax.random.normal(jax.random.key(seed), cache.k_pool.shape, cache.k_pool.dtype)
  return cache.replace(k_pool=k, v_pool=0.5 * k), ids


def setup(args, layout_name: str, n: int):
  """``(step, bytes per device)`` for one layout on ``n`` devices; ``step()`` runs one step."""
  devices = jax.devices()[:n]
  if layout_name == "tensor":
    model = model_for(args, n)
    mesh = shd.local_mesh(model=n, data=1, devices=devices)
    layout = shd.MeshLayout(mesh, model_axis="model")
    cache, ids = filled_cache(model, args, 0)
    cache = shd.place_cache(cache, layout)
    tokens = np.ones(args.batch, np.int32)
  else:
    model = model_for(args, 1)
    mesh = shd.local_mesh(model=1, data=n, devices=devices)
    layout = shd.MeshLayout(mesh, data_axis="data")
    caches = [filled_cache(model, args, s) for s in range(n)]
    cache = shd.place_cache([c for c, _ in caches], layout)
    ids = np.stack([i for _, i in caches])
    tokens = np.ones((n, args.batch), np.int32)
  params = init_params(model, jax.random.PRNGKey(0))
  params = jax.device_put(params, shd.param_shardings(params, model, layout))
  fn = shd.on_mesh(functools.partial(decode_step, model=model), layout, shared_argnums=(0,))
  run = jax.jit(fn, donate_argnums=1)
  state = {"cache": cache}

  def step():
    state["cache"], logits, _ = run(params, state["cache"], tokens, ids)
    return logits

  held = shd.device_bytes(cache)
  weights = shd.device_bytes(params)
  return step, max(held.values()), max(weights.values())


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="context 128, 5 repeats")
  p.add_argument("--devices", type=int, nargs="+", default=None,
                 help="device counts (default: 1 2 4 8, capped at the devices there are)")
  p.add_argument("--batch", type=int, default=8, help="rows per cache (per data shard)")
  p.add_argument("--context", type=int, default=None, help="tokens per row (default 512)")
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--heads-per-device", type=int, default=4)
  p.add_argument("--kv-per-device", type=int, default=2)
  p.add_argument("--head-dim", type=int, default=64)
  p.add_argument("--mlp-per-device", type=int, default=512)
  p.add_argument("--vocab", type=int, default=1024)
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--repeats", type=int, default=None, help="default 15 (5 with --quick)")
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  argv = sys.argv[1:] if argv is None else list(argv)
  if jax.default_backend() == "cpu" and jax.device_count() < CPU_DEVICES:
    # JAX started with fewer CPU devices (e.g. under `python -m benchmarks`): run again.
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(CPU_DEVICES))
    return subprocess.run([sys.executable, "-m", "benchmarks.sharding", *argv], env=env,
                          check=True).returncode
  args.context = args.context or (128 if args.quick else 512)
  args.repeats = args.repeats or (5 if args.quick else 15)
  args.steps = args.repeats + 4  # every call appends a token
  counts = [n for n in (args.devices or [1, 2, 4, 8]) if n <= jax.device_count()]
  cores = os.cpu_count() or 1
  cpu = jax.default_backend() == "cpu"
  runs = [("one device", 1)] + [(name, n) for n in counts if n > 1
                                for name in ("tensor", "data")]
  steps, held, first = {}, {}, {}
  for name, n in tqdm(runs, desc="sharding: compile", unit="layout"):
    step, cache_bytes, weight_bytes = setup(args, "tensor" if n == 1 else name, n)
    first[(name, n)] = report.first_call(step)  # the cold start: compile + one step
    report.repeat(step, repeats=0, warmup=1)
    steps[(name, n)] = step
    held[(name, n)] = (cache_bytes, weight_bytes)
  samples = {k: [] for k in steps}
  for _ in tqdm(range(args.repeats), desc="sharding: time", unit="round"):
    for k, step in steps.items():  # round-robin: load from other processes hits all alike
      samples[k] += report.repeat(step, repeats=1, warmup=0)
  times = {k: 1e3 * report.median(v) for k, v in samples.items()}
  base = times[("one device", 1)]
  rows, data = [], []
  for (name, n), ms in times.items():
    ratio = ms / base
    share = n / min(n, cores) if cpu else 1.0
    cache_b, weight_b = held[(name, n)]
    rows.append({"layout": name, "devices": n, "step ms": f"{ms:.2f}",
                 "vs one device": f"{ratio:.2f}",
                 f"vs ideal on {cores if cpu else n} cores": f"{ratio / share:.2f}",
                 "cache MiB / device": f"{cache_b / 2**20:.2f}",
                 "weights MiB / device": f"{weight_b / 2**20:.2f}",
                 "first call s": f"{first[(name, n)][0]:.2f}",
                 "compile s": f"{first[(name, n)][1]:.2f}"})
    data.append({"layout": name, "devices": n, "ms": ms, "ratio": ratio,
                 "first_call_s": first[(name, n)][0], "compile_s": first[(name, n)][1],
                 "ratio_vs_ideal": ratio / share, "cache_bytes_per_device": cache_b,
                 "weight_bytes_per_device": weight_b})
  cols = list(rows[0])
  print(f"\n{report.machine_name()}; median of {args.repeats} round-robin repeats\n")
  print(report.text_table(cols, rows))
  worst = {lay: max([d["ratio_vs_ideal"] for d in data if d["layout"] == lay] or [1.0])
           for lay in ("tensor", "data")}
  model = model_for(args, 1)
  notes = (
      f"One jitted `decode_step` of the whole mesh at equal per-device work: per device "
      f"{model.num_heads} query / {model.num_kv_heads} kv heads of {model.head_dim}, hidden "
      f"{model.hidden_size}, MLP {model.intermediate_size}, {args.layers} layers, "
      f"{args.batch} rows of {args.context} tokens (float32, `{default_implementation()}` "
      "attention). Tensor parallel "
      "on n devices: a model n times wider, one cache split over kv heads; data parallel: n "
      "independent caches and model copies. *vs one device*: step time over one device's alone. "
      + (f"This CPU has {cores} cores for {max(counts)} virtual devices, so n devices' work "
         f"takes at least n / min(n, {cores}) times as long; *vs ideal* divides that out and is "
         "the sharded program's own overhead. " if cpu else "")
      + f"Worst overhead: tensor parallel **{worst['tensor']:.2f}x**, data parallel "
      f"**{worst['data']:.2f}x**. Cache bytes per device stay those of one device's share in "
      "both layouts; tensor parallel also splits the weights (embedding and LM head "
      "replicated). Cold start: each layout's first step (compile + one step) and the JAX "
      "compile time inside it (a mesh of n devices compiles one SPMD program).")
  if cpu:
    load = os.getloadavg()[0]
    notes += (f" Load average at the end of the run: {load:.1f} on {cores} cores (other "
              "processes share the cores; the round-robin repeats expose every layout to it "
              "alike).")
  print(notes)
  path = report.save(report.result_name("sharding"), script="sharding",
                     title="Multi-device decode step: tensor and data parallel",
                     markdown=report.markdown_table(cols, rows), notes=notes,
                     data={"args": vars(args), "rows": data})
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
