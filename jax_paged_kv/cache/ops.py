"""Cache operations: allocate, reserve, write, append, lookup, free, fork, truncate.

All are pure functions ``(cache, ...) -> (cache, ..., status)``. Inside a trace (``jit``, ``vmap``,
``scan``, ...) they never raise on dynamic values: ``status`` (``int32``, one code per row, see
:class:`~jax_paged_kv.cache.errors.Status`) says what failed, and on any failure the returned cache
is bitwise equal to the input (only ``cache.telemetry`` counts the failure). Shape and dtype errors
are static and raise :class:`~jax_paged_kv.cache.errors.CacheShapeError` at trace time.

Called eagerly, each function first validates (a small jitted check that reads only metadata),
raises the named exception for the first failing row and leaves the caller's cache untouched;
otherwise it runs the jitted update, which *donates* the input cache by default so the pools are
updated in place (pass ``donate=False`` to keep the old cache alive, e.g. for a snapshot).
Inside the caller's own ``jit``, donation is the caller's business (``donate_argnums``).

Rows whose sequence id is negative are padding: they are ignored and never fail.

Typical decode step inside ``jit``::

    cache, slots, st = reserve(cache, seq_ids, num_new, max_new=1)   # once per step
    for layer in range(num_layers):                                    # or a lax.scan
      cache, _ = write_kv(cache, slots, k[layer], v[layer], layer)
      out = paged_attention(q[layer], cache, seq_ids, layer)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jax_paged_kv.cache import allocator as alloc_lib
from jax_paged_kv.cache import quant
from jax_paged_kv.cache.config import NULL_BLOCK, CacheStrategy
from jax_paged_kv.cache.errors import (
    CacheShapeError,
    Status,
    check_report,
    check_status,
    checking_enabled,
    is_tracing,
    raise_for_report,
    raise_for_status,
)
from jax_paged_kv.cache.inputs import INT32_MAX, as_counts, as_ids, as_layer, to_int32
from jax_paged_kv.cache.state import (
  PagedKVCache,
  Telemetry,
  check_layout,
  pool_values,
  stored_values,
)
from jax_paged_kv.cache.stats import check_invariants

# ---------------------------------------------------------------------------------------------
# helpers


def _ceil_div(a: Array, b: int) -> Array:
  return (a + b - 1) // b


def _duplicates(ids: Array, valid: Array) -> Array:
  """``bool[batch]``: True for every valid row whose id also appears on an earlier valid row."""
  n = ids.shape[0]
  if n == 0:
    return jnp.zeros((0,), bool)
  big = jnp.iinfo(jnp.int32).max
  keys = jnp.where(valid, ids, big)
  order = jnp.argsort(keys, stable=True)
  s = keys[order]
  dup_sorted = jnp.concatenate([jnp.zeros((1,), bool), (s[1:] == s[:-1]) & (s[1:] != big)])
  return jnp.zeros((n,), bool).at[order].set(dup_sorted)


def _row_checks(cache: PagedKVCache, seq_ids: Array, *, want_active: bool = True,
                duplicates: bool = True):
  """Common per-row checks. Returns ``(sid, pad, status)``; ``sid`` is clipped to be gatherable.

  ``duplicates=False`` allows one id on several rows (a parent forked into several children).
  """
  cfg = cache.config
  pad = seq_ids < 0
  in_range = seq_ids < cfg.max_seqs
  sid = jnp.clip(seq_ids, 0, cfg.max_seqs - 1)
  act = cache.active[sid]
  status = jnp.zeros(seq_ids.shape, jnp.int32)
  status = jnp.where(~pad & ~in_range, Status.INVALID_SLOT, status)
  if want_active:
    status = jnp.where((status == 0) & ~pad & ~act, Status.INACTIVE_SLOT, status)
  else:
    status = jnp.where((status == 0) & ~pad & act, Status.SLOT_IN_USE, status)
  if duplicates:
    dup = _duplicates(seq_ids, ~pad & in_range)
    status = jnp.where((status == 0) & dup, Status.DUPLICATE_SLOT, status)
  return sid, pad, status


def _drop_index(mask: Array, index: Array, oob: int) -> Array:
  """``index`` where ``mask``, else an out-of-range index that ``mode="drop"`` discards."""
  return jnp.where(mask, index, oob)


def _copy_blocks(cache: PagedKVCache, src: Array, dst: Array, mask: Array) -> PagedKVCache:
  """Copies whole blocks ``src -> dst`` (all layers, K and V) where ``mask``."""
  oob = cache.config.num_blocks
  src = jnp.clip(src.reshape(-1), 0, oob - 1)
  dst = _drop_index(mask.reshape(-1), dst.reshape(-1), oob)
  k_pool = cache.k_pool.at[:, :, dst].set(cache.k_pool[:, :, src], mode="drop")
  v_pool = cache.v_pool.at[:, :, dst].set(cache.v_pool[:, :, src], mode="drop")
  cache = cache.replace(k_pool=k_pool, v_pool=v_pool)
  if cache.config.kv_quant is not None:  # scales move with their block
    cache = cache.replace(
        k_scale=cache.k_scale.at[:, :, dst].set(cache.k_scale[:, :, src], mode="drop"),
        v_scale=cache.v_scale.at[:, :, dst].set(cache.v_scale[:, :, src], mode="drop"))
  return cache


def _scatter_tokens(cache: PagedKVCache, lead: tuple, blk: Array, off: Array, k: Array,
                    v: Array) -> PagedKVCache:
  """Stores new tokens' ``k, v [..., head_dim]`` (in ``config.dtype``) at pool ``lead + (blk,
  off)``.

  ``lead`` is ``(layer, slice(None))`` (``k``: ``[batch * T, kv_heads, head_dim]``) or
  ``(slice(None), slice(None))`` (``k``: ``[layers, kv_heads, batch * T, head_dim]``); ``blk``
  is ``num_blocks`` (dropped) for tokens not to write. A quantised cache quantises them and
  stores their scales in the same layout: only the written slots change, and for int8 / int4 K
  (whose scales are per block and channel) the blocks written into, whose older tokens are
  requantised when a new token widens a channel's range: O(block_size) per written token.
  """
  kv_quant = cache.config.kv_quant
  index = (*lead, blk, off)
  if kv_quant is None:  # (uint16 bit patterns into a pool_bits pool)
    dtype = cache.config.dtype
    k, v = stored_values(k, cache.k_pool, dtype), stored_values(v, cache.v_pool, dtype)
    return cache.replace(k_pool=cache.k_pool.at[index].set(k, mode="drop"),
                         v_pool=cache.v_pool.at[index].set(v, mode="drop"))
  vq, vs = quant.quantize_int4_v(v) if kv_quant == "int4" else quant.quantize(v, kv_quant)
  cache = cache.replace(v_pool=cache.v_pool.at[index].set(vq, mode="drop"),
                        v_scale=cache.v_scale.at[index].set(vs, mode="drop"))
  if not quant.channel_k_scales(kv_quant):  # fp8: per-token K scales, like V
    kq, ks = quant.quantize(k, kv_quant)
    return cache.replace(k_pool=cache.k_pool.at[index].set(kq, mode="drop"),
                         k_scale=cache.k_scale.at[index].set(ks, mode="drop"))
  # K (int8, int4): widen the channel scales of every block written into (a scatter-max, so
  # several new tokens of one block combine), requantise those blocks' tokens to the new scales
  # (blocks gathered once per new token; duplicates write identical values), then write the new
  # codes.
  nb = cache.config.num_blocks
  gblk = jnp.clip(blk, 0, nb - 1)
  old_s = cache.k_scale[(*lead, gblk)]  # like k: [..., head_dim]
  need = cache.k_scale.at[(*lead, blk)].max(quant.channel_scale(jnp.abs(k), kv_quant),
                                            mode="drop")
  need = need[(*lead, gblk)]
  new_s = quant.widened_scale(old_s, need, kv_quant)
  k_scale = cache.k_scale.at[(*lead, blk)].set(new_s, mode="drop")
  block = quant.dequantize_channel_k(cache.k_pool[(*lead, gblk)], old_s[..., None, :])
  requant = quant.channel_codes(block, new_s[..., None, :], kv_quant)
  k_pool = cache.k_pool.at[(*lead, blk)].set(requant, mode="drop")
  k_pool = k_pool.at[index].set(quant.channel_codes(k, new_s, kv_quant), mode="drop")
  return cache.replace(k_pool=k_pool, k_scale=k_scale)


def _eager_or_traced(impl, op: str, *, ids=None, context=None, static_argnames=()):
  """Builds the eager/traced front door of a cache update.

  Args:
    impl: ``impl(cache, *args, **static) -> (cache, *outputs, status)``.
    op: the public name, for messages.
    ids: ``ids(cache, *args) -> int32[batch]``, the id each row's message names (default: the
      first argument after the cache); ``False`` for ops whose rows name no sequence.
    context: ``context(cache, *args, **static) -> Context``, detail for the messages.
    static_argnames: static keyword arguments of ``impl``.

  Returns:
    ``run(cache, *args, donate=..., **static)``. Under a trace it calls ``impl`` directly (plus,
    in checking mode, ``checkify`` checks of the status and of every invariant). Eagerly it runs
    a metadata-only check (XLA drops the pool updates of the status-only program), raises for
    bad rows, then runs the donated jitted update.
  """
  check = jax.jit(lambda *a, **s: impl(*a, **s)[-1], static_argnames=static_argnames)
  donated = jax.jit(impl, static_argnames=static_argnames, donate_argnums=0)
  kept = jax.jit(impl, static_argnames=static_argnames)

  def message_args(cache, args, static):
    row_ids = None if ids is False else (ids(cache, *args) if ids else args[0])  # may be None
    return row_ids, (None if context is None else context(cache, *args, **static))

  def run(cache, *args, donate=True, **static):
    check_layout(cache, op=op)
    if is_tracing(cache, args):
      out = impl(cache, *args, **static)
      if checking_enabled():
        row_ids, ctx = message_args(cache, args, static)
        check_status(out[-1], row_ids, op=op, context=ctx)
        check_report(check_invariants(out[0]), op=op)
      return out
    status = check(cache, *args, **static)
    if np.any(np.asarray(status)):
      row_ids, ctx = message_args(cache, args, static)
      raise_for_status(status, row_ids, op=op, context=ctx)
    out = (donated if donate else kept)(cache, *args, **static)
    if checking_enabled():
      raise_for_report(check_invariants(out[0]), op=op)
    return out

  return run


# ---------------------------------------------------------------------------------------------
# allocate


def _allocate_impl(cache: PagedKVCache, seq_ids: Array):
  _, pad, status = _row_checks(cache, seq_ids, want_active=False)
  ok = jnp.all(status == 0)
  idx = _drop_index(ok & ~pad, seq_ids, cache.config.max_seqs)
  active = cache.active.at[idx].set(True, mode="drop")
  # Length and table of an inactive slot are already 0 (an invariant), nothing else to touch.
  return cache.replace(active=active), status


_allocate = _eager_or_traced(_allocate_impl, "allocate_sequences")


def allocate_sequences(cache: PagedKVCache, seq_ids, *, donate: bool = True):
  """Activates empty sequence slots.

  Args:
    cache: the cache.
    seq_ids: ``int32[batch]`` (or a scalar) slot ids to activate; negative ids are padding.
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, status)``; ``status`` is ``int32[batch]``: ``INVALID_SLOT``, ``SLOT_IN_USE``
    (already active) or ``DUPLICATE_SLOT`` per bad row.

  Raises:
    InvalidSlotError, SlotInUseError, DuplicateSlotError: eager calls with bad rows.
  """
  return _allocate(cache, as_ids(seq_ids), donate=donate)


# ---------------------------------------------------------------------------------------------
# reserve + write


def _blocks_needed(cache: PagedKVCache, sid: Array, n: Array):
  """Blocks each row needs to grow by ``n`` tokens (copy-on-write included).

  Returns ``(need int32[batch], cow bool[batch], last_block int32[batch])``: ``cow`` marks rows
  whose partly filled last block is shared and must be copied before the first write.
  """
  cfg = cache.config
  bs = cfg.block_size
  old_len = cache.seq_lens[sid]
  old_nb = _ceil_div(old_len, bs)
  last_block = cache.block_tables[sid, jnp.maximum(old_nb - 1, 0)]
  if cfg.strategy is CacheStrategy.PAGED:
    shared = cache.allocator.ref_counts[last_block] > 1
    cow = (n > 0) & ((old_len % bs) != 0) & shared
  else:
    cow = jnp.zeros(sid.shape, bool)
  need = _ceil_div(old_len + n, bs) - old_nb + cow.astype(jnp.int32)
  return need, cow, last_block


def _reserve_impl(cache: PagedKVCache, seq_ids: Array, num_new: Array, *, max_new: int):
  cfg = cache.config
  bs = cfg.block_size
  sid, pad, status = _row_checks(cache, seq_ids)
  n = jnp.where(pad, 0, num_new)
  status = jnp.where((status == 0) & ((n < 0) | (n > max_new)), Status.INVALID_COUNT, status)
  old_len = cache.seq_lens[sid]
  # n > max_seq_len - old_len, not old_len + n > max_seq_len: the sum can wrap in int32.
  status = jnp.where((status == 0) & (n > cfg.max_seq_len - old_len), Status.SEQUENCE_TOO_LONG,
                     status)
  row_ok = (status == 0) & ~pad
  n = jnp.where(row_ok, n, 0)
  new_len = old_len + n
  old_nb = _ceil_div(old_len, bs)
  need, cow, last_block = _blocks_needed(cache, sid, n)
  first_j = old_nb - cow.astype(jnp.int32)  # first table entry that receives a new block
  max_per_row = math.ceil(max_new / bs) + 1
  ok_rows = jnp.all(status == 0)

  # The allocator (pop, new table entries, copy-on-write) runs only in a step where some row
  # needs a block: in most decode steps no row crosses a block boundary, and skipping it there
  # (one lax.cond) makes a paged step cost what a contiguous one does. With no block needed the
  # allocating branch would change nothing: both give the same cache and status.
  def allocate(cache, status):
    alloc = cache.allocator
    k = jnp.arange(max_per_row, dtype=jnp.int32)
    if cfg.strategy is CacheStrategy.PAGED:
      alloc, new_blocks, enough = alloc_lib.pop_blocks(alloc, need, max_per_row, ok_rows)
    else:
      valid = k[None, :] < need[:, None]
      new_blocks = jnp.where(
          valid, cfg.contiguous_block(sid[:, None], first_j[:, None] + k[None, :]), NULL_BLOCK)
      enough = jnp.asarray(True)
      alloc = alloc_lib.retain_blocks(alloc, new_blocks, valid & ok_rows)
    # The pool running dry is reported only for a batch whose every row is otherwise valid.
    status = jnp.where(ok_rows & ~enough & (need > 0), Status.POOL_EXHAUSTED, status)
    ok = ok_rows & enough

    # New table entries.
    tj = first_j[:, None] + k[None, :]
    write = ok & (k[None, :] < need[:, None])
    t_rows = _drop_index(write, jnp.broadcast_to(sid[:, None], tj.shape), cfg.max_seqs)
    block_tables = cache.block_tables.at[t_rows, tj].set(new_blocks, mode="drop")
    cache = cache.replace(block_tables=block_tables, allocator=alloc)
    if quant.channel_k_scales(cfg.kv_quant):  # per-block K scales start from 0 in a fresh block
      fresh = _drop_index(write, new_blocks, cfg.num_blocks).reshape(-1)
      cache = cache.replace(k_scale=cache.k_scale.at[:, :, fresh].set(0, mode="drop"))

    # Copy the shared partial block into its private copy, then drop one reference to it.
    copy = cow & ok
    cache = _copy_blocks(cache, last_block, new_blocks[:, 0], copy)
    cache = cache.replace(allocator=alloc_lib.release_blocks(cache.allocator, last_block, copy))
    return cache, status, ok

  def skip(cache, status):
    return cache, status, ok_rows

  cache, status, ok = jax.lax.cond(jnp.any(need > 0), allocate, skip, cache, status)

  seq_lens = cache.seq_lens.at[_drop_index(ok & row_ok, sid, cfg.max_seqs)].set(
      new_len, mode="drop")
  failed = cache.telemetry.failed_allocations + (ok_rows & ~ok).astype(jnp.int32)
  cache = cache.replace(seq_lens=seq_lens, telemetry=Telemetry(failed))

  # Flat physical slot (block * block_size + offset) of every new token; out of range if none.
  i = jnp.arange(max_new, dtype=jnp.int32)
  pos = old_len[:, None] + i[None, :]
  has = ok & (i[None, :] < n[:, None])
  blk = cache.block_tables[sid[:, None], jnp.clip(pos // bs, 0, cfg.max_blocks_per_seq - 1)]
  slots = jnp.where(has, blk * bs + pos % bs, cfg.num_blocks * bs)
  return cache, slots.astype(jnp.int32), status


def _reserve_context(cache, seq_ids, num_new, *args, max_new=None):
  """Message details of :func:`reserve` and :func:`append_kv` (``max_new`` defaults to T)."""
  cfg = cache.config
  if max_new is None:
    max_new = args[-1].shape[2]  # append_kv(cache, seq_ids, num_new, k, v): k's T

  def sid(row):
    return jnp.clip(seq_ids[row], 0, cfg.max_seqs - 1)

  def exhausted(row):
    rows = jnp.clip(seq_ids, 0, cfg.max_seqs - 1)
    n = jnp.where(seq_ids < 0, 0, num_new)
    return {"needed": jnp.sum(_blocks_needed(cache, rows, n)[0]),
            "free": cache.allocator.num_free}

  return {
      Status.SEQUENCE_TOO_LONG: (
          "length {length} + {num_new} new tokens > max_seq_len={max_seq_len}",
          lambda row: {"length": cache.seq_lens[sid(row)], "num_new": num_new[row],
                       "max_seq_len": cfg.max_seq_len}),
      Status.POOL_EXHAUSTED: ("the batch needs {needed} new blocks, {free} are free", exhausted),
      Status.INVALID_COUNT: ("num_new={num_new} is not in [0, max_new={max_new}]",
                             lambda row: {"num_new": num_new[row], "max_new": max_new}),
  }


_reserve = _eager_or_traced(_reserve_impl, "reserve", context=_reserve_context,
                            static_argnames=("max_new",))


def reserve(cache: PagedKVCache, seq_ids, num_new=1, *, max_new: int | None = None,
            donate: bool = True):
  """Reserves room for the next tokens of a batch of sequences (once per step, all layers).

  Grows each sequence's length by ``num_new[b]``, pops the blocks it needs from the free list in
  one vectorised update, and copies a shared partly filled last block first (copy-on-write).

  Args:
    cache: the cache.
    seq_ids: ``int32[batch]`` slot ids (negative: padding row).
    num_new: ``int32[batch]`` or scalar, new tokens per row, each in ``[0, max_new]``.
    max_new: static bound on ``num_new`` (the ``T`` of the K/V you will write). Defaults to
      ``num_new`` when that is a Python int.
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, slots, status)``: ``slots`` is ``int32[batch, max_new]``, the flat physical slot
    ``block * block_size + offset`` of each new token, or ``num_blocks * block_size`` (out of
    range, dropped by :func:`write_kv`) where row ``b`` has fewer than ``max_new`` new tokens.
    ``status`` is ``int32[batch]``.

  Raises:
    PoolExhaustedError, InvalidSlotError, InactiveSlotError, SequenceTooLongError,
    DuplicateSlotError, InvalidCountError: eager calls with bad rows.
  """
  seq_ids = as_ids(seq_ids)
  if max_new is None:
    if isinstance(num_new, bool) or not isinstance(num_new, (int, np.integer)):
      raise CacheShapeError("reserve needs a static max_new when num_new is not a Python int")
    # A count outside [0, int32 max] is a bad row (INVALID_COUNT: raised eagerly, a status
    # under jit), not a bad static bound the caller never passed.
    max_new = min(max(int(num_new), 0), 2**31 - 1)
  if isinstance(max_new, bool) or not isinstance(max_new, (int, np.integer)) or not (
      0 <= max_new < 2**31):
    raise CacheShapeError(f"max_new must be a non-negative int, got {max_new!r}")
  num_new = as_counts(num_new, seq_ids.shape[0], "num_new")
  return _reserve(cache, seq_ids, num_new, donate=donate, max_new=int(max_new))


def _check_kv(cache: PagedKVCache, k, v, lead: tuple[int, ...], name: str):
  cfg = cache.config
  k, v = jnp.asarray(k), jnp.asarray(v)
  heads = cache.k_pool.shape[1]  # the local shard's heads under shard_map
  want = (*lead, heads, cfg.head_dim)
  for x, nm in ((k, "k"), (v, "v")):
    if x.shape != want:
      raise CacheShapeError(f"{name}: {nm} has shape {x.shape}, expected {want} "
                            f"([..., kv_heads={heads}, head_dim={cfg.head_dim}])")
    if x.dtype != cfg.dtype:
      raise CacheShapeError(f"{name}: {nm} has dtype {x.dtype}, the cache stores {cfg.dtype}; "
                            "cast it first")
  return k, v


def _unreserved_slots(cache: PagedKVCache, slots: Array, seq_ids: Array | None) -> Array:
  """``bool[batch, T]``: entries of ``slots`` that :func:`write_kv` must not write.

  A token slot may be written only if it is the "no token" value ``num_blocks * block_size``
  (skipped) or lies in a real block that exactly one live block-table entry references (so never
  the null block, a free block, or a block shared by a fork). With ``seq_ids``, it must also be a
  position ``< seq_len`` of the row's own sequence (which must be active): exactly the slots
  :func:`reserve` hands out.
  """
  cfg = cache.config
  bs, nb = cfg.block_size, cfg.num_blocks
  none = slots == nb * bs
  blk = jnp.clip(slots // bs, 0, nb - 1)
  owned = ((slots >= 0) & (slots < nb * bs) & (blk != NULL_BLOCK)
           & (cache.allocator.ref_counts[blk] == 1))
  if seq_ids is not None:
    sid, pad, status = _row_checks(cache, seq_ids, duplicates=False)
    row_ok = (status == 0) & ~pad
    tables = cache.block_tables[sid]  # [batch, table_width]
    lens = cache.seq_lens[sid]  # [batch]
    start = jnp.arange(cfg.max_blocks_per_seq, dtype=jnp.int32) * bs  # [table_width]
    pos = start[None, None, :] + (slots % bs)[:, :, None]  # [batch, T, table_width]
    mine = (tables[:, None, :] == blk[:, :, None]) & (pos < lens[:, None, None])
    owned = owned & row_ok[:, None] & jnp.any(mine, axis=-1)
    # A row naming no active sequence fails even where it skips every slot.
    return (~none & ~owned) | (~row_ok & ~pad)[:, None]
  return ~none & ~owned


def write_status(cache: PagedKVCache, slots: Array, layer: Array,
                 seq_ids: Array | None) -> Array:
  """:func:`write_kv`'s ``int32[batch]`` status for these slots and layer (traceable)."""
  bad = _unreserved_slots(cache, slots, seq_ids)  # [batch, T]
  layer_ok = (layer >= 0) & (layer < cache.config.num_layers)
  status = jnp.where(jnp.any(bad, axis=1), Status.INVALID_TOKEN_SLOT, Status.OK)
  return jnp.where(layer_ok, status, Status.INVALID_LAYER).astype(jnp.int32)


