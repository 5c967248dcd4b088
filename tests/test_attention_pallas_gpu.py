"""The shared attention cases, plus kernel-specific tests, on the Pallas GPU kernel.

Everything runs in Pallas interpret mode (``interpret=True``) so that it runs on CPU. On a GPU
machine, ``JAX_PAGED_KV_GPU_COMPILED=1`` runs the same cases with the compiled Triton kernel.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from jax_paged_kv.attention import pallas_gpu
from jax_paged_kv.cache import quant
from tests.attention_cases import (
    DECODE_CASES,
    INF,
    NONFINITE_V_CASES,
    ODD_LENGTHS,
    PREFILL_CASES,
    TOLERANCES,
    AttentionCases,
    Case,
    Poison,
    PoisonedV,
    build_case,
    oracle,
    quantized_cache,
)
from tests.oracle import attention_np
from tests.quant_nonfinite import check_quantized_nonfinite_v

COMPILED = os.environ.get("JAX_PAGED_KV_GPU_COMPILED") == "1"
KNOBS = {} if COMPILED else {"interpret": True}

# Beyond the shared grid: decode tiles wider than one row tile (GQA 80 -> 2 tiles of 64 rows),
# head_dim 256 with block 128, GQA 5 prefill that straddles tiles, and a larger slow sweep.
EXTRA_DECODE = [
    Case((5, 40, 0), ratio=80, kv_heads=1, head_dim=64, block_size=16),
    Case((1, 129, 300), block_size=128, ratio=4, head_dim=256, dtype="bfloat16"),
]
EXTRA_PREFILL = [
    Case((7, 200), q_len=7, q_lens=(7, 5), block_size=128, ratio=2, head_dim=256),
    Case((40, 90), q_len=33, q_lens=(30, 33), block_size=8, ratio=5, sliding_window=16),
]
SLOW_DECODE = [
    pytest.param(Case(ODD_LENGTHS + (513, 1023), block_size=bs, ratio=r, head_dim=d, seed=3),
                 marks=pytest.mark.slow)
    for bs, r, d in [(8, 20, 64), (64, 4, 128), (128, 1, 256), (32, 5, 128)]
]
SLOW_PREFILL = [
    pytest.param(Case((2048, 513, 100), q_len=64, q_lens=(64, 37, 64), block_size=bs, ratio=r,
                      sliding_window=w, dtype="bfloat16", seed=4), marks=pytest.mark.slow)
    for bs, r, w in [(16, 4, None), (64, 20, 300), (8, 1, 33)]
]


class TestPallasGPU(AttentionCases):
  implementation = "pallas_gpu"
  knobs = KNOBS
  decode_cases = DECODE_CASES + EXTRA_DECODE + SLOW_DECODE
  prefill_cases = PREFILL_CASES + EXTRA_PREFILL + SLOW_PREFILL


def _call(case, cache, q, seq_ids, q_lens, layer, **knobs):
  return pk.paged_attention(q, cache, seq_ids, layer, q_lens=q_lens, soft_cap=case.soft_cap,
                            sliding_window=case.sliding_window, return_lse=True,
                            implementation="pallas_gpu", **KNOBS, **knobs)


def _assert_matches(case, got, want):
  atol, rtol = TOLERANCES[jnp.dtype(case.dtype)]
  (out, lse), (want_out, want_lse) = got, want
  out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
  assert not np.isnan(out).any()
  np.testing.assert_allclose(out, want_out, atol=atol, rtol=rtol)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
  fin = np.isfinite(want_lse)
  np.testing.assert_allclose(lse[fin], want_lse[fin], atol=atol, rtol=rtol)


@pytest.mark.parametrize("q_len, block_size, knobs", [
    (1, 16, dict(k_splits=1, block_k=32)),
    (1, 16, dict(k_splits=3, block_k=16)),
    (6, 16, dict(k_splits=7, block_k=64)),
    (6, 16, dict(k_splits=64, block_k=16)),  # more splits than steps: most exit at once
    (1, 64, dict(k_splits=3, block_k=16)),  # steps of a quarter page
    (6, 32, dict(k_splits=2, block_k=16, num_stages=1)),  # half pages, window inside a page
], ids=str)
def test_knobs_do_not_change_the_answer(q_len, block_size, knobs):
  case = Case((0, 3, 17, 130), block_size=block_size, ratio=4, q_len=q_len, sliding_window=50)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  got = _call(case, cache, q, seq_ids, q_lens, layer, **knobs)
  _assert_matches(case, got, oracle(case, cache, q, seq_ids, q_lens, layer))


def test_prefill_row_tiles_of_any_size():
  """Rows (query, head) split over several tiles, a tile boundary inside a query's heads."""
  case = Case((20, 45), q_len=20, q_lens=(20, 11), ratio=3, block_size=16)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  want = oracle(case, cache, q, seq_ids, q_lens, layer)
  for rows in (16, 32, 64):
    _assert_matches(case, _call(case, cache, q, seq_ids, q_lens, layer, block_rows=rows,
                                k_splits=2), want)


