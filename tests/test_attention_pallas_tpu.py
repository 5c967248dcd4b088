"""The shared attention cases on the Mosaic TPU kernel, run on CPU through the TPU interpreter.

The interpreter (``pltpu.InterpretParams``) simulates HBM, VMEM, DMAs and semaphores: it raises
on out-of-bounds reads, fills never-written memory with NaN, and (``detect_races=True``) runs a
happens-before race detector over DMAs and kernel accesses.

The interpreter is slow on CPU (seconds per case), so the default run keeps a representative
subset of the shared grid (decode with GQA, window and soft cap in bfloat16, a rejected layout,
ragged chunked prefill, every quantised format, non-finite V in decode and in a windowed prefill,
plus the kernel-specific tests below); the rest of the shared grid is marked slow (``-m slow``).
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import jax_paged_kv as pk
from jax_paged_kv.attention import pallas_tpu
from tests.attention_cases import (
    DECODE_CASES,
    NONFINITE_V_CASES,
    PREFILL_CASES,
    QUANT_CASES,
    TOLERANCES,
    AttentionCases,
    Case,
    build_case,
    oracle,
    quantized_cache,
)
from tests.quant_nonfinite import check_quantized_nonfinite_v

STRICT = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")
RACES = pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise",
                              uninitialized_memory="nan", num_cores_or_threads=2)


def _interpret_state():
  """The interpreter's module holding the ``races`` global (it moved across JAX versions)."""
  for name in ("jax._src.pallas.mosaic.interpret.interpret_pallas_call",
               "jax._src.pallas.mosaic.interpret"):
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    if hasattr(module, "races"):
      return module
  raise RuntimeError("cannot find the TPU interpreter's race-detection state")


def races_found() -> bool:
  races = _interpret_state().races
  assert races is not None, "the race detector did not run"
  return bool(races.races_found)


@pytest.fixture(autouse=True)
def _fresh_interpreter():
  """A failed interpreted kernel leaves global state behind that breaks the next one."""
  pltpu.reset_tpu_interpret_mode_state()
  yield
  pltpu.reset_tpu_interpret_mode_state()


def _block_size_rejected(case: Case) -> str | None:
  tile = 8 if jnp.dtype(case.dtype).itemsize == 4 else 16
  if case.block_size % tile:
    return f"block_size to be a multiple of {tile} for {case.dtype}"
  return None


def _fast_first(cases, fast):
  """``cases`` with those in ``fast`` kept in the default run and the rest marked slow."""
  assert all(c in cases for c in fast), "a fast case is not in the shared grid"
  return [c if c in fast else pytest.param(c, marks=pytest.mark.slow) for c in cases]


# Default run: bfloat16 decode with GQA, soft cap and window; a bfloat16 layout with 8-token
# pages (rejected at trace time); float32 decode with padding rows and a 513-token row.
FAST_DECODE = [DECODE_CASES[11], DECODE_CASES[5], DECODE_CASES[6]]
# Default run: float32 chunked prefill with ragged q_lens (0 included) and GQA 4.
FAST_PREFILL = [PREFILL_CASES[2]]
# Default run: the decode case, every format on normal and heavy-tailed data; the chunked
# prefill case runs slow (quantised prefill stays in test_quantized_nonfinite_v).
FAST_QUANT = [QUANT_CASES[0]]
# Default run: non-finite V in decode with a window and in a bfloat16 windowed prefill; the
# causal and underflow cases also run over several blocks in test_nonfinite_v_over_blocks.
FAST_NONFINITE = ("decode_window", "inf_window")


