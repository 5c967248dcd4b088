"""Models that keep their keys and values in the paged cache."""

from jax_paged_kv.models.hf import (
    load_hf_checkpoint,
    params_from_hf,
    params_to_hf,
    read_safetensors,
)
from jax_paged_kv.models.llama import (
    LlamaConfig,
    Params,
    check_params,
    forward,
    init_params,
    lm_head,
    param_shapes,
    rms_norm,
    rope,
)

__all__ = [
    "LlamaConfig",
    "Params",
    "check_params",
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
