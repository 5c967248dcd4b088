"""Gemma 2 and Gemma 3 (text) in plain JAX on the paged cache.

What sets Gemma 2 apart from Llama (all as in Hugging Face's ``modeling_gemma2``):

* the token embedding is scaled by ``sqrt(hidden_size)``, rounded to the model dtype;
* RMSNorm multiplies by ``1 + weight`` (weights are stored as offsets from one), and every layer
  has four of them: before and after attention, before and after the MLP;
* attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` (not ``head_dim ** -0.5``)
  and soft-capped, ``c * tanh(s / c)`` with ``c = attn_logit_softcapping``;
* layers alternate between a sliding window (even layers) and global attention (odd layers), as
  ``layer_types`` says; the layers are scanned in groups of the pattern's period
  (:func:`~jax_paged_kv.models.base.scan_layers`), so each attention call sees a static window;
* the MLP is GeGLU with the tanh approximation of GELU (``gelu_pytorch_tanh``);
* the final logits are soft-capped with ``final_logit_softcapping``; the LM head is tied to the
  embedding by default.

Gemma 3 (:class:`Gemma3Config`, Hugging Face's ``modeling_gemma3``, the text model) is the same
network with three changes, each a field here: queries and keys are RMS-normalised per head
before RoPE (``qk_norm``, ``1 + weight`` norms over ``head_dim``); the sliding layers have a
rotary base of their own (``sliding_rope_theta``, 10,000, without scaling, where the global
layers have ``rope_theta`` 1,000,000 and any ``rope_scaling``); and neither soft cap by default,
with five sliding layers per global one.

Parameters, in the layout of :func:`init_params`::

    embed          [vocab, hidden]
    layers/        every entry has a leading [layers] axis
      attn_norm    [layers, hidden]              input_layernorm (1 + w)
      wq           [layers, hidden, q_heads * head_dim]
      wk, wv       [layers, hidden, kv_heads * head_dim]
      wo           [layers, q_heads * head_dim, hidden]
      post_attn_norm [layers, hidden]            post_attention_layernorm
      mlp_norm     [layers, hidden]              pre_feedforward_layernorm
      w_gate, w_up [layers, hidden, intermediate]
      w_down       [layers, intermediate, hidden]
      post_mlp_norm [layers, hidden]             post_feedforward_layernorm
      q_norm, k_norm [layers, head_dim]          (only with qk_norm=True; 1 + w)
    final_norm     [hidden]
    lm_head        [hidden, vocab]               (absent with tie_word_embeddings=True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jax_paged_kv.attention.api import FUSE_WRITE, write_and_attend
from jax_paged_kv.cache.config import CacheConfig, CacheStrategy
from jax_paged_kv.cache.errors import CacheShapeError
from jax_paged_kv.cache.state import PagedKVCache
from jax_paged_kv.models.base import (
  attention_knobs,
  begin_step,
  cache_config_for,
  check_param_tree,
  check_positive_ints,
  check_windows,
  last_token,
  layer_windows,
  scan_layers,
)
from jax_paged_kv.models.layers import (
  RopeScaling,
  check_rope_context,
  dot,
  rms_norm,
  rope,
  soft_cap,
)

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
  """Static, hashable hyperparameters of a Gemma 2 decoder; the model itself.

  Implements the model protocol (:mod:`jax_paged_kv.models.base`).

  Attributes:
    vocab_size: tokens in the vocabulary.
    hidden_size: model width.
    intermediate_size: width of the GeGLU MLP.
    num_layers: decoder layers.
    num_heads: query heads.
    num_kv_heads: key/value heads (``num_heads`` must be a multiple).
    head_dim: size of one head (Gemma 2 sets it; default ``hidden_size // num_heads``).
    query_pre_attn_scalar: attention scores are scaled by ``query_pre_attn_scalar ** -0.5``.
    attn_logit_softcapping: soft cap of the attention scores (None: none).
    final_logit_softcapping: soft cap of the output logits (None: none).
    sliding_window: the window of the sliding layers (a query sees the last ``sliding_window``
      positions, itself included).
    layer_types: ``"sliding_attention"`` or ``"full_attention"`` per layer (default: even layers
      slide, odd layers attend globally, as Hugging Face's default).
    rope_theta: rotary embedding base (of every layer, or with ``sliding_rope_theta`` of the
      global ones).
    rope_scaling: optional rotary frequency scaling (:class:`~.layers.RopeScaling`), of the
      layers that use ``rope_theta``.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: the LM head reuses the token embedding (Gemma 2 does).
    max_position_embeddings: longest context the model was trained for (informational).
    dtype: dtype of weights and activations (the cache's dtype must match).
    qk_norm: RMSNorm (``1 + weight`` over ``head_dim``) on every query and key head before
      RoPE (Gemma 3).
    sliding_rope_theta: rotary base of the sliding layers, without scaling (Gemma 3's
      ``rope_local_base_freq``); None: they use ``rope_theta`` and ``rope_scaling`` too.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int | None = None
  query_pre_attn_scalar: float = 256.0
  attn_logit_softcapping: float | None = 50.0
  final_logit_softcapping: float | None = 30.0
  sliding_window: int | None = 4096
  layer_types: tuple[str, ...] | None = None
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 8192
  dtype: Any = jnp.float32
  qk_norm: bool = False
  sliding_rope_theta: float | None = None

  def __post_init__(self):
    check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                               "num_heads", "num_kv_heads", "max_position_embeddings"))
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    check_positive_ints(self, ("head_dim",))
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even (rotary pairs)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be divisible by "
                       f"num_kv_heads={self.num_kv_heads}")
    for name in ("query_pre_attn_scalar", "rope_theta", "rms_norm_eps", "attn_logit_softcapping",
                 "final_logit_softcapping", "sliding_rope_theta"):
      value = getattr(self, name)
      if value is None and name in ("attn_logit_softcapping", "final_logit_softcapping",
                                    "sliding_rope_theta"):
        continue
      if isinstance(value, bool) or not 0 < value < float("inf"):
        raise ValueError(f"{type(self).__name__}.{name} must be positive and finite, "
                         f"got {value!r}")
      object.__setattr__(self, name, float(value))
    if self.layer_types is None:
      object.__setattr__(self, "layer_types", tuple(
          "sliding_attention" if i % 2 == 0 else "full_attention"
          for i in range(self.num_layers)))
    check_windows(self)
    dtype = jnp.dtype(self.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"{type(self).__name__}.dtype must be floating, got {dtype}")
    object.__setattr__(self, "dtype", dtype)
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")

  @property
  def layer_windows(self) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: global attention)."""
    return layer_windows(self)

  def layer_rope(self, window: int | None) -> tuple[float, RopeScaling | None]:
    """``(theta, scaling)`` of the rotary embedding of a layer with this window (None: a
    global layer)."""
    if window is not None and self.sliding_rope_theta is not None:
      return self.sliding_rope_theta, None
    return self.rope_theta, self.rope_scaling

  def cache_config(self, *, num_blocks: int | None = None, max_seqs: int, max_seq_len: int,
                   block_size: int = 16, budget_bytes: int | None = None,
                   strategy: CacheStrategy = CacheStrategy.PAGED) -> CacheConfig:
    """A :class:`~jax_paged_kv.CacheConfig` matching this model (see
    :func:`~jax_paged_kv.models.base.cache_config_for`)."""
    return cache_config_for(self, num_blocks=num_blocks, max_seqs=max_seqs,
                            max_seq_len=max_seq_len, block_size=block_size,
                            budget_bytes=budget_bytes, strategy=strategy)

  def forward(self, params: Params, cache: PagedKVCache, tokens: Array, seq_ids: Array,
              num_new: Array | None = None, *, implementation: str | None = None,
              max_blocks: int | None = None, all_logits: bool = False):
    """The model protocol's step: :func:`forward` with ``config=self``."""
    return forward(params, cache, tokens, seq_ids, num_new, config=self,
                   implementation=implementation, max_blocks=max_blocks, all_logits=all_logits)


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
  """Gemma 3's default layer types: every ``pattern``-th layer global, the others sliding
  (Hugging Face's ``sliding_window_pattern``)."""
  return tuple("sliding_attention" if (i + 1) % pattern else "full_attention"
               for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class Gemma3Config(Gemma2Config):
  """A Gemma 3 text decoder (Hugging Face's ``gemma3_text``, ``Gemma3ForCausalLM``).

  :class:`Gemma2Config` with Gemma 3's defaults: q/k norms, a rotary base of 1,000,000 on the
  global layers and 10,000 on the sliding ones, no soft caps, a 4096 window on five layers of
  every six (``layer_types`` default: :func:`gemma3_layer_types`).
  """

  query_pre_attn_scalar: float = 256.0
  attn_logit_softcapping: float | None = None
  final_logit_softcapping: float | None = None
  rope_theta: float = 1_000_000.0
  max_position_embeddings: int = 131072
  qk_norm: bool = True
  sliding_rope_theta: float | None = 10_000.0

  def __post_init__(self):
    if self.layer_types is None and isinstance(self.num_layers, int) and self.num_layers > 0:
      object.__setattr__(self, "layer_types", gemma3_layer_types(self.num_layers))
    super().__post_init__()


# ---------------------------------------------------------------------------------------------
# parameters


def init_params(config: Gemma2Config, key: Array, *, scale: float = 1.0) -> Params:
  """Random weights (normal, fan-in scaled; norm offsets small and random), in the layout above.

  Args:
    config: the model config.
    key: a PRNG key.
    scale: multiplies every projection's standard deviation.

  Returns:
    The parameter dict, arrays in ``config.dtype``.
  """
  c = config
  L, H, D = c.num_layers, c.hidden_size, c.head_dim
  qd, kvd = c.num_heads * D, c.num_kv_heads * D
  keys = iter(jax.random.split(key, 16))

  def normal(shape, std):
    return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(c.dtype)

  def proj(shape, fan_in):
    return normal(shape, scale / np.sqrt(fan_in))

  layers = {
      "attn_norm": normal((L, H), 0.1),
      "wq": proj((L, H, qd), H),
      "wk": proj((L, H, kvd), H),
      "wv": proj((L, H, kvd), H),
      "wo": proj((L, qd, H), qd),
      "post_attn_norm": normal((L, H), 0.1),
      "mlp_norm": normal((L, H), 0.1),
      "w_gate": proj((L, H, c.intermediate_size), H),
      "w_up": proj((L, H, c.intermediate_size), H),
      "w_down": proj((L, c.intermediate_size, H), c.intermediate_size),
      "post_mlp_norm": normal((L, H), 0.1),
  }
  if c.qk_norm:
    layers["q_norm"] = normal((L, D), 0.1)
    layers["k_norm"] = normal((L, D), 0.1)
  params = {
      "embed": normal((c.vocab_size, H), 1.0 / np.sqrt(H)),
      "layers": layers,
      "final_norm": normal((H,), 0.1),
  }
  if not c.tie_word_embeddings:
    params["lm_head"] = proj((H, c.vocab_size), H)
  return params


def param_shapes(config: Gemma2Config) -> Params:
  """``jax.ShapeDtypeStruct`` of every parameter."""
  return jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))