@pytest.mark.parametrize("knobs, match", [
    (dict(block_k=24), "power of two"),
    (dict(block_k=8), "smallest tl.dot tile"),
    (dict(k_splits=0), "k_splits"),
    (dict(block_rows=8), "block_rows"),
    (dict(num_warps=3), "num_warps"),
    (dict(num_stages=0), "num_stages"),
], ids=str)
def test_invalid_knobs_raise(knobs, match):
  case = Case((3, 17), block_size=8, ratio=2)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  with pytest.raises(ValueError, match=match):
    _call(case, cache, q, seq_ids, q_lens, layer, **knobs)


@pytest.mark.skipif(jax.default_backend() in pallas_gpu.GPU_BACKENDS, reason="needs a non-GPU")
def test_non_gpu_backend_without_interpret_raises():
  case = Case((3, 17), ratio=2)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  with pytest.raises(ValueError, match="interpret=True"):
    pk.paged_attention(q, cache, seq_ids, layer, implementation="pallas_gpu")


def test_traced_layer_under_jit():
  """The layer is a traced value indexed inside the kernel; each layer reads its own data."""
  case = Case((5, 40, 17), block_size=8, ratio=2)
  cache, q, seq_ids, q_lens, _ = build_case(case, layer=1)
  # Layer 0: the negated data of layer 1 (NaN where layer 1 is NaN).
  cache = cache.replace(k_pool=cache.k_pool.at[0].set(-cache.k_pool[1]),
                        v_pool=cache.v_pool.at[0].set(2.0 * cache.v_pool[1]))
  f = jax.jit(lambda c, layer: pk.paged_attention(
      q, c, seq_ids, layer, q_lens=q_lens, return_lse=True, implementation="pallas_gpu",
      **KNOBS))
  for layer in (0, 1):
    got = f(cache, jnp.int32(layer))
    _assert_matches(case, got, oracle(case, cache, q, seq_ids, q_lens, layer))


def test_out_of_window_blocks_are_never_read():
  """Blocks wholly before every query's sliding window may be freed (NaN): never read."""
  case = Case((100, 64), q_len=4, ratio=2, block_size=8, sliding_window=12)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  tables = np.asarray(cache.block_tables)
  k_pool, v_pool = np.array(cache.k_pool), np.array(cache.v_pool)
  for r, n in enumerate(case.lengths):
    first_seen = n - int(q_lens[r]) - case.sliding_window + 1
    for j in range(first_seen // case.block_size):  # blocks entirely out of every window
      k_pool[layer, :, tables[r, j]] = np.nan
      v_pool[layer, :, tables[r, j]] = np.nan
  cache = cache.replace(k_pool=jnp.asarray(k_pool), v_pool=jnp.asarray(v_pool))
  got = _call(case, cache, q, seq_ids, q_lens, layer, k_splits=2, block_k=16)
  _assert_matches(case, got, oracle(case, cache, q, seq_ids, q_lens, layer))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 128, 256])
