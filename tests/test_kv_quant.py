"""Quantised caches (``CacheConfig(kv_quant=...)``) through every cache operation.

The attention accuracy of each format in each implementation is in the shared case base
(``tests/attention_cases.py``, ``test_quantized``). Here: the stored pools after appends against
the NumPy model of the format (``tests/oracle.py``), fork / copy-on-write / truncate / free,
rejected updates leave the cache untouched, no NaN / Inf from finite input, sizes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from tests.oracle import (
    ChannelKModel,
    attention_np,
    channel_k_error_bound,
    quantize_int4_v_np,
    quantize_np,
    unpack_int4_np,
)

FORMATS = ("int8", "fp8")
ALL_FORMATS = ("int8", "fp8", "int4")
# Largest |x - dequantised x| relative to the token's max|x|: half an int8 step; E4M3 keeps 3
# mantissa bits (relative step 2^-3, half of it 2^-4) down to its subnormals (step 2^-9 / 448).
REL_ERR = {"int8": 0.5 / 127, "fp8": 2.0**-4}


def _config(kv_quant, **kw):
  base = dict(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=12, max_seqs=4,
              max_seq_len=64, block_size=8, dtype=jnp.float32, kv_quant=kv_quant)
  base.update(kw)
  return pk.CacheConfig(**base)


def _assert_codes_match(got_codes, got_scale, want_codes, want_scale, kv_quant, tie=None):
  """The cache's codes and scales equal the NumPy model's (a code may differ by one rounding
  step where float32 and float64 round a tie differently; ``tie``: where the model says so)."""
  np.testing.assert_allclose(got_scale, want_scale, rtol=1e-6, equal_nan=True)
  got = np.asarray(got_codes, np.float64)
  if tie is not None:
    assert np.abs(got - want_codes).max() <= 1
    np.testing.assert_array_equal(got[~tie], want_codes[~tie])
  elif kv_quant in ("int8", "int4"):
    assert np.abs(got - want_codes).max() <= 1
    assert np.mean(got != want_codes) < 1e-3
  else:
    np.testing.assert_allclose(got, want_codes, rtol=2.0**-3, atol=2.0**-9)
    assert np.mean(got != want_codes) < 1e-3


def _stored_codes(pool):
  return unpack_int4_np(pool) if pool.dtype == jnp.uint8 else np.asarray(pool, np.float64)


@pytest.mark.parametrize("kv_quant", ALL_FORMATS)
def test_whole_pool_after_appends_matches_numpy_model(kv_quant):
  """Ragged appends over several calls, then every pool and scale cell is what the model says:
  written slots hold the format's codes and scales, every other cell its initial value. int8 /
  int4 K (per block and channel) follow ``ChannelKModel``: blocks filled over several calls
  widen their scales and requantise their older tokens."""
  cfg = _config(kv_quant)
  rng = np.random.default_rng(0)
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [0, 1, 2])
  channel_k = kv_quant in ("int8", "int4")
  untouched = -8.0 if kv_quant == "int4" else 0.0  # what a zero byte decodes to
  codes = {n: np.full(cfg.pool_shape, untouched) for n in "kv"}
  scales = {"k": np.full(cfg.k_scale_shape, np.nan), "v": np.full(cfg.v_scale_shape, np.nan)}
  k_model = ChannelKModel(kv_quant, cfg.pool_shape) if channel_k else None
  lens = [0, 0, 0]
  for step, counts in enumerate([(5, 9, 0), (1, 8, 3), (12, 0, 1), (2, 2, 2)]):
    k = rng.standard_normal((2, 3, 12, 2, 16)).astype(np.float32) * (1 + 10 * step)
    v = rng.standard_normal((2, 3, 12, 2, 16)).astype(np.float32)
    k[:, 1, 0] = 0.0  # all-zero tokens
    cache, _ = pk.append_kv(cache, jnp.asarray(k), jnp.asarray(v), [0, 1, 2], num_new=counts)
    tables = np.asarray(cache.block_tables)
    written = []
    for r, n in enumerate(counts):
      for i in range(n):
        pos = lens[r] + i
        blk, off = tables[r, pos // 8], pos % 8
        written.append((blk, off, k[:, r, i]))
        if kv_quant == "int4":
          c, s = quantize_int4_v_np(v[:, r, i])
        else:
          c, s = quantize_np(v[:, r, i], kv_quant)  # [layers, kv_heads, head_dim]
        codes["v"][:, :, blk, off], scales["v"][:, :, blk, off] = c, s
        if not channel_k:
          codes["k"][:, :, blk, off], scales["k"][:, :, blk, off] = quantize_np(k[:, r, i],
                                                                                kv_quant)
      lens[r] += n
    if channel_k:
      k_model.write(written)
  if channel_k:  # every block handed out so far (fresh blocks start from scale 0)
    used = np.unique(np.asarray(cache.block_tables))
    used = used[used != 0]
    scales["k"][:, :, used] = k_model.scale[:, :, used]
    codes["k"] = k_model.codes
  for name in "kv":
    tie = k_model.tie if channel_k and name == "k" else None
    _assert_codes_match(_stored_codes(getattr(cache, f"{name}_pool")),
                        np.asarray(getattr(cache, f"{name}_scale"), np.float64),
                        codes[name], scales[name], kv_quant, tie)
  assert cache.k_pool.dtype == cfg.storage_dtype
  assert cache.k_scale.dtype == (jnp.float32 if kv_quant == "fp8" else jnp.bfloat16)


@pytest.mark.parametrize("kv_quant", FORMATS)
def test_write_kv_quantises_and_lookup_dequantises(kv_quant):
  cfg = _config(kv_quant)
  rng = np.random.default_rng(1)
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [0, 1])
  cache, slots, _ = pk.reserve(cache, [0, 1], [11, 4], max_new=11)
  ks, vs = {}, {}
  for layer in range(cfg.num_layers):
    ks[layer] = rng.standard_normal((2, 11, 2, 16)).astype(np.float32) * 3
    vs[layer] = rng.standard_normal((2, 11, 2, 16)).astype(np.float32)
    cache, _ = pk.write_kv(cache, slots, ks[layer], vs[layer], layer, seq_ids=[0, 1])
  tables = np.asarray(cache.block_tables)
  k_scale = np.asarray(cache.k_scale.astype(jnp.float32), np.float64)
  for layer in range(cfg.num_layers):
    k, v, lens = pk.lookup_kv(cache, [0, 1], layer, max_len=16)
    assert k.dtype == cfg.dtype and list(np.asarray(lens)) == [11, 4]
    for r, n in enumerate([11, 4]):
      for name, got, x in (("k", k, ks[layer]), ("v", v, vs[layer])):
        got, x = np.asarray(got[r, :n], np.float64), x[r, :n].astype(np.float64)
        if name == "k" and kv_quant == "int8":  # within its block's channel step
          bound = k_scale[layer][:, tables[r, np.arange(n) // 8]].transpose(1, 0, 2)
        else:  # within the format's relative step of the token's max|x|
          bound = REL_ERR[kv_quant] * np.abs(x).max(axis=-1, keepdims=True)
        assert (np.abs(got - x) <= bound * (1 + 1e-5)).all()
      assert (np.asarray(k[r, n:]) == 0).all() and (np.asarray(v[r, n:]) == 0).all()


@pytest.mark.parametrize("kv_quant", ALL_FORMATS)
def test_no_nan_or_inf_from_finite_input(kv_quant):
  cfg = _config(kv_quant, num_layers=1)
  cache = pk.init_cache(cfg)
  cache, _ = pk.allocate_sequences(cache, [0])
  big = np.finfo(np.float32).max
  k = np.zeros((1, 1, 5, 2, 16), np.float32)
  k[0, 0, 1] = big  # huge values
  k[0, 0, 2, :, ::2] = -big
  k[0, 0, 3] = 1e-40  # denormal
  k[0, 0, 4, :, 0] = 1e-30  # one tiny value
  cache, _ = pk.append_kv(cache, jnp.asarray(k), jnp.asarray(k), [0])
  kk, vv, _ = pk.lookup_kv(cache, [0], 0, max_len=5)
  for x in (kk, vv, cache.k_scale, cache.v_scale):
    assert np.isfinite(np.asarray(x, np.float64)).all()
  kk = np.asarray(kk, np.float64)[0]
  vv = np.asarray(vv, np.float64)[0]
  assert (kk[0] == 0).all() and (vv[0] == 0).all()  # an all-zero token reads back as 0
  if kv_quant == "int4":  # K shares its block's channel scales: check V's per-token ones
    np.testing.assert_allclose(vv[1], big, rtol=2.0**-7)
  elif kv_quant == "int8":  # K: channel scales set by the huge token (bfloat16, toward zero)
    np.testing.assert_allclose(kk[1], big, rtol=2.0**-7)
    np.testing.assert_allclose(vv[4, :, 0], 1e-30, rtol=REL_ERR[kv_quant])
  else:
    np.testing.assert_allclose(kk[1], big, rtol=REL_ERR[kv_quant])
    np.testing.assert_allclose(kk[4, :, 0], 1e-30, rtol=REL_ERR[kv_quant])
  # Attention over them is finite too, while the logits fit float32 (q . k of the huge token
  # with q = 1 would overflow: by the attention contract that query's output is NaN).
  q = jnp.full((1, 1, 2, 16), 2.0**-100)
  out = pk.paged_attention(q, cache, [0], 0)
  assert np.isfinite(np.asarray(out)).all()
  q = jnp.ones((1, 1, 2, 16))
  assert np.isnan(np.asarray(pk.paged_attention(q, cache, [0], 0))).all()


@pytest.mark.parametrize("kv_quant", ["fp8"])
@pytest.mark.parametrize("strategy", list(pk.CacheStrategy))
def test_fork_copy_on_write_truncate_free(kv_quant, strategy):
  """Scales follow their blocks: a fork shares them, copy-on-write copies them, truncation and
  free keep every surviving token's value."""
  cfg = _config(kv_quant, strategy=strategy, num_blocks=1 + 4 * 8)
  rng = np.random.default_rng(2)
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [0])

  def tokens(n):
    return (rng.standard_normal((2, 1, n, 2, 16)).astype(np.float32),
            rng.standard_normal((2, 1, n, 2, 16)).astype(np.float32))

  def dequant(x):
    c, s = quantize_np(x, kv_quant)
    return c * s[..., None]

  k0, v0 = tokens(11)  # one full block and a partly filled one
  cache, _ = pk.append_kv(cache, k0, v0, [0])
  cache, _ = pk.fork_sequence(cache, 0, 1)
  k1, v1 = tokens(3)
  k2, v2 = tokens(2)
  cache, _ = pk.append_kv(cache, k1, v1, [1])  # copy-on-write of the shared partial block
  cache, _ = pk.append_kv(cache, k2, v2, [0])
  want = {0: (np.concatenate([k0, k2], 2), np.concatenate([v0, v2], 2)),
          1: (np.concatenate([k0, k1], 2), np.concatenate([v0, v1], 2))}

  def check(lengths):
    for layer in range(2):
      k, v, lens = pk.lookup_kv(cache, [0, 1], layer, max_len=16)
      for s in (0, 1):
        n = lengths[s]
        assert int(lens[s]) == n
        for got, x in ((k, want[s][0]), (v, want[s][1])):
          np.testing.assert_allclose(np.asarray(got[s, :n]), dequant(x[layer, 0, :n]),
                                     rtol=1e-6, atol=1e-7)

  check([13, 14])
  assert pk.check_invariants(cache).ok
  cache, _ = pk.truncate_sequences(cache, [0, 1], [5, 7])
  check([8, 7])
  k3, v3 = tokens(4)
  cache, _ = pk.append_kv(cache, k3, v3, [1])  # refills the block truncation left partial
  want[1] = (np.concatenate([want[1][0][:, :, :7], k3], 2),
             np.concatenate([want[1][1][:, :, :7], v3], 2))
  check([8, 11])
  cache, _ = pk.free_sequences(cache, [0])
  k, _, _ = pk.lookup_kv(cache, [1], 1, max_len=16)
  np.testing.assert_allclose(np.asarray(k[0, :11]), dequant(want[1][0][1, 0, :11]),
                             rtol=1e-6, atol=1e-7)
  assert pk.check_invariants(cache).ok


