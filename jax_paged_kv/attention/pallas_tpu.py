"""Mosaic TPU Pallas paged attention: decode, chunked prefill and mixed batches.

Same contract as :func:`jax_paged_kv.attention.reference.paged_attention_xla` (see the module
docstring of ``reference.py``); registered as ``implementation="pallas_tpu"``.

Design
------
* **Grid** ``(batch, kv_heads, q_blocks)``, every axis ``"parallel"``: one grid step owns one
  row, one KV head and one block of ``queries_per_block`` queries, with *all* ``G = q_heads //
  kv_heads`` query heads of that KV group stacked in one ``[R, head_dim]`` tile (``R =
  queries_per_block * G`` rounded up to the dtype's sublane tile), so any GQA/MQA ratio is one
  matmul per KV block. No state survives a grid step, so the steps are independent (megacore
  may split any axis).
* **Scalar prefetch**: the layer, the flattened block tables and the per-row KV / query lengths
  live in SMEM before the kernel starts; the pools stay in HBM (``memory_space=ANY``).
* **DMA**: each compute block is ``pages_per_compute_block`` pages; each page of this layer and
  KV head (one contiguous ``[block_size, head_dim]`` tile of the pool) is copied with its own
  ``make_async_copy`` into a VMEM buffer ``[2, pages, block_size, head_dim]``. The two slots
  double-buffer: the copies of block ``c + 1`` are started before block ``c`` is waited on and
  computed, so the next pages' DMA overlaps the current block's compute.
* **Skipped pages**: a query block only visits pages that hold a key some query in it may see
  (``[window start, last query position]``), so pages past a row's length (and pages before a
  sliding window) are never copied; empty rows and query blocks past ``q_lens`` copy nothing.
* **Masking** is ``where`` on the logits *and* on the value rows outside the block's key range
  ``[lo, hi)``, so NaN or stale data in unused slots, skipped pages or never-written VMEM
  cannot leak. Online softmax in float32; a query that sees nothing gives 0 and LSE ``-inf``.
* **Non-finite V** (the contract: NaN / Inf reaches exactly the queries that see that key).
  Zeroing value rows is per block, not per query: inside ``[lo, hi)`` a prefill tile's rows
  see different keys (causal, window), and ``p @ v`` gives ``0 * NaN = NaN`` to the rows that
  do not see it. That leaves ``acc`` non-finite, which one reduction checks after the loop;
  only then (``pl.when``) the grid step fetches and attends its blocks again by the rule:
  finite values through ``p``, plus +-Inf per row and dim from two 0/1 matmuls (visible keys
  x V's +Inf/NaN and -Inf/NaN flags). The fast loop is unchanged.

Supported configurations (checked at trace time with a ``ValueError``)
----------------------------------------------------------------------
TPU vregs and (8, 128)-tiled memory hold 32-bit data as ``[8, 128]`` tiles and 16-bit data
packed as ``[16, 128]`` tiles. The kernel concatenates the pages of a compute block along the
sublane (token) axis, which is only a free relayout when every page is a whole number of sublane
tiles, so:

* ``float32`` pools: ``block_size % 8 == 0``.
* ``bfloat16`` / ``float16`` pools: ``block_size % 16 == 0`` (a page of 8 packed rows is half a
  tile; merging such pages needs a sublane shuffle Mosaic does not do for packed types).
* Quantised pools (``kv_quant``: int8, float8_e4m3fn, int4's packed uint8) hold 8-bit data,
  packed ``[32, 128]`` tiles: ``block_size % 32 == 0``. int4 also needs ``head_dim`` to be a
  multiple of its V group (32), or smaller than one.
* Other pool dtypes (float64, unquantised 8-bit floats, ...) are rejected.
* ``head_dim`` is not restricted: every block covers the whole ``head_dim`` axis, which is
  lane-padded to 128 in memory (``head_dim % 128 != 0`` works but wastes lanes and bandwidth).

The query/output tiles are padded to whole sublane tiles (>= 8 rows), so no DMA is smaller than
one tile: the failure class of jax-ml/jax#23825 (a sub-tile q block tripping the DMA granule on
TPU v3) does not arise here.

Known limits: the flattened block tables live in SMEM (``4 * batch * max_blocks`` bytes), so a
very large batch times table width can exceed it (split the batch); the first compute block of
every grid step is not prefetched during the previous step (the steps are independent so that
they can be ``"parallel"``), so a row with a single compute block waits for its DMA.

Quantised caches (``cache/quant.py``): each page's scales are copied beside it; the 8-bit
pages are converted in VMEM. Per-token scales (fp8 K, int8 / fp8 V) weight the logits or the
probabilities per key; per-(block, channel) K scales multiply each page's codes as they are
converted (a sublane broadcast of the page's ``[1, head_dim]`` scale row: on a TPU the pages of
a compute block are one matmul, so folding a different scale into q per page would cost one
narrow matmul per page instead); int4 V's per-(token, group) scales are spread over their
channels by a 0/1 matmul (exact: one product per output) and multiply the codes. int4 keeps
the low and high nibbles apart as two channel halves, in q, the accumulator and the output too,
so no lane shuffle is needed.

Verification: the TPU interpreter (``interpret=pltpu.InterpretParams()``) runs it on CPU with
race detection and out-of-bounds checks, and ``jax.export(..., platforms=["tpu"])`` lowers it to
Mosaic; it has not been compiled by libtpu or run on a real TPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jax_paged_kv.cache import quant

# `pl.ANY` is the memory space "leave it where XLA put it" (HBM for the pools); newer JAX may
# only spell it on the TPU module.
_ANY = getattr(pl, "ANY", None) or pltpu.MemorySpace.ANY
# A squeezed block dimension: `pl.squeezed` where it exists (newer JAX deprecates `None`).
_SQUEEZED = getattr(pl, "squeezed", None)
_PARALLEL = getattr(pltpu, "PARALLEL", "parallel")
_LANES = 128
_SUBLANES = {4: 8, 2: 16, 1: 32}  # itemsize -> rows of one (packed) [rows, 128] tile
_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_QUANT_DTYPES = {f: quant.storage_dtype(f) for f in ("int8", "fp8", "int4")}
_TARGET_KV_PER_BLOCK = 256  # default keys per compute block
_TARGET_Q_ROWS = 256  # default q rows (queries x group heads) per tile


def sublane_tile(dtype) -> int:
  """Rows of one native ``[rows, 128]`` VMEM tile for ``dtype`` (8 for 32-bit, 16 for 16-bit)."""
  return _SUBLANES[jnp.dtype(dtype).itemsize]


def check_supported(dtype, block_size: int, head_dim: int, *, kv_quant: str | None = None) -> None:
  """Raises ``ValueError`` for pool layouts this kernel cannot tile on a TPU.

  With ``kv_quant`` (``"int8"`` / ``"fp8"`` / ``"int4"``) ``dtype`` must be that format's
  storage dtype (int8 / float8_e4m3fn / packed uint8), whose packed tiles are 32 rows.
  """
  dtype = jnp.dtype(dtype)
  if kv_quant is not None:
    if _QUANT_DTYPES.get(kv_quant) != dtype:
      raise ValueError(f"pallas_tpu supports kv_quant in {sorted(_QUANT_DTYPES)} (int8 / "
                       f"float8_e4m3fn / packed uint8 pools), got {kv_quant=} with {dtype} "
                       "pools; use implementation='xla'")
    if kv_quant == "int4" and (head_dim % 2 or head_dim % quant.int4_group(head_dim)):
      raise ValueError(f"pallas_tpu needs an even head_dim that is a multiple of the int4 "
                       f"group ({quant.INT4_GROUP}) for kv_quant='int4', got {head_dim=}")
  elif dtype not in _SUPPORTED_DTYPES:
    raise ValueError(
        f"pallas_tpu paged attention supports float32, bfloat16 and float16 pools, got "
        f"{dtype}; use implementation='xla'")
  tile = sublane_tile(dtype)
  if block_size % tile:
    raise ValueError(
        f"pallas_tpu needs block_size to be a multiple of {tile} for {dtype} pools (one "
        f"[{tile}, 128] TPU tile per page), got {block_size=}; use a block_size that is a "
        f"multiple of {tile} or implementation='xla'")


def _backend() -> str:
  return jax.default_backend()


def _interpret_params(interpret):
  """Normalizes the ``interpret`` knob; raises off-TPU when it is missing."""
  if interpret is None or interpret is False:
    backend = _backend()
    if backend != "tpu":
      raise ValueError(
          f"implementation='pallas_tpu' compiles a Mosaic TPU kernel, but the default backend "
          f"is {backend!r}. To run it on CPU through the TPU interpreter, pass "
          "interpret=pltpu.InterpretParams() (or interpret=True), with "
          "`from jax.experimental.pallas import tpu as pltpu`; or use implementation='xla'.")
    return False
  if interpret is True:
    return pltpu.InterpretParams()
  if not isinstance(interpret, pltpu.InterpretParams):
    raise ValueError(f"interpret must be None, a bool or pltpu.InterpretParams, got "
                     f"{interpret!r}")
  return interpret


def _positive_int(name, value):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


def _run_all(copies, method):
  for copy in copies:
    getattr(copy, method)()


def _paged_attention_kernel(
    # scalar prefetch (SMEM)
    layer_ref,  # int32[1]
    tables_ref,  # int32[batch * max_blocks]
    kv_lens_ref,  # int32[batch]
    q_lens_ref,  # int32[batch]
    # inputs
    q_ref,  # [halves, R, head_dim / halves] (this row, KV head and query block)
    k_hbm,  # [layers, kv_heads, num_blocks, block_size, stored_dim] (HBM; int4: head_dim / 2)
    v_hbm,  # [layers, kv_heads, num_blocks, block_size, stored_dim] (HBM)
    *rest,  # (ks_hbm, vs_hbm if quantised: the layout of quant.scale_shapes), then outputs
    #         o_ref [halves, R, head_dim / halves] (and lse_ref [R, 128] if return_lse), then
    #         scratch
    max_blocks: int,
    pages: int,
    block_size: int,
    queries_per_block: int,
    group: int,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    return_lse: bool,
    compute_dtype,
    k_mode: str | None,
    v_mode: str | None,
):
  quantized = k_mode is not None
  ks_hbm = vs_hbm = ks_buf = vs_buf = kdq_ref = None
  if quantized:
    ks_hbm, vs_hbm, *rest = rest
  o_ref, *rest = rest
  if return_lse:
    lse_ref, *rest = rest
  k_buf, v_buf, sems, m_ref, l_ref, acc_ref, *rest = rest
  if quantized:
    # K scales: [2, pages, block_size] per key, or [2, pages, 1, head_dim] per channel; V
    # scales: [2, pages, block_size] per key, or [2, pages, block_size, groups] (int4).
    ks_buf, vs_buf, *rest = rest
  if k_mode == "channel":
    kdq_ref, = rest  # [halves, kv_per_block, head_dim / halves]: the scaled K pages
  # k_buf, v_buf: [2, pages, block_size, stored_dim]; sems: DMA[4 (k/v/k scale/v scale), 2]
  # m_ref, l_ref: f32[R, 128] (lane-broadcast); acc_ref: f32[halves, R, head_dim / halves]
  b, h, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  halves, rows, half_dim = q_ref.shape
  head_dim = halves * half_dim
  kv_per_block = pages * block_size
  layer = layer_ref[0]
  kv_len = kv_lens_ref[b]
  q_len = q_lens_ref[b]
  q_start = qi * queries_per_block  # first query index of this block
  n_q = jnp.clip(q_len - q_start, 0, queries_per_block)  # valid queries in this block
  first_pos = kv_len - q_len + q_start  # position of the block's first query
  # Keys [lo, hi) are the only ones any query here may see (the table caps hi for callers
  # that break the contract with kv_lens > max_blocks * block_size).
  hi = jnp.minimum(first_pos + n_q, max_blocks * block_size)
  lo = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
  # lax.div/rem, not // and %: all operands are >= 0 and jnp's floor semantics add sign ops.
  first_page = lax.div(lo, block_size)
  end_page = lax.div(hi + block_size - 1, block_size)
  num_kv_blocks = jnp.where(n_q > 0, lax.div(end_page - first_page + pages - 1, pages), 0)

  def dma(c, slot, method):
    """Starts (or waits for) the K and V page copies of compute block ``c`` into ``slot``."""
    for i in range(pages):
      page = first_page + c * pages + i
      blk = tables_ref[b * max_blocks + jnp.minimum(page, max_blocks - 1)]
      pairs = [(k_hbm.at[layer, h, blk], k_buf), (v_hbm.at[layer, h, blk], v_buf)]
      if quantized:
        # A channel-scale page is one [1, head_dim] row (its own sublane tile in VMEM).
        ks_src = ks_hbm.at[layer, h, pl.ds(blk, 1)] if k_mode == "channel" else ks_hbm.at[
            layer, h, blk]
        pairs += [(ks_src, ks_buf), (vs_hbm.at[layer, h, blk], vs_buf)]
      copies = [pltpu.make_async_copy(src, buf.at[slot, i], sems.at[kv, slot])
                for kv, (src, buf) in enumerate(pairs)]
      # Never copy a page past the block's last visible key (nor wait for one).
      pl.when(page < end_page)(functools.partial(_run_all, copies, method))

  def start(c, slot):
    dma(c, slot, "start")

  def wait(c, slot):
    dma(c, slot, "wait")

  def init_and_start():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    @pl.when(num_kv_blocks > 0)
    def _():
      start(0, 0)

  init_and_start()

  # Per-row query positions; padding rows (r >= queries_per_block * group) see nothing.
  r = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  q_idx = lax.div(r, group)  # query index within the block
  q_pos = first_pos + q_idx  # [R, 1]
  row_ok = (r < queries_per_block * group) & (q_idx < n_q)
  q_parts = [q_ref[j] for j in range(halves)]  # [R, head_dim / halves] each

  def precision(x):  # float32 operands: full float32 products (Mosaic's default may not be)
    return lax.Precision.HIGHEST if x.dtype == jnp.float32 else None

  def exact_dot(x, y):  # 0/1 selection matmuls: each output is one product, exactly
    return lax.dot_general(x, y, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)

  def select(rows_in, j, of):  # 0/1 [rows_in, half_dim]: column c takes row of(j*half_dim + c)
    row = lax.broadcasted_iota(jnp.int32, (rows_in, half_dim), 0)
    col = lax.broadcasted_iota(jnp.int32, (rows_in, half_dim), 1) + j * half_dim
    return jnp.where(row == of(col), 1.0, 0.0).astype(jnp.float32)

  def codes(x, j):  # stored page values -> float32 (int4: nibble j's codes, channel half j)
    if halves == 1:
      return x.astype(jnp.float32)
    x = x.astype(jnp.int32)
    return (((x & 15) if j == 0 else (x >> 4)) - 8).astype(jnp.float32)

  def k_tiles(slot):
    """K of the compute block: ``halves`` tiles ``[kv_per_block, head_dim / halves]``."""
    if k_mode != "channel":  # float, or int8 / fp8 codes (exact in the compute dtype)
      return [k_buf[slot].astype(compute_dtype).reshape(kv_per_block, -1)]
    # Per (block, channel) scales: each page's codes times its [1, head_dim] scale row (a
    # sublane broadcast, one multiply per value like the conversion itself), stored at the
    # page's rows of kdq_ref. int4 splits the row into the nibble halves with a 0/1 matmul.
    for i in range(pages):
      s_row = ks_buf[slot, i].astype(jnp.float32)  # [1, head_dim]
      page = k_buf[slot, i]  # [block_size, stored_dim]
      for j in range(halves):
        s_j = s_row if halves == 1 else exact_dot(s_row, select(head_dim, j, lambda c: c))
        kdq_ref[j, pl.ds(i * block_size, block_size), :] = (codes(page, j) * s_j).astype(
            compute_dtype)
    return [kdq_ref[j] for j in range(halves)]

  def v_tiles(slot, in_range, exact):
    """V of the compute block: ``halves`` tiles ``[kv_per_block, head_dim / halves]``, rows
    outside [lo, hi) zeroed; float32 and dequantised in the ``exact`` pass."""
    v = v_buf[slot]  # [pages, block_size, stored_dim]
    if v_mode != "group":
      v = v.astype(compute_dtype).reshape(kv_per_block, -1)
      # Rows outside [lo, hi) may be stale, NaN or never-written VMEM: zero them, never
      # multiply.
      v = jnp.where(in_range, v, jnp.zeros((), v.dtype))
      if exact:
        v = v.astype(jnp.float32)
        if quantized:  # the dequantised block (a NaN scale makes the whole key NaN)
          v = v * jnp.where(in_range, vs_buf[slot].reshape(kv_per_block, 1), 0.0)
      return [v]
    # int4: the scale of each (key, group) spread over its channels with a 0/1 matmul [groups,
    # head_dim / 2], so each nibble half is dequantised in one multiply.
    vs = vs_buf[slot].astype(jnp.float32).reshape(kv_per_block, -1)  # [kv, groups]
    width = head_dim // vs.shape[1]  # channels per group
    tiles = []
    for j in range(halves):
      spread = functools.partial(exact_dot, y=select(vs.shape[1], j, lambda c: lax.div(c, width)))
      x = codes(v, j).reshape(kv_per_block, half_dim)
      if not exact:  # a non-finite scale spreads over the key's row: the exact pass follows
        tiles.append(jnp.where(in_range, x * spread(vs), 0.0).astype(compute_dtype))
        continue
      # IEEE per group: finite scales, then +-Inf and NaN by flags (0 * Inf is NaN in a matmul)
      fin = jnp.isfinite(vs)
      x = x * spread(jnp.where(fin, vs, 0.0))
      for bad, value in ((vs == jnp.inf, jnp.inf), (vs == -jnp.inf, -jnp.inf)):
        x = jnp.where(spread(jnp.where(bad, 1.0, 0.0)) > 0, codes(v, j).reshape(x.shape) * value,
                      x)
      x = jnp.where(spread(jnp.where(jnp.isnan(vs), 1.0, 0.0)) > 0, jnp.nan, x)
      tiles.append(jnp.where(in_range, x, 0.0))
    return tiles

  def body(c, carry, *, exact: bool):
    slot = lax.rem(c, 2)

    @pl.when(c + 1 < num_kv_blocks)
    def _():
      start(c + 1, 1 - slot)  # overlaps the next pages' DMA with this block's compute

    wait(c, slot)
    pos0 = (first_page + c * pages) * block_size
    p_col = pos0 + lax.broadcasted_iota(jnp.int32, (1, kv_per_block), 1)  # [1, kv]
    p_row = pos0 + lax.broadcasted_iota(jnp.int32, (kv_per_block, 1), 0)  # [kv, 1]
    # A null table entry below the length is a hole (a block free_outside_window freed): its
    # keys are gone, masked like keys past the length (its page holds the null block's data).
    col_page = lax.div(lax.broadcasted_iota(jnp.int32, (1, kv_per_block), 1), block_size)
    row_page = lax.div(lax.broadcasted_iota(jnp.int32, (kv_per_block, 1), 0), block_size)
    kept_col = jnp.ones((1, kv_per_block), bool)
    kept_row = jnp.ones((kv_per_block, 1), bool)
    for i in range(pages):
      page = first_page + c * pages + i
      null = tables_ref[b * max_blocks + jnp.minimum(page, max_blocks - 1)] == 0
      kept_col &= ~((col_page == i) & null)
      kept_row &= ~((row_page == i) & null)
    s = None
    for qj, kj in zip(q_parts, k_tiles(slot), strict=True):
      part = lax.dot_general(qj, kj, (((1,), (1,)), ((), ())), precision=precision(kj),
                             preferred_element_type=jnp.float32)  # [R, kv]
      s = part if s is None else s + part
    s = s * scale
    if k_mode == "key":  # int8 / fp8 codes -> compute dtype is exact; scales apply per key
      s = s * ks_buf[slot].reshape(1, kv_per_block)  # [1, kv]
    if v_mode == "key":
      # Pages' slots outside [lo, hi) may hold stale or NaN scales: 0 * NaN must not reach p.
      v_sc = jnp.where((p_col >= lo) & (p_col < hi) & kept_col,
                       vs_buf[slot].reshape(1, kv_per_block), 0.0)
    if soft_cap is not None:
      s = soft_cap * jnp.tanh(s / soft_cap)
    mask = row_ok & (p_col <= q_pos) & (p_col < hi) & kept_col  # never past length, no hole
    if sliding_window is not None:
      mask = mask & (p_col > q_pos - sliding_window)
    s = jnp.where(mask, s, -jnp.inf)
    m_prev = m_ref[...]  # [R, 128]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no (-inf) - (-inf)
    p = jnp.where(mask, jnp.exp(s - m_safe[:, :1]), 0.0)  # [R, kv]
    alpha = jnp.exp(m_prev - m_safe)  # 0 while nothing was seen
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_new
    in_range = (p_row >= lo) & (p_row < hi) & kept_row  # [kv, 1]
    for j, v in enumerate(v_tiles(slot, in_range, exact)):
      if not exact:
        pw = p * v_sc if v_mode == "key" else p  # V's per-key scales weight the probabilities
        pv = lax.dot_general(pw.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             precision=precision(v),
                             preferred_element_type=jnp.float32)  # [R, head_dim / halves]
        acc_ref[j] = alpha[:, :1] * acc_ref[j] + pv
        continue
      # The contract for non-finite V: the finite values through p, then per row and dim +Inf
      # for a visible +Inf / NaN key and -Inf for a visible -Inf / NaN key (IEEE addition
      # makes the NaN), counted with two 0/1 matmuls of the same shape as p @ v. Non-finite
      # acc entries are final: alpha (0 after underflow) never multiplies them.
      v32 = v  # float32, dequantised
      op_dt = compute_dtype
      v_fin = jnp.where(jnp.isfinite(v32), v32, 0.0).astype(op_dt)
      pv = lax.dot_general(p.astype(op_dt), v_fin, (((1,), (0,)), ((), ())),
                           precision=precision(v_fin),
                           preferred_element_type=jnp.float32)  # [R, head_dim / halves]
      acc = acc_ref[j]
      acc = jnp.where(jnp.isfinite(acc), alpha[:, :1] * acc, acc) + pv
      seen = jnp.where(mask, 1.0, 0.0).astype(op_dt)  # [R, kv]
      nan = jnp.isnan(v32)
      for inf, hit in ((jnp.inf, nan | (v32 == jnp.inf)), (-jnp.inf, nan | (v32 == -jnp.inf))):
        hits = lax.dot_general(seen, jnp.where(hit, 1.0, 0.0).astype(op_dt),
                               (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)  # [R, head_dim / halves]
        acc = jnp.where(hits > 0.0, acc + inf, acc)
      acc_ref[j] = acc
    return carry

  lax.fori_loop(0, num_kv_blocks, functools.partial(body, exact=False), 0)

  # A non-finite V in any block makes acc non-finite (p @ v multiplies it by every row's p, 0
  # included: 0 * NaN and 0 * Inf are NaN), and so does nothing else but a visible NaN K or an
  # overflow. Only then fetch and attend the blocks again by the contract's rule: the fast
  # loop stays as it was, and the check costs one reduction over acc.
  @pl.when(jnp.any(~jnp.isfinite(acc_ref[...])))
  def _():
    init_and_start()
    lax.fori_loop(0, num_kv_blocks, functools.partial(body, exact=True), 0)

  l = l_ref[...]
  seen = l != 0.0  # a NaN l (NaN or overflowing logits) is seen: its output and LSE are NaN
  inv = 1.0 / jnp.where(seen, l, 1.0)
  for j in range(halves):
    o_ref[j] = jnp.where(seen[:, :1], acc_ref[j] * inv[:, :1], 0.0).astype(o_ref.dtype)
  if return_lse:
    lse_ref[...] = jnp.where(seen, m_ref[...] + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def paged_attention_tpu(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *,
                        scale: float, soft_cap: float | None = None,
                        sliding_window: int | None = None, return_lse: bool = False,
                        pages_per_compute_block: int | None = None,
                        queries_per_block: int | None = None, interpret=None,
                        k_scale=None, v_scale=None):
  """Paged attention as one Mosaic TPU kernel (contract: ``reference.py``).

  Args:
    q: ``[batch, q_len, q_heads, head_dim]``.
    k_pool, v_pool: ``[layers, kv_heads, num_blocks, block_size, head_dim]``.
    layer: ``int32[]``, may be traced.
    block_tables: ``int32[batch, max_blocks]``.
    kv_lens, q_lens: ``int32[batch]``.
    scale, soft_cap, sliding_window, return_lse: as in the contract.
    pages_per_compute_block: pages fetched and attended per inner step (default: about 256
      keys, at most ``max_blocks``).
    queries_per_block: queries per grid step (default: all ``q_len`` queries, capped so that a
      tile holds about 256 query rows).
    interpret: ``None``/``False`` to compile for a TPU; ``pltpu.InterpretParams(...)`` (or
      ``True``) to run the TPU interpreter on any backend.
    k_scale, v_scale: the scales of a quantised cache (both or neither), in the layout of
      ``quant.scale_shapes`` for the pools' format; each page's scales are copied beside it.
      int8 / fp8 pages are converted exactly to the compute dtype in VMEM. K scales per token
      (``[layers, kv_heads, num_blocks, block_size]``) multiply the logits per key; per
      (block, channel) (``[layers, kv_heads, num_blocks, head_dim]``, a ``[1, head_dim]`` row
      per page) they multiply the page's codes as it is converted (a sublane broadcast). V
      scales per token multiply the probabilities before ``p @ v``; int4's per (token, group)
      are spread over their channels with a 0/1 matmul and multiply the codes. int4 pages are
      split into their low and high nibbles, the channel halves ``[0, head_dim / 2)`` and
      ``[head_dim / 2, head_dim)``: q, the accumulator and the output come in the same two
      halves, so no lane shuffle is needed.

  Returns:
    ``out [batch, q_len, q_heads, head_dim]`` in ``q.dtype``, and with ``return_lse`` also
    ``lse float32[batch, q_len, q_heads]``.

  Raises:
    ValueError: an unsupported pool dtype or block size (see the module docstring), bad knobs,
      or no TPU and no ``interpret``.
  """
  b, q_len, qh, d = q.shape
  _, kvh, _, bs, dk = k_pool.shape
  quantized = k_scale is not None
  kv_quant, k_mode, v_mode = quant.check_kernel_scales(k_pool, k_scale, v_scale, d,
                                                        check_supported)
  if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype:
    raise ValueError(f"k_pool and v_pool differ: {k_pool.shape} {k_pool.dtype} vs "
                     f"{v_pool.shape} {v_pool.dtype}")
  if dk != quant.stored_head_dim(kv_quant, d):
    raise ValueError(f"q head_dim={d} does not match the pools' head_dim={dk}")
  if qh % kvh:
    raise ValueError(f"{qh=} query heads must be a multiple of {kvh=} KV heads")
  max_blocks = block_tables.shape[1]
  if block_tables.shape != (b, max_blocks) or kv_lens.shape != (b,) or q_lens.shape != (b,):
    raise ValueError(f"block_tables {block_tables.shape}, kv_lens {kv_lens.shape}, q_lens "
                     f"{q_lens.shape} do not match batch={b}")
  check_supported(k_pool.dtype, bs, d, kv_quant=kv_quant)
  interpret = _interpret_params(interpret)
  group = qh // kvh
  if pages_per_compute_block is None:
    pages_per_compute_block = min(max_blocks, max(1, _TARGET_KV_PER_BLOCK // bs))
  pages = _positive_int("pages_per_compute_block", pages_per_compute_block)
  if pages > max_blocks:
    raise ValueError(f"pages_per_compute_block={pages} exceeds the block tables' "
                     f"{max_blocks=}")
  if queries_per_block is None:
    queries_per_block = min(q_len, max(1, _TARGET_Q_ROWS // group))
  tq = _positive_int("queries_per_block", queries_per_block)
  tq = min(tq, q_len)
  num_q_blocks = pl.cdiv(q_len, tq)

  # Compute dtype: bfloat16 q and pools feed the MXU directly (f32 accumulation); any other
  # mix (float16 pools, f32 queries) is computed in float32 like the reference.
  bf16 = jnp.dtype(jnp.bfloat16)
  # A quantised cache computes in q's dtype (bfloat16 q: bfloat16 on the MXU).
  pool_dt = q.dtype if quantized else k_pool.dtype
  cdt = bf16 if pool_dt == bf16 and q.dtype == bf16 else jnp.dtype(jnp.float32)
  odt = q.dtype if q.dtype in _SUPPORTED_DTYPES else jnp.dtype(jnp.float32)
  tile = max(sublane_tile(cdt), sublane_tile(odt))  # q and out tiles are whole sublane tiles
  rows = math.ceil(tq * group / tile) * tile

  # q [batch, q_len, q_heads, D] -> [batch, kv_heads, q_blocks, halves, R, D / halves]; row =
  # query * G + head; int4 splits the head into the channels of the low and the high nibbles.
  halves = d // dk
  qg = q.astype(cdt).reshape(b, q_len, kvh, group, d).transpose(0, 2, 1, 3, 4)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, num_q_blocks * tq - q_len), (0, 0), (0, 0)))
  qg = qg.reshape(b, kvh, num_q_blocks, tq * group, halves, dk).transpose(0, 1, 2, 4, 3, 5)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, 0), (0, 0), (0, rows - tq * group), (0, 0)))

  def tile_spec(*shape):
    return pl.BlockSpec((_SQUEEZED, _SQUEEZED, _SQUEEZED, *shape),
                        lambda b, h, i, *_: (b, h, i) + (0,) * len(shape))

  out_shape = [jax.ShapeDtypeStruct((b, kvh, num_q_blocks, halves, rows, dk), odt)]
  out_specs = [tile_spec(halves, rows, dk)]
  if return_lse:
    out_shape.append(jax.ShapeDtypeStruct((b, kvh, num_q_blocks, rows, _LANES), jnp.float32))
    out_specs.append(tile_spec(rows, _LANES))
  kernel = functools.partial(
      _paged_attention_kernel, max_blocks=max_blocks, pages=pages, block_size=bs,
      queries_per_block=tq, group=group, scale=float(scale), soft_cap=soft_cap,
      sliding_window=sliding_window, return_lse=return_lse, compute_dtype=cdt,
      k_mode=k_mode, v_mode=v_mode)
  scale_specs = [pl.BlockSpec(memory_space=_ANY)] * 2 if quantized else []
  scale_scratch, scale_args = [], ()
  if quantized:  # each page's scales, double-buffered beside it, in their stored dtype
    scale_args = (k_scale, v_scale)
    k_page = (1, d) if k_mode == "channel" else (bs,)
    v_page = v_scale.shape[3:]  # (block_size,) or (block_size, groups)
    scale_scratch = [pltpu.VMEM((2, pages, *k_page), k_scale.dtype),
                     pltpu.VMEM((2, pages, *v_page), v_scale.dtype)]
    if k_mode == "channel":  # the block's K pages times their channel scales
      scale_scratch.append(pltpu.VMEM((halves, pages * bs, dk), cdt))
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(b, kvh, num_q_blocks),
          in_specs=[tile_spec(halves, rows, dk), pl.BlockSpec(memory_space=_ANY),
                    pl.BlockSpec(memory_space=_ANY), *scale_specs],
          out_specs=out_specs,
          scratch_shapes=[
              pltpu.VMEM((2, pages, bs, dk), k_pool.dtype),  # K pages, double-buffered
              pltpu.VMEM((2, pages, bs, dk), v_pool.dtype),  # V pages, double-buffered
              pltpu.SemaphoreType.DMA((4, 2)),  # [k/v/k scale/v scale, slot]
              pltpu.VMEM((rows, _LANES), jnp.float32),  # running max m
              pltpu.VMEM((rows, _LANES), jnp.float32),  # running denominator l
              pltpu.VMEM((halves, rows, dk), jnp.float32),  # running numerator
              *scale_scratch,  # K, V scales of the pages (and the scaled K pages)
          ]),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=(_PARALLEL,) * 3),
      out_shape=out_shape,
      interpret=interpret,
  )(jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
    block_tables.astype(jnp.int32).reshape(-1), kv_lens.astype(jnp.int32),
    q_lens.astype(jnp.int32), qg, k_pool, v_pool, *scale_args)

  def unpack(x):  # [batch, kv_heads, q_blocks, R, w] -> [batch, q_len, q_heads, w]
    w = x.shape[-1]
    x = x[:, :, :, :tq * group].reshape(b, kvh, num_q_blocks * tq, group, w)[:, :, :q_len]
    return x.transpose(0, 2, 1, 3, 4).reshape(b, q_len, qh, w)

  o = outs[0].transpose(0, 1, 2, 4, 3, 5).reshape(b, kvh, num_q_blocks, rows, d)  # halves
  out = unpack(o).astype(q.dtype)
  if not return_lse:
    return out
  return out, unpack(outs[1])[..., 0]
