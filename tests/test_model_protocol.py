"""The serving layer runs any model that implements the protocol: a small non-Llama model defined
here (learned absolute positions, LayerNorm, multi-query attention, a ReLU MLP) goes through
``generate``, the ``Engine`` (with preemption), ``decode_loop`` and ``export_decode_step``, and
its outputs are checked against full recomputation without a cache (float64 numpy)."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from jax_paged_kv.serving.decoding import (
  DecodeState,
  decode_loop,
  decode_step,
  make_key,
  prefill_step,
)
from jax_paged_kv.serving.export import ExportedDecodeStep, export_decode_step


def layer_norm(x):
  x32 = x.astype(jnp.float32)
  mu = x32.mean(-1, keepdims=True)
  return ((x32 - mu) * jax.lax.rsqrt(((x32 - mu) ** 2).mean(-1, keepdims=True) + 1e-5)).astype(
      x.dtype)


@dataclasses.dataclass(frozen=True)
class TinyGPT:
  """A model of our own: only the protocol's five attributes and ``forward``."""

  vocab_size: int = 48
  hidden: int = 32
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 1
  head_dim: int = 8
  max_positions: int = 64
  dtype: Any = jnp.float32

  def init(self, key):
    L, H, D = self.num_layers, self.hidden, self.head_dim
    ks = iter(jax.random.split(key, 8))

    def w(*shape):
      return jax.random.normal(next(ks), shape) * (2.0 / np.sqrt(shape[-2]))

    return {"embed": jax.random.normal(next(ks), (self.vocab_size, H)),
            "pos": jax.random.normal(next(ks), (self.max_positions, H)),
            "layers": {"wq": w(L, H, self.num_heads * D), "wkv": w(L, H, 2 * D),
                       "wo": w(L, self.num_heads * D, H), "w1": w(L, H, 2 * H),
                       "w2": w(L, 2 * H, H)},
            "head": w(H, self.vocab_size)}

  def forward(self, params, cache, tokens, seq_ids, num_new, *, implementation=None,
              max_blocks=None):
    del max_blocks  # a hint; reading every block-table column is also correct
    b, t = tokens.shape
    cache, slots, status = pk.reserve(cache, seq_ids, num_new, max_new=t)
    _, lens = pk.gather_tables(cache, seq_ids)
    q_lens = jnp.where(jnp.all(status == 0) & (seq_ids >= 0), num_new, 0)
    positions = (lens - q_lens)[:, None] + jnp.arange(t)[None, :]  # [batch, T]
    x = params["embed"][tokens] + params["pos"][jnp.clip(positions, 0, self.max_positions - 1)]

    def layer(carry, inputs):
      x, cache = carry
      w, i = inputs
      h = layer_norm(x)
      q = (h @ w["wq"]).reshape(b, t, self.num_heads, self.head_dim)
      k, v = jnp.split((h @ w["wkv"]).reshape(b, t, 2, 1, self.head_dim), 2, axis=2)
      cache, _ = pk.write_kv(cache, slots, k[:, :, 0], v[:, :, 0], i, seq_ids=seq_ids)
      o = pk.paged_attention(q, cache, seq_ids, i, q_lens=q_lens, implementation=implementation)
      x = x + o.reshape(b, t, -1) @ w["wo"]
      return (x + jax.nn.relu(layer_norm(x) @ w["w1"]) @ w["w2"], cache), None

    (x, cache), _ = jax.lax.scan(layer, (x, cache), (params["layers"], jnp.arange(self.num_layers)))
    last = x[jnp.arange(b), jnp.clip(num_new - 1, 0, t - 1)]  # [batch, hidden]
    return cache, (layer_norm(last) @ params["head"]).astype(jnp.float32), status


