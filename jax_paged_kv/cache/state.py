"""The cache state: one pytree of arrays (plus the static config) and ``init_cache``."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import Array, lax

from jax_paged_kv.cache import quant
from jax_paged_kv.cache.config import CacheConfig, CacheStrategy
from jax_paged_kv.cache.errors import CacheShapeError


@dataclasses.dataclass(frozen=True)
class AllocatorState:
  """Free list and reference counts, all on device.

  Attributes:
    free_stack: ``int32[num_blocks - 1]``; ``free_stack[:num_free]`` are the free block ids, the
      top of the stack is ``free_stack[num_free - 1]``. Entries past ``num_free`` are stale.
    num_free: ``int32[]``, number of free blocks.
    ref_counts: ``int32[num_blocks]``, how many block-table entries reference each block
      (``ref_counts[0]``, the null block, is always 0). A block is free iff its count is 0.
  """

  free_stack: Array  # [num_blocks - 1] int32
  num_free: Array  # [] int32
  ref_counts: Array  # [num_blocks] int32


@dataclasses.dataclass(frozen=True)
class Telemetry:
  """Counters that are *not* part of the cache contents.

  A rejected update returns the input cache bitwise unchanged except for these counters, which
  exist precisely to count rejections.

  Attributes:
    failed_allocations: ``int32[]``, number of updates rejected because the pool ran dry.
  """

  failed_allocations: Array  # [] int32


@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """A paged KV cache: K/V block pools, block tables, sequence lengths and allocator state.

  Every field except ``config`` is an array, so the cache goes through ``jit``, ``vmap``,
  ``pmap``, ``shard_map``, ``jax.tree_util`` and checkpointing as it is. ``config`` is static
  (pytree metadata): two caches with different configs are different pytree structures.

  Attributes:
    k_pool: ``[layers, kv_heads, num_blocks, block_size, head_dim]`` keys, in
      ``config.storage_dtype`` (``config.dtype`` unless ``config.kv_quant`` is set, or uint16
      bit patterns with ``config.pool_bits``: read them with :func:`pool_values`).
    v_pool: same shape and dtype, values.
    k_scale: the key scales of a quantised cache, in the pool's block layout (``None``, an
      empty subtree, otherwise): ``float32[layers, kv_heads, num_blocks, block_size]`` (per
      token) for fp8, ``bfloat16[layers, kv_heads, num_blocks, head_dim]`` (per block and
      channel) for int8 and int4 (whose pools are ``uint8[..., head_dim / 2]``).
    v_scale: the value scales: ``float32[layers, kv_heads, num_blocks, block_size]`` for int8
      / fp8, ``bfloat16[layers, kv_heads, num_blocks, block_size, head_dim / 32]`` for int4.
    block_tables: ``int32[max_seqs, table_width]``; entry ``j`` of slot ``s`` is the physical block
      holding tokens ``[j * block_size, (j + 1) * block_size)``. A sequence of length ``n`` holds
      exactly ``ceil(n / block_size)`` blocks, less the holes ``free_outside_window`` left (null
      entries before its last block); every other entry is the null block 0.
    seq_lens: ``int32[max_seqs]``, tokens stored per slot (0 for inactive slots).
    active: ``bool[max_seqs]``, which slots hold a live sequence.
    allocator: the :class:`AllocatorState`.
    telemetry: the :class:`Telemetry` counters.
    config: the static :class:`CacheConfig`.
  """

  k_pool: Array  # [layers, kv_heads, num_blocks, block_size, head_dim]
  v_pool: Array  # [layers, kv_heads, num_blocks, block_size, head_dim]
  block_tables: Array  # [max_seqs, table_width] int32
  seq_lens: Array  # [max_seqs] int32
  active: Array  # [max_seqs] bool
  allocator: AllocatorState
  telemetry: Telemetry
  config: CacheConfig
  k_scale: Array | None = None  # [layers, kv_heads, num_blocks, block_size | head_dim]
  v_scale: Array | None = None  # [layers, kv_heads, num_blocks, block_size(, groups)]

  def replace(self, **kwargs) -> PagedKVCache:
    """A copy with some fields replaced (no arrays are copied)."""
    return dataclasses.replace(self, **kwargs)


jax.tree_util.register_dataclass(
    AllocatorState, data_fields=["free_stack", "num_free", "ref_counts"], meta_fields=[])
jax.tree_util.register_dataclass(Telemetry, data_fields=["failed_allocations"], meta_fields=[])
jax.tree_util.register_dataclass(
    PagedKVCache,
    data_fields=["k_pool", "v_pool", "block_tables", "seq_lens", "active", "allocator",
                 "telemetry", "k_scale", "v_scale"],
    meta_fields=["config"],
)


# The leaves laid out like the pools, [layers, kv_heads, num_blocks, ...] (a quantised cache's
# scales too): what block copies, swaps and kv-head sharding act on.
POOL_LEAVES = ("k_pool", "v_pool", "k_scale", "v_scale")


def pool_values(pool: Array, dtype) -> Array:
  """``pool`` as values of ``dtype``: a ``pool_bits`` pool (uint16 bit patterns of a 16-bit
  float ``dtype``) bitcast back, any other pool as it is. A bitcast, not a copy."""
  dtype = jnp.dtype(dtype)
  if pool.dtype == jnp.uint16 and dtype != pool.dtype and dtype.itemsize == 2:
    return lax.bitcast_convert_type(pool, dtype)
  return pool


def stored_values(x: Array, pool: Array, dtype) -> Array:
  """``x`` ready to store into ``pool``: cast to ``dtype``, then to bit patterns for a
  ``pool_bits`` pool."""
  x = x.astype(dtype)
  if pool.dtype == jnp.uint16 and x.dtype != pool.dtype:
    return lax.bitcast_convert_type(x, jnp.uint16)
  return x


def init_cache(config: CacheConfig, *, pool_fill: float = 0.0) -> PagedKVCache:
  """An empty cache: all slots inactive, every block but the null block on the free list.

  Args:
    config: the static configuration.
    pool_fill: value the pools start with (tests use NaN to prove unused memory is never read).
      A quantised cache's pools start at 0 and its scales at ``pool_fill`` (so NaN poisons
      every unused slot there too).

  Returns:
    A :class:`PagedKVCache`. Free blocks are popped in increasing id order (1, 2, 3, ...).
  """
  if not isinstance(config, CacheConfig):
    raise TypeError(f"init_cache expects a CacheConfig, got {type(config).__name__}")
  nb = config.num_blocks
  # A contiguous cache has no shared free list: every slot owns its slab (see CacheStrategy).
  num_free = nb - 1 if config.strategy is CacheStrategy.PAGED else 0
  scales = {}
  if config.kv_quant is None:
    pool_value = pool_fill
  else:
    pool_value = 0
    k_dtype, v_dtype = quant.scale_dtypes(config.kv_quant)
    scales = {"k_scale": jnp.full(config.k_scale_shape, pool_fill, dtype=k_dtype),
              "v_scale": jnp.full(config.v_scale_shape, pool_fill, dtype=v_dtype)}
  if config.pool_bits:  # the fill value's bit pattern
    pool = lax.bitcast_convert_type(
        jnp.full(config.stored_pool_shape, pool_value, dtype=config.dtype), jnp.uint16)
  else:
    pool = jnp.full(config.stored_pool_shape, pool_value, dtype=config.storage_dtype)
  return PagedKVCache(
      k_pool=pool,
      v_pool=pool.copy(),
      block_tables=jnp.zeros((config.max_seqs, config.max_blocks_per_seq), jnp.int32),
      seq_lens=jnp.zeros((config.max_seqs,), jnp.int32),
      active=jnp.zeros((config.max_seqs,), jnp.bool_),
      allocator=AllocatorState(
          # Top of the stack is the last entry: ids descend so block 1 is popped first.
          free_stack=jnp.arange(nb - 1, 0, -1, dtype=jnp.int32),
          num_free=jnp.asarray(num_free, jnp.int32),
          ref_counts=jnp.zeros((nb,), jnp.int32),
      ),
      telemetry=Telemetry(failed_allocations=jnp.zeros((), jnp.int32)),
      config=config,
      **scales,
  )


@functools.lru_cache(maxsize=64)
def _expected_leaves(config: CacheConfig):
  """``(names, shapes, dtypes, per_head)`` of the leaves ``init_cache(config)`` has."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      jax.eval_shape(functools.partial(init_cache, config)))
  names = tuple(jax.tree_util.keystr(path) for path, _ in flat)
  per_head = tuple(any(p in n for p in POOL_LEAVES) for n in names)
  return names, tuple(tuple(x.shape) for _, x in flat), tuple(x.dtype for _, x in flat), per_head


