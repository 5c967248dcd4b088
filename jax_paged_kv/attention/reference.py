"""Plain-XLA paged attention: the CPU path and the semantics every kernel must match.

Kernel contract (every implementation in this package has this signature)::

    impl(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *,
         scale, soft_cap, sliding_window, return_lse, **knobs) -> out | (out, lse)

* ``q``: ``[batch, q_len, q_heads, head_dim]``; ``q_heads`` a multiple of ``kv_heads``; query head
  ``h`` reads KV head ``h // (q_heads // kv_heads)``.
* ``k_pool``, ``v_pool``: the whole pools, ``[layers, kv_heads, num_blocks, block_size, head_dim]``
  (see :mod:`jax_paged_kv.cache.config`); ``layer``: ``int32[]``, may be traced.
* ``block_tables``: ``int32[batch, max_blocks]``; ``kv_lens``: ``int32[batch]``, tokens in the
  cache per row *including* the new ones; ``q_lens``: ``int32[batch]``, valid queries per row
  (``<= q_len`` and ``<= kv_lens``). Query ``i`` of row ``b`` sits at position
  ``kv_lens[b] - q_lens[b] + i`` and sees keys at positions ``p`` with
  ``p <= its position`` (causal) and, with a sliding window ``w``, ``p > position - w``.
* ``scale``: multiplies ``q . k`` (default ``head_dim ** -0.5``); ``soft_cap``: logits become
  ``soft_cap * tanh(logits / soft_cap)`` after scaling.
* Returns ``out``: ``[batch, q_len, q_heads, head_dim]`` in ``q.dtype``; with ``return_lse`` also
  ``lse``: ``float32[batch, q_len, q_heads]``, the natural log-sum-exp of the (scaled, capped)
  logits. A query that sees no key (empty sequence, padding row, ``i >= q_lens[b]``) gives
  output 0 and LSE ``-inf``, never NaN.
* Only positions ``< kv_lens[b]`` are ever read into the result: stale or NaN data in unused
  slots or free blocks cannot change any output (masks are applied with ``where`` to both the
  logits and the values, never by multiplying).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import Array


def attention_masks(kv_lens: Array, q_lens: Array, q_len: int, positions: Array | int,
                    sliding_window: int | None) -> Array:
  """``bool[batch, q_len, S]``: which key each query may see.

  ``positions``: the position of each of the ``S`` keys (``int32[S]``, any order), or an int
  ``S`` for keys at positions ``0 .. S-1``.
  """
  if isinstance(positions, int):
    positions = jnp.arange(positions)
  i = jnp.arange(q_len)[None, :, None]
  p = positions[None, None, :]
  q_pos = (kv_lens - q_lens)[:, None, None] + i
  mask = (p < kv_lens[:, None, None]) & (p <= q_pos) & (i < q_lens[:, None, None])
  if sliding_window is not None:
    mask = mask & (p > q_pos - sliding_window)
  return mask


def masked_softmax_attention(q, k, v, mask, *, scale, soft_cap, return_lse):
  """Attention of ``q [batch, q_len, q_heads, D]`` over dense ``k, v [batch, kv_heads, S, D]``.

  ``mask``: ``bool[batch, q_len, S]``; the keys may be in any order (softmax does not care).
  Accumulates in float32; NaN-safe for masked entries.
  """
  b, q_len, qh, d = q.shape
  kvh = k.shape[1]
  g = qh // kvh
  valid_kv = jnp.any(mask, axis=1)[:, None, :, None]  # [batch, 1, S, 1]: keys some query reads
  k = jnp.where(valid_kv, k, jnp.zeros((), k.dtype))
  v = jnp.where(valid_kv, v, jnp.zeros((), v.dtype))
  qg = q.reshape(b, q_len, kvh, g, d)
  logits = jnp.einsum("bqhgd,bhsd->bhgqs", qg, k, preferred_element_type=jnp.float32)
  logits = logits * scale
  if soft_cap is not None:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  m4 = mask[:, None, None, :, :]
  logits = jnp.where(m4, logits, -jnp.inf)
  mx = jnp.max(logits, axis=-1, keepdims=True)
  mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
  p = jnp.where(m4, jnp.exp(logits - mx), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  acc = jnp.einsum("bhgqs,bhsd->bhgqd", p, v.astype(jnp.float32),
                   preferred_element_type=jnp.float32)
  out = jnp.where(denom > 0, acc / jnp.where(denom > 0, denom, 1.0), 0.0)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, q_len, qh, d).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(denom[..., 0] > 0, mx[..., 0] + jnp.log(jnp.where(denom[..., 0] > 0,
                                                                  denom[..., 0], 1.0)), -jnp.inf)
  lse = lse.transpose(0, 3, 1, 2).reshape(b, q_len, qh)
  return out, lse


def gather_kv(pool: Array, layer: Array, block_tables: Array, num_blocks: int | None = None):
  """Dense ``[batch, num_blocks * block_size, kv_heads, head_dim]`` copy of the tables' pages."""
  if num_blocks is not None:
    block_tables = block_tables[:, :num_blocks]
  x, _ = gather_pages(pool, layer, block_tables)  # in position order
  return x.transpose(0, 2, 1, 3)


