"""GPU paged-attention benchmark: our Pallas kernel against the peers, in one run.

Checks every implementation against the XLA reference, then times, side by side in the same run
and on the same data:

* ``ours``: ``jax_paged_kv.attention.pallas_gpu.paged_attention_gpu`` (default knobs);
* ``ours_mgpu``: ``jax_paged_kv.attention.pallas_mgpu.paged_attention_mgpu``, the Mosaic GPU
  kernel (TMA + wgmma; bf16 / f16 pools on sm90+; default knobs; with ``--sweep`` also a few
  of its knob variants as ``mgpu_sweep``);
* ``ours_int8`` / ``ours_fp8``: the same kernel on int8 / float8_e4m3fn pools
  (``CacheConfig(kv_quant=...)``; int8: K scales per (block, channel), V per (token, KV head);
  fp8: float32 scales per (token, KV head)); the pools are quantised once, outside the timing.
  Correct means a relative L2 error against the unquantised reference within the README's
  bounds (1.5e-2 / 6e-2); goal: int8 decode <= 0.6x the bf16 time; with ``--sweep-quant
  int8,fp8`` also the knob grid of ``--sweep`` on those pools (``int8_sweep`` / ``fp8_sweep``:
  the bf16 sweep found nothing above 8%, but a tile of half the bytes may want other knobs);
* ``jax_pallas``: JAX's ``jax.experimental.pallas.ops.gpu.paged_attention`` (best of k_splits
  8/16 x pages_per_compute_block 4/8; its layout is one layer ``[kv_heads, pages, page_size,
  head_dim]`` and q must be pre-scaled, both prepared outside the timing; decode only);
* ``xla_gather``: our XLA reference (gather the pages to a dense copy, then attend);
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on a contiguous copy;
* ``torch_sdpa``: torch ``scaled_dot_product_attention`` on a contiguous copy (optional);
* ``copy``: the device's copy ceiling (read + write of a ~2 GiB array), and beside it a
  read-only reference (a float32 sum of the same array). Decode attention mostly reads, and
  reads stream faster than a read + write mix, so a kernel can pass 1.0 of the copy figure
  (torch SDPA reached up to 1.17 of it on an H200): the copy figure is the goal's yardstick,
  not the hardware's limit; ``fraction_read`` in the raw rows is the share of the read one.

Reports the median time per call (after warmup; each sample times ``--inner`` back-to-back
calls ended by one ``block_until_ready``), the effective bandwidth (KV bytes read / time) and
the fraction of the copy ceiling. The bytes are the useful ones, the same for every
implementation: K and V of the tokens attended (plus a quantised pool's scales). Not counted:
the unused tail of a row's last page (only ``mixed`` has one: 0.35% of its KV bytes at 16-token
pages, 1.6% at 64), and q plus the output (0.05-0.8% of the KV bytes for the decode configs;
as much again as the KV for ``prefill``, which is compute bound and reports TFLOP/s too). So a
fraction is a lower bound on the traffic a kernel moves, and the ratios between
implementations do not depend on the convention.

Prints a table and saves through :mod:`benchmarks.report`: on a GPU,
``benchmarks/results/gpu_decode.json`` plus the GPU section of ``benchmarks/RESULTS.md``; in
interpret mode (or with ``--tiny``) ``benchmarks/out/gpu_decode_interpret.json`` only, so a CPU
smoke run never replaces the GPU numbers. ``--out PATH`` also writes the raw summary there.

Usage (GPU machine, from the checkout)::

    PYTHONPATH=. python benchmarks/gpu_decode.py
    PYTHONPATH=. python benchmarks/gpu_decode.py --sweep     # also time a grid of our knobs

CPU smoke test (interpret mode, tiny shapes; times are meaningless there)::

    PYTHONPATH=. python benchmarks/gpu_decode.py --interpret --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave room for torch

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import report  # noqa: E402
from jax_paged_kv.attention import pallas_gpu, pallas_mgpu  # noqa: E402
from jax_paged_kv.attention.reference import paged_attention_xla  # noqa: E402

GOALS = "H100 goals: >= 0.85 of copy, >= 1.5x JAX Pallas, faster than cuDNN, <= 1.15x torch"


@dataclasses.dataclass(frozen=True)
class Config:
  name: str
  lengths: tuple[int, ...]  # kv length per row (after the new tokens)
  block_size: int
  q_len: int = 1
  q_heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128

  @property
  def batch(self):
    return len(self.lengths)


def make_configs(tiny: bool) -> list[Config]:
  rng = np.random.default_rng(0)
  if tiny:
    shapes = [(2, 64), (4, 32)]
    mixed = tuple(int(n) for n in rng.integers(1, 200, size=4))
    heads = dict(q_heads=8, kv_heads=2, head_dim=64)
    prefill = dict(lengths=(96, 64), q_len=32)
    block_sizes = (16,)
  else:
    shapes = [(32, 2048), (8, 8192), (128, 512), (64, 1024)]
    mixed = tuple(int(n) for n in rng.integers(1, 4097, size=48))
    heads = {}
    prefill = dict(lengths=(2048,) * 4, q_len=512)  # a 512-token chunk after 1536 cached
    block_sizes = (16, 64)
  out = []
  for bs in block_sizes:
    for b, n in shapes:
      out.append(Config(f"B{b} L{n}", (n,) * b, bs, **heads))
    out.append(Config(f"mixed B{len(mixed)}", mixed, bs, **heads))
    out.append(Config(f"prefill B{len(prefill['lengths'])} T{prefill['q_len']}", block_size=bs,
                      **prefill, **heads))
  return out


@dataclasses.dataclass
class Inputs:
  q: jax.Array  # [batch, q_len, q_heads, head_dim]
  k_pool: jax.Array  # [layers, kv_heads, num_blocks, block_size, head_dim]
  v_pool: jax.Array
  layer: jax.Array  # int32[]
  tables: jax.Array  # int32[batch, max_blocks]
  kv_lens: jax.Array  # int32[batch]
  q_lens: jax.Array  # int32[batch]
  scale: float
  kv_bytes: int  # K and V bytes the attention must read
  flops: int


def make_inputs(cfg: Config, dtype, seed=0) -> Inputs:
  bs = cfg.block_size
  lengths = np.array(cfg.lengths, np.int32)
  max_blocks = int(-(-lengths.max() // bs))
  blocks = -(-lengths // bs)
  num_blocks = 1 + int(blocks.sum())
  rng = np.random.default_rng(seed)
  perm = rng.permutation(np.arange(1, num_blocks))
  tables = np.zeros((cfg.batch, max_blocks), np.int32)  # unused entries: null block 0
  start = 0
  for r, nb in enumerate(blocks):
    tables[r, :nb] = perm[start:start + nb]
    start += nb
  key = jax.random.key(seed)
  kq, kk, kv = jax.random.split(key, 3)
  shape = (2, cfg.kv_heads, num_blocks, bs, cfg.head_dim)  # layer 1 is the one we read
  k_pool = jax.random.normal(kk, shape, dtype)
  v_pool = jax.random.normal(kv, shape, dtype)
  q = jax.random.normal(kq, (cfg.batch, cfg.q_len, cfg.q_heads, cfg.head_dim), dtype)
  itemsize = jnp.dtype(dtype).itemsize
  kv_bytes = int(lengths.sum()) * cfg.kv_heads * cfg.head_dim * 2 * itemsize
  seen = sum(sum(int(n) - cfg.q_len + i + 1 for i in range(cfg.q_len)) for n in lengths)
  flops = 4 * seen * cfg.q_heads * cfg.head_dim
  return Inputs(q, k_pool, v_pool, jnp.int32(1), jnp.asarray(tables), jnp.asarray(lengths),
                jnp.full((cfg.batch,), cfg.q_len, jnp.int32), cfg.head_dim ** -0.5, kv_bytes,
                flops)


def dense_kv(x: Inputs):
  """Contiguous ``[batch, S, kv_heads, head_dim]`` copies of layer 1 (made once, not timed)."""
  from jax_paged_kv.attention.reference import gather_kv

  k = gather_kv(x.k_pool, x.layer, x.tables)
  v = gather_kv(x.v_pool, x.layer, x.tables)
  return k, v


def time_fn(fn, sync, *, warmup, repeats, inner):
  """Median seconds per call; each sample runs ``inner`` calls back to back."""
  out = None
  for _ in range(warmup):
    out = fn()
  sync(out)
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = fn()
    sync(out)
    samples.append((time.perf_counter() - t0) / inner)
  return statistics.median(samples), out


def jax_sync(out):
  jax.block_until_ready(out)


def max_err(got, want) -> float:
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  if got.shape != want.shape:
    return float("inf")
  if np.isnan(got).any():
    return float("nan")
  return float(np.abs(got - want).max())


# ---- implementations: each returns (callable, sync, note) or raises Skip -------------------


class Skip(Exception):
  pass


def impl_ours(x: Inputs, interpret: bool, **knobs):
  f = jax.jit(functools.partial(pallas_gpu.paged_attention_gpu, scale=x.scale,
                                interpret=interpret, **knobs))
  args = (x.q, x.k_pool, x.v_pool, x.layer, x.tables, x.kv_lens, x.q_lens)
  return (lambda: f(*args)), jax_sync, ""


def impl_mgpu(x: Inputs, interpret: bool, **knobs):
  """The Mosaic GPU kernel, or Skip with the reason it cannot run here."""
  if os.environ.get("GPU_DECODE_NO_MGPU"):  # set by gpu_session.sh when its tests hung
    raise Skip(f"GPU_DECODE_NO_MGPU={os.environ['GPU_DECODE_NO_MGPU']}")
  try:
    pallas_mgpu.check_supported(x.k_pool.dtype, x.k_pool.shape[3], x.k_pool.shape[4])
  except ValueError as e:
    raise Skip(str(e).split(";")[0]) from e
  if not interpret:
    cap = getattr(jax.devices()[0], "compute_capability", None)
    if cap is None or float(cap) < 9.0:
      raise Skip(f"needs an sm90+ NVIDIA GPU (compute capability {cap})")
  f = jax.jit(functools.partial(pallas_mgpu.paged_attention_mgpu, scale=x.scale,
                                interpret=interpret, **knobs))
  args = (x.q, x.k_pool, x.v_pool, x.layer, x.tables, x.kv_lens, x.q_lens)
  return (lambda: f(*args)), jax_sync, ""


def mgpu_sweep_grid(knobs: dict, ws_knobs: dict | None = None) -> list[dict]:
  """Variants of the Mosaic GPU kernel's default knobs (``--sweep``): with ``ws_knobs`` (the
  warp-specialised defaults) first those, with twice and half the splits, and with two stages;
  then smaller steps or other splits of the one-warpgroup kernel."""
  ks = knobs["k_splits"]
  grid = [dict(block_k=64, num_stages=2), dict(block_k=64, num_stages=4),
          dict(k_splits=max(1, ks // 2)), dict(k_splits=ks * 2), dict(k_splits=ks * 4)]
  variants = []
  if ws_knobs is not None:  # first: never timed yet, while the budget lasts
    wks = ws_knobs["k_splits"]
    variants += [ws_knobs | g for g in (
        {}, dict(k_splits=wks * 2), dict(k_splits=max(1, wks // 2)), dict(num_stages=2))]
  variants += [knobs | g for g in grid]
  out, seen = [], {tuple(sorted(knobs.items()))}
  for kn in variants:
    if tuple(sorted(kn.items())) not in seen:
      seen.add(tuple(sorted(kn.items())))
      out.append(kn)
  return out


def quantized_inputs(x: Inputs, kv_quant: str) -> tuple[Inputs, dict]:
  """``x`` with int8 / fp8 pools, and the scales (made once, not timed)."""
  from jax_paged_kv.cache import quant

  vq, vs = quant.quantize(x.v_pool, kv_quant)
  d, bs = x.k_pool.shape[-1], x.k_pool.shape[-2]
  if quant.channel_k_scales(kv_quant):  # int8 K: a bfloat16 scale per (block, channel)
    kq, ks = quant.quantize_blocks_k(x.k_pool, kv_quant)
    k_scale_bytes = 2 * d / bs
  else:
    kq, ks = quant.quantize(x.k_pool, kv_quant)
    k_scale_bytes = 4
  per_token = x.kv_bytes // (2 * jnp.dtype(x.k_pool.dtype).itemsize * d)  # (token, head) pairs
  kv_bytes = int(per_token * (2 * d * kq.dtype.itemsize + k_scale_bytes + 4))
  return dataclasses.replace(x, k_pool=kq, v_pool=vq, kv_bytes=kv_bytes), dict(k_scale=ks,
                                                                             v_scale=vs)


def rel_l2(got, want) -> float:
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


QUANT_TOL = {"int8": 1.5e-2, "fp8": 6e-2}  # relative L2 (README: quantised KV cache)


def impl_xla(x: Inputs, interpret: bool):
  del interpret
  f = jax.jit(functools.partial(paged_attention_xla, scale=x.scale))
  args = (x.q, x.k_pool, x.v_pool, x.layer, x.tables, x.kv_lens, x.q_lens)
  return (lambda: f(*args)), jax_sync, ""


def jax_pallas_variants(x: Inputs, interpret: bool):
  """JAX's paged kernel for each (k_splits, pages_per_compute_block); decode only."""
  if x.q.shape[1] != 1:
    raise Skip("decode only (no q_len > 1)")
  try:
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa
  except ImportError as e:
    raise Skip(f"not importable: {e}") from e
  k_pages = x.k_pool[1]  # [kv_heads, pages, page_size, head_dim]: its one-layer layout
  v_pages = x.v_pool[1]
  q = (x.q[:, 0].astype(jnp.float32) * x.scale).astype(x.q.dtype)  # it wants q pre-scaled
  out = []
  for ks in (8, 16):
    for ppcb in (4, 8):
      width = x.tables.shape[1]
      width = -(-width // (ks * ppcb)) * ks * ppcb  # divisibility it asserts; pad with null
      tables = jnp.pad(x.tables, ((0, 0), (0, width - x.tables.shape[1])))
      f = jax.jit(functools.partial(jpa.paged_attention, k_splits=ks,
                                    pages_per_compute_block=ppcb, interpret=interpret))
      args = (q, k_pages, v_pages, tables, x.kv_lens)
      out.append((f"k_splits={ks} ppcb={ppcb}",
                  (lambda f=f, args=args: f(*args)[:, None])))
  return out


def impl_cudnn(x: Inputs, interpret: bool, dense):
  if interpret or jax.default_backend() not in pallas_gpu.GPU_BACKENDS:
    raise Skip("needs cuDNN on a GPU")
  k, v = dense
  batch, q_len = x.q.shape[:2]
  s = k.shape[1]
  kwargs = {}
  note = ""
  if q_len > 1:  # bottom-right causal chunk: explicit mask
    i = jnp.arange(q_len)[:, None]
    p = jnp.arange(s)[None, :]
    kwargs["mask"] = (p <= (x.kv_lens[:, None, None] - q_len + i))[:, None]
    note = "explicit mask"
  elif bool(jnp.any(x.kv_lens != s)):
    kwargs["key_value_seq_lengths"] = x.kv_lens
    note = "kv_seq_lengths"
  f = jax.jit(functools.partial(jax.nn.dot_product_attention, scale=x.scale,
                                implementation="cudnn", **kwargs))
  return (lambda: f(x.q, k, v)), jax_sync, note


def impl_torch(x: Inputs, interpret: bool, dense):
  del interpret
  try:
    import torch
    import torch.nn.functional as F
  except ImportError as e:
    raise Skip(f"torch not importable: {e}") from e
  k, v = dense
  on_gpu = jax.default_backend() in pallas_gpu.GPU_BACKENDS
  if on_gpu and not torch.cuda.is_available():
    raise Skip("torch has no CUDA here")
  device = "cuda" if on_gpu else "cpu"

  def to_torch(a):  # [batch, S, heads, D] -> [batch, heads, S, D] contiguous
    if on_gpu:
      t = torch.from_dlpack(a)
    else:  # NumPy has no bfloat16 DLPack export: go through float32
      t = torch.from_numpy(np.asarray(a, np.float32)).to(getattr(torch, a.dtype.name))
    return t.to(device).permute(0, 2, 1, 3).contiguous()

  qt, kt, vt = to_torch(x.q), to_torch(k), to_torch(v)
  q_len, s = qt.shape[2], kt.shape[2]
  lens = torch.as_tensor(np.array(x.kv_lens), device=device)
  kwargs = dict(scale=x.scale, enable_gqa=True)
  note = ""
  if q_len > 1:
    i = torch.arange(q_len, device=device)[:, None]
    p = torch.arange(s, device=device)[None, :]
    kwargs["attn_mask"] = (p <= (lens[:, None, None] - q_len + i))[:, None]
    note = "bool mask"
  elif bool((lens != s).any()):
    kwargs["attn_mask"] = (torch.arange(s, device=device)[None, :] < lens[:, None])[:, None, None]
    note = "bool mask"

  def call():
    return F.scaled_dot_product_attention(qt, kt, vt, **kwargs)

  def sync(out):
    del out
    if on_gpu:
      torch.cuda.synchronize()

  def run():
    return call()

  def result(out):
    return jnp.asarray(out.permute(0, 2, 1, 3).float().cpu().numpy())

  run.result = result
  return run, sync, note


def copy_ceiling(tiny: bool, args) -> float:
  n = (1 << 24) if tiny else (1 << 30)  # bf16 elements: 32 MiB or 2 GiB
  x = jnp.ones((n,), jnp.bfloat16)
  f = jax.jit(lambda a: a + jnp.bfloat16(1))
  t, _ = time_fn(lambda: f(x), jax_sync, warmup=2, repeats=args.repeats, inner=args.inner)
  return 2 * n * 2 / t  # bytes read + written per second


def read_reference(tiny: bool, args) -> float:
  """Read-only bandwidth: a float32 sum over the copy ceiling's array (bytes read / s)."""
  n = (1 << 24) if tiny else (1 << 30)
  x = jnp.ones((n,), jnp.bfloat16)
  f = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
  t, _ = time_fn(lambda: f(x), jax_sync, warmup=2, repeats=args.repeats, inner=args.inner)
  return n * 2 / t


def sweep_grid(knobs: dict) -> list[dict]:
  """Variants of the default knobs, one or two changed at a time (``--sweep``)."""
  bk, ks, nw, ns = (knobs[k] for k in ("block_k", "k_splits", "num_warps", "num_stages"))
  grid = [dict(block_k=bk // 2), dict(block_k=bk * 2, num_stages=max(1, ns - 1)),
          dict(k_splits=max(1, ks // 2)), dict(k_splits=ks * 2), dict(k_splits=1),
          dict(num_warps=4 if nw == 8 else 8), dict(num_warps=2),
          dict(num_stages=ns + 1), dict(num_stages=max(1, ns - 1)),
          dict(block_k=bk // 2, num_warps=2)]
  out, seen = [], {tuple(sorted(knobs.items()))}
  for g in grid:
    kn = {k: knobs[k] for k in ("block_k", "k_splits", "num_warps", "num_stages")} | g
    key = tuple(sorted((knobs | kn).items()))
    if kn["block_k"] >= 16 and key not in seen:
      seen.add(key)
      out.append(kn)
  return out


def knob_label(kn: dict) -> str:
  return f"bk={kn['block_k']} ks={kn['k_splits']} w={kn['num_warps']} st={kn['num_stages']}"


# ---- driver ---------------------------------------------------------------------------------


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU)")
  p.add_argument("--tiny", action="store_true", help="tiny shapes (with --interpret on CPU)")
  p.add_argument("--out", default=None, help="also write the raw summary JSON here")
  p.add_argument("--time-budget", type=float, default=270.0,
                 help="seconds; configs not started by then are skipped")
  p.add_argument("--repeats", type=int, default=None)
  p.add_argument("--inner", type=int, default=None)
  p.add_argument("--sweep", action="store_true", help="also time a grid of our kernels' knobs")
  p.add_argument("--sweep-mgpu", action="store_true",
                 help="time the grid of the Mosaic GPU kernel's knobs only")
  p.add_argument("--sweep-quant", default="",
                 help="also sweep our knobs on these quantised pools (comma list: int8,fp8)")
  p.add_argument("--sweep-block-size", type=int, default=16,
                 help="sweep the knobs on the configs of this block size only (0: all)")
  p.add_argument("--skip", default="",
                 help="comma-separated rows not to time (e.g. jax_pallas,xla_gather)")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--replot", action="store_true",
                 help="only redraw plots/gpu_decode.png from results/gpu_decode.json (no GPU)")
  args = p.parse_args(argv)
  skip = {name for name in args.skip.split(",") if name}
  if skip - set(IMPLS):
    p.error(f"--skip takes names from {IMPLS}, got {sorted(skip - set(IMPLS))}")
  sweep_quant = [name for name in args.sweep_quant.split(",") if name]
  if set(sweep_quant) - set(QUANT_TOL):
    p.error(f"--sweep-quant takes names from {sorted(QUANT_TOL)}, got {args.sweep_quant!r}")
  if args.replot:
    return replot()
  slow = args.interpret or args.tiny
  args.repeats = args.repeats or (3 if slow else 15)
  args.inner = args.inner or (1 if slow else 10)
  warmup = 1 if slow else 3
  dtype = jnp.dtype(args.dtype)
  t_start = time.perf_counter()
  tol = {jnp.dtype(jnp.bfloat16): 3e-2, jnp.dtype(jnp.float16): 5e-3}.get(dtype, 1e-4)
  warnings.filterwarnings("ignore", category=DeprecationWarning)  # Triton lowering, 0.11

  def log(msg):
    print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)

  device = jax.devices()[0]
  kind = getattr(device, "device_kind", str(device))
  log(f"device {kind} backend={jax.default_backend()} jax={jax.__version__} "
      f"dtype={dtype.name} interpret={args.interpret} tiny={args.tiny}")
  if args.interpret:
    log("interpret mode: correctness smoke test; the times are NOT kernel performance")
  if not args.interpret and jax.default_backend() not in pallas_gpu.GPU_BACKENDS:
    sys.exit("no GPU backend: run on a GPU machine, or pass --interpret --tiny")

  ceiling = copy_ceiling(args.tiny, args)
  read_bw = read_reference(args.tiny, args)
  log(f"copy ceiling (read+write) {ceiling / 1e9:.1f} GB/s; read-only reference "
      f"{read_bw / 1e9:.1f} GB/s")
  results = []

  def record(cfg, x, impl, t, err, note="", knobs=None, status="ok", tol=tol):
    row = dict(config=cfg.name, block_size=cfg.block_size, batch=cfg.batch, q_len=cfg.q_len,
               impl=impl, status=status, note=note, kv_bytes=x.kv_bytes if x else None)
    if t is not None:
      gbps = x.kv_bytes / t / 1e9
      row.update(time_us=t * 1e6, gbps=gbps, fraction=gbps * 1e9 / ceiling,
                 fraction_read=gbps * 1e9 / read_bw, first_call_s=first_call[0],
                 tflops=x.flops / t / 1e12, max_err=err,
                 correct=bool(err is not None and err <= tol))
    if knobs:
      row["knobs"] = knobs
    results.append(row)
    if t is not None:
      ok = "ok" if row["correct"] else f"WRONG (max err {err:.3g})"
      log(f"  {cfg.name} bs{cfg.block_size} {impl:>11}: {t * 1e6:9.1f} us "
          f"{row['gbps']:8.1f} GB/s {row['fraction']:5.2f} of copy  {ok}  first call "
          f"{first_call[0]:.2f} s  {note}")
    else:
      log(f"  {cfg.name} bs{cfg.block_size} {impl:>11}: {status} {note}")

  first_call = [None]  # the cold start of the last run_timed: its first call, compile included

  def run_timed(fn, sync):
    t0 = time.perf_counter()
    sync(fn())
    first_call[0] = time.perf_counter() - t0
    return time_fn(fn, sync, warmup=max(warmup - 1, 0), repeats=args.repeats, inner=args.inner)

  def over_budget():  # a sweep stops where the budget ends (a killed run saves nothing)
    return time.perf_counter() - t_start > args.time_budget

  for cfg in make_configs(args.tiny):
    if over_budget():
      record(cfg, None, "all", None, None, status="skipped", note="time budget exhausted")
      continue
    log(f"config {cfg.name} block {cfg.block_size} q_len {cfg.q_len}")
    x = make_inputs(cfg, dtype)
    ref_out = jax.jit(functools.partial(paged_attention_xla, scale=x.scale))(
        x.q.astype(jnp.float32), x.k_pool.astype(jnp.float32), x.v_pool.astype(jnp.float32),
        x.layer, x.tables, x.kv_lens, x.q_lens)
    ref_out = jax.block_until_ready(ref_out)

    # ours
    knobs = pallas_gpu.default_knobs(
        head_dim=cfg.head_dim, block_size=cfg.block_size, q_len=cfg.q_len,
        group=cfg.q_heads // cfg.kv_heads, batch=cfg.batch, kv_heads=cfg.kv_heads,
        max_blocks=x.tables.shape[1], itemsize=dtype.itemsize)
    fn, sync, note = impl_ours(x, args.interpret)
    t, out = run_timed(fn, sync)
    record(cfg, x, "ours", t, max_err(out, ref_out), note, knobs=knobs)
    if args.sweep and args.sweep_block_size in (0, cfg.block_size):
      for kn in sweep_grid(knobs):
        if over_budget():
          break
        fn, sync, _ = impl_ours(x, args.interpret, **kn)
        try:
          t, out = run_timed(fn, sync)
        except Exception as e:  # noqa: BLE001 - e.g. a variant over the shared-memory limit
          record(cfg, x, "ours_sweep", None, None, status="failed", knobs=kn,
                 note=f"{knob_label(kn)}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
          continue
        record(cfg, x, "ours_sweep", t, max_err(out, ref_out), knob_label(kn), kn)

    # ours on Mosaic GPU (TMA + wgmma): same data, same reference
    try:
      if "ours_mgpu" in skip:
        raise Skip("--skip")
      fn, sync, note = impl_mgpu(x, args.interpret)
      t, out = run_timed(fn, sync)
      record(cfg, x, "ours_mgpu", t, max_err(out, ref_out), note)
      if (args.sweep or args.sweep_mgpu) and args.sweep_block_size in (0, cfg.block_size):
        geometry = dict(
            head_dim=cfg.head_dim, block_size=cfg.block_size,
            rows=cfg.q_len * (cfg.q_heads // cfg.kv_heads), batch=cfg.batch,
            kv_heads=cfg.kv_heads, max_blocks=x.tables.shape[1], itemsize=dtype.itemsize)
        mk = pallas_mgpu.default_knobs(**geometry)
        for kn in mgpu_sweep_grid(mk, pallas_mgpu.default_knobs(**geometry,
                                                                warp_specialized=True)):
          if over_budget():
            break
          label = " ".join(f"{k}={v}" for k, v in kn.items())
          try:
            fn, sync, _ = impl_mgpu(x, args.interpret, **kn)
            t, out = run_timed(fn, sync)
          except Exception as e:  # noqa: BLE001 - e.g. a variant over the shared-memory limit
            record(cfg, x, "mgpu_sweep", None, None, status="failed", knobs=kn,
                   note=f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
          record(cfg, x, "mgpu_sweep", t, max_err(out, ref_out), label, kn)
    except Skip as e:
      record(cfg, x, "ours_mgpu", None, None, status="skipped", note=str(e))
    except Exception as e:  # noqa: BLE001 - not yet compiled on a GPU: keep the other rows
      record(cfg, x, "ours_mgpu", None, None, status="failed",
             note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")

    # ours on int8 / fp8 pools (scales per token and KV head)
    for kv_quant, qtol in QUANT_TOL.items():
      if f"ours_{kv_quant}" in skip:
        continue
      xq, scales = quantized_inputs(x, kv_quant)
      fn, sync, _ = impl_ours(xq, args.interpret, **scales)
      try:
        t, out = run_timed(fn, sync)
      except Exception as e:  # noqa: BLE001 - keep the other rows
        record(cfg, xq, f"ours_{kv_quant}", None, None, status="failed",
               note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        continue
      err = rel_l2(out, ref_out)
      record(cfg, xq, f"ours_{kv_quant}", t, err, f"rel. L2 {err:.2e}", tol=qtol)
      if kv_quant in sweep_quant and args.sweep_block_size in (0, cfg.block_size):
        qknobs = pallas_gpu.default_knobs(
            head_dim=cfg.head_dim, block_size=cfg.block_size, q_len=cfg.q_len,
            group=cfg.q_heads // cfg.kv_heads, batch=cfg.batch, kv_heads=cfg.kv_heads,
            max_blocks=x.tables.shape[1], itemsize=xq.k_pool.dtype.itemsize)
        for kn in sweep_grid(qknobs):
          if over_budget():
            break
          fn, sync, _ = impl_ours(xq, args.interpret, **scales, **kn)
          try:
            t, out = run_timed(fn, sync)
          except Exception as e:  # noqa: BLE001 - e.g. a variant over the shared-memory limit
            record(cfg, xq, f"{kv_quant}_sweep", None, None, status="failed", knobs=kn,
                   note=f"{knob_label(kn)}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
          err = rel_l2(out, ref_out)
          record(cfg, xq, f"{kv_quant}_sweep", t, err, knob_label(kn), kn, tol=qtol)
      del xq, scales

    # JAX's Pallas paged kernel: best variant
    try:
      if "jax_pallas" in skip:
        raise Skip("--skip")
      best = None
      for label, fn in jax_pallas_variants(x, args.interpret):
        try:
          t, out = run_timed(fn, jax_sync)
        except Exception as e:  # noqa: BLE001 - a variant the kernel rejects
          log(f"  jax_pallas {label}: failed: {type(e).__name__}: {str(e)[:120]}")
          continue
        if best is None or t < best[0]:
          best = (t, out, label, first_call[0])
      if best is None:
        raise Skip("every variant failed")
      first_call[0] = best[3]
      record(cfg, x, "jax_pallas", best[0], max_err(best[1], ref_out), f"best: {best[2]}")
    except Skip as e:
      record(cfg, x, "jax_pallas", None, None, status="skipped", note=str(e))

    # XLA gather + dense
    if "xla_gather" not in skip:
      fn, sync, note = impl_xla(x, args.interpret)
      t, out = run_timed(fn, sync)
      record(cfg, x, "xla_gather", t, max_err(out, ref_out), note)

    dense = dense_kv(x)
    for name, make in (("cudnn", impl_cudnn), ("torch_sdpa", impl_torch)):
      if name in skip:
        continue
      try:
        fn, sync, note = make(x, args.interpret, dense)
        t, out = run_timed(fn, sync)
        if hasattr(fn, "result"):
          out = fn.result(out)
        record(cfg, x, name, t, max_err(out, ref_out), note)
      except Skip as e:
        record(cfg, x, name, None, None, status="skipped", note=str(e))
      except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape
        record(cfg, x, name, None, None, status="failed",
               note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    del x, dense, ref_out

  elapsed = time.perf_counter() - t_start
  log(f"done in {elapsed:.1f}s")
  cfg0 = make_configs(args.tiny)[0]
  heads = f"{cfg0.q_heads} q heads / {cfg0.kv_heads} kv heads, head_dim {cfg0.head_dim}"
  summary = dict(heads=heads, device_kind=kind, backend=jax.default_backend(),
                 jax_version=jax.__version__,
                 dtype=dtype.name, interpret=args.interpret, tiny=args.tiny,
                 copy_ceiling_gbps=ceiling / 1e9, read_reference_gbps=read_bw / 1e9,
                 elapsed_s=elapsed, goals=GOALS,
                 results=results)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=1)
    log(f"wrote {args.out}")
  text, md, notes = print_tables(summary)
  smoke = args.interpret or args.tiny  # never replaces the GPU numbers in results/
  plot = None if smoke else save_plot(summary)
  path = report.save("gpu_decode_interpret" if smoke else "gpu_decode",
                     title="Paged decode attention on GPU: ours vs peers", markdown=md,
                     notes=notes, data=summary, plot=plot,
                     directory=report.OUT_DIR if smoke else None)
  log(f"wrote {path}")
  wrong = [f"{r['config']} bs{r['block_size']} {r['impl']} (max err {r['max_err']:.3g})"
           for r in results if r.get("correct") is False]
  if wrong:
    print("RESULTS THAT DISAGREE WITH THE REFERENCE: " + "; ".join(wrong))
  if any(r["impl"] == "ours" and r.get("correct") is False for r in results):
    sys.exit(1)


IMPLS = ("ours", "ours_mgpu", "ours_int8", "ours_fp8", "jax_pallas", "xla_gather", "cudnn",
         "torch_sdpa")


def save_plot(summary) -> str:
  """Fraction of the copy ceiling per implementation, decode configs, one panel per block size."""
  plt = report.pyplot()
  rows = [r for r in summary["results"] if r.get("time_us") is not None and r["q_len"] == 1]
  block_sizes = sorted({r["block_size"] for r in rows})
  configs = list(dict.fromkeys(r["config"] for r in rows))
  fig, axes = plt.subplots(1, len(block_sizes), figsize=(6 * len(block_sizes), 4), sharey=True,
                           squeeze=False)
  width = 0.8 / len(IMPLS)
  for ax, bs in zip(axes[0], block_sizes, strict=True):
    for i, impl in enumerate(IMPLS):
      frac = [next((r["fraction"] for r in rows if r["config"] == c and r["block_size"] == bs
                    and r["impl"] == impl), 0.0) for c in configs]
      ax.bar([x + (i - len(IMPLS) / 2 + 0.5) * width for x in range(len(configs))], frac,
             width, label=impl)
    ax.axhline(0.85, color="k", ls="--", lw=1, label="goal (0.85)")
    ax.set_xticks(range(len(configs)), configs, rotation=20)
    ax.set_title(f"block {bs}")
    ax.set_ylabel("fraction of the copy ceiling")
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
  fig.suptitle(f"Decode attention on {summary['device_kind']} ({summary['dtype']}, "
               f"{summary['heads']}; contiguous copies for cudnn/torch)")
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  return report.save_figure(fig, "gpu_decode")


def replot():
  """Redraws the plot of the saved GPU run and relinks it in RESULTS.md (keeps its machine)."""
  path = report.RESULTS_DIR / "gpu_decode.json"
  record = json.loads(path.read_text())
  record["plot"] = save_plot(record["data"])
  path.write_text(json.dumps(record, indent=1) + "\n")
  report.write_results_md()
  print(f"wrote {report.PLOTS_DIR / 'gpu_decode.png'} and {report.RESULTS_MD}")


def print_tables(summary) -> tuple[str, str, str]:
  """Prints the tables; returns ``(text table, markdown table, notes)`` for the report."""
  by = {}
  for r in summary["results"]:
    by.setdefault((r["config"], r["block_size"]), {})[r["impl"]] = r

  def cell(r, frac=False):
    if r is None or r.get("time_us") is None:
      return "n/a" if r is None else r["status"]
    s = f"{r['time_us']:.1f} us"
    if frac:
      s += f" ({r['fraction']:.2f})"
    return s + ("" if r["correct"] else " WRONG")

  def ratio(ours, other):
    if not ours or not other or ours.get("time_us") is None or other.get("time_us") is None:
      return "-"
    return f"{other['time_us'] / ours['time_us']:.2f}x"

  head = ["config", "bs"] + list(IMPLS) + ["vs jax", "vs cudnn", "vs torch", "int8 / ours",
                                            "fp8 / ours", "mgpu vs ours", "mgpu vs cudnn",
                                            "mgpu vs torch"]
  rows = []
  for (name, bs), impls in by.items():
    o = impls.get("ours")
    rows.append([name, str(bs)] + [cell(impls.get(i), frac=True) for i in IMPLS]
                + [ratio(o, impls.get("jax_pallas")), ratio(o, impls.get("cudnn")),
                   ratio(o, impls.get("torch_sdpa")),
                   ratio(o, impls.get("ours_int8")), ratio(o, impls.get("ours_fp8")),
                   ratio(impls.get("ours_mgpu"), o),
                   ratio(impls.get("ours_mgpu"), impls.get("cudnn")),
                   ratio(impls.get("ours_mgpu"), impls.get("torch_sdpa"))])
  def ws(r):
    return bool(r.get("knobs", {}).get("warp_specialized"))

  best_lines = []
  for sweep_impl, base, kind, pick in (
      ("ours_sweep", "ours", "", lambda r: True),
      ("int8_sweep", "ours_int8", "", lambda r: True),
      ("fp8_sweep", "ours_fp8", "", lambda r: True),
      ("mgpu_sweep", "ours_mgpu", "", lambda r: not ws(r)),
      ("mgpu_sweep", "ours_mgpu", "warp-specialised ", ws)):
    sweep = {}
    for r in summary["results"]:
      if (r["impl"] == sweep_impl and r.get("time_us") is not None and r["correct"]
          and pick(r)):
        k = (r["config"], r["block_size"])
        if k not in sweep or r["time_us"] < sweep[k]["time_us"]:
          sweep[k] = r
    if sweep:
      best_lines.append(f"best {kind}{base} knob variant per config (--sweep): " + "; ".join(
          f"{n} bs{b}: {r['note']} {r['time_us']:.1f} us "
          f"({by[(n, b)][base]['time_us'] / r['time_us']:.2f}x default)"
          for (n, b), r in sweep.items() if by[(n, b)].get(base, {}).get("time_us")))
  text = report.text_table(head, rows)
  md = report.markdown_table(head, rows)
  notes = (f"{summary['dtype']}, {summary['heads']}"
           + (", INTERPRET MODE, tiny shapes: not performance" if summary["interpret"] else "")
           + f". Copy ceiling (read+write): {summary['copy_ceiling_gbps']:.0f} GB/s"
           + (f"; read-only reference (a sum): {summary['read_reference_gbps']:.0f} GB/s (decode "
              "mostly reads, so a kernel can pass 1.0 of copy: the copy figure is the goal's "
              "yardstick, not the hardware limit)" if "read_reference_gbps" in summary else "")
           + ". Cells: "
           "median time per call (fraction of the copy ceiling); 'vs X' = X time / ours, "
           "'mgpu vs X' = X time / ours_mgpu (ours = the Triton kernel), "
           f"measured in the same run; 'int8 / ours' = int8 time / unquantised time (goal "
           f"<= 0.6x). {summary['goals']}. Each raw row also keeps its first call's time "
           "(`first_call_s`: compile + one call, the cold start)."
           + "".join(f" {line}." for line in best_lines))
  print()
  print(f"{summary['device_kind']}  jax {summary['jax_version']}  {summary['dtype']}  copy "
        f"ceiling {summary['copy_ceiling_gbps']:.1f} GB/s"
        + ("  [INTERPRET MODE: not performance]" if summary["interpret"] else ""))
  print(text)
  print("(time per call, fraction of the copy ceiling in parentheses; 'vs X' = X time / ours)")
  print()
  print(notes)
  return text, md, notes


if __name__ == "__main__":
  main()
