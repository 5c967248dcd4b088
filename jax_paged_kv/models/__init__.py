"""Models that keep their keys and values in the paged cache, and the protocol they implement."""

from jax_paged_kv.models.base import Model, cache_config_for, check_model
from jax_paged_kv.models.gemma2 import Gemma2Config
from jax_paged_kv.models.hf import (
    check_params,
    config_from_hf,
    load_hf_checkpoint,
    params_from_hf,
    params_to_hf,
    read_safetensors,
)
from jax_paged_kv.models.layers import RopeScaling, rms_norm, rope
from jax_paged_kv.models.llama import (
    LlamaConfig,
    Params,
    forward,
    init_params,
    lm_head,
    param_shapes,
)

__all__ = [
    "Gemma2Config",
    "LlamaConfig",
    "Model",
    "Params",
    "RopeScaling",
    "cache_config_for",
    "check_model",
    "check_params",
    "config_from_hf",
    "forward",
    "init_params",
    "lm_head",
    "load_hf_checkpoint",
    "param_shapes",
    "params_from_hf",
    "params_to_hf",
    "read_safetensors",
    "rms_norm",
    "rope",
]
