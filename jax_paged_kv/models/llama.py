"""A Llama-family decoder in plain JAX that keeps its keys and values in the paged cache.

Token embedding, RMSNorm, rotary embeddings (configurable base), grouped-query attention through
:func:`~jax_paged_kv.paged_attention`, a SwiGLU MLP and optionally tied embeddings. The layers'
weights are stacked on a leading ``layers`` axis and the model scans over them with a *traced*
layer index, so one compiled layer body writes every layer's K/V into the cache.

One call of :func:`forward` is one engine step for a batch of rows: it reserves room for the new
tokens once (:func:`~jax_paged_kv.reserve`), then per layer writes the new K/V
(:func:`~jax_paged_kv.write_kv`) *before* attending over the cache
(:func:`~jax_paged_kv.paged_attention`). Rows may be prefill chunks or single decode tokens: row
``b`` contributes ``num_new[b] <= T`` tokens (ragged), and a row whose sequence id is negative is
padding.

Parameters are a plain dict of arrays (a pytree), in the layout of :func:`init_params`::

    embed        [vocab, hidden]
    layers/      every entry has a leading [layers] axis
      attn_norm  [layers, hidden]
      wq         [layers, hidden, q_heads * head_dim]
      wk, wv     [layers, hidden, kv_heads * head_dim]
      bq, bk, bv [layers, heads * head_dim]            (only with attention_bias=True)
      wo         [layers, q_heads * head_dim, hidden]
      mlp_norm   [layers, hidden]
      w_gate     [layers, hidden, intermediate]
      w_up       [layers, hidden, intermediate]
      w_down     [layers, intermediate, hidden]
    final_norm   [hidden]
    lm_head      [hidden, vocab]                        (absent with tie_word_embeddings=True)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jax_paged_kv.attention import default_implementation, paged_attention
from jax_paged_kv.cache import gather_tables, reserve, write_kv
from jax_paged_kv.config import CacheConfig, CacheStrategy
from jax_paged_kv.errors import CacheShapeError
from jax_paged_kv.state import PagedKVCache

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static, hashable hyperparameters of a Llama-family decoder.

  Attributes:
    vocab_size: tokens in the vocabulary.
    hidden_size: model width.
    intermediate_size: width of the SwiGLU MLP.
    num_layers: decoder layers.
    num_heads: query heads.
    num_kv_heads: key/value heads (``num_heads`` must be a multiple; 1 is MQA).
    head_dim: size of one head (default ``hidden_size // num_heads``).
    rope_theta: rotary embedding base.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: the LM head reuses the token embedding.
    attention_bias: q/k/v projections have biases (Qwen2-style).
    max_position_embeddings: longest context the model was trained for (informational).
    dtype: dtype of weights and activations (the cache's dtype must match).
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  max_position_embeddings: int = 4096
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, got {name}={value!r}")
      object.__setattr__(self, name, int(value))
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size={self.hidden_size} must be divisible by "
                         f"num_heads={self.num_heads} when head_dim is not given")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if int(self.head_dim) < 2 or int(self.head_dim) % 2:
      raise ValueError(f"head_dim={self.head_dim} must be a positive even int (rotary pairs)")
    object.__setattr__(self, "head_dim", int(self.head_dim))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be divisible by "
                       f"num_kv_heads={self.num_kv_heads}")
    if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
      raise ValueError(f"rope_theta={self.rope_theta} and rms_norm_eps={self.rms_norm_eps} "
                       "must be positive")
    object.__setattr__(self, "rope_theta", float(self.rope_theta))
    object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))
    dtype = jnp.dtype(self.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"LlamaConfig.dtype must be floating, got {dtype}")
    object.__setattr__(self, "dtype", dtype)

  @classmethod
  def from_hf(cls, hf: dict[str, Any], *, dtype=jnp.float32) -> LlamaConfig:
    """Builds the config from a Hugging Face ``config.json`` dict (Llama, Mistral, Qwen2 style).

    Reads ``vocab_size``, ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``rope_theta`` (or
    ``rope_parameters["rope_theta"]``), ``rms_norm_eps``, ``tie_word_embeddings``,
    ``attention_bias`` and ``max_position_embeddings``.

    Raises:
      ValueError: a feature this model does not implement (non-SiLU activation, RoPE scaling,
        MLP bias, sliding-window attention).
    """
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
      raise ValueError(f"hidden_act={act!r} is not supported (SwiGLU with SiLU only)")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
      raise ValueError(f"rope scaling {rope_type!r} is not supported (plain RoPE only)")
    if hf.get("mlp_bias"):
      raise ValueError("mlp_bias=True is not supported")
    if hf.get("use_sliding_window"):
      raise ValueError("sliding-window attention checkpoints are not supported")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    heads = hf["num_attention_heads"]
    return cls(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=theta,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", hf.get("model_type") == "qwen2")),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        dtype=dtype,
    )

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face ``LlamaConfig`` fields describing this model."""
    return dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=self.vocab_size,
        hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
        rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
        tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
        max_position_embeddings=self.max_position_embeddings, hidden_act="silu")

  def cache_config(self, *, num_blocks: int | None = None, max_seqs: int, max_seq_len: int,
                   block_size: int = 16, budget_bytes: int | None = None,
                   strategy: CacheStrategy = CacheStrategy.PAGED) -> CacheConfig:
    """A :class:`~jax_paged_kv.CacheConfig` matching this model's layers, heads and dtype.

    Give either ``num_blocks`` or ``budget_bytes`` (then
    :meth:`~jax_paged_kv.CacheConfig.from_memory_budget` sizes the pool; for ``CONTIGUOUS``
    ``max_seqs`` is capped at the slabs that fit).
    """
    common = dict(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                  head_dim=self.head_dim, max_seq_len=max_seq_len, block_size=block_size,
                  dtype=self.dtype)
    if budget_bytes is not None:
      strategy = CacheStrategy(strategy)
      if strategy is CacheStrategy.CONTIGUOUS:
        probe = CacheConfig(num_blocks=2, max_seqs=1, **common)
        fit = (budget_bytes // probe.block_bytes - 1) // probe.max_blocks_per_seq
        max_seqs = min(max_seqs, max(fit, 1))
      return CacheConfig.from_memory_budget(budget_bytes, max_seqs=max_seqs, strategy=strategy,
                                            **common)
    if num_blocks is None:
      raise ValueError("give num_blocks or budget_bytes")
    return CacheConfig(num_blocks=num_blocks, max_seqs=max_seqs, strategy=strategy, **common)


# ---------------------------------------------------------------------------------------------
# parameters


def init_params(config: LlamaConfig, key: Array, *, scale: float = 1.0) -> Params:
  """Random weights (normal, fan-in scaled; norms at 1), in the layout of the module docstring.

  Args:
    config: the model config.
    key: a PRNG key.
    scale: multiplies every projection's standard deviation (``scale > 1`` gives peakier
      logits, which random-weight demos use to get less uniform next-token distributions).

  Returns:
    The parameter dict, arrays in ``config.dtype``.
  """
  c = config
  L, H, D = c.num_layers, c.hidden_size, c.head_dim
  qd, kvd = c.num_heads * D, c.num_kv_heads * D
  keys = iter(jax.random.split(key, 12))

  def normal(shape, fan_in):
    std = scale / np.sqrt(fan_in)
    return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(c.dtype)

  layers = {
      "attn_norm": jnp.ones((L, H), c.dtype),
      "wq": normal((L, H, qd), H),
      "wk": normal((L, H, kvd), H),
      "wv": normal((L, H, kvd), H),
      "wo": normal((L, qd, H), qd),
      "mlp_norm": jnp.ones((L, H), c.dtype),
      "w_gate": normal((L, H, c.intermediate_size), H),
      "w_up": normal((L, H, c.intermediate_size), H),
      "w_down": normal((L, c.intermediate_size, H), c.intermediate_size),
  }
  if c.attention_bias:
    layers["bq"] = normal((L, qd), 1) * 0.1
    layers["bk"] = normal((L, kvd), 1) * 0.1
    layers["bv"] = normal((L, kvd), 1) * 0.1
  params = {
      "embed": normal((c.vocab_size, H), 1),
      "layers": layers,
      "final_norm": jnp.ones((H,), c.dtype),
  }
  if not c.tie_word_embeddings:
    params["lm_head"] = normal((H, c.vocab_size), H)
  return params


def param_shapes(config: LlamaConfig) -> Params:
  """``jax.ShapeDtypeStruct`` of every parameter (for checking loaded weights and exporting)."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def check_params(config: LlamaConfig, params: Params) -> None:
  """Raises ``ValueError`` naming the first parameter whose presence, shape or dtype is wrong."""
  want = param_shapes(config)
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  flat_have = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path in flat_want.keys() | flat_have.keys():
    name = jax.tree_util.keystr(path)
    if path not in flat_have:
      raise ValueError(f"parameter {name} is missing")
    if path not in flat_want:
      raise ValueError(f"unexpected parameter {name}")
    w, h = flat_want[path], flat_have[path]
    if tuple(h.shape) != tuple(w.shape) or jnp.dtype(h.dtype) != w.dtype:
      raise ValueError(f"parameter {name} is {jnp.dtype(h.dtype)}{list(h.shape)}, expected "
                       f"{w.dtype}{list(w.shape)}")


# ---------------------------------------------------------------------------------------------
# building blocks


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  """``x / rms(x) * weight`` over the last axis, computed in float32.

  Args:
    x: ``[..., hidden]``.
    weight: ``[hidden]``.
    eps: added to the mean square.

  Returns:
    ``[..., hidden]`` in ``x.dtype``.
  """
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  w = weight.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
  return (w * y).astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary position embedding, "rotate half" convention (as Hugging Face Llama).

  Args:
    x: ``[batch, T, heads, head_dim]``.
    positions: ``int32[batch, T]`` absolute token positions.
    theta: the rotary base.

  Returns:
    ``[batch, T, heads, head_dim]`` in ``x.dtype``.
  """
  d = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))  # [head_dim / 2]
  ang = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq, jnp.float32)[None, None]
  cos = jnp.cos(ang)[:, :, None, :]  # [batch, T, 1, head_dim / 2]
  sin = jnp.sin(ang)[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _dot(x: Array, w: Array) -> Array:
  """``x @ w`` with float32 accumulation, result in ``x.dtype``."""
  return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def lm_head(params: Params, config: LlamaConfig, x: Array) -> Array:
  """Final norm and LM head: ``x [..., hidden]`` -> float32 logits ``[..., vocab]``."""
  h = rms_norm(x, params["final_norm"], config.rms_norm_eps)
  w = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
  return jnp.einsum("...i,io->...o", h, w, preferred_element_type=jnp.float32)


# ---------------------------------------------------------------------------------------------
# the forward pass on the cache


def attention_knobs(implementation: str | None, max_blocks: int | None,
                    cache_config: CacheConfig | None = None) -> dict[str, Any]:
  """Keyword knobs for :func:`paged_attention`: ``max_blocks`` only reaches the XLA path."""
  name = implementation or default_implementation(config=cache_config)
  return {"max_blocks": int(max_blocks)} if (max_blocks and name == "xla") else {}


def forward(params: Params, cache: PagedKVCache, tokens: Array, seq_ids: Array,
            num_new: Array | None = None, *, config: LlamaConfig,
            implementation: str | None = None, max_blocks: int | None = None,
            all_logits: bool = False):
  """One step of the model for a batch of rows, reading and extending the cache.

  Reserves room for ``num_new[b]`` tokens of each row once, then scans the layers: each layer
  writes its new K/V with :func:`~jax_paged_kv.write_kv` and then attends with
  :func:`~jax_paged_kv.paged_attention` (causal over the row's whole cached sequence).

  Args:
    params: the parameters.
    cache: the cache; its config must match the model (layers, kv heads, head_dim, dtype).
    tokens: ``int32[batch, T]`` new tokens; row ``b`` uses ``tokens[b, :num_new[b]]``.
    seq_ids: ``int32[batch]`` active sequence slots; negative ids are padding rows.
    num_new: ``int32[batch]`` valid new tokens per row, in ``[0, T]`` (default ``T``).
    config: the model config (static).
    implementation: the paged attention implementation (None: the backend's best).
    max_blocks: static; XLA attention reads only the first ``max_blocks`` block-table columns.
      Every row's length after this step must be ``<= max_blocks * block_size``.
    all_logits: return logits of every position instead of only each row's last new token.

  Returns:
    ``(cache, logits, status)``: ``logits`` float32 ``[batch, vocab]`` at each row's last new
    token (``[batch, T, vocab]`` with ``all_logits``; rows with ``num_new == 0`` and padding rows
    hold meaningless values); ``status`` is :func:`~jax_paged_kv.reserve`'s ``int32[batch]``.
    If any row fails (e.g. the pool is exhausted), nothing is written and the cache comes back
    unchanged except for its telemetry counters.

  Raises:
    CacheShapeError: the cache or token shapes do not fit the model (trace time).
  """
  c = config
  cc = cache.config
  if (cc.num_layers, cc.num_kv_heads, cc.head_dim) != (c.num_layers, c.num_kv_heads,
                                                        c.head_dim):
    raise CacheShapeError(
        f"cache ({cc.num_layers=}, {cc.num_kv_heads=}, {cc.head_dim=}) does not fit the model "
        f"({c.num_layers=}, {c.num_kv_heads=}, {c.head_dim=})")
  if cc.dtype != c.dtype:
    raise CacheShapeError(f"cache dtype {cc.dtype} differs from the model dtype {c.dtype}")
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise CacheShapeError(f"tokens must be int32[batch, T], got {tokens.dtype}"
                          f"{list(tokens.shape)}")
  b, t = tokens.shape
  seq_ids = jnp.asarray(seq_ids, jnp.int32)
  if seq_ids.shape != (b,):
    raise CacheShapeError(f"seq_ids must have shape ({b},), got {seq_ids.shape}")
  num_new = jnp.full((b,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
  if num_new.shape != (b,):
    raise CacheShapeError(f"num_new must have shape ({b},), got {num_new.shape}")

  cache, slots, status = reserve(cache, seq_ids, num_new, max_new=t)  # slots [batch, T]
  ok = jnp.all(status == 0)
  _, lens = gather_tables(cache, seq_ids)  # [batch], lengths including the new tokens
  q_lens = jnp.where(ok & (seq_ids >= 0), num_new, 0)
  positions = (lens - q_lens)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [batch, T]
  knobs = attention_knobs(implementation, max_blocks, cache.config)
  nh, nkv, d = c.num_heads, c.num_kv_heads, c.head_dim

  x = params["embed"][jnp.clip(tokens, 0, c.vocab_size - 1)]  # [batch, T, hidden]

  def layer_fn(carry, inputs):
    x, cache = carry
    w, layer = inputs
    h = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
    q, k, v = _dot(h, w["wq"]), _dot(h, w["wk"]), _dot(h, w["wv"])
    if c.attention_bias:
      q, k, v = q + w["bq"][None, None], k + w["bk"][None, None], v + w["bv"][None, None]
    q = rope(q.reshape(b, t, nh, d), positions, c.rope_theta)  # [batch, T, q_heads, head_dim]
    k = rope(k.reshape(b, t, nkv, d), positions, c.rope_theta)  # [batch, T, kv_heads, head_dim]
    v = v.reshape(b, t, nkv, d)
    cache, _ = write_kv(cache, slots, k.astype(cc.dtype), v.astype(cc.dtype), layer,
                       seq_ids=seq_ids)
    attn = paged_attention(q, cache, seq_ids, layer, q_lens=q_lens,
                           implementation=implementation, **knobs)
    x = x + _dot(attn.reshape(b, t, nh * d), w["wo"])
    h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
    x = x + _dot(jax.nn.silu(_dot(h, w["w_gate"])) * _dot(h, w["w_up"]), w["w_down"])
    return (x, cache), None

  layer_ids = jnp.arange(c.num_layers, dtype=jnp.int32)
  (x, cache), _ = jax.lax.scan(layer_fn, (x, cache), (params["layers"], layer_ids))
  if not all_logits:
    last = jnp.clip(num_new - 1, 0, t - 1)
    x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # [batch, hidden]
  return cache, lm_head(params, c, x), status