@pytest.mark.parametrize("q_len", [1, 64])
def test_default_knobs_fit_shared_memory(dtype, head_dim, block_size, q_len):
  """The first GPU run failed float32 head_dim 256 / block 128: a one-page step of 128 keys
  needs 256 KiB of K/V staging, over the H100's 227 KiB. Steps may now be part of a page."""
  itemsize = jnp.dtype(dtype).itemsize
  kn = pallas_gpu.default_knobs(head_dim=head_dim, block_size=block_size, q_len=q_len, group=4,
                                batch=4, kv_heads=2, max_blocks=64, itemsize=itemsize)
  stage = 2 * kn["block_k"] * head_dim * itemsize
  q_tile = kn["block_rows"] * head_dim * itemsize
  assert stage * kn["num_stages"] + q_tile <= 196 * 1024  # measured to fit on an H100
  assert kn["block_k"] >= 16 and kn["block_k"] & (kn["block_k"] - 1) == 0


def test_merge_partials_matches_a_float64_softmax_over_the_union():
  rng = np.random.default_rng(0)
  splits, rows, d = 4, 6, 8
  logits = [rng.standard_normal((rows, 5)) * 3 for _ in range(splits)]
  values = [rng.standard_normal((5, d)) for _ in range(splits)]
  empty = np.zeros((splits, rows), bool)
  empty[1, :] = True  # a split that saw nothing
  empty[:, 4] = True  # a row that saw nothing in any split
  o = np.zeros((splits, rows, d))
  lse = np.full((splits, rows), -np.inf)
  for s in range(splits):
    w = np.exp(logits[s])
    o[s] = np.where(empty[s][:, None], 0.0, (w @ values[s]) / w.sum(1, keepdims=True))
    lse[s] = np.where(empty[s], -np.inf, np.log(w.sum(1)))
  out, got_lse = pallas_gpu.merge_partials(jnp.asarray(o, jnp.float32),
                                           jnp.asarray(lse, jnp.float32))
  for r in range(rows):
    seen = [s for s in range(splits) if not empty[s, r]]
    if not seen:
      np.testing.assert_array_equal(np.asarray(out[r]), 0.0)
      assert np.isneginf(got_lse[r])
      continue
    all_logits = np.concatenate([logits[s][r] for s in seen])
    all_values = np.concatenate([values[s] for s in seen])
    w = np.exp(all_logits - all_logits.max())
    np.testing.assert_allclose(out[r], w @ all_values / w.sum(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got_lse[r], all_logits.max() + np.log(w.sum()), atol=1e-5)


def test_matches_oracle_with_a_custom_scale():
  case = Case((9, 33), ratio=4, block_size=16)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  got = pk.paged_attention(q, cache, seq_ids, layer, q_lens=q_lens, scale=0.37, return_lse=True,
                           implementation="pallas_gpu", **KNOBS)
  want = attention_np(q, cache.k_pool, cache.v_pool, layer, np.asarray(cache.block_tables),
                      np.array(case.lengths), q_lens, scale=0.37)
  _assert_matches(case, got, want)


def test_float32_queries_over_a_bfloat16_cache():
  case = Case((3, 40, 17), ratio=4, block_size=16, dtype="bfloat16")
  cache, q, seq_ids, q_lens, layer = build_case(case)
  q32 = q.astype(jnp.float32) * 1.3  # not representable in bfloat16: the kernel rounds it
  out, lse = _call(case, cache, q32, seq_ids, q_lens, layer)
  assert out.dtype == jnp.float32
  _assert_matches(case, (out, lse), oracle(case, cache, q32, seq_ids, q_lens, layer))


def _lower_for_cuda(q_len, q_heads, kv_heads, head_dim, block_size, dtype, kv_quant=None,
                    fused=False, **kw):
  """Lowers the compiled (non-interpret) kernel for CUDA on this CPU machine."""
  batch, max_blocks = 3, 40
  S = jax.ShapeDtypeStruct
  q = S((batch, q_len, q_heads, head_dim), dtype)
  shape = (2, kv_heads, 97, block_size, head_dim)
  pool = S(shape, dtype)
  scales = ()
  if kv_quant is not None:
    pool = S(shape[:4] + (quant.stored_head_dim(kv_quant, head_dim),),
             quant.storage_dtype(kv_quant))
    scales = tuple(S(s, dt) for s, dt in zip(quant.scale_shapes(kv_quant, shape),
                                             quant.scale_dtypes(kv_quant), strict=True))
  tables = S((batch, max_blocks), jnp.int32)
  lens = S((batch,), jnp.int32)
  layer = S((), jnp.int32)

  if fused:  # attention fusion: the new token and where it goes
    new = S((batch, kv_heads, head_dim), dtype)
    scales = (new, new, lens, lens)

  def f(*a):
    if fused:
      return pallas_gpu.paged_attention_gpu(*a[:7], scale=0.1, return_lse=True, new_kv=a[7:],
                                            **kw)
    k_scale, v_scale = a[7:] or (None, None)
    return pallas_gpu.paged_attention_gpu(*a[:7], scale=0.1, return_lse=True, k_scale=k_scale,
                                          v_scale=v_scale, **kw)

  try:
    exported = jax.export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(q, pool, pool, layer, tables, lens, lens, *scales)
  except RuntimeError as e:  # JAX >= 0.11 asks a real GPU for its compute capability
    if "No supported GPU devices found" not in str(e):
      raise
    pytest.skip(f"this JAX ({jax.__version__}) lowers Triton kernels only with a GPU present")
  return exported.mlir_module()


@pytest.mark.parametrize("args", [
    dict(q_len=1, q_heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=jnp.bfloat16),
    dict(q_len=1, q_heads=20, kv_heads=1, head_dim=64, block_size=8, dtype=jnp.float32,
         soft_cap=30.0),
    dict(q_len=1, q_heads=8, kv_heads=2, head_dim=256, block_size=128, dtype=jnp.float16),
    dict(q_len=48, q_heads=40, kv_heads=8, head_dim=128, block_size=32, dtype=jnp.bfloat16,
         sliding_window=100),
    # quantised: int8, int4's nibble halves and V groups, a step over two pages
    dict(q_len=1, q_heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=jnp.bfloat16,
         kv_quant="int8"),
    dict(q_len=16, q_heads=16, kv_heads=4, head_dim=128, block_size=32, dtype=jnp.bfloat16,
         kv_quant="int4"),
    dict(q_len=1, q_heads=8, kv_heads=2, head_dim=64, block_size=8, dtype=jnp.float32,
         kv_quant="int4"),
    # attention fusion: the new token from registers, written through the aliased pools
    dict(q_len=1, q_heads=32, kv_heads=8, head_dim=128, block_size=16, dtype=jnp.bfloat16,
         fused=True, sliding_window=100),
], ids=lambda a: f"q{a['q_len']}_h{a['q_heads']}/{a['kv_heads']}_d{a['head_dim']}"
                 f"_bs{a['block_size']}" + (f"_{a['kv_quant']}" if "kv_quant" in a else "")
                 + ("_fused" if a.get("fused") else ""))
def test_lowers_to_a_triton_kernel_for_cuda(args, monkeypatch):
  """The Triton lowering (not interpret mode) accepts every op and tile shape we emit."""
  monkeypatch.setattr(pallas_gpu, "_backend", lambda: "cuda")
  text = _lower_for_cuda(**args)
  assert "__gpu$xla.gpu.triton" in text and 'name = "paged_attention_gpu' in text


@pytest.mark.parametrize("backend, head_dim, block_size, dtype, want", [
    ("gpu", 64, 16, "float32", "pallas_gpu"),
    ("cuda", 256, 128, "bfloat16", "pallas_gpu"),
    ("gpu", 8, 16, "float32", "xla"),  # the first GPU run: a test Llama with head_dim 8 failed
    ("gpu", 48, 16, "bfloat16", "xla"),  # not a power of two
    ("gpu", 64, 12, "bfloat16", "xla"),
    ("tpu", 64, 8, "float32", "pallas_tpu"),
    ("tpu", 64, 8, "bfloat16", "xla"),  # bf16 pages need 16 rows on a TPU
    ("cpu", 64, 16, "float32", "xla"),
], ids=str)
def test_default_implementation_falls_back_to_xla_for_geometries_a_kernel_cannot_tile(
    backend, head_dim, block_size, dtype, want, monkeypatch):
  from jax_paged_kv.attention import api
  monkeypatch.setattr(api, "_compute_capability", lambda: "8.0")  # pre-Hopper: no pallas_mgpu
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=head_dim, num_blocks=8,
                       max_seqs=2, max_seq_len=64, block_size=block_size, dtype=jnp.dtype(dtype))
  assert pk.default_implementation(backend, cfg) == want
  assert pk.default_implementation(backend) == {"cpu": "xla", "tpu": "pallas_tpu"}.get(
      backend, "pallas_gpu")


