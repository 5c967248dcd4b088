"""Caches, attention, decoding and serving on the 8 CPU devices, against one device and float64.

Every layout runs the same scenario (allocate, ragged append, fork, copy-on-write append,
truncate, free, then attention with all three implementations, kernels in interpret mode) and
must give bitwise the cache of a one-device run and attention within float32 tolerance of the
float64 NumPy oracle; the compiled programs must hold no collective at all (so no pool is ever
gathered). Decoding and the engine are checked against the float64 full-recomputation oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_paged_kv as pk
from jax_paged_kv import sharding as shd
from jax_paged_kv.models import LlamaConfig, init_params
from jax_paged_kv.serving.decoding import DecodeState, SamplingParams, make_key, prefill_step
from jax_paged_kv.serving.mesh import MeshEngine, decode_loop_on_mesh, prefill_step_on_mesh
from tests.llama_reference import (
  reference_greedy,
  reference_greedy_penalised,
  reference_logprobs,
)
from tests.oracle import attention_np

CFG = pk.CacheConfig(num_layers=2, num_kv_heads=4, head_dim=16, num_blocks=20, max_seqs=4,
                     max_seq_len=64, block_size=8)
Q_HEADS = 8
LAYER = 1
INTERPRET = (("interpret", True),)
KERNELS = (("xla", ()), ("pallas_gpu", INTERPRET), ("pallas_tpu", INTERPRET))  # hashable


def mesh_2x4(explicit: bool = False) -> Mesh:
  if explicit:
    return jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(AxisType.Explicit, AxisType.Explicit))
  return shd.local_mesh(model=4, data=2)


def spec(x) -> tuple:
  """The ``PartitionSpec`` of an array's sharding as a tuple, trailing ``None`` s dropped."""
  dims = list(x.sharding.spec)
  while dims and dims[-1] is None:
    dims.pop()
  return tuple(dims)


def leaves_equal(a, b) -> bool:
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
      for x, y in zip(la, lb, strict=True))


# ---------------------------------------------------------------------------------------------
# the scenario: one shard's worth of work


def shard_inputs(rng) -> tuple:
  """Random inputs of one shard: K/V of two appends, their ragged counts, a truncation, q."""
  L, kvh, d = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim
  k1, v1 = (rng.standard_normal((L, 3, 13, kvh, d)).astype(np.float32) for _ in range(2))
  k2, v2 = (rng.standard_normal((L, 3, 5, kvh, d)).astype(np.float32) for _ in range(2))
  n1 = rng.integers(1, 14, 3).astype(np.int32)
  n2 = rng.integers(0, 6, 3).astype(np.int32)
  trunc = np.int32(rng.integers(0, n1[1] + n2[1] + 1))
  q = rng.standard_normal((4, 1, Q_HEADS, d)).astype(np.float32)
  return k1, v1, n1, k2, v2, n2, trunc, q


READ_IDS = np.array([0, 1, 3, -1], np.int32)  # after the scenario: parent, truncated, child, pad


def scenario(cache, k1, v1, n1, k2, v2, n2, trunc, q, *, kernels=KERNELS):
  """Every cache op once, then attention with each implementation. Returns (cache, attn, st)."""
  st = []
  cache, s = pk.allocate_sequences(cache, jnp.array([0, 1, 2], jnp.int32))
  st.append(s)
  cache, s = pk.append_kv(cache, k1, v1, jnp.array([0, 1, 2], jnp.int32), num_new=n1)
  st.append(s)
  cache, s = pk.fork_sequence(cache, jnp.array([0], jnp.int32), jnp.array([3], jnp.int32))
  st.append(s)
  cache, s = pk.append_kv(cache, k2, v2, jnp.array([3, 1, 0], jnp.int32), num_new=n2)
  st.append(s)
  cache, s = pk.truncate_sequences(cache, jnp.array([1], jnp.int32), trunc[None])
  st.append(s)
  cache, s = pk.free_sequences(cache, jnp.array([2], jnp.int32))
  st.append(s)
  attn = {name: pk.paged_attention(q, cache, jnp.asarray(READ_IDS), LAYER, return_lse=True,
                                   implementation=name, **dict(kw)) for name, kw in kernels}
  return cache, attn, jnp.concatenate(st)


one_device = jax.jit(functools.partial(scenario, kernels=()))  # the cache ops alone


def check_shard(got_cache, got_attn, got_status, inputs, kernels=KERNELS):
  """One shard's results: its cache bitwise equal to the one-device run's, attention within
  float32 tolerance of the float64 oracle on that cache."""
  want_cache, _, want_status = one_device(pk.init_cache(CFG), *inputs)
  assert not np.any(np.asarray(want_status)) and not np.any(np.asarray(got_status))
  assert leaves_equal(got_cache, want_cache), "the cache differs from the one-device run"
  q = inputs[-1]
  tables = np.asarray(want_cache.block_tables)[np.maximum(READ_IDS, 0)]
  lens = np.where(READ_IDS >= 0, np.asarray(want_cache.seq_lens)[np.maximum(READ_IDS, 0)], 0)
  want_out, want_lse = attention_np(q, want_cache.k_pool, want_cache.v_pool, LAYER, tables,
                                    lens, np.minimum(lens, 1), scale=CFG.head_dim ** -0.5)
  assert sorted(got_attn) == sorted(name for name, _ in kernels)
  for name, _ in kernels:
    out, lse = (np.asarray(x, np.float64) for x in got_attn[name])
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5, err_msg=name)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse), err_msg=name)
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], atol=2e-5, rtol=2e-5, err_msg=name)


