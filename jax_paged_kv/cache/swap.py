"""Swapping a sequence's blocks out to host memory and back in (swap preemption).

:func:`swap_out` copies every block a sequence holds (K and V pools, and a quantised cache's
``k_scale`` / ``v_scale`` blocks) into host memory, then frees the sequence like
:func:`~jax_paged_kv.cache.ops.free_sequences` (shared blocks only lose a reference).
:func:`swap_in` pops fresh blocks into an inactive slot and copies the data back, bitwise: the
sequence reads exactly what it read before, from new block ids. Blocks the sequence shared
(forks, prefix caching) come back private: a swapped-in sequence shares nothing.

Host memory is a JAX memory kind (``pinned_host``, so the copies are asynchronous DMA on GPU and
TPU) where the backend has one; elsewhere a NumPy copy. On CPU the device memory is host memory
already, so a swap there is a memcpy either way.

The copies move ``width`` blocks, the sequence's block count rounded up to a power of two (at
most the table width), so one compiled gather and one compiled scatter serve every length in a
bucket; entries past the sequence's blocks are never written back.

A sequence with *holes* (blocks :func:`~jax_paged_kv.free_outside_window` freed) swaps only the
blocks it still holds, with their table positions: it comes back with the same holes, so a
window-evicting sequence moves O(window) blocks each way, however long it is.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jax_paged_kv.cache import allocator as alloc_lib
from jax_paged_kv.cache.config import NULL_BLOCK, CacheStrategy
from jax_paged_kv.cache.errors import (
  CacheShapeError,
  InvalidSlotError,
  Status,
  is_tracing,
  raise_for_status,
)
from jax_paged_kv.cache.inputs import as_ids
from jax_paged_kv.cache.ops import (
  _ceil_div,
  _drop_index,
  _eager_or_traced,
  _row_checks,
  free_sequences,
)
from jax_paged_kv.cache.state import POOL_LEAVES, PagedKVCache, Telemetry

_LEAVES = POOL_LEAVES


@dataclasses.dataclass(frozen=True)
class SwappedSequence:
  """A sequence's blocks in host memory (what :func:`swap_out` returns).

  Attributes:
    blocks: the data of each pool leaf that the cache has (``k_pool``, ``v_pool`` and, for a
      quantised cache, ``k_scale``, ``v_scale``), each in its pool's layout with ``width`` in
      place of ``num_blocks``: e.g. ``k_pool`` ``[layers, kv_heads, width, block_size,
      head_dim]``. Entries ``[:, :, :num_blocks]`` are the sequence's blocks in table order.
    seq_len: tokens the sequence held.
    num_blocks: blocks it held: ``ceil(seq_len / block_size)`` less its holes.
    memory_kind: the JAX memory kind the data lives in (``"pinned_host"``), or None for NumPy
      arrays.
    positions: ``int32[num_blocks]``, the table position of each swapped block, or None when
      the sequence had no holes (block ``j`` at position ``j``).
    values: what the stored bits mean: ``(dtype, kv_quant)`` of the cache swapped out of
      (a bfloat16 and a float16 ``pool_bits`` pool both store ``uint16``); None: unchecked.
  """

  blocks: dict[str, Array | np.ndarray]
  seq_len: int
  num_blocks: int
  memory_kind: str | None
  positions: np.ndarray | None = None
  values: tuple[str, str | None] | None = None

  @property
  def width(self) -> int:
    return int(self.blocks["k_pool"].shape[2])

  @property
  def nbytes(self) -> int:
    """Bytes of the sequence's own blocks (all leaves; bucket padding excluded)."""
    return sum(x.nbytes // self.width * self.num_blocks for x in self.blocks.values())


def _leaves(cache: PagedKVCache) -> dict[str, Array]:
  return {n: getattr(cache, n) for n in _LEAVES if getattr(cache, n) is not None}


def host_memory_kind(cache: PagedKVCache) -> str | None:
  """``"pinned_host"`` if the devices holding the cache's pools have it, else None."""
  try:
    devices = cache.k_pool.sharding.device_set
  except AttributeError:  # a tracer, or not a jax.Array
    return None
  kinds = [{m.kind for m in d.addressable_memories()} for d in devices]
  return "pinned_host" if all("pinned_host" in k for k in kinds) else None


def swap_width(config, num_blocks: int) -> int:
  """The bucketed block count a swap of ``num_blocks`` blocks moves (a power of two)."""
  return min(1 << max(0, math.ceil(math.log2(max(1, num_blocks)))), config.max_blocks_per_seq)


@jax.jit
def _gather(leaves: dict[str, Array], blocks: Array) -> dict[str, Array]:
  """Blocks ``blocks int32[width]`` of every leaf (all layers and heads)."""
  return {n: x[:, :, blocks] for n, x in leaves.items()}


@jax.jit
def _status(cache: PagedKVCache, seq_ids: Array) -> Array:
  return _row_checks(cache, seq_ids)[2]


def _check_paged(cache: PagedKVCache, op: str) -> None:
  if not isinstance(cache, PagedKVCache):
    raise TypeError(f"{op} expects a PagedKVCache, got {type(cache).__name__}")
  if cache.config.strategy is not CacheStrategy.PAGED:
    raise CacheShapeError(f"{op} needs a PAGED cache (a contiguous slot owns its slab)")


def swap_out(cache: PagedKVCache, seq_id, *, memory_kind: str | None = "auto",
             donate: bool = True) -> tuple[PagedKVCache, SwappedSequence]:
  """Copies sequence ``seq_id``'s blocks to host memory, then frees the sequence.

  Eager only (it moves data off the device).

  Args:
    cache: a ``PAGED`` cache.
    seq_id: the active slot to swap out (an int).
    memory_kind: ``"auto"`` (``pinned_host`` where the backend has it, else NumPy), a JAX
      memory kind, or None (NumPy).
    donate: donate the input cache to the free.

  Returns:
    ``(cache, swapped)``: the cache with the slot freed, and the :class:`SwappedSequence`.

  Raises:
    InvalidSlotError, InactiveSlotError: ``seq_id`` names no active slot (nothing changes).
    CacheShapeError: a ``CONTIGUOUS`` cache, or a call inside ``jit``.
  """
  _check_paged(cache, "swap_out")
  ids = as_ids(seq_id).reshape(1)
  if is_tracing(cache, ids):
    raise CacheShapeError("swap_out moves data to host memory: call it outside jit")
  sid = int(ids[0])
  if sid < 0:  # padding means nothing to a one-sequence op (and -1 would index the last slot)
    raise InvalidSlotError(f"swap_out: seq_id={sid} is not a slot (0 <= seq_id < "
                           f"{cache.config.max_seqs})")
  raise_for_status(_status(cache, ids), ids, op="swap_out")
  cfg = cache.config
  lens, tables = jax.device_get((cache.seq_lens, cache.block_tables))  # small: one copy
  seq_len, table = int(lens[sid]), tables[sid]
  held = np.flatnonzero(table[:-(-seq_len // cfg.block_size)] != NULL_BLOCK).astype(np.int32)
  n = len(held)  # blocks held: holes (free_outside_window) are not swapped
  width = swap_width(cfg, n)
  blocks = np.full(width, NULL_BLOCK, np.int32)
  blocks[:n] = table[held]
  positions = None if n == 0 or held[-1] == n - 1 else held
  data = _gather(_leaves(cache), jnp.asarray(blocks))
  if memory_kind == "auto":
    memory_kind = host_memory_kind(cache)
  if memory_kind is None:
    host = {k: np.asarray(x) for k, x in data.items()}
  else:
    host = {k: jax.device_put(x, x.sharding.with_memory_kind(memory_kind))
            for k, x in data.items()}
  cache, _ = free_sequences(cache, ids, donate=donate)
  return cache, SwappedSequence(host, seq_len, n, memory_kind, positions, _values(cfg))


def _values(cfg) -> tuple[str, str | None]:
  return str(jnp.dtype(cfg.dtype)), cfg.kv_quant


def _swap_in_impl(cache: PagedKVCache, seq_ids: Array, seq_lens: Array, data: dict[str, Array],
                  positions: Array):
  cfg = cache.config
  bs = cfg.block_size
  width = data["k_pool"].shape[2]
  sid, pad, status = _row_checks(cache, seq_ids, want_active=False)  # [1]
  # One sequence, so no padding: a negative id would drop the data and report success.
  status = jnp.where(pad, Status.INVALID_SLOT, status)
  n = jnp.where(pad, 0, seq_lens)
  # positions[i]: table position of data block i; -1 past the swapped blocks.
  valid = positions >= 0  # [width]
  need = jnp.where(pad, 0, jnp.sum(valid, dtype=jnp.int32))  # [1]
  nb = _ceil_div(n, bs)
  last = jnp.max(jnp.where(valid, positions, -1))
  # The blocks fill positions below nb, in increasing order, the last block included (a hole
  # is never a sequence's last block).
  ordered = jnp.all(jnp.where(valid[1:], positions[1:] > positions[:-1], True)) & jnp.all(
      valid[1:] <= valid[:-1])
  bad = (n < 0) | ~ordered | (last != nb - 1) | (need > width)
  status = jnp.where((status == 0) & bad, Status.INVALID_COUNT, status)
  status = jnp.where((status == 0) & (n > cfg.max_seq_len), Status.SEQUENCE_TOO_LONG, status)
  ok_rows = jnp.all(status == 0)
  need = jnp.where(ok_rows & ~pad, need, 0)
  alloc, new_blocks, enough = alloc_lib.pop_blocks(cache.allocator, need, width, ok_rows)
  status = jnp.where(ok_rows & ~enough & (need > 0), Status.POOL_EXHAUSTED, status)
  rows = ok_rows & enough & ~pad  # [1]
  k = jnp.arange(width, dtype=jnp.int32)
  write = rows[:, None] & (k[None, :] < need[:, None])  # [1, width]
  dst = _drop_index(write[0], new_blocks[0], cfg.num_blocks)  # [width]
  leaves = {name: getattr(cache, name).at[:, :, dst].set(x, mode="drop")
            for name, x in data.items()}
  idx = _drop_index(rows, sid, cfg.max_seqs)
  pos = jnp.where(write[0], positions, cfg.max_blocks_per_seq)  # holes stay NULL_BLOCK
  failed = cache.telemetry.failed_allocations + (ok_rows & ~enough).astype(jnp.int32)
  return cache.replace(
      **leaves,
      allocator=alloc,
      block_tables=cache.block_tables.at[idx[:, None], pos[None, :]].set(new_blocks,
                                                                         mode="drop"),
      seq_lens=cache.seq_lens.at[idx].set(n, mode="drop"),
      active=cache.active.at[idx].set(True, mode="drop"),
      telemetry=Telemetry(failed),
  ), status


def _swap_in_context(cache, seq_ids, seq_lens, data, positions):
  width = data["k_pool"].shape[2]
  return {
      Status.INVALID_COUNT: (
          "seq_len={seq_len} is negative or does not match the {width} blocks swapped and "
          "their table positions",
          lambda row: {"seq_len": seq_lens[row], "width": width}),
      Status.SEQUENCE_TOO_LONG: ("seq_len={seq_len} > max_seq_len={max_seq_len}",
                                 lambda row: {"seq_len": seq_lens[row],
                                              "max_seq_len": cache.config.max_seq_len}),
      Status.POOL_EXHAUSTED: ("it needs {needed} blocks, {free} are free",
                              lambda row: {"needed": int(np.sum(np.asarray(positions) >= 0)),
                                           "free": cache.allocator.num_free}),
  }


_swap_in = _eager_or_traced(_swap_in_impl, "swap_in", context=_swap_in_context)


def swap_in(cache: PagedKVCache, seq_id, swapped: SwappedSequence, *, donate: bool = True):
  """Copies a swapped-out sequence back into inactive slot ``seq_id`` (fresh blocks).

  Inside ``jit`` the data must already be device arrays; eagerly host data is moved to the
  pools' memory first.

  Args:
    cache: a ``PAGED`` cache.
    seq_id: an inactive slot (any: it need not be the one swapped out).
    swapped: what :func:`swap_out` returned.
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, status)``; ``status`` is ``int32[1]``: ``INVALID_SLOT``, ``SLOT_IN_USE``,
    ``POOL_EXHAUSTED`` (fewer than ``swapped.num_blocks`` free blocks), ``INVALID_COUNT`` or
    ``SEQUENCE_TOO_LONG`` (a ``seq_len`` the data cannot hold). On failure nothing changes.

  Raises:
    CacheShapeError: a ``CONTIGUOUS`` cache, or data whose layout does not match the pools.
    InvalidSlotError, SlotInUseError, PoolExhaustedError, InvalidCountError,
    SequenceTooLongError: eager calls with bad input.
  """
  _check_paged(cache, "swap_in")
  want = _leaves(cache)
  if set(swapped.blocks) != set(want):
    raise CacheShapeError(f"swap_in: swapped leaves {sorted(swapped.blocks)} do not match the "
                          f"cache's {sorted(want)}")
  if swapped.values is not None and swapped.values != _values(cache.config):
    raise CacheShapeError(f"swap_in: the data holds {swapped.values} (dtype, kv_quant) values, "
                          f"the cache {_values(cache.config)}: its bits would be misread")
  width = swapped.width
  if width > cache.config.max_blocks_per_seq:
    raise CacheShapeError(f"swap_in: {width=} > table width {cache.config.max_blocks_per_seq}")
  for name, pool in want.items():
    x = swapped.blocks[name]
    shape = pool.shape[:2] + (width,) + pool.shape[3:]
    if tuple(x.shape) != shape or x.dtype != pool.dtype:
      raise CacheShapeError(f"swap_in: {name} is {x.dtype}{list(x.shape)}, expected "
                            f"{pool.dtype}{list(shape)}")
  ids = as_ids(seq_id).reshape(1)
  data = dict(swapped.blocks)
  if not is_tracing(cache, ids) and swapped.memory_kind is not None:
    kind = cache.k_pool.sharding.memory_kind
    data = {k: jax.device_put(x, x.sharding.with_memory_kind(kind)) for k, x in data.items()}
  seq_lens = jnp.asarray([swapped.seq_len], jnp.int32)
  positions = np.full(width, -1, np.int32)
  n = swapped.num_blocks
  positions[:n] = np.arange(n) if swapped.positions is None else swapped.positions
  return _swap_in(cache, ids, seq_lens, data, jnp.asarray(positions), donate=donate)