@pytest.mark.parametrize("backend, kv_quant, head_dim, block_size, want", [
    ("gpu", "int4", 64, 16, "pallas_gpu"),
    ("gpu", "int4", 16, 16, "xla"),  # nibble halves of 8 channels: under one tl.dot tile
    ("gpu", "int8", 64, 8, "pallas_gpu"),
    ("gpu", "fp8", 48, 16, "xla"),
    ("tpu", "int4", 64, 32, "pallas_tpu"),
    ("tpu", "int4", 64, 16, "xla"),  # uint8 pages need 32 rows on a TPU
    ("tpu", "fp8", 128, 32, "pallas_tpu"),
], ids=str)
def test_default_implementation_for_quantized_caches(backend, kv_quant, head_dim, block_size,
                                                      want):
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=head_dim, num_blocks=8,
                       max_seqs=2, max_seq_len=64, block_size=block_size,
                       dtype=jnp.dtype(jnp.bfloat16), kv_quant=kv_quant)
  assert pk.default_implementation(backend, cfg) == want


# A whole 16-key step of +Inf keys whose probabilities underflow: with one step per split, that
# split's LSE is ~-4000 and its merge weight exactly 0 (0 * Inf would be NaN).
SPLIT_UNDERFLOW = PoisonedV("inf_split_underflow", Case((40, 9), q_len=4, block_size=16,
                                                        kv_heads=1, ratio=2, head_dim=16), tuple(
    Poison(0, p, INF, dims=(0,)) for p in range(16, 32)), underflow=True)


