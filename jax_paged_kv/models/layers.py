"""Building blocks shared by the bundled models: RMSNorm, rotary embeddings with the Hugging Face
frequency rules, and projections with float32 accumulation.

Shapes use the package's vocabulary: ``batch`` rows, ``T`` new tokens per row, ``hidden`` model
width, ``heads`` attention heads, ``head_dim`` size of one head.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

ROPE_TYPES = ("linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How the rotary frequencies are rescaled (a Hugging Face ``rope_type`` other than default).

  Attributes:
    rope_type: ``"linear"`` divides every frequency by ``factor``; ``"llama3"`` divides the low
      frequencies by ``factor`` and smooths the middle band (Llama 3.1+); ``"dynamic"`` (dynamic
      NTK) equals plain RoPE up to ``max_position_embeddings``, beyond which Hugging Face
      recomputes the frequencies per call from the current length, so the keys already cached
      would no longer match; a model with it refuses caches longer than
      ``max_position_embeddings`` (:func:`check_rope_context`); ``"yarn"`` (YaRN: Qwen2.5 /
      Qwen3 long context, DeepSeek) interpolates the low frequencies by ``factor``, keeps the
      ones that turn more than ``beta_fast`` times over the pretraining context, ramps
      linearly between, and scales queries and keys by ``attention_factor`` (static: the same
      at every length, so cached keys stay valid).
    factor: the scaling factor (``> 0``).
    low_freq_factor, high_freq_factor: ``llama3`` only: wavelengths above
      ``original_max_position_embeddings / low_freq_factor`` are scaled, below
      ``original_max_position_embeddings / high_freq_factor`` kept, interpolated in between.
    original_max_position_embeddings: ``llama3`` and ``yarn``: the pretraining context.
    beta_fast, beta_slow: ``yarn`` only: the ramp's ends in rotations over the pretraining
      context (default 32 and 1).
    attention_factor: ``yarn`` only: multiplies cos and sin (default ``0.1 ln(factor) + 1``
      for ``factor > 1``, else 1: the YaRN paper's ``mscale``).
    truncate: ``yarn`` only: round the ramp's ends outwards to whole dimensions (default True).
  """

  rope_type: str
  factor: float
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None
  beta_fast: float | None = None
  beta_slow: float | None = None
  attention_factor: float | None = None
  truncate: bool | None = None

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_type={self.rope_type!r} is not one of {ROPE_TYPES}")
    if not self.factor > 0:
      raise ValueError(f"rope scaling factor={self.factor!r} must be positive")
    object.__setattr__(self, "factor", float(self.factor))
    llama3 = (self.low_freq_factor, self.high_freq_factor, self.original_max_position_embeddings)
    yarn = (self.beta_fast, self.beta_slow, self.attention_factor, self.truncate)
    if self.rope_type != "yarn" and any(v is not None for v in yarn):
      raise ValueError(f"beta_fast / beta_slow / attention_factor / truncate are yarn's, got "
                       f"{self}")
    if self.rope_type == "yarn":
      if self.original_max_position_embeddings is None or self.low_freq_factor is not None or (
          self.high_freq_factor is not None):
        raise ValueError("yarn rope scaling needs original_max_position_embeddings (and no "
                         f"low/high_freq_factor), got {self}")
      object.__setattr__(self, "original_max_position_embeddings",
                         int(self.original_max_position_embeddings))
      default = 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0
      for name, value in (("beta_fast", 32.0), ("beta_slow", 1.0), ("attention_factor", default)):
        v = value if getattr(self, name) is None else float(getattr(self, name))
        if not 0 < v < float("inf"):
          raise ValueError(f"yarn {name}={v!r} must be positive and finite")
        object.__setattr__(self, name, v)
      object.__setattr__(self, "truncate", True if self.truncate is None else bool(self.truncate))
    elif self.rope_type == "llama3":
      if any(v is None for v in llama3):
        raise ValueError("llama3 rope scaling needs low_freq_factor, high_freq_factor and "
                         f"original_max_position_embeddings, got {llama3}")
      if not 0 < self.low_freq_factor < self.high_freq_factor:
        raise ValueError(f"llama3 rope scaling needs 0 < {self.low_freq_factor=} < "
                         f"{self.high_freq_factor=}")
      object.__setattr__(self, "low_freq_factor", float(self.low_freq_factor))
      object.__setattr__(self, "high_freq_factor", float(self.high_freq_factor))
      object.__setattr__(self, "original_max_position_embeddings",
                         int(self.original_max_position_embeddings))
    elif any(v is not None for v in llama3):
      raise ValueError(f"rope_type={self.rope_type!r} takes only a factor, got {self}")


def rope_frequencies(head_dim: int, theta: float,
                     scaling: RopeScaling | None = None) -> np.ndarray:
  """The rotary inverse frequencies, float64 ``[head_dim / 2]`` (Hugging Face's formulas).

  Args:
    head_dim: size of one head (even).
    theta: the rotary base.
    scaling: an optional :class:`RopeScaling`.
  """
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None or scaling.rope_type == "dynamic":
    return inv_freq
  s = scaling
  if s.rope_type == "linear":
    return inv_freq / s.factor
  if s.rope_type == "yarn":  # Hugging Face's _compute_yarn_parameters
    def dim_of(rotations):  # the dimension that turns `rotations` times over the context
      return head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
          2 * math.log(theta))
    low, high = dim_of(s.beta_fast), dim_of(s.beta_slow)
    if s.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(head_dim // 2) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: extrapolate (the original frequency), 0: interpolate
    return inv_freq / s.factor * (1.0 - keep) + inv_freq * keep
  # llama3: low frequencies (long wavelengths) divided by factor, high ones kept, a smooth
  # interpolation between the two bands.
  old = s.original_max_position_embeddings
  low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled)


