"""Models that keep their keys and values in the paged cache, and the protocol they implement."""

from jax_paged_kv.models import gemma2 as _gemma2
from jax_paged_kv.models import llama as _llama
from jax_paged_kv.models.base import Model, cache_config_for, check_model
from jax_paged_kv.models.gemma2 import Gemma2Config, Gemma3Config
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
  lm_head,
  param_shapes,
)


def init_params(config: LlamaConfig | Gemma2Config, key, *, scale: float = 1.0) -> Params:
  """Random weights for a bundled model: :func:`llama.init_params <jax_paged_kv.models.llama.
  init_params>` for a ``LlamaConfig`` (Llama, Mistral, Mixtral, Phi-3, Qwen2, Qwen3,
  Qwen3-MoE), :func:`gemma2.init_params <jax_paged_kv.models.gemma2.init_params>` for a
  ``Gemma2Config`` or ``Gemma3Config``; ``TypeError`` for anything else (a model of your own
  brings its own parameters)."""
  if isinstance(config, Gemma2Config):
    return _gemma2.init_params(config, key, scale=scale)
  if isinstance(config, LlamaConfig):
    return _llama.init_params(config, key, scale=scale)
  raise TypeError("init_params knows LlamaConfig, Gemma2Config and Gemma3Config, got "
                  f"{type(config).__name__}")


__all__ = [
    "Gemma2Config",
    "Gemma3Config",
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
