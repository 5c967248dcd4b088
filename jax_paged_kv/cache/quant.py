"""Quantised KV storage: the formats, quantise on write, dequantise on read.

A quantised cache (``CacheConfig(kv_quant=...)``) stores K and V in a narrow storage dtype in the
usual pools, plus scales in ``k_scale`` / ``v_scale`` beside them, in the pool's block layout
(block axis 2, so block copies, forks and frees move them with their block).

Scales (``x ~= code * scale``, symmetric absmax scaling):

* ``"int8"``: codes ``round(x / s)`` in ``[-127, 127]``. K: a bfloat16 scale per (block,
  channel), ``[layers, kv_heads, num_blocks, head_dim]``; V: a float32 scale per (token, KV
  head), ``[layers, kv_heads, num_blocks, block_size]``. 1 byte per value; K adds
  ``2 * head_dim / block_size`` bytes and V 4 bytes per (token, head).
* ``"fp8"``: ``float8_e4m3fn(x / s)`` with ``s = max|x| / 448`` (E4M3's largest finite value)
  per (token, KV head) for K and V (float32, ``[layers, kv_heads, num_blocks, block_size]``),
  so the token's largest value lands at the top of the range and small values keep 3 mantissa
  bits of relative precision instead of flushing to E4M3's subnormals.
* ``"int4"``: codes in [-7, 7], two per byte (``uint8[..., head_dim / 2]``; byte ``j`` holds
  channels ``j`` and ``j + head_dim / 2``). K: a bfloat16 scale per (block, channel) as int8;
  V: a bfloat16 scale per (token, group of 32 channels), ``[layers, kv_heads, num_blocks,
  block_size, head_dim / 32]``.

Why per (block, channel) for int8 / int4 K: keys have outlier channels in real models (KIVI,
KVQuant); a per-token scale is set by the outliers and flattens every other channel (int8 per
token measured 5.8e-2 relative L2 on heavy-tailed keys, over the 5e-2 bound; int4 0.37-0.5).
A channel's scale is the max over its block's tokens. When a write widens a channel's range in a
partly filled block by more than half a step (:func:`widened_scale`), the scale becomes the new
max and the block's older tokens are requantised (O(block_size) per written token, never
O(pool); see ``_scatter_tokens`` in ``ops.py``); a smaller overflow clips. V's
outliers are whole tokens, so V keeps per-token (int4: per group) scales, fixed when written.
fp8 is a floating format: its error is relative per value whatever the scale, so per-token
scales (vLLM's choice) lose nothing to outlier channels. Bfloat16 scales keep float32's range in
2 bytes; they are rounded toward zero so ``qmax * scale`` never overflows (the top value clips,
off by at most 2^-8 of it).

Scales live in the pools' block layout (block axis 2): forks / copy-on-write / truncate / free
keep their meaning (scales move with their block).

No NaN or Inf from finite input: an all-zero token gets scale 0 (and dequantises to exactly 0),
values are divided by ``max|x|`` (after an exact power-of-two normalisation) before the
format's range is applied, so a huge ``max|x|`` cannot overflow or flush ``1 / s``, and codes are
clipped into the format's range. A non-finite input value makes its scale non-finite, so what
shares that scale reads back as NaN: its (token, KV head) for int8 / fp8 V and fp8 K, its
token's group of 32 channels for int4 V, its block's channel for int8 / int4 K. The attention
contract for non-finite V then applies to those values (quantisation cannot keep one dim's NaN
apart from its neighbours; an Inf reads back as NaN too).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array, lax

FORMATS = ("int8", "fp8", "int4")

_STORAGE = {"int8": jnp.dtype(jnp.int8), "fp8": jnp.dtype(jnp.float8_e4m3fn),
            "int4": jnp.dtype(jnp.uint8)}
_QMAX = {"int8": 127.0, "fp8": 448.0, "int4": 7.0}
SCALE_DTYPE = jnp.dtype(jnp.float32)  # per-token scales (fp8 K / V, int8 V)
# Per-block channel scales (int8 / int4 K) and int4's V group scales: float32's range in 2 bytes.
CHANNEL_SCALE_DTYPE = jnp.dtype(jnp.bfloat16)
INT4_SCALE_DTYPE = CHANNEL_SCALE_DTYPE
INT4_GROUP = 32  # V values per scale along head_dim


def check_format(kv_quant) -> str | None:
  """``kv_quant`` if it names a format (or None); raises ``ValueError`` otherwise."""
  if kv_quant is not None and kv_quant not in FORMATS:
    raise ValueError(f"kv_quant must be None or one of {FORMATS}, got {kv_quant!r}")
  return kv_quant


def format_of(pool_dtype) -> str | None:
  """The format whose storage dtype is ``pool_dtype`` (None for a float pool)."""
  return {v: k for k, v in _STORAGE.items()}.get(jnp.dtype(pool_dtype))


def storage_dtype(kv_quant: str) -> jnp.dtype:
  """The pools' element dtype for a format."""
  return _STORAGE[kv_quant]


