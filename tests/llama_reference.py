"""Independent float64 numpy oracle of the Llama model: full recomputation, no cache.

Shared by tests/test_llama.py, test_decoding.py and test_engine.py. Written from the Llama
definition (HF ``modeling_llama``), not from ``jax_paged_kv.models.llama``.
"""

from __future__ import annotations

import numpy as np


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):
  # x: [S, heads, head_dim]; positions 0..S-1, rotate-half convention.
  s, _, d = x.shape
  inv = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  ang = np.arange(s, dtype=np.float64)[:, None] * inv[None, :]
  cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
  sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]
  rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
  return x * cos + rot * sin


def reference_logits(params, config, tokens) -> np.ndarray:
  """float64 logits ``[S, vocab]`` of one sequence ``tokens`` (list of ints), no cache."""
  c = config
  p = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "layers"}
  lay = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
  toks = np.asarray(tokens)
  s = toks.shape[0]
  d, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
  x = p["embed"][toks]
  causal = np.tril(np.ones((s, s), bool))
  for i in range(c.num_layers):
    h = _rms(x, lay["attn_norm"][i], c.rms_norm_eps)
    q, k, v = h @ lay["wq"][i], h @ lay["wk"][i], h @ lay["wv"][i]
    if c.attention_bias:
      q, k, v = q + lay["bq"][i], k + lay["bk"][i], v + lay["bv"][i]
    q = _rope(q.reshape(s, nh, d), c.rope_theta)
    k = _rope(k.reshape(s, nkv, d), c.rope_theta)
    v = v.reshape(s, nkv, d)
    k = np.repeat(k, nh // nkv, axis=1)
    v = np.repeat(v, nh // nkv, axis=1)
    logits = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    logits = np.where(causal[None], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", w, v).reshape(s, nh * d)
    x = x + o @ lay["wo"][i]
    h = _rms(x, lay["mlp_norm"][i], c.rms_norm_eps)
    g = h @ lay["w_gate"][i]
    x = x + (g / (1 + np.exp(-g)) * (h @ lay["w_up"][i])) @ lay["w_down"][i]
  h = _rms(x, p["final_norm"], c.rms_norm_eps)
  head = p["embed"].T if c.tie_word_embeddings else p["lm_head"]
  return h @ head


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
