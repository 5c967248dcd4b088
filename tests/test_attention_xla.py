"""The shared attention cases on the plain-XLA implementation."""

import pytest

import jax_paged_kv as pk
from tests.attention_cases import QUANT_CASES, AttentionCases, Case, build_case


class TestXLA(AttentionCases):
  """Default knobs: four pages copied at once (``interleave=4``), keys out of position order."""

  implementation = "xla"
  knobs = {}


class TestXLAInOrder(AttentionCases):
  """Pages copied one after another, keys in position order (what a contiguous cache uses)."""

  implementation = "xla"
  knobs = {"interleave": 1}
  quantized_cases = QUANT_CASES[:1]


class TestXLAInterleave3(AttentionCases):
  """Three pages at once: tables that are not a multiple of 3 get masked null-block padding."""

  implementation = "xla"
  knobs = {"interleave": 3}
  quantized_cases = QUANT_CASES[1:]


@pytest.mark.parametrize("interleave", [0, -2, 1.5, True])
def test_bad_interleave_raises(interleave):
  case = Case((3, 17), ratio=2)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  with pytest.raises(ValueError, match="interleave"):
    pk.paged_attention(q, cache, seq_ids, layer, implementation="xla", interleave=interleave)