def _write_impl(cache: PagedKVCache, slots: Array, k: Array, v: Array, layer: Array,
                seq_ids: Array | None):
  L, H, NB, BS, _ = cache.k_pool.shape
  D = cache.config.head_dim  # the unpacked head_dim (int4 pools hold two values per byte)
  status = write_status(cache, slots, layer, seq_ids)  # [batch]
  ok = jnp.all(status == 0)
  flat = _drop_index(ok & (slots < NB * BS), slots, NB * BS).reshape(-1)
  layer = jnp.clip(layer, 0, L - 1)
  kf = k.reshape(-1, H, D)  # [batch * T, kv_heads, head_dim]
  vf = v.reshape(-1, H, D)
  # Scatter straight into the 5-D pool: reshaping it to [.., NB * BS, ..] around the scatter
  # makes XLA:CPU copy the whole pool instead of updating the donated buffer in place (and, with
  # a single index, rewrite the scatter into an update plus a pool-sized select). ``flat`` is
  # never negative here (JAX would wrap a negative index into the last block before "drop").
  blk, off = flat // BS, flat % BS
  return _scatter_tokens(cache, (layer, slice(None)), blk, off, kf, vf), status


def write_context(cache, slots, k, v, layer, seq_ids):
  """Detail for :func:`write_kv`'s error messages."""

  def bad_slot(row):
    bad = _unreserved_slots(cache, slots, seq_ids)[row]
    col = jnp.argmax(bad)
    return {"col": col, "slot": slots[row, col]}

  return {
      Status.INVALID_TOKEN_SLOT: ("slots[{row}, {col}]={slot}", bad_slot),
      Status.INVALID_LAYER: ("layer={layer}, num_layers={num_layers}",
                             lambda row: {"layer": layer, "num_layers": cache.config.num_layers}),
  }