def reference_logits(params, model, tokens):
  """float64 logits ``[S, vocab]`` of TinyGPT over ``tokens``, full recomputation, no cache."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  s = len(tokens)

  def ln(x):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)

  x = p["embed"][tokens] + p["pos"][:s]
  causal = np.tril(np.ones((s, s), bool))
  for i in range(model.num_layers):
    w = {k: v[i] for k, v in p["layers"].items()}
    h = ln(x)
    q = (h @ w["wq"]).reshape(s, model.num_heads, model.head_dim)
    k, v = (h @ w["wkv"]).reshape(s, 2, model.head_dim).transpose(1, 0, 2)
    a = np.where(causal[None], np.einsum("qhd,kd->hqk", q, k) / np.sqrt(model.head_dim), -np.inf)
    a = np.exp(a - a.max(-1, keepdims=True))
    o = np.einsum("hqk,kd->qhd", a / a.sum(-1, keepdims=True), v).reshape(s, -1)
    x = x + o @ w["wo"]
    x = x + np.maximum(ln(x) @ w["w1"], 0) @ w["w2"]
  return ln(x) @ p["head"]


def reference_greedy(params, model, prompt, n):
  seq = list(prompt)
  for _ in range(n):
    seq.append(int(np.argmax(reference_logits(params, model, seq)[-1])))
  return seq[len(prompt):]


MODEL = TinyGPT()
PARAMS = MODEL.init(jax.random.PRNGKey(0))
PROMPTS = [np.random.default_rng(i).integers(0, 48, n).tolist() for i, n in enumerate((3, 11, 7))]
NEW = 8
REFS = [reference_greedy(PARAMS, MODEL, p, NEW) for p in PROMPTS]
FIXED = dict(prefill_chunk=4, decode_steps=4, batch_bucket_min=4, bucket_blocks=False)


def test_tiny_gpt_is_a_model():
  assert isinstance(MODEL, pk.Model)
  assert not isinstance(object(), pk.Model)


def test_generate_and_engine_with_own_model_match_recomputation():
  samp = pk.SamplingParams(max_new_tokens=NEW)
  assert pk.generate(PARAMS, MODEL, PROMPTS, samp, block_size=4, **FIXED) == REFS
  # A pool too small for all three at once: the engine preempts and recomputes, same tokens.
  cc = pk.cache_config_for(MODEL, num_blocks=1 + 8, max_seqs=4, max_seq_len=24, block_size=4)
  engine = pk.Engine(PARAMS, MODEL, cc, watermark=0.0, reserve_ratio=0.0, **FIXED)
  for p in PROMPTS:
    engine.add_request(p, samp)
  outs = engine.run()
  assert [o.tokens for o in outs] == REFS
  assert engine.metrics.preemptions > 0 and engine.model is MODEL
  with pytest.raises(ValueError, match="outside"):
    engine.add_request([MODEL.vocab_size])


def test_decode_loop_and_export_with_own_model():
  cc = pk.cache_config_for(MODEL, num_blocks=32, max_seqs=4, max_seq_len=32, block_size=4)
  cache = init = pk.init_cache(cc, pool_fill=float("nan"))
  cache, _ = pk.allocate_sequences(cache, np.asarray([2, 0], np.int32))
  tokens = np.zeros((2, 12), np.int32)
  for i, p in enumerate(PROMPTS[1:]):
    tokens[i, :len(p)] = p
  greedy = pk.SamplingParams(max_new_tokens=NEW)
  zeros = np.zeros(2, np.int32)
  cache, first, _, status = prefill_step(
      PARAMS, cache, tokens, np.asarray([2, 0], np.int32), np.asarray([11, 7], np.int32),
      np.zeros(2, np.float32), zeros, np.ones(2, np.float32),
      np.stack([make_key(0)] * 2), zeros, model=MODEL)
  assert not np.any(np.asarray(status))
  state = DecodeState.create(np.asarray(first).tolist(), [2, 0], [greedy] * 2)
  cache, state, out, steps, status = decode_loop(PARAMS, cache, state, NEW, model=MODEL,
                                                 max_steps=NEW)
  got = [[int(first[i])] + [int(t) for t in np.asarray(out)[i] if t >= 0][:NEW - 1]
         for i in range(2)]
  assert got == REFS[1:]

  # Export: the deserialised step gives what decode_step gives (a padding row included).
  del init
  step = ExportedDecodeStep.deserialize(
      export_decode_step(PARAMS, cache, batch=3, model=MODEL).serialize())
  toks, ids = np.asarray([5, 6, 0], np.int32), np.asarray([0, 2, -1], np.int32)
  copy = jax.tree_util.tree_map(lambda x: x.copy(), cache)
  _, want, _ = decode_step(PARAMS, copy, toks, ids, model=MODEL)
  _, got_logits, got_status = step(PARAMS, cache, toks, ids)
  np.testing.assert_array_equal(np.asarray(got_logits), np.asarray(want))
  assert not np.any(np.asarray(got_status))


def test_protocol_errors_are_clear():
  cc = pk.cache_config_for(MODEL, num_blocks=8, max_seqs=2, max_seq_len=16, block_size=4)
  with pytest.raises(TypeError, match="no vocab_size.*forward"):
    pk.Engine(PARAMS, object(), cc)

  class Unhashable:
    __hash__ = None
    vocab_size, num_layers, num_kv_heads, head_dim, dtype = 48, 2, 1, 8, jnp.float32
    forward = TinyGPT.forward

  with pytest.raises(TypeError, match="hashable"):
    pk.Engine(PARAMS, Unhashable(), cc)
  with pytest.raises(pk.CacheShapeError, match="does not fit"):
    pk.Engine(PARAMS, dataclasses.replace(MODEL, head_dim=16), cc)
  with pytest.raises(TypeError, match="model="):
    decode_step(PARAMS, pk.init_cache(cc), np.zeros(1, np.int32), np.zeros(1, np.int32))


def test_equal_models_share_compilations():
  """The model is a static jit argument: an equal instance reuses the compiled step."""
  cc = pk.cache_config_for(MODEL, num_blocks=8, max_seqs=2, max_seq_len=16, block_size=4)
  run = functools.partial(decode_step, PARAMS, tokens=np.zeros(2, np.int32),
                          seq_ids=np.full(2, -1, np.int32))
  run(pk.init_cache(cc), model=MODEL)
  before = decode_step._cache_size()
  run(pk.init_cache(cc), model=TinyGPT())
  assert decode_step._cache_size() == before


def test_prompt_logprobs_are_refused_for_a_model_without_all_logits():
  """TinyGPT's forward returns only each row's last logits: a request scoring its prompt is
  refused when it is added (never a wrong score), and the engine serves the others."""
  cc = pk.cache_config_for(MODEL, num_blocks=17, max_seqs=2, max_seq_len=32, block_size=4)
  engine = pk.Engine(PARAMS, MODEL, cc, **FIXED)
  with pytest.raises(ValueError, match="TinyGPT.forward has no all_logits option"):
    engine.add_request(PROMPTS[0], pk.SamplingParams(prompt_logprobs=True))
  assert not engine.has_work
