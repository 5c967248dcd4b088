"""Strict test setup: 8 CPU devices, rank promotion errors, our own warnings fail tests."""

import gc
import os

import jax
import pytest

os.environ.setdefault("XLA_FLAGS", "")
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """Drops JAX's compiled programs after each test module: a long-lived xdist worker otherwise
  keeps every executable of every module it ran (hundreds of MiB to GiB by the end of a run)."""
  yield
  jax.clear_caches()
  gc.collect()


def pytest_generate_tests(metafunc):
  """Per-class case lists for the shared attention test base (``tests/attention_cases.py``)."""
  cls = metafunc.cls
  if cls is None or "case" not in metafunc.fixturenames:
    return
  name = metafunc.function.__name__.removeprefix("test_")
  cases = getattr(cls, f"{name}_cases", None)
  if cases is not None:
    metafunc.parametrize("case", cases, ids=str)


def pytest_configure(config):
  """The controller names a folder for the fuzz counts before any xdist worker starts."""
  import tempfile

  from tests.fuzz_report import ENV

  if not hasattr(config, "workerinput"):
    os.environ[ENV] = tempfile.mkdtemp(prefix="pk-fuzz-")


def pytest_sessionfinish(session):
  from tests.fuzz_report import flush

  worker = getattr(session.config, "workerinput", {}).get("workerid", "main")
  flush(worker)


def pytest_terminal_summary(terminalreporter, config):
  """Prints how many boundary-fuzz cases ran and held (a broken one fails its test)."""
  if hasattr(config, "workerinput"):
    return
  from tests.fuzz_report import ENV, collect

  counts = collect(os.environ.get(ENV, ""))
  if not counts:
    return
  total = sum(counts.values())
  broken = sum(1 for rep in terminalreporter.stats.get("failed", [])
               if "test_boundary_fuzz" in rep.nodeid)
  terminalreporter.write_sep(
      "-", f"boundary fuzz: {total} cases held (matched the specification); {broken} fuzz "
           "test(s) found a broken case")
  for key, n in sorted(counts.items()):
    terminalreporter.write_line(f"  {n:6d}  {key}")