def _leaves_equal(a, b):
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
             for x, y in zip(la, lb, strict=True))


@pytest.mark.parametrize("kv_quant", ALL_FORMATS)
def test_bad_input_leaves_the_cache_untouched(kv_quant):
  cfg = _config(kv_quant, num_blocks=4)
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [0, 1])
  k = jnp.ones((2, 2, 8, 2, 16))
  cache, _ = pk.append_kv(cache, k, k, [0, 1], num_new=[8, 3])
  snapshot = jax.tree_util.tree_map(np.array, cache)
  # Eager: a named exception, the caller's cache untouched (and still usable).
  with pytest.raises(pk.PoolExhaustedError):
    pk.append_kv(cache, 2 * k, 2 * k, [0, 1], num_new=[8, 8])
  with pytest.raises(pk.InvalidTokenSlotError):
    pk.write_kv(cache, jnp.array([[0]]), k[0, :1, :1], k[0, :1, :1], 0)
  assert _leaves_equal(cache, snapshot)
  # jit: a status, the cache bitwise unchanged (scales included).
  out, status = jax.jit(lambda c: pk.append_kv(c, 2 * k, 2 * k, [0, 5], num_new=[8, 8]))(cache)
  assert list(np.asarray(status)) == [0, int(pk.Status.INVALID_SLOT)]
  assert _leaves_equal(out.replace(telemetry=cache.telemetry), snapshot)
  bad_slots = jnp.array([[8 * 3 + 2]])  # block 3: free
  out, status = jax.jit(lambda c: pk.write_kv(c, bad_slots, k[0, :1, :1] * 9, k[0, :1, :1],
                                              0))(cache)
  assert int(status[0]) == int(pk.Status.INVALID_TOKEN_SLOT)
  assert _leaves_equal(out, snapshot)


