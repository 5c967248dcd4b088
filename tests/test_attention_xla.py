"""The shared attention cases on the plain-XLA implementation."""

import pytest

import jax_paged_kv as pk
from tests.attention_cases import (
    DECODE_CASES,
    NONFINITE_V_CASES,
    PREFILL_CASES,
    QUANT_CASES,
    AttentionCases,
    Case,
    build_case,
    poison_v,
)


def _subset(cases, keep):
  """``cases`` with those not in ``keep`` (indices) marked slow (``-m slow`` runs them)."""
  return [c if i in keep else pytest.param(c, marks=pytest.mark.slow)
          for i, c in enumerate(cases)]


# The interleave only changes the order pages are copied in, and the masked null-block padding of
# tables whose block count is not a multiple of it. The default class runs the whole grid; the
# other interleaves run the cases that meet that padding with every option it could disturb:
# ragged lengths (0 ... 255 tokens, 0 ... 16 blocks), padding rows, GQA 20, a 513-token row,
# windows, soft caps, ragged prefill rows. The rest of the grid runs with -m slow.
INTERLEAVE_DECODE = _subset(DECODE_CASES, {0, 6, 7, 10, 11})
INTERLEAVE_PREFILL = _subset(PREFILL_CASES, {0, 2, 4})


class TestXLA(AttentionCases):
  """Default knobs: four pages copied at once (``interleave=4``), keys out of position order."""

  implementation = "xla"
  knobs = {}


class TestXLAInOrder(AttentionCases):
  """Pages copied one after another, keys in position order (what a contiguous cache uses)."""

  implementation = "xla"
  knobs = {"interleave": 1}
  decode_cases = INTERLEAVE_DECODE
  prefill_cases = INTERLEAVE_PREFILL
  quantized_cases = QUANT_CASES[:1]


class TestXLAInterleave3(AttentionCases):
  """Three pages at once: tables that are not a multiple of 3 get masked null-block padding."""

  implementation = "xla"
  knobs = {"interleave": 3}
  decode_cases = INTERLEAVE_DECODE
  prefill_cases = INTERLEAVE_PREFILL
  quantized_cases = QUANT_CASES[1:]


@pytest.mark.parametrize("interleave", [0, -2, 1.5, True])
def test_bad_interleave_raises(interleave):
  case = Case((3, 17), ratio=2)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  with pytest.raises(ValueError, match="interleave"):
    pk.paged_attention(q, cache, seq_ids, layer, implementation="xla", interleave=interleave)


def test_nonfinite_v_under_shard_map_over_kv_heads():
  """The slow path's loop carry keeps the pools' varying mesh axis (it was traced with an
  unvarying one at first, which shard_map rejects), and gives the unsharded answer, NaNs
  included."""
  import jax
  import numpy as np
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  pv = next(c for c in NONFINITE_V_CASES if c.name == "nan_causal")
  cache, q, seq_ids, q_lens, layer = build_case(pv.case)
  cache, q = poison_v(pv, cache, q, layer)

  def attend(cache, q):
    return pk.paged_attention(q, cache, seq_ids, layer, q_lens=q_lens, implementation="xla")

  want = jax.jit(attend)(cache, q)
  mesh = Mesh(np.array(jax.devices()[:2]), ("heads",))
  spec = jax.tree_util.tree_map(lambda _: P(), cache).replace(
      k_pool=P(None, "heads"), v_pool=P(None, "heads"))
  got = jax.jit(jax.shard_map(attend, mesh=mesh, in_specs=(spec, P(None, None, "heads")),
                              out_specs=P(None, None, "heads")))(cache, q)
  assert np.isnan(np.asarray(want)).any()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)  # NaN = NaN


def test_scratch_memory_does_not_grow_with_the_pool():
  """A decode call's scratch (XLA's temp buffer) depends on the rows and the table width it
  reads, not on the pool: indexing the layer separately (``pool[layer][...]``) let XLA copy
  the whole layer of K and V into scratch for the non-finite-V branch, taken or not."""
  import jax
  import jax.numpy as jnp

  from jax_paged_kv.attention.reference import paged_attention_xla

  def temp_bytes(num_blocks):
    pool = jax.ShapeDtypeStruct((4, 2, num_blocks, 16, 64), jnp.float32)
    args = (jax.ShapeDtypeStruct((8, 1, 8, 64), jnp.float32), pool, pool,
            jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((8, 16), jnp.int32),
            jax.ShapeDtypeStruct((8,), jnp.int32), jax.ShapeDtypeStruct((8,), jnp.int32))
    fn = jax.jit(lambda *a: paged_attention_xla(*a, scale=0.125))
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

  small, big = temp_bytes(64), temp_bytes(4096)  # one layer: 0.5 MiB vs 32 MiB per pool
  assert big == small, (small, big)
  assert small < 2 * 8 * 16 * 16 * 64 * 4 * 4  # a few copies of the rows' pages at most
