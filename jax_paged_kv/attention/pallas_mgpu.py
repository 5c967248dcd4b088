"""Mosaic GPU paged attention (Hopper): decode, chunked prefill and mixed batches.

Implements the kernel contract of :mod:`jax_paged_kv.attention.reference` with Pallas' Mosaic
GPU backend (``jax.experimental.pallas.mosaic_gpu``): TMA copies of whole pages, warpgroup MMA
(``wgmma``) and an explicit multi-stage pipeline. It is the successor of the Triton-lowered
kernel in :mod:`~jax_paged_kv.attention.pallas_gpu` on sm90+ GPUs, which stays the fallback for
older GPUs, older JAX, float32 / quantised pools and geometries this kernel cannot tile.

Design
------
* **Rows = (query, head) pairs of one KV group**, as in the Triton kernel: for batch row ``b``
  and KV head ``h`` the ``q_len * group`` queries that read that head are flattened,
  token-major, and cut into tiles of 64 rows (the ``wgmma`` M extent). Decode packs a GQA group
  into one tile; chunked prefill tiles ``q_len * group`` rows. The wrapper hands the kernel each
  row's position (``kv_len - q_lens[b] + token``; a large negative number for padding rows, which
  then see no key).
* **Grid** ``(kv_heads * row_tiles, batch, k_splits)``, one warpgroup per program. A program
  copies its query tile to shared memory once, then walks the steps of ``block_k`` keys its rows
  may see (from the sliding window's start, or 0, to the last row's position; work past each
  row's length is skipped, not masked); the ``k_splits`` programs of a tile take contiguous
  shares of the steps (flash-decoding) and the wrapper merges them by their log-sum-exp.
* **Pages by TMA.** A page of one KV head is a contiguous ``[block_size, head_dim]`` tile of the
  pool (``[layers, kv_heads, num_blocks, block_size, head_dim]``). A step is ``block_k //
  block_size`` whole pages (or an aligned part of one page when pages are larger), each fetched
  with one TMA copy from the block the table names into its rows of a swizzled shared-memory
  stage; all copies of a step arrive on one barrier. ``num_stages`` stages are in flight: the
  program issues step ``i + num_stages`` into the slot step ``i`` just released.
* **Step.** ``q @ k.T`` by ``wgmma`` (float32 accumulation), scale, soft cap, causal + window
  mask with ``where`` (-inf), an online softmax in base 2, ``p`` rounded to the cache dtype and
  stored to shared memory, ``p @ v`` by ``wgmma``.
* **Stale slots.** Pages are copied whole, so a step may bring in slots past a row's length (or
  before its window) that hold stale or NaN data. Their logits are masked; their V rows are
  zeroed in shared memory on the (at most two) steps that hold such slots, because ``p @ v``
  would turn ``0 * NaN`` into NaN.
* **Warp specialisation** (``warp_specialized=True``; off by default until timed on a GPU).
  Three warpgroups per program, as in JAX's ``attention_mgpu``: warpgroup 2 only issues the
  TMA copies (query tile, then every step's pages) and gives its registers to the others;
  compute warpgroups 0 and 1 take the even and odd steps, each with its own online softmax and
  ``p`` tile, and write their partial results as two more splits, merged with the rest by
  log-sum-exp. A compute warpgroup arrives on the stage's *consumed* barrier once both its
  ``wgmma`` have read the stage (after a proxy fence, ``commit_smem``); the producer waits on
  it before refilling that stage, and at the end on every slot's last use. ``num_stages`` must
  be even, so that each stage has one compute warpgroup, which then waits on every phase of
  its barriers (a barrier's phase parity is tracked per thread). With one warpgroup a program
  serialises the copy waits, both ``wgmma`` and the softmax of every step; here one compute
  warpgroup's softmax overlaps the other's and the copies run ahead on their own.
* **Non-finite V** (the contract: NaN / Inf reaches exactly the queries that see that key). A
  non-finite V inside a row's range spreads through ``p @ v`` to rows that cannot see it, so the
  output is then non-finite somewhere; the wrapper checks that (one reduction) and only then
  (``lax.cond``) recomputes the output by the contract's rule with the XLA reference's exact
  path (:func:`~jax_paged_kv.attention.reference.nonfinite_v_attention` over the pages, with the
  kernel's LSE, which V never changes). Finite caches never take that branch.

Supported (:func:`check_supported`): bfloat16 / float16 pools (``wgmma`` reads both operands in
one 16-bit dtype; float32 would run on TF32 tensor cores, too coarse for the contract's float32
tolerance), ``head_dim`` a multiple of 16 whose row is 32, 64 or a multiple of 128 bytes (a
swizzle width), ``block_size`` a multiple of 8 (the shared-memory tile) that divides or is a
multiple of ``block_k``. int8 / fp8 / int4 caches are rejected at trace time (their pages would
need dequantising in shared memory before ``wgmma``; ``pallas_gpu`` handles int8 / fp8).

Verification. Compiled on an NVIDIA H200 (JAX 0.11.2, 2026-11-27; the masking of holes that
:func:`~jax_paged_kv.free_outside_window` leaves was added after that run and is checked in
interpret mode only): every case of
``tests/test_attention_pallas_mgpu.py`` with ``JAX_PAGED_KV_GPU_COMPILED=1`` (77 passed, the 2
interpret-only tests skipped; the shared attention cases as bfloat16, the six non-finite-V
cases, head_dim 256 with pages larger than a step, GQA 20 on a float16 cache, two row tiles of
chunked prefill, knob variants) against the float64 oracle, and ``benchmarks/gpu_decode.py``'s
configurations against the XLA reference. On CPU (JAX 0.10.2 and 0.11.2) the same cases run in
Mosaic GPU interpret mode, with a race-detector run, and the compiled path is lowered for CUDA.
JAX 0.10's GPU interpret mode lacks two things this kernel uses: ``layout_cast`` has no CPU
rule (the kernel skips these value no-ops when interpreting) and its ``wgmma`` cannot read a
transposed operand (``to_range`` takes only indexers: ``AttributeError: 'TransposeTransform'
object has no attribute 'indices'``); :func:`interpret_params` installs a small shim for that
one callback on such versions.

Speed (H200, bf16, 32 / 8 heads, head_dim 128, 65k cached tokens per call): 0.31-0.52 of the
copy ceiling on decode, 0.4-0.6x the Triton kernel and 0.4-0.66x cuDNN; chunked prefill 0.5x
cuDNN (``benchmarks/RESULTS.md``). So the dispatcher keeps the Triton kernel (``pallas_gpu``)
and this one is opt-in. Tried on the H200: one wave of programs instead of two (up to 1.38x,
now the default); copying each split's block-table entries into shared memory first (4-18%
faster, but some compiled cases then hit ``CUDA_ERROR_ILLEGAL_INSTRUCTION``; not kept). Warp
specialisation (above) was written after that GPU session, without a GPU: it passes every case
in interpret mode (JAX 0.10.2 and 0.11.2, with the race detector) and lowers for CUDA, but it
has never been compiled to PTX or timed; ``benchmarks/gpu_decode.py --sweep-mgpu`` times it
beside the one-warpgroup kernel, for the next GPU session to pick the default.

Tuning knobs (keyword-only; ``None`` picks :func:`default_knobs`): ``block_k`` (keys per step,
a multiple of 64 for the ``p @ v`` swizzle; default 128 for ``head_dim <= 128``, else 64),
``num_stages`` (default: as many as fit 200 KiB of shared memory, 2 to 4), ``k_splits``
(default: one wave of programs on 132 SMs, at most one per step, at most 32),
``warp_specialized`` (default False; True takes 64-key steps and 2 or 4 stages), ``interpret``
(run in Mosaic GPU interpret mode; any backend).
"""

