"""The shared attention cases on the plain-XLA implementation."""

from tests.attention_cases import AttentionCases


class TestXLA(AttentionCases):
  implementation = "xla"
  knobs = {}
