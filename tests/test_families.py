"""Every supported model family on the paged cache, against two oracles: the float64 numpy
reference (tests/llama_reference.py, always runs) and Hugging Face ``transformers`` with the same
random weights saved by ``save_pretrained`` (skips without torch and transformers).

Prompts are longer than every sliding window, prefill is chunked across block and window
boundaries, and the greedy continuation is decoded one token at a time.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_paged_kv import CacheShapeError, init_cache
from jax_paged_kv.models import (
  Gemma2Config,
  Gemma3Config,
  LlamaConfig,
  RopeScaling,
  gemma2,
  llama,
  load_hf_checkpoint,
)
from jax_paged_kv.models.gemma2 import gemma3_layer_types
from tests.llama_fixtures import decode_greedy, run_chunked
from tests.llama_reference import reference_greedy, reference_logits

WINDOW = 5
PROMPT_LEN, CHUNK, NEW = 13, 5, 6


def run_model(params, config, prompts, *, block_size=4):
  """Chunked prefill + greedy decode of ``prompts``; returns (tokens [n, NEW], logits list)."""
  max_len = PROMPT_LEN + NEW + 3
  cc = config.cache_config(num_blocks=1 + len(prompts) * -(-max_len // block_size),
                           max_seqs=len(prompts), max_seq_len=max_len, block_size=block_size)
  cache = init_cache(cc, pool_fill=float("nan"))  # unwritten slots must never be read
  slots = list(range(len(prompts)))[::-1]
  cache, pre = run_chunked(params, config, cache, prompts, slots, chunk=CHUNK)
  _, toks, dec = decode_greedy(params, config, cache, slots, [p[-1] for p in pre], NEW)
  return toks, [np.concatenate([p, d]) for p, d in zip(pre, dec, strict=True)]


# ---- the float64 reference: features without transformers ------------------------------------

REFERENCE_CASES = {
    # Llama 3 RoPE, q/k/v biases, a window on layers 0 and 2 only (scanned as one group of 3).
    "llama3-bias-mixed-window": LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=12, rope_theta=500.0, attention_bias=True,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16), sliding_window=WINDOW,
        layer_types=("sliding_attention", "full_attention", "sliding_attention")),
    "linear-rope-all-window": LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
        num_kv_heads=1, rope_scaling=RopeScaling("linear", 2.5), sliding_window=WINDOW),
    # Qwen3: q/k norms, head_dim 16 != hidden / heads, tied head, a window on layers 1 and 2.
    "qwen3-qk-norm-window": LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=900.0, qk_norm=True, tie_word_embeddings=True,
        sliding_window=WINDOW,
        layer_types=("full_attention", "sliding_attention", "sliding_attention")),
    # YaRN x4 over a 16-token pretraining context, DeepSeek's mscale ratio (1 layer).
    "yarn-rope": LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=40, num_layers=1, num_heads=4,
        num_kv_heads=2, head_dim=16, rope_theta=300.0,
        rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=16,
                                 attention_factor=1.2, beta_fast=8.0)),
    # Mixtral: 4 experts, 2 per token (renormalised), a window on every layer.
    "mixtral-window": LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=40, num_layers=2, num_heads=4,
        num_kv_heads=2, rope_theta=2000.0, sliding_window=WINDOW, num_experts=4,
        num_experts_per_tok=2),
    # Qwen3-MoE: q/k norms, 6 experts of width 24, 3 per token, not renormalised.
    "qwen3-moe": LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, qk_norm=True, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=24, norm_topk_prob=False),
    # Qwen2-MoE: q/k/v biases, 4 experts of width 24, 2 per token, a gated shared expert.
    "qwen2-moe": LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
        num_kv_heads=2, attention_bias=True, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=24, norm_topk_prob=False, shared_expert_intermediate_size=40),
    # Gemma 2 with an odd number of layers (one pair scanned, the third layer after it).
    "gemma2-3-layers": Gemma2Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=4,
        num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
        final_logit_softcapping=3.0, sliding_window=WINDOW),
    # Gemma 3: q/k norms, its own RoPE base on the sliding layers, linear scaling on the global
    # ones; 7 layers of period 3 (two groups scanned, the seventh after them).
    "gemma3-7-layers": Gemma3Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=7, num_heads=4,
        num_kv_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
        layer_types=gemma3_layer_types(7, 3), rope_theta=5000.0, sliding_rope_theta=50.0,
        rope_scaling=RopeScaling("linear", 4.0), final_logit_softcapping=3.0),
}


def perturb_norms(params, seed=0):
  """Every norm weight (``*norm``: ones, or zeros in Gemma) moved off its init, so a weight read
  in the wrong place (``q_norm`` for ``k_norm``, one layer's for another's) changes the output."""
  rng = np.random.default_rng(seed)

  def move(path, x):
    name = getattr(path[-1], "key", "")
    if not name.endswith("norm"):
      return x
    return x + jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(move, params)


@pytest.mark.parametrize("name", REFERENCE_CASES)
def test_matches_float64_reference(name):
  config = REFERENCE_CASES[name]
  module = gemma2 if isinstance(config, Gemma2Config) else llama
  params = perturb_norms(module.init_params(config, jax.random.PRNGKey(0), scale=2.0))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (PROMPT_LEN, 9)]
  toks, logits = run_model(params, config, prompts)
  for i, prompt in enumerate(prompts):
    ref = reference_logits(params, config, prompt + toks[i].tolist())
    np.testing.assert_allclose(logits[i], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(),
                               err_msg=name)


def test_windows_really_apply():
  """A window shorter than the prompt changes the logits (the test above would notice a
  model that ignored it, this one that the prompt is long enough for it to matter)."""
  config = REFERENCE_CASES["linear-rope-all-window"]
  params = llama.init_params(config, jax.random.PRNGKey(0), scale=2.0)
  prompt = np.random.default_rng(1).integers(0, 96, PROMPT_LEN).tolist()
  unwindowed = dataclasses.replace(config, sliding_window=None)
  a = reference_logits(params, config, prompt)
  b = reference_logits(params, unwindowed, prompt)
  assert np.allclose(a[:WINDOW], b[:WINDOW]) and not np.allclose(a[WINDOW:], b[WINDOW:])


def test_dynamic_rope_refuses_caches_past_its_context():
  config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_layers=1,
                       num_heads=2, num_kv_heads=2, max_position_embeddings=16,
                       rope_scaling=RopeScaling("dynamic", 2.0))
  params = llama.init_params(config, jax.random.PRNGKey(0))
  cache = init_cache(config.cache_config(num_blocks=9, max_seqs=1, max_seq_len=32,
                                         block_size=4))
  with pytest.raises(CacheShapeError, match="dynamic RoPE"):
    config.forward(params, cache, np.zeros((1, 2), np.int32), np.zeros(1, np.int32))


def test_generate_s_default_cache_stays_within_a_dynamic_rope_context():
  """``generate`` without a cache: requests that fit ``max_position_embeddings`` run (its
  default cache stops at that context instead of the next power of two, which is refused),
  with the float64 reference's tokens; a request past it is still refused."""
  from jax_paged_kv.serving.decoding import SamplingParams
  from jax_paged_kv.serving.engine import generate

  config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_layers=1,
                       num_heads=2, num_kv_heads=2, max_position_embeddings=24,
                       rope_scaling=RopeScaling("dynamic", 2.0))
  params = llama.init_params(config, jax.random.PRNGKey(0), scale=2.0)
  prompt = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
  (out,) = generate(params, config, [prompt], SamplingParams(max_new_tokens=12))
  assert out == reference_greedy(params, config, prompt, 12)
  with pytest.raises(CacheShapeError, match="dynamic RoPE"):
    generate(params, config, [prompt], SamplingParams(max_new_tokens=20))


