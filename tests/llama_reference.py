"""Independent float64 numpy oracles of the bundled models: full recomputation, no cache.

Shared by tests/test_llama.py, test_families.py, test_decoding.py and test_engine.py. Written
from the Hugging Face definitions (``modeling_llama``, ``modeling_mistral``, ``modeling_mixtral``,
``modeling_qwen2``, ``modeling_qwen2_moe``, ``modeling_qwen3``, ``modeling_qwen3_moe``,
``modeling_gemma2``, ``modeling_gemma3``, ``modeling_rope_utils``), not from
``jax_paged_kv.models``.
"""

from __future__ import annotations

import math

import numpy as np


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _inv_freq(config, theta=None, scaling="config"):
  """HF's inverse frequencies: default, linear, dynamic (within the context) or llama3 (the
  config's base and scaling unless given)."""
  d = config.head_dim
  theta = config.rope_theta if theta is None else theta
  inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  s = getattr(config, "rope_scaling", None) if scaling == "config" else scaling
  if s is None or s.rope_type == "dynamic":
    return inv
  if s.rope_type == "linear":
    return inv / s.factor
  if s.rope_type == "yarn":  # HF _compute_yarn_parameters, element by element
    def correction_dim(rotations):
      return d * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
          2 * math.log(theta))
    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    high = high + 0.001 if low == high else high
    out = []
    for i, f in enumerate(inv):
      ramp = min(max((i - low) / (high - low), 0.0), 1.0)
      out.append(f / s.factor * ramp + f * (1.0 - ramp))
    return np.asarray(out)
  assert s.rope_type == "llama3"
  old = s.original_max_position_embeddings
  out = []
  for f in inv:
    wavelen = 2 * math.pi / f
    if wavelen < old / s.high_freq_factor:
      out.append(f)
    elif wavelen > old / s.low_freq_factor:
      out.append(f / s.factor)
    else:
      smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
      out.append((1 - smooth) * f / s.factor + smooth * f)
  return np.asarray(out)


def _rope(x, inv, mscale=1.0):
  # x: [S, heads, head_dim]; positions 0..S-1, rotate-half convention; YaRN scales cos and sin.
  s, _, d = x.shape
  ang = np.arange(s, dtype=np.float64)[:, None] * inv[None, :]
  cos = mscale * np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
  sin = mscale * np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
  rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
  return x * cos + rot * sin


def _windows(config):
  """Per-layer sliding windows from HF's fields (None: global)."""
  w, types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
  if w is None:
    return [None] * config.num_layers
  if types is None:
    return [w] * config.num_layers
  return [w if t == "sliding_attention" else None for t in types]


def _attention(q, k, v, window, scale, cap=None, keep=None):
  """Causal (optionally windowed, soft-capped) attention: q [S, H, D], k/v [S, KV, D].

  ``keep`` (optional ``bool[S, S]``): which key each query may see besides causality.
  """
  s, nh, _ = q.shape
  rep = nh // k.shape[1]
  k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
  qi, ki = np.arange(s)[:, None], np.arange(s)[None, :]
  mask = ki <= qi
  if window is not None:
    mask &= ki > qi - window  # HF's sliding_window_overlay
  if keep is not None:
    mask &= keep
  logits = np.einsum("qhd,khd->hqk", q, k) * scale
  if cap is not None:
    logits = cap * np.tanh(logits / cap)
  logits = np.where(mask[None], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("hqk,khd->qhd", w, v).reshape(s, -1)


def _f64(params):
  p = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "layers"}
  lay = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
  return p, lay


def _swiglu(h, w_gate, w_up, w_down):
  g = h @ w_gate
  return (g / (1 + np.exp(-g)) * (h @ w_up)) @ w_down


def _moe(h, lay, i, c):
  """Mixtral / Qwen3-MoE (HF ``MixtralSparseMoeBlock`` / ``Qwen3MoeSparseMoeBlock``), one token
  at a time: softmax of the router logits, the top-k experts (renormalised with
  ``norm_topk_prob``), their SwiGLU outputs summed with those weights."""
  out = np.zeros_like(h)
  for t in range(h.shape[0]):
    logits = h[t] @ lay["router"][i]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[:c.num_experts_per_tok]
    weights = probs[top] / (probs[top].sum() if c.norm_topk_prob else 1.0)
    for e, wt in zip(top, weights, strict=True):
      out[t] += wt * _swiglu(h[t], lay["moe_gate"][i][e], lay["moe_up"][i][e],
                             lay["moe_down"][i][e])
    if getattr(c, "shared_expert_intermediate_size", None) is not None:  # Qwen2-MoE
      gate = 1 / (1 + np.exp(-(h[t] @ lay["shared_router"][i])))
      out[t] += gate * _swiglu(h[t], lay["shared_w_gate"][i], lay["shared_w_up"][i],
                               lay["shared_w_down"][i])
  return out


