"""Statistics of a cache and a jittable checker of every allocator and table invariant."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import Array

from jax_paged_kv.cache.config import NULL_BLOCK, CacheStrategy
from jax_paged_kv.cache.state import PagedKVCache, check_layout


@dataclasses.dataclass(frozen=True)
class KVCacheStats:
  """Occupancy of a cache (all ``int32[]`` / ``float32[]`` arrays, so it is a pytree).

  Attributes:
    total_blocks: blocks that can hold data (the null block excluded).
    free_blocks: blocks no sequence holds.
    used_blocks: blocks at least one sequence holds.
    shared_blocks: blocks held by more than one block-table entry (forks, prefix sharing).
    active_sequences: live sequence slots.
    tokens_stored: distinct token slots holding live data (a token shared by a fork counts once).
    logical_tokens: sum of sequence lengths (shared tokens count once per sequence).
    allocated_slots: token slots in the blocks held: ``used_blocks * block_size``.
    utilization: ``tokens_stored / allocated_slots`` (1.0 when nothing is allocated).
    failed_allocations: updates rejected because the pool ran dry, since ``init_cache``.
    bytes_per_token: stored K and V bytes of one token over all layers and heads, quantisation
      scales included (``config.bytes_per_token``).
  """

  total_blocks: Array
  free_blocks: Array
  used_blocks: Array
  shared_blocks: Array
  active_sequences: Array
  tokens_stored: Array
  logical_tokens: Array
  allocated_slots: Array
  utilization: Array
  failed_allocations: Array
  bytes_per_token: Array

  def as_dict(self) -> dict[str, float]:
    """Host-side ``{name: python number}``."""
    return {f.name: getattr(self, f.name).item() for f in dataclasses.fields(self)}


jax.tree_util.register_dataclass(
    KVCacheStats, data_fields=[f.name for f in dataclasses.fields(KVCacheStats)], meta_fields=[])


def _within(cache: PagedKVCache):
  """``bool[max_seqs, table_width]``: the entries below each active sequence's length."""
  cfg = cache.config
  bs = cfg.block_size
  j = jnp.arange(cfg.max_blocks_per_seq)
  lens = jnp.where(cache.active, cache.seq_lens, 0)
  return cache.active[:, None] & (j[None, :] < ((lens + bs - 1) // bs)[:, None])


def _held(cache: PagedKVCache):
  """``(held bool[max_seqs, table_width], fill int32[max_seqs, table_width])`` per table entry.

  Held: below the sequence's length and a real block (not a hole that
  :func:`~jax_paged_kv.free_outside_window` left); fill: the tokens it stores.
  """
  cfg = cache.config
  bs = cfg.block_size
  j = jnp.arange(cfg.max_blocks_per_seq)
  lens = jnp.where(cache.active, cache.seq_lens, 0)
  held = _within(cache) & (cache.block_tables != NULL_BLOCK)
  fill = jnp.where(held, jnp.clip(lens[:, None] - j[None, :] * bs, 0, bs), 0)
  return held, fill


@jax.jit
def cache_stats(cache: PagedKVCache) -> KVCacheStats:
  """Occupancy statistics; jittable, O(pool) (not for the hot path of every step).

  Args:
    cache: the cache.

  Returns:
    A :class:`KVCacheStats`.
  """
  check_layout(cache, op="cache_stats")
  cfg = cache.config
  nb = cfg.num_blocks
  held, fill = _held(cache)
  refs = cache.allocator.ref_counts
  used = jnp.sum(refs[1:] > 0, dtype=jnp.int32)
  shared = jnp.sum(refs[1:] > 1, dtype=jnp.int32)
  tables = jnp.where(held, cache.block_tables, nb)
  block_fill = jnp.zeros((nb,), jnp.int32).at[tables].max(fill, mode="drop")
  tokens = jnp.sum(block_fill, dtype=jnp.int32)
  logical = jnp.sum(jnp.where(cache.active, cache.seq_lens, 0), dtype=jnp.int32)
  if cfg.strategy is CacheStrategy.CONTIGUOUS:
    # A contiguous slot owns its whole slab from allocation to free.
    used = jnp.sum(cache.active, dtype=jnp.int32) * cfg.max_blocks_per_seq
  allocated = used * cfg.block_size
  util = jnp.where(allocated > 0, tokens / jnp.maximum(allocated, 1), 1.0).astype(jnp.float32)
  total = jnp.asarray(cfg.usable_blocks, jnp.int32)
  return KVCacheStats(
      total_blocks=total,
      free_blocks=total - used,
      used_blocks=used,
      shared_blocks=shared,
      active_sequences=jnp.sum(cache.active, dtype=jnp.int32),
      tokens_stored=tokens,
      logical_tokens=logical,
      allocated_slots=allocated,
      utilization=util,
      failed_allocations=cache.telemetry.failed_allocations,
      bytes_per_token=jnp.asarray(cfg.bytes_per_token, jnp.float32),
  )


@dataclasses.dataclass(frozen=True)
class InvariantReport:
  """Named ``bool[]`` results of :func:`check_invariants`; ``ok`` is their conjunction."""

  num_free_in_range: Array
  free_stack_valid: Array
  free_stack_distinct: Array
  free_blocks_unreferenced: Array
  ref_counts_match_tables: Array
  free_list_complete: Array
  null_block_unreferenced: Array
  lengths_in_range: Array
  inactive_slots_empty: Array
  tables_match_lengths: Array
  contiguous_layout: Array
  blocks_at_one_position: Array

  @property
  def ok(self) -> Array:
    return jnp.all(jnp.stack([getattr(self, f.name) for f in dataclasses.fields(self)]))

  def failures(self) -> list[str]:
    """Host-side: names of the invariants that do not hold."""
    return [f.name for f in dataclasses.fields(self) if not bool(getattr(self, f.name))]


jax.tree_util.register_dataclass(
    InvariantReport, data_fields=[f.name for f in dataclasses.fields(InvariantReport)],
    meta_fields=[])


@jax.jit
def check_invariants(cache: PagedKVCache) -> InvariantReport:
  """Checks every allocator and block-table invariant; jittable, O(pool + tables).

  * ``0 <= num_free <= num_blocks - 1``; the free stack's live part holds distinct ids in
    ``[1, num_blocks)`` with reference count 0, and every unreferenced block is on it (paged).
  * Reference counts equal the number of live block-table entries naming each block (so no block
    is owned twice unless its count says so, and no count is negative); the null block has none.
  * Active slots have ``0 <= len <= max_seq_len``; their first ``ceil(len / block_size)``
    entries name real blocks, except holes (null entries that
    :func:`~jax_paged_kv.free_outside_window` left, never the last block, paged only), and the
    rest are null; inactive slots have length 0 and null tables.
  * ``CONTIGUOUS``: held entries are the slot's own slab.
  * A block appears at most once in a table, and every table holding it holds it at the same
    position (blocks are shared only by forks, which keep positions): a block at two positions
    would let a sequence read another's tokens as its own.
  """
  check_layout(cache, op="check_invariants")
  cfg = cache.config
  nb = cfg.num_blocks
  a = cache.allocator
  held, _ = _held(cache)
  paged = cfg.strategy is CacheStrategy.PAGED

  num_free_ok = (a.num_free >= 0) & (a.num_free <= nb - 1)
  i = jnp.arange(nb - 1)
  live = i < a.num_free
  stack = jnp.where(live, a.free_stack, 0)
  stack_valid = jnp.all(~live | ((stack >= 1) & (stack < nb)))
  hits = jnp.zeros((nb,), jnp.int32).at[jnp.where(live, stack, nb)].add(1, mode="drop")
  stack_distinct = jnp.all(hits <= 1)
  refs_on_stack = jnp.where(live, a.ref_counts[jnp.clip(stack, 0, nb - 1)], 0)
  free_unref = jnp.all(refs_on_stack == 0)

  counts = jnp.zeros((nb,), jnp.int32).at[jnp.where(held, cache.block_tables, nb)].add(
      1, mode="drop")
  refs_match = jnp.all(counts[1:] == a.ref_counts[1:]) & jnp.all(a.ref_counts >= 0)
  null_ok = (a.ref_counts[NULL_BLOCK] == 0) & (counts[NULL_BLOCK] == 0)
  if paged:
    complete = jnp.all((a.ref_counts[1:] == 0) == (hits[1:] == 1))
  else:
    complete = jnp.asarray(True)

  lens = cache.seq_lens
  lens_ok = jnp.all((lens >= 0) & (lens <= cfg.max_seq_len))
  inactive_empty = jnp.all(cache.active | ((lens == 0) & jnp.all(cache.block_tables == 0, 1)))
  within = _within(cache)
  last = within & ~jnp.pad(within[:, 1:], ((0, 0), (0, 1)))  # each sequence's last block
  real = (cache.block_tables >= 1) & (cache.block_tables < nb)
  hole = (cache.block_tables == NULL_BLOCK) & ~last & paged
  tables_ok = jnp.all(jnp.where(within, real | hole, cache.block_tables == NULL_BLOCK))
  if paged:
    layout = jnp.asarray(True)
  else:
    s = jnp.arange(cfg.max_seqs)[:, None]
    j = jnp.arange(cfg.max_blocks_per_seq)[None, :]
    layout = jnp.all(~held | (cache.block_tables == cfg.contiguous_block(s, j)))
  col = jnp.broadcast_to(jnp.arange(cfg.max_blocks_per_seq, dtype=jnp.int32),
                         cache.block_tables.shape)
  where = jnp.where(held, cache.block_tables, nb)
  first = jnp.full((nb,), cfg.max_blocks_per_seq, jnp.int32).at[where].min(col, mode="drop")
  final = jnp.full((nb,), -1, jnp.int32).at[where].max(col, mode="drop")
  one_column = jnp.all((first == final) | (final < 0))
  ordered = jnp.sort(jnp.where(held, cache.block_tables, -1 - col), axis=1)  # unheld: distinct
  once_per_table = jnp.all(ordered[:, 1:] != ordered[:, :-1])
  return InvariantReport(
      blocks_at_one_position=one_column & once_per_table,
      num_free_in_range=num_free_ok,
      free_stack_valid=stack_valid,
      free_stack_distinct=stack_distinct,
      free_blocks_unreferenced=free_unref,
      ref_counts_match_tables=refs_match,
      free_list_complete=complete,
      null_block_unreferenced=null_ok,
      lengths_in_range=lens_ok,
      inactive_slots_empty=inactive_empty,
      tables_match_lengths=tables_ok,
      contiguous_layout=layout,
  )