# ---- Hugging Face transformers ---------------------------------------------------------------


def hf_case(name, transformers):
  """(HF config, extra checks on our config) of each family checked against transformers."""
  small = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
               max_position_embeddings=64)
  if name == "llama2":
    return transformers.LlamaConfig(**small, rope_theta=5000.0), lambda c: (
        c.rope_scaling is None and c.layer_windows == (None, None))
  if name == "llama3":
    rope = dict(rope_type="llama3", rope_theta=500.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=16)
    return transformers.LlamaConfig(**small, rope_parameters=rope, tie_word_embeddings=True), (
        lambda c: c.rope_scaling.rope_type == "llama3" and c.tie_word_embeddings)
  if name in ("llama-linear", "llama-dynamic"):
    kind = name.split("-")[1]
    rope = dict(rope_type=kind, rope_theta=500.0, factor=2.5)
    return transformers.LlamaConfig(**small, rope_parameters=rope), (
        lambda c: c.rope_scaling.rope_type == kind)
  if name == "mistral":
    return transformers.MistralConfig(**small, sliding_window=WINDOW, rope_theta=800.0), (
        lambda c: c.layer_windows == (WINDOW, WINDOW) and not c.attention_bias)
  if name == "qwen2":
    return transformers.Qwen2Config(**small, rope_theta=700.0), (
        lambda c: c.attention_bias and c.layer_windows == (None, None))
  if name == "qwen2-window":  # layer 0 global, layer 1 sliding (max_window_layers=1)
    return transformers.Qwen2Config(**small, use_sliding_window=True, sliding_window=WINDOW,
                                    max_window_layers=1), (
        lambda c: c.layer_windows == (None, WINDOW))
  if name == "qwen3":  # head_dim 24 != hidden / heads; tied head
    return transformers.Qwen3Config(**small, head_dim=24, rope_theta=600.0,
                                    tie_word_embeddings=True), (
        lambda c: c.qk_norm and not c.attention_bias and c.head_dim == 24
        and c.tie_word_embeddings and c.layer_windows == (None, None))
  if name == "qwen3-yarn":  # YaRN x4 over a 64-token pretraining context (Qwen3's long-context
    rope = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,  # recipe, scaled down)
                original_max_position_embeddings=64)
    return transformers.Qwen3Config(**dict(small, max_position_embeddings=256), head_dim=16,
                                    rope_parameters=rope), (
        lambda c: c.rope_scaling.rope_type == "yarn" and c.rope_scaling.factor == 4.0
        and abs(c.rope_scaling.attention_factor - (0.1 * np.log(4.0) + 1)) < 1e-12)
  if name == "qwen3-window":  # layer 0 global, layer 1 sliding
    return transformers.Qwen3Config(**small, use_sliding_window=True, sliding_window=WINDOW,
                                    max_window_layers=1), (
        lambda c: c.qk_norm and c.layer_windows == (None, WINDOW))
  if name == "mixtral":  # 4 experts, 2 per token; a window
    return transformers.MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2,
                                      sliding_window=WINDOW, rope_theta=900.0), (
        lambda c: c.num_experts == 4 and c.num_experts_per_tok == 2 and c.norm_topk_prob
        and c.moe_intermediate_size == 96 and c.layer_windows == (WINDOW, WINDOW))
  if name == "qwen2-moe":  # 4 experts of width 32, 2 per token, a shared expert of width 48
    return transformers.Qwen2MoeConfig(**small, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, norm_topk_prob=False,
                                       shared_expert_intermediate_size=48, rope_theta=700.0), (
        lambda c: c.attention_bias and c.num_experts == 4 and not c.qk_norm
        and c.shared_expert_intermediate_size == 48 and c.layer_windows == (None, None))
  if name == "qwen3-moe":  # 6 experts of width 32, 3 per token, not renormalised
    return transformers.Qwen3MoeConfig(**small, num_experts=6, num_experts_per_tok=3,
                                       moe_intermediate_size=32, norm_topk_prob=False,
                                       head_dim=24, rope_theta=700.0), (
        lambda c: c.qk_norm and c.num_experts == 6 and c.num_experts_per_tok == 3
        and not c.norm_topk_prob and c.moe_intermediate_size == 32 and c.head_dim == 24)
  if name == "phi3":  # fused qkv / gate_up projections, GQA, a window
    return transformers.Phi3Config(**small, sliding_window=WINDOW, rope_theta=600.0,
                                   pad_token_id=0, eos_token_id=None), (
        lambda c: c.layer_windows == (WINDOW, WINDOW) and c.rms_norm_eps == 1e-6
        and not c.attention_bias and not c.qk_norm)
  if name == "gemma3":  # 5 layers, pattern 3 (S S F S S); linear RoPE on the global layer
    cfg = dict(small, num_hidden_layers=5, head_dim=16)
    return transformers.Gemma3TextConfig(
        **cfg, sliding_window=WINDOW, query_pre_attn_scalar=24, final_logit_softcapping=3.0,
        rope_theta=800.0, rope_local_base_freq=30.0, sliding_window_pattern=3,
        rope_scaling={"rope_type": "linear", "factor": 4.0}), (
        lambda c: isinstance(c, Gemma3Config) and c.qk_norm
        and c.layer_windows == (WINDOW, WINDOW, None, WINDOW, WINDOW)
        and c.layer_rope(WINDOW) == (30.0, None)
        and c.layer_rope(None) == (800.0, RopeScaling("linear", 4.0))
        and c.attn_logit_softcapping is None and c.final_logit_softcapping == 3.0)
  if name == "gemma3-multimodal":  # Gemma3ForConditionalGeneration, text in, its language model
    text = dict(small, vocab_size=160, num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
                query_pre_attn_scalar=24, sliding_window_pattern=3, rope_local_base_freq=30.0,
                rope_theta=800.0)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    return transformers.Gemma3Config(text_config=text, vision_config=vision,
                                     mm_tokens_per_image=4, boi_token_index=157,
                                     eoi_token_index=158, image_token_index=159), (
        lambda c: isinstance(c, Gemma3Config) and c.layer_windows == (WINDOW, WINDOW, None)
        and c.vocab_size == 160 and c.layer_rope(WINDOW) == (30.0, None))
  if name == "gemma2":
    cfg = dict(small, num_hidden_layers=4, head_dim=16)
    return transformers.Gemma2Config(
        **cfg, sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
        final_logit_softcapping=3.0), (
        lambda c: c.layer_windows == (WINDOW, None, WINDOW, None) and c.tie_word_embeddings)
  raise KeyError(name)