def reference_logits(params, config, tokens, keep=None) -> np.ndarray:
  """float64 logits ``[S, vocab]`` of one sequence ``tokens`` (list of ints), no cache.

  ``keep`` (optional ``bool[S, S]``): an extra attention mask (query, key), every layer.
  """
  if type(config).__name__ in ("Gemma2Config", "Gemma3Config"):
    return gemma2_reference_logits(params, config, tokens)
  c = config
  p, lay = _f64(params)
  toks = np.asarray(tokens)
  s = toks.shape[0]
  d, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
  inv = _inv_freq(c)
  scaling = getattr(c, "rope_scaling", None)
  mscale = scaling.attention_factor if scaling is not None and scaling.rope_type == "yarn" else 1.0
  x = p["embed"][toks]
  for i, window in enumerate(_windows(c)):
    h = _rms(x, lay["attn_norm"][i], c.rms_norm_eps)
    q, k, v = h @ lay["wq"][i], h @ lay["wk"][i], h @ lay["wv"][i]
    if c.attention_bias:
      q, k, v = q + lay["bq"][i], k + lay["bk"][i], v + lay["bv"][i]
    q, k = q.reshape(s, nh, d), k.reshape(s, nkv, d)
    if getattr(c, "qk_norm", False):  # Qwen3: per-head RMSNorm over head_dim, before RoPE
      q, k = _rms(q, lay["q_norm"][i], c.rms_norm_eps), _rms(k, lay["k_norm"][i], c.rms_norm_eps)
    q, k = _rope(q, inv, mscale), _rope(k, inv, mscale)
    o = _attention(q, k, v.reshape(s, nkv, d), window, 1 / np.sqrt(d), keep=keep)
    x = x + o @ lay["wo"][i]
    h = _rms(x, lay["mlp_norm"][i], c.rms_norm_eps)
    if getattr(c, "num_experts", None) is None:
      x = x + _swiglu(h, lay["w_gate"][i], lay["w_up"][i], lay["w_down"][i])
    else:
      x = x + _moe(h, lay, i, c)
  h = _rms(x, p["final_norm"], c.rms_norm_eps)
  head = p["embed"].T if c.tie_word_embeddings else p["lm_head"]
  return h @ head


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def gemma2_reference_logits(params, config, tokens) -> np.ndarray:
  """float64 logits ``[S, vocab]`` of Gemma 2 or 3 (HF ``modeling_gemma2`` /
  ``modeling_gemma3``), no cache."""
  c = config
  p, lay = _f64(params)
  toks = np.asarray(tokens)
  s = toks.shape[0]
  d, nh, nkv, eps = c.head_dim, c.num_heads, c.num_kv_heads, c.rms_norm_eps
  global_inv = _inv_freq(c)
  local = getattr(c, "sliding_rope_theta", None)  # Gemma 3: rope_local_base_freq, no scaling
  local_inv = global_inv if local is None else _inv_freq(c, local, None)

  def norm(x, w):
    return _rms(x, 1.0 + w, eps)

  x = p["embed"][toks] * float(np.asarray(np.sqrt(c.hidden_size), c.dtype))
  for i, window in enumerate(_windows(c)):
    inv = global_inv if window is None else local_inv
    h = norm(x, lay["attn_norm"][i])
    q, k = (h @ lay["wq"][i]).reshape(s, nh, d), (h @ lay["wk"][i]).reshape(s, nkv, d)
    if getattr(c, "qk_norm", False):  # Gemma 3: (1 + w) RMSNorm per head, before RoPE
      q, k = norm(q, lay["q_norm"][i]), norm(k, lay["k_norm"][i])
    q, k = _rope(q, inv), _rope(k, inv)
    v = (h @ lay["wv"][i]).reshape(s, nkv, d)
    o = _attention(q, k, v, window, c.query_pre_attn_scalar ** -0.5, c.attn_logit_softcapping)
    x = x + norm(o @ lay["wo"][i], lay["post_attn_norm"][i])
    h = norm(x, lay["mlp_norm"][i])
    mlp = (_gelu_tanh(h @ lay["w_gate"][i]) * (h @ lay["w_up"][i])) @ lay["w_down"][i]
    x = x + norm(mlp, lay["post_mlp_norm"][i])
  h = norm(x, p["final_norm"])
  logits = h @ (p["embed"].T if c.tie_word_embeddings else p["lm_head"])
  cap = c.final_logit_softcapping
  return logits if cap is None else cap * np.tanh(logits / cap)


