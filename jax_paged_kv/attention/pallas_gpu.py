"""Pallas GPU paged attention (Triton lowering): decode, chunked prefill and mixed batches.

Implements the kernel contract of :mod:`jax_paged_kv.attention.reference` (same signature, same
semantics) and reads K/V straight from the pools through the block tables: no dense copy, and the
``layer`` index (possibly traced) is applied inside the kernel, so no ``pool[layer]`` slice is
materialised either.

Design
------
* **Rows = (query, head) pairs of one KV group.** For each batch row ``b`` and KV head ``h`` the
  ``q_len * group`` queries that read that head (``group = q_heads // kv_heads``) are flattened,
  token-major, into ``rows``, padded to a multiple of ``block_rows`` (a power of two >= 16, the
  smallest ``tl.dot`` tile). Decode packs all query heads of a group into one tile (GQA 4 -> 16
  rows, GQA 20 -> 32 rows); prefill tiles ``q_len * group`` rows by ``block_rows``. Row ``r``
  holds query ``r // group``, whose position is ``kv_len - q_lens[b] + r // group``.
* **Grid** ``(batch, kv_heads, row_tiles, k_splits)``. One program loads its ``[block_rows,
  head_dim]`` query tile once, then walks the pages its tile can see: from the start of the
  sliding window (or 0) to the last query's position, *clipped per row* from the dynamic
  ``kv_lens`` / ``q_lens``, so work past each row's length and outside its window is skipped,
  not masked. That key range is cut into steps of ``block_k`` keys (several whole pages, or a
  part of one page when pages are larger than ``block_k``); the ``k_splits`` programs of a tile
  take contiguous, equal shares of those steps (flash-decoding), so a long row is spread over
  many SMs and a short row's surplus splits exit at once.
* **Inner loop** (an ``scf.for`` that Triton software-pipelines with ``num_stages``): look up
  the physical block of each of the ``block_k`` keys in the table, load K and V of layer
  ``layer`` and head ``h`` as 2-D ``[block_k, head_dim]`` tiles with one masked load each (keys
  outside the tile's range are never fetched, so stale or NaN slots are never read, and the
  tiles feed ``tl.dot`` with no reshape in between), ``q @ k.T`` with float32 accumulation,
  scale, soft cap, causal + window mask with ``where`` (-inf), an online softmax in base 2, and
  ``p @ v``. Queries are rounded to the cache dtype (``tl.dot`` needs one operand dtype); f32
  dots use IEEE precision (``Precision.HIGHEST``), not TF32.
* **Quantised caches** (``cache/quant.py``): the 8-bit tiles are converted exactly to q's dtype
  (float32 for float16 queries: float16's range would round a small V scale times a probability to a
  subnormal or 0). Per-token scales (fp8 K, int8 / fp8 V) multiply the logits per key, or the
  probabilities before ``p @ v``. Per-(block, channel) K scales dequantise the step's K tile in
  registers (each key's page scales come by one gathered load that hits cache), so a step still
  spans whole pages in one ``q @ k.T``. (Folding the scales into q instead needed a dot per page,
  and steps of one page ran int8 decode 2-2.8x slower than bfloat16 on an H200.) int4 packs channels
  ``j`` and ``j + head_dim / 2`` in byte ``j``: ``q . k`` is two half-dots over the low and high
  nibbles, and ``p @ v`` runs per nibble and group of 32 channels, each with its group's per-token
  scales on ``p``, into its own accumulator and output columns (no concatenation).
* **Attention fusion** (``new_kv``, decode on unquantised pools): each row's new token comes
  in as ``[kv_heads, head_dim]`` K / V with its position and slot. The pool scan skips that
  position; the first split of each tile folds the new key into its online softmax from
  registers (same masks, same non-finite V rule), and program ``(b, h, 0, 0)`` stores the token
  into the pools, which are aliased to two extra outputs. No program reads the slot being
  written, so the launch is race-free. Verified in interpret mode and by lowering; not timed.
* **Merge.** Each program writes its normalised partial output and its log-sum-exp, for its
  real rows only (GQA padding rows are masked out of the store). With ``k_splits == 1`` that is
  the result (written in ``q.dtype``); otherwise the partials are float32 and an XLA epilogue
  merges them with their LSE weights (:func:`merge_partials`). A query that sees nothing gets
  output 0 and LSE -inf, never NaN (max of an all -inf row is replaced by 0 before ``exp2``);
  a query whose logits are NaN or overflow gets a NaN ``l``, which counts as seen: output and
  LSE NaN (the contract), also through the merge.
* **Non-finite V** (the contract: NaN / Inf reaches exactly the queries that see that key).
  The inner loop's ``p @ v`` would spread a NaN / Inf to every row of the tile, masked ones
  too (``0 * NaN``), so it leaves ``acc`` non-finite; after the loop one reduction checks for
  that, and only then (``lax.cond``, an ``scf.if``) the program runs its steps again by the
  rule: finite values through ``p``, plus +-Inf per row and dim from two 0/1 dots (visible
  keys x V's +Inf/NaN and -Inf/NaN flags), in quarter-size steps so that the rerun's pipeline
  and extra dot operands fit the fast loop's shared-memory plan. The fast loop is unchanged;
  :func:`merge_partials` passes a split's NaN / Inf on unweighted. Checked in interpret mode
  and by lowering for CUDA here, and compiled on an H200 through the shared non-finite cases;
  its speed is not measured (it runs only when a visible V is non-finite).

Why the Triton lowering and not Mosaic GPU: it runs on both JAX 0.10 (CPU CI) and 0.11 (the GPU
machine), on Ampere as well as Hopper, and it is testable here on CPU with ``interpret=True``
(the whole suite runs that way); the gathered, page-granular loads of a paged cache map directly
onto pointer arithmetic in Triton, whereas Mosaic GPU wants TMA descriptors and barriers per page
that could not be checked without a GPU in this session. It is deprecated since JAX 0.11 (Mosaic
GPU is its successor on Hopper): ``benchmarks/gpu_decode.py`` measures this kernel against the
copy ceiling, JAX's own paged kernel, cuDNN and torch SDPA so that a GPU session can confirm the
choice or revisit it.

Tuning knobs (keyword-only; ``None`` picks the default from :func:`default_knobs`). The
defaults were first chosen by reasoning about tile sizes and occupancy, then checked with the
knob sweep of ``benchmarks/gpu_decode.py --sweep`` on an H100 (bfloat16, 32/8 heads, head_dim
128, block 16; ``benchmarks/results/gpu_decode.json``): no single-knob change beat them by more
than 8% on decode, three K/V stages gained 1-5% over two, and prefill ran 14% faster with one
stage (286 vs 333 us), which the defaults now use.

* ``block_k``: keys per inner-loop step (power of two >= 16). It may be smaller than
  ``block_size`` (a page is then read in several steps) or span several pages. Default: 128
  keys for ``head_dim <= 128``, 64 for 256, halved until one K/V stage fits the shared-memory
  budget (float32 ``head_dim`` 256 pools need 64: a 128-key f32 stage alone would be 256 KiB).
* ``k_splits``: KV-sequence splits per tile (>= 1). Default: enough programs to fill about 512
  CTAs, at most one per compute block of the widest table, at most 32.
* ``block_rows``: rows per tile (power of two >= 16). Default: ``group`` rounded up for decode,
  64 (32 for ``head_dim`` 256) for prefill.
* ``num_warps`` (default 4, 8 for big tiles), ``num_stages`` (decode: 3, fewer if the K/V
  stages and the query tile would not fit in 196 KiB of shared memory; prefill: 1).
* ``interpret``: run in Pallas interpret mode (CPU tests). Without it a non-GPU backend raises.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jax_paged_kv.cache import quant

# The Triton backend is deprecated since JAX 0.11; bind what we use once, here, so that a
# deprecation warning on import or attribute access never fires from inside our calls (our
# test setup turns warnings attributed to this package into errors).
with warnings.catch_warnings():
  warnings.simplefilter("ignore", DeprecationWarning)
  from jax.experimental.pallas import triton as plgpu

  _triton_load = plgpu.load
  _triton_store = plgpu.store
  _TritonCompilerParams = plgpu.CompilerParams

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_MIN_DOT = 16  # smallest tl.dot extent (M, N and K) on NVIDIA tensor cores
_TARGET_PROGRAMS = 512  # ~4 CTAs per SM on a 132-SM H100 (the H100 sweep kept it)
_MAX_SPLITS = 32
# Shared memory we plan per program for the K/V pipeline stages plus the query tile (H100: 227
# KiB per block). 196 KiB is the largest plan measured to compile and run on an H100: three
# 64 KiB bf16 stages of 128 keys x head_dim 128, plus a 4 KiB query tile.
_SMEM_BUDGET = 196 * 1024
GPU_BACKENDS = ("gpu", "cuda", "rocm")


def _backend() -> str:
  return jax.default_backend()


def _pow2_ceil(n: int) -> int:
  return 1 << max(int(n) - 1, 0).bit_length()


def _is_pow2(n) -> bool:
  return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def default_knobs(*, head_dim: int, block_size: int, q_len: int, group: int, batch: int,
                  kv_heads: int, max_blocks: int, itemsize: float) -> dict:
  """Default tuning knobs for one call (the H100 knob sweep found none more than 8% better).

  Args:
    head_dim, block_size: cache geometry.
    q_len: queries per row (1 = decode); group: ``q_heads // kv_heads``.
    batch, kv_heads: grid extents; max_blocks: block-table width.
    itemsize: bytes per K/V value (0.5 for int4).

  Returns:
    dict with ``block_k``, ``k_splits``, ``block_rows``, ``num_warps``,
    ``num_stages``.
  """
  rows = q_len * group
  if q_len == 1:
    block_rows = max(_MIN_DOT, _pow2_ceil(min(rows, 64)))
  else:
    block_rows = max(_MIN_DOT, min(_pow2_ceil(rows), 64 if head_dim <= 128 else 32))
  block_k = 128 if head_dim <= 128 else 64
  while block_k > _MIN_DOT and 2 * block_k * head_dim * itemsize > _SMEM_BUDGET:
    block_k //= 2
  n_steps = -(-max_blocks * block_size // block_k)
  programs = batch * kv_heads * (-(-rows // block_rows))
  k_splits = max(1, min(-(-_TARGET_PROGRAMS // programs), n_steps, _MAX_SPLITS))
  num_warps = 8 if block_rows * head_dim > 64 * 128 or block_k * head_dim > 128 * 128 else 4
  stage_bytes = 2 * block_k * head_dim * itemsize
  q_bytes = block_rows * head_dim * itemsize
  num_stages = max(1, min(3, int((_SMEM_BUDGET - q_bytes) // stage_bytes))) if q_len == 1 else 1
  return dict(block_k=block_k, k_splits=k_splits, block_rows=block_rows,
              num_warps=num_warps, num_stages=num_stages)


_SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_QUANT_DTYPES = {f: quant.storage_dtype(f) for f in ("int8", "fp8", "int4")}
_INT4_MIN_HEAD_DIM = 2 * _MIN_DOT  # each nibble half is a dot over head_dim / 2 channels


def check_supported(dtype, block_size: int, head_dim: int, *, kv_quant: str | None = None) -> None:
  """Raises ``ValueError`` for pool layouts this kernel cannot tile.

  ``dtype`` is the pools' element dtype; with ``kv_quant`` (``"int8"`` / ``"fp8"`` /
  ``"int4"``) it must be that format's storage dtype, and the kernel dequantises the tiles it
  loads (int4 also needs ``head_dim >= 32``: each nibble half feeds a dot over ``head_dim / 2``
  channels, at least one 16-wide ``tl.dot`` tile).
  """
  dtype = jnp.dtype(dtype)
  if kv_quant is not None:
    if _QUANT_DTYPES.get(kv_quant) != dtype:
      raise ValueError(f"pallas_gpu supports kv_quant in {sorted(_QUANT_DTYPES)} (int8 / "
                       f"float8_e4m3fn / packed uint8 pools), got {kv_quant=} with {dtype} "
                       "pools; use implementation='xla'")
    if kv_quant == "int4" and head_dim < _INT4_MIN_HEAD_DIM:
      raise ValueError(f"pallas_gpu needs head_dim >= {_INT4_MIN_HEAD_DIM} for kv_quant='int4' "
                       f"(two half-width dots of at least {_MIN_DOT} channels), got "
                       f"{head_dim=}; use implementation='xla'")
  elif dtype not in _SUPPORTED_DTYPES:
    raise ValueError(f"pallas_gpu supports float32, bfloat16 and float16 pools (and int8 / fp8 "
                     f"/ int4 quantised ones with their scales), got {dtype}; use "
                     "implementation='xla'")
  if not _is_pow2(block_size):
    raise ValueError(f"pallas_gpu needs a power-of-two block_size, got {block_size=}; use "
                     "implementation='xla'")
  if not _is_pow2(head_dim) or head_dim < _MIN_DOT:
    raise ValueError(f"pallas_gpu needs a power-of-two head_dim >= {_MIN_DOT} (Triton tiles), "
                     f"got {head_dim=}; use implementation='xla'")


def _check_knobs(*, block_k, k_splits, block_rows, num_warps, num_stages):
  if not _is_pow2(block_k) or block_k < _MIN_DOT:
    raise ValueError(f"{block_k=} must be a power of two >= {_MIN_DOT} (Triton tiles are "
                     "powers of two; the smallest tl.dot tile is 16)")
  if isinstance(k_splits, bool) or not isinstance(k_splits, int) or k_splits < 1:
    raise ValueError(f"{k_splits=} must be an int >= 1")
  if not _is_pow2(block_rows) or block_rows < _MIN_DOT:
    raise ValueError(f"{block_rows=} must be a power of two >= {_MIN_DOT}")
  if not _is_pow2(num_warps) or num_warps > 32:
    raise ValueError(f"{num_warps=} must be a power of two in [1, 32]")
  if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
    raise ValueError(f"{num_stages=} must be an int >= 1")


def _attention_kernel(
    layer_ref,  # [1] int32
    kv_lens_ref,  # [batch] int32
    q_lens_ref,  # [batch] int32
    tables_ref,  # [batch, max_blocks + max(1, block_k // block_size)] int32
    q_ref,  # [block_rows, head_dim]
    k_ref,  # [layers, kv_heads, num_blocks, block_size, stored_dim] (stored_dim: int4 D / 2)
    v_ref,  # [layers, kv_heads, num_blocks, block_size, stored_dim]
    *refs,  # (k_scale_ref, v_scale_ref if quantised: ``quant.scale_shapes``; fused: new_pos_ref
    #         [batch], new_slot_ref [batch], kn_ref [head_dim], vn_ref [head_dim]), then
    #         o_ref [block_rows, head_dim], lse_ref [block_rows] (fused: then the pools again,
    #         aliased to k_ref / v_ref, to write the new token into)
    k_mode: str | None,
    v_mode: str | None,
    group: int,
    num_rows: int,
    block_k: int,
    k_splits: int,
    scale: float,
    soft_cap: float | None,
    sliding_window: int | None,
    fused: bool = False,
):
  quantized = k_mode is not None
  if fused:
    pos_ref, slot_ref, kn_ref, vn_ref, o_ref, lse_ref, ko_ref, vo_ref = refs
  elif quantized:
    ks_ref, vs_ref, o_ref, lse_ref = refs
  else:
    o_ref, lse_ref = refs
  b, h, t, s = (pl.program_id(i) for i in range(4))
  block_rows, head_dim = q_ref.shape
  cdt = q_ref.dtype  # the dots' operand dtype: the pools' dtype, or q's for a quantised cache
  num_blocks, block_size, stored_dim = k_ref.shape[2], k_ref.shape[3], k_ref.shape[4]
  # int4 packs channels j and j + head_dim / 2 in byte j: K and V come in two halves (the low
  # and high nibbles), each stored_dim channels wide, and q is split to match (no concatenate).
  halves = head_dim // stored_dim
  layer = layer_ref[0]
  kv_len = kv_lens_ref[b]
  q_count = q_lens_ref[b]
  q_start = kv_len - q_count  # position of query 0 of this row
  # Attention fusion: the row's new token (at position new_pos; -1: none) comes from kn / vn,
  # not from the pool, and this launch writes it there (no program reads that slot).
  new_pos = pos_ref[b] if fused else jnp.int32(-1)

  # Queries this tile holds and the key range [lo, hi) any of them may see.
  row0 = t * block_rows
  i_lo = row0 // group
  i_hi = jnp.minimum((row0 + block_rows - 1) // group, q_count - 1)
  hi = jnp.minimum(q_start + i_hi + 1, kv_len)
  lo = jnp.int32(0)
  if sliding_window is not None:
    lo = jnp.maximum(q_start + i_lo - sliding_window + 1, 0)
  # Steps of block_k keys from `first`: whole pages when block_k >= block_size, else aligned
  # parts of one page (both are powers of two, so a step never straddles pages then).
  align = min(block_k, block_size)
  first = (lo // align) * align
  n_cb = jnp.where(hi > lo, pl.cdiv(hi - first, block_k), 0)
  per_split = pl.cdiv(n_cb, k_splits)
  cb_lo = jnp.minimum(s * per_split, n_cb)
  cb_hi = jnp.minimum(cb_lo + per_split, n_cb)

  rows = row0 + jnp.arange(block_rows, dtype=jnp.int32)
  tok = rows // group
  row_ok = tok < q_count  # [block_rows]
  row_pos = q_start + tok  # [block_rows]
  if halves == 1:
    q_parts = [q_ref[...]]  # [block_rows, head_dim]
  else:  # [block_rows, head_dim / 2] each: the channels of the low and of the high nibbles
    q_parts = [q_ref[:, pl.ds(j * stored_dim, stored_dim)] for j in range(halves)]
  logit_scale = scale if soft_cap is not None else scale * _LOG2E
  dim_iota = jnp.arange(stored_dim, dtype=jnp.int32)  # [stored_dim]
  # V's output column chunks: the whole head, or int4's (nibble, channel group) chunks.
  chunks = _v_chunks(v_mode, head_dim, stored_dim)  # ((byte offset, width, nibble, column))
  v_groups = v_mode == "group" and head_dim // vs_ref.shape[-1]  # channels per V scale

  def qk(qs, ks):  # sum over the halves of q_j @ k_j.T: [block_rows, step_k]
    out = None
    for qj, kj in zip(qs, ks, strict=True):
      part = lax.dot_general(qj, kj, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                             preferred_element_type=jnp.float32)
      out = part if out is None else out + part
    return out

  def pv_dot(x, y):  # [block_rows, step_k] @ [step_k, width]
    return lax.dot_general(x, y, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)

  def nibbles(x, nibble):  # uint8 -> int4 code in [-8, 7] (stored codes are in [-7, 7])
    x = x.astype(jnp.int32)
    return ((x & 15) if nibble == 0 else (x >> 4)) - 8

  def body(cb, carry, *, key_iota, exact: bool):
    acc, m, l = carry  # ([block_rows, width] per chunk), [block_rows], [block_rows] (base 2)
    step_k = key_iota.shape[0]
    kpos = first + cb * step_k + key_iota  # [step_k]
    # The physical block of every key of this step (step_k / block_size distinct table
    # entries, each read many times from cache), so K and V are loaded as 2-D [step_k,
    # stored_dim] tiles that feed tl.dot directly (no reshape between the load and the dot,
    # which keeps Triton's software pipeliner on its async-copy path).
    ids = tables_ref[b, kpos // block_size]  # [step_k]
    # A null entry inside the range is a hole (a block free_outside_window freed): its keys
    # are gone, neither fetched nor seen.
    kv_ok = (kpos >= lo) & (kpos < hi) & (ids != 0)  # [step_k]: never fetch a key outside
    if fused:  # the new token comes from registers, not from its (not yet written) slot
      kv_ok = kv_ok & (kpos != new_pos)
    ids = jnp.clip(ids, 0, num_blocks - 1)
    slot = kpos % block_size  # [step_k]

    def load_tile(ref, cols):  # [step_k, cols.size] of this layer and head, masked by kv_ok
      # Every index is an array (broadcast to the tile): one gathered, masked load per operand,
      # which interpret mode can discharge as well as Triton can lower.
      mask = jnp.broadcast_to(kv_ok[:, None], (step_k, cols.shape[0]))
      return _triton_load(ref.at[layer, h, ids[:, None], slot[:, None], cols[None, :]],
                          mask=mask, other=jnp.zeros((), ref.dtype))

    def load_page_scales(ref, cols):  # [step_k, cols.size]: each key's page's channel scales
      mask = jnp.broadcast_to(kv_ok[:, None], (step_k, cols.shape[0]))
      return _triton_load(ref.at[layer, h, ids[:, None], cols[None, :]], mask=mask,
                          other=jnp.zeros((), ref.dtype)).astype(jnp.float32)

    def load_scale(ref, *idx):  # [step_k] float32, 0 for keys outside the range
      return _triton_load(ref.at[(layer, h, ids, slot, *idx)], mask=kv_ok,
                          other=jnp.zeros((), ref.dtype)).astype(jnp.float32)

    k = load_tile(k_ref, dim_iota)  # [step_k, stored_dim]
    if halves == 2:  # int4 codes are exact in any float dtype
      k_parts = [nibbles(k, j).astype(cdt) for j in range(2)]
    else:  # int8 / fp8 -> cdt is exact
      k_parts = [k.astype(cdt) if quantized else k]
    if k_mode == "channel":
      # K's scales are per (block, channel): dequantise the step's K tile in registers with
      # each key's page scales (a gathered [step_k, stored_dim] load of step_k / block_size
      # distinct rows, read from cache), so a step spans whole pages in one q @ k.T.
      k_parts = [(kj.astype(jnp.float32) * load_page_scales(ks_ref, j * stored_dim + dim_iota))
                 .astype(cdt) for j, kj in enumerate(k_parts)]
    logits = qk(q_parts, k_parts)  # [block_rows, step_k]
    if k_mode == "key":
      logits = logits * load_scale(ks_ref)[None, :]
    logits = logits * logit_scale
    if soft_cap is not None:
      logits = (soft_cap * _LOG2E) * jnp.tanh(logits / soft_cap)
    visible = row_ok[:, None] & (kpos[None, :] <= row_pos[:, None]) & kv_ok[None, :]
    if sliding_window is not None:
      visible = visible & (kpos[None, :] > row_pos[:, None] - sliding_window)
    logits = jnp.where(visible, logits, -jnp.inf)
    m_new = jnp.maximum(m, logits.max(axis=1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp2(m - m_safe)
    p = jnp.exp2(logits - m_safe[:, None])  # exactly 0 where masked
    l = alpha * l + p.sum(axis=1)
    # V, chunk by chunk: (tile [step_k, width] in cdt, its per-key scales [step_k] or None).
    if v_mode == "group":
      v_parts, loaded = [], {}
      for off, width, nibble, col in chunks:
        if off not in loaded:  # each byte chunk once, for both of its nibbles
          loaded[off] = load_tile(v_ref, off + jnp.arange(width, dtype=jnp.int32))
        v_parts.append((nibbles(loaded[off], nibble).astype(cdt),
                        load_scale(vs_ref, col // v_groups)))
    else:
      v = load_tile(v_ref, dim_iota)  # [step_k, head_dim]
      v_parts = [(v.astype(cdt), load_scale(vs_ref)) if quantized else (v, None)]
    new_acc = []
    for a, (v, v_sc) in zip(acc, v_parts, strict=True):
      if not exact:
        pw = p if v_sc is None else p * v_sc[None, :]  # V's scales weight the probabilities
        new_acc.append(alpha[:, None] * a + pv_dot(pw.astype(v.dtype), v))
        continue
      # The contract for non-finite V: the finite values through p, then per row and dim +Inf
      # for a visible +Inf / NaN key and -Inf for a visible -Inf / NaN key (IEEE addition
      # makes the NaN), counted with two 0/1 dots of the same shape as p @ v. Non-finite acc
      # entries are final: alpha (0 after underflow) never multiplies them.
      v32 = v.astype(jnp.float32)
      if v_sc is not None:  # the dequantised tile (a NaN scale makes its whole vector NaN)
        v32 = v32 * v_sc[:, None]
      v_fin = jnp.where(jnp.isfinite(v32), v32, 0.0).astype(v.dtype)
      a = jnp.where(jnp.isfinite(a), alpha[:, None] * a, a) + pv_dot(p.astype(v.dtype), v_fin)
      seen = jnp.where(visible, 1.0, 0.0).astype(v.dtype)  # [block_rows, step_k]
      nan = jnp.isnan(v32)
      for inf, hit in ((jnp.inf, nan | (v32 == jnp.inf)), (-jnp.inf, nan | (v32 == -jnp.inf))):
        hits = pv_dot(seen, jnp.where(hit, 1.0, 0.0).astype(v.dtype))  # [block_rows, width]
        a = jnp.where(hits > 0.0, a + inf, a)
      new_acc.append(a)
    return tuple(new_acc), m_new, l

  acc = tuple(jnp.zeros((block_rows, width), jnp.float32) for _, width, _, _ in chunks)
  m = jnp.full((block_rows,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_rows,), jnp.float32)
  init = (acc, m, l)
  key_iota = jnp.arange(block_k, dtype=jnp.int32)
  acc, m, l = lax.fori_loop(cb_lo, cb_hi, functools.partial(body, key_iota=key_iota, exact=False),
                            init)
  # A non-finite V anywhere in the steps makes acc non-finite (p @ v multiplies it by every
  # row's p, 0 included: 0 * NaN and 0 * Inf are NaN), and so does nothing else but a
  # visible NaN K or an overflow. Only then run the steps again by the contract's rule: the
  # fast loop stays as it was, and the check costs one reduction over acc. The rerun takes
  # quarter steps, so that its pipeline stages plus the shared-memory tiles of its extra dot
  # operands fit where the fast loop's stages did, and its registers stay under the fast one's.
  exact_k = max(_MIN_DOT, block_k // 4)
  sub = block_k // exact_k
  exact_iota = jnp.arange(exact_k, dtype=jnp.int32)
  nonfinite = functools.reduce(jnp.maximum, [
      jnp.max(jnp.max(jnp.where(jnp.isfinite(a), 0.0, 1.0), axis=1)) for a in acc]) > 0.0
  acc, m, l = lax.cond(
      nonfinite,
      lambda: lax.fori_loop(cb_lo * sub, cb_hi * sub,
                            functools.partial(body, key_iota=exact_iota, exact=True), init),
      lambda: (acc, m, l))
  if fused:
    acc, m, l = _add_new_key(acc, m, l, q_parts[0], kn_ref[...], vn_ref[...], row_ok, row_pos,
                             new_pos, first_split=s == 0, logit_scale=logit_scale,
                             soft_cap=soft_cap, sliding_window=sliding_window)
    # One program per (row, KV head) writes the token: K and V of this layer and head.
    write = (t == 0) & (s == 0) & (new_pos >= 0)
    flat = slot_ref[b]
    page = jnp.full((stored_dim,), flat // block_size, jnp.int32)
    off = jnp.full((stored_dim,), flat % block_size, jnp.int32)
    mask = jnp.broadcast_to(write, (stored_dim,))
    for dst, src in ((ko_ref, kn_ref), (vo_ref, vn_ref)):
      _triton_store(dst.at[layer, h, page, off, dim_iota], src[...], mask=mask)
  seen = l != 0.0  # a NaN l (NaN or overflowing logits) is seen: its output and LSE are NaN
  l_safe = jnp.where(seen, l, 1.0)
  # Padding rows (group padded to the tile, the last tile of q_len * group) are not written:
  # the wrapper slices them off, and skipping them saves most of the partials' traffic in GQA.
  real = rows < num_rows  # [block_rows]
  for a, (_, width, _, col) in zip(acc, chunks, strict=True):
    out = jnp.where(seen[:, None], a / l_safe[:, None], 0.0).astype(o_ref.dtype)
    dst = o_ref if width == head_dim else o_ref.at[:, pl.ds(col, width)]
    _triton_store(dst, out, mask=jnp.broadcast_to(real[:, None], out.shape))
  _triton_store(lse_ref, jnp.where(seen, m * _LN2 + jnp.log(l_safe), -jnp.inf), mask=real)


def _add_new_key(acc, m, l, q, kn, vn, row_ok, row_pos, new_pos, *, first_split, logit_scale,
                 soft_cap, sliding_window):
  """Folds the row's new key (``kn``, ``vn`` ``[head_dim]``, at ``new_pos``) into the online
  softmax state ``(acc, m, l)`` of the split that takes it (the first), by the same rules as
  the pool's keys: the query sees it causally and within the window, and a non-finite V
  component reaches exactly the rows that see it (+Inf / -Inf per component, NaN as both)."""
  (a,) = acc
  kn32, vn32 = kn.astype(jnp.float32), vn.astype(jnp.float32)
  logit = jnp.sum(q.astype(jnp.float32) * kn32[None, :], axis=1) * logit_scale  # [rows]
  if soft_cap is not None:
    logit = (soft_cap * _LOG2E) * jnp.tanh(logit / soft_cap)
  vis = row_ok & first_split & (new_pos >= 0) & (new_pos <= row_pos)
  if sliding_window is not None:
    vis = vis & (new_pos > row_pos - sliding_window)
  logit = jnp.where(vis, logit, -jnp.inf)
  m_new = jnp.maximum(m, logit)
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
  alpha = jnp.exp2(m - m_safe)
  p = jnp.exp2(logit - m_safe)  # 0 where not seen
  l = alpha * l + p
  v_fin = jnp.where(jnp.isfinite(vn32), vn32, 0.0)
  a = jnp.where(jnp.isfinite(a), alpha[:, None] * a, a) + p[:, None] * v_fin[None, :]
  nan = jnp.isnan(vn32)
  for inf, hit in ((jnp.inf, nan | (vn32 == jnp.inf)), (-jnp.inf, nan | (vn32 == -jnp.inf))):
    a = jnp.where(vis[:, None] & hit[None, :], a + inf, a)
  return (a,), m_new, l


def _v_chunks(v_mode: str | None, head_dim: int, stored_dim: int) -> tuple:
  """V's output column chunks ``(byte offset, width, nibble, first column)``.

  One chunk of the whole head, except for int4 (``v_mode == "group"``): one per nibble and
  group of ``quant.int4_group(head_dim)`` channels (a whole nibble half when the head is
  narrower than two groups), since each group's scale weights its own ``p @ v``.
  """
  if v_mode != "group":
    return ((0, head_dim, 0, 0),)
  width = min(quant.int4_group(head_dim), stored_dim)
  return tuple((off, width, nibble, nibble * stored_dim + off)
               for off in range(0, stored_dim, width) for nibble in (0, 1))


def _whole(shape):
  """A BlockSpec that hands the kernel the whole array (indexed inside the kernel)."""
  return pl.BlockSpec(shape, lambda *_: (0,) * len(shape))


def merge_partials(o, lse):
  """Merges ``k_splits`` partial attentions by their log-sum-exp.

  Args:
    o: ``float32[k_splits, ..., head_dim]`` normalised partial outputs (0 where empty).
    lse: ``float32[k_splits, ...]`` their log-sum-exp (-inf where empty).

  Returns:
    ``(out float32[..., head_dim], lse float32[...])``; 0 and -inf where every split was empty.
    A partial's NaN / +-Inf (a non-finite V it saw, see the contract) is final: it is passed
    on unweighted (its weight may underflow to 0), and the splits' ones add up by IEEE rules.
  """
  m = lse.max(axis=0)  # NaN if a split's LSE is NaN (its logits were)
  m_safe = jnp.where(m == -jnp.inf, 0.0, m)
  w = jnp.exp(lse - m_safe[None])  # [k_splits, ...]; 0 for empty splits
  denom = w.sum(axis=0)
  seen = denom != 0.0  # NaN is seen: the merged output and LSE stay NaN
  denom_safe = jnp.where(seen, denom, 1.0)
  finite = jnp.isfinite(o)
  out = jnp.einsum("s...,s...d->...d", w, jnp.where(finite, o, 0.0),
                   precision=lax.Precision.HIGHEST)
  nonfinite = jnp.where(finite, 0.0, o).sum(axis=0)  # 0, NaN or +-Inf
  out = jnp.where(seen[..., None], out / denom_safe[..., None] + nonfinite, 0.0)
  return out, jnp.where(seen, m_safe + jnp.log(denom_safe), -jnp.inf)


def paged_attention_gpu(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *,
                        scale: float, soft_cap: float | None = None,
                        sliding_window: int | None = None, return_lse: bool = False,
                        block_k: int | None = None, k_splits: int | None = None,
                        block_rows: int | None = None, num_warps: int | None = None,
                        num_stages: int | None = None, interpret: bool = False,
                        k_scale=None, v_scale=None, new_kv=None):
  """Paged attention with a Pallas (Triton) GPU kernel; contract in ``reference.py``.

  Args:
    q: ``[batch, q_len, q_heads, head_dim]``.
    k_pool, v_pool: ``[layers, kv_heads, num_blocks, block_size, head_dim]``.
    layer: ``int32[]``, may be traced.
    block_tables: ``int32[batch, max_blocks]``; kv_lens, q_lens: ``int32[batch]``.
    scale, soft_cap, sliding_window, return_lse: as in the contract.
    block_k, k_splits, block_rows, num_warps, num_stages: tuning knobs, ``None``
      for the provisional defaults of :func:`default_knobs`.
    interpret: run in Pallas interpret mode (any backend; slow, for tests).
    k_scale, v_scale: the scales of a quantised cache (both or neither), in the layout of
      ``quant.scale_shapes`` for the pools' format. The kernel loads the quantised tiles and
      converts them exactly to q's dtype, float32 for a float16 q (int4: the low and high nibbles as
      two half-width tiles). A K scale per token (``[layers, kv_heads, num_blocks, block_size]``)
      multiplies the logits per key; one per (block, channel) (``[layers, kv_heads, num_blocks,
      head_dim]``) multiplies the K tile in registers, key by key. A V scale per token multiplies
      the probabilities before ``p @ v``; int4's per (token, group of 32 channels) do so for each
      group's columns.
    new_kv: attention fusion (decode, unquantised pools): ``(k_new, v_new, new_pos,
      new_slot)``, the step's new token per row (``[batch, kv_heads, head_dim]`` in the pools'
      dtype), its position (``int32[batch]``, -1: no new token) and its flat token slot
      (``block * block_size + offset``). The kernel attends to the new token from registers
      instead of the pool, and writes it into the pools in the same launch (the pools are
      aliased to two extra outputs; donate them under ``jit`` to update in place).
      ``kv_lens`` counts the new token, as after :func:`~jax_paged_kv.write_kv`.

  Returns:
    ``out [batch, q_len, q_heads, head_dim]`` in ``q.dtype``, and with ``return_lse`` also
    ``lse float32[batch, q_len, q_heads]``. With ``new_kv``: ``(out[, lse], k_pool, v_pool)``,
    the pools with the new tokens written.

  Raises:
    ValueError: a non-GPU backend without ``interpret=True``, bad knobs, or shapes the kernel
      cannot tile.
  """
  if not interpret and _backend() not in GPU_BACKENDS:
    raise ValueError(
        f"implementation='pallas_gpu' compiles a Triton GPU kernel, but JAX's default backend "
        f"is {_backend()!r}. Pass interpret=True to run it in Pallas interpret mode "
        "(slow; for tests), or use implementation='xla' (or None) on this backend.")
  batch, q_len, q_heads, head_dim = q.shape
  num_layers, kv_heads, num_blocks, block_size, _ = k_pool.shape
  quantized = k_scale is not None
  kv_quant, k_mode, v_mode = quant.check_kernel_scales(k_pool, k_scale, v_scale, head_dim,
                                                        check_supported)
  if k_pool.shape != v_pool.shape or k_pool.dtype != v_pool.dtype:
    raise ValueError(f"k_pool {k_pool.shape} {k_pool.dtype} and v_pool {v_pool.shape} "
                     f"{v_pool.dtype} must match")
  if k_pool.shape[-1] != quant.stored_head_dim(kv_quant, head_dim) or q_heads % kv_heads:
    raise ValueError(f"q {q.shape} does not fit pools {k_pool.shape}")
  check_supported(k_pool.dtype, block_size, head_dim, kv_quant=kv_quant)
  fused = new_kv is not None
  if fused:
    k_new, v_new, new_pos, new_slot = new_kv
    if quantized or q_len != 1:
      raise ValueError("pallas_gpu attention fusion (new_kv) takes decode (q_len == 1) on "
                       f"unquantised pools, got {q_len=}, kv_quant={kv_quant}")
    want = (batch, kv_heads, head_dim)
    for x in (k_new, v_new):
      if x.shape != want or x.dtype != k_pool.dtype:
        raise ValueError(f"new_kv: {x.dtype}{list(x.shape)}, expected {k_pool.dtype}"
                         f"{list(want)}")
  max_blocks = block_tables.shape[1]
  group = q_heads // kv_heads
  # Bytes per K/V value (int4: half a byte) for the shared-memory plan.
  itemsize = jnp.dtype(k_pool.dtype).itemsize * k_pool.shape[-1] / head_dim
  knobs = default_knobs(head_dim=head_dim, block_size=block_size, q_len=q_len, group=group,
                        batch=batch, kv_heads=kv_heads, max_blocks=max_blocks,
                        itemsize=itemsize)
  given = dict(block_k=block_k, k_splits=k_splits,
               block_rows=block_rows, num_warps=num_warps, num_stages=num_stages)
  knobs.update({k: v for k, v in given.items() if v is not None})
  _check_knobs(**knobs)
  block_k, splits, tile = knobs["block_k"], knobs["k_splits"], knobs["block_rows"]

  rows = q_len * group
  tiles = -(-rows // tile)
  # [batch, q_len, q_heads, D] -> [batch, kv_heads, rows (token-major), D], padded to the tiles.
  # tl.dot needs both operands in one dtype: queries are rounded to the cache's dtype.
  # A quantised cache's tiles are converted to q's dtype instead when it is bfloat16 or
  # float32, and to float32 otherwise: the probabilities times V's scales (and K times its
  # channel scales) are rounded to that dtype, and in float16 a small scale times p < 1 is
  # subnormal or 0 (V ~ 1e-4 lost 2-8% of the output) and a K above 65504 overflows.
  cdt = k_pool.dtype
  if quantized:
    cdt = q.dtype if q.dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)) else (
        jnp.dtype(jnp.float32))
  qr = q.astype(cdt).reshape(batch, q_len, kv_heads, group, head_dim)
  qr = qr.transpose(0, 2, 1, 3, 4)
  qr = qr.reshape(batch, kv_heads, rows, head_dim)
  qr = jnp.pad(qr, ((0, 0), (0, 0), (0, tiles * tile - rows), (0, 0)))
  # Room for the last compute block to read past the table end (masked: null-block entries).
  tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, max(1, block_k // block_size))))
  kv_lens = jnp.clip(kv_lens.astype(jnp.int32), 0, max_blocks * block_size)
  q_lens = jnp.clip(q_lens.astype(jnp.int32), 0, jnp.minimum(kv_lens, q_len))
  layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, num_layers - 1).reshape(1)

  part_dtype = q.dtype if splits == 1 else jnp.float32
  kernel = functools.partial(
      _attention_kernel, group=group, num_rows=rows, block_k=block_k, k_splits=splits,
      scale=float(scale), soft_cap=None if soft_cap is None else float(soft_cap),
      sliding_window=sliding_window, k_mode=k_mode, v_mode=v_mode, fused=fused)
  # Scales are read in their stored dtype (int4: bfloat16) and widened in the kernel.
  scale_specs = [_whole(k_scale.shape), _whole(v_scale.shape)] if quantized else []
  scale_args = (k_scale, v_scale) if quantized else ()
  pool_outs, pool_specs, aliases = [], [], {}
  if fused:
    new_spec = pl.BlockSpec((None, None, head_dim), lambda b, h, t, s: (b, h, 0))
    scale_specs = [_whole((batch,)), _whole((batch,)), new_spec, new_spec]
    scale_args = (jnp.asarray(new_pos, jnp.int32), jnp.asarray(new_slot, jnp.int32),
                  k_new, v_new)
    pool_outs = [jax.ShapeDtypeStruct(k_pool.shape, k_pool.dtype)] * 2
    pool_specs = [_whole(k_pool.shape)] * 2
    aliases = {5: 2, 6: 3}  # k_pool, v_pool (inputs 5, 6) are outputs 2, 3
  o, lse, *pools = pl.pallas_call(
      kernel,
      grid=(batch, kv_heads, tiles, splits),
      in_specs=[
          _whole(layer.shape),
          _whole(kv_lens.shape),
          _whole(q_lens.shape),
          _whole(tables.shape),
          pl.BlockSpec((None, None, tile, head_dim), lambda b, h, t, s: (b, h, t, 0)),
          _whole(k_pool.shape),
          _whole(v_pool.shape),
          *scale_specs,
      ],
      out_specs=[
          pl.BlockSpec((None, None, None, tile, head_dim), lambda b, h, t, s: (s, b, h, t, 0)),
          pl.BlockSpec((None, None, None, tile), lambda b, h, t, s: (s, b, h, t)),
          *pool_specs,
      ],
      out_shape=[
          jax.ShapeDtypeStruct((splits, batch, kv_heads, tiles * tile, head_dim), part_dtype),
          jax.ShapeDtypeStruct((splits, batch, kv_heads, tiles * tile), jnp.float32),
          *pool_outs,
      ],
      input_output_aliases=aliases,
      compiler_params=_TritonCompilerParams(num_warps=knobs["num_warps"],
                                            num_stages=knobs["num_stages"]),
      interpret=interpret,
      name=f"paged_attention_gpu_k{block_k}_s{splits}_r{tile}{'_fused' if fused else ''}",
  )(layer, kv_lens, q_lens, tables, qr, k_pool, v_pool, *scale_args)

  o, lse = o[..., :rows, :], lse[..., :rows]  # padding rows were never written
  if splits == 1:
    o, lse = o[0], lse[0]
  else:
    o, lse = merge_partials(o, lse)
  # [batch, kv_heads, rows, D] -> [batch, q_len, q_heads, D]
  o = o.reshape(batch, kv_heads, q_len, group, head_dim).transpose(0, 2, 1, 3, 4)
  out = o.reshape(batch, q_len, q_heads, head_dim).astype(q.dtype)
  res = (out,)
  if return_lse:
    lse = lse.reshape(batch, kv_heads, q_len, group).transpose(0, 2, 1, 3)
    res += (lse.reshape(batch, q_len, q_heads),)
  res += tuple(pools)
  return res[0] if len(res) == 1 else res