def stack(trees):
  return jax.tree_util.tree_map(lambda *x: np.stack(x), *trees)


def run_compiled(fn, *args, under=None, **static):
  """Compiles ``jit(fn)`` (traced under the layout ``under``, if any) and runs it once:
  ``(out, compiled HLO text)``."""
  f = fn if hasattr(fn, "lower") else jax.jit(fn)
  with shd.use_layout(under):
    compiled = f.lower(*args, **static).compile()
  return compiled(*args), compiled.as_text()


# ---------------------------------------------------------------------------------------------
# placement


def test_cache_shardings_place_every_leaf():
  mesh = mesh_2x4()
  tp = shd.cache_shardings(CFG, mesh, model_axis="model")
  dp = shd.cache_shardings(CFG, mesh, data_axis="data")
  both = shd.cache_shardings(CFG, mesh, model_axis="model", data_axis="data")
  assert tp.k_pool.spec == P(None, "model") and tp.block_tables.spec == P()
  assert tp.allocator.num_free.spec == P() and tp.config == CFG
  assert dp.v_pool.spec == P("data", None, None) and dp.allocator.free_stack.spec == P("data")
  assert both.k_pool.spec == P("data", None, "model") and both.seq_lens.spec == P("data")
  assert all(isinstance(s, NamedSharding) for s in jax.tree_util.tree_leaves(both))

  cache = jax.device_put(pk.init_cache(CFG), tp)  # usable as device_put shardings
  assert cache.k_pool.sharding == tp.k_pool
  made = shd.init_sharded_cache(CFG, mesh, model_axis="model", data_axis="data")
  assert made.k_pool.shape == (2, *CFG.pool_shape) and made.allocator.num_free.shape == (2,)
  assert made.k_pool.sharding == both.k_pool and made.telemetry.failed_allocations.shape == (2,)
  for s in range(2):  # each shard is an empty cache of CFG
    assert leaves_equal(shd.get_shard(made, s), pk.init_cache(CFG))
  # Each device holds its heads of its shard's pools: pool_bytes / 4, plus the small state.
  per_device = shd.device_bytes(made.replace(block_tables=None, seq_lens=None, active=None,
                                             allocator=None, telemetry=None))
  assert sorted(per_device.values()) == [CFG.pool_bytes // 4] * 8
  # jit in/out shardings.
  same = jax.jit(lambda c: c, in_shardings=(both,), out_shardings=both)(made)
  assert same.v_pool.sharding == both.v_pool


def test_invalid_layouts_raise_clearly():
  mesh = mesh_2x4()
  with pytest.raises(ValueError, match=r"num_kv_heads=2 must be divisible by 4"):
    shd.cache_shardings(pk.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=4,
                                       max_seqs=1, max_seq_len=8), mesh, model_axis="model")
  with pytest.raises(ValueError, match=r"model_axis='heads' is not an axis of the mesh"):
    shd.cache_shardings(CFG, mesh, model_axis="heads")
  with pytest.raises(ValueError, match="must differ"):
    shd.cache_shardings(CFG, mesh, model_axis="data", data_axis="data")
  with pytest.raises(ValueError, match="leading axis of 2 shards"):
    shd.place_cache(pk.init_cache(CFG), mesh, data_axis="data")
  with pytest.raises(ValueError, match="needs 16 devices"):
    shd.local_mesh(model=4, data=4)
  model = LlamaConfig(vocab_size=8, hidden_size=12, intermediate_size=8, num_layers=1,
                      num_heads=6, num_kv_heads=2)
  params = jax.eval_shape(functools.partial(init_params, model), jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="num_heads=6 must be divisible by 4"):
    shd.param_shardings(params, model, mesh, model_axis="model")
  with pytest.raises(ValueError, match="auto axes"):
    decode_loop_on_mesh(params, None, None, 1, layout=shd.MeshLayout(mesh_2x4(True)),
                        model=model, max_steps=1)


def test_shard_seq_ids_addresses_shard_and_slot():
  pairs = [(1, 5), (0, 2), (1, 0), (3, 7)]
  ids, rows = shd.shard_seq_ids(pairs, 4)
  np.testing.assert_array_equal(ids, [[2, -1], [5, 0], [-1, -1], [7, -1]])
  np.testing.assert_array_equal(rows, [0, 0, 1, 0])
  for (s, slot), r in zip(pairs, rows, strict=True):  # what a scheduler reads back
    assert ids[s, r] == slot
  assert shd.shard_seq_ids(pairs, 4, width=3)[0].shape == (4, 3)
  with pytest.raises(ValueError, match="more than width=1"):
    shd.shard_seq_ids(pairs, 4, width=1)
  with pytest.raises(ValueError, match=r"not in \[0, 4\)"):
    shd.shard_seq_ids([(4, 0)], 4)


def test_param_shardings_split_projections_by_heads():
  model = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=24, num_layers=2,
                      num_heads=8, num_kv_heads=4, attention_bias=True, qk_norm=True)
  params = jax.eval_shape(functools.partial(init_params, model), jax.random.PRNGKey(0))
  specs = shd.param_specs(params, model, shd.MeshLayout(mesh_2x4(), model_axis="model"))
  lay = specs["layers"]
  assert lay["wq"] == P(None, None, "model") and lay["wk"] == P(None, None, "model")
  assert lay["wo"] == P(None, "model", None) and lay["bv"] == P(None, "model")
  assert lay["w_gate"] == P(None, None, "model") and lay["w_down"] == P(None, "model", None)
  assert specs["embed"] == P() and lay["attn_norm"] == P() and specs["lm_head"] == P()
  assert lay["q_norm"] == P() and lay["k_norm"] == P()  # over head_dim: every shard's heads