def stored_head_dim(kv_quant: str | None, head_dim: int) -> int:
  """Elements per (token, KV head) in the pool's last axis (int4: two values per byte)."""
  return head_dim // 2 if kv_quant == "int4" else head_dim


def scale_dtypes(kv_quant: str) -> tuple[jnp.dtype, jnp.dtype]:
  """``(k_scale dtype, v_scale dtype)``: bfloat16 for per-block channel scales and int4's V
  group scales, float32 for per-token scales."""
  k = CHANNEL_SCALE_DTYPE if channel_k_scales(kv_quant) else SCALE_DTYPE
  return k, (INT4_SCALE_DTYPE if kv_quant == "int4" else SCALE_DTYPE)


def int4_group(head_dim: int) -> int:
  """V values per int4 scale: ``INT4_GROUP``, or the whole head if it is smaller."""
  return min(INT4_GROUP, head_dim)


def channel_k_scales(kv_quant: str | None) -> bool:
  """Whether the format keeps one K scale per (block, channel) (int8, int4) instead of one per
  (token, KV head) (fp8)."""
  return kv_quant in ("int8", "int4")


def scale_shapes(kv_quant: str, pool_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(k_scale shape, v_scale shape)`` for a pool of ``[layers, kv_heads, num_blocks,
  block_size, head_dim]`` (the unpacked head_dim)."""
  L, H, NB, BS, D = pool_shape
  k_shape = (L, H, NB, D) if channel_k_scales(kv_quant) else (L, H, NB, BS)
  if kv_quant == "int4":  # V: per token and group of channels
    return k_shape, (L, H, NB, BS, D // int4_group(D))
  return k_shape, (L, H, NB, BS)


def scale_layout(kv_quant: str) -> tuple[str, str]:
  """``(k_mode, v_mode)``: how attention applies a format's scales (the shapes of
  :func:`scale_shapes`). ``"key"``: one scale per token (K: multiplies the logits per key; V:
  the probabilities); ``"channel"``: K scales per (block, channel), applied to the codes of
  each K page as it is read; ``"group"``: V scales per (token, group of channels), one per group's
  columns."""
  return ("channel" if channel_k_scales(kv_quant) else "key"), (
      "group" if kv_quant == "int4" else "key")


# ---- int4 ---------------------------------------------------------------------------------------
# Codes are signed in [-7, 7], stored as ``code + 8`` in a nibble. Byte ``j`` of a token holds
# channel ``j`` (low nibble) and channel ``j + head_dim / 2`` (high nibble), so unpacking is two
# halves, not an interleave.


def pack_int4(codes: Array) -> Array:
  """``codes [..., head_dim]`` (integers in [-7, 7], any dtype) -> ``uint8[..., head_dim / 2]``."""
  c = (codes.astype(jnp.int32) + 8).astype(jnp.uint8)
  half = c.shape[-1] // 2
  return c[..., :half] | (c[..., half:] << 4)


def unpack_int4(packed: Array) -> Array:
  """``uint8[..., head_dim / 2]`` -> ``float32[..., head_dim]`` codes in [-7, 7]."""
  p = packed.astype(jnp.int32)
  return jnp.concatenate([(p & 15) - 8, (p >> 4) - 8], axis=-1).astype(jnp.float32)


def _codes(x: Array, scale: Array, qmax: float) -> Array:
  """``round(x / scale)`` in ``[-qmax, qmax]`` (0 where the scale is 0), float32."""
  s = scale.astype(jnp.float32)
  y = jnp.where(s > 0, x.astype(jnp.float32) / jnp.where(s > 0, s, 1.0), 0.0)
  y = jnp.clip(jnp.round(y), -qmax, qmax)
  return jnp.where(jnp.isfinite(y), y, 0.0)


def int4_codes(x: Array, scale: Array) -> Array:
  """``round(x / scale)`` in [-7, 7] (0 where the scale is 0), float32."""
  return _codes(x, scale, _QMAX["int4"])


def truncated_scale(amax: Array, qmax: float) -> Array:
  """The scale ``max|x| / qmax`` in bfloat16, rounded toward zero (so ``qmax * scale`` never
  overflows to Inf; values just above it clip to ``qmax``). NaN / Inf stay non-finite."""
  s = amax.astype(jnp.float32) / qmax
  bits = lax.bitcast_convert_type(s, jnp.uint32) & jnp.uint32(0xFFFF0000)
  return lax.bitcast_convert_type(bits, jnp.float32).astype(CHANNEL_SCALE_DTYPE)


def int4_scale(amax: Array) -> Array:
  """The int4 scale ``max|x| / 7``: :func:`truncated_scale`."""
  return truncated_scale(amax, _QMAX["int4"])


def quantize_int4_v(x: Array) -> tuple[Array, Array]:
  """V: ``x [..., head_dim]`` -> ``(uint8[..., head_dim / 2], scale[..., head_dim / group])``."""
  d = x.shape[-1]
  g = int4_group(d)
  xg = x.astype(jnp.float32).reshape(*x.shape[:-1], d // g, g)
  scale = int4_scale(jnp.max(jnp.abs(xg), axis=-1))
  codes = int4_codes(xg, scale[..., None]).reshape(x.shape)
  return pack_int4(codes), scale


def dequantize_int4_v(packed: Array, scale: Array, dtype=jnp.float32) -> Array:
  codes = unpack_int4(packed)
  d = codes.shape[-1]
  g = d // scale.shape[-1]
  x = codes.reshape(*codes.shape[:-1], d // g, g) * scale.astype(jnp.float32)[..., None]
  return x.reshape(codes.shape).astype(dtype)


# ---- per (block, channel) K scales: int8 and int4 --------------------------------------------


def channel_scale(amax: Array, kv_quant: str) -> Array:
  """A K channel scale for ``max|x| = amax``: ``amax / qmax`` (7 for int4, 127 for int8) as a
  :func:`truncated_scale`. NaN / Inf stay non-finite."""
  return truncated_scale(amax, _QMAX[kv_quant])


# A write widens a block's channel scale only when its new tokens overflow the current range by
# more than this many steps; smaller overflows clip (an error no larger than rounding's).
WIDEN_SLACK = 0.5


def widened_scale(old: Array, need: Array, kv_quant: str) -> Array:
  """A block's channel scale after a write whose tokens need ``need`` (``>= old``, both in the
  channel-scale dtype): ``need`` if it exceeds ``old`` by more than :data:`WIDEN_SLACK` steps
  (``old * (1 + WIDEN_SLACK / qmax)``), else ``old`` (the new values clip by at most that).

  Each widening costs the block's older tokens one more rounding (half a step of the new
  scale). The slack keeps slowly growing channels (RoPE rotates a key's large channels through
  ramps) from widening, and requantising, at every token. A non-finite ``need`` (a NaN / Inf
  written) always replaces ``old``, so that the block's channel reads back as NaN rather than
  as silently finite values.
  """
  n = need.astype(jnp.float32)
  widen = (n > old.astype(jnp.float32) * (1 + WIDEN_SLACK / _QMAX[kv_quant])) | ~jnp.isfinite(n)
  return jnp.where(widen, need, old)


def narrowed_scale(old: Array, fit: Array, kv_quant: str) -> Array:
  """A block's channel scale after a rollback whose kept tokens need ``fit`` (``<= old``):
  ``fit`` where ``old`` exceeds it by more than :data:`WIDEN_SLACK` steps (the mirror of
  :func:`widened_scale`, so a rollback of tokens that did not widen the block changes
  nothing), else ``old``. A non-finite ``old`` stays: the NaN / Inf written into the block
  already lost its older tokens in that channel."""
  o = old.astype(jnp.float32)
  narrow = (o > fit.astype(jnp.float32) * (1 + WIDEN_SLACK / _QMAX[kv_quant])) & jnp.isfinite(o)
  return jnp.where(narrow, fit.astype(old.dtype), old)


def channel_codes(x: Array, scale: Array, kv_quant: str) -> Array:
  """``x [..., head_dim]`` as stored codes for the channel scales ``scale`` (broadcast):
  ``round(x / scale)`` clipped to the format's range (0 where the scale is 0), int4 packed."""
  y = _codes(x, scale, _QMAX[kv_quant])
  return pack_int4(y) if kv_quant == "int4" else y.astype(_STORAGE[kv_quant])