HF_CASES = ["llama2", "llama3", "llama-linear", "llama-dynamic", "mistral", "qwen2",
            "qwen2-window", "qwen3", "qwen3-window", "qwen3-yarn", "mixtral", "qwen2-moe",
            "qwen3-moe", "phi3", "gemma2", "gemma3", "gemma3-multimodal"]


def hf_model(name, tmp_path):
  """A random-weight transformers model of the case, saved to ``tmp_path``."""
  torch = pytest.importorskip("torch", reason="the transformers comparison needs torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf_cfg, check = hf_case(name, transformers)
  model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
  model = model.eval()
  with torch.no_grad():  # the default init (std 0.02, unit norms) gives near-uniform logits
    for p in model.parameters():
      if p.ndim == 2:
        p.mul_(8.0)
      else:
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path, safe_serialization=True)
  return torch, model, check


@pytest.mark.parametrize("name", HF_CASES)
def test_matches_transformers_float32(tmp_path, name):
  torch, hf, check = hf_model(name, tmp_path)
  config, params = load_hf_checkpoint(tmp_path)
  assert check(config), config
  prompt = np.random.default_rng(3).integers(0, 128, PROMPT_LEN).tolist()
  toks, (logits,) = run_model(params, config, [prompt])
  with torch.no_grad():
    ids = torch.tensor([prompt])
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                       do_sample=False, pad_token_id=0)[0, PROMPT_LEN:].tolist()
    ref = hf(torch.tensor([prompt + toks[0].tolist()])).logits[0].double().numpy()
  assert toks[0].tolist() == want  # token for token, HF's own cached generation
  assert np.abs(ref).max() > 1.0  # discriminative logits
  # 1e-4 of the logits' scale (atol) on top of 1e-4 relative.
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("name", ["llama3", "mistral", "qwen2", "qwen3", "mixtral", "qwen3-moe",
                                  "gemma2", "gemma3"])