@pytest.mark.parametrize("kv_quant", FORMATS)
def test_sizes_count_scales_and_a_budget_buys_about_twice_the_tokens(kv_quant):
  geo = dict(num_layers=4, num_kv_heads=8, head_dim=128, max_seq_len=4096, block_size=16)
  bf16 = pk.CacheConfig.from_memory_budget(1 << 30, dtype=jnp.bfloat16, **geo)
  q = pk.CacheConfig.from_memory_budget(1 << 30, dtype=jnp.bfloat16, kv_quant=kv_quant, **geo)
  if kv_quant == "fp8":  # 1 byte per value + a float32 scale per (token, head) for K and V
    assert q.bytes_per_token == 2 * 4 * 8 * (128 + 4)
    assert 1.9 < q.num_blocks / bf16.num_blocks < 2.0
  else:  # int8 K: a bfloat16 scale per channel per 16-token block; V: a float32 per token
    assert q.bytes_per_token == 4 * 8 * ((128 + 2 * 128 / 16) + (128 + 4))
    assert 1.8 < q.num_blocks / bf16.num_blocks < 1.9
  assert q.pool_bytes == q.bytes_per_token * q.block_size * q.num_blocks
  assert q.pool_bytes <= 1 << 30
  cache = pk.init_cache(dataclasses.replace(q, num_blocks=3))
  stored = sum(x.nbytes for x in (cache.k_pool, cache.v_pool, cache.k_scale, cache.v_scale))
  assert stored == 3 * q.block_bytes
  stats = pk.cache_stats(cache)
  assert int(stats.bytes_per_token) == q.bytes_per_token


