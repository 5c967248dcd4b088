"""Non-finite V in a quantised cache: a check shared by the kernels' test modules.

A NaN / Inf written to V before quantisation makes its scale non-finite, so the stored vector
reads back as NaN: the whole (token, KV head) for int8 / fp8 (one scale per token), the
channel group for int4 (one scale per token and group of 32 channels). The kernels must then
follow the attention contract for non-finite V on those dequantised values. The oracle is the
float64 NumPy attention over the NumPy format model's dequantised pools.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tests.attention_cases import TOLERANCES, Case, build_case, dequantized_pools, quantized_cache
from tests.oracle import attention_np

CASE = Case((20, 45), q_len=4, q_lens=(4, 3), block_size=32, ratio=2, head_dim=64, seed=5)
# (row, position, KV head or None for all, channel, value)
POISONS = ((0, 18, 0, 3, np.nan),  # seen by row 0's last two queries only
           (1, 10, None, 40, np.inf),  # seen by every query of row 1
           (1, 43, 1, 63, -np.inf))  # seen by row 1's last query only


def check_quantized_nonfinite_v(attend, kv_quant: str):
  """``attend(case, cache, q, seq_ids, q_lens, layer) -> (out, lse)`` on a poisoned cache."""
  case = CASE
  cache, q, seq_ids, q_lens, layer = build_case(case)
  v = np.asarray(cache.v_pool).copy()
  tables = np.asarray(cache.block_tables)
  for row, pos, head, channel, value in POISONS:
    heads = slice(None) if head is None else head
    v[layer, heads, tables[row, pos // case.block_size], pos % case.block_size, channel] = value
  qcache = quantized_cache(cache.replace(v_pool=jnp.asarray(v)), kv_quant)
  with np.errstate(invalid="ignore"):  # 0 * Inf: the NaN the format reads back
    deq_k, deq_v = dequantized_pools(qcache)
  lengths = [max(n, 0) for n in case.lengths]
  want_out, want_lse = attention_np(q, deq_k, deq_v, layer, tables, lengths, q_lens,
                                    scale=case.head_dim ** -0.5)
  # The scenario tests something: NaN outputs (int4: in some channels of a head only, int8 /
  # fp8: whole heads) beside finite ones.
  bad = ~np.isfinite(want_out)
  assert bad.any() and np.isfinite(want_out).any()
  if kv_quant == "int4":
    assert (bad.any(axis=-1) & ~bad.all(axis=-1)).any()
  out, lse = (np.asarray(x, np.float64) for x in attend(case, qcache, q, seq_ids, q_lens, layer))
  for what in (np.isnan, np.isposinf, np.isneginf):
    np.testing.assert_array_equal(what(out), what(want_out), err_msg=what.__name__)
  atol, rtol = TOLERANCES[jnp.dtype(case.dtype)]
  fin = np.isfinite(want_out)
  np.testing.assert_allclose(out[fin], want_out[fin], atol=atol, rtol=rtol)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  fin = np.isfinite(want_lse)
  np.testing.assert_allclose(lse[fin], want_lse[fin], atol=atol, rtol=rtol)
