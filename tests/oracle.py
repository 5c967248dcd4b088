"""Independent float64 NumPy oracles (no JAX, no code shared with the package)."""

from __future__ import annotations

import numpy as np


def attention_np(q, k_pool, v_pool, layer, tables, kv_lens, q_lens, *, scale, soft_cap=None,
                 sliding_window=None):
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
      for h in range(qh):
        K = keys_r[h // g, lo:pos + 1]
        V = vals_r[h // g, lo:pos + 1]
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