def test_int4_sizes():
  geo = dict(num_layers=4, num_kv_heads=8, head_dim=128, max_seq_len=4096, block_size=16)
  bf16 = pk.CacheConfig.from_memory_budget(1 << 30, dtype=jnp.bfloat16, **geo)
  q = pk.CacheConfig.from_memory_budget(1 << 30, dtype=jnp.bfloat16, kv_quant="int4", **geo)
  # K: 64 bytes + a bfloat16 scale per channel per 16-token block; V: 64 bytes + 4 scales.
  assert q.bytes_per_token == 4 * 8 * ((64 + 2 * 128 / 16) + (64 + 2 * 4))
  assert 3.3 < q.num_blocks / bf16.num_blocks < 3.5
  cache = pk.init_cache(dataclasses.replace(q, num_blocks=3))
  stored = sum(x.nbytes for x in (cache.k_pool, cache.v_pool, cache.k_scale, cache.v_scale))
  assert stored == 3 * q.block_bytes and cache.k_pool.shape[-1] == 64


def test_config_rejects_unknown_formats():
  with pytest.raises(ValueError, match="kv_quant"):
    _config("int3")
  for head_dim in (48, np.int64(48), np.int32(33), 3):  # NumPy integers are checked too
    with pytest.raises(ValueError, match="int4"):
      _config("int4", head_dim=head_dim)
  assert pk.init_cache(_config(None)).k_scale is None  # unquantised: no scale leaves


@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
def test_kernels_reject_unsupported_quantised_layouts_at_trace_time(implementation):
  # TPU: an int8 / fp8 page must be whole 32-row tiles; GPU: power-of-two head_dim.
  cfg = _config("int8", block_size=16, head_dim=16) if implementation == "pallas_tpu" else (
      _config("int8", head_dim=24))
  cache = pk.init_cache(cfg)
  cache, _ = pk.allocate_sequences(cache, [0])
  q = jnp.ones((1, 1, 2, cfg.head_dim))
  with pytest.raises(ValueError, match=implementation):
    pk.paged_attention(q, cache, [0], 0, implementation=implementation, interpret=True)
  assert pk.default_implementation("gpu", cfg) == (
      "pallas_gpu" if implementation == "pallas_tpu" else "xla")


def _teacher_forced_argmax(model, params, kv_quant, tokens):
  """Next-token argmax at every position of ``tokens [batch, n]`` (one prefill, all logits)."""
  from tests.llama_fixtures import forward_jit

  batch, n = tokens.shape
  cc = dataclasses.replace(
      pk.cache_config_for(model, num_blocks=1 + batch * -(-n // 16), max_seqs=batch,
                          max_seq_len=n, block_size=16), kv_quant=kv_quant)
  cache, _ = pk.allocate_sequences(pk.init_cache(cc), np.arange(batch))
  _, logits, status = forward_jit(params, cache, jnp.asarray(tokens), jnp.arange(batch),
                                  jnp.full((batch,), n), config=model, all_logits=True)
  assert not np.asarray(status).any()
  return np.asarray(logits).argmax(-1)


AGREEMENT = {"int8": 0.99, "fp8": 0.97, "int4": 0.90}


@pytest.mark.parametrize("family", ["demo", "gemma2"])
def test_teacher_forced_next_token_agreement(family):
  """256 teacher-forced positions: the quantised cache's next token matches the unquantised
  cache's at >= 99% (int8) / >= 97% (fp8) / >= 90% (int4) of them.

  The demo's model (``jax_paged_kv.demo``, "tiny") with ``init_params``' default weight scale,
  and a Gemma 2 configuration (soft caps, sliding window).
  """
  from jax_paged_kv.demo import model_config
  from jax_paged_kv.models import gemma2, init_params

  if family == "demo":
    model = model_config("tiny")
    params = init_params(model, jax.random.PRNGKey(0))
  else:
    model = gemma2.Gemma2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32, query_pre_attn_scalar=32, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, sliding_window=64)
    params = gemma2.init_params(model, jax.random.PRNGKey(1), scale=2.0)
  tokens = np.random.default_rng(0).integers(0, model.vocab_size, (2, 128)).astype(np.int32)
  want = _teacher_forced_argmax(model, params, None, tokens)
  for kv_quant, bound in AGREEMENT.items():
    got = _teacher_forced_argmax(model, params, kv_quant, tokens)
    assert np.mean(got == want) >= bound, (kv_quant, np.mean(got == want))


