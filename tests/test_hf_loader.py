"""The Hugging Face loader reads what it implements and refuses everything else, by name."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jax_paged_kv.models import (
  Gemma2Config,
  Gemma3Config,
  LlamaConfig,
  RopeScaling,
  config_from_hf,
  gemma2,
  llama,
  load_hf_checkpoint,
  params_from_hf,
  params_to_hf,
)

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def cfg(model_type, **kw):
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
          "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
          "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
          "phi3": "Phi3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}.get(model_type, "X")
  return {"model_type": model_type, "architectures": [arch], **BASE, **kw}


def test_reads_each_family():
  c = config_from_hf(cfg("llama", rope_theta=5e5, torch_dtype="bfloat16", pretraining_tp=1,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}))
  assert isinstance(c, LlamaConfig) and c.rope_theta == 5e5
  assert c.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
  # The transformers 5 spelling: theta inside rope_parameters; old "type" key for linear.
  c = config_from_hf(cfg("llama", rope_parameters={"rope_type": "default", "rope_theta": 7.0}))
  assert c.rope_theta == 7.0 and c.rope_scaling is None
  c = config_from_hf(cfg("llama", rope_scaling={"type": "linear", "factor": 2.0}))
  assert c.rope_scaling == RopeScaling("linear", 2.0)
  # llama3 without original_max_position_embeddings falls back to max_position_embeddings.
  c = config_from_hf(cfg("llama", max_position_embeddings=99, rope_scaling={
      "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}))
  assert c.rope_scaling.original_max_position_embeddings == 99
  assert isinstance(config_from_hf({**cfg("llama"), "model_type": None}), LlamaConfig)
  assert config_from_hf(cfg("mistral", sliding_window=4096)).layer_windows == (4096, 4096)
  assert config_from_hf(cfg("mistral", sliding_window=None)).layer_windows == (None, None)
  # Qwen2: the window only with use_sliding_window, on layers >= max_window_layers.
  old_style = cfg("qwen2", sliding_window=131072, use_sliding_window=False, max_window_layers=28)
  c = config_from_hf(old_style)
  assert c.attention_bias and c.layer_windows == (None, None)
  c = config_from_hf(cfg("qwen2", sliding_window=8, use_sliding_window=True, max_window_layers=1))
  assert c.layer_windows == (None, 8)
  # Qwen3: q/k norms, no biases, Qwen2's window rule.
  c = config_from_hf(cfg("qwen3", head_dim=16, attention_bias=False, sliding_window=None,
                         use_sliding_window=False, max_window_layers=28))
  assert c.qk_norm and not c.attention_bias and c.head_dim == 16
  assert c.layer_windows == (None, None)
  c = config_from_hf(cfg("qwen3", sliding_window=8, use_sliding_window=True, max_window_layers=1))
  assert c.qk_norm and c.layer_windows == (None, 8)
  c = config_from_hf(cfg("gemma2", head_dim=16, sliding_window=8, sliding_window_size=8,
                         hidden_act="gelu_pytorch_tanh", cache_implementation="hybrid",
                         final_logit_softcapping=None))
  assert isinstance(c, Gemma2Config) and c.layer_windows == (8, None)
  assert c.final_logit_softcapping is None and c.attn_logit_softcapping == 50.0
  assert c.query_pre_attn_scalar == 256.0 and c.tie_word_embeddings


def test_reads_mixture_of_experts_families():
  # mistralai/Mixtral-8x7B-v0.1's config.json, shrunk.
  c = config_from_hf(cfg("mixtral", num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6,
                         sliding_window=None, router_aux_loss_coef=0.02,
                         output_router_logits=False, router_jitter_noise=0.0))
  assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (8, 2, 48)
  assert c.norm_topk_prob and not c.qk_norm and c.layer_windows == (None, None)
  assert config_from_hf(cfg("mixtral", num_experts=4)).num_experts == 4  # transformers' alias
  # Qwen/Qwen3-30B-A3B's config.json, shrunk.
  c = config_from_hf(cfg("qwen3_moe", head_dim=16, num_experts=16, num_experts_per_tok=4,
                         moe_intermediate_size=24, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=[], max_window_layers=2, use_sliding_window=False,
                         sliding_window=None, attention_bias=False, rope_theta=1e6))
  assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (16, 4, 24)
  assert c.norm_topk_prob and c.qk_norm and c.head_dim == 16 and c.layer_windows == (None, None)
  # Qwen/Qwen1.5-MoE-A2.7B's config.json, shrunk: q/k/v biases, a gated shared expert.
  c = config_from_hf(cfg("qwen2_moe", num_experts=6, num_experts_per_tok=2,
                         moe_intermediate_size=16, shared_expert_intermediate_size=40,
                         norm_topk_prob=False, qkv_bias=True, decoder_sparse_step=1,
                         max_window_layers=21, sliding_window=32768, use_sliding_window=False,
                         rope_theta=1e6, output_router_logits=False, router_aux_loss_coef=0.001))
  assert c.attention_bias and not c.qk_norm and c.layer_windows == (None, None)
  assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
          c.shared_expert_intermediate_size) == (6, 2, 16, 40)
  assert not config_from_hf(cfg("qwen2_moe", num_experts=6, num_experts_per_tok=2,
                                qkv_bias=False)).attention_bias
  # transformers 5 saves num_experts as num_local_experts; a window applies to every layer.
  c = config_from_hf(cfg("qwen3_moe", num_local_experts=6, num_experts_per_tok=2,
                         use_sliding_window=True, sliding_window=8))
  assert c.num_experts == 6 and c.layer_windows == (8, 8)


# microsoft/Phi-3-mini-4k-instruct's config.json, shrunk (Phi-4 differs in sizes, rope_theta and
# sliding_window null).
PHI3_MINI = cfg("phi3", attention_bias=False, attention_dropout=0.0, bos_token_id=1,
                embd_pdrop=0.0, eos_token_id=32000, hidden_act="silu", initializer_range=0.02,
                max_position_embeddings=4096, original_max_position_embeddings=4096,
                pad_token_id=32000, resid_pdrop=0.0, rms_norm_eps=1e-05, rope_scaling=None,
                rope_theta=10000.0, sliding_window=2047, tie_word_embeddings=False,
                torch_dtype="bfloat16", use_cache=True)


def test_reads_phi3_and_splits_its_fused_projections():
  c = config_from_hf(PHI3_MINI)
  assert c.layer_windows == (2047, 2047) and c.rms_norm_eps == 1e-5
  assert config_from_hf({k: v for k, v in PHI3_MINI.items() if k != "rms_norm_eps"}
                        ).rms_norm_eps == 1e-5  # Phi-3's class default
  assert config_from_hf({k: v for k, v in PHI3_MINI.items() if k != "sliding_window"}
                        ).layer_windows == (None, None)  # its class default: no window
  # transformers writes partial_rotary_factor 1.0 at the top level and inside rope_parameters.
  assert config_from_hf(dict(PHI3_MINI, partial_rotary_factor=1.0, rope_parameters={
      "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})) == c
  params = llama.init_params(c, jax.random.PRNGKey(0))
  state = params_to_hf(params, c)
  fused = {}
  for k, w in state.items():  # Phi-3's layout: [q; k; v] and [gate; up] along the rows
    if k.endswith("self_attn.q_proj.weight"):
      base = k.removesuffix("q_proj.weight")
      fused[base + "qkv_proj.weight"] = np.concatenate(
          [w, state[base + "k_proj.weight"], state[base + "v_proj.weight"]])
    elif k.endswith("mlp.gate_proj.weight"):
      base = k.removesuffix("gate_proj.weight")
      fused[base + "gate_up_proj.weight"] = np.concatenate([w, state[base + "up_proj.weight"]])
    elif not k.endswith(("k_proj.weight", "v_proj.weight", "up_proj.weight")):
      fused[k] = w
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         params_from_hf(fused, c, fused=True), params)
  with pytest.raises(ValueError, match="no tensor .*q_proj"):  # fused: Phi-3's only
    params_from_hf(fused, c)
  name = "model.layers.0.self_attn.qkv_proj.weight"
  with pytest.raises(ValueError, match="rows, expected"):
    params_from_hf(dict(fused, **{name: fused[name][:-1]}), c, fused=True)
  extra = "model.layers.1.self_attn.k_proj.weight"
  with pytest.raises(ValueError, match="beside fused projections"):
    params_from_hf(dict(fused, **{extra: state[extra]}), c, fused=True)


# google/gemma-3-1b-pt's config.json (transformers 4.50 spelling), shrunk.
GEMMA3_1B = cfg("gemma3_text", head_dim=16, num_hidden_layers=8, num_key_value_heads=1,
                attention_bias=False, attention_dropout=0.0, attn_logit_softcapping=None,
                bos_token_id=2, cache_implementation="hybrid", eos_token_id=1,
                final_logit_softcapping=None, hidden_activation="gelu_pytorch_tanh",
                initializer_range=0.02, max_position_embeddings=32768, pad_token_id=0,
                query_pre_attn_scalar=256, rms_norm_eps=1e-06, rope_local_base_freq=10000,
                rope_scaling=None, rope_theta=1000000, sliding_window=512,
                sliding_window_pattern=6, torch_dtype="bfloat16", use_cache=True)


# google/gemma-3-4b-it's config.json (vision_config shortened): the text_config leaves out what
# transformers' Gemma3TextConfig class defaults fill in.
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                    "model_type": "gemma3_text", "num_hidden_layers": 34,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "model_type": "siglip_vision_model",
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}}


def test_reads_the_language_model_of_a_multimodal_gemma3_config():
  c = config_from_hf(GEMMA3_4B)
  assert isinstance(c, Gemma3Config) and c.num_layers == 34 and c.hidden_size == 2560
  assert c.layer_rope(None) == (1e6, RopeScaling("linear", 8.0))
  assert c.layer_rope(1024) == (1e4, None)
  assert c.layer_windows == tuple(None if (i + 1) % 6 == 0 else 1024 for i in range(34))
  transformers = pytest.importorskip("transformers")  # transformers' own reading of the defaults
  t = transformers.Gemma3Config(**{k: v for k, v in GEMMA3_4B.items()
                                   if k not in ("architectures", "model_type")}).text_config
  assert (c.vocab_size, c.num_heads, c.num_kv_heads, c.head_dim, c.query_pre_attn_scalar,
          c.rms_norm_eps, c.max_position_embeddings) == (
      t.vocab_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim,
      t.query_pre_attn_scalar, t.rms_norm_eps, t.max_position_embeddings)
  assert c.layer_types == tuple(t.layer_types) and c.tie_word_embeddings


def test_multimodal_gemma3_checkpoint_loads_its_language_model_weights(tmp_path):
  """Both naming schemes of the language model's tensors (legacy ``language_model.model.*``,
  transformers 4.52+ in memory ``model.language_model.*``); the vision tower's tensors are left
  out; a tensor of neither kind, or one given under both schemes, is refused."""
  st = pytest.importorskip("safetensors.numpy")
  text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
  hf = dict(GEMMA3_4B, text_config=dict(text, model_type="gemma3_text"))
  config = config_from_hf(hf)
  params = gemma2.init_params(config, jax.random.PRNGKey(0))
  state = params_to_hf(params, config)
  image = {"vision_tower.vision_model.post_layernorm.weight": np.ones(4, np.float32),
           "multi_modal_projector.mm_soft_emb_norm.weight": np.ones(4, np.float32)}
  (tmp_path / "config.json").write_text(json.dumps(hf))
  for prefix in ("language_model.model.", "model.language_model."):
    named = {prefix + k.removeprefix("model."): w for k, w in state.items()}
    st.save_file({**named, **image}, str(tmp_path / "model.safetensors"))
    _, loaded = load_hf_checkpoint(tmp_path)
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  for extra, match in (({"foo.weight": np.ones(4, np.float32)}, "neither"),
                       ({"language_model.model.norm.weight": state["model.norm.weight"]},
                        "twice")):
    st.save_file({**named, **image, **extra}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
      load_hf_checkpoint(tmp_path)


def test_reads_gemma3_both_spellings():
  c = config_from_hf(GEMMA3_1B)
  assert isinstance(c, Gemma3Config) and c.qk_norm and c.head_dim == 16
  assert c.layer_windows == (512,) * 5 + (None,) + (512,) * 2  # every sixth layer global
  assert c.layer_rope(512) == (10000.0, None) and c.layer_rope(None) == (1e6, None)
  assert c.attn_logit_softcapping is None and c.final_logit_softcapping is None
  # Gemma 3 4B's text config: linear scaling (factor 8) on the global layers only.
  c = config_from_hf(dict(GEMMA3_1B, rope_scaling={"rope_type": "linear", "factor": 8.0}))
  assert c.layer_rope(None) == (1e6, RopeScaling("linear", 8.0))
  assert c.layer_rope(512) == (10000.0, None)
  # transformers 5's spelling: one RoPE dict per layer type, layer_types spelled out.
  v5 = {k: v for k, v in GEMMA3_1B.items()
        if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                     "sliding_window_pattern")}
  v5.update(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 7.0},
                             "full_attention": {"rope_type": "llama3", "rope_theta": 9.0,
                                                "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 64}},
            # transformers writes its private pattern (6 by default) beside any layer_types
            layer_types=["sliding_attention", "full_attention"] * 4, _sliding_window_pattern=6,
            use_bidirectional_attention=False)
  c = config_from_hf(v5)
  assert c.layer_windows == (512, None) * 4
  assert c.layer_rope(512) == (7.0, None)
  assert c.layer_rope(None) == (9.0, RopeScaling("llama3", 8.0, 1.0, 4.0, 64))
  # A nested llama3 dict without its original context takes max_position_embeddings (a top-level
  # original_max_position_embeddings applies to flat dicts only: here it is refused).
  nested = dict(v5["rope_parameters"]["full_attention"])
  del nested["original_max_position_embeddings"]
  c = config_from_hf(dict(v5, rope_parameters=dict(v5["rope_parameters"], full_attention=nested)))
  assert c.layer_rope(None)[1].original_max_position_embeddings == 32768
  with pytest.raises(ValueError, match="original_max_position_embeddings"):
    config_from_hf(dict(v5, original_max_position_embeddings=8))
  # Absent fields: transformers' Gemma 3 class defaults.
  bare = {k: v for k, v in cfg("gemma3_text").items() if k != "num_key_value_heads"}
  c = config_from_hf(bare)
  assert (c.head_dim, c.num_kv_heads, c.sliding_window) == (256, 4, 4096)
  assert c.layer_windows == (4096, 4096)  # sliding_window_pattern 6: layer 5 would be global
  assert c.layer_rope(4096) == (10000.0, None) and c.layer_rope(None) == (1e6, None)


@pytest.mark.parametrize("hf, match", [
    (cfg("gpt2"), "model_type='gpt2' is not implemented"),
    ({**cfg("llama"), "architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({**cfg("llama"), "model_type": None, "architectures": ["FooForCausalLM"]}, "no model_type"),
    (cfg("llama", rope_scaling={"rope_type": "longrope", "factor": 4.0}), "RoPE type 'longrope'"),
    (cfg("llama", rope_scaling={"rope_type": "yarn"}), "yarn RoPE scaling without 'factor'"),
    (cfg("llama", rope_scaling={"rope_type": "linear"}), "without 'factor'"),
    (cfg("llama", rope_scaling={"rope_type": "linear", "factor": 2.0, "beta": 1}),
     r"RoPE parameter\(s\) \['beta'\]"),
    (cfg("llama", partial_rotary_factor=0.5), "partial_rotary_factor"),
    (cfg("llama", rope_parameters={"full_attention": {"rope_type": "default"}}),
     "per-layer-type RoPE"),
    (cfg("llama", attention_bias=True), "o_proj"),
    (cfg("llama", mlp_bias=True), "mlp_bias"),
    (cfg("llama", hidden_act="gelu"), "hidden_act"),
    (cfg("llama", sliding_window=16), "ignores sliding_window"),
    (cfg("llama", some_new_field=3), r"\['some_new_field'\] are not implemented"),
    (cfg("llama", quantization_config={"bits": 4}), "quantization_config"),
    (cfg("mistral", sliding_window=16, use_sliding_window=False), "contradicts"),
    (cfg("mistral", layer_types=["full_attention"] * 2), "Ministral"),
    (cfg("qwen2", use_mrope=True), "use_mrope"),
    (cfg("qwen2", num_experts=8), "mixture of experts"),
    (cfg("qwen2", layer_types=["sliding_attention"] * 2), "window is off"),
    (cfg("qwen3", attention_bias=True), "o_proj"),
    (cfg("qwen3", use_mrope=True), r"\['use_mrope'\] are not implemented"),
    (cfg("qwen3", layer_types=["sliding_attention"] * 2), "window is off"),
    (cfg("qwen3", num_experts=8), "mixture of experts"),  # Qwen3-MoE is another model_type
    (cfg("qwen3_moe", decoder_sparse_step=2), "decoder_sparse_step=2"),
    (cfg("qwen3_moe", mlp_only_layers=[1]), "mlp_only_layers"),
    (cfg("qwen3_moe", num_experts=4, num_local_experts=8), "differ"),
    (cfg("qwen3_moe", num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5"),
    (cfg("qwen3_moe", layer_types=["sliding_attention"] * 2), "Qwen3-MoE"),
    (cfg("qwen3_moe", use_sliding_window=True, max_window_layers=1), "Qwen3-MoE"),
    (cfg("qwen3_moe", attention_bias=True), "o_proj"),
    (cfg("mixtral", attention_bias=True), "attention_bias"),
    (cfg("mixtral", moe_intermediate_size=24), r"\['moe_intermediate_size'\] are not"),
    (cfg("mixtral", num_experts=4, num_local_experts=8), "differ"),
    (cfg("qwen2_moe", num_experts=4, use_sliding_window=True), "Qwen2-MoE's sliding windows"),
    (cfg("qwen2_moe", num_experts=4, attention_bias=True), "qkv_bias is"),
    (cfg("qwen2_moe", num_experts=4, mlp_only_layers=[0]), "mlp_only_layers"),
    (cfg("qwen2_moe", num_local_experts=4, num_experts_per_tok=2), "num_local_experts"),
    # Phi-4-mini: partial rotary and LongRoPE; Phi-3-mini-128k: LongRoPE ("su" in old configs).
    (dict(PHI3_MINI, partial_rotary_factor=0.75), "partial_rotary_factor"),
    (dict(PHI3_MINI, rope_scaling={"type": "longrope", "short_factor": [1.0] * 4,
                                   "long_factor": [1.0] * 4}), "'longrope'"),
    (dict(PHI3_MINI, rope_scaling={"type": "su", "short_factor": [1.0] * 4,
                                   "long_factor": [1.0] * 4}), "RoPE type 'su'"),
    (dict(PHI3_MINI, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "RoPE type 'yarn'"),
    (dict(PHI3_MINI, rope_scaling={"rope_type": None, "type": "yarn", "factor": 4.0}),
     "RoPE type 'yarn'"),
    # transformers' Phi-3 validation takes only default RoPE or LongRoPE.
    (dict(PHI3_MINI, rope_scaling={"rope_type": "linear", "factor": 2.0}), "RoPE type 'linear'"),
    # YaRN fields transformers reads differently from what a truncation would give.
    (cfg("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": 20.5}),
     "original_max_position_embeddings=20.5 is not an integer"),
    (cfg("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                "original_max_position_embeddings": None}),
     "original_max_position_embeddings=None"),
    (cfg("llama", rope_scaling={"rope_type": "linear", "factor": None}), "factor=None"),
    (dict(PHI3_MINI, attention_bias=True), "attention_bias"),
    (cfg("gemma2", hidden_activation="gelu"), "hidden_activation"),
    (cfg("gemma2", attention_bias=True), "attention_bias"),
    (cfg("gemma2", use_bidirectional_attention=True), "bidirectional"),
    (cfg("gemma2", sliding_window=8, sliding_window_size=16), "sliding_window_size"),
    (cfg("gemma2", sliding_window=None), "without a window"),
    (dict(GEMMA3_1B, attn_logit_softcapping=50.0), "never applies"),
    (dict(GEMMA3_1B, attention_bias=True), "attention_bias"),
    (dict(GEMMA3_1B, use_bidirectional_attention=True), "bidirectional"),
    (dict(GEMMA3_1B, sliding_window=None), "without a window"),
    # transformers keeps rope_type "default" under a legacy "type" key: no scaling, a stray
    # factor.
    (dict(GEMMA3_1B, rope_scaling={"type": "linear", "factor": 4.0}),
     r"\['factor'\] of type 'default'"),
    (dict(GEMMA3_1B, rope_scaling={"rope_type": "yarn", "factor": 8.0}),
     r"yarn RoPE \(full_attention\) is not implemented"),
    (dict(GEMMA3_1B, rope_parameters={"rope_type": "default", "rope_theta": 5.0}),
     "one dict per layer type"),
    (dict(GEMMA3_1B, rope_parameters={"sliding_attention": {"rope_type": "linear",
                                                            "factor": 2.0}}),
     "sliding layers"),
    (dict(GEMMA3_1B, layer_types=["full_attention"] * 8), "contradicts sliding_window_pattern"),
    (dict(GEMMA3_1B, _sliding_window_pattern=2), "differ"),
    (dict(GEMMA3_1B, final_logit_softcapping="30"), "not a number"),
    (dict(GEMMA3_1B, mlp_bias=False), r"\['mlp_bias'\] are not implemented"),
    (dict(GEMMA3_1B, model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"]),
     "text_config=None is not a dict"),  # the multimodal model keeps its text model apart
    (dict(GEMMA3_4B, text_config=dict(GEMMA3_4B["text_config"], tie_word_embeddings=False)),
     "tie_word_embeddings=False"),
    (dict(GEMMA3_4B, text_config=dict(GEMMA3_4B["text_config"], model_type="gemma2")),
     "is not gemma3_text"),
    (dict(GEMMA3_4B, text_config=dict(GEMMA3_4B["text_config"], foo=1)),
     r"\['foo'\] are not implemented"),
    (dict(GEMMA3_4B, foo=1), r"\['foo'\] are not implemented"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_refuses_what_it_does_not_run(hf, match):
  with pytest.raises(ValueError, match=match):
    config_from_hf(hf)


@pytest.mark.parametrize("config", [
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, attention_bias=True),
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=12, qk_norm=True),
    Gemma3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=8),
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, num_experts=3),
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, qk_norm=True, num_experts=3, moe_intermediate_size=16,
                norm_topk_prob=False),
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                num_kv_heads=2, attention_bias=True, num_experts=3, moe_intermediate_size=16,
                norm_topk_prob=False, shared_expert_intermediate_size=24),
    Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                 num_heads=4, num_kv_heads=2, head_dim=8),
], ids=["qwen2-style", "qwen3-style", "gemma3", "mixtral", "qwen3-moe", "qwen2-moe", "gemma2"])
def test_state_dict_roundtrip_and_unused_tensors(config):
  module = gemma2 if isinstance(config, Gemma2Config) else llama
  params = module.init_params(config, jax.random.PRNGKey(0))
  state = params_to_hf(params, config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params_from_hf(state, config), params)
  # A tensor the config does not declare (here an output-projection bias) is never dropped.
  extra = dict(state, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)})
  with pytest.raises(ValueError, match="o_proj.bias"):
    params_from_hf(extra, config)
  if config.tie_word_embeddings:  # a tied head saved twice is fine; a different one is not
    embed = state["model.embed_tokens.weight"]
    params_from_hf(dict(state, **{"lm_head.weight": embed}), config)
    with pytest.raises(ValueError, match="lm_head"):
      params_from_hf(dict(state, **{"lm_head.weight": embed + 1}), config)


def test_mixture_of_experts_configs_round_trip_through_to_hf():
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
              num_kv_heads=2, num_experts=4, num_experts_per_tok=2)
  for config, model_type in ((LlamaConfig(**base), "mixtral"),
                             (LlamaConfig(**base, sliding_window=8), "mixtral"),
                             (LlamaConfig(**base, qk_norm=True, moe_intermediate_size=16,
                                          norm_topk_prob=False), "qwen3_moe"),
                             (LlamaConfig(**base, qk_norm=True, sliding_window=8), "qwen3_moe"),
                             (LlamaConfig(**base, attention_bias=True, norm_topk_prob=False,
                                          moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24), "qwen2_moe"),
                             (LlamaConfig(**base, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24), "qwen2_moe")):
    hf = config.to_hf()
    assert hf["model_type"] == model_type
    got = config_from_hf(hf)
    assert got.layer_windows == config.layer_windows
    assert dataclasses.replace(got, layer_types=None) == config
  for bad in (dict(norm_topk_prob=False), dict(moe_intermediate_size=16),
              dict(attention_bias=True)):
    with pytest.raises(ValueError, match="no to_hf spelling"):
      LlamaConfig(**base, **bad).to_hf()


def test_qk_norm_configs_round_trip_through_to_hf():
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=12, qk_norm=True)
  for config in (LlamaConfig(**base), LlamaConfig(**base, sliding_window=8),
                 LlamaConfig(**base, tie_word_embeddings=True)):
    hf = config.to_hf()
    assert hf["model_type"] == "qwen3" and hf["architectures"] == ["Qwen3ForCausalLM"]
    got = config_from_hf(hf)  # a window on every layer comes back spelled per layer
    assert got.layer_windows == config.layer_windows
    assert dataclasses.replace(got, layer_types=None) == config
  with pytest.raises(ValueError, match="o_proj"):  # Qwen3's attention_bias would add o's bias
    LlamaConfig(**base, attention_bias=True).to_hf()


def test_absent_fields_take_transformers_class_defaults():
  """An absent key means transformers' class default, which an explicit null need not: a
  Mistral config without ``sliding_window`` runs a 4096 window in transformers (null: none),
  and one without ``num_key_value_heads`` has 8 KV heads (Qwen2 and Qwen3 32, Gemma 2 4, Llama:
  the query heads); Qwen3 without ``head_dim`` has 128 (not hidden / heads)."""
  def without(model_type, *keys, **kw):
    hf = cfg(model_type, **kw)
    for k in keys:
      hf.pop(k, None)
    return hf

  assert config_from_hf(without("mistral", "sliding_window")).layer_windows == (4096, 4096)
  assert config_from_hf(cfg("mistral", sliding_window=None)).layer_windows == (None, None)
  c = config_from_hf(without("qwen2", "sliding_window", use_sliding_window=True,
                             max_window_layers=1))
  assert c.layer_windows == (None, 4096)
  heads = dict(num_attention_heads=32, hidden_size=256)
  for model_type, want in (("mistral", 8), ("qwen2", 32), ("qwen3", 32), ("gemma2", 4),
                           ("llama", 32)):
    c = config_from_hf(without(model_type, "num_key_value_heads", **heads))
    assert c.num_kv_heads == want, model_type
    assert config_from_hf(cfg(model_type, **heads, num_key_value_heads=None)).num_kv_heads == 32
  assert config_from_hf(without("qwen3", "head_dim")).head_dim == 128  # hidden / heads is 8
  # Mixture of experts: Mixtral's RoPE base is 1e6 and it has no window unless set; Qwen3-MoE
  # has 128 experts of width 768, 8 per token, not renormalised, head_dim hidden / heads.
  c = config_from_hf(without("mixtral", "num_key_value_heads", **heads))
  assert (c.rope_theta, c.layer_windows, c.num_kv_heads) == (1e6, (None, None), 8)
  assert c.rms_norm_eps == 1e-5  # Mixtral's class default; the others' is 1e-6
  assert (c.num_experts, c.num_experts_per_tok) == (8, 2)
  c = config_from_hf(without("qwen2_moe", "num_key_value_heads", **heads))
  assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size,
          c.shared_expert_intermediate_size, c.num_kv_heads) == (60, 4, 1408, 5632, 16)
  assert c.attention_bias and not c.norm_topk_prob
  c = config_from_hf(without("qwen3_moe", "num_key_value_heads", **heads))
  assert (c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size) == (128, 8, 768)
  assert (c.norm_topk_prob, c.head_dim, c.num_kv_heads, c.rope_theta) == (False, 8, 4, 1e4)
  assert config_from_hf(without("qwen2", "head_dim")).head_dim == 8


@pytest.mark.parametrize("hf, match", [
    (cfg("llama", num_hidden_layers=2.5), "num_hidden_layers=2.5 is not an integer"),
    (cfg("llama", head_dim=8.5), "head_dim=8.5 is not an integer"),
    (cfg("llama", num_key_value_heads=True), "num_key_value_heads=True"),
    (cfg("gemma2", query_pre_attn_scalar=None), "query_pre_attn_scalar=None"),
    # A null or a mistyped value is not the default (transformers refuses each of these).
    (cfg("llama", tie_word_embeddings="false"), "tie_word_embeddings='false' is not a bool"),
    (cfg("llama", tie_word_embeddings=None), "tie_word_embeddings=None"),
    (cfg("llama", rms_norm_eps=None), "rms_norm_eps=None"),
    (cfg("llama", hidden_act=None), "hidden_act=None"),
    (cfg("llama", attention_bias=None), "attention_bias=None"),
    (cfg("llama", rope_theta=None), "rope_theta=None"),
    (cfg("llama", max_position_embeddings=None), "max_position_embeddings=None"),
    (cfg("qwen2", use_sliding_window=None), "use_sliding_window=None"),
    (cfg("qwen2", max_window_layers=None), "max_window_layers=None"),
    (cfg("gemma2", hidden_activation=None), "hidden_activation=None"),
    (cfg("gemma2", head_dim=None), "head_dim=None"),
    (cfg("qwen3", head_dim=None), "head_dim=None"),
    (cfg("gemma3_text", head_dim=None), "head_dim=None"),
    (cfg("gemma3_text", rope_local_base_freq=None), "rope_local_base_freq=None"),
    (cfg("qwen3", use_sliding_window=None), "use_sliding_window=None"),
], ids=["float_layers", "float_head_dim", "bool_kv_heads", "null_scalar", "str_tie", "null_tie",
        "null_eps", "null_act", "null_bias", "null_theta", "null_max_pos", "null_qwen_window",
        "null_max_window_layers", "null_gemma_act", "null_gemma_head_dim",
        "null_qwen3_head_dim", "null_qwen3_window", "null_gemma3_head_dim",
        "null_gemma3_local_theta"])
def test_refuses_fields_transformers_rejects(hf, match):
  with pytest.raises(ValueError, match=match):
    config_from_hf(hf)


def _small_checkpoint():
  config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2)
  params = llama.init_params(config, jax.random.PRNGKey(0))
  return config, params, params_to_hf(params, config)


def test_integer_tensors_are_refused_by_name():
  config, _, state = _small_checkpoint()
  name = "model.layers.0.mlp.up_proj.weight"
  with pytest.raises(ValueError, match="up_proj.weight.*int8"):
    params_from_hf(dict(state, **{name: state[name].astype(np.int8)}), config)


def test_checkpoint_files_resolve_as_transformers_does(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  config, params, state = _small_checkpoint()
  (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
  names = sorted(state)
  half = len(names) // 2
  shards = {"model-00001-of-00002.safetensors": names[:half],
            "model-00002-of-00002.safetensors": names[half:]}
  for file, keys in shards.items():
    st.save_file({k: state[k] for k in keys}, str(tmp_path / file))
  # Two shards and no index: which files form the checkpoint is ambiguous.
  with pytest.raises(ValueError, match="ambiguous"):
    load_hf_checkpoint(tmp_path)
  index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  _, loaded = load_hf_checkpoint(tmp_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  # A stray file beside the shards is not read (transformers ignores it too) ...
  st.save_file({"model.norm.weight": np.full(32, 7.0, np.float32)},
               str(tmp_path / "zz-extra.safetensors"))
  _, loaded = load_hf_checkpoint(tmp_path)
  np.testing.assert_array_equal(loaded["final_norm"], params["final_norm"])
  # ... but a tensor two listed files hold, or one the index misplaces, is refused.
  index["weight_map"]["model.norm.weight"] = "zz-extra.safetensors"
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match="model.norm.weight"):
    load_hf_checkpoint(tmp_path)
  # model.safetensors wins over everything else, as in transformers.
  st.save_file(state, str(tmp_path / "model.safetensors"))
  _, loaded = load_hf_checkpoint(tmp_path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
