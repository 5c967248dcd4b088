"""The cache layer: configuration, the state pytree, the on-device allocator, the ops, stats and
errors. It imports nothing from the layers above (attention, models, serving).

Modules: ``config`` (``CacheConfig`` and the pool layout, defined once), ``state`` (the
``PagedKVCache`` pytree and ``init_cache``), ``allocator`` (free stack and reference counts),
``ops`` (allocate / reserve / write / append / lookup / fork / reorder / truncate / free), ``swap``
(``swap_out`` / ``swap_in``: a sequence's blocks to host memory and back), ``stats``
(``cache_stats``, ``check_invariants``), ``errors`` (status codes, named exceptions, checking
mode), ``inputs`` (how caller-supplied ids, counts and layers become ``int32``).
"""

from jax_paged_kv.cache.config import NULL_BLOCK, CacheConfig, CacheStrategy
from jax_paged_kv.cache.errors import (
    CacheInvariantError,
    CacheShapeError,
    DuplicateSlotError,
    FreedBlockError,
    InactiveSlotError,
    InvalidCountError,
    InvalidLayerError,
    InvalidSlotError,
    InvalidTokenError,
    InvalidTokenSlotError,
    PagedKVCacheError,
    PoolExhaustedError,
    SequenceTooLongError,
    SlotInUseError,
    Status,
    checked,
    checking,
    raise_for_status,
)
from jax_paged_kv.cache.state import (
    AllocatorState,
    PagedKVCache,
    Telemetry,
    init_cache,
    pool_values,
)
from jax_paged_kv.cache.stats import InvariantReport, KVCacheStats, cache_stats, check_invariants

from jax_paged_kv.cache.ops import (  # isort: skip  (ops builds on the modules above)
    allocate_sequences,
    append_kv,
    check_readable,
    fork_sequence,
    free_outside_window,
    free_sequences,
    gather_tables,
    lookup_kv,
    reorder_sequences,
    reserve,
    truncate_sequences,
    write_kv,
)
from jax_paged_kv.cache.swap import SwappedSequence, swap_in, swap_out  # isort: skip

__all__ = [
    "NULL_BLOCK",
    "AllocatorState",
    "CacheConfig",
    "CacheInvariantError",
    "CacheShapeError",
    "CacheStrategy",
    "DuplicateSlotError",
    "FreedBlockError",
    "InactiveSlotError",
    "InvalidCountError",
    "InvalidLayerError",
    "InvalidSlotError",
    "InvalidTokenError",
    "InvalidTokenSlotError",
    "InvariantReport",
    "KVCacheStats",
    "PagedKVCache",
    "PagedKVCacheError",
    "PoolExhaustedError",
    "SequenceTooLongError",
    "SlotInUseError",
    "Status",
    "SwappedSequence",
    "Telemetry",
    "allocate_sequences",
    "append_kv",
    "cache_stats",
    "check_invariants",
    "check_readable",
    "checked",
    "checking",
    "fork_sequence",
    "free_outside_window",
    "free_sequences",
    "gather_tables",
    "init_cache",
    "pool_values",
    "lookup_kv",
    "raise_for_status",
    "reorder_sequences",
    "reserve",
    "swap_in",
    "swap_out",
    "truncate_sequences",
    "write_kv",
]