class TestPallasTPU(AttentionCases):
  implementation = "pallas_tpu"
  knobs = {"interpret": STRICT}
  decode_cases = _fast_first(DECODE_CASES, FAST_DECODE)
  prefill_cases = _fast_first(PREFILL_CASES, FAST_PREFILL)
  quantized_cases = _fast_first(QUANT_CASES, FAST_QUANT)

  def unsupported(self, case: Case) -> str | None:
    # f32 pages must be whole [8, 128] tiles, 16-bit pages whole packed [16, 128] tiles.
    return _block_size_rejected(case)

  @pytest.mark.parametrize("pv", [
      pv if pv.name in FAST_NONFINITE else pytest.param(pv, marks=pytest.mark.slow)
      for pv in NONFINITE_V_CASES], ids=str)
  def test_nonfinite_v(self, pv):
    super().test_nonfinite_v(pv)


def test_rejections_are_tested():
  """The shared base exercises the rejection path at least once (bf16 with 8-token pages)."""
  assert any(_block_size_rejected(c) for c in DECODE_CASES + PREFILL_CASES)


# ---- kernel-specific tests -------------------------------------------------------------------


def _attend(case, cache, q, seq_ids, q_lens, layer, **knobs):
  knobs.setdefault("interpret", STRICT)
  return pk.paged_attention(q, cache, seq_ids, layer, q_lens=q_lens, soft_cap=case.soft_cap,
                            sliding_window=case.sliding_window, return_lse=True,
                            implementation="pallas_tpu", **knobs)


def _assert_matches_oracle(case, got, cache, q, seq_ids, q_lens, layer):
  out, lse = (np.asarray(x, np.float64) for x in got)
  want_out, want_lse = oracle(case, cache, q, seq_ids, q_lens, layer)
  atol, rtol = TOLERANCES[jnp.dtype(case.dtype)]
  assert not np.isnan(out).any()
  np.testing.assert_allclose(out, want_out, atol=atol, rtol=rtol)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  fin = np.isfinite(want_lse)
  np.testing.assert_allclose(lse[fin], want_lse[fin], atol=atol, rtol=rtol)


def test_no_races_and_no_oob_reads():
  """Race detector on, two simulated cores splitting the parallel grid, OOB reads raise."""
  case = Case((0, 5, 40, 17), q_len=4, q_lens=(0, 4, 2, 4), block_size=8, ratio=3,
              sliding_window=19)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  got = _attend(case, cache, q, seq_ids, q_lens, layer, interpret=RACES,
                pages_per_compute_block=2, queries_per_block=2)
  jax.block_until_ready(got)
  assert not races_found(), "the TPU interpreter found a data race"
  _assert_matches_oracle(case, got, cache, q, seq_ids, q_lens, layer)


def test_race_detector_is_live():
  """A kernel that reads its DMA target before waiting must trip the flag we assert on."""

  def racy(x_hbm, o_ref, buf, sem):
    copy = pltpu.make_async_copy(x_hbm, buf, sem)
    copy.start()
    o_ref[...] = buf[...]  # read while the DMA may still be writing
    copy.wait()

  x = jnp.ones((8, 128), jnp.float32)
  try:
    out = pl.pallas_call(
        racy, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        in_specs=[pl.BlockSpec(memory_space=pallas_tpu._ANY)],
        scratch_shapes=[pltpu.VMEM(x.shape, x.dtype), pltpu.SemaphoreType.DMA(())],
        interpret=pltpu.InterpretParams(detect_races=True))(x)
    jax.block_until_ready(out)
  except Exception as e:  # JAX 0.12's interpreter raises where 0.10 / 0.11 set a flag
    assert "RACE DETECTED" in str(e), e
    return
  assert races_found()


def _direct(case, *, tables=None, **knobs):
  """Calls the kernel function itself (no cache API), optionally with hand-made tables."""
  cache, q, seq_ids, q_lens, layer = build_case(case)
  kv_lens = jnp.asarray([max(n, 0) for n in case.lengths], jnp.int32)
  tables = cache.block_tables if tables is None else tables
  fn = functools.partial(pallas_tpu.paged_attention_tpu, scale=case.head_dim ** -0.5,
                         soft_cap=case.soft_cap, sliding_window=case.sliding_window,
                         return_lse=True, interpret=STRICT, **knobs)
  return fn(q, cache.k_pool, cache.v_pool, jnp.int32(layer), jnp.asarray(tables), kv_lens,
            jnp.asarray(q_lens)), (cache, q, seq_ids, q_lens, layer)