def test_mixture_of_experts_tensor_parallel_matches_one_device():
  """A model with experts and a shared expert (Qwen2-MoE-style), each expert's MLP and the
  shared one split over 4 devices (routers replicated): the chunked prefill's logits and K/V
  equal the one-device step's."""
  model = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_layers=2,
                      num_heads=8, num_kv_heads=4, num_experts=4, num_experts_per_tok=2,
                      shared_expert_intermediate_size=16)
  params = init_params(model, jax.random.PRNGKey(3), scale=2.0)
  layout = shd.MeshLayout(shd.local_mesh(model=4), model_axis="model")
  specs = shd.param_specs(params, model, layout)["layers"]
  assert specs["moe_gate"] == P(None, None, None, "model") and specs["router"] == P()
  assert specs["moe_down"] == P(None, None, "model", None)
  assert specs["shared_w_up"] == P(None, None, "model") and specs["shared_router"] == P()
  assert specs["shared_w_down"] == P(None, "model", None)
  cc = model.cache_config(num_blocks=9, max_seqs=2, max_seq_len=16, block_size=4)
  tokens = np.random.default_rng(0).integers(0, 64, (2, 7)).astype(np.int32)
  ids = np.arange(2, dtype=np.int32)

  def step(params, cache):
    cache, _ = pk.allocate_sequences(cache, ids)
    return model.forward(params, cache, tokens, ids, all_logits=True)

  want_cache, want, _ = jax.jit(step)(params, pk.init_cache(cc))
  placed = jax.device_put(params, shd.param_shardings(params, model, layout.mesh,
                                                      model_axis="model"))
  (got_cache, got, status), _ = run_compiled(step, placed, shd.init_sharded_cache(cc, layout),
                                             under=layout)
  assert not np.any(np.asarray(status))
  assert spec(got_cache.k_pool) == (None, "model")  # kv heads split, as the other TP tests
  assert spec(placed["layers"]["moe_up"]) == (None, None, None, "model")
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_cache.k_pool), np.asarray(want_cache.k_pool),
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# cache ops and attention per layout


@pytest.mark.parametrize("explicit", [False, True], ids=["auto_axes", "explicit_axes"])
def test_tensor_parallel_matches_one_device(explicit):
  """Pools split over kv heads on 4 devices (the other axis holds replicas); all three
  attention implementations run per shard, and the program has no collective."""
  rng = np.random.default_rng(1)
  inputs = shard_inputs(rng)
  layout = shd.MeshLayout(mesh_2x4(explicit), model_axis="model")
  # Explicit axes: the failing case (pallas_gpu, TypeError: sharded ref) and XLA.
  kernels = KERNELS if not explicit else KERNELS[:2]
  cache = shd.init_sharded_cache(CFG, layout)
  (got_cache, attn, status), text = run_compiled(
      functools.partial(scenario, kernels=kernels), cache, *inputs, under=layout)
  assert shd.collectives(text) == []
  assert spec(got_cache.k_pool) == (None, "model")
  assert spec(attn["pallas_gpu"][0]) == (None, None, "model")  # per-shard heads, not gathered
  check_shard(got_cache, attn, status, inputs, kernels)
  assert all(r.ok for r in shd.shard_invariants(got_cache, layout))


def test_map_shards_refuses_arguments_not_stacked_per_shard():
  """Each shard takes its block's first entry: four caches (or four id rows) on two shards
  lost two of them silently."""
  layout = shd.MeshLayout(shd.local_mesh(model=1, data=2), data_axis="data")
  two = shd.init_sharded_cache(CFG, layout)
  four = shd.stack_shards([pk.init_cache(CFG) for _ in range(4)])
  f = shd.map_shards(pk.allocate_sequences, layout)
  for cache, ids in ((four, jnp.zeros((4, 1), jnp.int32)), (two, jnp.zeros((4, 1), jnp.int32)),
                     (two, jnp.int32(0))):
    with pytest.raises(pk.CacheShapeError, match="leading axis must be the 2 data shards"):
      jax.jit(f)(cache, ids)
  out, status = jax.jit(f)(two, jnp.zeros((2, 1), jnp.int32))
  assert status.shape == (2, 1) and np.asarray(out.active).shape == (2, CFG.max_seqs)


def test_data_parallel_matches_one_device_per_shard():
  """Four independent caches, one per device."""
  rng = np.random.default_rng(2)
  per_shard = [shard_inputs(rng) for _ in range(4)]
  layout = shd.MeshLayout(shd.local_mesh(model=1, data=4), data_axis="data")
  cache = shd.init_sharded_cache(CFG, layout)
  (got_cache, attn, status), text = run_compiled(
      shd.map_shards(scenario, layout), cache, *stack(per_shard))
  assert shd.collectives(text) == []
  assert spec(got_cache.k_pool) == ("data",) and status.shape == (4, 12)
  for s, inputs in enumerate(per_shard):
    check_shard(shd.get_shard(got_cache, s), {n: (o[s], l[s]) for n, (o, l) in attn.items()},
                status[s], inputs)
  assert all(r.ok for r in shd.shard_invariants(got_cache, layout))