@pytest.mark.parametrize("knobs", [dict(k_splits=3, block_k=16), dict(k_splits=1, block_k=16)],
                         ids=str)
@pytest.mark.parametrize("pv", [c for c in NONFINITE_V_CASES
                                if c.name in ("nan_causal", "inf_window", "inf_underflow")]
                         + [SPLIT_UNDERFLOW], ids=str)
def test_nonfinite_v_over_steps_and_splits(pv, knobs):
  """The shared non-finite V cases with many key steps per split and several splits: the rule
  holds across the online softmax (alpha never multiplies a final NaN / Inf) and the merge (a
  split whose weight underflows to 0 still passes its Inf on)."""
  t = TestPallasGPU()
  t.knobs = {**KNOBS, **knobs}
  t.test_nonfinite_v(pv)


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_quantized_nonfinite_v(kv_quant):
  """A NaN / Inf V in a quantised cache: NaN exactly where the dequantised values put it (the
  whole head for int8's per-token scale, one channel group for int4's)."""
  check_quantized_nonfinite_v(functools.partial(_call, block_k=16, k_splits=2), kv_quant)


def test_int4_head_dim_under_32_is_rejected_at_trace_time():
  case = Case((3, 17), ratio=2, head_dim=16)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  qcache = quantized_cache(cache, "int4")
  with pytest.raises(ValueError, match="head_dim >= 32 for kv_quant='int4'"):
    _call(case, qcache, q, seq_ids, q_lens, layer)


# ---------------------------------------------------------------------------------------------
# Attention fusion: the decode kernel writes the step's new token into its page and attends to
# it in the same launch. Oracle: the token written into a NumPy copy of the pools, then float64
# attention over the written pools; the returned pools must equal that copy bitwise.

FUSED = [
    dict(dtype="float32", ratio=4, k_splits=1),
    dict(dtype="bfloat16", ratio=2, k_splits=3, sliding_window=5, soft_cap=3.0),
    dict(dtype="float32", ratio=1, k_splits=2, nan_v=True),
]