def quantize_blocks_k(k_pool: Array, kv_quant: str) -> tuple[Array, Array]:
  """Whole blocks of K ``[..., block_size, head_dim]`` with one scale per (block, channel), as
  if each block were written at once: ``(codes, scale [..., head_dim])`` (int8 / int4)."""
  scale = channel_scale(jnp.max(jnp.abs(k_pool.astype(jnp.float32)), axis=-2), kv_quant)
  return channel_codes(k_pool, scale[..., None, :], kv_quant), scale


def check_kernel_scales(k_pool: Array, k_scale, v_scale, head_dim: int, check_supported):
  """The quantised-pool checks every kernel makes: both scales or neither, the format the
  kernel supports (``check_supported(dtype, block_size, head_dim, kv_quant=...)``), and scale
  shapes matching the format's layout.

  Returns:
    ``(kv_quant, k_mode, v_mode)``, all None for an unquantised cache.

  Raises:
    ValueError: any of the above.
  """
  if (k_scale is None) != (v_scale is None):
    raise ValueError("pass both k_scale and v_scale, or neither")
  if k_scale is None:
    return None, None, None
  kv_quant = format_of(k_pool.dtype) or "?"  # the format first: int4 pools pack head_dim
  check_supported(k_pool.dtype, k_pool.shape[3], head_dim, kv_quant=kv_quant)
  k_mode, v_mode = scale_layout(kv_quant)
  want = scale_shapes(kv_quant, (*k_pool.shape[:4], head_dim))
  if (k_scale.shape, v_scale.shape) != want:
    raise ValueError(f"{kv_quant} scales must have shapes {want[0]} (K) and {want[1]} (V), "
                     f"got {k_scale.shape} and {v_scale.shape}")
  return kv_quant, k_mode, v_mode