def test_two_d_mesh_matches_one_device_per_shard():
  """2 data shards x 4-way tensor parallel: shard_map over data, per-heads kernels nested."""
  rng = np.random.default_rng(3)
  per_shard = [shard_inputs(rng) for _ in range(2)]
  layout = shd.MeshLayout(mesh_2x4(), model_axis="model", data_axis="data")
  kernels = KERNELS[:2]  # pallas_tpu: see the next test
  cache = shd.init_sharded_cache(CFG, layout)
  (got_cache, attn, status), text = run_compiled(
      shd.map_shards(functools.partial(scenario, kernels=kernels), layout), cache,
      *stack(per_shard))
  assert shd.collectives(text) == []
  assert spec(got_cache.k_pool) == ("data", None, "model")
  for s, inputs in enumerate(per_shard):
    check_shard(shd.get_shard(got_cache, s), {n: (o[s], l[s]) for n, (o, l) in attn.items()},
                status[s], inputs, kernels)
  assert all(r.ok for r in shd.shard_invariants(got_cache, layout))


@pytest.mark.parametrize("explicit", [False, True], ids=["auto_axes", "explicit_axes"])
def test_get_shard_and_shard_invariants_on_a_placed_data_parallel_cache(explicit):
  """Two different plain caches stacked and placed on a 2 x 4 mesh: ``get_shard`` gives each
  back bitwise (explicit axes type the gather, which ``x[shard]`` alone cannot do)."""
  rng = np.random.default_rng(5)
  plain = [one_device(pk.init_cache(CFG), *shard_inputs(rng))[0] for _ in range(2)]
  layout = shd.MeshLayout(mesh_2x4(explicit), model_axis="model", data_axis="data")
  cache = shd.place_cache(plain, layout.mesh, model_axis="model", data_axis="data")
  assert spec(cache.k_pool) == ("data", None, "model")
  for s in range(2):
    assert leaves_equal(shd.get_shard(cache, s), plain[s])
  reports = shd.shard_invariants(cache, layout)
  assert len(reports) == 2 and all(r.ok for r in reports)


def test_two_d_mesh_pallas_tpu_interpreter():
  """The TPU interpreter runs on host callbacks, which XLA:CPU's Shardy partitioner aborts on
  inside a nested shard_map (an ordered io_callback in an inner shard_map is enough); the same
  program under the GSPMD partitioner runs, and matches."""
  rng = np.random.default_rng(4)
  per_shard = [shard_inputs(rng) for _ in range(2)]
  layout = shd.MeshLayout(shd.local_mesh(model=2, data=2), model_axis="model", data_axis="data")
  kernels = KERNELS[2:]
  before = jax.config.jax_use_shardy_partitioner
  jax.config.update("jax_use_shardy_partitioner", False)
  try:
    cache = shd.init_sharded_cache(CFG, layout)
    got_cache, attn, status = jax.jit(
        shd.map_shards(functools.partial(scenario, kernels=kernels), layout))(
            cache, *stack(per_shard))
  finally:
    jax.config.update("jax_use_shardy_partitioner", before)
  for s, inputs in enumerate(per_shard):
    check_shard(shd.get_shard(got_cache, s), {n: (o[s], l[s]) for n, (o, l) in attn.items()},
                status[s], inputs, kernels)


def test_pmap_takes_the_data_parallel_layout():
  """The simple option: one cache per device under pmap; same arrays, same results."""
  rng = np.random.default_rng(5)
  per_shard = [shard_inputs(rng) for _ in range(2)]
  kernels = ()  # the cache ops (attention under pmap: tests/test_cache.py)
  fn = functools.partial(scenario, kernels=kernels)
  cache = shd.stack_shards([pk.init_cache(CFG)] * 2)
  got_cache, attn, status = jax.pmap(fn)(cache, *stack(per_shard))
  for s, inputs in enumerate(per_shard):
    check_shard(shd.get_shard(got_cache, s), {n: (o[s], l[s]) for n, (o, l) in attn.items()},
                status[s], inputs, kernels)


# ---------------------------------------------------------------------------------------------
# pool boundaries and exhaustion, per shard


def boundary_inputs(rng, shard: int):
  """Appends that take every block of the pool: block 1 first, the last block last."""
  bs, usable = CFG.block_size, CFG.usable_blocks
  # Four rows share all usable blocks; row lengths differ per shard, the total is exact.
  split = np.array([[5, 5, 5, 4], [4, 6, 3, 6]][shard % 2])
  assert split.sum() == usable
  n = (split * bs - np.array([0, 3, 1, 0])).astype(np.int32)  # not all block multiples
  t = 6 * bs  # the longest row of either split
  shape = (CFG.num_layers, 4, t, CFG.num_kv_heads, CFG.head_dim)
  k = rng.standard_normal(shape).astype(np.float32)
  return k, -k, n


def append_all(cache, k, v, n):
  cache, s1 = pk.allocate_sequences(cache, jnp.arange(4, dtype=jnp.int32))
  cache, s2 = pk.append_kv(cache, k, v, jnp.arange(4, dtype=jnp.int32), num_new=n)
  return cache, jnp.concatenate([s1, s2])


@functools.cache
def on_shards(fn, layout):
  """``jit(map_shards(fn, layout))``, compiled once per worker."""
  return jax.jit(shd.map_shards(fn, layout))