def check_rope_context(scaling: RopeScaling | None, max_position_embeddings: int,
                       max_seq_len: int) -> str | None:
  """Why a cache of ``max_seq_len`` tokens cannot run this RoPE exactly (None if it can)."""
  if scaling is not None and scaling.rope_type == "dynamic" and (
      max_seq_len > max_position_embeddings):
    return (f"dynamic RoPE scaling is exact only up to max_position_embeddings="
            f"{max_position_embeddings} tokens (beyond it Hugging Face recomputes the "
            f"frequencies per call); the cache allows max_seq_len={max_seq_len}")
  return None


def rope(x: Array, positions: Array, theta: float, scaling: RopeScaling | None = None) -> Array:
  """Rotary position embedding, "rotate half" convention (as Hugging Face Llama).

  Args:
    x: ``[batch, T, heads, head_dim]``.
    positions: ``int32[batch, T]`` absolute token positions.
    theta: the rotary base.
    scaling: optional frequency scaling (:class:`RopeScaling`).

  Returns:
    ``[batch, T, heads, head_dim]`` in ``x.dtype``.
  """
  d = x.shape[-1]
  inv_freq = rope_frequencies(d, theta, scaling)  # [head_dim / 2]
  ang = positions.astype(jnp.float32)[:, :, None] * jnp.asarray(inv_freq, jnp.float32)[None, None]
  mscale = 1.0 if scaling is None or scaling.attention_factor is None else scaling.attention_factor
  cos = jnp.cos(ang)[:, :, None, :] * mscale  # [batch, T, 1, head_dim / 2]
  sin = jnp.sin(ang)[:, :, None, :] * mscale
  xf = x.astype(jnp.float32)
  x1, x2 = xf[..., : d // 2], xf[..., d // 2:]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def rms_norm(x: Array, weight: Array, eps: float, *, offset: float = 0.0) -> Array:
  """``x / rms(x) * (offset + weight)`` over the last axis, computed in float32.

  Args:
    x: ``[..., hidden]``.
    weight: ``[hidden]``.
    eps: added to the mean square.
    offset: added to the weight (Gemma stores ``weight - 1``: ``offset=1``).

  Returns:
    ``[..., hidden]`` in ``x.dtype``.
  """
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
  w = weight.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,)) + offset
  return (w * y).astype(x.dtype)


def dot(x: Array, w: Array) -> Array:
  """``x [..., in] @ w [in, out]`` with float32 accumulation, result in ``x.dtype``."""
  return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def soft_cap(x: Array, cap: float | None) -> Array:
  """``cap * tanh(x / cap)`` (identity for ``cap=None``)."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def moe_swiglu(x: Array, router: Array, w_gate: Array, w_up: Array, w_down: Array, *,
               top_k: int, norm_topk_prob: bool) -> Array:
  """A sparse mixture-of-experts SwiGLU MLP (Mixtral, Qwen3-MoE), routed per token.

  Each token's router logits ``x @ router`` go through a float32 softmax; its ``top_k`` most
  likely experts run, and their outputs are summed weighted by those probabilities
  (renormalised to sum to one with ``norm_topk_prob``, as Mixtral does). The tokens are sorted by
  expert and each expert's rows multiplied as one group (:func:`jax.lax.ragged_dot`, MaxText's
  and megablox's layout): a backend with a grouped matmul reads only the experts some token
  chose; XLA:CPU lowers it to a masked product over every expert (exact, but ``E`` times the
  work of the routed rows, through a masked ``[E, rows, hidden]`` copy of them). Exact ties
  among router probabilities go to the lower expert index (:func:`jax.lax.top_k`), where
  ``torch.topk``'s choice is unspecified.

  Args:
    x: ``[..., hidden]``.
    router: ``[hidden, experts]``.
    w_gate, w_up: ``[experts, hidden, intermediate]``.
    w_down: ``[experts, intermediate, hidden]``.
    top_k: experts per token (static).
    norm_topk_prob: renormalise the chosen experts' probabilities.

  Returns:
    ``[..., hidden]`` in ``x.dtype``.
  """
  shape, dtype = x.shape, x.dtype
  h = x.reshape(-1, shape[-1])  # [N, hidden]
  n, e = h.shape[0], router.shape[-1]
  logits = jnp.einsum("nh,he->ne", h, router, preferred_element_type=jnp.float32)
  weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)  # [N, top_k]
  if norm_topk_prob:
    weights = weights / weights.sum(-1, keepdims=True)
  flat = experts.reshape(-1)  # [N * top_k], token-major
  order = jnp.argsort(flat, stable=True)  # rows grouped by expert
  token = order // top_k
  sizes = jnp.bincount(flat, length=e).astype(jnp.int32)

  def grouped(lhs, rhs):
    return jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)

  rows = h[token]  # [N * top_k, hidden]
  act = jax.nn.silu(grouped(rows, w_gate).astype(dtype)) * grouped(rows, w_up).astype(dtype)
  out = grouped(act, w_down).astype(dtype).astype(jnp.float32)  # [N * top_k, hidden]
  out = out * weights.reshape(-1)[order][:, None]
  y = jnp.zeros((n, shape[-1]), jnp.float32).at[token].add(out)
  return y.astype(dtype).reshape(shape)
