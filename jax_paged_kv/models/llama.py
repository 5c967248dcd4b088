"""A Llama-family decoder (Llama 2/3.x, Mistral, Mixtral, Phi-3, Qwen2/2.5, Qwen2-MoE, Qwen3,
Qwen3-MoE) in plain JAX on the paged cache.

Token embedding, RMSNorm, rotary embeddings (configurable base, optional Llama 3 / linear /
dynamic frequency scaling), grouped-query attention through :func:`~jax_paged_kv.paged_attention`
(optionally with a sliding window on all or some layers), a SwiGLU MLP or a sparse mixture of
SwiGLU experts (:func:`~.layers.moe_swiglu`, Mixtral / Qwen3-MoE) and optionally tied
embeddings. The layers' weights are stacked on a leading ``layers`` axis and the model scans
over them with a *traced* layer index, so one compiled layer body writes every layer's K/V into
the cache (layers with different windows are scanned in groups: :func:`~.base.scan_layers`).

:class:`LlamaConfig` implements the model protocol (:mod:`jax_paged_kv.models.base`): one call
of :meth:`LlamaConfig.forward` is one engine step for a batch of rows: it reserves room for the
new tokens once (:func:`~jax_paged_kv.reserve`), then per layer writes the new K/V
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
      q_norm     [layers, head_dim]                    (only with qk_norm=True)
      k_norm     [layers, head_dim]                    (only with qk_norm=True)
      wo         [layers, q_heads * head_dim, hidden]
      mlp_norm   [layers, hidden]
      w_gate     [layers, hidden, intermediate]
      w_up       [layers, hidden, intermediate]
      w_down     [layers, intermediate, hidden]
      (with num_experts=E: router [layers, hidden, E], moe_gate and moe_up
       [layers, E, hidden, moe_intermediate], moe_down [layers, E, moe_intermediate, hidden]
       instead of w_gate, w_up, w_down; with shared_expert_intermediate_size=S also
       shared_w_gate, shared_w_up [layers, hidden, S], shared_w_down [layers, S, hidden] and
       shared_router [layers, hidden, 1])
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
  moe_swiglu,
  rms_norm,
  rope,
)

Params = dict[str, Any]

__all__ = ["LlamaConfig", "Params", "RopeScaling", "attention_knobs",
           "check_params", "forward", "init_params", "lm_head", "param_shapes", "rms_norm", "rope"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static, hashable hyperparameters of a Llama-family decoder; the model itself.

  Implements the model protocol (:mod:`jax_paged_kv.models.base`): pass it wherever a model is
  taken (:class:`~jax_paged_kv.Engine`, :func:`~jax_paged_kv.generate`, the jitted steps).

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
    attention_bias: q/k/v projections have biases (Qwen2-style; no output-projection bias).
    qk_norm: an RMSNorm over ``head_dim`` (a weight per channel, shared by the heads) on every
      query and key head after the projection, before RoPE (Qwen3).
    max_position_embeddings: longest context the model was trained for (informational, but for
      ``dynamic`` RoPE scaling, which is exact only up to it).
    dtype: dtype of weights and activations (the cache's dtype must match).
    rope_scaling: optional rotary frequency scaling (:class:`RopeScaling`: Llama 3, linear,
      dynamic).
    num_experts: None for a dense MLP; else every layer's MLP is a sparse mixture of this many
      SwiGLU experts (Mixtral, Qwen3-MoE).
    num_experts_per_tok: experts each token runs (``top_k``).
    moe_intermediate_size: width of one expert's MLP (default ``intermediate_size``).
    norm_topk_prob: renormalise the chosen experts' router probabilities to sum to one
      (Mixtral always; Qwen3-MoE's ``norm_topk_prob``).
    shared_expert_intermediate_size: with experts, a SwiGLU MLP of this width that every token
      runs too, its output weighted by ``sigmoid(x @ shared_router)`` (Qwen2-MoE's shared
      expert); None: none.
    sliding_window: optional attention window ``w`` (Mistral, Qwen2 / Qwen3 with
      ``use_sliding_window``): a query sees the last ``w`` positions, itself included.
    layer_types: which layers use the window (Hugging Face's names, ``"sliding_attention"`` or
      ``"full_attention"`` per layer); None: every layer does when ``sliding_window`` is set.
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
  qk_norm: bool = False
  max_position_embeddings: int = 4096
  dtype: Any = jnp.float32
  rope_scaling: RopeScaling | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] | None = None
  num_experts: int | None = None
  num_experts_per_tok: int = 2
  moe_intermediate_size: int | None = None
  norm_topk_prob: bool = True
  shared_expert_intermediate_size: int | None = None

  def __post_init__(self):
    check_positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                               "num_heads", "num_kv_heads", "max_position_embeddings"))
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size={self.hidden_size} must be divisible by "
                         f"num_heads={self.num_heads} when head_dim is not given")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    check_positive_ints(self, ("head_dim",))  # a float such as 8.9 is refused, not truncated
    if self.head_dim < 2 or self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be a positive even int (rotary pairs)")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be divisible by "
                       f"num_kv_heads={self.num_kv_heads}")
    if not 0 < self.rope_theta < float("inf") or not 0 < self.rms_norm_eps < float("inf"):
      raise ValueError(f"rope_theta={self.rope_theta} and rms_norm_eps={self.rms_norm_eps} "
                       "must be positive and finite")
    object.__setattr__(self, "rope_theta", float(self.rope_theta))
    object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))
    dtype = jnp.dtype(self.dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"LlamaConfig.dtype must be floating, got {dtype}")
    object.__setattr__(self, "dtype", dtype)
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
      raise ValueError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
    check_windows(self)
    if self.num_experts is not None:
      if self.moe_intermediate_size is None:
        object.__setattr__(self, "moe_intermediate_size", self.intermediate_size)
      check_positive_ints(self, ("num_experts", "num_experts_per_tok", "moe_intermediate_size"))
      if self.num_experts_per_tok > self.num_experts:
        raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} > "
                         f"num_experts={self.num_experts}")
    elif self.moe_intermediate_size is not None:
      raise ValueError("moe_intermediate_size is set but num_experts is None (a dense MLP)")
    if self.shared_expert_intermediate_size is not None:
      if self.num_experts is None:
        raise ValueError("shared_expert_intermediate_size is set but num_experts is None")
      check_positive_ints(self, ("shared_expert_intermediate_size",))

  @property
  def layer_windows(self) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: global attention)."""
    return layer_windows(self)

  @classmethod
  def from_hf(cls, hf: dict[str, Any], *, dtype=jnp.float32) -> LlamaConfig:
    """Builds the config from a Hugging Face ``config.json`` dict (Llama, Mistral, Qwen2, Qwen3).

    See :func:`~jax_paged_kv.models.hf.config_from_hf` for what is read and what is refused.

    Raises:
      ValueError: a ``model_type`` this class does not cover, or any field that changes the
        model's math and is not implemented.
    """
    from jax_paged_kv.models.hf import config_from_hf  # hf imports this module

    config = config_from_hf(hf, dtype=dtype)
    if not isinstance(config, cls):
      raise ValueError(f"model_type={hf.get('model_type')!r} is a {type(config).__name__}, "
                       f"not a {cls.__name__}")
    return config

  def to_hf(self) -> dict[str, Any]:
    """The Hugging Face config fields describing this model.

    ``model_type`` is ``"qwen3_moe"`` with experts and ``qk_norm``, ``"mixtral"`` with experts
    and no ``qk_norm``, ``"qwen3"`` with ``qk_norm``, ``"qwen2"`` with ``attention_bias``
    (Hugging Face's Llama would add an output-projection bias), ``"mistral"`` with a window on
    every layer, else ``"llama"``.

    Raises:
      ValueError: a window on some layers only (Qwen2's ``max_window_layers`` spells some such
        patterns; this method does not), ``qk_norm`` with ``attention_bias`` (Qwen3's
        ``attention_bias`` adds an output-projection bias too), experts with
        ``attention_bias`` or (without ``qk_norm``) without ``norm_topk_prob``: no Hugging
        Face family spells them.
    """
    windows = set(self.layer_windows)
    if len(windows) > 1:
      raise ValueError("a sliding window on some layers only has no to_hf spelling")
    if self.qk_norm and self.attention_bias:
      raise ValueError("qk_norm with q/k/v biases only has no to_hf spelling (Qwen3's "
                       "attention_bias also puts a bias on o_proj)")
    moe = self.num_experts is not None
    if self.shared_expert_intermediate_size is not None:
      if self.qk_norm or self.sliding_window is not None:
        raise ValueError("a shared expert with qk_norm or a window has no to_hf spelling "
                         "(Qwen2-MoE)")
      out = self._to_hf_common()
      out.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                 num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                 norm_topk_prob=self.norm_topk_prob, qkv_bias=self.attention_bias,
                 moe_intermediate_size=self.moe_intermediate_size,
                 shared_expert_intermediate_size=self.shared_expert_intermediate_size)
      return out
    if moe and (self.attention_bias or not (self.qk_norm or self.norm_topk_prob)):
      raise ValueError("experts with attention_bias, or without qk_norm and norm_topk_prob, "
                       "have no to_hf spelling (Mixtral renormalises, Qwen3-MoE has q/k norms)")
    out = self._to_hf_common()
    if moe:
      out.update(num_experts_per_tok=self.num_experts_per_tok)
      if self.qk_norm:
        out.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
                   num_experts=self.num_experts, norm_topk_prob=self.norm_topk_prob,
                   moe_intermediate_size=self.moe_intermediate_size, attention_bias=False,
                   use_sliding_window=self.sliding_window is not None,
                   sliding_window=self.sliding_window)
      else:
        if self.moe_intermediate_size != self.intermediate_size:
          raise ValueError("Mixtral's experts are intermediate_size wide: "
                           f"moe_intermediate_size={self.moe_intermediate_size} has no to_hf "
                           "spelling without qk_norm")
        out.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                   num_local_experts=self.num_experts, sliding_window=self.sliding_window)
    elif self.qk_norm or self.attention_bias:
      window = self.sliding_window
      out.update(use_sliding_window=window is not None, sliding_window=window,
                 max_window_layers=0)
      if self.qk_norm:
        out.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], attention_bias=False)
      else:
        out.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    elif self.sliding_window is not None:
      out.update(model_type="mistral", architectures=["MistralForCausalLM"],
                 sliding_window=self.sliding_window)
    else:
      out.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False)
    return out

  def _to_hf_common(self) -> dict[str, Any]:
    out = dict(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim, rope_theta=self.rope_theta, rms_norm_eps=self.rms_norm_eps,
        tie_word_embeddings=self.tie_word_embeddings,
        max_position_embeddings=self.max_position_embeddings, hidden_act="silu")
    if self.rope_scaling is not None:
      out["rope_scaling"] = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items()
                             if v is not None}
    return out

  def cache_config(self, *, num_blocks: int | None = None, max_seqs: int, max_seq_len: int,
                   block_size: int = 16, budget_bytes: int | None = None,
                   strategy: CacheStrategy = CacheStrategy.PAGED) -> CacheConfig:
    """A :class:`~jax_paged_kv.CacheConfig` matching this model (:func:`~.base.cache_config_for`).

    Give either ``num_blocks`` or ``budget_bytes`` (then
    :meth:`~jax_paged_kv.CacheConfig.from_memory_budget` sizes the pool; for ``CONTIGUOUS``
    ``max_seqs`` is capped at the slabs that fit).
    """
    return cache_config_for(self, num_blocks=num_blocks, max_seqs=max_seqs,
                            max_seq_len=max_seq_len, block_size=block_size,
                            budget_bytes=budget_bytes, strategy=strategy)

  def forward(self, params: Params, cache: PagedKVCache, tokens: Array, seq_ids: Array,
              num_new: Array | None = None, *, implementation: str | None = None,
              max_blocks: int | None = None, all_logits: bool = False):
    """The model protocol's step: :func:`forward` with ``config=self``."""
    return forward(params, cache, tokens, seq_ids, num_new, config=self,
                   implementation=implementation, max_blocks=max_blocks, all_logits=all_logits)


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
  # Experts draw from a stream of their own, so the weights a dense model shares with them keep
  # the values they have without experts (and every dense model keeps its weights).
  expert_keys = iter(jax.random.split(jax.random.fold_in(key, 1), 8))

  def normal(shape, fan_in, stream=keys):
    std = scale / np.sqrt(fan_in)
    return (std * jax.random.normal(next(stream), shape, jnp.float32)).astype(c.dtype)

  layers = {
      "attn_norm": jnp.ones((L, H), c.dtype),
      "wq": normal((L, H, qd), H),
      "wk": normal((L, H, kvd), H),
      "wv": normal((L, H, kvd), H),
      "wo": normal((L, qd, H), qd),
      "mlp_norm": jnp.ones((L, H), c.dtype),
  }
  if c.num_experts is None:
    layers["w_gate"] = normal((L, H, c.intermediate_size), H)
    layers["w_up"] = normal((L, H, c.intermediate_size), H)
    layers["w_down"] = normal((L, c.intermediate_size, H), c.intermediate_size)
  else:
    e, mi = c.num_experts, c.moe_intermediate_size
    layers["router"] = normal((L, H, e), H, expert_keys)
    layers["moe_gate"] = normal((L, e, H, mi), H, expert_keys)
    layers["moe_up"] = normal((L, e, H, mi), H, expert_keys)
    layers["moe_down"] = normal((L, e, mi, H), mi, expert_keys)
  if c.shared_expert_intermediate_size is not None:
    si = c.shared_expert_intermediate_size
    layers["shared_w_gate"] = normal((L, H, si), H, expert_keys)
    layers["shared_w_up"] = normal((L, H, si), H, expert_keys)
    layers["shared_w_down"] = normal((L, si, H), si, expert_keys)
    layers["shared_router"] = normal((L, H, 1), H, expert_keys)
  if c.attention_bias:
    layers["bq"] = normal((L, qd), 1) * 0.1
    layers["bk"] = normal((L, kvd), 1) * 0.1
    layers["bv"] = normal((L, kvd), 1) * 0.1
  if c.qk_norm:
    layers["q_norm"] = jnp.ones((L, D), c.dtype)
    layers["k_norm"] = jnp.ones((L, D), c.dtype)
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
  check_param_tree(param_shapes(config), params)