def expected_pool(k, n, tables, fill=np.nan):
  """NumPy model: the pool after writing ``k[:, row, :n[row]]`` through ``tables``."""
  pool = np.full(CFG.pool_shape, fill, np.float32)
  bs = CFG.block_size
  for row in range(k.shape[1]):
    for p in range(n[row]):
      pool[:, :, tables[row, p // bs], p % bs] = k[:, row, p]
  return pool


@pytest.mark.parametrize("path", ["tensor", "data_map_shards", "data_vmap_gspmd", "two_d"])
def test_appends_at_pool_boundaries_on_every_shard(path):
  """openxla/xla#49118 (a dynamic-update-slice dropped on a sharded axis): every shard writes its
  pool's first and last block and drops padding writes past the end; each shard's pools must
  equal a NumPy model of the writes, with every untouched cell (null block included) still NaN."""
  rng = np.random.default_rng(6)
  mesh = mesh_2x4()
  model_axis = "model" if path in ("tensor", "two_d") else None
  data_axis = None if path == "tensor" else "data"
  layout = shd.MeshLayout(mesh, model_axis=model_axis, data_axis=data_axis)
  shards = 1 if data_axis is None else 2
  per_shard = [boundary_inputs(rng, s) for s in range(shards)]
  cache = shd.init_sharded_cache(CFG, layout, pool_fill=np.nan)
  if path == "tensor":
    fn, args = append_all, per_shard[0]
  elif path == "data_vmap_gspmd":  # plain jit + vmap, partitioned by XLA, not by shard_map
    fn, args = jax.vmap(append_all, spmd_axis_name="data"), stack(per_shard)
  else:
    fn, args = shd.map_shards(append_all, layout), stack(per_shard)
  with shd.use_layout(layout):
    got, status = jax.jit(fn)(cache, *args)
  assert not np.any(np.asarray(status))
  for s in range(shards):
    shard = got if data_axis is None else shd.get_shard(got, s)
    k, v, n = per_shard[s]
    tables = np.asarray(shard.block_tables)
    held = tables[tables > 0]
    assert sorted(held.tolist()) == list(range(1, CFG.num_blocks))  # first to last block
    np.testing.assert_array_equal(np.asarray(shard.k_pool), expected_pool(k, n, tables))
    np.testing.assert_array_equal(np.asarray(shard.v_pool), expected_pool(v, n, tables))
    assert int(shard.allocator.num_free) == 0 and bool(pk.check_invariants(shard).ok)


one_device_append = jax.jit(append_all)


def free_then_append(cache, free_ids, k, ids):
  cache, s1 = pk.free_sequences(cache, free_ids)
  cache, s2 = pk.append_kv(cache, k, k, ids, num_new=jnp.array([1, 1], jnp.int32))
  return cache, s1, s2


def test_pool_exhausted_on_one_data_shard_leaves_the_others_alone():
  """Four full pools; shard 2 frees a sequence, then every shard appends to rows whose last
  block is full: shards 0, 1, 3 report POOL_EXHAUSTED and stay unchanged, shard 2 appends."""
  rng = np.random.default_rng(7)
  layout = shd.MeshLayout(shd.local_mesh(model=1, data=4), data_axis="data")
  per_shard = [boundary_inputs(rng, s) for s in range(4)]
  cache = shd.init_sharded_cache(CFG, layout)
  cache, status = on_shards(append_all, layout)(cache, *stack(per_shard))
  assert not np.any(np.asarray(status)) and not np.any(np.asarray(cache.allocator.num_free))
  free_ids = np.array([[-1], [-1], [1], [-1]], np.int32)
  k = rng.standard_normal((4, CFG.num_layers, 2, 1, CFG.num_kv_heads, CFG.head_dim))
  k = k.astype(np.float32)
  ids = np.tile(np.array([[0, 3]], np.int32), (4, 1))  # rows of block-multiple lengths
  after, s_free, s_append = on_shards(free_then_append, layout)(cache, free_ids, k, ids)
  exhausted = int(pk.Status.POOL_EXHAUSTED)
  np.testing.assert_array_equal(np.asarray(s_free), 0)
  np.testing.assert_array_equal(np.asarray(s_append), [[exhausted] * 2, [exhausted] * 2, [0, 0],
                                                       [exhausted] * 2])
  np.testing.assert_array_equal(np.asarray(after.telemetry.failed_allocations), [1, 1, 0, 1])
  for s in range(4):  # the one-device oracle: the same calls on this shard's cache alone
    ref, _ = one_device_append(pk.init_cache(CFG), *per_shard[s])
    if s != 2:
      assert leaves_equal(shd.get_shard(after, s).replace(telemetry=ref.telemetry), ref)
    ref, _, st = jax.jit(free_then_append)(ref, free_ids[s], k[s], ids[s])
    assert leaves_equal(shd.get_shard(after, s), ref), s
  assert all(r.ok for r in shd.shard_invariants(after, layout))


# ---------------------------------------------------------------------------------------------
# decoding and serving

# Qwen3-style q/k norms: per head, so a head split over devices normalises where it lives.
MODEL = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=8, num_kv_heads=4, rope_theta=500.0, qk_norm=True)
PARAMS = init_params(MODEL, jax.random.PRNGKey(9), scale=2.0)
MODEL_CACHE = MODEL.cache_config(num_blocks=25, max_seqs=4, max_seq_len=32, block_size=4)
PROMPT_RNG = np.random.default_rng(8)
PROMPTS = [PROMPT_RNG.integers(0, 128, n).tolist() for n in (3, 11, 8, 6, 5, 9, 2, 7)]
NEW, CHUNK, STEPS = 8, 12, 8


@functools.cache
def reference(i: int) -> list[int]:
  return reference_greedy(PARAMS, MODEL, PROMPTS[i], NEW)


def shard_batch(prompts: list[int]):
  """Prefill arguments of one shard: its prompts in rows 0.. (up to 4), padding after."""
  tokens = np.zeros((4, CHUNK), np.int32)
  ids = np.full(4, -1, np.int32)
  num = np.zeros(4, np.int32)
  for r, i in enumerate(prompts):
    tokens[r, :len(PROMPTS[i])] = PROMPTS[i]
    ids[r], num[r] = r, len(PROMPTS[i])
  zeros = np.zeros(4, np.float32)
  return (tokens, ids, num, zeros, np.zeros(4, np.int32), np.ones(4, np.float32),
          np.stack([make_key(0)] * 4), np.zeros(4, np.int32))


def prefilled_on_one_device(prompts: list[int]):
  """A one-device cache holding ``prompts`` in slots 0.. and each one's first token."""
  batch = shard_batch(prompts)
  cache, _ = pk.allocate_sequences(pk.init_cache(MODEL_CACHE), batch[1])
  cache, first, _, status = prefill_step(PARAMS, cache, *batch, model=MODEL)
  assert not np.any(np.asarray(status))
  return cache, np.asarray(first)


@pytest.mark.parametrize("model,data", [(4, None), (None, 4), (2, 2)],
                         ids=["tensor", "data", "two_d"])
def test_decode_loop_on_mesh_gives_the_one_device_tokens(model, data):
  """Tensor- and data-parallel loops start from a one-device prefill placed on the mesh; the
  2-D run prefills on the mesh too (prefill_step_on_mesh, sampling under min_p=1)."""
  mesh = shd.local_mesh(model=model or 1, data=data or 1)
  layout = shd.MeshLayout(mesh, model_axis=model and "model", data_axis=data and "data")
  shards = layout.data_shards
  assignment = [list(range(s, len(PROMPTS), shards))[:4] for s in range(shards)]
  params = jax.device_put(PARAMS, shd.param_shardings(PARAMS, MODEL, layout))
  ids = np.stack([shard_batch(a)[1] for a in assignment])
  if model and data:
    cache = shd.init_sharded_cache(MODEL_CACHE, layout)
    cache, _ = jax.jit(shd.on_mesh(pk.allocate_sequences, layout))(cache, ids)
    batch = stack([shard_batch(a) for a in assignment])
    # Sampled at temperature 2 under min_p=1: only each row's most likely token survives (the
    # reference's greedy one), so min_p must reach every shard.
    batch = (*batch[:3], np.full_like(batch[3], 2.0), *batch[4:])
    cache, first, _, status = prefill_step_on_mesh(
        params, cache, *batch, layout=layout, model=MODEL, min_p=np.ones_like(batch[3]))
    assert not np.any(np.asarray(status))
  else:
    caches, first = zip(*(prefilled_on_one_device(a) for a in assignment), strict=True)
    cache = shd.place_cache(caches[0] if data is None else list(caches), layout)
  first = np.asarray(first).reshape(shards, 4)
  states = [DecodeState.create(first[s].tolist(), ids[s].tolist(),
                               [SamplingParams(max_new_tokens=NEW)] * 4) for s in range(shards)]
  state = states[0] if data is None else stack(states)
  num_steps = np.int32(STEPS) if data is None else np.full(shards, STEPS, np.int32)
  (cache, _, out, _, status), text = run_compiled(
      decode_loop_on_mesh, params, cache, state, num_steps, layout=layout, model=MODEL,
      max_steps=STEPS)
  assert not np.any(np.asarray(status))
  out = np.asarray(out).reshape(shards, 4, STEPS)
  for s, prompts in enumerate(assignment):
    for r, i in enumerate(prompts):
      got = [int(first[s, r])] + [int(t) for t in out[s, r] if t >= 0]
      assert got[:NEW] == reference(i), (s, r)
  # Tensor parallel: only the two all-reduces of the layer outputs, [batch, 1, hidden] each.
  ops = shd.collectives(text)
  if model is None:
    assert ops == []
  else:
    assert len(ops) == 2 and {op for op, _ in ops} == {"all-reduce"}, ops  # in the layer scan
    assert all(shape.startswith(f"f32[4,1,{MODEL.hidden_size}]") for _, shape in ops), ops
  want_spec = {(4, None): (None, "model"), (None, 4): ("data",), (2, 2): ("data", None, "model")}
  assert spec(cache.k_pool) == want_spec[(model, data)]  # the loop kept the pools in place
  assert all(r.ok for r in shd.shard_invariants(cache, layout))


def test_decode_loop_on_mesh_returns_the_one_device_logprobs():
  """``return_logprobs`` and ``top_logprobs`` pass through: tensor parallel over 2 devices,
  tokens and top tokens equal, logprobs within float32 rounding of the one-device loop (itself
  tested against float64)."""
  layout = shd.MeshLayout(shd.local_mesh(model=2), model_axis="model")
  rows = [0, 1, 2]
  cache, first = prefilled_on_one_device(rows)
  state = DecodeState.create(first[:3].tolist(), rows, [SamplingParams(max_new_tokens=NEW)] * 3)
  want = pk.decode_loop(PARAMS, cache, state, np.int32(STEPS), max_steps=STEPS, model=MODEL,
                        return_logprobs=True, top_logprobs=3)
  cache, first = prefilled_on_one_device(rows)
  params = jax.device_put(PARAMS, shd.param_shardings(PARAMS, MODEL, layout))
  got = decode_loop_on_mesh(params, shd.place_cache(cache, layout), state, np.int32(STEPS),
                            layout=layout, model=MODEL, max_steps=STEPS, return_logprobs=True,
                            top_logprobs=3)
  assert len(got) == len(want) == 8
  np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))
  lp, out = np.asarray(got[5]), np.asarray(got[2])
  assert (out[:3] >= 0).sum() >= 3 * (STEPS - 1)
  np.testing.assert_array_equal(np.isfinite(lp), out >= 0)  # NaN where no token
  np.testing.assert_allclose(lp, np.asarray(want[5]), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(got[6]), np.asarray(want[6]))
  np.testing.assert_allclose(np.asarray(got[7]), np.asarray(want[7]), atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(got[6])[:, :, 0], out)  # greedy: the first one