def dequantize_channel_k(stored: Array, scale: Array, dtype=jnp.float32) -> Array:
  """K stored with channel scales: ``stored [..., stored head_dim]`` (int8, or packed int4)
  times ``scale [..., head_dim]``."""
  codes = unpack_int4(stored) if stored.dtype == jnp.uint8 else stored.astype(jnp.float32)
  return (codes * scale.astype(jnp.float32)).astype(dtype)


def quantize(x: Array, kv_quant: str) -> tuple[Array, Array]:
  """Quantises ``x [..., head_dim]`` per vector along the last axis (int8 / fp8).

  Returns:
    ``(x_q [..., head_dim] in storage_dtype(kv_quant), scale float32[...])``.
  """
  qmax = _QMAX[kv_quant]
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)  # NaN if any value is NaN
  # Normalise by a power of two first (exact): XLA turns x / amax into x * (1 / amax), whose
  # reciprocal is a denormal (flushed to 0) for max|x| > 2^126.
  mant, expo = jnp.frexp(amax)  # amax = mant * 2^expo, mant in [0.5, 1)
  xs = jnp.ldexp(x, -expo)  # |xs| <= 1
  nonzero = mant > 0
  unit = xs / jnp.where(nonzero, mant, 1.0)  # in [-1, 1]
  y = jnp.clip(unit * qmax, -qmax, qmax)
  if kv_quant == "int8":
    y = jnp.round(y)
  # amax / qmax is a float32 subnormal (flushed to 0 by XLA on CPU) below qmax * 2^-126:
  # such tiny tokens (under ~1.5e-36 for int8) read back as 0, an absolute error < 1e-35.
  scale = jnp.where(nonzero | ~jnp.isfinite(amax), amax / qmax, 0.0)
  y = jnp.where(jnp.isfinite(y), y, 0.0)  # the non-finite scale carries a non-finite token
  return y.astype(_STORAGE[kv_quant]), scale[..., 0].astype(SCALE_DTYPE)


def dequantize(x_q: Array, scale: Array, dtype=jnp.float32) -> Array:
  """``x_q [..., head_dim] * scale[..., None]`` in ``dtype`` (float32 arithmetic)."""
  return (x_q.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(dtype)
