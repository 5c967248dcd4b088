"""The Llama model on the paged cache against full recomputation (float64 numpy) and the contiguous
strategy; config and checkpoint round trips. The comparison with Hugging Face ``transformers``
for every family is tests/test_families.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_paged_kv import CacheShapeError, CacheStrategy, allocate_sequences, init_cache
from jax_paged_kv.models import (
  LlamaConfig,
  check_params,
  forward,
  init_params,
  load_hf_checkpoint,
  params_from_hf,
  params_to_hf,
  read_safetensors,
)
from tests.llama_fixtures import SMALL, decode_greedy, forward_jit, run_chunked
from tests.llama_reference import reference_logits


def test_logits_match_full_recomputation_and_contiguous():
  params = init_params(SMALL, jax.random.PRNGKey(1), scale=2.0)
  rng = np.random.default_rng(0)
  lens = [1, 4, 5, 11, 13]  # block_size 4: within, at and across block boundaries
  prompts = [rng.integers(0, SMALL.vocab_size, n).tolist() for n in lens]
  slots = [3, 0, 4, 1, 2]
  runs = {}
  # (strategy, max_blocks): the engine's XLA path reads only a bucket of table columns.
  for strategy, mb in ((CacheStrategy.PAGED, None), (CacheStrategy.CONTIGUOUS, None),
                       (CacheStrategy.PAGED, 5)):
    cc = SMALL.cache_config(num_blocks=1 + 5 * 6, max_seqs=5, max_seq_len=24, block_size=4,
                            strategy=strategy)
    # NaN-poisoned pool: unused slots and unwritten block tails must never reach an output.
    cache = init_cache(cc, pool_fill=float("nan"))
    cache, pre = run_chunked(params, SMALL, cache, prompts, slots, chunk=3, max_blocks=mb)
    cache, toks, dec = decode_greedy(params, SMALL, cache, slots, [lg[-1] for lg in pre],
                                     steps=7, max_blocks=mb)
    assert np.all(np.asarray(cache.seq_lens)[slots] == np.asarray(lens) + 7)
    runs[strategy, mb] = [np.concatenate([p, d]) for p, d in zip(pre, dec, strict=True)], toks
  logits, toks = runs[CacheStrategy.PAGED, None]
  refs = [reference_logits(params, SMALL, prompt + toks[i].tolist())  # float64, no cache
          for i, prompt in enumerate(prompts)]
  for key, (run_logits, run_toks) in runs.items():
    np.testing.assert_array_equal(run_toks, toks)
    for got, ref in zip(run_logits, refs, strict=True):
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=str(key))
  # The two paged runs add the same keys in the same order (four pages at a time); the
  # contiguous cache reads its slab in position order, a different float32 summation order,
  # so it is held to the float64 reference above rather than to the paged run's rounding.
  for a, b in zip(runs[CacheStrategy.PAGED, 5][0], logits, strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", [
    # MQA with a GQA ratio of 5, tied embeddings, q/k/v biases, head_dim != hidden / heads.
    LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=5,
                num_kv_heads=1, head_dim=8, tie_word_embeddings=True, attention_bias=True,
                rope_theta=10000.0, rms_norm_eps=1e-6),
], ids=["mqa5-tied-bias"])
def test_model_variants_match_recomputation(config):
  params = init_params(config, jax.random.PRNGKey(3))
  assert "lm_head" not in params
  prompts = [np.random.default_rng(2).integers(0, config.vocab_size, 10).tolist()]
  cc = config.cache_config(num_blocks=8, max_seqs=1, max_seq_len=16, block_size=4)
  cache = init_cache(cc, pool_fill=float("nan"))
  cache, pre = run_chunked(params, config, cache, prompts, [0], chunk=6)
  _, toks, dec = decode_greedy(params, config, cache, [0], [pre[0][-1]], 3)
  ref = reference_logits(params, config, prompts[0] + toks[0].tolist())
  np.testing.assert_allclose(np.concatenate([pre[0], dec[0]]), ref, rtol=1e-5, atol=1e-5)


def test_padding_rows_and_shape_errors():
  params = init_params(SMALL, jax.random.PRNGKey(4))
  cc = SMALL.cache_config(num_blocks=9, max_seqs=2, max_seq_len=16, block_size=4)
  cache = init_cache(cc)
  cache, _ = allocate_sequences(cache, np.int32(1))
  toks = np.asarray([[5, 6, 7], [1, 2, 3]], np.int32)
  cache, logits, status = forward_jit(params, cache, toks, np.asarray([-1, 1], np.int32),
                                      config=SMALL, all_logits=True)
  assert np.asarray(status).tolist() == [0, 0]
  assert np.asarray(cache.seq_lens).tolist() == [0, 3]  # the padding row wrote nothing
  np.testing.assert_allclose(np.asarray(logits[1]), reference_logits(params, SMALL, [1, 2, 3]),
                             rtol=1e-5, atol=1e-5)
  other = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3,
                      num_heads=4, num_kv_heads=2)
  with pytest.raises(CacheShapeError, match="does not fit the model"):
    forward(init_params(other, jax.random.PRNGKey(0)), cache, toks, np.asarray([0, 1]),
            config=other)
  with pytest.raises(CacheShapeError, match="tokens must be"):
    forward(params, cache, np.zeros(3, np.int32), np.asarray([0, 1]), config=SMALL)


def test_config_validation():
  with pytest.raises(ValueError, match="num_kv_heads"):
    LlamaConfig(vocab_size=8, hidden_size=12, intermediate_size=8, num_layers=1, num_heads=3,
                num_kv_heads=2)
  with pytest.raises(ValueError, match="head_dim"):
    LlamaConfig(vocab_size=8, hidden_size=15, intermediate_size=8, num_layers=1, num_heads=5,
                num_kv_heads=5)
  hf = SMALL.to_hf()
  assert LlamaConfig.from_hf(hf) == SMALL
  with pytest.raises(ValueError, match="RoPE type 'longrope' is not implemented"):
    LlamaConfig.from_hf({**hf, "rope_scaling": {"rope_type": "longrope", "factor": 8.0}})
  with pytest.raises(ValueError, match="without 'low_freq_factor'"):
    LlamaConfig.from_hf({**hf, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
  with pytest.raises(ValueError, match="hidden_act"):
    LlamaConfig.from_hf({**hf, "hidden_act": "gelu"})
  # transformers >= 5 keeps rope_theta inside rope_parameters.
  v5 = {k: v for k, v in hf.items() if k != "rope_theta"}
  v5["rope_parameters"] = {"rope_type": "default", "rope_theta": 123.0}
  assert LlamaConfig.from_hf(v5).rope_theta == 123.0


def test_hf_state_dict_and_safetensors_roundtrip(tmp_path):
  st = pytest.importorskip("safetensors.numpy")
  params = init_params(SMALL, jax.random.PRNGKey(5))
  state = params_to_hf(params, SMALL)
  assert state["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # [out, in]
  # The independent writer: the safetensors package.
  st.save_file(state, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(SMALL.to_hf()))
  raw = read_safetensors(tmp_path / "model.safetensors")
  assert raw.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(raw[k], state[k])
  config, loaded = load_hf_checkpoint(tmp_path)
  assert config == SMALL
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  # float16 tensors load and are cast to the model dtype.
  st.save_file({k: v.astype(np.float16) for k, v in state.items()}, str(tmp_path / "h.st"))
  half = read_safetensors(tmp_path / "h.st")
  assert half["model.norm.weight"].dtype == np.float16
  p16 = params_from_hf(half, SMALL)
  assert p16["embed"].dtype == jnp.float32
  del state["model.layers.0.mlp.up_proj.weight"]
  with pytest.raises(ValueError, match="up_proj"):
    params_from_hf(state, SMALL)
  bad = dict(params, final_norm=jnp.ones((3,)))
  with pytest.raises(ValueError, match="final_norm"):
    check_params(SMALL, bad)