def test_mesh_engine_two_d_gives_the_one_device_tokens():
  """Two cache shards (one host scheduler), each 2-way tensor parallel, with preemption; every
  other request has a repetition and frequency penalty (each shard's steps then carry the
  token counts, zero penalties for the others)."""
  layout = shd.MeshLayout(shd.local_mesh(model=2, data=2), model_axis="model", data_axis="data")
  cc = MODEL.cache_config(num_blocks=1 + 8, max_seqs=3, max_seq_len=32, block_size=4)
  engine = MeshEngine(PARAMS, MODEL, cc, layout, prefill_chunk=CHUNK, decode_steps=4,
                      batch_bucket_min=3, bucket_blocks=False, watermark=0.0, reserve_ratio=0.0,
                      track_stats=False)
  pen = dict(repetition_penalty=1.8, frequency_penalty=1.0)
  ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW, **(pen if i % 2 else {})))
         for i, p in enumerate(PROMPTS)]
  outs = engine.run()
  assert [o.request_id for o in outs] == ids
  want = [reference_greedy_penalised(PARAMS, MODEL, p, NEW, **pen) if i % 2 else reference(i)
          for i, p in enumerate(PROMPTS)]
  assert [o.tokens for o in outs] == want
  assert sum(w != reference(i) for i, w in enumerate(want)) >= 2  # the penalties mattered
  assert {engine.shard_of(i)[0] for i in ids} == {0, 1}
  assert sum(m.preemptions for m in engine.metrics) > 0
  for cache, sub in zip(engine.caches, engine.layouts, strict=True):
    assert spec(cache.k_pool) == (None, "model")
    assert len(cache.k_pool.sharding.device_set) == 2
    report = shd.shard_invariants(cache, sub)[0]
    assert bool(report.ok) and int(pk.cache_stats(cache).free_blocks) == 8