_write = _eager_or_traced(
    _write_impl, "write_kv", context=write_context,
    ids=lambda cache, slots, k, v, layer, seq_ids: seq_ids)


def write_kv(cache: PagedKVCache, slots, k, v, layer, *, seq_ids=None, donate: bool = True):
  """Writes one layer's new K/V into the token slots that :func:`reserve` returned.

  Args:
    cache: the cache.
    slots: ``int32[batch, T]`` token slots from :func:`reserve`; the value
      ``num_blocks * block_size`` (what :func:`reserve` gives unused entries) is skipped.
    k: ``[batch, T, kv_heads, head_dim]`` in ``cache.config.dtype``.
    v: same shape and dtype.
    layer: ``int32[]`` layer index; may be traced (models scan over layers).
    seq_ids: optional ``int32[batch]``, the sequence each row belongs to (what was passed to
      :func:`reserve`). With it every slot must be a position of that row's own active sequence;
      without it, a slot of a block that exactly one live sequence holds. Pass it: it is what
      makes a wrong slot unable to touch another sequence.
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, status)``; ``status`` is ``int32[batch]``: ``INVALID_TOKEN_SLOT`` for a row with a
    slot that is negative, past the pool, in the null block, in a free or shared block, or (with
    ``seq_ids``) not its own sequence's; ``INVALID_LAYER`` on every row if ``layer`` is out of
    range. On any failure nothing is written.

  Raises:
    InvalidTokenSlotError, InvalidLayerError, InvalidSlotError, InactiveSlotError: eager calls.
  """
  slots, k, v = check_write(cache, slots, k, v, layer, seq_ids, op="write_kv")
  return _write(cache, slots, k, v, as_layer(layer), None if seq_ids is None else
                as_ids(seq_ids), donate=donate)