def check_layout(cache: PagedKVCache, *, op: str) -> None:
  """Raises :class:`~jax_paged_kv.CacheShapeError` unless every array of ``cache`` has the
  shape and dtype its ``config`` gives it (trace time; static shapes only).

  A cache rebuilt from saved leaves under another config (``block_size`` 2 for leaves written
  at 4, fewer ``max_seqs``) would otherwise read garbage or pass the invariants. Axis 1 of the
  pools and scales may be any divisor of ``num_kv_heads``: a shard's heads under
  ``shard_map``.
  """
  names, shapes, dtypes, per_head = _expected_leaves(cache.config)
  leaves = jax.tree_util.tree_leaves(cache)
  heads = cache.config.num_kv_heads
  if len(leaves) != len(names):
    raise CacheShapeError(f"{op}: the cache has {len(leaves)} leaves, its config gives "
                          f"{len(names)} (was the cache rebuilt under another config?)")
  for name, x, want, dtype, ph in zip(names, leaves, shapes, dtypes, per_head, strict=True):
    shape = tuple(jnp.shape(x))
    if ph and len(shape) == len(want) and shape[1] >= 1 and heads % shape[1] == 0:
      shape = shape[:1] + want[1:2] + shape[2:]  # a shard's heads
    got = jnp.result_type(x)
    if ph and {got, dtype} == {jnp.dtype(jnp.uint16), jnp.dtype(cache.config.dtype)}:
      got = dtype  # a 16-bit pool as its bit patterns or as its values: both read right
    if "scale" in name and jnp.issubdtype(got, jnp.floating):
      got = dtype  # scales are read as float32 whatever their float dtype
    if shape != want or got != dtype:
      raise CacheShapeError(f"{op}: cache{name} is {jnp.result_type(x)}{list(jnp.shape(x))}, "
                            f"but its config gives {dtype}{list(want)} (was the cache rebuilt "
                            "under another config?)")