def test_matches_transformers_bfloat16(tmp_path, name):
  """bf16 weights, activations and cache, the same tokens fed to both sides. bf16 keeps 8
  bits and the two sides round in different places, so both are held to the float32 model:
  ours may stray from it at most 1.5x as far as transformers' own bf16 run does (both stray
  about 2% of the logits' scale), and the two bf16 runs stay within 4% of each other."""
  torch, hf, _ = hf_model(name, tmp_path)
  config, params = load_hf_checkpoint(tmp_path, dtype=jnp.bfloat16)
  assert params["embed"].dtype == jnp.bfloat16 and config.dtype == jnp.bfloat16
  seq = np.random.default_rng(4).integers(0, 128, PROMPT_LEN + NEW).tolist()
  cache = init_cache(config.cache_config(num_blocks=8, max_seqs=1, max_seq_len=len(seq),
                                         block_size=4), pool_fill=float("nan"))
  _, (logits,) = run_chunked(params, config, cache, [seq], [0], chunk=CHUNK)
  with torch.no_grad():
    exact = hf(torch.tensor([seq])).logits[0].double().numpy()
    hf_bf16 = hf.to(torch.bfloat16)(torch.tensor([seq])).logits[0].double().numpy()
  scale = np.abs(exact).max()
  ours_err = np.abs(logits - exact).max() / scale
  hf_err = np.abs(hf_bf16 - exact).max() / scale
  assert ours_err <= 1.5 * hf_err, (ours_err, hf_err)
  assert np.abs(logits - hf_bf16).max() / scale < 0.04