def check_write(cache: PagedKVCache, slots, k, v, layer, seq_ids, *, op: str):
  """Validates :func:`write_kv`'s arguments' shapes and dtypes; returns ``(slots, k, v)``."""
  as_layer(layer)  # a layer of the wrong type is refused whatever the slots hold
  slots = to_int32(slots, "slots", "ids")
  if slots.ndim != 2:
    raise CacheShapeError(f"slots must be int32[batch, T], got shape {list(slots.shape)}")
  k, v = _check_kv(cache, k, v, slots.shape, op)
  if seq_ids is not None and as_ids(seq_ids).shape != slots.shape[:1]:
    raise CacheShapeError(f"{op}: {as_ids(seq_ids).shape[0]} seq_ids for {slots.shape[0]} rows")
  return slots, k, v


def _append_impl(cache: PagedKVCache, seq_ids, num_new, k, v):
  max_new = k.shape[2]
  cache, slots, status = _reserve_impl(cache, seq_ids, num_new, max_new=max_new)
  L, H, NB, BS, _ = cache.k_pool.shape
  D = cache.config.head_dim  # the unpacked head_dim (int4 pools hold two values per byte)
  flat = slots.reshape(-1)  # already out of range for failed or padding rows
  kf = k.reshape(L, -1, H, D).transpose(0, 2, 1, 3)  # [layers, kv_heads, batch * T, head_dim]
  vf = v.reshape(L, -1, H, D).transpose(0, 2, 1, 3)
  blk, off = flat // BS, flat % BS
  return _scatter_tokens(cache, (slice(None), slice(None)), blk, off, kf, vf), status


_append = _eager_or_traced(_append_impl, "append_kv", context=_reserve_context)


def append_kv(cache: PagedKVCache, k, v, seq_ids, *, num_new=None, donate: bool = True):
  """Reserve + write: appends new tokens' K/V to a batch of sequences (LLMIR's appendKV op).

  Args:
    cache: the cache.
    k: ``[layers, batch, T, kv_heads, head_dim]`` (all layers), or ``[batch, T, kv_heads,
      head_dim]`` for a one-layer cache. For one layer of a deeper model, use :func:`reserve`
      once per step and :func:`write_kv` per layer.
    v: same shape as ``k``; both in ``cache.config.dtype``.
    seq_ids: ``int32[batch]`` slot ids (negative: padding row, ignored).
    num_new: ``int32[batch]`` valid new tokens per row (ragged batches; ``k[:, b, num_new[b]:]``
      is ignored). Defaults to ``T`` for every row.
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, status)`` with ``status`` ``int32[batch]``. On any failure nothing is appended.

  Raises:
    CacheShapeError: wrong shape or dtype (at trace time).
    PoolExhaustedError, InvalidSlotError, InactiveSlotError, SequenceTooLongError,
    DuplicateSlotError, InvalidCountError: eager calls with bad rows.
  """
  cfg = cache.config
  k, v = jnp.asarray(k), jnp.asarray(v)
  if k.ndim == 4:
    if cfg.num_layers != 1:
      raise CacheShapeError(
          f"append_kv: 4-D k is for a one-layer cache, this one has {cfg.num_layers} layers; "
          "pass [layers, batch, T, kv_heads, head_dim], or use reserve() + write_kv() per layer")
    k, v = k[None], v[None]
  if k.ndim != 5:
    raise CacheShapeError(f"append_kv: k must be [layers, batch, T, kv_heads, head_dim], got "
                          f"shape {k.shape}")
  k, v = _check_kv(cache, k, v, (cfg.num_layers, *k.shape[1:3]), "append_kv")
  seq_ids = as_ids(seq_ids)
  if seq_ids.shape[0] != k.shape[1]:
    raise CacheShapeError(f"append_kv: {seq_ids.shape[0]} seq_ids for a batch of {k.shape[1]}")
  T = k.shape[2]
  num_new = as_counts(T if num_new is None else num_new, seq_ids.shape[0], "num_new")
  return _append(cache, seq_ids, num_new, k, v, donate=donate)


