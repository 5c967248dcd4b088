"""Loading Hugging Face checkpoints (safetensors or a dict of arrays), offline, and only what
this package runs exactly.

Reads ``config.json`` and the ``*.safetensors`` shards of a local checkpoint directory (or a
single ``.safetensors`` file plus a config dict) and maps the usual parameter names
(``model.layers.{i}.self_attn.q_proj.weight``, ...) onto the layout of
:mod:`~jax_paged_kv.models.llama` or :mod:`~jax_paged_kv.models.gemma2`. ``torch.nn.Linear``
stores ``[out, in]``; our projections are ``[in, out]``, so every projection is transposed. The
safetensors reader is a few lines of numpy (``bfloat16`` through ``ml_dtypes``, which ships with
JAX), so neither ``torch`` nor ``safetensors`` is needed.

**Never a silent load.** :func:`config_from_hf` dispatches on ``model_type`` (and checks
``architectures``): ``llama`` (Llama 2 / 3.x), ``mistral``, ``mixtral``, ``phi3`` (Phi-3 / Phi-4,
fused projections split on load), ``qwen2`` (Qwen2 / 2.5), ``qwen2_moe``, ``qwen3`` (dense),
``qwen3_moe``, ``gemma2``, ``gemma3_text`` (Gemma 3 1B) and ``gemma3`` (the language model of
Gemma 3's multimodal checkpoints). Every ``config.json`` field is either read and implemented,
known not to change the outputs (token ids, dropout, ``torch_dtype``, ...), or refused with a
``ValueError`` naming it: an unknown ``model_type``, a RoPE type other than default /
``linear`` / ``dynamic`` / ``llama3`` / ``yarn``, ``partial_rotary_factor``, expert fields
outside the MoE families, multimodal fields, biases the model does not have, a window or soft
cap a family's Hugging Face code would ignore, and any field this module does not know.
The semantics followed are those of ``transformers`` 5 (e.g. Qwen2's and Qwen3's window applies
to the layers at index ``>= max_window_layers``, only with ``use_sliding_window``). Tensors the
mapping does not consume are refused too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_paged_kv.models import gemma2, llama
from jax_paged_kv.models.gemma2 import Gemma2Config, Gemma3Config, gemma3_layer_types
from jax_paged_kv.models.layers import ROPE_TYPES, RopeScaling
from jax_paged_kv.models.llama import LlamaConfig, Params

ModelConfig = LlamaConfig | Gemma2Config

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}

# our name (inside "layers") -> HF name inside "model.layers.{i}."
_PROJECTIONS = {
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
_LLAMA_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    **_PROJECTIONS,
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "mlp_norm": "post_attention_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}
_GEMMA2_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    **_PROJECTIONS,
    "post_attn_norm": "post_attention_layernorm.weight",
    "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}
# Experts: our name -> HF name inside "model.layers.{i}." ({e}: the expert), by family.
_MOE_NAMES = {
    "mixtral": {"router": "block_sparse_moe.gate.weight",
                "moe_gate": "block_sparse_moe.experts.{e}.w1.weight",
                "moe_up": "block_sparse_moe.experts.{e}.w3.weight",
                "moe_down": "block_sparse_moe.experts.{e}.w2.weight"},
    "qwen3_moe": {"router": "mlp.gate.weight",
                  "moe_gate": "mlp.experts.{e}.gate_proj.weight",
                  "moe_up": "mlp.experts.{e}.up_proj.weight",
                  "moe_down": "mlp.experts.{e}.down_proj.weight"},
}
_SHARED_EXPERT_NAMES = {"shared_w_gate": "mlp.shared_expert.gate_proj.weight",
                        "shared_w_up": "mlp.shared_expert.up_proj.weight",
                        "shared_w_down": "mlp.shared_expert.down_proj.weight",
                        "shared_router": "mlp.shared_expert_gate.weight"}
_TRANSPOSED = set(_PROJECTIONS) | set(_MOE_NAMES["mixtral"]) | set(_SHARED_EXPERT_NAMES)

# Fields that never change a causal LM's outputs at inference.
_NEUTRAL_FIELDS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype",
    "dtype", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
    "attention_dropout", "output_attentions", "output_hidden_states", "return_dict",
    "tokenizer_class", "id2label", "label2id", "problem_type",
})


# ---------------------------------------------------------------------------------------------
# config.json


class _Reader:
  """Reads a ``config.json`` dict, remembering which fields were looked at."""

  def __init__(self, hf: Mapping[str, Any], model_type: str):
    self.hf = dict(hf)
    self.model_type = model_type
    self.read: set[str] = set()

  def get(self, key: str, default: Any = None) -> Any:
    self.read.add(key)
    value = self.hf.get(key)
    return default if value is None else value

  def get_absent(self, key: str, absent: Any) -> Any:
    """``key``'s value where the config has the key (an explicit ``null`` stays None), else
    ``absent``: transformers' class default, which differs from what a ``null`` means for
    some fields (Mistral's ``sliding_window``: absent is 4096, ``null`` is no window)."""
    self.read.add(key)
    return self.hf[key] if key in self.hf else absent

  def get_int(self, key: str, default: Any = None, *, required: bool = False,
              null_ok: bool = False) -> int:
    """An integer field (a bool or a float such as 2.5 is refused, as transformers does; so is
    an explicit ``null`` unless ``null_ok``: then it means ``default``)."""
    if not (required or null_ok) and key in self.hf and self.hf[key] is None:
      raise self.refuse(f"{key}=None is not an integer")
    return self.as_int(key, self.require(key) if required else self.get(key, default))

  def typed(self, key: str, default: Any, kind: type) -> Any:
    """A ``bool``, ``float`` or ``str`` field: ``default`` where the key is absent; an explicit
    ``null`` or a value of another type is refused, as transformers refuses them (``"false"``
    is not False, ``null`` is not the default)."""
    self.read.add(key)
    if key not in self.hf:
      return default
    value = self.hf[key]
    ok = {bool: isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}[kind]
    if not ok:
      raise self.refuse(f"{key}={value!r} is not a {kind.__name__}")
    return kind(value)

  def as_int(self, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise self.refuse(f"{key}={value!r} is not an integer")
    return value

  def has(self, key: str) -> bool:
    self.read.add(key)
    return self.hf.get(key) is not None

  def require(self, key: str) -> Any:
    value = self.get(key)
    if value is None:
      raise ValueError(f"{self.model_type} config has no {key!r}")
    return value

  def refuse(self, why: str) -> ValueError:
    return ValueError(f"model_type={self.model_type!r}: {why}; refusing to load a model this "
                      "package would not run exactly")

  def check_all_read(self, neutral: frozenset[str] = frozenset()) -> None:
    unknown = sorted(set(self.hf) - self.read - _NEUTRAL_FIELDS - neutral)
    if unknown:
      raise self.refuse(
          f"config field(s) {unknown} are not implemented (if they do not change the model's "
          "outputs, drop them from the config)")


def _rope_dict(r: _Reader, name: str, value: Any) -> dict[str, Any]:
  if value is not None and not isinstance(value, Mapping):
    raise r.refuse(f"{name}={value!r} is not a dict")
  return dict(value or {})


def _check_partial_rotary(r: _Reader, rope: dict[str, Any]) -> None:
  for partial in (rope.pop("partial_rotary_factor", None), r.get("partial_rotary_factor")):
    if partial is not None and float(partial) != 1.0:
      raise r.refuse(f"partial_rotary_factor={partial} (RoPE on part of each head) is not "
                     "implemented")


def _number(r: _Reader, name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise r.refuse(f"{name}={value!r} is not a number")
  return float(value)


def _rope_scaling(r: _Reader, rope: dict[str, Any], max_position_embeddings: int,
                  where: str = "") -> RopeScaling | None:
  """The :class:`RopeScaling` of one RoPE parameter dict (``rope_theta`` already taken out);
  None for the default type; a ``ValueError`` for anything else left in it. ``where`` names a
  per-layer-type dict (Gemma 3), for which a top-level ``original_max_position_embeddings``
  does not apply (transformers' ``standardize_rope_params`` applies it to flat dicts only)."""
  rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
  rope.pop("type", None)
  key = "original_max_position_embeddings"
  nested = key in rope
  original = rope.pop(key, None)
  if not where and key in r.hf:  # top level wins (the Phi-3 rule)
    nested, original = True, r.get(key)

  def context() -> int:  # llama3 and yarn: the pretraining context (transformers' rule)
    if nested and original is None:
      raise r.refuse(f"{key}=None (transformers fails on it)")
    return max_position_embeddings if original is None else r.as_int(key, original)

  if rope_type == "default":
    out = None
  elif rope_type in ROPE_TYPES:
    try:
      if rope_type == "yarn":
        out = _yarn(r, rope, context(), max_position_embeddings, where)
      else:
        factor = _number(r, f"{rope_type} factor", rope.pop("factor"))
        if rope_type == "llama3":
          out = RopeScaling("llama3", factor,
                            _number(r, "low_freq_factor", rope.pop("low_freq_factor")),
                            _number(r, "high_freq_factor", rope.pop("high_freq_factor")),
                            context())
        else:  # linear, dynamic: transformers ignores original_max_position_embeddings here
          out = RopeScaling(rope_type, factor)
    except KeyError as e:
      raise r.refuse(f"{rope_type} RoPE scaling{where} without {e}") from None
  else:
    raise r.refuse(f"RoPE type {rope_type!r}{where} is not implemented (only default, "
                   f"{', '.join(ROPE_TYPES)})")
  if rope:
    raise r.refuse(f"RoPE parameter(s) {sorted(rope)} of type {rope_type!r}{where} are not "
                   "implemented")
  return out


def _yarn(r: _Reader, rope: dict[str, Any], original: int, max_position_embeddings: int,
          where: str) -> RopeScaling:
  """YaRN as transformers' ``_compute_yarn_parameters`` reads it: a missing ``factor`` key is
  refused (transformers' validation refuses it), a null one is ``max_position_embeddings /
  original`` (DeepSeek's rule); a missing ``attention_factor`` is the paper's
  ``0.1 ln(factor) + 1``, or DeepSeek's ratio of two such terms with ``mscale`` and
  ``mscale_all_dim``; ``beta_fast`` / ``beta_slow`` default (also when 0) to 32 / 1; a null
  ``truncate`` is false (transformers tests its truth)."""
  if where:
    raise r.refuse(f"yarn RoPE{where} is not implemented (only on a model's single RoPE)")
  factor = rope.pop("factor")  # KeyError: refused by the caller
  factor = (max_position_embeddings / original if factor is None
            else _number(r, "yarn factor", factor))
  attention, mscale, mscale_all_dim = (rope.pop(k, None) for k in (
      "attention_factor", "mscale", "mscale_all_dim"))

  def get_mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  if attention is None:
    attention = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                 if mscale and mscale_all_dim else get_mscale(factor))
  return RopeScaling("yarn", factor, original_max_position_embeddings=original,
                     beta_fast=rope.pop("beta_fast", None) or 32.0,
                     beta_slow=rope.pop("beta_slow", None) or 1.0,
                     attention_factor=float(attention),
                     truncate=bool(rope.pop("truncate", True)))


def _rope(r: _Reader, max_position_embeddings: int, default_theta: float = 10000.0
          ) -> dict[str, Any]:
  """``rope_theta`` and ``rope_scaling`` from ``rope_parameters`` / ``rope_scaling`` /
  ``rope_theta``."""
  scaling = _rope_dict(r, "rope_scaling", r.get("rope_scaling"))
  params = _rope_dict(r, "rope_parameters", r.get("rope_parameters"))
  rope = scaling or params  # transformers: rope_scaling wins over rope_parameters
  if any(isinstance(v, Mapping) for v in rope.values()):
    raise r.refuse(f"per-layer-type RoPE parameters {sorted(rope)} are not implemented")
  theta = rope.pop("rope_theta", None)
  theta = float(theta if theta is not None else r.typed("rope_theta", default_theta, float))
  r.read.add("rope_theta")
  _check_partial_rotary(r, rope)
  kind = rope.get("rope_type") or rope.get("type") or "default"
  if r.model_type == "phi3" and kind != "default":  # transformers' Phi-3: default or LongRoPE
    raise r.refuse(f"RoPE type {kind!r}: transformers' Phi-3 runs only default RoPE or LongRoPE "
                   "(which 'su' and 'yarn' mean there), and LongRoPE is not implemented")
  return dict(rope_theta=theta,
              rope_scaling=_rope_scaling(r, rope, max_position_embeddings))


def _gemma3_rope(r: _Reader, max_position_embeddings: int, _=None) -> dict[str, Any]:
  """Gemma 3's two RoPEs (transformers' ``Gemma3TextConfig.convert_rope_params_to_dict``): the
  global layers' from ``rope_parameters["full_attention"]`` updated by a legacy
  ``rope_scaling``, base ``rope_theta`` (1e6) unless it names one; the sliding layers' from
  ``rope_parameters["sliding_attention"]``, base ``rope_local_base_freq`` (1e4) unless it names
  one, and no scaling (other types there are refused)."""
  params = _rope_dict(r, "rope_parameters", r.get("rope_parameters"))
  kinds = ("full_attention", "sliding_attention")
  if set(params) - set(kinds) or not all(isinstance(v, Mapping) for v in params.values()):
    raise r.refuse(f"rope_parameters {sorted(params)}: Gemma 3 takes one dict per layer type "
                   f"({', '.join(kinds)})")
  # transformers seeds each missing type with {"rope_type": "default"} and merges a legacy
  # rope_scaling into the global one: a legacy {"type": "linear", ...} then stays "default"
  # with a stray factor, which is refused below rather than run either way.
  full = _rope_dict(r, "rope_parameters['full_attention']",
                    params.get("full_attention") or {"rope_type": "default"})
  sliding = _rope_dict(r, "rope_parameters['sliding_attention']",
                       params.get("sliding_attention") or {"rope_type": "default"})
  full.update(_rope_dict(r, "rope_scaling", r.get("rope_scaling")))
  theta = full.pop("rope_theta", None)
  theta = float(theta if theta is not None else r.typed("rope_theta", 1_000_000.0, float))
  local = sliding.pop("rope_theta", None)
  local = float(local if local is not None else r.typed("rope_local_base_freq", 10_000.0, float))
  r.read.update(("rope_theta", "rope_local_base_freq"))
  _check_partial_rotary(r, full)
  _check_partial_rotary(r, sliding)
  scaling = _rope_scaling(r, full, max_position_embeddings, " (full_attention)")
  if _rope_scaling(r, sliding, max_position_embeddings, " (sliding_attention)") is not None:
    raise r.refuse("RoPE scaling on Gemma 3's sliding layers is not implemented")
  return dict(rope_theta=theta, rope_scaling=scaling, sliding_rope_theta=local)


_HEAD_DIM_NOT_NULL = ("gemma2", "gemma3_text", "qwen3", "qwen3_moe")


def _common(r: _Reader, defaults: Mapping[str, Any], rope=_rope) -> dict[str, Any]:
  """The shape and RoPE fields every family shares, with Hugging Face's per-family defaults."""
  heads = r.get_int("num_attention_heads", required=True)
  hidden = r.get_int("hidden_size", required=True)
  max_pos = r.get_int("max_position_embeddings", defaults["max_position_embeddings"])
  # transformers' class default when the key is absent (Mistral 8, Qwen2 / Qwen3 32, Gemma 2 4;
  # Llama: the query heads); an explicit null means the query heads.
  kv_heads = r.get_absent("num_key_value_heads", defaults.get("num_key_value_heads"))
  kv_heads = r.as_int("num_key_value_heads", heads if kv_heads is None else kv_heads)
  rope_fields = rope(r, max_pos, defaults.get("rope_theta", 10000.0))
  if r.model_type not in _MOE_FAMILIES:
    for key in ("num_experts", "num_local_experts", "n_routed_experts",
                "moe_intermediate_size", "num_experts_per_tok"):
      if r.has(key):
        raise r.refuse(f"{key} (mixture of experts) is not part of {r.model_type}")
  return dict(
      vocab_size=r.get_int("vocab_size", required=True), hidden_size=hidden,
      intermediate_size=r.get_int("intermediate_size", required=True),
      num_layers=r.get_int("num_hidden_layers", required=True), num_heads=heads,
      num_kv_heads=kv_heads,
      # A null head_dim means hidden / heads in Llama, Mistral and Qwen2; Gemma and Qwen3
      # have no such rule (their attention takes config.head_dim as it is).
      head_dim=r.get_int("head_dim", defaults.get("head_dim") or hidden // heads,
                         null_ok=r.model_type not in _HEAD_DIM_NOT_NULL),
      **rope_fields,
      rms_norm_eps=r.typed("rms_norm_eps", defaults.get("rms_norm_eps", 1e-6), float),
      tie_word_embeddings=r.typed("tie_word_embeddings", defaults["tie_word_embeddings"], bool),
      max_position_embeddings=max_pos)


_MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def _llama_family(r: _Reader, dtype) -> LlamaConfig:
  """``llama``, ``mistral``, ``mixtral``, ``phi3``, ``qwen2``, ``qwen2_moe``, ``qwen3`` and
  ``qwen3_moe``: one model, eight ways to spell its options (Mixtral is Mistral with experts,
  Phi-3 Mistral with fused projections, Qwen2-MoE Qwen2 with experts and a shared expert,
  Qwen3-MoE Qwen3 with experts)."""
  t = r.model_type
  base = {"mixtral": "mistral", "phi3": "mistral", "qwen2_moe": "qwen2",
          "qwen3_moe": "qwen3"}.get(t, t)
  defaults = {"llama": dict(max_position_embeddings=2048),
              "mistral": dict(max_position_embeddings=131072, num_key_value_heads=8),
              "mixtral": dict(max_position_embeddings=131072, num_key_value_heads=8,
                              rope_theta=1e6, rms_norm_eps=1e-5),
              "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32),
              "qwen3": dict(max_position_embeddings=32768, num_key_value_heads=32,
                            head_dim=128),
              "qwen3_moe": dict(max_position_embeddings=32768, num_key_value_heads=4),
              "qwen2_moe": dict(max_position_embeddings=32768, num_key_value_heads=16),
              "phi3": dict(max_position_embeddings=4096, rms_norm_eps=1e-5)}[t]
  fields = _common(r, dict(defaults, tie_word_embeddings=False))
  act = r.typed("hidden_act", "silu", str)
  if act not in ("silu", "swish"):
    raise r.refuse(f"hidden_act={act!r} is not implemented (SwiGLU with SiLU only)")
  if r.typed("mlp_bias", False, bool):
    raise r.refuse("mlp_bias=True is not implemented")
  # Absent, Mistral's and Qwen2's / Qwen3's window is transformers' default 4096; an explicit
  # null is no window (Mistral v0.2+). Llama has none, Mixtral's default is none.
  window = r.get_absent("sliding_window", None if t in ("llama", "mixtral", "phi3") else 4096)
  if t == "phi3":
    r.read.update(("resid_pdrop", "embd_pdrop"))  # dropout
  qwen = base in ("qwen2", "qwen3")
  use_window = r.typed("use_sliding_window", None, bool) if qwen else r.get(
      "use_sliding_window")
  layer_types = r.get("layer_types")
  max_window_layers = r.get_absent("max_window_layers", None)
  if t == "qwen2_moe":
    # Its window rule (every other layer below max_window_layers) is not Qwen2's; the released
    # checkpoints have none.
    if use_window or (layer_types is not None and "sliding_attention" in layer_types):
      raise r.refuse("Qwen2-MoE's sliding windows are not implemented")
    layer_types = max_window_layers = None
  if t == "qwen3_moe":
    # Not Qwen3-MoE fields (its window applies to every layer), but its released configs carry
    # max_window_layers: harmless without a window, ambiguous with one.
    on = bool(use_window) and window is not None
    if (on and (layer_types is not None or max_window_layers is not None)) or (
        not on and layer_types is not None and "sliding_attention" in layer_types):
      raise r.refuse("layer_types / max_window_layers are ignored by Hugging Face's Qwen3-MoE "
                     "(its window, when on, applies to every layer); refusing the ambiguity")
    layer_types = max_window_layers = None
  if max_window_layers is not None or (t in ("qwen2", "qwen3") and "max_window_layers" in r.hf):
    max_window_layers = r.as_int("max_window_layers", max_window_layers)  # Qwen: null refused
  n = fields["num_layers"]
  bias = r.typed("attention_bias", None, bool)
  if t == "llama":
    if bias:
      raise r.refuse("attention_bias=True (Llama puts biases on q/k/v *and* o_proj) is not "
                     "implemented")
    if window is not None or use_window or layer_types is not None or (
        max_window_layers is not None):
      raise r.refuse("Hugging Face's Llama ignores sliding_window / use_sliding_window / "
                     "layer_types / max_window_layers; a Llama config that sets them is "
                     "ambiguous")
    r.read.add("pretraining_tp")  # a tensor-parallel split of the same matmuls
  elif base == "mistral":
    if bias:
      raise r.refuse(f"attention_bias=True is not part of {t}")
    if layer_types is not None or max_window_layers is not None:
      raise r.refuse(f"layer_types / max_window_layers are ignored by Hugging Face's {t} "
                     "(Ministral-style checkpoints); refusing the ambiguity")
    if use_window is not None and bool(use_window) != (window is not None):
      raise r.refuse(f"use_sliding_window={use_window} contradicts sliding_window={window} "
                     f"(Hugging Face's {t} applies sliding_window whenever it is set)")
  else:  # qwen2: q/k/v biases always; qwen3 / qwen3_moe: q/k norms, no bias by default
    if t == "qwen2" and bias is False:
      raise r.refuse("attention_bias=False contradicts Qwen2 (q/k/v biases always)")
    if t == "qwen2_moe":  # qkv_bias, not attention_bias, is its switch
      if bias is not None:
        raise r.refuse("attention_bias is not a Qwen2-MoE field (qkv_bias is)")
      bias = r.typed("qkv_bias", True, bool)
    if base == "qwen3" and bias:
      raise r.refuse(f"attention_bias=True ({t} puts biases on q/k/v *and* o_proj) is not "
                     "implemented")
    if t == "qwen2" and r.get("use_mrope", False):
      raise r.refuse("use_mrope=True (multimodal RoPE) is not implemented")
    window = window if use_window else None
    if layer_types is None:
      first = 0 if t == "qwen3_moe" else int(
          max_window_layers if max_window_layers is not None else 28)
      layer_types = ["sliding_attention" if window is not None and i >= first
                     else "full_attention" for i in range(n)]
    if "sliding_attention" in layer_types and window is None:
      raise r.refuse(f"layer_types {layer_types} has sliding layers but the window is off "
                     f"(use_sliding_window={use_window}, sliding_window={r.get('sliding_window')})")
    if "sliding_attention" not in layer_types:
      window, layer_types = None, None
  moe = _moe_fields(r, fields) if t in _MOE_FAMILIES else {}
  if window is not None and layer_types is not None:
    layer_types = tuple(layer_types)
  r.check_all_read()
  return LlamaConfig(**fields, attention_bias=(t == "qwen2") or (t == "qwen2_moe" and bias),
                     qk_norm=(base == "qwen3"),
                     sliding_window=window,
                     layer_types=layer_types if window is not None else None, dtype=dtype,
                     **moe)


def _moe_fields(r: _Reader, fields: Mapping[str, Any]) -> dict[str, Any]:
  """The experts of ``mixtral`` (``num_local_experts`` of ``intermediate_size`` width, top-k
  renormalised) or ``qwen3_moe`` (``num_experts`` of ``moe_intermediate_size``,
  ``norm_topk_prob``; every layer sparse: ``decoder_sparse_step`` 1, no ``mlp_only_layers``)."""
  r.read.update(("output_router_logits", "router_aux_loss_coef", "router_jitter_noise"))  # training
  # transformers 5 maps num_experts to num_local_experts in Mixtral and Qwen3-MoE (and saves the
  # latter); Qwen2-MoE has no such alias (num_local_experts stays unread there: refused).
  two = r.model_type == "qwen2_moe"
  names = [k for k in (("num_experts",) if two else ("num_experts", "num_local_experts"))
           if k in r.hf]
  values = {k: r.get_int(k) for k in names}
  if len(set(values.values())) > 1:
    raise r.refuse(f"num_experts and num_local_experts differ: {values}")
  if r.model_type == "mixtral":
    return dict(num_experts=values[names[0]] if names else 8,
                num_experts_per_tok=r.get_int("num_experts_per_tok", 2),
                moe_intermediate_size=fields["intermediate_size"], norm_topk_prob=True)
  experts = values[names[0]] if names else (60 if two else 128)
  step = r.get_int("decoder_sparse_step", 1)
  dense = r.get("mlp_only_layers") or []
  if step != 1 or dense:
    raise r.refuse(f"dense MLP layers among the experts (decoder_sparse_step={step}, "
                   f"mlp_only_layers={dense}) are not implemented")
  out = dict(num_experts=experts,
             num_experts_per_tok=r.get_int("num_experts_per_tok", 4 if two else 8),
             moe_intermediate_size=r.get_int("moe_intermediate_size", 1408 if two else 768),
             norm_topk_prob=r.typed("norm_topk_prob", False, bool))
  if two:  # the shared expert (transformers builds it whatever its width)
    out["shared_expert_intermediate_size"] = r.get_int("shared_expert_intermediate_size", 5632)
  return out


def _gemma(r: _Reader, dtype) -> Gemma2Config:
  """``gemma2`` and ``gemma3_text`` (Gemma 3 adds q/k norms and the sliding layers' own RoPE
  base, and drops the soft caps and ``mlp_bias`` / ``sliding_window_size`` fields)."""
  three = r.model_type == "gemma3_text"
  fields = _common(r, dict(max_position_embeddings=131072 if three else 8192,
                           tie_word_embeddings=True, head_dim=256, num_key_value_heads=4),
                   rope=_gemma3_rope if three else _rope)
  act = r.typed("hidden_activation", "gelu_pytorch_tanh", str)
  r.read.add("hidden_act")  # transformers' Gemma reads hidden_activation only
  if act != "gelu_pytorch_tanh":
    raise r.refuse(f"hidden_activation={act!r} is not implemented (gelu_pytorch_tanh only)")
  if r.typed("attention_bias", False, bool):
    raise r.refuse("attention_bias=True is not implemented")
  if r.get("use_bidirectional_attention", False):
    raise r.refuse("use_bidirectional_attention=True is not implemented (causal only)")
  window = r.hf.get("sliding_window", 4096)
  r.read.add("sliding_window")
  if window is None:  # transformers' Gemma cannot build its sliding mask either
    raise r.refuse("sliding_window=None leaves the sliding layers without a window")
  layer_types = r.get("layer_types")
  n = fields["num_layers"]
  if three:
    # transformers' Gemma 3 defines attn_logit_softcapping but its attention never applies it.
    attn_cap = r.get("attn_logit_softcapping")
    if attn_cap is not None:
      raise r.refuse(f"attn_logit_softcapping={attn_cap}: transformers' Gemma 3 never applies "
                     "it; refusing the ambiguity")
    final_cap = r.get("final_logit_softcapping")  # null or absent: none
    if final_cap is not None and (isinstance(final_cap, bool)
                                  or not isinstance(final_cap, (int, float))):
      raise r.refuse(f"final_logit_softcapping={final_cap!r} is not a number")
    caps = {"attn_logit_softcapping": None, "final_logit_softcapping": final_cap}
    # transformers builds layer_types from sliding_window_pattern when they are absent (and
    # ignores it when they are given: a contradiction is refused); it saves its private
    # _sliding_window_pattern (6 unless a pattern was given) and never reads it back.
    patterns = {key: r.get_int(key, 6) for key in ("sliding_window_pattern",
                                                   "_sliding_window_pattern")}
    for key, pattern in patterns.items():
      if pattern < 1:
        raise r.refuse(f"{key}={pattern} must be >= 1")
    pattern = patterns["sliding_window_pattern"]
    if "sliding_window_pattern" in r.hf and layer_types is not None and (
        tuple(layer_types) != gemma3_layer_types(n, pattern)):
      raise r.refuse(f"layer_types {list(layer_types)} contradicts sliding_window_pattern="
                     f"{pattern}")
    if layer_types is None:
      if len(set(patterns.values())) > 1 and "_sliding_window_pattern" in r.hf:
        raise r.refuse(f"sliding_window_pattern and _sliding_window_pattern differ: {patterns}")
      layer_types = gemma3_layer_types(n, patterns["sliding_window_pattern"])
  else:
    if r.typed("mlp_bias", False, bool):
      raise r.refuse("mlp_bias=True is not implemented")
    legacy = r.get("sliding_window_size")
    if legacy is not None and legacy != window:
      raise r.refuse(f"sliding_window_size={legacy} differs from sliding_window={window}")
    caps = {k: r.hf.get(k, default) for k, default in (("attn_logit_softcapping", 50.0),
                                                        ("final_logit_softcapping", 30.0))}
    r.read.update(caps)
  scalar = r.get_absent("query_pre_attn_scalar", 256)
  if isinstance(scalar, bool) or not isinstance(scalar, (int, float)) or not scalar > 0:
    raise r.refuse(f"query_pre_attn_scalar={scalar!r} is not a positive number")
  scalar = float(scalar)
  r.check_all_read(frozenset({"cache_implementation"}))  # which HF cache class to build
  cls = Gemma3Config if three else Gemma2Config
  return cls(**fields, query_pre_attn_scalar=scalar, sliding_window=window, dtype=dtype,
             layer_types=None if layer_types is None else tuple(layer_types), **caps)


# transformers' Gemma3TextConfig class defaults for the fields a multimodal checkpoint's
# text_config may leave out (google/gemma-3-4b-it's gives neither heads nor vocabulary).
_GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                             num_hidden_layers=26, num_attention_heads=8)
# Fields of the multimodal config that only the image path reads.
_GEMMA3_IMAGE_FIELDS = frozenset({"boi_token_index", "eoi_token_index", "image_token_index",
                                  "mm_tokens_per_image", "vision_config", "initializer_range"})


def _gemma3_multimodal(r: _Reader, dtype) -> Gemma3Config:
  """``gemma3`` (``Gemma3ForConditionalGeneration``: Gemma 3 4B / 12B / 27B): its language
  model, which is a ``gemma3_text`` model, from ``text_config`` (absent fields take
  transformers' class defaults). Text only: no vision tower runs (image token ids are embedded
  as ordinary tokens)."""
  text = r.get("text_config")
  if not isinstance(text, Mapping):
    raise r.refuse(f"text_config={text!r} is not a dict")
  if text.get("model_type", "gemma3_text") != "gemma3_text":
    raise r.refuse(f"text_config model_type={text.get('model_type')!r} is not gemma3_text")
  for where, cfg in (("", r.hf), ("text_config ", text)):
    if cfg.get("tie_word_embeddings", True) is not True:
      raise r.refuse(f"{where}tie_word_embeddings={cfg['tie_word_embeddings']!r}: Gemma 3's "
                     "multimodal head is the embedding")
  r.read.update(_GEMMA3_IMAGE_FIELDS | {"tie_word_embeddings"})
  r.check_all_read()
  text = {**_GEMMA3_TEXT_DEFAULTS, **text, "model_type": "gemma3_text"}
  return _gemma(_Reader(text, "gemma3_text"), dtype)


@dataclasses.dataclass(frozen=True)
class _Family:
  architecture: str
  parse: Callable[[_Reader, Any], ModelConfig]


_FAMILIES = {
    "llama": _Family("LlamaForCausalLM", _llama_family),
    "mistral": _Family("MistralForCausalLM", _llama_family),
    "qwen2": _Family("Qwen2ForCausalLM", _llama_family),
    "qwen3": _Family("Qwen3ForCausalLM", _llama_family),
    "mixtral": _Family("MixtralForCausalLM", _llama_family),
    "phi3": _Family("Phi3ForCausalLM", _llama_family),
    "qwen3_moe": _Family("Qwen3MoeForCausalLM", _llama_family),
    "qwen2_moe": _Family("Qwen2MoeForCausalLM", _llama_family),
    "gemma2": _Family("Gemma2ForCausalLM", _gemma),
    "gemma3_text": _Family("Gemma3ForCausalLM", _gemma),
    "gemma3": _Family("Gemma3ForConditionalGeneration", _gemma3_multimodal),
}


def config_from_hf(hf: Mapping[str, Any], *, dtype=jnp.float32) -> ModelConfig:
  """The model config of a Hugging Face ``config.json`` dict, or a ``ValueError`` saying why not.

  Args:
    hf: the ``config.json`` contents.
    dtype: dtype of the model's weights, activations and cache.

  Returns:
    A :class:`~jax_paged_kv.models.llama.LlamaConfig` (``llama``, ``mistral``, ``qwen2``,
    ``qwen3``) or a
    :class:`~jax_paged_kv.models.gemma2.Gemma2Config` (``gemma2``) or its subclass
    :class:`~jax_paged_kv.models.gemma2.Gemma3Config` (``gemma3_text``).

  Raises:
    ValueError: an unknown ``model_type`` or architecture, or any field that changes the
      model's math and is not implemented (see the module docstring).
  """
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  if model_type is None:
    guess = [t for t, f in _FAMILIES.items() if f.architecture in archs]
    if len(guess) != 1:
      raise ValueError(f"config has no model_type and architectures={archs} name no supported "
                       f"family ({sorted(_FAMILIES)})")
    model_type = guess[0]
  if model_type not in _FAMILIES:
    raise ValueError(f"model_type={model_type!r} is not implemented; supported: "
                     f"{sorted(_FAMILIES)}")
  family = _FAMILIES[model_type]
  if archs and list(archs) != [family.architecture]:
    raise ValueError(f"architectures={archs} for model_type={model_type!r}: only "
                     f"{family.architecture} (a causal LM head) is implemented")
  return family.parse(_Reader(hf, model_type), dtype)


# ---------------------------------------------------------------------------------------------
# tensors


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file as numpy arrays (memory-mapped, read-only).

  Raises:
    ValueError: a malformed header or an unknown dtype.
  """
  data = np.memmap(path, dtype=np.uint8, mode="r")
  if data.size < 8:
    raise ValueError(f"{path}: too short to be a safetensors file")
  (n,) = struct.unpack("<Q", data[:8].tobytes())
  if 8 + n > data.size:
    raise ValueError(f"{path}: header length {n} exceeds the file size")
  header = json.loads(data[8:8 + n].tobytes())
  base = 8 + n
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise ValueError(f"{path}: tensor {name} has {end - start} bytes for shape {shape}")
    out[name] = data[base + start:base + end].view(dtype).reshape(shape)
  return out


def _layer_names(config: ModelConfig) -> dict[str, str]:
  if isinstance(config, Gemma2Config):
    names = dict(_GEMMA2_LAYER_NAMES)
    if not config.qk_norm:
      del names["q_norm"], names["k_norm"]
    return names
  names = dict(_LLAMA_LAYER_NAMES)
  if not config.attention_bias:
    for k in ("bq", "bk", "bv"):
      del names[k]
  if not config.qk_norm:
    del names["q_norm"], names["k_norm"]
  if config.num_experts is not None:
    for k in ("w_gate", "w_up", "w_down"):
      del names[k]
    shared = config.shared_expert_intermediate_size is not None
    names.update(_MOE_NAMES["qwen3_moe" if config.qk_norm or shared else "mixtral"])
    if shared:
      names.update(_SHARED_EXPERT_NAMES)
  return names


def _per_layer(config: ModelConfig, name: str, layer: int) -> list[str]:
  """The HF names of one of our per-layer tensors in one layer (one per expert for experts)."""
  if "{e}" not in name:
    return [f"model.layers.{layer}.{name}"]
  return [f"model.layers.{layer}.{name.format(e=e)}" for e in range(config.num_experts)]


def check_params(config: ModelConfig, params: Params) -> None:
  """Raises ``ValueError`` naming the first parameter whose presence, shape or dtype is wrong."""
  module = gemma2 if isinstance(config, Gemma2Config) else llama
  module.check_params(config, params)


def params_from_hf(state: Mapping[str, Any], config: ModelConfig, *,
                   fused: bool = False) -> Params:
  """Maps a Hugging Face state dict onto this package's parameter layout.

  Args:
    state: ``{hf_name: array}`` (numpy, JAX or anything ``np.asarray`` takes; torch tensors
      via ``.numpy()`` first). Names may carry the ``model.`` prefix or not.
    config: the model config (e.g. from :func:`config_from_hf`).
    fused: the checkpoint fuses q/k/v into ``self_attn.qkv_proj`` and gate/up into
      ``mlp.gate_up_proj`` (Phi-3: ``[q; k; v]`` and ``[gate; up]`` along the output axis),
      split here; the separate tensors are then refused.

  Returns:
    The parameter dict, cast to ``config.dtype``.

  Raises:
    ValueError: a missing tensor, a wrong shape, or a tensor the model would not use (e.g. a
      bias the config does not declare), naming it.
  """
  used: set[str] = set()
  if fused:
    state = _split_fused(state, config)

  def find(name):
    for key in (name, name.removeprefix("model.")):
      if key in state:
        return key
    return None

  def get(name):
    key = find(name)
    if key is None:
      raise ValueError(f"checkpoint has no tensor {name!r}")
    used.add(key)
    w = np.asarray(state[key])
    if not (np.issubdtype(w.dtype, np.floating) or w.dtype == jnp.bfloat16):
      # An integer tensor (a quantised weight without its scales) would load as its raw codes.
      raise ValueError(f"checkpoint tensor {key!r} is {w.dtype}, not a float: quantised "
                       "weights are not implemented")
    return w

  c = config
  dt = c.dtype
  layers = {}
  for ours, theirs in _layer_names(c).items():
    per_layer = [np.stack([get(n).T if ours in _TRANSPOSED else get(n)
                           for n in _per_layer(c, theirs, i)]) for i in range(c.num_layers)]
    if "{e}" not in theirs:  # one tensor per layer: drop the expert axis
      per_layer = [w[0] for w in per_layer]
    layers[ours] = jnp.asarray(np.stack(per_layer).astype(np.float32), dt)
  embed = get("model.embed_tokens.weight")
  params = {
      "embed": jnp.asarray(embed.astype(np.float32), dt),
      "layers": layers,
      "final_norm": jnp.asarray(get("model.norm.weight").astype(np.float32), dt),
  }
  if not c.tie_word_embeddings:
    params["lm_head"] = jnp.asarray(get("lm_head.weight").T.astype(np.float32), dt)
  else:
    head = find("lm_head.weight")
    if head is not None and np.array_equal(np.asarray(state[head]), embed):
      used.add(head)  # a tied head saved twice
  unused = sorted(k for k in state if k not in used and not k.endswith("rotary_emb.inv_freq"))
  if unused:
    raise ValueError(f"checkpoint tensors {unused[:5]}{' ...' if len(unused) > 5 else ''} are "
                     f"not used by {type(c).__name__} (a feature the config does not declare?)")
  check_params(c, params)
  return params


def _split_fused(state: Mapping[str, Any], config: LlamaConfig) -> dict[str, Any]:
  """Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` as the separate tensors of every other
  family (each fused tensor must be there, of its exact size, and no separate one)."""
  if not isinstance(config, LlamaConfig) or config.num_experts is not None:
    raise ValueError(f"fused projections are Phi-3's; not for {config}")
  c = config
  q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
  out = {}
  for key, w in state.items():
    prefix = key.removeprefix("model.")
    if prefix.startswith("layers.") and any(
        key.endswith(f".{n}.weight") for n in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                             "up_proj")):
      raise ValueError(f"checkpoint tensor {key!r} beside fused projections (Phi-3 fuses "
                       "q/k/v and gate/up)")
    if key.endswith("self_attn.qkv_proj.weight"):
      w = np.asarray(w)
      if w.shape[0] != q + 2 * kv:
        raise ValueError(f"{key!r} has {w.shape[0]} rows, expected {q} + 2 x {kv}")
      base = key.removesuffix("qkv_proj.weight")
      out[base + "q_proj.weight"], out[base + "k_proj.weight"], out[base + "v_proj.weight"] = (
          w[:q], w[q:q + kv], w[q + kv:])
    elif key.endswith("mlp.gate_up_proj.weight"):
      w = np.asarray(w)
      if w.shape[0] != 2 * inter:
        raise ValueError(f"{key!r} has {w.shape[0]} rows, expected 2 x {inter}")
      base = key.removesuffix("gate_up_proj.weight")
      out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = w[:inter], w[inter:]
    else:
      out[key] = w
  return out


def params_to_hf(params: Params, config: ModelConfig) -> dict[str, np.ndarray]:
  """The inverse of :func:`params_from_hf`: ``{hf_name: float32 numpy array}``."""
  c = config
  out = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
         "model.norm.weight": np.asarray(params["final_norm"], np.float32)}
  for ours, theirs in _layer_names(c).items():
    stacked = np.asarray(params["layers"][ours], np.float32)
    for i in range(c.num_layers):
      names = _per_layer(c, theirs, i)
      ws = stacked[i] if "{e}" in theirs else stacked[i][None]
      for name, w in zip(names, ws, strict=True):
        out[name] = np.ascontiguousarray(w.T if ours in _TRANSPOSED else w)
  if not c.tie_word_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"], np.float32).T)
  return out


def load_hf_checkpoint(path: str | os.PathLike, *, hf_config: Mapping[str, Any] | None = None,
                       dtype=jnp.float32) -> tuple[ModelConfig, Params]:
  """Loads a local Hugging Face checkpoint of a supported family; never touches the network.

  Args:
    path: a checkpoint directory (``config.json`` plus ``model.safetensors``, or shards listed
      by ``model.safetensors.index.json``, or a single other ``.safetensors`` file), or one
      ``.safetensors`` file (then give ``hf_config``).
    hf_config: the ``config.json`` contents, overriding the directory's.
    dtype: dtype of the returned weights (and of the model's activations and cache).

  Returns:
    ``(model, params)``: ``model`` is a :class:`~jax_paged_kv.models.llama.LlamaConfig`, a
    :class:`~jax_paged_kv.models.gemma2.Gemma2Config` or a
    :class:`~jax_paged_kv.models.gemma2.Gemma3Config`, each implementing the model protocol.

  Raises:
    FileNotFoundError: no config or no safetensors file.
    ValueError: an unsupported family or feature (:func:`config_from_hf`), or a missing,
      mis-shaped or unused tensor.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if hf_config is None:
      cfg_path = os.path.join(path, "config.json")
      if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found")
      with open(cfg_path) as f:
        hf_config = json.load(f)
    files, index = _checkpoint_files(path)
  else:
    files, index = [path], None
  if hf_config is None:
    raise FileNotFoundError(f"{path} is a single file: pass hf_config (the config.json dict)")
  config = config_from_hf(dict(hf_config), dtype=dtype)  # refuse before reading any tensor
  state: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for f in files:
    for name, w in read_safetensors(f).items():
      if name in state:  # two files would silently overwrite each other's tensor
        raise ValueError(f"tensor {name!r} is in both {origin[name]} and {f}")
      state[name], origin[name] = w, f
  if index is not None:
    for name, file in index.items():
      if origin.get(name) != os.path.join(path, file):
        raise ValueError(f"model.safetensors.index.json puts {name!r} in {file}, but "
                         f"{'no file' if name not in origin else origin[name]} holds it")
  if _model_type(hf_config) == "gemma3":
    state = _language_model_weights(state)
  return config, params_from_hf(state, config, fused=_model_type(hf_config) == "phi3")


def _language_model_weights(state: Mapping[str, Any]) -> dict[str, Any]:
  """A multimodal Gemma 3 checkpoint's language model under the names of a text-only one
  (``language_model.model.*``, or ``model.language_model.*``, becomes ``model.*``); the vision
  tower's and projector's tensors are left out, anything else is refused."""
  out: dict[str, Any] = {}
  image = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
           "model.multi_modal_projector.")
  for key, w in state.items():
    prefix = next((p for p in ("language_model.model.", "model.language_model.")
                   if key.startswith(p)), None)
    if prefix is not None:
      name = "model." + key.removeprefix(prefix)
    elif key in ("language_model.lm_head.weight", "lm_head.weight"):
      name = "lm_head.weight"
    elif key.startswith(image):
      continue
    else:
      raise ValueError(f"checkpoint tensor {key!r} is neither the language model's nor the "
                       "vision tower's")
    if name in out:
      raise ValueError(f"checkpoint holds {name!r} twice (two naming schemes)")
    out[name] = w
  return out


def _model_type(hf: Mapping[str, Any]) -> str | None:
  """``model_type``, or the family its ``architectures`` name (as :func:`config_from_hf`)."""
  if hf.get("model_type") is not None:
    return hf["model_type"]
  archs = hf.get("architectures") or []
  guess = [t for t, f in _FAMILIES.items() if f.architecture in archs]
  return guess[0] if len(guess) == 1 else None


def _checkpoint_files(path: str) -> tuple[list[str], dict[str, str] | None]:
  """A directory's weight files as transformers resolves them: ``model.safetensors``, else
  the files ``model.safetensors.index.json`` lists (returned as its ``weight_map``), else the
  directory's one ``.safetensors`` file. Any other layout is refused, never merged."""
  single = os.path.join(path, "model.safetensors")
  index_path = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(single):
    return [single], None
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index_path} has no weight_map")
    files = [os.path.join(path, n) for n in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise FileNotFoundError(f"{index_path} lists missing file(s) {missing}")
    return files, dict(weight_map)
  found = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
  if len(found) == 1:
    return [os.path.join(path, found[0])], None
  if not found:
    raise FileNotFoundError(f"no .safetensors files in {path}")
  raise ValueError(f"{path} holds {found} but neither model.safetensors nor "
                   "model.safetensors.index.json: which files form the checkpoint is ambiguous "
                   "(pass the one file with hf_config)")