def test_mesh_engine_passes_the_cache_salt():
  """With prefix caching, requests on one shard share cached blocks only under equal salts."""
  layout = shd.MeshLayout(shd.local_mesh(model=1, data=2), model_axis="model", data_axis="data")
  cc = MODEL.cache_config(num_blocks=1 + 16, max_seqs=2, max_seq_len=32, block_size=4)
  engine = MeshEngine(PARAMS, MODEL, cc, layout, prefill_chunk=CHUNK, decode_steps=4,
                      batch_bucket_min=2, bucket_blocks=False, track_stats=False,
                      enable_prefix_caching=True)
  prompt = PROMPTS[1]
  assert len(prompt) >= 8
  cached = []
  for salt in ("a", "b", "a"):  # one at a time on shard 0, so each sees the last one's blocks
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=2), shard=0, cache_salt=salt)
    before = engine.metrics[0].cached_prompt_tokens
    (out,) = engine.run()
    assert out.request_id == rid and out.tokens == reference(1)[:2]
    cached.append(engine.metrics[0].cached_prompt_tokens - before)
  assert cached[0] == 0 and cached[1] == 0 and cached[2] > 0, cached


def test_mesh_engine_abort_and_pop_finished():
  """Aborting on a shard frees its blocks and leaves the other requests' tokens as they were;
  pop_finished hands each output out once and forgets its route."""
  layout = shd.MeshLayout(shd.local_mesh(model=1, data=2), model_axis="model", data_axis="data")
  cc = MODEL.cache_config(num_blocks=1 + 16, max_seqs=2, max_seq_len=32, block_size=4)
  engine = MeshEngine(PARAMS, MODEL, cc, layout, prefill_chunk=CHUNK, decode_steps=4,
                      batch_bucket_min=2, bucket_blocks=False, track_stats=False)
  ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW)) for p in PROMPTS]
  engine.step()
  victim = next(i for i in ids if engine.shard_of(i)[0] == 1)
  out = engine.abort_request(victim)
  assert out.request_id == victim and out.finish_reason == "abort"
  assert out.tokens == reference(victim)[:len(out.tokens)]
  assert engine.abort_request(victim) is None
  with pytest.raises(ValueError, match="request_id must be an integer"):
    engine.abort_request(True)  # equal to 1 as a dict key, but not a request id
  outs = engine.run()
  assert victim not in [o.request_id for o in outs]
  for o in outs:
    assert o.tokens == reference(o.request_id), o.request_id
  assert engine._load == [0, 0]
  popped = engine.pop_finished()
  assert list(popped) == ids and popped[victim].finish_reason == "abort"
  assert engine.finished == {} and engine.pop_finished() == {}
  with pytest.raises(KeyError, match="already taken by pop_finished"):
    engine.abort_request(victim)
  for cache in engine.caches:
    assert int(pk.cache_stats(cache).free_blocks) == 16


