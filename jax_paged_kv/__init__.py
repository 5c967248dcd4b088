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
    CacheInvariantError,
    CacheShapeError,
    DuplicateSlotError,
    InactiveSlotError,
    InvalidCountError,
    InvalidLayerError,
    InvalidSlotError,
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
from jax_paged_kv.state import AllocatorState, PagedKVCache, Telemetry, init_cache
from jax_paged_kv.stats import InvariantReport, KVCacheStats, cache_stats, check_invariants

# The model, decoding loop and engine build on the cache (imported last: data flows one way).
from jax_paged_kv.decoding import (  # noqa: E402  isort: skip
    DecodeState,
    SamplingParams,
    decode_loop,
    decode_step,
    prefill_step,
    sample_tokens,
)
from jax_paged_kv.engine import Engine, EngineMetrics, RequestOutput, generate  # noqa: E402
from jax_paged_kv.export import ExportedDecodeStep, export_decode_step  # noqa: E402
from jax_paged_kv.models import LlamaConfig, init_params, load_hf_checkpoint  # noqa: E402

# Multi-device: placement and per-shard execution, then serving on a mesh.
from jax_paged_kv import sharding  # noqa: E402  isort: skip
from jax_paged_kv.sharding import (  # noqa: E402  isort: skip
    MeshLayout,
    cache_shardings,
    host_mesh,
    init_sharded_cache,
    local_mesh,
    map_shards,
    param_shardings,
    place_cache,
    use_layout,
)
from jax_paged_kv.mesh_serving import (  # noqa: E402  isort: skip
    MeshEngine,
    decode_loop_on_mesh,
    prefill_step_on_mesh,
)

__version__ = "0.1.0"

__all__ = [
    "MeshEngine",
    "MeshLayout",
    "cache_shardings",
    "decode_loop_on_mesh",
    "host_mesh",
    "init_sharded_cache",
    "local_mesh",
    "map_shards",
    "param_shardings",
    "place_cache",
    "prefill_step_on_mesh",
    "sharding",
    "use_layout",
    "NULL_BLOCK",
    "DecodeState",
    "Engine",
    "EngineMetrics",
    "ExportedDecodeStep",
    "LlamaConfig",
    "RequestOutput",
    "SamplingParams",
    "decode_loop",
    "decode_step",
    "export_decode_step",
    "generate",
    "init_params",
    "load_hf_checkpoint",
    "prefill_step",
    "sample_tokens",
    "AllocatorState",
    "CacheConfig",
    "CacheInvariantError",
    "CacheShapeError",
    "CacheStrategy",
    "DuplicateSlotError",
    "InactiveSlotError",
    "InvalidCountError",
    "InvalidLayerError",
    "InvalidSlotError",
    "InvalidTokenSlotError",
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
    "checked",
    "checking",
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