def gather_pages(pool: Array, layer: Array, block_tables: Array, interleave: int = 1):
  """The tables' pages as ``[batch, kv_heads, S, head_dim]`` plus each key's position ``int32[S]``.

  With ``interleave == 1`` the keys are in position order. With ``interleave = n > 1`` the
  copy interleaves the slots of ``n`` consecutive table entries (key order: group of ``n``
  blocks, slot, block in the group), so the copy loop reads ``n`` pages at once instead of one
  after another. On a CPU that hides much of the memory latency of scattered pages (their order
  is arbitrary in a paged pool; a contiguous slab reads fastest with ``interleave=1``).
  Attention is invariant to the order of the keys, and the returned positions drive the mask.
  Table entries past the last multiple of ``n`` are copied in order after the groups.
  """
  batch, nb = block_tables.shape
  bs = pool.shape[3]
  main = nb - nb % interleave if interleave > 1 else 0
  parts, positions = [], []
  if main:
    x = pool[layer][:, block_tables[:, :main]]  # [kv_heads, batch, main, block_size, head_dim]
    h, _, _, _, d = x.shape
    x = x.reshape(h, batch, main // interleave, interleave, bs, d).transpose(1, 0, 2, 4, 3, 5)
    parts.append(x.reshape(batch, h, main * bs, d))
    s = jnp.arange(main * bs, dtype=jnp.int32)
    group, rest = s // (bs * interleave), s % (bs * interleave)
    positions.append((group * interleave + rest % interleave) * bs + rest // interleave)
  if main < nb:
    x = pool[layer][:, block_tables[:, main:]]  # [kv_heads, batch, nb - main, block_size, d]
    h, _, _, _, d = x.shape
    parts.append(x.transpose(1, 0, 2, 3, 4).reshape(batch, h, (nb - main) * bs, d))
    positions.append(jnp.arange(main * bs, nb * bs, dtype=jnp.int32))
  if len(parts) == 1:
    return parts[0], positions[0]
  return jnp.concatenate(parts, axis=2), jnp.concatenate(positions)


def paged_attention_xla(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *,
                        scale: float, soft_cap: float | None = None,
                        sliding_window: int | None = None, return_lse: bool = False,
                        max_blocks: int | None = None, interleave: int = 4):
  """Reference implementation: gather the pages to a dense copy, then masked attention.

  ``max_blocks`` (static, optional) reads only the first ``max_blocks`` table entries, for
  callers that know every row is shorter than ``max_blocks * block_size``. ``interleave``
  (static): pages copied at once (:func:`gather_pages`); 4 is fastest for scattered pages on
  the CPUs measured (``benchmarks/decode_step.py``), 1 for a contiguous slab.
  """
  if isinstance(interleave, bool) or not isinstance(interleave, int) or interleave < 1:
    raise ValueError(f"interleave must be a positive int, got {interleave!r}")
  if max_blocks is not None:
    block_tables = block_tables[:, :max_blocks]
  k, positions = gather_pages(k_pool, layer, block_tables, interleave)
  v, _ = gather_pages(v_pool, layer, block_tables, interleave)
  mask = attention_masks(kv_lens, q_lens, q.shape[1], positions, sliding_window)
  return masked_softmax_attention(q, k, v, mask, scale=scale, soft_cap=soft_cap,
                                  return_lse=return_lse)


paged_attention_xla_jit = jax.jit(
    paged_attention_xla,
    static_argnames=("scale", "soft_cap", "sliding_window", "return_lse", "max_blocks",
                     "interleave"))