# ---------------------------------------------------------------------------------------------
# read


def gather_tables(cache: PagedKVCache, seq_ids) -> tuple[Array, Array]:
  """Block tables and lengths of a batch, with padding/invalid/inactive rows made empty.

  Args:
    cache: the cache.
    seq_ids: ``int32[batch]``.

  Returns:
    ``(block_tables int32[batch, table_width], kv_lens int32[batch])``. Rows that do not name an
    active slot get length 0 and an all-null table, so nothing can be read through them.
  """
  seq_ids = as_ids(seq_ids)
  cfg = cache.config
  valid = (seq_ids >= 0) & (seq_ids < cfg.max_seqs)
  sid = jnp.clip(seq_ids, 0, cfg.max_seqs - 1)
  valid = valid & cache.active[sid]
  tables = jnp.where(valid[:, None], cache.block_tables[sid], NULL_BLOCK)
  lens = jnp.where(valid, cache.seq_lens[sid], 0)
  return tables, lens


def readable_status(cache: PagedKVCache, seq_ids: Array, layer: Array) -> Array:
  """``int32[batch]``: why a read of each row would come back empty (0: it reads its data).

  ``INVALID_SLOT`` or ``INACTIVE_SLOT`` for ids that name no active sequence, then
  ``INVALID_LAYER`` for every row if ``layer`` is out of range. Padding rows are 0.
  """
  sid, pad, status = _row_checks(cache, seq_ids, duplicates=False)
  layer_ok = (layer >= 0) & (layer < cache.config.num_layers)
  return jnp.where((status == 0) & ~layer_ok, Status.INVALID_LAYER, status).astype(jnp.int32)


def _readable_context(cache, seq_ids, layer):
  return {Status.INVALID_LAYER: ("layer={layer}, num_layers={num_layers}",
                                 lambda row: {"layer": layer,
                                              "num_layers": cache.config.num_layers})}


_readable_status = jax.jit(readable_status)


def check_readable(cache: PagedKVCache, seq_ids: Array, layer: Array, *, op: str) -> None:
  """Raises (eager) or, in checking mode, checks (traced) that every row can be read.

  Inside a trace without checking mode this does nothing: unreadable rows read as empty.
  """
  check_layout(cache, op=op)
  if is_tracing(cache, seq_ids, layer):
    if checking_enabled():
      check_status(readable_status(cache, seq_ids, layer), seq_ids, op=op,
                   context=_readable_context(cache, seq_ids, layer))
    return
  ids = np.atleast_1d(np.asarray(seq_ids))
  lay = int(np.asarray(layer))
  if not 0 <= lay < cache.config.num_layers:  # even for an empty batch
    raise_for_status(np.asarray([Status.INVALID_LAYER]), op=op,
                     context=_readable_context(cache, seq_ids, lay))
  raise_for_status(_readable_status(cache, ids, layer), ids, op=op)