@pytest.mark.parametrize("kv_quant", FORMATS)
def test_export_roundtrip_of_a_quantised_decode_step(kv_quant):
  pytest.importorskip("flatbuffers")  # jax.export serialisation needs it
  from jax_paged_kv.models import init_params
  from jax_paged_kv.serving.decoding import decode_step
  from jax_paged_kv.serving.export import ExportedDecodeStep, export_decode_step
  from tests.llama_fixtures import SMALL

  params = init_params(SMALL, jax.random.PRNGKey(0))
  cc = dataclasses.replace(SMALL.cache_config(num_blocks=12, max_seqs=2, max_seq_len=32,
                                              block_size=4), kv_quant=kv_quant)
  cache, _ = pk.allocate_sequences(pk.init_cache(cc), [0, 1])
  for t in range(6):
    cache, _, _ = decode_step(params, cache, np.asarray([t, 2 * t], np.int32),
                              np.asarray([0, 1], np.int32), config=SMALL)
  step = ExportedDecodeStep.deserialize(export_decode_step(params, cache, batch=2,
                                                           config=SMALL).serialize())
  tokens, ids = np.asarray([7, 8], np.int32), np.asarray([0, 1], np.int32)
  copy = jax.tree_util.tree_map(lambda x: x.copy(), cache)
  want = decode_step(params, copy, tokens, ids, config=SMALL)
  got = step(params, cache, tokens, ids)
  assert got[0].k_pool.dtype == cc.storage_dtype
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


def _heavy(rng, shape, heavy):
  k, v = rng.standard_normal(shape), rng.standard_normal(shape)
  if heavy:  # outlier K channels, log-normal V token norms
    ch = rng.choice(shape[-1], 4, replace=False)
    k[..., ch] = k[..., ch] * 12.0 + 6.0
    v = v * np.exp(rng.standard_normal(shape[:-1]))[..., None]
  return k, v


INCREMENTAL_BOUNDS = {"int8": (1.5e-2, 5e-2), "int4": (0.2, 0.3)}  # (normal, heavy)


