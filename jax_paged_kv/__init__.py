"""jax_paged_kv: a functional, jittable paged KV cache for LLM inference in JAX."""

from jax_paged_kv.attention import default_implementation, paged_attention
from jax_paged_kv.cache import (
    allocate_sequences,
    append_kv,
    fork_sequence,
    free_sequences,
    gather_tables,
    lookup_kv,
    reserve,
    truncate_sequences,
    write_kv,
)
from jax_paged_kv.config import NULL_BLOCK, CacheConfig, CacheStrategy
from jax_paged_kv.errors import (
    CacheShapeError,
    DuplicateSlotError,
    InactiveSlotError,
    InvalidCountError,
    InvalidLayerError,
    InvalidSlotError,
    PagedKVCacheError,
    PoolExhaustedError,
    SequenceTooLongError,
    SlotInUseError,
    Status,
    raise_for_status,
)
from jax_paged_kv.state import AllocatorState, PagedKVCache, Telemetry, init_cache
from jax_paged_kv.stats import InvariantReport, KVCacheStats, cache_stats, check_invariants

__version__ = "0.1.0"

__all__ = [
    "NULL_BLOCK",
    "AllocatorState",
    "CacheConfig",
    "CacheShapeError",
    "CacheStrategy",
    "DuplicateSlotError",
    "InactiveSlotError",
    "InvalidCountError",
    "InvalidLayerError",
    "InvalidSlotError",
    "InvariantReport",
    "KVCacheStats",
    "PagedKVCache",
    "PagedKVCacheError",
    "PoolExhaustedError",
    "SequenceTooLongError",
    "SlotInUseError",
    "Status",
    "Telemetry",
    "allocate_sequences",
    "append_kv",
    "cache_stats",
    "check_invariants",
    "default_implementation",
    "fork_sequence",
    "free_sequences",
    "gather_tables",
    "init_cache",
    "lookup_kv",
    "paged_attention",
    "raise_for_status",
    "reserve",
    "truncate_sequences",
    "write_kv",
]