def test_mesh_engine_parallel_samples_stay_on_one_shard():
  """``SamplingParams(n=3)`` on a mesh: the samples get consecutive mesh ids on one shard and
  the tokens of one-device requests with seeds seed, seed + 1, seed + 2."""
  layout = shd.MeshLayout(shd.local_mesh(model=1, data=2), model_axis="model", data_axis="data")
  # The other mesh engine tests' shapes (compiled programs shared): two rows per shard.
  cc = MODEL.cache_config(num_blocks=1 + 16, max_seqs=2, max_seq_len=32, block_size=4)
  knobs = dict(prefill_chunk=CHUNK, decode_steps=4, batch_bucket_min=2, bucket_blocks=False,
               track_stats=False)
  engine = MeshEngine(PARAMS, MODEL, cc, layout, **knobs)
  sampled = SamplingParams(max_new_tokens=NEW, temperature=1.0, seed=11, n=3)
  before = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=NEW))
  first = engine.add_request(PROMPTS[1], sampled)
  after = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=NEW))
  assert (first, after) == (before + 1, before + 4)
  assert len({engine.shard_of(first + i)[0] for i in range(3)}) == 1
  outs = {o.request_id: o for o in engine.run()}
  one = pk.Engine(PARAMS, MODEL, cc, **knobs)
  for i in range(3):
    one.add_request(PROMPTS[1], SamplingParams(max_new_tokens=NEW, temperature=1.0,
                                               seed=11 + i))
  want = [o.tokens for o in one.run()]
  assert [outs[first + i].tokens for i in range(3)] == want and len(set(map(tuple, want))) > 1
  assert [outs[first + i].index for i in range(3)] == [0, 1, 2]
  assert outs[before].tokens == reference(0) and outs[after].tokens == reference(2)
  assert engine._load == [0, 0]
  assert sum(m.shared_prompt_tokens for m in engine.metrics) == 2 * 8


def test_mesh_engine_stream_gives_each_request_its_tokens_once():
  layout = shd.MeshLayout(shd.local_mesh(model=1, data=2), model_axis="model", data_axis="data")
  cc = MODEL.cache_config(num_blocks=1 + 16, max_seqs=2, max_seq_len=32, block_size=4)
  engine = MeshEngine(PARAMS, MODEL, cc, layout, prefill_chunk=CHUNK, decode_steps=4,
                      batch_bucket_min=2, bucket_blocks=False, track_stats=False)
  ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW, logprobs=True))
         for p in PROMPTS]
  got, lps, finals, aborted = {}, {}, {}, None
  for deltas in engine.stream():
    for d in deltas:
      assert d.request_id not in finals
      got.setdefault(d.request_id, []).extend(d.tokens)
      lps.setdefault(d.request_id, []).extend(d.logprobs)
      if d.finish_reason:
        finals[d.request_id] = d.finish_reason
    route = {w: rid for rid, w in engine._where.items()}
    for shard, e in enumerate(engine.engines):  # no lag: streamed is all it has
      for local, out in e.in_flight().items():
        assert got.get(route[(shard, local)], []) == out.tokens
    if aborted is None and any(got.values()):  # abort one that has streamed tokens
      aborted = next(i for i in ids if got.get(i) and i not in finals)
      cut = engine.abort_request(aborted).tokens
      assert got[aborted] == cut
  assert finals == {i: "abort" if i == aborted else "length" for i in ids}
  for i in ids:
    want = reference(i)
    assert got[i] == (want[:len(got[i])] if i == aborted else want), i
    np.testing.assert_allclose(lps[i], reference_logprobs(PARAMS, MODEL, PROMPTS[i], got[i]),
                               atol=2e-4, rtol=0)
# ---------------------------------------------------------------------------------------------
# beyond one machine


def test_process_local_meshes():
  """What one machine can check of the multi-host layout: meshes from this process's devices,
  tensor-parallel groups inside one process, data shards across processes."""
  mesh = shd.host_mesh(model=4)
  assert mesh.shape == {"data": 2 * jax.process_count(), "model": 4}
  for row in mesh.devices:
    assert len({d.process_index for d in row}) == 1
  local = shd.local_mesh(model=2)
  assert set(local.devices.flat) <= set(jax.local_devices()) and local.shape["data"] == 4
  layout = shd.MeshLayout(local, model_axis="model", data_axis="data")
  assert [len(layout.shard_mesh(i).devices.flat) for i in range(4)] == [2] * 4
  with pytest.raises(ValueError, match="must divide"):
    shd.host_mesh(model=3)


def test_two_processes_with_jax_distributed():
  """The same code on two processes (4 CPU devices each) after jax.distributed.initialize():
  data shards across the processes, tensor parallel inside each (tests/multihost_worker.py)."""
  import os
  import pathlib
  import socket
  import subprocess
  import sys

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  root = pathlib.Path(__file__).resolve().parent.parent
  env = dict(os.environ, PYTHONPATH=str(root), XLA_FLAGS="")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(i), str(port)],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
    assert p.returncode == 0 and f"OK {i}" in out, out[-3000:]


def test_readme_multi_device_example_runs():
  import pathlib
  import re

  text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  section = text[text.index("## Multi-device"):]
  code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
  namespace: dict = {}
  exec(compile(code, "README.md:multi-device", "exec"), namespace)  # noqa: S102
  assert spec(namespace["cache"].k_pool) == (None, "model")
  assert spec(namespace["out"]) == (None, None, "model")
  assert not np.any(np.asarray(namespace["status"]))
  np.testing.assert_array_equal(namespace["seq_ids"], [[0, -1], [0, 3]])