# ---------------------------------------------------------------------------------------------
# the forward pass on the cache


def lm_head(params: Params, config: LlamaConfig, x: Array) -> Array:
  """Final norm and LM head: ``x [..., hidden]`` -> float32 logits ``[..., vocab]``."""
  h = rms_norm(x, params["final_norm"], config.rms_norm_eps)
  w = params["embed"].T if config.tie_word_embeddings else params["lm_head"]
  return jnp.einsum("...i,io->...o", h, w, preferred_element_type=jnp.float32)


def forward(params: Params, cache: PagedKVCache, tokens: Array, seq_ids: Array,
            num_new: Array | None = None, *, config: LlamaConfig,
            implementation: str | None = None, max_blocks: int | None = None,
            all_logits: bool = False):
  """One step of the model for a batch of rows, reading and extending the cache.

  Reserves room for ``num_new[b]`` tokens of each row once, then scans the layers: each layer
  writes its new K/V with :func:`~jax_paged_kv.write_kv` and then attends with
  :func:`~jax_paged_kv.paged_attention` (causal over the row's whole cached sequence, or over
  the last ``sliding_window`` positions on sliding layers). With ``qk_norm`` every query and
  key head is RMS-normalised before RoPE.

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
  why = check_rope_context(c.rope_scaling, c.max_position_embeddings, cache.config.max_seq_len)
  if why:
    raise CacheShapeError(why)
  step = begin_step(c, cache, tokens, seq_ids, num_new, max_blocks)
  b, t = step.tokens.shape
  knobs = attention_knobs(implementation, max_blocks, cache.config)
  nh, nkv, d = c.num_heads, c.num_kv_heads, c.head_dim

  def layer_fn(carry, w, layer, window):
    x, cache = carry
    h = rms_norm(x, w["attn_norm"], c.rms_norm_eps)
    q, k, v = dot(h, w["wq"]), dot(h, w["wk"]), dot(h, w["wv"])
    if c.attention_bias:
      q, k, v = q + w["bq"][None, None], k + w["bk"][None, None], v + w["bv"][None, None]
    # [batch, T, q_heads, head_dim] and [batch, T, kv_heads, head_dim]
    q, k = q.reshape(b, t, nh, d), k.reshape(b, t, nkv, d)
    if c.qk_norm:
      q = rms_norm(q, w["q_norm"], c.rms_norm_eps)
      k = rms_norm(k, w["k_norm"], c.rms_norm_eps)
    q = rope(q, step.positions, c.rope_theta, c.rope_scaling)
    k = rope(k, step.positions, c.rope_theta, c.rope_scaling)
    v = v.reshape(b, t, nkv, d)
    cache, attn, _ = write_and_attend(
        q, k.astype(cache.config.dtype), v.astype(cache.config.dtype), cache, step.slots,
        step.seq_ids, layer, q_lens=step.q_lens, sliding_window=window,
        implementation=implementation, fuse=FUSE_WRITE.value, **knobs)
    x = x + dot(attn.reshape(b, t, nh * d), w["wo"])
    h = rms_norm(x, w["mlp_norm"], c.rms_norm_eps)
    if c.num_experts is None:
      x = x + dot(jax.nn.silu(dot(h, w["w_gate"])) * dot(h, w["w_up"]), w["w_down"])
    else:
      x = x + moe_swiglu(h, w["router"], w["moe_gate"], w["moe_up"], w["moe_down"],
                         top_k=c.num_experts_per_tok, norm_topk_prob=c.norm_topk_prob)
      if c.shared_expert_intermediate_size is not None:  # Qwen2-MoE: gated, every token
        shared = dot(jax.nn.silu(dot(h, w["shared_w_gate"])) * dot(h, w["shared_w_up"]),
                     w["shared_w_down"])
        x = x + jax.nn.sigmoid(dot(h, w["shared_router"])) * shared
    return x, cache

  x = params["embed"][jnp.clip(step.tokens, 0, c.vocab_size - 1)]  # [batch, T, hidden]
  x, cache = scan_layers(layer_fn, (x, step.cache), params["layers"], c.layer_windows)
  if not all_logits:
    x = last_token(x, step.num_new)  # [batch, hidden]
  return cache, lm_head(params, c, x), step.status