@functools.partial(jax.jit, static_argnames=("max_len",))
def _lookup_impl(cache: PagedKVCache, seq_ids, layer, *, max_len: int):
  cfg = cache.config
  tables, lens = gather_tables(cache, seq_ids)
  layer_ok = (layer >= 0) & (layer < cfg.num_layers)
  lens = jnp.where(layer_ok, lens, 0)
  layer = jnp.clip(layer, 0, cfg.num_layers - 1)
  bs = cfg.block_size
  pos = jnp.arange(max_len)
  blk = tables[:, pos // bs]  # [batch, max_len]
  def read(pool, scale, which):
    # One gather each, the layer in its index (a separate pool[layer] slice may be copied).
    x = pool[layer, :, blk, pos % bs]  # [batch, max_len, kv_heads, stored head_dim]
    x = pool_values(x, cfg.dtype) if scale is None else x
    if quant.channel_k_scales(cfg.kv_quant) and which == "k":  # the gathered tokens only
      x = quant.dequantize_channel_k(x, scale[layer, :, blk], cfg.dtype)
    elif cfg.kv_quant == "int4":
      x = quant.dequantize_int4_v(x, scale[layer, :, blk, pos % bs], cfg.dtype)
    elif scale is not None:
      x = quant.dequantize(x, scale[layer, :, blk, pos % bs], cfg.dtype)
    kept = (pos[None, :] < lens[:, None]) & (blk != NULL_BLOCK)  # holes: freed, read as 0
    return jnp.where(kept[:, :, None, None], x, jnp.zeros((), x.dtype))
  return read(cache.k_pool, cache.k_scale, "k"), read(cache.v_pool, cache.v_scale, "v"), lens


def lookup_kv(cache: PagedKVCache, seq_ids, layer, *, max_len: int | None = None):
  """Dense, padded keys and values of a batch of sequences (the LLMIR design's lookupKV op).

  Args:
    cache: the cache.
    seq_ids: ``int32[batch]`` slot ids (negative: padding row, returns length 0).
    layer: ``int32[]`` layer index (may be traced).
    max_len: static length of the output (default ``max_seq_len``); longer sequences are cut.

  Returns:
    ``(k, v, lens)``: ``k`` and ``v`` are ``[batch, max_len, kv_heads, head_dim]`` in the cache
    dtype (dequantised for a quantised cache), zero past each row's length and in blocks
    :func:`free_outside_window` freed; ``lens`` is
    ``int32[batch]``. Rows that name no active
    slot come back empty (inside ``jit``); eager calls raise instead.

  Raises:
    CacheShapeError: ``max_len`` is not a non-negative int; ids or layer of a non-integer type.
    InvalidSlotError, InactiveSlotError, InvalidLayerError: eager calls with bad ids or layer.
  """
  if max_len is None:
    max_len = cache.config.max_seq_len
  if isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or not (
      0 <= max_len < 2**31):
    raise CacheShapeError(f"lookup_kv: max_len must be a non-negative int, got {max_len!r}")
  seq_ids = as_ids(seq_ids)
  layer = as_layer(layer)
  check_readable(cache, seq_ids, layer, op="lookup_kv")
  max_len = int(max_len)
  k, v, lens = _lookup_impl(cache, seq_ids, layer, max_len=max_len)
  return k, v, jnp.minimum(lens, max_len)


# ---------------------------------------------------------------------------------------------
# free, fork, truncate


def _free_impl(cache: PagedKVCache, seq_ids: Array):
  cfg = cache.config
  sid, pad, status = _row_checks(cache, seq_ids)
  ok = jnp.all(status == 0)
  rows = ok & ~pad
  nb = _ceil_div(cache.seq_lens[sid], cfg.block_size)
  j = jnp.arange(cfg.max_blocks_per_seq)
  held = rows[:, None] & (j[None, :] < nb[:, None])
  alloc = alloc_lib.release_blocks(cache.allocator, cache.block_tables[sid], held,
                                   push=cfg.strategy is CacheStrategy.PAGED)
  idx = _drop_index(rows, sid, cfg.max_seqs)
  return cache.replace(
      allocator=alloc,
      block_tables=cache.block_tables.at[idx].set(NULL_BLOCK, mode="drop"),
      seq_lens=cache.seq_lens.at[idx].set(0, mode="drop"),
      active=cache.active.at[idx].set(False, mode="drop"),
  ), status


_free = _eager_or_traced(_free_impl, "free_sequences")


def free_sequences(cache: PagedKVCache, seq_ids, *, donate: bool = True):
  """Ends sequences: drops their block references (blocks return to the pool at zero).

  Args:
    cache: the cache.
    seq_ids: ``int32[batch]`` (or scalar) active slot ids; negative ids are padding.
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, status)``; ``status`` ``int32[batch]``: ``INVALID_SLOT``, ``INACTIVE_SLOT``
    (double free) or ``DUPLICATE_SLOT``.
  """
  return _free(cache, as_ids(seq_ids), donate=donate)


def _fork_checks(cache: PagedKVCache, parents: Array, children: Array):
  """Per-row ``(status, parent_at_fault)`` of a fork; one parent may be on several rows."""
  _, ppad, pstatus = _row_checks(cache, parents, duplicates=False)
  _, cpad, cstatus = _row_checks(cache, children, want_active=False)
  parent_bad = pstatus != 0
  status = jnp.where(parent_bad, pstatus, cstatus)
  status = jnp.where((status == 0) & (ppad != cpad), Status.INVALID_SLOT, status)
  return status, parent_bad


def _fork_context(cache, parents, children):
  return {
      Status.INVALID_SLOT: (
          "parent {parent}, child {child}: both must be in [0, max_seqs={max_seqs}), or both "
          "negative (padding)",
          lambda row: {"parent": parents[row], "child": children[row],
                       "max_seqs": cache.config.max_seqs}),
      Status.INACTIVE_SLOT: ("parent {parent} is not active",
                             lambda row: {"parent": parents[row]}),
      Status.SLOT_IN_USE: ("child {child} is already active",
                           lambda row: {"child": children[row]}),
      Status.DUPLICATE_SLOT: ("child {child} appears on more than one row",
                              lambda row: {"child": children[row]}),
  }


def _fork_culprits(cache, parents, children):
  """The id each row's message names: the parent if it is at fault, else the child."""
  return jnp.where(_fork_checks(cache, parents, children)[1], parents, children)


def _fork_impl(cache: PagedKVCache, parents: Array, children: Array):
  cfg = cache.config
  status, _ = _fork_checks(cache, parents, children)
  psid = jnp.clip(parents, 0, cfg.max_seqs - 1)
  csid = jnp.clip(children, 0, cfg.max_seqs - 1)
  ppad = parents < 0
  ok = jnp.all(status == 0)
  rows = ok & ~ppad
  lens = cache.seq_lens[psid]
  nb = _ceil_div(lens, cfg.block_size)
  j = jnp.arange(cfg.max_blocks_per_seq)
  held = rows[:, None] & (j[None, :] < nb[:, None])
  ptables = cache.block_tables[psid]
  if cfg.strategy is CacheStrategy.PAGED:
    ctables = jnp.where(held, ptables, NULL_BLOCK)
  else:
    ctables = jnp.where(held, cfg.contiguous_block(csid[:, None], j[None, :]), NULL_BLOCK)
    cache = _copy_blocks(cache, ptables, ctables, held)
  alloc = alloc_lib.retain_blocks(cache.allocator, ctables, held)
  idx = _drop_index(rows, csid, cfg.max_seqs)
  return cache.replace(
      allocator=alloc,
      block_tables=cache.block_tables.at[idx].set(ctables, mode="drop"),
      seq_lens=cache.seq_lens.at[idx].set(lens, mode="drop"),
      active=cache.active.at[idx].set(True, mode="drop"),
  ), status


_fork = _eager_or_traced(_fork_impl, "fork_sequence", ids=_fork_culprits, context=_fork_context)


def fork_sequence(cache: PagedKVCache, parent_ids, child_ids, *, donate: bool = True):
  """Forks sequences: each child shares all of its parent's blocks by reference count.

  Neither side is copied now. The partly filled last block, still shared, is copied by
  whichever side writes into it first (copy-on-write in :func:`reserve`); full blocks stay
  shared for good. With the ``CONTIGUOUS`` strategy the parent's data is copied into the
  child's slab instead.

  Args:
    cache: the cache.
    parent_ids: ``int32[batch]`` (or scalar) active slots; one parent may appear many times.
    child_ids: ``int32[batch]`` (or scalar) inactive slots, all distinct.
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, status)``; ``status`` has the shape of ``parent_ids`` (``INVALID_SLOT``,
    ``INACTIVE_SLOT`` parent, ``SLOT_IN_USE`` child, ``DUPLICATE_SLOT`` child).
  """
  scalar = np.ndim(parent_ids) == 0
  parents = as_ids(parent_ids, "parent_ids")
  children = as_ids(child_ids, "child_ids")
  if parents.shape != children.shape:
    raise CacheShapeError(f"fork_sequence: parent_ids {parents.shape} and child_ids "
                          f"{children.shape} differ in shape")
  cache, status = _fork(cache, parents, children, donate=donate)
  return cache, (status[0] if scalar else status)


def _reorder_checks(cache: PagedKVCache, seq_ids: Array, src_ids: Array):
  """Per-row ``(status, source_at_fault)`` of a reorder; one source may be on several rows."""
  _, pad, status = _row_checks(cache, seq_ids)
  _, spad, sstatus = _row_checks(cache, src_ids, duplicates=False)
  source_bad = (status == 0) & (sstatus != 0)
  status = jnp.where(status == 0, sstatus, status)
  status = jnp.where((status == 0) & (pad != spad), Status.INVALID_SLOT, status)
  return status, source_bad


def _reorder_context(cache, seq_ids, src_ids):
  return {
      Status.INVALID_SLOT: (
          "sequence {seq}, source {src}: both must be in [0, max_seqs={max_seqs}), or both "
          "negative (padding)",
          lambda row: {"seq": seq_ids[row], "src": src_ids[row],
                       "max_seqs": cache.config.max_seqs}),
      Status.INACTIVE_SLOT: ("slot {slot} is not active",
                             lambda row: {"slot": _reorder_culprits(cache, seq_ids,
                                                                    src_ids)[row]}),
      Status.DUPLICATE_SLOT: ("sequence {seq} appears on more than one row",
                              lambda row: {"seq": seq_ids[row]}),
  }


def _reorder_culprits(cache, seq_ids, src_ids):
  """The id each row's message names: the source if it is at fault, else the sequence."""
  return jnp.where(_reorder_checks(cache, seq_ids, src_ids)[1], src_ids, seq_ids)


def _reorder_impl(cache: PagedKVCache, seq_ids: Array, src_ids: Array):
  cfg = cache.config
  status, _ = _reorder_checks(cache, seq_ids, src_ids)
  sid = jnp.clip(seq_ids, 0, cfg.max_seqs - 1)
  src = jnp.clip(src_ids, 0, cfg.max_seqs - 1)
  rows = jnp.all(status == 0) & (seq_ids >= 0)
  j = jnp.arange(cfg.max_blocks_per_seq)
  lens = cache.seq_lens[src]
  src_tables = cache.block_tables[src]
  # A hole (a block free_outside_window freed) stays a hole.
  held = (rows[:, None] & (j[None, :] < _ceil_div(lens, cfg.block_size)[:, None])
          & (src_tables != NULL_BLOCK))
  old_held = rows[:, None] & (j[None, :] < _ceil_div(cache.seq_lens[sid],
                                                     cfg.block_size)[:, None])
  if cfg.strategy is CacheStrategy.PAGED:
    tables = jnp.where(held, src_tables, NULL_BLOCK)
  else:  # each slot keeps its slab: the source's data is copied in (all reads come first)
    tables = jnp.where(held, cfg.contiguous_block(sid[:, None], j[None, :]), NULL_BLOCK)
    cache = _copy_blocks(cache, src_tables, tables, held & (src != sid)[:, None])
  # New references first, then the old ones go: a block that stays referenced never reaches
  # zero on the way (it would be pushed onto the free list).
  alloc = alloc_lib.retain_blocks(cache.allocator, tables, held)
  alloc = alloc_lib.release_blocks(alloc, cache.block_tables[sid], old_held,
                                   push=cfg.strategy is CacheStrategy.PAGED)
  idx = _drop_index(rows, sid, cfg.max_seqs)
  return cache.replace(
      allocator=alloc,
      block_tables=cache.block_tables.at[idx].set(tables, mode="drop"),
      seq_lens=cache.seq_lens.at[idx].set(lens, mode="drop"),
  ), status


_reorder = _eager_or_traced(_reorder_impl, "reorder_sequences", ids=_reorder_culprits,
                            context=_reorder_context)


def reorder_sequences(cache: PagedKVCache, seq_ids, src_ids, *, donate: bool = True):
  """Each sequence becomes a copy of another: beam search's reorder, as a pure update.

  Sequence ``seq_ids[b]`` takes the tokens of ``src_ids[b]`` as they were before the call: in a
  ``PAGED`` cache it shares that sequence's blocks by reference count (its own old blocks lose
  a reference; a shared partly filled last block is copied by whichever side writes into it
  first, copy-on-write in :func:`reserve`), so the cost is O(block-table entries), whatever
  the length. A sequence may be its own source, and one source may feed several rows (a beam
  with several children; a beam no row names is dropped). With the ``CONTIGUOUS`` strategy the
  source's data is copied into the sequence's slab.

  Args:
    cache: the cache.
    seq_ids: ``int32[batch]`` (or scalar) active slots, all distinct; negative: padding.
    src_ids: ``int32[batch]`` (or scalar) active slots; negative exactly where ``seq_ids`` is.
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, status)``; ``status`` has the shape of ``seq_ids`` (``INVALID_SLOT``,
    ``INACTIVE_SLOT`` sequence or source, ``DUPLICATE_SLOT`` sequence; on any bad row nothing
    changes).
  """
  scalar = np.ndim(seq_ids) == 0
  seqs = as_ids(seq_ids)
  srcs = as_ids(src_ids, "src_ids")
  if seqs.shape != srcs.shape:
    raise CacheShapeError(f"reorder_sequences: seq_ids {seqs.shape} and src_ids {srcs.shape} "
                          "differ in shape")
  cache, status = _reorder(cache, seqs, srcs, donate=donate)
  return cache, (status[0] if scalar else status)


def _truncate_impl(cache: PagedKVCache, seq_ids: Array, num_tokens: Array, *,
                   window: int | None):
  cfg = cache.config
  sid, pad, status = _row_checks(cache, seq_ids)
  lens = cache.seq_lens[sid]
  n = jnp.where(pad, 0, num_tokens)
  status = jnp.where((status == 0) & ((n < 0) | (n > lens)), Status.INVALID_COUNT, status)
  new_len = lens - jnp.clip(n, 0, lens)
  old_nb = _ceil_div(lens, cfg.block_size)
  new_nb = _ceil_div(new_len, cfg.block_size)
  # The new last block must still hold its tokens (not freed by free_outside_window).
  last = cache.block_tables[sid, jnp.clip(new_nb - 1, 0, cfg.max_blocks_per_seq - 1)]
  status = jnp.where((status == 0) & ~pad & (new_nb > 0) & (last == NULL_BLOCK),
                     Status.FREED_BLOCK, status)
  # Holes below the new length: free_outside_window freed them for the old length's window,
  # so after a rollback the window of the new last position may reach into them. Without the
  # window this cannot be checked (refused); with it, every hole must lie wholly before it.
  j = jnp.arange(cfg.max_blocks_per_seq)
  holes = (j[None, :] < new_nb[:, None]) & (cache.block_tables[sid] == NULL_BLOCK)
  if window is None:
    lost = jnp.any(holes, axis=1) & (n > 0)
  else:
    lost = jnp.any(holes & ((j[None, :] + 1) * cfg.block_size > (new_len - window)[:, None]),
                   axis=1)
  status = jnp.where((status == 0) & ~pad & lost, Status.FREED_BLOCK, status)
  ok = jnp.all(status == 0)
  rows = ok & ~pad
  drop = rows[:, None] & (j[None, :] >= new_nb[:, None]) & (j[None, :] < old_nb[:, None])
  alloc = alloc_lib.release_blocks(cache.allocator, cache.block_tables[sid], drop,
                                   push=cfg.strategy is CacheStrategy.PAGED)
  tables = jnp.where(drop, NULL_BLOCK, cache.block_tables[sid])
  idx = _drop_index(rows, sid, cfg.max_seqs)
  if quant.channel_k_scales(cfg.kv_quant):
    cache = _narrow_k_scales(cache, sid, rows & (n > 0), new_len)
  return cache.replace(
      allocator=alloc,
      block_tables=cache.block_tables.at[idx].set(tables, mode="drop"),
      seq_lens=cache.seq_lens.at[idx].set(new_len, mode="drop"),
  ), status


def _narrow_k_scales(cache: PagedKVCache, sid: Array, rows: Array, new_len: Array):
  """int8 / int4 K after a rollback: the new last block's channel scales are recomputed from
  the tokens it keeps, and those tokens requantised, wherever a rolled-back token had widened
  a channel by more than the widening slack. Otherwise a rejected draft token with an outlier
  would keep the block coarse, and the tokens written after the rollback would round to its
  scale (a 1e4 outlier made every later token of the block read 0). O(block_size) per row.

  Only a block this sequence holds alone (a shared one is another sequence's data too), and
  only finite scales: a non-finite one (a NaN / Inf was written) already lost the block's
  older tokens in that channel, which must keep reading NaN.
  """
  cfg = cache.config
  bs, nb = cfg.block_size, cfg.num_blocks
  kept = new_len % bs  # [batch]: tokens of a partly filled new last block (0: none)
  blk = cache.block_tables[sid, jnp.clip(new_len // bs, 0, cfg.max_blocks_per_seq - 1)]
  alone = cfg.strategy is not CacheStrategy.PAGED or cache.allocator.ref_counts[blk] == 1
  on = rows & (kept > 0) & (blk != NULL_BLOCK) & alone  # [batch]
  gblk = jnp.where(on, blk, 0)
  old_s = cache.k_scale[:, :, gblk]  # [L, H, batch, head_dim]
  x = quant.dequantize_channel_k(cache.k_pool[:, :, gblk], old_s[..., None, :])
  live = jnp.arange(bs)[None, :] < kept[:, None]  # [batch, block_size]
  x = jnp.where(live[None, None, :, :, None], x, 0.0)  # the rolled-back slots are empty again
  amax = jnp.max(jnp.abs(x), axis=-2)  # [L, H, batch, head_dim]
  fit = quant.channel_scale(amax, cfg.kv_quant).astype(old_s.dtype)
  new_s = quant.narrowed_scale(old_s, fit, cfg.kv_quant)
  codes = quant.channel_codes(x, new_s[..., None, :], cfg.kv_quant)
  dst = jnp.where(on, blk, nb)  # dropped where off
  return cache.replace(k_pool=cache.k_pool.at[:, :, dst].set(codes, mode="drop"),
                       k_scale=cache.k_scale.at[:, :, dst].set(new_s, mode="drop"))


def _truncate_context(cache, seq_ids, num_tokens, **_):
  sid = jnp.clip(seq_ids, 0, cache.config.max_seqs - 1)
  return {Status.INVALID_COUNT: ("num_tokens={num_tokens} is not in [0, length={length}]",
                                 lambda row: {"num_tokens": num_tokens[row],
                                              "length": cache.seq_lens[sid[row]]}),
          Status.FREED_BLOCK: ("truncating {num_tokens} of {length} tokens ends in a block "
                               "free_outside_window freed, or leaves one (a hole) that the "
                               "window of the new last position may see (pass window= to "
                               "check that it does not)",
                               lambda row: {"num_tokens": num_tokens[row],
                                            "length": cache.seq_lens[sid[row]]})}


_truncate = _eager_or_traced(_truncate_impl, "truncate_sequences", context=_truncate_context,
                             static_argnames=("window",))


def truncate_sequences(cache: PagedKVCache, seq_ids, num_tokens, *, window: int | None = None,
                       donate: bool = True):
  """Rolls back the last ``num_tokens[b]`` tokens of each sequence and frees emptied blocks.

  For speculative decoding: append the draft tokens, verify, truncate the rejected ones. (Or keep
  the old cache: with an immutable cache a snapshot is free.)

  A sequence with holes (blocks :func:`free_outside_window` freed) can be rolled back only when
  no query at the new length could see a freed key: pass the attention ``window`` the blocks
  were freed for, and every hole must end at or before ``new_length - window`` (the rule the
  free uses). Without ``window`` such a rollback is refused (``FREED_BLOCK``): the window of
  the new last position may reach keys that are gone, and attention would silently skip them.

  Args:
    cache: the cache.
    seq_ids: ``int32[batch]`` active slots (negative: padding).
    num_tokens: ``int32[batch]`` or scalar, tokens to drop per row, in ``[0, length]``.
    window: static int >= 1, the sliding window of the attention that reads the cache (only
      checked for sequences with holes).
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, status)``; ``status`` ``int32[batch]``: ``INVALID_SLOT``, ``INACTIVE_SLOT``,
    ``DUPLICATE_SLOT``, ``INVALID_COUNT``, ``FREED_BLOCK`` (on any bad row nothing changes).
  """
  if window is not None and (isinstance(window, bool) or not isinstance(
      window, (int, np.integer)) or not 1 <= window <= INT32_MAX):
    raise CacheShapeError(f"truncate_sequences: window must be None or an int in [1, "
                          f"{INT32_MAX}], got {window!r}")
  seq_ids = as_ids(seq_ids)
  num_tokens = as_counts(num_tokens, seq_ids.shape[0], "num_tokens")
  return _truncate(cache, seq_ids, num_tokens, donate=donate,
                   window=None if window is None else int(window))


# ---------------------------------------------------------------------------------------------
# sliding window: free the blocks no future query can see


def _window_impl(cache: PagedKVCache, seq_ids: Array, *, window: int, sink_tokens: int):
  cfg = cache.config
  bs = cfg.block_size
  sid, pad, status = _row_checks(cache, seq_ids)
  rows = jnp.all(status == 0) & ~pad
  lens = cache.seq_lens[sid]
  j = jnp.arange(cfg.max_blocks_per_seq)
  tables = cache.block_tables[sid]
  # A query at a position >= len - 1 sees the keys > len - 1 - window: every key of block j
  # lies at or below that once (j + 1) * block_size <= len - window. Blocks holding a sink
  # token stay; so does every block whose entry is already null (freed before).
  gone = (rows[:, None] & (j[None, :] >= -(-sink_tokens // bs))
          & ((j[None, :] + 1) * bs <= (lens - window)[:, None]) & (tables != NULL_BLOCK))
  freed = jnp.sum(gone, axis=1, dtype=jnp.int32)

  def release(cache):
    idx = _drop_index(rows, sid, cfg.max_seqs)
    return cache.replace(
        allocator=alloc_lib.release_blocks(cache.allocator, tables, gone),
        block_tables=cache.block_tables.at[idx].set(jnp.where(gone, NULL_BLOCK, tables),
                                                    mode="drop"))

  # Called after every decode step, a block becomes freeable once in block_size steps: the
  # release (a sort of the rows' table entries) runs only in steps that free one.
  cache = jax.lax.cond(jnp.any(gone), release, lambda c: c, cache)
  return cache, freed, status


_free_window = _eager_or_traced(_window_impl, "free_outside_window",
                                static_argnames=("window", "sink_tokens"))


def free_outside_window(cache: PagedKVCache, seq_ids, *, window: int, sink_tokens: int = 0,
                        donate: bool = True):
  """Frees each sequence's blocks that no query at its latest position or later can see.

  For sliding-window attention (every layer attends to the last ``window`` positions, itself
  included) a long sequence then holds ``O(window / block_size)`` blocks instead of all of
  them. With ``sink_tokens > 0`` the blocks holding the first ``sink_tokens`` tokens are kept
  too (StreamingLLM's attention sinks): the token-eviction policy for full-attention models,
  an approximation whose effect on the output is measured in ``benchmarks/streaming.py``.

  A freed block's table entry becomes the null block (a *hole*; the sequence's length does not
  change, so new tokens keep their positions). Every attention implementation reads only the
  keys that are kept: keys in holes are masked like keys past the length (an attention call
  whose window is at most ``window`` never reaches them). :func:`~jax_paged_kv.lookup_kv`
  returns zeros there. Call it after the attention of the tokens just written (e.g. once per
  decode step); blocks shared with a fork or a cached prefix lose one reference each.

  Args:
    cache: a ``PAGED`` cache.
    seq_ids: ``int32[batch]`` (or scalar) active slots; negative ids are padding.
    window: static positive int, the attention window the kept blocks must cover.
    sink_tokens: static int >= 0, leading tokens whose blocks are kept.
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, freed, status)``: ``freed int32[batch]`` blocks released per row; ``status``
    ``int32[batch]`` (``INVALID_SLOT``, ``INACTIVE_SLOT``, ``DUPLICATE_SLOT``; on any bad row
    nothing changes).

  Raises:
    CacheShapeError: a ``CONTIGUOUS`` cache (a slot owns its slab), or a bad ``window`` /
      ``sink_tokens``.
    InvalidSlotError, InactiveSlotError, DuplicateSlotError: eager calls with bad ids.
  """
  if cache.config.strategy is not CacheStrategy.PAGED:
    raise CacheShapeError("free_outside_window needs a PAGED cache (a contiguous slot owns its "
                          "slab; nothing can be freed from it)")
  for name, value, low in (("window", window, 1), ("sink_tokens", sink_tokens, 0)):
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low
        or value > INT32_MAX):
      raise CacheShapeError(f"free_outside_window: {name} must be an int in [{low}, "
                            f"{INT32_MAX}], got {value!r}")
  scalar = np.ndim(seq_ids) == 0
  cache, freed, status = _free_window(cache, as_ids(seq_ids), window=int(window),
                                      sink_tokens=int(sink_tokens), donate=donate)
  return (cache, freed[0], status[0]) if scalar else (cache, freed, status)
