"""The serving layer: the jitted prefill/decode steps and loop, the continuous-batching engine,
beam search and speculative decoding (each in one ``jit``), and ``jax.export`` of a decode
step. It depends on the model *protocol* (:class:`~jax_paged_kv.models.base.Model`), never on
one model.
"""

from jax_paged_kv.serving.beam import (
    MAX_BEAM_WIDTH,
    BeamHypothesis,
    BeamResult,
    BeamSearchParams,
    beam_search,
    beam_search_loop,
)
from jax_paged_kv.serving.decoding import (
    MAX_SAMPLES,
    MAX_STOP_TOKENS,
    MAX_TOP_LOGPROBS,
    DecodeState,
    Penalties,
    SamplingParams,
    decode_loop,
    decode_step,
    prefill_step,
    sample_tokens,
    token_logprobs,
    top_token_logprobs,
)
from jax_paged_kv.serving.engine import (
    Engine,
    EngineMetrics,
    RequestOutput,
    StreamDelta,
    default_cache_config,
    generate,
)
from jax_paged_kv.serving.export import ExportedDecodeStep, export_decode_step
from jax_paged_kv.serving.mesh import MeshEngine, decode_loop_on_mesh, prefill_step_on_mesh
from jax_paged_kv.serving.speculative import (
    MAX_DRAFT_TOKENS,
    PreparedSpeculation,
    SpecResult,
    SpecState,
    SpeculativeConfig,
    SpeculativeOutput,
    prepare_speculative,
    speculative_generate,
    speculative_loop,
)

__all__ = [
    "MAX_BEAM_WIDTH",
    "BeamHypothesis",
    "BeamResult",
    "BeamSearchParams",
    "beam_search",
    "beam_search_loop",
    "MAX_STOP_TOKENS",
    "MAX_SAMPLES",
    "MAX_TOP_LOGPROBS",
    "DecodeState",
    "Engine",
    "EngineMetrics",
    "ExportedDecodeStep",
    "MeshEngine",
    "Penalties",
    "RequestOutput",
    "SamplingParams",
    "StreamDelta",
    "decode_loop",
    "decode_loop_on_mesh",
    "decode_step",
    "default_cache_config",
    "export_decode_step",
    "generate",
    "prefill_step",
    "prefill_step_on_mesh",
    "sample_tokens",
    "token_logprobs",
    "top_token_logprobs",
    "MAX_DRAFT_TOKENS",
    "PreparedSpeculation",
    "SpeculativeConfig",
    "SpeculativeOutput",
    "SpecResult",
    "SpecState",
    "prepare_speculative",
    "speculative_generate",
    "speculative_loop",
]