@pytest.mark.parametrize("opts", FUSED, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_fused_write_attends_to_and_writes_the_new_token(opts):
  dtype = jnp.dtype(opts["dtype"])
  ratio, k_splits = opts["ratio"], opts["k_splits"]
  window, cap = opts.get("sliding_window"), opts.get("soft_cap")
  rng = np.random.default_rng(7)
  layers, kvh, nb, bs, d = 2, 2, 24, 8, 32
  lens = np.array([1, 9, 30, 17])  # after the new token; row 3 has no new token (-1)
  batch = len(lens)
  perm = rng.permutation(np.arange(1, nb))
  tables = np.zeros((batch, 4), np.int32)
  for r, n in enumerate(lens):
    tables[r, :-(-n // bs)] = perm[4 * r:4 * r + -(-n // bs)]
  kp = rng.standard_normal((layers, kvh, nb, bs, d)).astype(dtype)
  vp = rng.standard_normal((layers, kvh, nb, bs, d)).astype(dtype)
  pos = np.where(np.arange(batch) == 3, -1, lens - 1)
  slot = np.array([tables[r, max(p, 0) // bs] * bs + max(p, 0) % bs for r, p in enumerate(pos)])
  layer = 1
  for r, p in enumerate(pos):  # the slot's stale content must never be read
    if p >= 0:
      kp[layer, :, slot[r] // bs, slot[r] % bs] = np.nan
      vp[layer, :, slot[r] // bs, slot[r] % bs] = np.nan
  kn = rng.standard_normal((batch, kvh, d)).astype(dtype)
  vn = rng.standard_normal((batch, kvh, d)).astype(dtype)
  if opts.get("nan_v"):
    vn[1, 0, 3] = np.nan  # reaches exactly row 1's queries of KV head 0, component 3
    vn[2, 1, 5] = np.inf
  q = rng.standard_normal((batch, 1, kvh * ratio, d)).astype(dtype)
  want_k, want_v = kp.copy(), vp.copy()
  for r, p in enumerate(pos):
    if p >= 0:
      want_k[layer, :, slot[r] // bs, slot[r] % bs] = kn[r]
      want_v[layer, :, slot[r] // bs, slot[r] % bs] = vn[r]
  out, lse, k_out, v_out = pallas_gpu.paged_attention_gpu(
      jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.int32(layer), jnp.asarray(tables),
      jnp.asarray(lens, jnp.int32), jnp.ones(batch, jnp.int32), scale=d ** -0.5, soft_cap=cap,
      sliding_window=window, return_lse=True, k_splits=k_splits, interpret=True,
      new_kv=(jnp.asarray(kn), jnp.asarray(vn), jnp.asarray(pos, jnp.int32),
              jnp.asarray(slot, jnp.int32)))
  np.testing.assert_array_equal(np.asarray(k_out).view(np.uint8), want_k.view(np.uint8))
  np.testing.assert_array_equal(np.asarray(v_out).view(np.uint8), want_v.view(np.uint8))
  # Row 3 (no new token) reads its last slot from the pool: finite data there.
  ref, ref_lse = attention_np(q, want_k, want_v, layer, tables, lens, np.ones(batch),
                              scale=d ** -0.5, soft_cap=cap, sliding_window=window)
  atol, rtol = TOLERANCES[dtype]
  tol = dict(atol=atol, rtol=rtol)
  out64 = np.asarray(out, np.float64)
  np.testing.assert_array_equal(np.isnan(out64), np.isnan(ref))
  np.testing.assert_array_equal(np.isposinf(out64), np.isposinf(ref))
  fin = np.isfinite(ref)
  np.testing.assert_allclose(out64[fin], ref[fin], **tol)
  np.testing.assert_allclose(np.asarray(lse, np.float64), ref_lse, **tol)
  if opts.get("nan_v"):
    assert np.isnan(out64[1, 0, 0, 3]) and np.isposinf(out64[2, 0, 1, 5])


def test_fused_write_refuses_what_it_cannot_run():
  kp = jnp.zeros((1, 1, 4, 8, 16), jnp.float32)
  q = jnp.zeros((1, 2, 1, 16), jnp.float32)
  new = (jnp.zeros((1, 1, 16)), jnp.zeros((1, 1, 16)), jnp.zeros(1, jnp.int32),
         jnp.zeros(1, jnp.int32))
  args = (kp, kp, jnp.int32(0), jnp.ones((1, 2), jnp.int32), jnp.full(1, 3, jnp.int32),
          jnp.full(1, 2, jnp.int32))
  with pytest.raises(ValueError, match="q_len == 1"):
    pallas_gpu.paged_attention_gpu(q, *args, scale=1.0, interpret=True, new_kv=new)
  bad = (jnp.zeros((1, 1, 16), jnp.bfloat16),) + new[1:]
  with pytest.raises(ValueError, match="new_kv"):
    pallas_gpu.paged_attention_gpu(q[:, :1], *args[:-1], jnp.ones(1, jnp.int32), scale=1.0,
                                   interpret=True, new_kv=bad)


def _decode_cache(dtype=jnp.float32, kv_quant=None, pool_bits=False):
  cfg = pk.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=32, num_blocks=20, max_seqs=4,
                       max_seq_len=64, block_size=8, dtype=dtype, kv_quant=kv_quant,
                       pool_bits=pool_bits)
  rng = np.random.default_rng(3)
  cache = pk.init_cache(cfg)
  ids = jnp.arange(3, dtype=jnp.int32)
  cache, _ = pk.allocate_sequences(cache, ids)
  lens = jnp.asarray([7, 16, 20], jnp.int32)
  kv = rng.standard_normal((2, 3, 20, 2, 32)).astype(np.float32)
  cache, _ = pk.append_kv(cache, jnp.asarray(kv, dtype), jnp.asarray(-kv, dtype), ids,
                          num_new=lens)
  cache, slots, _ = pk.reserve(cache, ids, 1)
  return cache, slots, ids, rng


def test_write_and_attend_fused_equals_write_then_attend():
  """The fused launch against write_kv + attention (XLA, and float64 over the written pools):
  pools bitwise, attention within tolerance; under jit a bad slot writes nothing and reports
  INVALID_TOKEN_SLOT, and eagerly it raises."""
  cache, slots, ids, rng = _decode_cache()
  q = jnp.asarray(rng.standard_normal((3, 1, 4, 32)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 1, 2, 32)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((3, 1, 2, 32)), jnp.float32)
  want_cache, want, st = pk.write_and_attend(q, k, v, cache, slots, ids, 1, donate=False,
                                             implementation="xla")
  got_cache, got, st2 = pk.write_and_attend(q, k, v, cache, slots, ids, 1, donate=False,
                                            implementation="pallas_gpu", fuse=True,
                                            interpret=True, k_splits=2)
  assert not np.any(np.asarray(st)) and not np.any(np.asarray(st2))
  for a, b in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Rows 0-2 hold 7, 16 and 20 tokens plus the new one (slots 0-2 of the cache, in order).
  tables, lens = np.asarray(want_cache.block_tables)[:3], np.array([8, 17, 21])
  ref, _ = attention_np(q, want_cache.k_pool, want_cache.v_pool, 1, tables, lens, np.ones(3),
                        scale=32 ** -0.5)
  np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(want), ref, atol=2e-5, rtol=2e-5)

  bad = slots.at[1, 0].set(slots[0, 0])  # row 1 names row 0's slot
  fn = jax.jit(lambda c, s: pk.write_and_attend(q, k, v, c, s, ids, 1, fuse=True,
                                                implementation="pallas_gpu", interpret=True))
  out_cache, out, status = fn(cache, bad)
  assert int(status[1]) == pk.Status.INVALID_TOKEN_SLOT
  for a, b in zip(jax.tree_util.tree_leaves(out_cache), jax.tree_util.tree_leaves(cache),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tables = np.asarray(cache.block_tables)[:3]  # attention over the unwritten cache: the new
  lens = np.array([8, 17, 21])  # tokens' slots are reserved but hold the pools' old values
  ref, _ = attention_np(q, cache.k_pool, cache.v_pool, 1, tables, lens, np.ones(3),
                        scale=32 ** -0.5)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5)
  with pytest.raises(pk.InvalidTokenSlotError):
    pk.write_and_attend(q, k, v, cache, bad, ids, 1, fuse=True, implementation="pallas_gpu",
                        interpret=True, donate=False)


def test_write_and_attend_fuses_only_where_it_can():
  cache, slots, ids, rng = _decode_cache()
  q = jnp.zeros((3, 1, 4, 32), jnp.float32)
  k = jnp.zeros((3, 1, 2, 32), jnp.float32)
  assert pk.fused_write_supported(cache, 1, "pallas_gpu") == ""
  assert "decode" in pk.fused_write_supported(cache, 2, "pallas_gpu")
  assert "xla" in pk.fused_write_supported(cache, 1, "xla")
  quant_cache = _decode_cache(kv_quant="int8")[0]
  assert "kv_quant" in pk.fused_write_supported(quant_cache, 1, "pallas_gpu")
  bits = _decode_cache(dtype=jnp.bfloat16, pool_bits=True)[0]
  assert "pool_bits" in pk.fused_write_supported(bits, 1, "pallas_gpu")
  with pytest.raises(ValueError, match="cannot fuse"):
    pk.write_and_attend(q, k, k, cache, slots, ids, 0, fuse=True, implementation="xla",
                        donate=False)
  with pytest.raises(ValueError, match="fuse must be"):
    pk.write_and_attend(q, k, k, cache, slots, ids, 0, fuse="yes", donate=False)
  # "auto" falls back to write + attend where fusion cannot run: same result as fuse=False.
  a = pk.write_and_attend(q, k, k, cache, slots, ids, 0, fuse="auto", implementation="xla",
                          donate=False)
  b = pk.write_and_attend(q, k, k, cache, slots, ids, 0, implementation="xla", donate=False)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_models_fuse_their_decode_write_inside_fuse_write(monkeypatch):
  """``with pk.fuse_write():`` the bundled model's decode layers take the fused launch (the
  step is retraced, not served from the unfused trace) and give the unfused step's cache and
  logits; prefill (q_len > 1) keeps write + attend."""
  from jax_paged_kv.attention import api
  from jax_paged_kv.models import init_params
  from jax_paged_kv.serving.decoding import decode_step
  from tests.llama_fixtures import SMALL, forward_jit

  fused_calls = []
  real, orig = pallas_gpu.paged_attention_gpu, api.get_implementation

  def interpreted(*args, **kw):  # the kernel in interpret mode, recording fused launches
    fused_calls.append(kw.get("new_kv") is not None)
    return real(*args, interpret=True, **kw)

  monkeypatch.setattr(api, "get_implementation",
                      lambda name: interpreted if name == "pallas_gpu" else orig(name))
  params = init_params(SMALL, jax.random.PRNGKey(5))
  cc = SMALL.cache_config(num_blocks=32, max_seqs=3, max_seq_len=64, block_size=8)
  ids = jnp.arange(3, dtype=jnp.int32)
  cache, _ = pk.allocate_sequences(pk.init_cache(cc), ids)
  prompt = jnp.asarray(np.random.default_rng(0).integers(0, 128, (3, 11)), jnp.int32)
  with pk.fuse_write():
    cache, _, _ = forward_jit(params, cache, prompt, ids, jnp.asarray([11, 4, 8], jnp.int32),
                              config=SMALL, implementation="pallas_gpu")
  assert fused_calls and not any(fused_calls)  # prefill: write, then attend
  tokens = jnp.asarray([3, 9, 27], jnp.int32)
  plain, fused = cache, jax.tree_util.tree_map(jnp.copy, cache)
  for i in range(2):
    fused_calls.clear()
    plain, want, st = decode_step(params, plain, tokens, ids, model=SMALL,
                                  implementation="pallas_gpu")
    assert not any(fused_calls)
    with pk.fuse_write():
      fused, got, st2 = decode_step(params, fused, tokens, ids, model=SMALL,
                                    implementation="pallas_gpu")
    assert any(fused_calls) == (i == 0)  # traced once, in the context
    assert not np.any(np.asarray(st)) and not np.any(np.asarray(st2))
    # Layer 0's K/V are computed from the same inputs: bitwise. The fused softmax adds the new
    # key in another order, so later layers' inputs differ by float32 rounding.
    for name in ("k_pool", "v_pool"):
      a, b = np.asarray(getattr(fused, name)), np.asarray(getattr(plain, name))
      np.testing.assert_array_equal(a[0], b[0])
      np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)
    for name in ("block_tables", "seq_lens", "active"):
      np.testing.assert_array_equal(np.asarray(getattr(fused, name)),
                                    np.asarray(getattr(plain, name)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
