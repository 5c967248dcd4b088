"""Plain-XLA paged attention: the CPU path and the semantics every kernel must match.

Kernel contract (every implementation in this package has this signature)::

    impl(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *,
         scale, soft_cap, sliding_window, return_lse, **knobs) -> out | (out, lse)

* ``q``: ``[batch, q_len, q_heads, head_dim]``; ``q_heads`` a multiple of ``kv_heads``; query head
  ``h`` reads KV head ``h // (q_heads // kv_heads)``.
* ``k_pool``, ``v_pool``: the whole pools, ``[layers, kv_heads, num_blocks, block_size, head_dim]``
  (see :mod:`jax_paged_kv.cache.config`); ``layer``: ``int32[]``, may be traced.
* ``block_tables``: ``int32[batch, table_width]``; ``kv_lens``: ``int32[batch]``, tokens in the
  cache per row *including* the new ones; ``q_lens``: ``int32[batch]``, valid queries per row
  (``<= q_len`` and ``<= kv_lens``). Query ``i`` of row ``b`` sits at position
  ``kv_lens[b] - q_lens[b] + i`` and sees keys at positions ``p`` with
  ``p <= its position`` (causal) and, with a sliding window ``w``, ``p > position - w``.
* ``k_scale``, ``v_scale`` (keyword, optional): a quantised cache's scales in the pools'
  block layout (:mod:`jax_paged_kv.cache.quant`, ``quant.scale_shapes``); the pools then hold
  ``float8_e4m3fn`` values with float32 scales per token (value ``pool[layer, h, blk, off] *
  scale[layer, h, blk, off]``), ``int8`` values (K: bfloat16 scales per block and channel,
  ``pool[layer, h, blk, off, c] * k_scale[layer, h, blk, c]``; V: float32 per token), or
  packed int4 (``uint8[..., head_dim / 2]``, K scales per block and channel, V scales per
  token and group of 32 channels). Implementations dequantise
  the pages they read, on the fly: never a dequantised copy of the pool.
* ``scale``: multiplies ``q . k`` (default ``head_dim ** -0.5``); ``soft_cap``: logits become
  ``soft_cap * tanh(logits / soft_cap)`` after scaling.
* Returns ``out``: ``[batch, q_len, q_heads, head_dim]`` in ``q.dtype``; with ``return_lse`` also
  ``lse``: ``float32[batch, q_len, q_heads]``, the natural log-sum-exp of the (scaled, capped)
  logits. A query that sees no key (empty sequence, padding row, ``i >= q_lens[b]``) gives
  output 0 and LSE ``-inf``, never NaN.
* Holes: a null entry (block 0) of ``block_tables`` below a row's length is a block
  :func:`~jax_paged_kv.free_outside_window` freed; its keys are gone and no query sees them
  (the kernels mask them like keys past the length, and zero their V).
* Only positions ``< kv_lens[b]`` are ever read into the result: stale or NaN data in unused
  slots or free blocks cannot change any output (masks are applied with ``where`` to both the
  logits and the values, never by multiplying).
* Non-finite V: masked probabilities never multiply V, so a NaN or Inf in V reaches exactly the
  queries that may see that key (causal, window, ``kv_lens``, ``q_lens``), and in a visible
  key it is propagated per output dim ``d``: ``out[..., d]`` is NaN if a visible key has NaN at
  ``d`` or visible keys hold both +Inf and -Inf there; else +Inf (-Inf) if a visible key holds
  +Inf (-Inf) there; else the usual softmax average. Visibility decides, not the probability:
  an Inf whose probability underflows to 0 still gives its sign (IEEE's ``0 * Inf`` would be
  NaN), the same in every implementation. The LSE does not depend on V.
* NaN logits: a NaN in a query, or in the K of a key it sees, or a logit that overflows to
  +Inf (finite inputs with a huge ``scale``), makes that query's output and LSE NaN (every
  dim): never the 0 / -inf of a query that sees nothing, which an LSE merge would weigh 0.
  Other queries and rows are unaffected.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import Array, lax

from jax_paged_kv.cache import quant
from jax_paged_kv.cache.config import NULL_BLOCK


def kept_keys(block_tables: Array, positions: Array, block_size: int) -> Array:
  """``bool[batch, S]``: keys whose table entry names a real block.

  A null entry below a row's length is a block :func:`~jax_paged_kv.free_outside_window`
  freed (a hole): its keys are gone, and attention reads only the keys that are kept.
  ``positions`` index ``block_tables``' columns (``int32[S]``, any order).
  """
  return block_tables[:, positions // block_size] != NULL_BLOCK


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


def _grouped_logits(q, k, mask, *, scale, soft_cap):
  """Scaled, capped logits ``float32[batch, kv_heads, group, q_len, S]``, -inf where masked."""
  b, q_len, qh, d = q.shape
  kvh = k.shape[1]
  qg = q.reshape(b, q_len, kvh, qh // kvh, d)
  logits = jnp.einsum("bqhgd,bhsd->bhgqs", qg, k, preferred_element_type=jnp.float32)
  logits = logits * scale
  if soft_cap is not None:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  return jnp.where(mask[:, None, None, :, :], logits, -jnp.inf)


def masked_softmax_attention(q, k, v, mask, *, scale, soft_cap, return_lse):
  """Attention of ``q [batch, q_len, q_heads, D]`` over dense ``k, v [batch, kv_heads, S, D]``.

  ``mask``: ``bool[batch, q_len, S]``; the keys may be in any order (softmax does not care).
  Accumulates in float32; NaN-safe for masked entries. Keys no query sees are zeroed, but
  ``p @ v`` multiplies the others as they are, so this is the contract only while the values
  of the keys some query reads are finite: a NaN / Inf there reaches every query of its row
  (``0 * NaN`` is NaN), and an Inf whose probability underflows gives NaN. All outputs finite
  proves that case; :func:`paged_attention_xla` checks it and otherwise recomputes the output
  with :func:`nonfinite_v_attention`.
  """
  b, q_len, qh, d = q.shape
  valid_kv = jnp.any(mask, axis=1)[:, None, :, None]  # [batch, 1, S, 1]: keys some query reads
  k = jnp.where(valid_kv, k, jnp.zeros((), k.dtype))
  v = jnp.where(valid_kv, v, jnp.zeros((), v.dtype))
  logits = _grouped_logits(q, k, mask, scale=scale, soft_cap=soft_cap)
  mx = jnp.max(logits, axis=-1, keepdims=True)  # NaN if a logit is NaN
  # Only an all-masked row's -inf is replaced; a NaN or +Inf max makes the row's p NaN.
  mx = jnp.where(mx == -jnp.inf, 0.0, mx)
  p = jnp.where(mask[:, None, None, :, :], jnp.exp(logits - mx), 0.0)
  denom = jnp.sum(p, axis=-1, keepdims=True)
  acc = jnp.einsum("bhgqs,bhsd->bhgqd", p, v.astype(jnp.float32),
                   preferred_element_type=jnp.float32)
  empty = denom == 0  # sees no key (a NaN denom is not empty: its output is NaN)
  out = jnp.where(empty, 0.0, acc / jnp.where(empty, 1.0, denom))
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, q_len, qh, d).astype(q.dtype)
  if not return_lse:
    return out
  lse = jnp.where(empty[..., 0], -jnp.inf,
                  mx[..., 0] + jnp.log(jnp.where(empty[..., 0], 1.0, denom[..., 0])))
  lse = lse.transpose(0, 3, 1, 2).reshape(b, q_len, qh)
  return out, lse


def _by_lse(out: Array, lse: Array) -> Array:
  """``out`` where the query saw keys; 0 where it saw none (LSE -inf), NaN where its logits
  were NaN or overflowed (LSE NaN), whatever the slow path computed there."""
  out = jnp.where((lse == -jnp.inf)[..., None], 0.0, out)
  return jnp.where(jnp.isnan(lse)[..., None], jnp.nan, out)


def nonfinite_v_attention(q, k, v, mask, lse, *, scale, soft_cap, chunk=None):
  """The contract's output for any V: masked probabilities never multiply V.

  Same ``q``, ``k``, ``v``, ``mask`` as :func:`masked_softmax_attention`, plus that call's
  ``lse`` (V never changes it); returns ``out`` ``[batch, q_len, q_heads, D]`` in
  ``q.dtype``. The finite values are averaged with the normalised probabilities; then every
  query adds +Inf at the dims where a key it sees holds +Inf or NaN, and -Inf where one holds
  -Inf or NaN, so IEEE addition yields the contract's NaN / +-Inf whatever the probabilities
  (0 after underflow included).

  A loop over (row, KV head, ``chunk`` keys) keeps the buffers beyond the probabilities and
  the float32 copy of V (which the fast path has too) to a few ``[chunk, D]`` tiles: see
  :func:`paged_attention_xla`. ``chunk`` (static) must divide ``S``; default ``S``.
  """
  b, q_len, qh, d = q.shape
  kvh, s = k.shape[1], k.shape[2]
  g = qh // kvh
  chunk = s if chunk is None else chunk
  n_chunks = s // chunk
  if n_chunks * chunk != s:
    raise ValueError(f"chunk={chunk} must divide the {s} keys")
  lse_g = jnp.where(jnp.isfinite(lse), lse, 0.0).reshape(b, q_len, kvh, g)
  logits = _grouped_logits(q, k, mask, scale=scale, soft_cap=soft_cap)
  p = jnp.where(mask[:, None, None, :, :],
                jnp.exp(logits - lse_g.transpose(0, 2, 3, 1)[..., None]), 0.0)
  v = v.astype(jnp.float32)
  seen = mask.astype(jnp.float32)

  def step(i, acc):  # row r, KV head h, keys [c * chunk, (c + 1) * chunk)
    r, h, c = i // (kvh * n_chunks), i // n_chunks % kvh, i % n_chunks
    vc = lax.dynamic_slice_in_dim(v[r, h], c * chunk, chunk)  # [chunk, D]
    pc = lax.dynamic_slice_in_dim(p[r, h], c * chunk, chunk, axis=2)  # [g, q_len, chunk]
    sc = lax.dynamic_slice_in_dim(seen[r], c * chunk, chunk, axis=1)  # [q_len, chunk]
    part = jnp.einsum("gqs,sd->gqd", pc, jnp.where(jnp.isfinite(vc), vc, 0.0),
                      preferred_element_type=jnp.float32)
    nan = jnp.isnan(vc)
    hits_pos = sc @ (nan | (vc == jnp.inf)).astype(jnp.float32)  # [q_len, D]
    hits_neg = sc @ (nan | (vc == -jnp.inf)).astype(jnp.float32)
    inf = jnp.where(hits_pos > 0, jnp.inf, 0.0) + jnp.where(hits_neg > 0, -jnp.inf, 0.0)
    return acc.at[r, h].add(part + inf[None])

  # zeros_like keeps the operands' varying mesh axes (under shard_map the loop's carry must).
  shape = (b, kvh, g, q_len, d)
  acc = lax.fori_loop(0, b * kvh * n_chunks, step,
                      jnp.zeros_like(p, shape=shape) + jnp.zeros_like(v, shape=shape))
  out = acc.transpose(0, 3, 1, 2, 4).reshape(b, q_len, qh, d)
  return _by_lse(out, lse).astype(q.dtype)


def gather_kv(pool: Array, layer: Array, block_tables: Array, max_blocks: int | None = None):
  """Dense ``[batch, max_blocks * block_size, kv_heads, head_dim]`` copy of the tables' pages."""
  if max_blocks is not None:
    block_tables = block_tables[:, :max_blocks]
  x, _ = gather_pages(pool, layer, block_tables)  # in position order
  return x.transpose(0, 2, 1, 3)


