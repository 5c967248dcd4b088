"""Pure free-list and reference-count updates.

The allocator is a stack of free block ids plus a count plus per-block reference counts, all arrays
(see :class:`~jax_paged_kv.cache.state.AllocatorState`). Both operations are vectorised over the
whole request: popping blocks for a batch is one exclusive prefix sum over the per-row counts and
one gather from the top of the stack; releasing is one scatter-add of ``-1`` plus one compaction of
the blocks that reached zero. Work is proportional to the request, never to the pool (no argmax scan
over the pool per block, as MaxText's page manager did).

Every update takes a traced ``enable`` flag: when it is False the state comes back unchanged,
by redirecting every scatter to an out-of-range index that ``mode="drop"`` discards (a ``where``
over the pool-sized arrays would cost O(pool) per call).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from jax_paged_kv.cache.config import NULL_BLOCK
from jax_paged_kv.cache.state import AllocatorState


def pop_blocks(
    alloc: AllocatorState, counts: Array, max_per_row: int, enable: Array
) -> tuple[AllocatorState, Array, Array]:
  """Pops ``counts[b]`` blocks for every row ``b`` in one vectorised update.

  Args:
    alloc: the allocator state.
    counts: ``int32[batch]``, blocks wanted per row, each in ``[0, max_per_row]``.
    max_per_row: static upper bound of ``counts``.
    enable: ``bool[]``; the pop happens only if this is True *and* enough blocks are free.

  Returns:
    ``(alloc, blocks, enough)``: the new state; ``int32[batch, max_per_row]`` block ids, entry
    ``k < counts[b]`` valid (new blocks, reference count set to 1) and the rest ``NULL_BLOCK``;
    and ``bool[]``, whether the free list held enough blocks. If the pop did not happen,
    ``alloc`` is returned unchanged and ``blocks`` is all ``NULL_BLOCK``.
  """
  counts = counts.astype(jnp.int32)
  total = jnp.sum(counts)
  enough = total <= alloc.num_free
  do = enable & enough
  offsets = jnp.cumsum(counts) - counts  # exclusive prefix sum  # [batch]
  k = jnp.arange(max_per_row, dtype=jnp.int32)
  valid = (k[None, :] < counts[:, None]) & do  # [batch, max_per_row]
  depth = alloc.num_free - 1 - (offsets[:, None] + k[None, :])
  depth = jnp.clip(depth, 0, alloc.free_stack.shape[0] - 1)
  blocks = jnp.where(valid, alloc.free_stack[depth], NULL_BLOCK)
  oob = alloc.ref_counts.shape[0]
  ref_counts = alloc.ref_counts.at[jnp.where(valid, blocks, oob)].set(1, mode="drop")
  num_free = jnp.where(do, alloc.num_free - total, alloc.num_free)
  return AllocatorState(alloc.free_stack, num_free, ref_counts), blocks, enough


def retain_blocks(alloc: AllocatorState, blocks: Array, mask: Array) -> AllocatorState:
  """Adds one reference to every masked entry of ``blocks`` (duplicates add several).

  Args:
    alloc: the allocator state.
    blocks: ``int32[...]`` block ids.
    mask: ``bool[...]``, same shape; False entries (and the null block) are ignored.
  """
  blocks, mask = blocks.reshape(-1), mask.reshape(-1) & (blocks.reshape(-1) != NULL_BLOCK)
  oob = alloc.ref_counts.shape[0]
  ref_counts = alloc.ref_counts.at[jnp.where(mask, blocks, oob)].add(1, mode="drop")
  return AllocatorState(alloc.free_stack, alloc.num_free, ref_counts)


def release_blocks(
    alloc: AllocatorState, blocks: Array, mask: Array, *, push: bool = True
) -> AllocatorState:
  """Drops one reference per masked entry; blocks that reach zero go back on the free list.

  Args:
    alloc: the allocator state.
    blocks: ``int32[...]`` block ids; the same block may appear several times (it loses one
      reference per appearance and is pushed once).
    mask: ``bool[...]``, same shape; False entries (and the null block) are ignored.
    push: push blocks that reach zero onto the free stack (False for the contiguous strategy,
      whose slabs never return to a shared list).
  """
  blocks, mask = blocks.reshape(-1), mask.reshape(-1) & (blocks.reshape(-1) != NULL_BLOCK)
  n_blocks = alloc.ref_counts.shape[0]
  ref_counts = alloc.ref_counts.at[jnp.where(mask, blocks, n_blocks)].add(-1, mode="drop")
  if not push:
    return AllocatorState(alloc.free_stack, alloc.num_free, ref_counts)
  # One representative per distinct block (the first in sorted order), found by sorting the
  # request rather than by a pool-sized scratch array.
  n = blocks.shape[0]
  keys = jnp.where(mask, blocks, n_blocks)
  order = jnp.argsort(keys, stable=True)
  sorted_keys = keys[order]
  first_sorted = jnp.concatenate(
      [jnp.ones((1,), bool), sorted_keys[1:] != sorted_keys[:-1]]) if n else jnp.ones((0,), bool)
  first = jnp.zeros((n,), bool).at[order].set(first_sorted)
  zero = ref_counts[jnp.clip(blocks, 0, n_blocks - 1)] == 0
  to_push = mask & first & zero
  rank = jnp.cumsum(to_push) - to_push
  cap = alloc.free_stack.shape[0]
  dest = jnp.where(to_push, alloc.num_free + rank, cap)
  free_stack = alloc.free_stack.at[dest].set(blocks, mode="drop")
  num_free = alloc.num_free + jnp.sum(to_push, dtype=jnp.int32)
  return AllocatorState(free_stack, num_free, ref_counts)