def reference_greedy(params, config, prompt, max_new_tokens, stop_tokens=()) -> list[int]:
  """Greedy continuation of ``prompt`` by full recomputation at every step (float64)."""
  seq = list(prompt)
  out = []
  for _ in range(max_new_tokens):
    tok = int(np.argmax(reference_logits(params, config, seq)[-1]))
    out.append(tok)
    seq.append(tok)
    if tok in stop_tokens:
      break
  return out


def reference_log_softmax(params, config, prompt, tokens) -> np.ndarray:
  """float64 ``log_softmax`` of the raw logits at the position of each of ``tokens``,
  generated after ``prompt``: ``[len(tokens), vocab]`` (the oracle of ``top_logprobs``)."""
  tokens = list(tokens)
  logits = reference_logits(params, config, list(prompt) + tokens[:-1])
  logits = logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
  top = logits.max(-1, keepdims=True)
  return logits - (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)


def reference_logprobs(params, config, prompt, tokens) -> np.ndarray:
  """float64 ``log_softmax`` of the raw logits at each of ``tokens``, generated after
  ``prompt`` (the oracle of ``SamplingParams(logprobs=True)``)."""
  tokens = list(tokens)
  lp = reference_log_softmax(params, config, prompt, tokens)
  return lp[np.arange(len(tokens)), tokens]


def check_top_logprobs(top, tokens, ref_lp, k, atol=2e-4) -> None:
  """Asserts that ``top`` (per token: ``((token, logprob), ...)``) holds, at each position, the
  ``k`` most likely tokens of the float64 ``ref_lp`` ([len(tokens), vocab]) with their
  log-probabilities, most likely first (a float32 near-tie may swap two tokens)."""
  assert len(top) == len(tokens)
  for pos, alts in enumerate(top):
    assert len(alts) == k, (pos, alts)
    ids = [t for t, _ in alts]
    vals = np.asarray([v for _, v in alts])
    assert len(set(ids)) == k, (pos, ids)
    np.testing.assert_allclose(vals, ref_lp[pos, ids], atol=atol, rtol=0, err_msg=str(pos))
    assert np.all(np.diff(vals) <= 0), (pos, vals)
    kth = np.sort(ref_lp[pos])[::-1][k - 1]
    assert np.all(ref_lp[pos, ids] >= kth - 2 * atol), (pos, ids)


def penalise(logits, prompt, output, repetition_penalty=1.0, presence_penalty=0.0,
             frequency_penalty=0.0) -> np.ndarray:
  """float64 repetition / presence / frequency penalties of one row (vLLM's semantics, from
  its ``apply_penalties``): repetition on tokens in the prompt or the output (divide a
  positive logit, multiply a negative one), presence and frequency on the output only."""
  logits = np.asarray(logits, np.float64)
  counts = np.bincount(np.asarray(output, np.int64), minlength=logits.shape[-1])
  seen = counts > 0
  seen[np.asarray(prompt, np.int64)] = True
  rep = repetition_penalty
  logits = np.where(seen, np.where(logits > 0, logits / rep, logits * rep), logits)
  return logits - frequency_penalty * counts - presence_penalty * (counts > 0)


def reference_greedy_penalised(params, config, prompt, max_new_tokens, stop_tokens=(),
                               **penalties) -> list[int]:
  """:func:`reference_greedy` with :func:`penalise` applied to each step's logits."""
  seq, out = list(prompt), []
  for _ in range(max_new_tokens):
    logits = reference_logits(params, config, seq)[-1]
    tok = int(np.argmax(penalise(logits, prompt, out, **penalties)))
    out.append(tok)
    seq.append(tok)
    if tok in stop_tokens:
      break
  return out


def reference_prompt_logprobs(params, config, prompt) -> list[float | None]:
  """float64 log-probability of each prompt token given the ones before it (None for the
  first): the oracle of ``SamplingParams(prompt_logprobs=True)``."""
  prompt = list(prompt)
  if len(prompt) == 1:
    return [None]
  lp = reference_log_softmax(params, config, prompt[:1], prompt[1:])
  return [None] + lp[np.arange(len(prompt) - 1), prompt[1:]].tolist()
