"""Swap preemption: ``swap_out`` / ``swap_in`` round trips against a snapshot of the pools
(bitwise, scales included), bad input, and the engine's ``preemption="swap"`` against float64
greedy references and an unconstrained run."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine, generate
from tests.llama_fixtures import SMALL
from tests.llama_reference import reference_greedy

CFG = pk.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=64, num_blocks=1 + 20, max_seqs=4,
                     max_seq_len=40, block_size=4, dtype=jnp.float32)
LEAVES = ("k_pool", "v_pool", "k_scale", "v_scale")


def leaves(cache):
  """Every pool leaf the cache has, as raw bits (so NaN payloads compare too)."""
  out = {}
  for n in LEAVES:
    x = getattr(cache, n)
    if x is not None:
      x = np.asarray(x)
      out[n] = x.view(f"u{x.dtype.itemsize}")
  return out


def filled_cache(cfg, rng):
  """Slots 0 and 1 with random K/V (lengths not block multiples), slot 2 a fork of slot 0 that
  has grown past it (so slot 0 shares blocks), NaN everywhere unused."""
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, np.int32([0, 1]))
  k = rng.standard_normal((cfg.num_layers, 2, 13, cfg.num_kv_heads, cfg.head_dim), np.float32)
  cache, _ = pk.append_kv(cache, k, -2 * k, np.int32([0, 1]), num_new=np.int32([13, 7]))
  cache, _ = pk.fork_sequence(cache, np.int32(0), np.int32(2))
  k2 = rng.standard_normal((cfg.num_layers, 1, 5, cfg.num_kv_heads, cfg.head_dim), np.float32)
  cache, _ = pk.append_kv(cache, k2, k2, np.int32([2]))
  return cache


@pytest.mark.parametrize("kv_quant", [None, "int8", "int4"])
def test_swap_round_trip_is_bitwise(kv_quant):
  cfg = dataclasses.replace(CFG, kv_quant=kv_quant)
  rng = np.random.default_rng(0)
  cache = filled_cache(cfg, rng)
  before = leaves(cache)
  table0 = np.asarray(cache.block_tables[0])
  others = {s: (np.asarray(cache.block_tables[s]), int(cache.seq_lens[s])) for s in (1, 2)}
  refs = np.asarray(cache.allocator.ref_counts)
  free0 = int(cache.allocator.num_free)

  cache, sw = pk.swap_out(cache, 0)
  assert sw.seq_len == 13 and sw.num_blocks == 4 and sw.width == 4
  assert sw.memory_kind == pk.cache.swap.host_memory_kind(cache)
  if sw.memory_kind is not None:
    assert all(x.sharding.memory_kind == sw.memory_kind for x in sw.blocks.values())
  # Slot 0 shares its three full blocks with its fork (slot 2), which copied the partial last
  # block on write: only that block returns to the pool.
  owned = sum(refs[b] == 1 for b in table0[:4])
  assert int(cache.allocator.num_free) == free0 + owned
  assert not bool(cache.active[0]) and bool(pk.check_invariants(cache).ok)
  for name, x in sw.blocks.items():  # the host copy is the blocks in table order
    x = np.asarray(x)
    np.testing.assert_array_equal(x.view(f"u{x.dtype.itemsize}")[:, :, :4],
                                  before[name][:, :, table0[:4]])

  # Reuse the freed blocks (their ids change hands), then swap back into another slot.
  cache, _ = pk.allocate_sequences(cache, np.int32(3))
  k = rng.standard_normal((cfg.num_layers, 1, 4, cfg.num_kv_heads, cfg.head_dim), np.float32)
  cache, _ = pk.append_kv(cache, k, k, np.int32([3]))
  mid = leaves(cache)
  cache, status = pk.swap_in(cache, 0, sw)
  assert not np.any(np.asarray(status)) and bool(pk.check_invariants(cache).ok)
  new = np.asarray(cache.block_tables[0])
  assert int(cache.seq_lens[0]) == 13 and not np.any(new[4:])
  assert len(set(new[:4].tolist()) | set(np.asarray(cache.block_tables[3])[:1].tolist())) == 5
  after = leaves(cache)
  for name in before:
    np.testing.assert_array_equal(after[name][:, :, new[:4]], before[name][:, :, table0[:4]])
    # Nothing else moved: every block but the four new ones is as it was before the swap-in.
    rest = np.setdiff1d(np.arange(cfg.num_blocks), new[:4])
    np.testing.assert_array_equal(after[name][:, :, rest], mid[name][:, :, rest])
  for s, (table, n) in others.items():
    assert int(cache.seq_lens[s]) == n
    np.testing.assert_array_equal(np.asarray(cache.block_tables[s]), table)


def test_swap_bad_input_raises_or_reports_and_changes_nothing():
  cfg = dataclasses.replace(CFG, num_blocks=1 + 12)
  cache = filled_cache(cfg, np.random.default_rng(1))  # 8 blocks held
  with pytest.raises(pk.InactiveSlotError):
    pk.swap_out(cache, 3)
  with pytest.raises(pk.InvalidSlotError):
    pk.swap_out(cache, cfg.max_seqs)
  # A one-sequence op has no padding: -1 would read slot max_seqs - 1 (NumPy's indexing).
  with pytest.raises(pk.InvalidSlotError):
    pk.swap_out(cache, -1)
  cache, sw = pk.swap_out(cache, 1)  # 2 blocks out: 6 free
  with pytest.raises(pk.SlotInUseError):
    pk.swap_in(cache, 0, sw)
  with pytest.raises(pk.InvalidSlotError):
    pk.swap_in(cache, -1, sw)
  before = jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.asarray, cache))
  dev = dataclasses.replace(sw, blocks={n: jnp.asarray(np.asarray(x))
                                        for n, x in sw.blocks.items()}, memory_kind=None)
  out, status = jax.jit(lambda c, i: pk.swap_in(c, i, dev))(cache, jnp.int32(-1))
  assert list(np.asarray(status)) == [pk.Status.INVALID_SLOT]  # not a silent drop
  for x, y in zip(jax.tree_util.tree_leaves(out), before, strict=True):
    np.testing.assert_array_equal(np.asarray(x), y)
  with pytest.raises(pk.CacheShapeError, match="k_scale"):
    pk.swap_in(pk.init_cache(dataclasses.replace(cfg, kv_quant="int8")), 3, sw)
  # bfloat16 and float16 pool_bits pools both store uint16: the bits would be misread.
  bits = dataclasses.replace(cfg, dtype=jnp.bfloat16, pool_bits=True)
  half, _ = pk.allocate_sequences(pk.init_cache(bits), np.int32(0))
  ones = jnp.full((cfg.num_layers, 1, 3, cfg.num_kv_heads, cfg.head_dim), 1.5, jnp.bfloat16)
  half, _ = pk.append_kv(half, ones, ones, np.int32([0]))
  half, sw16 = pk.swap_out(half, 0)
  f16 = pk.init_cache(dataclasses.replace(bits, dtype=jnp.float16))
  assert f16.k_pool.dtype == half.k_pool.dtype  # the same storage
  with pytest.raises(pk.CacheShapeError, match="misread"):
    pk.swap_in(f16, 0, sw16)
  # Take every free block: eagerly an exception, inside jit a status and the cache unchanged.
  cache, _ = pk.allocate_sequences(cache, np.int32(1))
  k = np.zeros((cfg.num_layers, 1, 6 * cfg.block_size, cfg.num_kv_heads, cfg.head_dim),
               np.float32)
  cache, _ = pk.append_kv(cache, k, k, np.int32([1]))
  assert int(cache.allocator.num_free) == 0
  full = jax.tree_util.tree_map(np.asarray, cache)
  with pytest.raises(pk.PoolExhaustedError):
    pk.swap_in(cache, 3, sw)
  dev = dataclasses.replace(sw, blocks={n: jnp.asarray(np.asarray(x))
                                        for n, x in sw.blocks.items()}, memory_kind=None)
  out, status = jax.jit(lambda c: pk.swap_in(c, np.int32(3), dev))(cache)
  assert list(np.asarray(status)) == [pk.Status.POOL_EXHAUSTED]
  assert int(out.telemetry.failed_allocations) == int(full.telemetry.failed_allocations) + 1
  want = jax.tree_util.tree_leaves(full.replace(telemetry=out.telemetry))
  for x, y in zip(jax.tree_util.tree_leaves(out), want, strict=True):
    np.testing.assert_array_equal(np.asarray(x), y)


# ---- the engine --------------------------------------------------------------------------------

PARAMS = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)
FIXED = dict(prefill_chunk=8, decode_steps=4, batch_bucket_min=4, bucket_blocks=False)
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 128, n).tolist() for n in (3, 17, 9, 30, 6, 12)]
NEW = 10
REFS = [reference_greedy(PARAMS, SMALL, p, NEW) for p in PROMPTS]


def engine_config(num_blocks, kv_quant=None):
  cc = SMALL.cache_config(num_blocks=num_blocks, max_seqs=4, max_seq_len=48, block_size=4)
  return dataclasses.replace(cc, kv_quant=kv_quant)


def run_checked(engine):
  """Runs to completion, checking every invariant after each step."""
  while engine.has_work:
    engine.step()
    report = pk.check_invariants(engine.cache)
    assert bool(report.ok), report.failures()
  return sorted(engine.finished.values(), key=lambda o: o.request_id)


@pytest.mark.parametrize("prefix", [False, True])
def test_swap_preemption_matches_the_reference(prefix):
  # 16 usable blocks of 4 tokens: the longest request alone needs 10.
  engine = Engine(PARAMS, SMALL, engine_config(1 + 16), watermark=0.0, reserve_ratio=0.0,
                  preemption="swap", enable_prefix_caching=prefix, **FIXED)
  for p in PROMPTS:
    engine.add_request(p, SamplingParams(max_new_tokens=NEW))
  outs = run_checked(engine)
  m = engine.metrics
  assert m.preemptions > 0 and m.swapped_out_blocks > 0
  assert sum(o.num_preemptions for o in outs) == m.preemptions
  # Swapped requests resume where they were: nothing is prefilled twice.
  assert m.prompt_tokens + m.cached_prompt_tokens == sum(len(p) for p in PROMPTS)
  assert [o.tokens for o in outs] == REFS
  if prefix:
    engine.reset_prefix_cache()
  assert int(engine.cache.allocator.num_free) == 16
  assert not np.any(np.asarray(engine.cache.allocator.ref_counts))
  assert not np.any(np.asarray(engine.cache.active))


def test_swap_preemption_of_an_int8_cache_matches_an_unconstrained_run():
  sampling = SamplingParams(max_new_tokens=NEW)
  cc = engine_config(1 + 16, "int8")
  runs = {}
  # reserve_ratio=1 admits a request only if it can run to its limit: never a preemption.
  for ratio, preemption in ((1.0, "recompute"), (0.0, "swap")):
    engine = Engine(PARAMS, SMALL, cc, watermark=0.0, reserve_ratio=ratio,
                    preemption=preemption, **FIXED)
    for p in PROMPTS:
      engine.add_request(p, sampling)
    runs[preemption] = [o.tokens for o in run_checked(engine)]
    assert (engine.metrics.swapped_out_blocks > 0) == (preemption == "swap")
    assert (engine.metrics.preemptions > 0) == (preemption == "swap")
    assert int(engine.cache.allocator.num_free) == 16
  assert runs["swap"] == runs["recompute"]


def test_generate_passes_preemption_and_bad_values_are_refused():
  out = generate(PARAMS, SMALL, PROMPTS[:3], SamplingParams(max_new_tokens=NEW),
                 cache_config=engine_config(1 + 16), watermark=0.0, reserve_ratio=0.0,
                 preemption="swap", **FIXED)
  assert out == REFS[:3]
  with pytest.raises(ValueError, match="preemption"):
    generate(PARAMS, SMALL, PROMPTS[:1], preemption="drop")
  with pytest.raises(ValueError, match="PAGED"):
    Engine(PARAMS, SMALL, SMALL.cache_config(num_blocks=1 + 48, max_seqs=4, max_seq_len=48,
                                             block_size=4, strategy=pk.CacheStrategy.CONTIGUOUS),
           preemption="swap")


def test_swap_round_trip_of_a_cache_sharded_over_kv_heads():
  """Pools split over kv heads on 2 devices: the host copy keeps the sharding (in the host
  memory kind), and the data comes back bitwise into the sharded pools."""
  from jax_paged_kv import sharding as shd
  layout = shd.MeshLayout(shd.local_mesh(model=2, data=1), model_axis="model")
  cache = shd.init_sharded_cache(CFG, layout)
  cache, _ = pk.allocate_sequences(cache, np.int32(0))
  rng = np.random.default_rng(3)
  k = rng.standard_normal((CFG.num_layers, 1, 9, CFG.num_kv_heads, CFG.head_dim), np.float32)
  cache, _ = pk.append_kv(cache, k, -k, np.int32([0]))
  want = pk.lookup_kv(cache, np.int32([0]), 1)
  cache, sw = pk.swap_out(cache, 0)
  if sw.memory_kind is not None:
    assert sw.blocks["k_pool"].sharding.spec == cache.k_pool.sharding.spec
  cache, _ = pk.swap_in(cache, 1, sw)
  assert cache.k_pool.sharding == shd.init_sharded_cache(CFG, layout).k_pool.sharding
  got = pk.lookup_kv(cache, np.int32([1]), 1)
  for x, y in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert bool(pk.check_invariants(cache).ok)


def test_abort_a_swapped_out_request_drops_its_host_copy():
  engine = Engine(PARAMS, SMALL, engine_config(1 + 16), watermark=0.0, reserve_ratio=0.0,
                  preemption="swap", **FIXED)
  ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW)) for p in PROMPTS]
  while engine.has_work and not any(r.swapped is not None for r in engine.scheduler.waiting):
    engine.step()
  victim = next((r for r in engine.scheduler.waiting if r.swapped is not None), None)
  assert victim is not None, "no request was swapped out"
  assert victim.out.tokens, "the victim had generated nothing: a weaker case"

  vid, made = victim.out.request_id, list(victim.out.tokens)
  out = engine.abort_request(vid)
  assert out.finish_reason == "abort" and victim.swapped is None
  assert out.tokens == made == REFS[vid][:len(made)]
  outs = run_checked(engine)
  assert [o.request_id for o in outs] == ids
  for o in outs:
    if o.request_id != vid:
      assert o.tokens == REFS[o.request_id], o.request_id
  assert int(engine.cache.allocator.num_free) == 16
  assert not np.any(np.asarray(engine.cache.active))