@pytest.mark.parametrize("heavy", [False, True], ids=["normal", "heavy"])
@pytest.mark.parametrize("chunk", [1, 13])
@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_channel_k_incremental_writes_hold_the_error_bounds(kv_quant, heavy, chunk):
  """int8 / int4 K scales are per block and channel, widened (and older tokens requantised) as
  tokens arrive: decode (one token per append) and chunked prefill (13) stay within the issue's
  bounds (int8 1.5e-2 / 5e-2, int4 0.2 / 0.3), and every value within the rounding bound of
  the widenings it went through."""
  batch, n, heads, d, ratio = 2, 90, 2, 64, 4
  rng = np.random.default_rng(3)
  k, v = _heavy(rng, (batch, n, heads, d), heavy)
  cfg = _config(kv_quant, num_layers=1, num_kv_heads=heads, head_dim=d, block_size=16,
                num_blocks=1 + batch * 6, max_seqs=batch, max_seq_len=96)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg, pool_fill=np.nan), np.arange(batch))
  app = jax.jit(lambda c, k, v: pk.append_kv(c, k, v, jnp.arange(batch)))
  for s in range(0, n, chunk):
    cache, st = app(cache, jnp.asarray(k[None, :, s:s + chunk], jnp.float32),
                    jnp.asarray(v[None, :, s:s + chunk], jnp.float32))
    assert not np.asarray(st).any()
  # Every stored K value is within the bound of its block's final channel step and the write
  # calls into its block after its own (chunk c: call p // c).
  kk, vv, _ = pk.lookup_kv(cache, np.arange(batch), 0, max_len=n)
  tables = np.asarray(cache.block_tables)
  k_scale = np.asarray(cache.k_scale.astype(jnp.float32), np.float64)[0]  # [h, nb, d]
  step = np.stack([k_scale[:, tables[b, np.arange(n) // 16]] for b in range(batch)])
  step = step.transpose(0, 2, 1, 3)  # [batch, n, heads, d]
  pos = np.arange(n)
  last_call = (np.minimum((pos // 16 + 1) * 16, n) - 1) // chunk  # the block's last write call
  later = (last_call - pos // chunk)[None, :, None, None]
  assert later.max() == (15 if chunk == 1 else 2)  # a block spans up to 3 calls of 13
  bound = channel_k_error_bound(step, later, kv_quant)
  assert (np.abs(np.asarray(kk, np.float64) - k) <= bound + 1e-30).all()
  # Attention (decode and a chunk of prefill queries) against float64 on the true data.
  for q_len in (1, 8):
    q = rng.standard_normal((batch, q_len, heads * ratio, d))
    out = pk.paged_attention(jnp.asarray(q, jnp.float32), cache, np.arange(batch), 0)
    kp = np.zeros((1, heads, cfg.num_blocks, 16, d))
    vp = np.zeros_like(kp)
    for b in range(batch):
      for p in range(n):
        kp[0, :, tables[b, p // 16], p % 16] = k[b, p]
        vp[0, :, tables[b, p // 16], p % 16] = v[b, p]
    want, _ = attention_np(q, kp, vp, 0, tables, [n] * batch, [q_len] * batch,
                           scale=d ** -0.5)
    err = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
    assert err <= INCREMENTAL_BOUNDS[kv_quant][heavy], err


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_channel_k_fork_copy_on_write_truncate_free(kv_quant):
  """Scales (per block for K) follow forks, copy-on-write, truncation and free; a fork's
  child widening the shared block's copy never changes the parent's values."""
  cfg = _config(kv_quant, head_dim=32, num_blocks=20)
  rng = np.random.default_rng(4)
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [0])
  k0 = rng.standard_normal((2, 1, 11, 2, 32)).astype(np.float32)
  cache, _ = pk.append_kv(cache, k0, -k0, [0])
  before, _, _ = pk.lookup_kv(cache, [0], 1, max_len=11)
  cache, _ = pk.fork_sequence(cache, 0, 1)
  big = 50 * rng.standard_normal((2, 1, 3, 2, 32)).astype(np.float32)
  cache, _ = pk.append_kv(cache, big, -big, [1])  # widens the child's copy of block 1
  parent, _, _ = pk.lookup_kv(cache, [0], 1, max_len=11)
  np.testing.assert_array_equal(np.asarray(parent), np.asarray(before))
  child, cv, lens = pk.lookup_kv(cache, [1], 1, max_len=14)
  assert int(lens[0]) == 14
  np.testing.assert_array_equal(np.asarray(child[0, :8]), np.asarray(before[0, :8]))
  qmax = {"int8": 127, "int4": 7}[kv_quant]
  np.testing.assert_allclose(np.asarray(child[0, 11:]), big[1, 0], rtol=0.1, atol=50 / qmax)
  np.testing.assert_allclose(np.asarray(cv[0, 11:]), -big[1, 0], rtol=0.1, atol=50 / qmax)
  cache, _ = pk.truncate_sequences(cache, [1], 6)
  cache, _ = pk.free_sequences(cache, [0])
  child2, _, lens = pk.lookup_kv(cache, [1], 1, max_len=8)
  assert int(lens[0]) == 8
  np.testing.assert_array_equal(np.asarray(child2[0]), np.asarray(child[0, :8]))
  assert pk.check_invariants(cache).ok
  assert int(pk.cache_stats(cache).free_blocks) == cfg.usable_blocks - 1


def test_fp8_heavy_tailed_error_is_the_e4m3_rounding_floor():
  """fp8 on heavy-tailed data at a long context (2 x 2,048 tokens, head_dim 128, GQA 4): the
  cache's attention error against float64 is that of rounding K and V to E4M3 with the same
  per-(token, head) scales (the NumPy model of the format): the cache adds nothing to the
  format's own error. That floor varies with the draw around the issue's 6e-2 bound (outlier
  K channels x12 + 6 carry E4M3's ~3.6% RMS relative rounding into the logits; rescaling per
  channel cannot help, the error is relative to each value): README, *Known misses*."""
  batch, n, kvh, ratio, d = 2, 2048, 2, 4, 128
  rng = np.random.default_rng(1)
  k, v = rng.standard_normal((2, batch, n, kvh, d))
  ch = rng.choice(d, 4, replace=False)
  k[..., ch] = k[..., ch] * 12.0 + 6.0
  v = v * np.exp(rng.standard_normal((batch, n, kvh)))[..., None]
  q = rng.standard_normal((batch, 1, kvh * ratio, d))
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=kvh, head_dim=d, block_size=16,
                       num_blocks=1 + batch * n // 16, max_seqs=batch, max_seq_len=n,
                       dtype=jnp.float32, kv_quant="fp8")
  ids = np.arange(batch)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), ids)
  k32, v32 = k.astype(np.float32), v.astype(np.float32)
  cache, _ = pk.append_kv(cache, jnp.asarray(k32)[None], jnp.asarray(v32)[None], ids)
  out = np.asarray(pk.paged_attention(jnp.asarray(q, jnp.float32), cache, ids, 0), np.float64)

  def dense(kk, vv):  # float64 decode attention over dense K / V
    kk, vv = np.repeat(kk, ratio, axis=2), np.repeat(vv, ratio, axis=2)
    s = np.einsum("bhd,bshd->bhs", q[:, 0], kk) * d ** -0.5
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhs,bshd->bhd", p / p.sum(-1, keepdims=True), vv)[:, None]

  def rounded(x):
    codes, scale = quantize_np(x, "fp8")
    return codes * scale[..., None]

  want = dense(k32, v32)
  err = np.linalg.norm(out - want) / np.linalg.norm(want)
  floor = np.linalg.norm(dense(rounded(k32), rounded(v32)) - want) / np.linalg.norm(want)
  assert err <= 1.02 * floor, (err, floor)


def _rope(x, pos, base=10000.0):
  """Rotary embedding of ``x [..., head_dim]`` at positions ``pos`` (broadcast to ``x[..., 0]``)."""
  half = x.shape[-1] // 2
  ang = np.asarray(pos, np.float64)[..., None] * base ** (-np.arange(half) / half)
  c, s = np.cos(ang), np.sin(ang)
  return np.concatenate([x[..., :half] * c - x[..., half:] * s,
                         x[..., :half] * s + x[..., half:] * c], axis=-1)


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_channel_k_decode_appends_of_rotary_keys_stay_near_whole_block_writes(kv_quant):
  """Keys as a RoPE model makes them (a few large constant channels, rotated by position) turn
  a block's channel ranges into ramps, so decode appends widen the scales token after token.
  Their attention error stays within 1.25x (int8) / 1.3x (int4) that of the same keys written a
  whole block at a time (both against float64 on the true data; now 1.20x / 1.00x). Widening to
  at least twice the old scale, the rule before, measures 1.31x / 1.70x here: both gates catch
  it."""
  batch, n, heads, d, bs = 4, 128, 2, 64, 16
  rng = np.random.default_rng(0)
  mu = rng.standard_normal((heads, d)) * 0.5
  for h in range(heads):
    ch = rng.choice(d, 4, replace=False)
    mu[h, ch] = rng.choice([-1, 1], 4) * rng.uniform(5, 15, 4)
  pos = np.arange(n) + rng.integers(0, 1000, (batch, 1))
  k = _rope(mu + rng.standard_normal((batch, n, heads, d)), pos[..., None])
  v = rng.standard_normal((batch, n, heads, d))
  q = _rope(rng.standard_normal((batch, 1, 4 * heads, d)), pos[:, -1:, None])
  cfg = _config(kv_quant, num_layers=1, num_kv_heads=heads, head_dim=d, block_size=bs,
                num_blocks=1 + batch * n // bs, max_seqs=batch, max_seq_len=n)
  app = jax.jit(lambda c, k, v: pk.append_kv(c, k, v, jnp.arange(batch)))
  errs = {}
  for chunk in (1, bs):
    cache, _ = pk.allocate_sequences(pk.init_cache(cfg), np.arange(batch))
    for s in range(0, n, chunk):
      cache, _ = app(cache, jnp.asarray(k[None, :, s:s + chunk], jnp.float32),
                     jnp.asarray(v[None, :, s:s + chunk], jnp.float32))
    out = pk.paged_attention(jnp.asarray(q, jnp.float32), cache, np.arange(batch), 0)
    tables = np.asarray(cache.block_tables)
    kp = np.zeros((1, heads, cfg.num_blocks, bs, d))
    vp = np.zeros_like(kp)
    for b in range(batch):
      kp[0, :, tables[b, np.arange(n) // bs], np.arange(n) % bs] = k[b]
      vp[0, :, tables[b, np.arange(n) // bs], np.arange(n) % bs] = v[b]
    want, _ = attention_np(q, kp, vp, 0, tables, [n] * batch, [1] * batch, scale=d ** -0.5)
    errs[chunk] = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
  assert errs[bs] <= INCREMENTAL_BOUNDS[kv_quant][1], errs
  assert errs[1] <= {"int8": 1.25, "int4": 1.3}[kv_quant] * errs[bs], errs


@pytest.mark.parametrize("poison", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_channel_k_non_finite_input_reads_back_nan_in_its_block_channel(kv_quant, poison):
  """A NaN / Inf written into K (per block and channel scales) makes that block's channel read
  back as NaN for every token of the block, whether it arrives with the block's first tokens
  or later; other channels, other blocks and other sequences read back what a clean run
  stores (before, the channel silently read back as 0)."""
  heads, d, bs, n = 1, 64, 8, 20
  rng = np.random.default_rng(5)
  k = rng.standard_normal((1, 2, n, heads, d)).astype(np.float32)
  v = rng.standard_normal((1, 2, n, heads, d)).astype(np.float32)
  cfg = _config(kv_quant, num_layers=1, num_kv_heads=heads, head_dim=d, block_size=bs,
                num_blocks=1 + 2 * 3, max_seqs=2, max_seq_len=24)
  app = jax.jit(lambda c, k, v: pk.append_kv(c, k, v, jnp.arange(2)))

  def run(kk):
    cache, _ = pk.allocate_sequences(pk.init_cache(cfg), [0, 1])
    cache, _ = app(cache, jnp.asarray(kk[:, :, :4]), jnp.asarray(v[:, :, :4]))  # prefill 4
    for t in range(4, n):  # then decode
      cache, _ = app(cache, jnp.asarray(kk[:, :, t:t + 1]), jnp.asarray(v[:, :, t:t + 1]))
    return cache, np.asarray(pk.lookup_kv(cache, [0, 1], 0, max_len=n)[0])

  clean_cache, clean = run(k)
  bad = k.copy()
  bad[0, 0, 2, 0, 7] = poison  # block 0, written with the prefill
  bad[0, 0, 13, 0, 40] = poison  # block 1, a decode step after the block's first tokens
  cache, got = run(bad)
  want = clean.copy()
  want[0, 0:8, 0, 7] = np.nan  # every token of the poisoned blocks, in that channel
  want[0, 8:16, 0, 40] = np.nan
  np.testing.assert_array_equal(got, want)  # NaN where expected, bit-equal elsewhere
  q = jnp.asarray(rng.standard_normal((2, 1, 2, d)), jnp.float32)
  for impl, kw in (("xla", {}), ("pallas_gpu", {"interpret": True})):
    attend = functools.partial(pk.paged_attention, q, seq_ids=[0, 1], layer=0, return_lse=True,
                               implementation=impl, **kw)
    out, lse = map(np.asarray, attend(cache=cache))
    ref, ref_lse = map(np.asarray, attend(cache=clean_cache))
    # The attention contract for a NaN in a visible key: that query's logits are NaN, so its
    # output and LSE are NaN (a silently finite key would give a plausible softmax).
    assert np.isnan(out[0]).all() and np.isnan(lse[0]).all(), impl
    assert np.isfinite(ref[0]).all() and (ref[0] != 0).any()
    np.testing.assert_array_equal(out[1], ref[1])  # the other sequence is untouched
    np.testing.assert_array_equal(lse[1], ref_lse[1])


@pytest.mark.parametrize("kv_quant", ["int8", "int4"])
def test_rollback_of_an_outlier_narrows_the_block_channel_scales(kv_quant):
  """A rejected draft token that widened its block's K channel scales (an outlier) must not
  keep the block coarse: after truncate_sequences the new last block's scales fit the tokens
  it keeps, so a token written after the rollback is as exact as in a block that never saw the
  outlier. (The kept tokens were requantised when the outlier was written: that precision is
  gone; a lossless rollback keeps the old cache, a free snapshot.) A block shared with a fork
  is left as it is, and a rollback of tokens that widened nothing changes no bit."""
  qmax = {"int8": 127.0, "int4": 7.0}[kv_quant]
  cfg = _config(kv_quant, num_layers=1, num_kv_heads=1, head_dim=32, max_seqs=2)
  rng = np.random.default_rng(3)
  k = rng.standard_normal((1, 1, 4, 1, 32)).astype(np.float32)
  outlier = np.full((1, 1, 1, 1, 32), 1e4, np.float32)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), [0])
  cache, _ = pk.append_kv(cache, k[:, :, :3], k[:, :, :3], [0])
  base = jax.tree_util.tree_map(np.asarray, cache)
  # Rolling back a token inside the range widens nothing: every bit stays.
  small, _ = pk.append_kv(cache, k[:, :, 3:] * 0.1, k[:, :, 3:] * 0.1, [0], donate=False)
  small, _ = pk.truncate_sequences(small, [0], 1)
  np.testing.assert_array_equal(np.asarray(small.k_pool), base.k_pool)
  np.testing.assert_array_equal(np.asarray(small.k_scale), base.k_scale)
  # A fork shares the block: its rollback must not touch the parent's codes or scales.
  wide, _ = pk.append_kv(cache, outlier, outlier, [0], donate=False)
  forked, _ = pk.fork_sequence(wide, 0, 1, donate=False)
  forked, _ = pk.truncate_sequences(forked, [1], 1)
  np.testing.assert_array_equal(np.asarray(forked.k_pool), np.asarray(wide.k_pool))
  np.testing.assert_array_equal(np.asarray(forked.k_scale), np.asarray(wide.k_scale))
  # Alone: the scales narrow to the kept tokens, and the next token is exact to the format.
  cache, status = pk.truncate_sequences(wide, [0], 1)
  assert list(np.asarray(status)) == [0]
  kept = np.asarray(pk.lookup_kv(cache, [0], 0, max_len=3)[0])[0, :, 0]  # [3, head_dim]
  blk = int(cache.block_tables[0, 0])
  scale = np.asarray(cache.k_scale, np.float64)[0, 0, blk]
  assert (scale <= np.abs(kept).max(axis=0) / qmax * (1 + 1e-6)).all()
  cache, _ = pk.append_kv(cache, k[:, :, 3:], k[:, :, 3:], [0])
  got = np.asarray(pk.lookup_kv(cache, [0], 0, max_len=4)[0], np.float64)[0, 3, 0]
  step = np.maximum(np.abs(kept).max(axis=0), np.abs(k[0, 0, 3, 0])) / qmax
  assert (np.abs(got - k[0, 0, 3, 0]) <= step * (0.5 + 0.5) + 1e-6).all()  # before: read 0
  assert np.abs(k[0, 0, 3, 0]).max() < 0.5 * 1e4 / qmax  # the old scale rounds it all to 0
  assert np.abs(got).max() > 0


def test_channel_k_clip_at_the_widening_threshold_is_within_the_stated_bound():
  """The worst clip: a value whose rounded-down bfloat16 scale sits just under the widening
  threshold keeps the old scale and loses ``(qmax + 0.5) / (1 - 2^-7) - qmax`` steps at most
  (more than the ``0.5 + qmax * 2^-7`` an earlier README stated)."""
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=3, max_seqs=1,
                       max_seq_len=8, block_size=8, kv_quant="int8")
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), [0])
  big = np.nextafter(np.float32(255.984375), np.float32(0))  # its scale truncates to 2.0
  for x in (np.float32(253.01), big):  # the first sets the scale to bfloat16 1.9921875
    k = jnp.asarray(np.array([x, 1.0], np.float32).reshape(1, 1, 1, 1, 2))
    cache, _ = pk.append_kv(cache, k, k, [0])
  step = float(cache.k_scale[0, 0, 1, 0])
  assert step == 1.9921875  # not widened: 2.0 <= 1.9921875 * (1 + 0.5 / 127)
  got = np.asarray(pk.lookup_kv(cache, [0], 0, max_len=2)[0], np.float64)[0, 1, 0, 0]
  err = (np.float64(big) - got) / step
  assert 0.5 + 127 * 2**-7 < err <= channel_k_error_bound(step, 0, "int8") / step
