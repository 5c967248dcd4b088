"""The decode step exported with jax.export: serialise, deserialise, run, same results."""

import dataclasses

import jax
import numpy as np
import pytest

from jax_paged_kv import CacheShapeError, allocate_sequences, init_cache
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import decode_step
from jax_paged_kv.serving.export import ExportedDecodeStep, export_decode_step
from tests.llama_fixtures import SMALL


def filled_cache(params):
  """A cache with three sequences of different lengths (prefilled through the model)."""

  cc = SMALL.cache_config(num_blocks=24, max_seqs=4, max_seq_len=32, block_size=4)
  cache = init_cache(cc)
  cache, _ = allocate_sequences(cache, np.asarray([0, 1, 3], np.int32))
  rng = np.random.default_rng(0)
  for sid, n in ((0, 5), (1, 9), (3, 2)):
    for t in rng.integers(0, 128, n):
      cache, _, status = decode_step(params, cache, np.asarray([t], np.int32),
                                     np.asarray([sid], np.int32), config=SMALL)
      assert not np.any(np.asarray(status))
  return cache


def test_export_roundtrip_gives_identical_results(tmp_path):
  pytest.importorskip("flatbuffers")  # jax.export serialisation needs it
  params = init_params(SMALL, jax.random.PRNGKey(0), scale=2.0)
  cache = filled_cache(params)
  step = export_decode_step(params, cache, batch=4, config=SMALL)
  assert "stablehlo" in step.mlir_module()
  path = tmp_path / "decode_step.bin"
  path.write_bytes(step.serialize())
  loaded = ExportedDecodeStep.deserialize(path.read_bytes())
  assert loaded.batch == 4
  tokens = np.asarray([7, 8, 0, 9], np.int32)
  seq_ids = np.asarray([0, 1, -1, 3], np.int32)  # a padding row
  copy = jax.tree_util.tree_map(lambda x: x.copy(), cache)
  want_cache, want_logits, want_status = decode_step(params, copy, tokens, seq_ids,
                                                     config=SMALL)
  for _ in range(2):  # run twice: the exported step also chains
    got_cache, got_logits, got_status = loaded(params, cache, tokens, seq_ids)
    np.testing.assert_array_equal(np.asarray(got_logits), np.asarray(want_logits))
    np.testing.assert_array_equal(np.asarray(got_status), np.asarray(want_status))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got_cache, want_cache)
    cache = got_cache
    want_cache, want_logits, want_status = decode_step(params, want_cache, tokens, seq_ids,
                                                       config=SMALL)
  assert np.asarray(got_cache.seq_lens).tolist() == [7, 11, 0, 4]


def test_exported_step_rejects_wrong_leaves():
  params = init_params(SMALL, jax.random.PRNGKey(0))
  cache = init_cache(SMALL.cache_config(num_blocks=8, max_seqs=2, max_seq_len=16, block_size=4))
  step = export_decode_step(params, cache, batch=2, config=SMALL)
  with pytest.raises(CacheShapeError, match="leaves"):
    step({"embed": params["embed"]}, cache, [1, 2], [0, 1])



def test_exported_step_refuses_another_cache_config_and_bad_tokens():
  """max_seq_len 29 and 32 give the same leaf shapes at block 4 (8-block tables): the artifact
  would run a 29-token cache with its own limit of 32. The config travels with the serialised
  artifact and is compared on every call; float tokens are refused, not truncated."""
  pytest.importorskip("flatbuffers")
  params = init_params(SMALL, jax.random.PRNGKey(0))
  cc = SMALL.cache_config(num_blocks=8, max_seqs=2, max_seq_len=32, block_size=4)
  step = export_decode_step(params, init_cache(cc), batch=2, config=SMALL)
  loaded = ExportedDecodeStep.deserialize(step.serialize())
  other = init_cache(dataclasses.replace(cc, max_seq_len=29))
  assert [x.shape for x in jax.tree_util.tree_leaves(other)] == [
      x.shape for x in jax.tree_util.tree_leaves(init_cache(cc))]
  for s in (step, loaded):
    with pytest.raises(CacheShapeError, match="max_seq_len=32"):
      s(params, other, [1, 2], [0, 1])
    with pytest.raises(CacheShapeError, match="integer"):
      s(params, init_cache(cc), [1.7, 2.2], [0, 1])
  # A bare jax.export artifact (no header) still loads; its config is unknown.
  bare = ExportedDecodeStep.deserialize(step.exported.serialize())
  assert bare.cache_config is None and bare.batch == 2