from __future__ import annotations

import functools
import math
import os
import threading

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jax_paged_kv.attention import reference

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_ROWS = 64  # wgmma M: rows of one query tile
_SMS = 132  # streaming multiprocessors of an H100 / H200 SXM
_SMEM_PER_SM = 228 * 1024  # shared memory of one Hopper SM (227 KiB of it per block)
_MAX_SPLITS = 32
_PARTS = 2  # compute warpgroups of the warp-specialised kernel
_SMEM_BUDGET = 200 * 1024  # of the H100's 227 KiB per block
_NO_ROW = -(1 << 30)  # position of a padding row: below every key, so it sees none
GPU_BACKENDS = ("gpu", "cuda")
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _backend() -> str:
  return jax.default_backend()


def _swizzle(dim: int, itemsize: int) -> int | None:
  """The shared-memory swizzle (bytes) for rows of ``dim`` elements, or None if none fits."""
  row = dim * itemsize
  for s in (128, 64, 32):
    if row % s == 0 and (s == 128 or row == s):
      return s
  return None


def _smem(shape, dtype, swizzle=None):
  """A swizzled shared-memory tile that TMA fills and ``wgmma`` reads."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = swizzle or _swizzle(shape[-1], itemsize)
  tiling = plgpu.TilingTransform((8, swizzle // itemsize))
  return plgpu.SMEM(shape, dtype, transforms=(tiling, plgpu.SwizzleTransform(swizzle)))


def check_supported(dtype, block_size: int, head_dim: int, *, kv_quant: str | None = None,
                    block_k: int | None = None) -> None:
  """Raises ``ValueError`` (naming the reason) for pools this kernel cannot tile."""
  dtype = jnp.dtype(dtype)
  if kv_quant is not None:
    raise ValueError(f"pallas_mgpu does not support quantised caches ({kv_quant=}): wgmma reads "
                     "both operands in one 16-bit dtype and dequantising pages in shared memory "
                     "is not implemented; use implementation='pallas_gpu' (int8 / fp8) or 'xla'")
  if dtype not in _DTYPES:
    raise ValueError(f"pallas_mgpu supports bfloat16 and float16 pools, got {dtype} (float32 "
                     "would run wgmma in TF32); use implementation='pallas_gpu' or 'xla'")
  if (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim % 16
      or _swizzle(head_dim, dtype.itemsize) is None):
    raise ValueError(f"pallas_mgpu needs a head_dim whose row is 32, 64 or a multiple of 128 "
                     f"bytes (a shared-memory swizzle), got {head_dim=} in {dtype}; use "
                     "implementation='pallas_gpu' or 'xla'")
  if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size % 8:
    raise ValueError(f"pallas_mgpu needs a block_size that is a multiple of 8 (one shared-memory "
                     f"tile of rows), got {block_size=}; use implementation='pallas_gpu' or 'xla'")
  block_k = block_k or default_block_k(head_dim)
  if block_k % block_size and block_size % block_k:
    raise ValueError(f"pallas_mgpu needs block_size and block_k to divide one another, got "
                     f"{block_size=}, {block_k=}")


def default_block_k(head_dim: int) -> int:
  return 128 if head_dim <= 128 else 64


def _smem_bytes(*, block_k, num_stages, head_dim, itemsize, warp_specialized) -> int:
  """Shared memory of one program: the stages, the query tile, the p tiles, LSE and rows."""
  parts = _PARTS if warp_specialized else 1
  return (num_stages * 2 * block_k * head_dim * itemsize + _ROWS * head_dim * itemsize
          + parts * (_ROWS * block_k * itemsize + _ROWS * 4) + _ROWS * 4)


def default_knobs(*, head_dim: int, block_size: int, rows: int, batch: int, kv_heads: int,
                  max_blocks: int, itemsize: int, warp_specialized: bool = False) -> dict:
  """Default knobs: two stages, and one wave of programs on a 132-SM Hopper GPU.

  On an H200 (JAX 0.11.2, bf16, 32 / 8 heads, head_dim 128, 16-token pages) more programs
  than fit at once ran up to 1.38x slower than one wave (``k_splits`` 5 vs 2 at batch 8 x
  8192 tokens), and a third stage of 128 keys does not fit beside the query and ``p`` tiles.
  Warp-specialised (not yet timed on a GPU): steps of 64 keys, and as many stages as fit (an
  even number, 2 or 4), so that stages are in flight while both compute warpgroups work.

  Returns:
    dict with ``block_k``, ``num_stages``, ``k_splits``, ``warp_specialized``.
  """
  block_k = 64 if warp_specialized else default_block_k(head_dim)
  fixed = _smem_bytes(block_k=block_k, num_stages=0, head_dim=head_dim, itemsize=itemsize,
                      warp_specialized=warp_specialized)
  stage = 2 * block_k * head_dim * itemsize
  num_stages = max(2, min(4, (_SMEM_BUDGET - fixed) // stage))
  if warp_specialized:
    num_stages -= num_stages % 2
  resident = max(1, _SMEM_PER_SM // (num_stages * stage + fixed))
  steps = -(-max_blocks * block_size // block_k)
  programs = batch * kv_heads * -(-rows // _ROWS)
  k_splits = max(1, min(_SMS * resident // programs, steps, _MAX_SPLITS))
  return dict(block_k=block_k, num_stages=num_stages, k_splits=k_splits,
              warp_specialized=warp_specialized)


def _check_knobs(*, block_k, num_stages, k_splits, warp_specialized, head_dim, block_size,
                 itemsize):
  if isinstance(block_k, bool) or not isinstance(block_k, int) or block_k < 64 or block_k % 64:
    raise ValueError(f"{block_k=} must be a positive multiple of 64 (the p tile's swizzle and "
                     "the wgmma K extent)")
  if block_k % block_size and block_size % block_k:
    raise ValueError(f"{block_k=} and {block_size=} must divide one another")
  if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
    raise ValueError(f"{num_stages=} must be an int >= 1")
  if isinstance(k_splits, bool) or not isinstance(k_splits, int) or k_splits < 1:
    raise ValueError(f"{k_splits=} must be an int >= 1")
  if not isinstance(warp_specialized, bool):
    raise ValueError(f"{warp_specialized=} must be a bool")
  if warp_specialized and num_stages % 2:
    raise ValueError(f"warp_specialized=True needs an even num_stages (each stage then has one "
                     f"compute warpgroup, which waits on every phase of its barriers), got "
                     f"{num_stages=}")
  smem = _smem_bytes(block_k=block_k, num_stages=num_stages, head_dim=head_dim,
                     itemsize=itemsize, warp_specialized=warp_specialized)
  if smem > 227 * 1024:
    raise ValueError(f"{num_stages=} stages of {block_k=} keys need {smem // 1024} KiB of shared "
                     "memory, over the 227 KiB of an H100 block")


# ---------------------------------------------------------------------------------------------
# Kernel body.


def _attention_kernel(
    layer_ref,  # [1] int32 (GMEM)
    ranges_ref,  # [batch, kv_heads * tiles, 2] int32 (GMEM): each tile's key range [lo, hi)
    tables_ref,  # [batch, table_width + pad] int32 (GMEM)
    row_pos_ref,  # [batch, tiles * 64] int32 (GMEM): each row's position, _NO_ROW for padding
    q_ref,  # [batch, kv_heads, tiles * 64, head_dim] (GMEM)
    k_ref,  # [layers, kv_heads, num_blocks, block_size, head_dim] (GMEM)
    v_ref,  # [layers, kv_heads, num_blocks, block_size, head_dim] (GMEM)
    o_ref,  # [k_splits * parts, batch, kv_heads, tiles * 64, head_dim] float32 (GMEM)
    lse_ref,  # [k_splits * parts, batch, kv_heads, tiles * 64] float32 (GMEM)
    scratch,
    *,
    tiles: int,
    block_k: int,
    num_stages: int,
    k_splits: int,
    warp_specialized: bool,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    interpret: bool,
):
  # Register layouts only mean something to the compiler; interpret mode has no rule for
  # layout_cast (a no-op on values), so it is skipped there.
  cast = (lambda x, _: x) if interpret else plgpu.layout_cast
  (q_smem,  # [64, head_dim]
   k_smem,  # [num_stages, block_k, head_dim]
   v_smem,  # [num_stages, block_k, head_dim]
   p_smem,  # [64, block_k], warp-specialised [parts, 64, block_k]: one per compute warpgroup
   lse_smem,  # [64] float32, warp-specialised [parts, 64]
   rowpos_smem,  # [64] int32
   ), barriers = scratch
  q_bar, k_bar, v_bar = barriers[:3]
  consumed = barriers[3] if warp_specialized else None  # [num_stages], one arrival per use
  parts = _PARTS if warp_specialized else 1
  ht, b, s = lax.axis_index("ht"), lax.axis_index("b"), lax.axis_index("s")
  h, t = ht // tiles, ht % tiles
  head_dim = q_smem.shape[1]
  block_size = k_ref.shape[3]
  dtype = k_ref.dtype
  page_keys = min(block_size, block_k)  # keys per TMA copy
  pages = block_k // page_keys
  layer = layer_ref[0]
  row0 = t * _ROWS

  # The steps of block_k keys (aligned to block_k) that hold the tile's key range, and this
  # split's contiguous share of them.
  lo, hi = ranges_ref[b, ht, 0], ranges_ref[b, ht, 1]
  first = (lo // block_k) * block_k
  n_steps = jnp.where(hi > lo, (hi - first + block_k - 1) // block_k, 0)
  per_split = (n_steps + k_splits - 1) // k_splits
  step_lo = jnp.minimum(s * per_split, n_steps)
  n_local = jnp.minimum(step_lo + per_split, n_steps) - step_lo

  def load_q():
    plgpu.copy_gmem_to_smem(q_ref.at[b, h, pl.ds(row0, _ROWS)], q_smem, q_bar.at[0])
    plgpu.copy_gmem_to_smem(row_pos_ref.at[b, pl.ds(row0, _ROWS)], rowpos_smem, q_bar.at[1])

  def issue(i, slot):
    """Starts the TMA copies of local step ``i``'s pages into stage ``slot``."""
    start = first + (step_lo + i) * block_k
    for p in range(pages):
      key = start + p * page_keys
      blk = tables_ref[b, key // block_size]
      src = (layer, h, blk, pl.ds(key % block_size, page_keys))
      dst = pl.ds(p * page_keys, page_keys)
      plgpu.copy_gmem_to_smem(k_ref.at[src], k_smem.at[slot, dst], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[src], v_smem.at[slot, dst], v_bar.at[slot])

  def prologue():
    for i in range(num_stages):
      pl.when(i < n_local)(functools.partial(issue, i, i))

  def compute(part, n_mine, step_of, release):
    """One warpgroup's online softmax over local steps ``step_of(j)``, ``j < n_mine``.

    ``release(i, slot)`` runs once a step's two ``wgmma`` have read its stage. The partial
    result goes to split ``s * parts + part`` of the outputs.
    """
    plgpu.barrier_wait(q_bar.at[0])
    plgpu.barrier_wait(q_bar.at[1])
    layout = plgpu.Layout.WGMMA
    row_pos = cast(rowpos_smem[...], layout.reduce(1))  # [64]
    row_pos = lax.broadcast_in_dim(row_pos, (_ROWS, block_k), [0])
    key_iota = cast(lax.broadcasted_iota(jnp.int32, (_ROWS, block_k), 1), layout)
    v_row_iota = cast(lax.broadcasted_iota(jnp.int32, (block_k, head_dim), 0), layout)
    logit_scale = scale if soft_cap is not None else scale * _LOG2E
    # Per compute warpgroup; the one-warpgroup kernel keeps the 2-D tiles compiled on the H200.
    p_tile = p_smem.at[part] if warp_specialized else p_smem
    lse_tile = lse_smem.at[part] if warp_specialized else lse_smem

    def body(j, carry):
      acc, m, l = carry  # [64, head_dim], [64], [64] float32 (m: base-2 running max)
      i = step_of(j)
      slot = lax.rem(i, num_stages)
      start = first + (step_lo + i) * block_k

      plgpu.barrier_wait(k_bar.at[slot])

      def qk(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
        return acc_ref[...]

      logits = pl.run_scoped(qk, plgpu.ACC((_ROWS, block_k), jnp.float32))  # [64, block_k]
      logits = logits * logit_scale
      if soft_cap is not None:
        logits = (soft_cap * _LOG2E) * jnp.tanh(logits / soft_cap)
      kpos = start + key_iota
      # A null table entry below the length is a hole (a block free_outside_window freed):
      # its keys are gone, masked like keys past the length, and its V rows zeroed below.
      nulls = [tables_ref[b, (start + p * page_keys) // block_size] == 0 for p in range(pages)]
      # Each hole's page index (-1: not a hole), compared as int32: a scalar bool broadcast to
      # a register layout does not lower on every JAX version.
      hole_pages = [jnp.where(null, p, -1) for p, null in enumerate(nulls)]
      visible = (kpos <= row_pos) & (kpos >= lo) & (kpos < hi)
      for hp in hole_pages:
        visible = visible & (key_iota // page_keys != hp)
      if sliding_window is not None:
        visible = visible & (kpos > row_pos - sliding_window)
      logits = jnp.where(visible, logits, -jnp.inf)
      m_new = jnp.maximum(m, logits.max(axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      alpha = jnp.exp2(m - m_safe)
      p = jnp.exp2(logits - lax.broadcast_in_dim(m_safe, logits.shape, [0]))  # 0 where masked
      l = alpha * l + p.sum(axis=1)
      p_tile[...] = p.astype(dtype)

      plgpu.barrier_wait(v_bar.at[slot])

      # Slots outside [lo, hi) (past the length, before the window) may hold stale NaN / Inf:
      # zero their V rows, so that p == 0 never meets them in p @ v.
      any_null = functools.reduce(jnp.logical_or, nulls)

      @pl.when((start < lo) | (start + block_k > hi) | any_null)
      def _():
        vpos = start + v_row_iota
        v = cast(v_smem[slot], layout)
        keep = (vpos >= lo) & (vpos < hi)
        for hp in hole_pages:
          keep = keep & (v_row_iota // page_keys != hp)
        v_smem[slot] = jnp.where(keep, v, jnp.zeros((), dtype))

      plgpu.commit_smem()

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p_tile, v_smem.at[slot])
        return acc_ref[...]

      pv = pl.run_scoped(pv, plgpu.ACC((_ROWS, head_dim), jnp.float32))
      acc = lax.broadcast_in_dim(alpha, acc.shape, [0]) * acc + pv
      release(i, slot)  # both wgmmas have completed: the stage may be refilled
      return acc, m_new, l

    acc = cast(jnp.zeros((_ROWS, head_dim), jnp.float32), layout)
    m = cast(jnp.full((_ROWS,), -jnp.inf, jnp.float32), layout.reduce(1))
    l = cast(jnp.zeros((_ROWS,), jnp.float32), layout.reduce(1))
    acc, m, l = lax.fori_loop(0, n_mine, body, (acc, m, l))

    seen = l != 0.0  # a NaN l (NaN or overflowing logits) is seen: output and LSE NaN
    l_safe = jnp.where(seen, l, 1.0)
    split = s * parts + part
    # The partial output goes straight from registers to GMEM (a float32 staging tile would not
    # fit beside two head_dim-256 stages).
    o_ref[split, b, h, pl.ds(row0, _ROWS)] = jnp.where(
        lax.broadcast_in_dim(seen, acc.shape, [0]),
        acc / lax.broadcast_in_dim(l_safe, acc.shape, [0]), 0.0)
    lse_tile[...] = jnp.where(seen, m * _LN2 + jnp.log(l_safe), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(lse_tile, lse_ref.at[split, b, h, pl.ds(row0, _ROWS)])
    plgpu.wait_smem_to_gmem(0)

  if not warp_specialized:
    # One warpgroup: it issues step i + num_stages into the slot step i just released.
    def refill(i, slot):
      pl.when(i + num_stages < n_local)(functools.partial(issue, i + num_stages, slot))

    load_q()
    prologue()
    compute(0, n_local, lambda j: j, refill)
    return

  # Warp specialisation: warpgroup 2 only issues copies; compute warpgroups 0 and 1 take the
  # even and odd local steps (with an even number of stages each slot has one consumer, whose
  # waits then see every phase of its barriers), each with its own online softmax, merged with
  # the splits by the wrapper. A consumer arrives on ``consumed[slot]`` when done with a stage;
  # the producer waits for that before refilling it, and at the end for each slot's last use.
  wg = lax.axis_index("wg")

  @pl.when(wg == _PARTS)
  def _producer():
    if not interpret:
      plgpu.set_max_registers(40, action="decrease")
    load_q()
    prologue()

    def refill(i, _):
      slot = lax.rem(i, num_stages)
      plgpu.barrier_wait(consumed.at[slot])
      issue(i, slot)

    lax.fori_loop(num_stages, jnp.maximum(n_local, num_stages), refill, None)
    for slot in range(num_stages):
      pl.when(slot < n_local)(functools.partial(plgpu.barrier_wait, consumed.at[slot]))

  @pl.when(wg < _PARTS)
  def _consumer():
    if not interpret:
      plgpu.set_max_registers(232, action="increase")

    def release(_, slot):
      plgpu.commit_smem()  # order this warpgroup's shared-memory accesses before the refill
      plgpu.barrier_arrive(consumed.at[slot])

    compute(wg, (n_local - wg + _PARTS - 1) // _PARTS, lambda j: _PARTS * j + wg, release)


# ---------------------------------------------------------------------------------------------
# pallas call.


def _call_kernel(layer, ranges, tables, row_pos, q, k_pool, v_pool, *, tiles, block_k,
                 num_stages, k_splits, warp_specialized, scale, soft_cap, sliding_window,
                 interpret):
  batch, kv_heads, rows_padded, head_dim = q.shape
  dtype = k_pool.dtype
  kernel = functools.partial(
      _attention_kernel, tiles=tiles, block_k=block_k, num_stages=num_stages,
      k_splits=k_splits, warp_specialized=warp_specialized, scale=scale, soft_cap=soft_cap,
      sliding_window=sliding_window, interpret=interpret)
  pages = block_k // min(k_pool.shape[3], block_k)
  parts = _PARTS if warp_specialized else 1
  barriers = [plgpu.Barrier(num_barriers=2),
              plgpu.Barrier(num_arrivals=pages, num_barriers=num_stages),
              plgpu.Barrier(num_arrivals=pages, num_barriers=num_stages)]
  if warp_specialized:
    barriers.append(plgpu.Barrier(num_arrivals=1, num_barriers=num_stages))  # consumed
  ws = dict(collective_axes="wg") if warp_specialized else {}
  per_part = (parts,) if warp_specialized else ()  # a p and an LSE tile per compute warpgroup

  def entry(*refs):
    pl.run_scoped(
        lambda *scratch: kernel(*refs, scratch),
        (_smem((_ROWS, head_dim), dtype),
         _smem((num_stages, block_k, head_dim), dtype),
         _smem((num_stages, block_k, head_dim), dtype),
         # wgmma wants both operands of p @ v in one swizzle: v's.
         _smem((*per_part, _ROWS, block_k), dtype, _swizzle(head_dim, jnp.dtype(dtype).itemsize)),
         plgpu.SMEM((*per_part, _ROWS), jnp.float32),
         plgpu.SMEM((_ROWS,), jnp.int32)),
        tuple(barriers),
        **ws,
    )

  out_type = (jax.ShapeDtypeStruct((k_splits * parts, batch, kv_heads, rows_padded, head_dim),
                                   jnp.float32),
              jax.ShapeDtypeStruct((k_splits * parts, batch, kv_heads, rows_padded),
                                   jnp.float32))
  threads = dict(num_threads=parts + 1, thread_name="wg") if warp_specialized else {}
  return plgpu.kernel(
      entry, out_type=out_type, grid=(kv_heads * tiles, batch, k_splits),
      grid_names=("ht", "b", "s"),
      interpret=(interpret_params(interpret == "races") if interpret else None),
      kernel_name=(f"paged_attention_mgpu_k{block_k}_st{num_stages}_s{k_splits}"
                   f"{'_ws' if warp_specialized else ''}"),
      **threads,
  )(layer, ranges, tables, row_pos, q, k_pool, v_pool)


# ---------------------------------------------------------------------------------------------
# Public entry.


def paged_attention_mgpu(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *,
                         scale: float, soft_cap: float | None = None,
                         sliding_window: int | None = None, return_lse: bool = False,
                         block_k: int | None = None, num_stages: int | None = None,
                         k_splits: int | None = None, warp_specialized: bool = False,
                         interpret: bool | str = False, k_scale=None, v_scale=None):
  """Paged attention with a Mosaic GPU kernel; contract in ``reference.py``.

  Args:
    q: ``[batch, q_len, q_heads, head_dim]``.
    k_pool, v_pool: ``[layers, kv_heads, num_blocks, block_size, head_dim]``, bfloat16 or
      float16.
    layer: ``int32[]``, may be traced.
    block_tables: ``int32[batch, table_width]``; kv_lens, q_lens: ``int32[batch]``.
    scale, soft_cap, sliding_window, return_lse: as in the contract.
    block_k, num_stages, k_splits: tuning knobs (``None``: :func:`default_knobs`).
    warp_specialized: a producer warpgroup issues the copies while two compute warpgroups
      take alternate steps (``None`` knobs then take the warp-specialised defaults).
    interpret: run in Mosaic GPU interpret mode (any backend; slow, for tests); ``"races"``
      also runs JAX's race detector (:func:`races_found`).
    k_scale, v_scale: must be None (quantised caches are not supported: see
      :func:`check_supported`).

  Returns:
    ``out [batch, q_len, q_heads, head_dim]`` in ``q.dtype``, and with ``return_lse`` also
    ``lse float32[batch, q_len, q_heads]``.

  Raises:
    ValueError: a non-GPU backend without ``interpret=True``, an unsupported pool, bad knobs.
  """
  if not interpret and _backend() not in GPU_BACKENDS:
    raise ValueError(
        f"implementation='pallas_mgpu' compiles a Mosaic GPU kernel for NVIDIA sm90+, but JAX's "
        f"default backend is {_backend()!r}. Pass interpret=True to run it in Mosaic GPU "
        "interpret mode (slow; for tests), or use implementation='xla' (or None).")
  batch, q_len, q_heads, head_dim = q.shape
  num_layers, kv_heads, num_blocks, block_size, _ = k_pool.shape
  if k_scale is not None or v_scale is not None:
    from jax_paged_kv.cache import quant
    check_supported(k_pool.dtype, block_size, head_dim,
                    kv_quant=quant.format_of(k_pool.dtype) or "?")
  if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype:
    raise ValueError(f"k_pool {k_pool.shape} {k_pool.dtype} and v_pool {v_pool.shape} "
                     f"{v_pool.dtype} must match")
  if k_pool.shape[-1] != head_dim or q_heads % kv_heads:
    raise ValueError(f"q {q.shape} does not fit pools {k_pool.shape}")
  group = q_heads // kv_heads
  rows = q_len * group
  tiles = -(-rows // _ROWS)
  max_blocks = block_tables.shape[1]
  itemsize = jnp.dtype(k_pool.dtype).itemsize
  knobs = default_knobs(head_dim=head_dim, block_size=block_size, rows=rows, batch=batch,
                        kv_heads=kv_heads, max_blocks=max_blocks, itemsize=itemsize,
                        warp_specialized=warp_specialized)
  given = dict(block_k=block_k, num_stages=num_stages, k_splits=k_splits)
  knobs.update({k: v for k, v in given.items() if v is not None})
  check_supported(k_pool.dtype, block_size, head_dim, block_k=knobs["block_k"])
  _check_knobs(**knobs, head_dim=head_dim, block_size=block_size, itemsize=itemsize)
  if interpret and knobs["warp_specialized"]:
    reason = warp_specialized_interpret_problem()
    if reason is not None:
      raise ValueError(reason)
  block_k = knobs["block_k"]

  kv_lens = jnp.clip(kv_lens.astype(jnp.int32), 0, max_blocks * block_size)
  q_lens = jnp.clip(q_lens.astype(jnp.int32), 0, jnp.minimum(kv_lens, q_len))
  layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, num_layers - 1).reshape(1)
  # Rows: [batch, q_len, q_heads, D] -> [batch, kv_heads, rows (token-major), D], padded.
  qr = q.astype(k_pool.dtype).reshape(batch, q_len, kv_heads, group, head_dim)
  qr = qr.transpose(0, 2, 1, 3, 4).reshape(batch, kv_heads, rows, head_dim)
  qr = jnp.pad(qr, ((0, 0), (0, 0), (0, tiles * _ROWS - rows), (0, 0)))
  tok = jnp.arange(tiles * _ROWS, dtype=jnp.int32) // group  # [rows_padded]
  q_start = kv_lens - q_lens  # [batch]
  row_ok = (tok[None, :] < q_lens[:, None]) & (jnp.arange(tiles * _ROWS) < rows)[None, :]
  row_pos = jnp.where(row_ok, q_start[:, None] + tok[None, :], _NO_ROW)  # [batch, rows_padded]
  # Each tile's key range [lo, hi): up to its last valid row's position, from its first row's
  # window start. An empty range (no valid row) has hi <= lo.
  first_tok = jnp.arange(tiles) * _ROWS // group  # [tiles]
  last_tok = jnp.minimum(((jnp.arange(tiles) + 1) * _ROWS - 1) // group, q_len - 1)
  last_tok = jnp.minimum(last_tok[None, :], q_lens[:, None] - 1)  # [batch, tiles]
  hi = jnp.minimum(q_start[:, None] + last_tok + 1, kv_lens[:, None])
  lo = jnp.zeros_like(hi)
  if sliding_window is not None:
    lo = jnp.maximum(q_start[:, None] + first_tok[None, :] - sliding_window + 1, 0)
  hi = jnp.where(first_tok[None, :] < q_lens[:, None], hi, 0)
  ranges = jnp.stack([lo, hi], axis=-1)  # [batch, tiles, 2]
  ranges = jnp.tile(ranges, (1, kv_heads, 1))  # [batch, kv_heads * tiles, 2], head-major
  # Room for the last step to read whole pages past the table end (null block 0, masked).
  tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, max(1, block_k // block_size))))

  o, lse = _call_kernel(
      layer, ranges, tables, row_pos, qr, k_pool, v_pool, tiles=tiles, block_k=block_k,
      num_stages=knobs["num_stages"], k_splits=knobs["k_splits"],
      warp_specialized=knobs["warp_specialized"], scale=float(scale),
      soft_cap=None if soft_cap is None else float(soft_cap), sliding_window=sliding_window,
      interpret=interpret)
  o, lse = o[..., :rows, :], lse[..., :rows]
  if o.shape[0] == 1:
    o, lse = o[0], lse[0]
  else:
    o, lse = _merge_partials(o, lse)
  # NaN logits (a NaN query, or a NaN K of a key it sees) leave that query's LSE NaN, and its
  # output stays NaN through the exact path below (the contract).
  o = o.reshape(batch, kv_heads, q_len, group, head_dim).transpose(0, 2, 1, 3, 4)
  out = o.reshape(batch, q_len, q_heads, head_dim)
  lse = lse.reshape(batch, kv_heads, q_len, group).transpose(0, 2, 1, 3)
  lse = lse.reshape(batch, q_len, q_heads)
  # A non-finite V in some row's range made its tile non-finite: recompute by the contract.
  exact = functools.partial(reference._nonfinite_v_paged, scale=float(scale), soft_cap=soft_cap,
                            sliding_window=sliding_window)
  out = out.astype(q.dtype)
  out = lax.cond(jnp.any(~jnp.isfinite(out)), reference.keep_finite_queries(exact, out),
                 lambda *_: out,
                 q, k_pool, v_pool, layer[0], block_tables, kv_lens, q_lens, lse, None, None)
  return (out, lse) if return_lse else out


def _merge_partials(o, lse):
  """Merges ``k_splits`` partial attentions (finite here: see the non-finite V rule)."""
  m = lse.max(axis=0)  # NaN if a split's LSE is NaN (its logits were)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  w = jnp.exp(lse - m_safe[None])  # [k_splits, ...]; 0 for empty splits
  denom = w.sum(axis=0)
  seen = denom != 0.0  # NaN is seen: the merged output and LSE stay NaN
  denom_safe = jnp.where(seen, denom, 1.0)
  out = jnp.einsum("s...,s...d->...d", w, o, precision=lax.Precision.HIGHEST)
  out = jnp.where(seen[..., None], out / denom_safe[..., None], 0.0)
  return out, jnp.where(seen, m_safe + jnp.log(denom_safe), -jnp.inf)


# ---------------------------------------------------------------------------------------------
# Interpret mode.


_WS_INTERPRET_THREADS = 4  # the kernel's callback, blocked while its 3 warpgroups run


def _xla_cpu_threads() -> int:
  """The size of XLA's CPU thread pool: ``PJRT_NPROC`` / ``NPROC``, else the usable cores."""
  for var in ("PJRT_NPROC", "NPROC"):
    try:
      return max(0, int(os.environ[var]))
    except (KeyError, ValueError):
      pass
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - not Linux
    return os.cpu_count() or 1


def warp_specialized_interpret_problem() -> str | None:
  """Why the warp-specialised kernel cannot run in interpret mode here, or None.

  JAX 0.10's GPU interpreter runs each warpgroup as a program on XLA's CPU thread pool, and a
  warpgroup waiting on a barrier holds its thread: with fewer than 4 threads (the kernel's
  callback, blocked until its 3 warpgroups finish, plus those 3) it can deadlock. That is a
  machine with fewer than 4 cores unless ``PJRT_NPROC=4`` (read when JAX starts its CPU
  client) raises the pool. JAX 0.11's interpreter ran every case on 2 cores.
  """
  from jax_paged_kv.attention import api  # the dispatcher imports this module lazily

  if api.jax_version() >= (0, 11) or _xla_cpu_threads() >= _WS_INTERPRET_THREADS:
    return None
  return (f"warp_specialized=True in interpret mode needs {_WS_INTERPRET_THREADS} XLA CPU "
          f"threads on JAX {jax.__version__} (its GPU interpreter runs each of the 3 "
          f"warpgroups on that pool and would deadlock on {_xla_cpu_threads()}): set "
          f"PJRT_NPROC={_WS_INTERPRET_THREADS} before JAX starts, or use JAX >= 0.11")


def interpret_params(detect_races: bool = False):
  """Mosaic GPU interpret-mode parameters for this JAX.

  Uninitialised memory is NaN and out-of-bounds reads raise. ``detect_races`` turns on JAX's
  happens-before race detector (TMA copies against the reads and writes of the warpgroup); read
  the verdict with :func:`races_found` after the call.
  """
  from jax._src.pallas.mosaic_gpu.interpret import params as interpret_module
  _patch_transposed_wgmma_operands()
  return interpret_module.InterpretGPUParams(uninitialized_memory="nan",
                                             out_of_bounds_reads="raise",
                                             detect_races=detect_races)


def races_found() -> bool:
  """Whether the last interpret-mode call with ``detect_races`` found a data race."""
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  return bool(gpu_callbacks.get_races().races_found)


_PATCHED = []


def _patch_transposed_wgmma_operands():
  """Teaches JAX 0.10's interpret-mode ``wgmma`` to read a transposed operand.

  That version's callback reads each operand through ``to_range``, which takes only indexers:
  ``plgpu.transpose_ref`` (how ``q @ k.T`` is written for the compiled kernel, as in JAX's own
  ``attention_mgpu``) raises ``AttributeError``. The shim drops trailing transposes from the
  operand's transforms, reads it, and transposes the array; everything else is JAX's code.
  Installed once, only where the callback has that signature (JAX 0.10.x).
  """
  if _PATCHED:
    return
  from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
  from jax._src.state import types as state_types

  original = gpu_callbacks.wgmma
  if "device_id" not in original.__code__.co_varnames:  # a newer interpreter: leave it be
    _PATCHED.append(original)
    return
  import numpy as np

  def split(transforms):
    perms = []
    transforms = tuple(transforms)
    while transforms and isinstance(transforms[-1], state_types.TransposeTransform):
      perms.insert(0, transforms[-1].permutation)
      transforms = transforms[:-1]
    return transforms, perms

  lock = threading.Lock()

  def wgmma(**kw):
    # The warp-specialised kernel's warpgroups run concurrently (one host thread each): one
    # wgmma at a time swaps the getter below, and it transposes only its own thread's reads.
    with lock:
      return transposing_wgmma(**kw)

  def transposing_wgmma(*, a_transforms, b_transforms, **kw):
    a_transforms, a_perms = split(a_transforms)
    b_transforms, b_perms = split(b_transforms)
    if not a_perms and not b_perms:
      return original(a_transforms=a_transforms, b_transforms=b_transforms, **kw)
    memory = gpu_callbacks._get_shared_memory()
    get = memory.get_buffer_content
    owner = threading.get_ident()

    def transposed_get(key, rng, *args, **kwargs):
      out = get(key, rng, *args, **kwargs)
      if threading.get_ident() != owner:  # another warpgroup's read (e.g. a TMA copy)
        return out
      perms = (a_perms if key == gpu_callbacks.HostAllocationKey.from_array(
          kw["a_allocation_key_as_array"]) else b_perms)
      if key == gpu_callbacks.HostAllocationKey.from_array(kw["acc_allocation_key_as_array"]):
        perms = []
      value = out[0]
      for perm in perms:
        value = np.transpose(value, perm)
      return (value, *out[1:])

    memory.get_buffer_content = transposed_get
    try:
      return original(a_transforms=a_transforms, b_transforms=b_transforms, **kw)
    finally:
      del memory.get_buffer_content

  gpu_callbacks.wgmma = wgmma
  _PATCHED.append(original)
