"""``paged_attention``'s argument contract: what it refuses, and the answers of edge shapes.

Every refusal is checked by the exception's type; every answer against the float64 oracle or the
contract's exact values (zeros and LSE -inf where a query sees nothing, NaN where a row cannot
be read whole).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from tests.attention_cases import Case, build_case, oracle

IMPLS = [("xla", {}), ("pallas_gpu", {"interpret": True}), ("pallas_tpu", {"interpret": True})]


def _setup():
  case = Case((1, 32), block_size=16, kv_heads=2, ratio=1, head_dim=16, q_len=3)
  return case, *build_case(case)


@pytest.mark.parametrize("q_lens, why", [
    ([-5, 3], "negative"), ([4, 3], "more than q_len=3"), ([3, 3], "more than the 1 tokens"),
])
def test_explicit_q_lens_out_of_range_raise_eagerly(q_lens, why):
  _, cache, q, seq_ids, _, layer = _setup()
  with pytest.raises(pk.InvalidCountError, match=why):
    pk.paged_attention(q, cache, seq_ids, layer, q_lens=q_lens)


def test_q_lens_inside_jit_are_clipped_and_padding_rows_take_any_count():
  case, cache, q, seq_ids, _, layer = _setup()
  f = jax.jit(lambda q, ql: pk.paged_attention(q, cache, seq_ids, layer, q_lens=ql))
  got = np.asarray(f(q, jnp.asarray([3, 3], jnp.int32)), np.float64)
  want, _ = oracle(case, cache, q, seq_ids, np.array([1, 3]), layer)  # row 0 holds one token
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  # A padding row (id -1) reads nothing whatever its count (up to q_len).
  out = pk.paged_attention(q, cache, np.array([-1, 1], np.int32), layer, q_lens=[3, 3])
  assert np.all(np.asarray(out)[0] == 0)


@pytest.mark.parametrize("impl, knobs", IMPLS, ids=[i for i, _ in IMPLS])
@pytest.mark.parametrize("shape", [(0, 1, 2, 16), (2, 0, 2, 16), (2, 1, 0, 16)],
                         ids=["batch0", "q_len0", "heads0"])
def test_empty_queries_give_empty_results(impl, knobs, shape):
  _, cache, _, seq_ids, _, layer = _setup()
  q = jnp.zeros(shape, jnp.float32)
  ids = seq_ids[:shape[0]]
  for call in (lambda q: pk.paged_attention(q, cache, ids, layer, return_lse=True,
                                            implementation=impl, **knobs),
               jax.jit(lambda q: pk.paged_attention(q, cache, ids, layer, return_lse=True,
                                                    implementation=impl, **knobs))):
    out, lse = call(q)
    assert out.shape == shape and out.dtype == q.dtype and lse.shape == shape[:3]
    assert lse.dtype == jnp.float32


@pytest.mark.parametrize("impl, knobs, match", [
    (None, {"block_k": 32}, r"implementation='xla' \(picked by implementation=None.*takes no "
     r"knob block_k; its knobs are max_blocks, interleave; block_k is a knob of 'pallas_gpu' / "
     r"'pallas_mgpu': pass implementation= explicitly"),
    ("pallas_tpu", {"interpret": True, "num_warps": 4},
     r"'pallas_tpu' takes no knob num_warps; its knobs are pages_per_compute_block, "
     r"queries_per_block, interpret; num_warps is a knob of 'pallas_gpu'"),
    ("xla", {"blok_k": 32}, r"takes no knob blok_k; its knobs are max_blocks, interleave(?!;)"),
])
def test_a_knob_of_another_implementation_is_named(impl, knobs, match):
  """A stray knob fails with the knobs the chosen kernel takes and the kernels that take it,
  eagerly and under jit, instead of a bare 'unexpected keyword argument'."""
  _, cache, q, seq_ids, _, layer = _setup()
  assert pk.default_implementation(config=cache.config) == "xla"  # this CPU
  with pytest.raises(TypeError, match=match):
    pk.paged_attention(q, cache, seq_ids, layer, implementation=impl, **knobs)
  with pytest.raises(TypeError, match=match):
    jax.jit(lambda q: pk.paged_attention(q, cache, seq_ids, layer, implementation=impl,
                                         **knobs))(q)


SEEN_KNOBS = []


def _kernel_with_any_knobs(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *, scale,
                           soft_cap, sliding_window, return_lse, k_scale=None, v_scale=None,
                           **knobs):
  """A user's kernel in the contract's ``**knobs`` form (here: xla underneath)."""
  from jax_paged_kv.attention.reference import paged_attention_xla
  SEEN_KNOBS.append(knobs)
  return paged_attention_xla(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens,
                             scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
                             return_lse=return_lse, k_scale=k_scale, v_scale=v_scale,
                             max_blocks=knobs.get("max_blocks"))


def test_a_kernel_declared_with_var_knobs_takes_any_knob(monkeypatch):
  from jax_paged_kv.attention import api
  monkeypatch.setitem(api.IMPLEMENTATIONS, "mine",
                      ("tests.test_attention_api", "_kernel_with_any_knobs"))
  case, cache, q, seq_ids, _, layer = _setup()
  got = pk.paged_attention(q, cache, seq_ids, layer, implementation="mine", max_blocks=2,
                           my_knob=7)
  assert SEEN_KNOBS[-1] == {"max_blocks": 2, "my_knob": 7}
  want, _ = oracle(case, cache, q, seq_ids, np.array([1, 3]), layer)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("max_blocks", [0, -1, True, 1.5])
def test_xla_max_blocks_must_be_a_positive_int(max_blocks):
  _, cache, q, seq_ids, _, layer = _setup()
  with pytest.raises(ValueError, match="max_blocks must be a positive int"):
    pk.paged_attention(q, cache, seq_ids, layer, implementation="xla", max_blocks=max_blocks)


def test_xla_max_blocks_too_small_gives_nan_for_longer_rows_only():
  case, cache, q, seq_ids, q_lens, layer = _setup()  # row 1 holds 32 tokens: two blocks
  out, lse = pk.paged_attention(q, cache, seq_ids, layer, return_lse=True, implementation="xla",
                                max_blocks=1)
  want, _ = oracle(case, cache, q, seq_ids, q_lens, layer)
  out = np.asarray(out, np.float64)
  assert np.isnan(out[1]).all() and np.isnan(np.asarray(lse)[1]).all()
  np.testing.assert_allclose(out[0], want[0], atol=2e-5, rtol=2e-5)
  full = pk.paged_attention(q, cache, seq_ids, layer, implementation="xla", max_blocks=2)
  np.testing.assert_allclose(np.asarray(full, np.float64), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("kwargs, error", [
    (dict(scale=True), pk.CacheShapeError),
    (dict(scale=np.array([1.0, 2.0])), pk.CacheShapeError),
    (dict(soft_cap=True), pk.CacheShapeError),
    (dict(soft_cap=float("inf")), pk.CacheShapeError),
    (dict(soft_cap=1e36), pk.CacheShapeError),  # logits / cap flush to 0 in float32
    (dict(soft_cap=1e39), pk.CacheShapeError),  # above float32's range
    (dict(sliding_window=2**40), pk.CacheShapeError),
    (dict(return_lse="no"), pk.CacheShapeError),
    (dict(implementation=""), ValueError),
])
def test_bad_static_arguments_raise(kwargs, error):
  _, cache, q, seq_ids, _, layer = _setup()
  with pytest.raises(error):
    pk.paged_attention(q, cache, seq_ids, layer, **kwargs)


def test_numpy_scalars_are_accepted_as_static_arguments():
  case, cache, q, seq_ids, q_lens, layer = _setup()
  got = pk.paged_attention(q, cache, seq_ids, layer, scale=np.float32(0.25),
                           sliding_window=np.int64(5), return_lse=np.bool_(False))
  ref = pk.paged_attention(q, cache, seq_ids, layer, scale=0.25, sliding_window=5)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))


@pytest.mark.parametrize("impl, knobs", IMPLS)
def test_the_largest_soft_cap_matches_the_oracle(impl, knobs):
  """At ``MAX_SOFT_CAP`` every implementation still computes ``c * tanh(s / c)`` (about s)."""
  from jax_paged_kv.attention.api import MAX_SOFT_CAP

  case, cache, q, seq_ids, q_lens, layer = _setup()
  out, lse = pk.paged_attention(q, cache, seq_ids, layer, soft_cap=MAX_SOFT_CAP,
                                return_lse=True, implementation=impl, **knobs)
  want, want_lse = oracle(dataclasses.replace(case, soft_cap=MAX_SOFT_CAP), cache, q, seq_ids,
                          q_lens, layer)
  np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(lse, np.float64), want_lse, atol=2e-5, rtol=2e-5)