def gather_dequantized(pool: Array, scale: Array | None, layer: Array, block_tables: Array,
                       interleave: int = 1, *, key: bool = True):
  """:func:`gather_pages`, dequantised (float32) when ``scale`` is given.

  ``key``: int8 / int4 K scales are per block and channel (``[layers, kv_heads, num_blocks,
  head_dim]``); int4 V scales per token and channel group; fp8 K / V and int8 V per token.
  """
  x, positions = gather_pages(pool, layer, block_tables, interleave)
  if scale is None:
    return x, positions
  kv_quant = quant.format_of(pool.dtype)
  if key and quant.channel_k_scales(kv_quant):
    bs = pool.shape[3]
    blocks = block_tables[:, positions // bs]  # [batch, S]: each key's block
    s = jnp.moveaxis(scale[layer, :, blocks], 2, 1)  # [batch, kv_heads, S, head_dim]
    return quant.dequantize_channel_k(x, s), positions
  if kv_quant == "int4":
    s, _ = gather_pages(scale, layer, block_tables, interleave)  # [batch, h, S, groups]
    return quant.dequantize_int4_v(x, s), positions
  s, _ = gather_pages(scale[..., None], layer, block_tables, interleave)  # [batch, h, S, 1]
  return x.astype(jnp.float32) * s, positions


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

  def pages(table):  # [kv_heads, batch, n, block_size, head_dim]
    # One gather from the whole pool, the layer part of its index: ``pool[layer][...]`` is a
    # dynamic slice of the layer that XLA may materialise (it did, hoisted out of the
    # non-finite-V loop below: two layer-sized copies in every attention call's scratch).
    return jnp.moveaxis(pool[layer, :, table], 2, 0)

  if main:
    x = pages(block_tables[:, :main])
    h, _, _, _, d = x.shape
    x = x.reshape(h, batch, main // interleave, interleave, bs, d).transpose(1, 0, 2, 4, 3, 5)
    parts.append(x.reshape(batch, h, main * bs, d))
    s = jnp.arange(main * bs, dtype=jnp.int32)
    group, rest = s // (bs * interleave), s % (bs * interleave)
    positions.append((group * interleave + rest % interleave) * bs + rest // interleave)
  if main < nb:
    x = pages(block_tables[:, main:])
    h, _, _, _, d = x.shape
    parts.append(x.transpose(1, 0, 2, 3, 4).reshape(batch, h, (nb - main) * bs, d))
    positions.append(jnp.arange(main * bs, nb * bs, dtype=jnp.int32))
  if len(parts) == 1:
    return parts[0], positions[0]
  return jnp.concatenate(parts, axis=2), jnp.concatenate(positions)


def paged_attention_xla(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *,
                        scale: float, soft_cap: float | None = None,
                        sliding_window: int | None = None, return_lse: bool = False,
                        max_blocks: int | None = None, interleave: int = 4,
                        k_scale: Array | None = None, v_scale: Array | None = None):
  """Reference implementation: gather the pages to a dense copy, then masked attention.

  A quantised cache's pages are dequantised (float32) as they are gathered: the dense copy of
  the rows' pages is the only one, as for any cache.

  ``max_blocks`` (static, optional) reads only the first ``max_blocks`` table entries, for
  callers that know every row is shorter than ``max_blocks * block_size``. ``interleave``
  (static): pages copied at once (:func:`gather_pages`); 4 is fastest for scattered pages on
  the CPUs measured (``benchmarks/decode_step.py``), 1 for a contiguous slab.

  Non-finite V: the fast path (:func:`masked_softmax_attention`) is exact when all its outputs
  are finite; otherwise a ``lax.cond`` recomputes the output with
  :func:`nonfinite_v_attention`. That slow path is a loop over (row, key chunk) that gathers
  each chunk's pages from the pools itself, because XLA sizes a call's scratch memory for its
  largest branch, taken or not: done for the whole batch at once (float32 V, its NaN / Inf
  flags) it tripled the scratch of a small CPU decode step, which then ran 2x slower every call
  (the buffer no longer fit under the allocator's mmap threshold); and a small loop body keeps
  the branch cheap to compile.
  """
  if isinstance(interleave, bool) or not isinstance(interleave, int) or interleave < 1:
    raise ValueError(f"interleave must be a positive int, got {interleave!r}")
  if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(
      max_blocks, int) or max_blocks < 1):
    raise ValueError(f"max_blocks must be a positive int, got {max_blocks!r}")
  # A row longer than the max_blocks pages read would silently lose its later keys: its
  # output and LSE become NaN instead (a traced length cannot raise).
  overlong = None
  if max_blocks is not None and max_blocks < block_tables.shape[1]:
    block_tables = block_tables[:, :max_blocks]
    overlong = kv_lens > max_blocks * k_pool.shape[3]  # [batch]
  k, positions = gather_dequantized(k_pool, k_scale, layer, block_tables, interleave)
  v, _ = gather_dequantized(v_pool, v_scale, layer, block_tables, interleave, key=False)
  mask = attention_masks(kv_lens, q_lens, q.shape[1], positions, sliding_window)
  mask = mask & kept_keys(block_tables, positions, k_pool.shape[3])[:, None, :]
  out, lse = masked_softmax_attention(q, k, v, mask, scale=scale, soft_cap=soft_cap,
                                      return_lse=True)
  # All outputs finite: no key any query reads held a non-finite V, and the result is exact.
  # Otherwise (or if a finite V overflowed) recompute the output by the contract's rule.
  exact = functools.partial(_nonfinite_v_paged, scale=scale, soft_cap=soft_cap,
                            sliding_window=sliding_window)
  out = lax.cond(jnp.any(~jnp.isfinite(out)), keep_finite_queries(exact, out), lambda *_: out,
                 q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, lse, k_scale, v_scale)
  if overlong is not None:
    out = jnp.where(overlong[:, None, None, None], jnp.nan, out).astype(out.dtype)
    lse = jnp.where(overlong[:, None, None], jnp.nan, lse)
  return (out, lse) if return_lse else out


def keep_finite_queries(exact, fast: Array):
  """The slow path's output, except for queries whose fast output is all finite: those
  are exact already (a non-finite V they see, or NaN logits, would make theirs non-finite),
  and keep their bits whatever other queries of the call hold."""
  def run(*args):
    ok = jnp.all(jnp.isfinite(fast), axis=-1, keepdims=True)
    return jnp.where(ok, fast, exact(*args).astype(fast.dtype))
  return run


_SLOW_PATH_CHUNK = 512  # keys per step of the slow path's loop (rounded to whole pages)


def _nonfinite_v_paged(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, lse, k_scale,
                       v_scale, *, scale, soft_cap, sliding_window):
  """:func:`nonfinite_v_attention` read straight from the pools, one (row, key chunk) at a time.

  Each step of the loop gathers its own ``[kv_heads, chunk, D]`` pages of K and V (in position
  order), so neither a dense copy of the rows' pages nor their probabilities exist at once:
  the branch's scratch stays a few tiles (XLA sizes a call's scratch for its largest branch,
  taken or not), and it compiles to one small loop body (a slow path gathering whole copies
  first doubled the compile time of every step that holds attention). The table is padded with
  null entries (never visible) to whole chunks.
  """
  b, q_len, qh, d = q.shape
  nb, bs = block_tables.shape[1], k_pool.shape[3]
  kvh = k_pool.shape[1]
  g = qh // kvh
  pages = max(1, min(nb, _SLOW_PATH_CHUNK // bs))
  block_tables = jnp.pad(block_tables, ((0, 0), (0, -nb % pages)))
  n_chunks = block_tables.shape[1] // pages
  chunk = pages * bs
  # [batch, kv_heads, group, q_len]: the fast path's log-sum-exp normalises every chunk.
  lse_g = jnp.where(jnp.isfinite(lse), lse, 0.0).reshape(b, q_len, kvh, g).transpose(0, 2, 3, 1)
  # XLA:CPU converts a 16-bit float array read inside a loop to float32 as a whole, outside the
  # loop (a pool-sized copy): the loop reads 16-bit pools as their bits and converts its pages.
  k_bits, v_bits = _float_bits(k_pool, k_scale), _float_bits(v_pool, v_scale)

  def gather(bits, pool, scale_, table, key):
    if bits is None:
      return gather_dequantized(pool, scale_, layer, table, key=key)
    x, positions = gather_pages(bits, layer, table)
    return lax.bitcast_convert_type(x, pool.dtype), positions

  def step(i, acc):  # row r, keys [c * chunk, (c + 1) * chunk)
    r, c = i // n_chunks, i % n_chunks
    table = lax.dynamic_slice(block_tables, (r, c * pages), (1, pages))
    k, positions = gather(k_bits, k_pool, k_scale, table, True)  # [1, kv_heads, chunk, D]
    v, _ = gather(v_bits, v_pool, v_scale, table, False)
    row = functools.partial(lax.dynamic_slice_in_dim, start_index=r, slice_size=1)
    mask = attention_masks(row(kv_lens), row(q_lens), q_len, positions + c * chunk,
                           sliding_window)  # [1, q_len, chunk]
    mask = mask & kept_keys(table, positions, bs)[:, None, :]
    logits = _grouped_logits(row(q), k, mask, scale=scale, soft_cap=soft_cap)
    p = jnp.where(mask[:, None, None], jnp.exp(logits - row(lse_g)[..., None]), 0.0)
    v = v.astype(jnp.float32)
    part = jnp.einsum("bhgqs,bhsd->bhgqd", p, jnp.where(jnp.isfinite(v), v, 0.0),
                      preferred_element_type=jnp.float32)
    seen = mask.astype(jnp.float32)
    nan = jnp.isnan(v)
    hits_pos = jnp.einsum("bqs,bhsd->bhqd", seen, (nan | (v == jnp.inf)).astype(jnp.float32))
    hits_neg = jnp.einsum("bqs,bhsd->bhqd", seen, (nan | (v == -jnp.inf)).astype(jnp.float32))
    inf = jnp.where(hits_pos > 0, jnp.inf, 0.0) + jnp.where(hits_neg > 0, -jnp.inf, 0.0)
    return lax.dynamic_update_slice_in_dim(acc, row(acc) + part + inf[:, :, None], r, axis=0)

  # zeros_like keeps the operands' varying mesh axes (under shard_map the loop's carry must).
  shape = (b, kvh, g, q_len, d)
  acc = (jnp.zeros_like(lse, jnp.float32, shape=shape)
         + jnp.zeros_like(v_pool, jnp.float32, shape=shape))
  acc = lax.fori_loop(0, b * n_chunks, step, acc)
  out = acc.transpose(0, 3, 1, 2, 4).reshape(b, q_len, qh, d)
  return _by_lse(out, lse).astype(q.dtype)


def _float_bits(pool: Array, scale: Array | None) -> Array | None:
  """``uint16`` bits of an unquantised 16-bit float pool (None for any other pool)."""
  if scale is None and pool.dtype in (jnp.bfloat16, jnp.float16):
    return lax.bitcast_convert_type(pool, jnp.uint16)
  return None


paged_attention_xla_jit = jax.jit(
    paged_attention_xla,
    static_argnames=("scale", "soft_cap", "sliding_window", "return_lse", "max_blocks",
                     "interleave"))