YARN_CASES = [  # rope_parameters beyond rope_type "yarn"; head_dim, max_position_embeddings
    (dict(factor=4.0, original_max_position_embeddings=64), 16, 256),
    (dict(factor=8.0, original_max_position_embeddings=4096, rope_theta=1e6), 128, 32768),
    (dict(factor=2.0, original_max_position_embeddings=512, beta_fast=16, beta_slow=2), 64, 1024),
    (dict(factor=4.0, original_max_position_embeddings=1024, truncate=False), 64, 4096),
    (dict(factor=40.0, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0,
          beta_fast=32, beta_slow=1, rope_theta=10000.0), 64, 163840),  # DeepSeek-V3's
    (dict(factor=40.0, original_max_position_embeddings=4096, mscale=0.707,
          mscale_all_dim=1.0), 64, 163840),
    (dict(factor=3.0, original_max_position_embeddings=100, attention_factor=1.3), 32, 300),
    (dict(factor=0.5, original_max_position_embeddings=64), 16, 64),  # factor <= 1: mscale 1
    (dict(factor=4.0, original_max_position_embeddings=1024, truncate=None), 64, 4096),  # false
    (dict(factor=None, original_max_position_embeddings=1024), 64, 8192),  # 8192 / 1024
    # A small base: the ramp's upper end falls past the last dimension (clipped).
    (dict(factor=4.0, original_max_position_embeddings=256, rope_theta=5.0), 16, 1024),
]


@pytest.mark.parametrize("case", range(len(YARN_CASES)))
def test_yarn_frequencies_and_attention_factor_match_transformers(case):
  """Our YaRN inverse frequencies and attention factor (float64) against transformers' own
  ``_compute_yarn_parameters`` (float32), from the same config dict."""
  pytest.importorskip("torch", reason="the transformers comparison needs torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  from jax_paged_kv.models import config_from_hf
  from jax_paged_kv.models.layers import rope_frequencies

  params, head_dim, max_pos = YARN_CASES[case]
  rope = dict(params, rope_type="yarn")
  rope.setdefault("rope_theta", 10000.0)
  hf = transformers.LlamaConfig(vocab_size=32, hidden_size=4 * head_dim, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=4,
                                max_position_embeddings=max_pos, rope_parameters=dict(rope))
  want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
  ours = config_from_hf(hf.to_diff_dict())  # what save_pretrained writes
  got = rope_frequencies(ours.head_dim, ours.rope_theta, ours.rope_scaling)
  np.testing.assert_allclose(got, want_inv.double().numpy(), rtol=2e-6, atol=0)
  assert abs(ours.rope_scaling.attention_factor - want_factor) < 1e-6 * want_factor
  # RopeScaling's own default attention factor (when none is given) is the same rule.
  default = RopeScaling("yarn", ours.rope_scaling.factor,
                        original_max_position_embeddings=params["original_max_position_embeddings"])
  if "attention_factor" not in params and "mscale" not in params:
    assert abs(default.attention_factor - want_factor) < 1e-6 * want_factor


def test_init_params_picks_each_family_s_initialiser():
  import jax_paged_kv as pk

  for name, config in REFERENCE_CASES.items():
    module = gemma2 if isinstance(config, Gemma2Config) else llama
    want = module.init_params(config, jax.random.PRNGKey(3), scale=2.0)
    got = pk.init_params(config, jax.random.PRNGKey(3), scale=2.0)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want), name
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  with pytest.raises(TypeError, match="LlamaConfig, Gemma2Config and Gemma3Config"):
    pk.init_params(object(), jax.random.PRNGKey(3))
