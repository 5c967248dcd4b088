"""Strict test setup: 8 CPU devices, rank promotion errors, our own warnings fail tests."""

import os

import jax

os.environ.setdefault("XLA_FLAGS", "")
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_generate_tests(metafunc):
  """Per-class case lists for the shared attention test base (``tests/attention_cases.py``)."""
  cls = metafunc.cls
  if cls is None or "case" not in metafunc.fixturenames:
    return
  name = metafunc.function.__name__.removeprefix("test_")
  cases = getattr(cls, f"{name}_cases", None)
  if cases is not None:
    metafunc.parametrize("case", cases, ids=str)
