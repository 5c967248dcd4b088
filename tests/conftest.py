"""Strict test setup: 8 CPU devices, rank promotion errors, our own warnings fail tests."""

import gc
import os

import jax
import pytest

# The suite is compile-bound (hundreds of small programs, each run a few times): LLVM's
# optimisation passes are most of XLA:CPU's compile time, and at -O0 the suite runs in about
# 30% less time. Numerics do not change (XLA:CPU emits no fast-math code either way, and dots
# call the same precompiled kernels). An XLA_FLAGS set by the caller is kept as it is.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
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


# A compilation cache for this run only: many modules compile the same programs (the same small
# models, engines and cache ops), and jax.clear_caches() after each module (above) drops the
# in-memory executables, so later modules and the other xdist worker load them from disk instead
# of compiling again. The folder is new per run and removed at the end, so no run sees another's
# executables. JAX_PAGED_KV_TEST_COMPILE_CACHE=0 turns it off.
COMPILE_CACHE_ENV = "JAX_PAGED_KV_TEST_COMPILE_CACHE_DIR"


def pytest_configure(config):
  """The controller names folders for the fuzz counts and the run's compilation cache before
  any xdist worker starts (the workers inherit them)."""
  import tempfile

  from tests.fuzz_report import ENV

  if not hasattr(config, "workerinput"):
    os.environ[ENV] = tempfile.mkdtemp(prefix="pk-fuzz-")
    if (os.environ.get("JAX_PAGED_KV_TEST_COMPILE_CACHE", "1") != "0"
        and not jax.config.jax_compilation_cache_dir):
      os.environ[COMPILE_CACHE_ENV] = tempfile.mkdtemp(prefix="pk-xla-")
  folder = os.environ.get(COMPILE_CACHE_ENV)
  if folder and not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  if not hasattr(config, "workerinput"):
    import shutil

    folder = os.environ.pop(COMPILE_CACHE_ENV, None)
    if folder:
      shutil.rmtree(folder, ignore_errors=True)


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
