"""Independent float64 NumPy oracles (no JAX, no code shared with the package)."""

from __future__ import annotations

import numpy as np


def attention_np(q, k_pool, v_pool, layer, tables, kv_lens, q_lens, *, scale, soft_cap=None,
                 sliding_window=None, kept=None):
  """Paged attention, one row / head / query at a time, in float64.

  Only the keys a query may see (``lo .. pos``, see below) are sliced out; masked keys never
  enter the arithmetic. Non-finite values (the contract in ``reference.py``): per output dim,
  NaN if a visible key's V is NaN there or visible keys hold both +Inf and -Inf there, else
  +Inf / -Inf if a visible key holds that infinity (whatever its probability, even 0 after
  underflow), else the softmax average of the visible keys' (finite) values.

  Args:
    q: ``[batch, q_len, q_heads, head_dim]``.
    k_pool, v_pool: ``[layers, kv_heads, num_blocks, block_size, head_dim]``.
    layer: int.
    tables: ``[batch, max_blocks]`` ints; kv_lens, q_lens: ``[batch]`` ints.
    kept: optional ``bool[batch, max_blocks]``: only keys in kept blocks are seen (the blocks
      ``free_outside_window`` did not free); their data is read through ``tables``.

  Returns:
    ``(out float64[batch, q_len, q_heads, head_dim], lse float64[batch, q_len, q_heads])``.
  """
  q = np.asarray(q, np.float64)
  kp = np.asarray(k_pool, np.float64)[layer]
  vp = np.asarray(v_pool, np.float64)[layer]
  b, q_len, qh, d = q.shape
  kvh, _, bs, _ = kp.shape
  g = qh // kvh
  out = np.zeros((b, q_len, qh, d))
  lse = np.full((b, q_len, qh), -np.inf)
  for r in range(b):
    n = int(kv_lens[r])
    if n == 0:
      continue
    pos_all = np.arange(n)
    blocks = np.asarray(tables[r])[pos_all // bs]
    keys_r = kp[:, blocks, pos_all % bs]  # [kv_heads, n, head_dim]
    vals_r = vp[:, blocks, pos_all % bs]
    for i in range(int(q_lens[r])):
      pos = n - int(q_lens[r]) + i
      lo = 0 if sliding_window is None else max(0, pos - sliding_window + 1)
      sel = np.arange(lo, pos + 1)
      if kept is not None:
        sel = sel[np.asarray(kept[r])[sel // bs]]
      if not sel.size:
        continue
      for h in range(qh):
        K = keys_r[h // g, sel]
        V = vals_r[h // g, sel]
        s = K @ q[r, i, h] * scale
        if soft_cap is not None:
          s = soft_cap * np.tanh(s / soft_cap)
        m = s.max()
        w = np.exp(s - m)
        o = w @ np.where(np.isfinite(V), V, 0.0) / w.sum()
        pos_inf, neg_inf = np.isposinf(V).any(axis=0), np.isneginf(V).any(axis=0)
        nan = np.isnan(V).any(axis=0) | (pos_inf & neg_inf)
        o = np.where(pos_inf, np.inf, np.where(neg_inf, -np.inf, o))
        out[r, i, h] = np.where(nan, np.nan, o)
        lse[r, i, h] = m + np.log(w.sum())
  return out, lse


def quantize_np(x, kv_quant: str):
  """A NumPy model of the quantised formats (see ``jax_paged_kv/cache/quant.py``), in float64.

  Per vector along the last axis: ``scale = max|x| / qmax`` (``qmax`` 127 for int8, 448 for
  fp8), codes ``round(x / scale)`` (int8) or ``x / scale`` rounded to float8_e4m3fn (fp8).

  Returns:
    ``(codes float64[...], scale float64[...])``: ``x ~= codes * scale[..., None]``.
  """
  import ml_dtypes

  x = np.asarray(x, np.float64)
  qmax = {"int8": 127.0, "fp8": 448.0}[kv_quant]
  amax = np.abs(x).max(axis=-1)
  scale = amax / qmax
  with np.errstate(invalid="ignore", divide="ignore"):
    y = np.where(amax[..., None] > 0, x / np.where(amax > 0, amax, 1.0)[..., None] * qmax, 0.0)
  if kv_quant == "int8":
    codes = np.clip(np.round(y), -127, 127)
  else:
    codes = y.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
  return codes, scale


def _bf16_toward_zero(x):
  import ml_dtypes

  bits = np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
  return bits.view(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


_CHANNEL_QMAX = {"int8": 127.0, "int4": 7.0}
# Channel K scales widen only past this many steps of overflow (the format's rule, stated here
# independently of the library's constant).
WIDEN_SLACK = 0.5


def channel_scale_np(amax, kv_quant: str):
  """A K channel scale for ``max|x| = amax``: ``amax / qmax`` (int8 127, int4 7) in float32,
  rounded toward zero to bfloat16."""
  return _bf16_toward_zero(np.asarray(amax, np.float32) / np.float32(_CHANNEL_QMAX[kv_quant]))


def channel_codes_np(x, s, kv_quant: str):
  """``round(x / s)`` in float32 arithmetic, clipped to the format's range (0 where s is 0)."""
  qmax = _CHANNEL_QMAX[kv_quant]
  x32, s32 = np.asarray(x, np.float32), np.asarray(s, np.float32)
  with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
    c = np.clip(np.round(np.where(s32 > 0, x32 / np.where(s32 > 0, s32, 1), 0)), -qmax, qmax)
  return np.where(np.isfinite(c), c, 0.0).astype(np.float64)


def quantize_channel_k_np(k_pool, kv_quant: str):
  """K of an int8 / int4 cache written a whole block at a time: per (block, channel) scale =
  the max over the block's tokens (NaN cells are unused slots), codes ``round(x / scale)``.

  Returns:
    ``(codes float64[..., block_size, head_dim], scale float64[..., num_blocks, head_dim])``.
  """
  import warnings

  k = np.asarray(k_pool, np.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (unused) blocks
    scale = channel_scale_np(np.nanmax(np.abs(k), axis=-2), kv_quant)
  return channel_codes_np(k, scale[..., None, :], kv_quant), scale


def channel_k_error_bound(step, later_widenings, kv_quant: str):
  """The largest ``|x - stored x|`` of an int8 / int4 K value, given its block's final channel
  step ``step`` and how many write calls have touched the block after the value's own
  (``later_widenings``: each may widen the scale once).

  When written, a value is rounded (half a step) or clipped. A write keeps the old scale ``s``
  when its own scale, a bfloat16 rounded toward zero (so at least ``1 - 2^-7`` of the exact
  one), is at most ``s * (1 + WIDEN_SLACK / qmax)``; the value it clips is then at most
  ``(qmax + WIDEN_SLACK) / (1 - 2^-7)`` steps of ``s`` and loses all above ``qmax``. A write
  that widens stores such a rounded-down scale too, and clips its own largest value the same
  way (a smaller loss). So at most ``max(0.5, (qmax + WIDEN_SLACK) / (1 - 2^-7) - qmax)``
  steps, about ``0.5 + (qmax + 0.5) * 2^-7``, plus float32 arithmetic (1e-4 steps). Each later
  widening requantises it once (half a step of a scale no larger than the final one). Scales
  only grow, so every term is in final steps.
  """
  qmax = _CHANNEL_QMAX[kv_quant]
  first = max(0.5, (qmax + WIDEN_SLACK) / (1 - 2.0**-7) - qmax) + 1e-4
  return np.asarray(step) * (first + 0.5 * np.asarray(later_widenings))


class ChannelKModel:
  """A NumPy model of int8 / int4 K written in pieces (``_scatter_tokens`` in ``ops.py``).

  Per block and channel: a write widens the scale to the max of the old one and the new tokens'
  channel scales unless that exceeds the old scale by at most ``WIDEN_SLACK`` steps (then the
  new values clip to the old range), or non-finite (a NaN / Inf written: the block's channel
  then reads back as NaN); the block's older codes are requantised
  (dequantised with the old scale, rounded at the new one, float32 arithmetic), then the new
  tokens are coded. ``codes`` ``[layers, kv_heads, num_blocks, block_size, head_dim]`` and
  ``scale`` ``[layers, kv_heads, num_blocks, head_dim]`` (float64 holding float32 / bfloat16
  values). ``tie`` marks codes that were rounded from (within float32 error of) a tie: XLA may
  compute ``x / s`` as ``x * (1 / s)``, so such a code may legitimately be one step off (and so
  may its later requantisations).
  """

  def __init__(self, kv_quant: str, pool_shape):
    self.kv_quant = kv_quant
    # An untouched cell: byte 0 (int4 decodes it as code -8, int8 as 0).
    self.codes = np.full(pool_shape, -8.0 if kv_quant == "int4" else 0.0)
    self.tie = np.zeros(pool_shape, bool)
    self.scale = np.zeros(pool_shape[:3] + pool_shape[4:])

  @staticmethod
  def _near_tie(x, s):
    with np.errstate(invalid="ignore", divide="ignore"):
      y = np.abs(np.asarray(x, np.float64) / np.where(s > 0, s, np.inf))
    return np.abs(y - np.floor(y) - 0.5) < 1e-4

  def write(self, tokens):
    """One write call: ``tokens`` a list of ``(block, offset, x [layers, kv_heads, head_dim])``."""
    by_block = {}
    for blk, off, x in tokens:
      by_block.setdefault(blk, []).append((off, x))
    for blk, items in by_block.items():
      old = self.scale[:, :, blk]
      need = old
      for _, x in items:
        need = np.maximum(need, channel_scale_np(np.abs(x), self.kv_quant))
      slack = 1 + WIDEN_SLACK / _CHANNEL_QMAX[self.kv_quant]
      widen = (need > np.float32(old) * np.float32(slack)) | ~np.isfinite(need)
      new = np.where(widen, need, old)
      deq = np.asarray(self.codes[:, :, blk], np.float32) * np.asarray(old, np.float32)[:, :, None]
      self.codes[:, :, blk] = channel_codes_np(deq, new[:, :, None], self.kv_quant)
      self.tie[:, :, blk] |= self._near_tie(deq, new[:, :, None])
      for off, x in items:
        self.codes[:, :, blk, off] = channel_codes_np(x, new, self.kv_quant)
        self.tie[:, :, blk, off] = self._near_tie(x, new)
      self.scale[:, :, blk] = new


def quantize_int4_np(k_pool, v_pool, group: int = 32):
  """A NumPy model of the int4 format on whole pools ``[layers, kv_heads, num_blocks,
  block_size, head_dim]``, all tokens of a block known at once (NaN cells are unused slots).

  K: :func:`quantize_channel_k_np`; V: a bfloat16 scale per (token, group of ``group``
  channels), rounded toward zero. Codes ``round(x / scale)`` in [-7, 7].

  Returns:
    ``(k_codes, k_scale, v_codes, v_scale)`` float64; ``k_scale [..., num_blocks, head_dim]``,
    ``v_scale [..., block_size, head_dim / group]``.
  """
  k_codes, k_scale = quantize_channel_k_np(k_pool, "int4")
  return (k_codes, k_scale, *quantize_int4_v_np(v_pool, group))


def quantize_int4_v_np(v, group: int = 32):
  """int4 V per token: ``(codes [..., head_dim], scale [..., head_dim / group])`` float64."""
  v = np.asarray(v, np.float64)
  d = v.shape[-1]
  g = min(group, d)
  vg = v.reshape(*v.shape[:-1], d // g, g)
  v_scale = _bf16_toward_zero(np.abs(vg).max(axis=-1) / 7.0)
  return channel_codes_np(vg, v_scale[..., None], "int4").reshape(v.shape), v_scale


def pack_int4_np(codes):
  """int4 codes ``[..., head_dim]`` -> ``uint8[..., head_dim / 2]`` (channel ``j`` low nibble,
  ``j + head_dim / 2`` high nibble, each stored as ``code + 8``)."""
  c = (np.asarray(codes).astype(np.int64) + 8).astype(np.uint8)
  half = c.shape[-1] // 2
  return c[..., :half] | (c[..., half:] << 4)


def unpack_int4_np(packed):
  p = np.asarray(packed).astype(np.int64)
  return np.concatenate([(p & 15) - 8, (p >> 4) - 8], axis=-1).astype(np.float64)
