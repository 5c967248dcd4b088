"""Loading Hugging Face Llama-style checkpoints (safetensors or a dict of arrays), offline.

Reads ``config.json`` and the ``*.safetensors`` shards of a local checkpoint directory (or a
single ``.safetensors`` file plus a config dict) and maps the usual parameter names
(``model.layers.{i}.self_attn.q_proj.weight``, ...) onto :mod:`~jax_paged_kv.models.llama`'s
layout. ``torch.nn.Linear`` stores ``[out, in]``; our projections are ``[in, out]``, so every
projection is transposed. The safetensors reader is a few lines of numpy (``bfloat16`` through
``ml_dtypes``, which ships with JAX), so neither ``torch`` nor ``safetensors`` is needed.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jax_paged_kv.models.llama import LlamaConfig, Params, check_params

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}

# our name (inside "layers") -> HF name inside "model.layers.{i}."
_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
_TRANSPOSED = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}


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


def params_from_hf(state: Mapping[str, Any], config: LlamaConfig) -> Params:
  """Maps a Hugging Face Llama state dict onto this package's parameter layout.

  Args:
    state: ``{hf_name: array}`` (numpy, JAX or anything ``np.asarray`` takes; torch tensors
      via ``.numpy()`` first). Names may carry the ``model.`` prefix or not.
    config: the model config (e.g. :meth:`LlamaConfig.from_hf`).

  Returns:
    The parameter dict, cast to ``config.dtype``.

  Raises:
    ValueError: a missing tensor or a wrong shape (naming it).
  """
  def get(name):
    for key in (name, name.removeprefix("model.")):
      if key in state:
        return np.asarray(state[key])
    raise ValueError(f"checkpoint has no tensor {name!r}")

  c = config
  dt = c.dtype
  layers = {}
  for ours, theirs in _LAYER_NAMES.items():
    if ours in ("bq", "bk", "bv") and not c.attention_bias:
      continue
    per_layer = [get(f"model.layers.{i}.{theirs}") for i in range(c.num_layers)]
    if ours in _TRANSPOSED:
      per_layer = [w.T for w in per_layer]
    layers[ours] = jnp.asarray(np.stack(per_layer).astype(np.float32), dt)
  params = {
      "embed": jnp.asarray(get("model.embed_tokens.weight").astype(np.float32), dt),
      "layers": layers,
      "final_norm": jnp.asarray(get("model.norm.weight").astype(np.float32), dt),
  }
  if not c.tie_word_embeddings:
    params["lm_head"] = jnp.asarray(get("lm_head.weight").T.astype(np.float32), dt)
  check_params(c, params)
  return params


def params_to_hf(params: Params, config: LlamaConfig) -> dict[str, np.ndarray]:
  """The inverse of :func:`params_from_hf`: ``{hf_name: float32 numpy array}``."""
  c = config
  out = {"model.embed_tokens.weight": np.asarray(params["embed"], np.float32),
         "model.norm.weight": np.asarray(params["final_norm"], np.float32)}
  for ours, theirs in _LAYER_NAMES.items():
    if ours not in params["layers"]:
      continue
    stacked = np.asarray(params["layers"][ours], np.float32)
    for i in range(c.num_layers):
      w = stacked[i]
      out[f"model.layers.{i}.{theirs}"] = np.ascontiguousarray(w.T if ours in _TRANSPOSED else w)
  if not c.tie_word_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"], np.float32).T)
  return out


def load_hf_checkpoint(path: str | os.PathLike, *, hf_config: Mapping[str, Any] | None = None,
                       dtype=jnp.float32) -> tuple[LlamaConfig, Params]:
  """Loads a local Hugging Face Llama-style checkpoint; never touches the network.

  Args:
    path: a checkpoint directory (``config.json`` plus ``model.safetensors`` or sharded
      ``model-0000x-of-0000y.safetensors``), or one ``.safetensors`` file (then give
      ``hf_config``).
    hf_config: the ``config.json`` contents, overriding the directory's.
    dtype: dtype of the returned weights.

  Returns:
    ``(config, params)``.

  Raises:
    FileNotFoundError: no config or no safetensors file.
    ValueError: an unsupported architecture feature or a missing/mis-shaped tensor.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if hf_config is None:
      cfg_path = os.path.join(path, "config.json")
      if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found")
      with open(cfg_path) as f:
        hf_config = json.load(f)
    files = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if n.endswith(".safetensors"))
  else:
    files = [path]
  if hf_config is None:
    raise FileNotFoundError(f"{path} is a single file: pass hf_config (the config.json dict)")
  if not files:
    raise FileNotFoundError(f"no .safetensors files in {path}")
  state: dict[str, np.ndarray] = {}
  for f in files:
    state.update(read_safetensors(f))
  config = LlamaConfig.from_hf(dict(hf_config), dtype=dtype)
  return config, params_from_hf(state, config)