def test_pages_outside_the_visible_range_are_never_fetched():
  """Table entries past each row's length (and before its window) name blocks that do not
  exist; the interpreter raises on any out-of-bounds DMA, so passing proves they are skipped."""
  case = Case((1, 40, 0, 100), q_len=3, q_lens=(1, 3, 0, 2), block_size=8, ratio=2,
              sliding_window=12)
  cache, *_ = build_case(case)
  tables = np.asarray(cache.block_tables).copy()
  bogus = cache.config.num_blocks + 1000
  for r, n in enumerate(case.lengths):
    q_first = n - case.q_lens[r]
    lo_page = max(0, q_first - case.sliding_window + 1) // case.block_size
    hi_page = -(-n // case.block_size)
    tables[r, :lo_page] = bogus
    tables[r, hi_page:] = bogus
  assert (tables == bogus).sum() > 10
  got, args = _direct(case, tables=tables, pages_per_compute_block=3)
  cache, q, seq_ids, q_lens, layer = args
  # The oracle reads the real tables; the bogus entries must not matter.
  _assert_matches_oracle(case, got, cache, q, seq_ids, q_lens, layer)


def test_out_of_bounds_checks_are_live():
  """The same bogus entry *inside* a row's range must be caught by the interpreter."""
  case = Case((20,), block_size=8)
  cache, *_ = build_case(case)
  tables = np.asarray(cache.block_tables).copy()
  tables[0, 1] = cache.config.num_blocks + 1000
  with pytest.raises(Exception, match="(?i)out-of-bounds"):
    jax.block_until_ready(_direct(case, tables=tables)[0])


@pytest.mark.parametrize("knobs", [
    {"pages_per_compute_block": 1},
    {"pages_per_compute_block": 3, "queries_per_block": 5},  # neither divides its axis
    {"pages_per_compute_block": 7, "queries_per_block": 1},
], ids=str)
def test_knobs_give_the_same_answer(knobs):
  case = Case((9, 33, 70), q_len=7, block_size=8, ratio=2, soft_cap=4.0, sliding_window=25)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  base = _attend(case, cache, q, seq_ids, q_lens, layer)
  got = _attend(case, cache, q, seq_ids, q_lens, layer, **knobs)
  _assert_matches_oracle(case, got, cache, q, seq_ids, q_lens, layer)
  for a, b in zip(got, base, strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_traced_layer_under_jit():
  case = Case((3, 17, 40), ratio=2)
  cache, q, seq_ids, q_lens, layer = build_case(case)

  @jax.jit
  def step(cache, q, layer):
    return pk.paged_attention(q, cache, seq_ids, layer, q_lens=q_lens, return_lse=True,
                              implementation="pallas_tpu", interpret=STRICT)

  # Give layer 0 different data; the same compiled step must pick it from the traced index.
  cache = cache.replace(k_pool=cache.k_pool.at[0].set(cache.k_pool[layer] * 0.5),
                        v_pool=cache.v_pool.at[0].set(cache.v_pool[layer] * -2.0 + 1.0))
  for lyr in (layer, 0):
    got = step(cache, q, jnp.int32(lyr))
    _assert_matches_oracle(case, got, cache, q, seq_ids, q_lens, lyr)
  assert step._cache_size() == 1


@pytest.mark.parametrize(("knobs", "match"), [
    ({"pages_per_compute_block": 0}, "pages_per_compute_block must be a positive int"),
    ({"pages_per_compute_block": 2.0}, "pages_per_compute_block must be a positive int"),
    ({"pages_per_compute_block": 99}, "exceeds the block tables"),
    ({"queries_per_block": -1}, "queries_per_block must be a positive int"),
    ({"interpret": "yes"}, "interpret must be"),
], ids=str)
def test_invalid_knobs_raise(knobs, match):
  case = Case((3, 17), ratio=2)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  knobs = {"interpret": STRICT, **knobs}
  with pytest.raises(ValueError, match=match):
    pk.paged_attention(q, cache, seq_ids, layer, q_lens=q_lens, implementation="pallas_tpu",
                       **knobs)


def test_off_tpu_without_interpret_says_how_to_run_it():
  assert jax.default_backend() != "tpu"
  case = Case((3,))
  cache, q, seq_ids, q_lens, layer = build_case(case)
  with pytest.raises(ValueError, match=r"interpret=pltpu\.InterpretParams\(\)"):
    pk.paged_attention(q, cache, seq_ids, layer, implementation="pallas_tpu")
  # interpret=True is shorthand for the default InterpretParams().
  got = _attend(case, cache, q, seq_ids, q_lens, layer, interpret=True)
  _assert_matches_oracle(case, got, cache, q, seq_ids, q_lens, layer)


@pytest.mark.parametrize(("dtype", "block_size", "ok"), [
    (jnp.float32, 8, True), (jnp.float32, 24, True), (jnp.float32, 4, False),
    (jnp.float32, 12, False), (jnp.bfloat16, 16, True), (jnp.bfloat16, 48, True),
    (jnp.bfloat16, 8, False), (jnp.float16, 32, True), (jnp.float16, 8, False),
    (jnp.float8_e4m3fn, 32, False), (jnp.int8, 32, False),
])
def test_supported_layouts(dtype, block_size, ok):
  if ok:
    pallas_tpu.check_supported(dtype, block_size, 64)
  else:
    with pytest.raises(ValueError, match="pallas_tpu"):
      pallas_tpu.check_supported(dtype, block_size, 64)


def test_float16_pools():
  case = Case((0, 17, 40), block_size=16, ratio=2, dtype="float16", soft_cap=5.0)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  _assert_matches_oracle(case, _attend(case, cache, q, seq_ids, q_lens, layer), cache, q,
                         seq_ids, q_lens, layer)


def test_float32_queries_over_bfloat16_pools():
  """Mixed dtypes compute in float32 (like the reference) and return q's dtype."""
  case = Case((3, 40), block_size=16, ratio=4, dtype="bfloat16", sliding_window=21)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  q32 = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
  out, lse = _attend(case, cache, q32, seq_ids, q_lens, layer)
  assert out.dtype == jnp.float32
  _assert_matches_oracle(case, (out, lse), cache, q32, seq_ids, q_lens, layer)


@pytest.mark.parametrize("case", [
    Case((1, 200), block_size=16, ratio=1, head_dim=64, dtype="float32"),
    Case((5, 70), q_len=5, block_size=16, ratio=5, head_dim=128, dtype="bfloat16",
         sliding_window=30),
    Case((70,), q_len=9, block_size=8, ratio=20, kv_heads=1, head_dim=256),
], ids=str)
def test_lowers_to_mosaic_for_tpu(case, monkeypatch):
  """Pallas' Mosaic lowering (the part of the TPU compile that runs without a TPU) accepts
  the kernel: jax.export for platform 'tpu' emits the tpu_custom_call."""
  monkeypatch.setattr(pallas_tpu, "_backend", lambda: "tpu")
  cache, q, seq_ids, q_lens, layer = build_case(case)
  fn = functools.partial(pallas_tpu.paged_attention_tpu, scale=0.125, soft_cap=2.0,
                         sliding_window=case.sliding_window, return_lse=True)
  args = (q, cache.k_pool, cache.v_pool, jnp.int32(layer), cache.block_tables,
          cache.seq_lens, jnp.asarray(q_lens))
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
  assert "tpu_custom_call" in exported.mlir_module()


SWEEP = [
    Case((0, 1, 255, 256, 513), block_size=bs, kv_heads=2, ratio=ratio, head_dim=d,
         q_len=q_len, dtype=dtype, seed=7)
    for bs, ratio, d, q_len, dtype in [
        (16, 1, 128, 1, "float32"), (32, 8, 128, 1, "bfloat16"), (64, 5, 256, 1, "float32"),
        (16, 2, 128, 16, "bfloat16"), (32, 20, 64, 33, "float32"), (8, 4, 64, 9, "float32"),
    ]
]


@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_sweep_slow(case):
  TestPallasTPU().check(case)


@pytest.mark.parametrize(("name", "knobs"), [
    pytest.param("nan_causal", {"interpret": RACES, "pages_per_compute_block": 2,
                                "queries_per_block": 5}, id="nan_causal-races-pages2-q5"),
    pytest.param("inf_underflow", {"pages_per_compute_block": 1, "queries_per_block": 4},
                 id="inf_underflow-pages1-q4"),
])
def test_nonfinite_v_over_blocks(name, knobs):
  """The shared non-finite V cases over several compute and query blocks: the rerun by the
  contract's rule refetches the pages (no races with the race detector on) and carries the
  NaN / Inf across blocks (alpha never multiplies them)."""
  t = TestPallasTPU()
  t.knobs = {"interpret": STRICT, **knobs}
  t.test_nonfinite_v(next(c for c in NONFINITE_V_CASES if c.name == name))
  if knobs.get("interpret") is RACES:
    assert not races_found(), "the TPU interpreter found a data race"


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_quantized_nonfinite_v(kv_quant):
  """A NaN / Inf V in a quantised cache: NaN exactly where the dequantised values put it (the
  whole head for int8's per-token scale, one channel group for int4's), over two compute
  blocks (the rerun by the contract's rule refetches the pages and their scales)."""
  check_quantized_nonfinite_v(functools.partial(_attend, pages_per_compute_block=1), kv_quant)


@pytest.mark.parametrize(("kv_quant", "block_size", "head_dim", "ok"), [
    ("int4", 32, 64, True), ("int4", 64, 16, True), ("int4", 16, 64, False),
    ("int8", 32, 64, True), ("fp8", 8, 64, False),
])
def test_supported_quantized_layouts(kv_quant, block_size, head_dim, ok):
  dtype = pk.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=head_dim, num_blocks=2,
                         max_seqs=1, max_seq_len=block_size, block_size=block_size,
                         kv_quant=kv_quant).storage_dtype
  if ok:
    pallas_tpu.check_supported(dtype, block_size, head_dim, kv_quant=kv_quant)
  else:
    with pytest.raises(ValueError, match="multiple of 32"):
      pallas_tpu.check_supported(dtype, block_size, head_dim, kv_quant=kv_quant)


@pytest.mark.parametrize("kv_quant", ["int8", "fp8", "int4"])
def test_quantized_lowers_to_mosaic_for_tpu(kv_quant, monkeypatch):
  """Pallas' Mosaic lowering accepts every format's path (per-key and per-channel scale DMAs,
  nibble halves, the 0/1 scale matmuls); not compiled by libtpu here."""
  monkeypatch.setattr(pallas_tpu, "_backend", lambda: "tpu")
  case = Case((5, 70), q_len=5, block_size=32, ratio=2, head_dim=128)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  qcache = quantized_cache(cache, kv_quant)
  q = q.astype(jnp.bfloat16)  # bfloat16 queries: the MXU path
  fn = functools.partial(pallas_tpu.paged_attention_tpu, scale=0.125, return_lse=True,
                         pages_per_compute_block=2)
  exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(
      q, qcache.k_pool, qcache.v_pool, jnp.int32(layer), qcache.block_tables, qcache.seq_lens,
      jnp.asarray(q_lens), k_scale=qcache.k_scale, v_scale=qcache.v_scale)
  assert "tpu_custom_call" in exported.mlir_module()