def check_params(config: Gemma2Config, params: Params) -> None:
  """Raises ``ValueError`` naming the first parameter whose presence, shape or dtype is wrong."""
  check_param_tree(param_shapes(config), params)


# ---------------------------------------------------------------------------------------------
# the forward pass on the cache


def embed_scale(config: Gemma2Config) -> Array:
  """``sqrt(hidden_size)`` rounded to the model dtype, as Hugging Face multiplies it."""
  return jnp.asarray(math.sqrt(config.hidden_size), config.dtype)


def lm_head(params: Params, config: Gemma2Config, x: Array) -> Array:
  """Final norm, LM head and final soft cap: ``x [..., hidden]`` -> float32 ``[..., vocab]``."""
  h = rms_norm(x, params["final_norm"], config.rms_norm_eps, offset=1.0)
  w = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
  logits = jnp.einsum("...i,io->...o", h, w, preferred_element_type=jnp.float32)
  return soft_cap(logits, config.final_logit_softcapping)


def forward(params: Params, cache: PagedKVCache, tokens: Array, seq_ids: Array,
            num_new: Array | None = None, *, config: Gemma2Config,
            implementation: str | None = None, max_blocks: int | None = None,
            all_logits: bool = False):
  """One step of Gemma 2 or Gemma 3 for a batch of rows, reading and extending the cache.

  Same contract as :func:`jax_paged_kv.models.llama.forward`.

  Args:
    params: the parameters.
    cache: the cache; its config must match the model (layers, kv heads, head_dim, dtype).
    tokens: ``int32[batch, T]`` new tokens; row ``b`` uses ``tokens[b, :num_new[b]]``.
    seq_ids: ``int32[batch]`` active sequence slots; negative ids are padding rows.
    num_new: ``int32[batch]`` valid new tokens per row, in ``[0, T]`` (default ``T``).
    config: the model config (static).
    implementation: the paged attention implementation (None: the backend's best).
    max_blocks: static; XLA attention reads only the first ``max_blocks`` block-table columns.
    all_logits: return logits of every position instead of only each row's last new token.

  Returns:
    ``(cache, logits float32[batch, vocab] (or [batch, T, vocab]), status int32[batch])``.

  Raises:
    CacheShapeError: the cache or token shapes do not fit the model (trace time).
  """
  c = config
  why = check_rope_context(c.rope_scaling, c.max_position_embeddings, cache.config.max_seq_len)
  if why:
    raise CacheShapeError(why)
  step = begin_step(c, cache, tokens, seq_ids, num_new, max_blocks)
  b, t = step.tokens.shape
  knobs = attention_knobs(implementation, max_blocks, cache.config)
  nh, nkv, d = c.num_heads, c.num_kv_heads, c.head_dim
  eps = c.rms_norm_eps
  scale = c.query_pre_attn_scalar ** -0.5

  def layer_fn(carry, w, layer, window):
    x, cache = carry
    h = rms_norm(x, w["attn_norm"], eps, offset=1.0)
    q, k, v = dot(h, w["wq"]), dot(h, w["wk"]), dot(h, w["wv"])
    # [batch, T, q_heads, head_dim] and [batch, T, kv_heads, head_dim]
    q, k = q.reshape(b, t, nh, d), k.reshape(b, t, nkv, d)
    if c.qk_norm:
      q = rms_norm(q, w["q_norm"], eps, offset=1.0)
      k = rms_norm(k, w["k_norm"], eps, offset=1.0)
    theta, scaling = c.layer_rope(window)
    q = rope(q, step.positions, theta, scaling)
    k = rope(k, step.positions, theta, scaling)
    v = v.reshape(b, t, nkv, d)
    cache, attn, _ = write_and_attend(
        q, k.astype(cache.config.dtype), v.astype(cache.config.dtype), cache, step.slots,
        step.seq_ids, layer, q_lens=step.q_lens, scale=scale, soft_cap=c.attn_logit_softcapping,
        sliding_window=window, implementation=implementation, fuse=FUSE_WRITE.value, **knobs)
    attn = dot(attn.reshape(b, t, nh * d), w["wo"])
    x = x + rms_norm(attn, w["post_attn_norm"], eps, offset=1.0)
    h = rms_norm(x, w["mlp_norm"], eps, offset=1.0)
    gate = jax.nn.gelu(dot(h, w["w_gate"]), approximate=True)
    mlp = dot(gate * dot(h, w["w_up"]), w["w_down"])
    x = x + rms_norm(mlp, w["post_mlp_norm"], eps, offset=1.0)
    return x, cache

  x = params["embed"][jnp.clip(step.tokens, 0, c.vocab_size - 1)] * embed_scale(c)
  x, cache = scan_layers(layer_fn, (x, step.cache), params["layers"], c.layer_windows)
  if not all_logits:
    x = last_token(x, step.num_new)  # [batch, hidden]
  return cache, lm_head(params, c, x), step.status
