"""Cache operations against plain NumPy models of the expected pools, tables and lengths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from jax_paged_kv.cache.config import CacheStrategy

# ---------------------------------------------------------------------------------------------
# helpers


def small_config(**kw):
  base = dict(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=16, max_seqs=4,
              max_seq_len=40, block_size=4, dtype=jnp.float32)
  base.update(kw)
  return pk.CacheConfig(**base)


def rand_kv(rng, cfg, batch, t, layers=None):
  shape = (cfg.num_layers if layers is None else layers, batch, t, cfg.num_kv_heads,
           cfg.head_dim)
  return (jnp.asarray(rng.standard_normal(shape), cfg.dtype),
          jnp.asarray(rng.standard_normal(shape), cfg.dtype))


def leaves_equal(a, b, *, skip_telemetry=True):
  """Bitwise equality of two caches (NaN == NaN), optionally ignoring the telemetry counters."""
  if skip_telemetry:
    a, b = a.replace(telemetry=b.telemetry), b
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
             for x, y in zip(la, lb, strict=True))


def snapshot(cache):
  return jax.tree_util.tree_map(lambda x: np.array(x), cache)


# ---------------------------------------------------------------------------------------------
# config


def test_config_derived_sizes():
  cfg = pk.CacheConfig(num_layers=3, num_kv_heads=4, head_dim=8, num_blocks=10, max_seqs=2,
                       max_seq_len=33, block_size=16, dtype=jnp.bfloat16)
  assert cfg.max_blocks_per_seq == 3
  assert cfg.bytes_per_token == 2 * 3 * 4 * 8 * 2
  assert cfg.block_bytes == cfg.bytes_per_token * 16
  assert cfg.pool_bytes == cfg.block_bytes * 10
  assert cfg.pool_shape == (3, 4, 10, 16, 8)
  assert hash(cfg) == hash(pk.CacheConfig(num_layers=3, num_kv_heads=4, head_dim=8,
                                          num_blocks=10, max_seqs=2, max_seq_len=33,
                                          block_size=16, dtype="bfloat16"))
  cache = pk.init_cache(cfg)
  assert cache.k_pool.shape == cfg.pool_shape and cache.k_pool.dtype == cfg.storage_dtype
  assert cfg.storage_dtype == (jnp.uint16 if jax.default_backend() == "cpu" else jnp.bfloat16)
  assert pk.pool_values(cache.k_pool, cfg.dtype).dtype == jnp.bfloat16
  assert cache.k_pool.nbytes + cache.v_pool.nbytes == cfg.pool_bytes


@pytest.mark.parametrize("dtype, strategy", [("bfloat16", CacheStrategy.PAGED),
                                             ("float16", CacheStrategy.CONTIGUOUS)])
def test_pool_bits_stores_the_same_values(dtype, strategy):
  """A 16-bit cache stored as bit patterns (pool_bits, CPU's default) holds bitwise the values
  of the same cache stored as floats, through appends, write_kv, fork + copy-on-write,
  truncation and lookup; attention gives bitwise the same output."""
  base = dict(num_layers=2, num_kv_heads=2, head_dim=16, num_blocks=1 + 4 * 4, max_seqs=4,
              max_seq_len=64, block_size=16, dtype=dtype, strategy=strategy)
  caches = {bits: pk.init_cache(pk.CacheConfig(**base, pool_bits=bits), pool_fill=np.nan)
            for bits in (False, True)}
  assert caches[True].k_pool.dtype == jnp.uint16
  assert caches[False].k_pool.dtype == jnp.dtype(dtype)
  rng = np.random.default_rng(0)
  k = jnp.asarray(rng.standard_normal((2, 2, 20, 2, 16)), dtype)
  v = jnp.asarray(rng.standard_normal((2, 2, 20, 2, 16)), dtype)
  q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), dtype)
  out = {}
  for bits, cache in caches.items():
    cache, _ = pk.allocate_sequences(cache, [0, 1])
    cache, _ = pk.append_kv(cache, k, v, [0, 1], num_new=[20, 7])
    cache, _ = pk.fork_sequence(cache, 1, 2)
    cache, _ = pk.append_kv(cache, -k[:, :1, :3], v[:, :1, :3], [2])  # copy-on-write
    cache, _ = pk.truncate_sequences(cache, [0], [3])  # drops 3 tokens: 17 left
    cache, slots, _ = pk.reserve(cache, [0], [2], max_new=2)
    cache, _ = pk.write_kv(cache, slots, 2 * k[0, :1, :2], v[0, :1, :2], 1, seq_ids=[0])
    cache, _ = pk.write_kv(cache, slots, 3 * k[0, :1, :2], v[0, :1, :2], 0, seq_ids=[0])
    out[bits] = (pk.lookup_kv(cache, [0, 1, 2], 1, max_len=32),
                 pk.paged_attention(q[:1].repeat(3, 0), cache, [0, 1, 2], 1),
                 pk.pool_values(cache.k_pool, cache.config.dtype),
                 pk.pool_values(cache.v_pool, cache.config.dtype))
    assert pk.check_invariants(cache).ok
  want = out[False][0]
  np.testing.assert_array_equal(np.asarray(out[True][0][2]), [19, 7, 10])
  for got, ref in zip(jax.tree_util.tree_leaves(out[True]), jax.tree_util.tree_leaves(out[False]),
                      strict=True):
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
  del want


@pytest.mark.parametrize("bad", [
    dict(num_layers=0), dict(head_dim=-1), dict(num_blocks=1), dict(block_size=0),
    dict(max_seqs=2.5), dict(dtype=jnp.int32), dict(dtype="nonsense"), dict(strategy="other"),
    dict(strategy=CacheStrategy.CONTIGUOUS, num_blocks=5),
])
def test_config_rejects_invalid(bad):
  with pytest.raises(ValueError):
    small_config(**bad)


def test_from_memory_budget():
  budget = 10_000_000
  cfg = pk.CacheConfig.from_memory_budget(budget, num_layers=2, num_kv_heads=2, head_dim=64,
                                          max_seq_len=256, block_size=16, dtype=jnp.bfloat16)
  assert cfg.pool_bytes <= budget < cfg.pool_bytes + cfg.block_bytes
  contig = pk.CacheConfig.from_memory_budget(
      budget, num_layers=2, num_kv_heads=2, head_dim=64, max_seq_len=256, block_size=16,
      dtype=jnp.bfloat16, strategy=CacheStrategy.CONTIGUOUS)
  assert contig.pool_bytes <= budget
  assert contig.max_seqs == (cfg.num_blocks - 1) // contig.max_blocks_per_seq
  with pytest.raises(ValueError):
    pk.CacheConfig.from_memory_budget(100, num_layers=2, num_kv_heads=2, head_dim=64,
                                      max_seq_len=256)


def test_cache_is_a_pytree_of_arrays():
  cache = pk.init_cache(small_config())
  leaves, treedef = jax.tree_util.tree_flatten(cache)
  assert all(isinstance(x, jax.Array) for x in leaves)
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert again.config == cache.config and leaves_equal(again, cache)


# ---------------------------------------------------------------------------------------------
# append / lookup against a NumPy model of the whole pool


class PoolModel:
  """Expected pools, tables and lengths, updated by hand from the documented allocation order."""

  def __init__(self, cache):
    self.k = np.array(cache.k_pool)
    self.v = np.array(cache.v_pool)
    self.tables = np.array(cache.block_tables)
    self.lens = np.array(cache.seq_lens)
    self.free = list(np.array(cache.allocator.free_stack)[: int(cache.allocator.num_free)])
    self.bs = cache.config.block_size

  def append(self, seq_ids, k, v, num_new):
    for r, s in enumerate(seq_ids):
      if s < 0:
        continue
      for i in range(num_new[r]):
        pos = self.lens[s]
        j, off = divmod(pos, self.bs)
        if off == 0:
          self.tables[s, j] = self.free.pop()
        blk = self.tables[s, j]
        self.k[:, :, blk, off] = k[:, r, i]
        self.v[:, :, blk, off] = v[:, r, i]
        self.lens[s] += 1


def check_pool(cache, model):
  np.testing.assert_array_equal(np.asarray(cache.k_pool), model.k)
  np.testing.assert_array_equal(np.asarray(cache.v_pool), model.v)
  np.testing.assert_array_equal(np.asarray(cache.block_tables), model.tables)
  np.testing.assert_array_equal(np.asarray(cache.seq_lens), model.lens)


@pytest.mark.parametrize("use_jit", [False, True])
def test_append_whole_pool_matches_model(use_jit):
  """Untouched slots, padding rows and the null block must stay exactly as they were."""
  rng = np.random.default_rng(1)
  cfg = small_config()
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [0, 1, 2])
  model = PoolModel(cache)
  append = jax.jit(lambda c, k, v, ids, n: pk.append_kv(c, k, v, ids, num_new=n)) if use_jit \
      else (lambda c, k, v, ids, n: pk.append_kv(c, k, v, ids, num_new=n))
  steps = [([0, 1, -1], 6, [6, 3, 5]), ([2, 0, 1], 6, [5, 0, 1]), ([1, 2, 0], 1, [1, 1, 1]),
           ([0, -1, 2], 9, [9, 9, 2])]
  for ids, t, n in steps:
    k, v = rand_kv(rng, cfg, len(ids), t)
    cache, status = append(cache, k, v, jnp.asarray(ids), jnp.asarray(n))
    assert np.all(np.asarray(status) == 0)
    model.append(ids, np.asarray(k), np.asarray(v), n)
    check_pool(cache, model)
    assert pk.check_invariants(cache).ok
  assert np.isnan(np.asarray(cache.k_pool)[:, :, pk.NULL_BLOCK]).all()


def test_reserve_then_write_per_layer_equals_append():
  rng = np.random.default_rng(2)
  cfg = small_config()
  base = pk.init_cache(cfg)
  base, _ = pk.allocate_sequences(base, [0, 3])
  k, v = rand_kv(rng, cfg, 2, 5)
  a, _ = pk.append_kv(base, k, v, [0, 3], num_new=[5, 2], donate=False)

  @jax.jit
  def step(cache, k, v):
    cache, slots, st = pk.reserve(cache, jnp.array([0, 3]), jnp.array([5, 2]), max_new=5)

    def body(c, layer):
      c, _ = pk.write_kv(c, slots, k[layer], v[layer], layer)
      return c, None

    cache, _ = jax.lax.scan(body, cache, jnp.arange(cfg.num_layers))
    return cache, st

  b, st = step(base, k, v)
  assert np.all(np.asarray(st) == 0)
  assert leaves_equal(a, b, skip_telemetry=False)


def test_lookup_matches_appended_data_and_zero_pads():
  rng = np.random.default_rng(3)
  cfg = small_config()
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [1, 2])
  k, v = rand_kv(rng, cfg, 2, 7)
  cache, _ = pk.append_kv(cache, k, v, [1, 2], num_new=[7, 3])
  for layer in range(cfg.num_layers):
    kk, vv, lens = pk.lookup_kv(cache, [2, 1, -1], layer, max_len=12)
    np.testing.assert_array_equal(np.asarray(lens), [3, 7, 0])
    want_k = np.zeros((3, 12, cfg.num_kv_heads, cfg.head_dim), np.float32)
    want_v = np.zeros_like(want_k)
    want_k[0, :3], want_v[0, :3] = np.asarray(k)[layer, 1, :3], np.asarray(v)[layer, 1, :3]
    want_k[1, :7], want_v[1, :7] = np.asarray(k)[layer, 0], np.asarray(v)[layer, 0]
    np.testing.assert_array_equal(np.asarray(kk), want_k)
    np.testing.assert_array_equal(np.asarray(vv), want_v)


# ---------------------------------------------------------------------------------------------
# bad input: eager raises and keeps the cache, jit reports status and returns the input


def filled_cache(rng, cfg=None):
  cfg = cfg or small_config()
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [0, 1])
  k, v = rand_kv(rng, cfg, 2, 6)
  cache, _ = pk.append_kv(cache, k, v, [0, 1], num_new=[6, 5])
  return cache


BAD_APPENDS = [
    # (seq_ids, num_new, T, expected status per row, exception)
    ([0, 5], [1, 1], 1, [0, pk.Status.INVALID_SLOT], pk.InvalidSlotError),
    ([0, 2], [1, 1], 1, [0, pk.Status.INACTIVE_SLOT], pk.InactiveSlotError),
    ([1, 1], [1, 1], 1, [0, pk.Status.DUPLICATE_SLOT], pk.DuplicateSlotError),
    ([0, 1], [36, 1], 36, [pk.Status.SEQUENCE_TOO_LONG, 0], pk.SequenceTooLongError),
    ([0, 1], [-1, 1], 2, [pk.Status.INVALID_COUNT, 0], pk.InvalidCountError),
    ([0, 1], [3, 1], 2, [pk.Status.INVALID_COUNT, 0], pk.InvalidCountError),
    ([0, 1], [30, 30], 30, [pk.Status.POOL_EXHAUSTED] * 2, pk.PoolExhaustedError),
]


@pytest.mark.parametrize("ids,n,t,want,exc", BAD_APPENDS)
def test_bad_append_under_jit_returns_input_cache(ids, n, t, want, exc):
  rng = np.random.default_rng(4)
  cache = filled_cache(rng)
  before = snapshot(cache)
  k, v = rand_kv(rng, cache.config, 2, t)
  fn = jax.jit(lambda c, k, v, ids, n: pk.append_kv(c, k, v, ids, num_new=n))
  out, status = fn(cache, k, v, jnp.asarray(ids), jnp.asarray(n))
  np.testing.assert_array_equal(np.asarray(status), np.asarray(want))
  assert leaves_equal(out, before)
  expected_failures = int(before.telemetry.failed_allocations) + (exc is pk.PoolExhaustedError)
  assert int(out.telemetry.failed_allocations) == expected_failures


@pytest.mark.parametrize("ids,n,t,want,exc", BAD_APPENDS)
def test_bad_append_eager_raises_named_error_and_keeps_cache(ids, n, t, want, exc):
  rng = np.random.default_rng(5)
  cache = filled_cache(rng)
  before = snapshot(cache)
  k, v = rand_kv(rng, cache.config, 2, t)
  with pytest.raises(exc) as info:
    pk.append_kv(cache, k, v, ids, num_new=n)
  assert isinstance(info.value, pk.PagedKVCacheError)
  bad_row = int(np.flatnonzero(want)[0])
  assert info.value.seq_id == ids[bad_row] and f"sequence {ids[bad_row]}" in str(info.value)
  assert leaves_equal(cache, before)  # still alive (not donated) and unchanged


def test_shape_and_dtype_errors_at_trace_time():
  cfg = small_config()
  cache = pk.init_cache(cfg)
  cache, _ = pk.allocate_sequences(cache, [0])
  good = jnp.zeros((2, 1, 3, 2, 4), jnp.float32)
  with pytest.raises(pk.CacheShapeError, match="dtype"):
    pk.append_kv(cache, good.astype(jnp.bfloat16), good.astype(jnp.bfloat16), [0])
  with pytest.raises(pk.CacheShapeError, match="shape"):
    pk.append_kv(cache, good[..., :3], good[..., :3], [0])
  with pytest.raises(pk.CacheShapeError, match="one-layer"):
    pk.append_kv(cache, good[0], good[0], [0])
  with pytest.raises(pk.CacheShapeError, match="seq_ids"):
    pk.append_kv(cache, good, good, [0, 1])
  with pytest.raises(pk.CacheShapeError, match="multiple of num_kv_heads"):
    pk.paged_attention(jnp.zeros((1, 1, 3, 4)), cache, [0], 0)
  with pytest.raises(pk.CacheShapeError, match="head_dim"):
    pk.paged_attention(jnp.zeros((1, 1, 2, 8)), cache, [0], 0)


def test_lifecycle_errors_eager():
  cache = pk.init_cache(small_config())
  cache, _ = pk.allocate_sequences(cache, [0])
  with pytest.raises(pk.SlotInUseError, match="sequence 0"):
    pk.allocate_sequences(cache, [0])
  with pytest.raises(pk.InactiveSlotError, match="sequence 1"):
    pk.free_sequences(cache, [1])
  with pytest.raises(pk.SlotInUseError, match="sequence 0"):
    pk.fork_sequence(cache, 0, 0)
  with pytest.raises(pk.InactiveSlotError):
    pk.fork_sequence(cache, 2, 3)
  with pytest.raises(pk.InvalidSlotError):
    pk.fork_sequence(cache, 0, 9)
  with pytest.raises(pk.InvalidCountError):
    pk.truncate_sequences(cache, [0], 1)
  with pytest.raises(pk.InvalidLayerError):
    pk.lookup_kv(cache, [0], 2)
  with pytest.raises(pk.InactiveSlotError):
    pk.paged_attention(jnp.zeros((1, 1, 2, 4)), cache, [3], 0)
  cache, _ = pk.free_sequences(cache, [0])
  with pytest.raises(pk.InactiveSlotError, match="sequence 0"):  # double free
    pk.free_sequences(cache, [0])


def test_invalid_layer_under_jit_writes_nothing():
  rng = np.random.default_rng(6)
  cache = filled_cache(rng)
  before = snapshot(cache)
  cache2, slots, _ = pk.reserve(cache, [0], 1, donate=False)
  k, v = rand_kv(rng, cache.config, 1, 1, layers=1)
  out, st = jax.jit(pk.write_kv)(cache2, slots, k[0], v[0], jnp.int32(-1))
  assert list(np.asarray(st)) == [pk.Status.INVALID_LAYER]
  assert leaves_equal(out, cache2)
  out, st = jax.jit(pk.write_kv)(cache2, slots, k[0], v[0], jnp.int32(2))
  assert list(np.asarray(st)) == [pk.Status.INVALID_LAYER] and leaves_equal(out, cache2)
  assert leaves_equal(cache, before)


# ---------------------------------------------------------------------------------------------
# fork / copy-on-write / truncate / free


def test_fork_shares_blocks_and_copy_on_write_keeps_parent():
  rng = np.random.default_rng(7)
  cfg = small_config()
  cache = filled_cache(rng, cfg)  # seq 0: 6 tokens (blocks 2 of 4-token blocks), seq 1: 5
  parent_k, parent_v, _ = pk.lookup_kv(cache, [0], 1)
  cache, st = pk.fork_sequence(cache, 0, 2)
  assert int(st) == 0
  t = np.asarray(cache.block_tables)
  np.testing.assert_array_equal(t[2], t[0])
  refs = np.asarray(cache.allocator.ref_counts)
  assert refs[t[0, 0]] == 2 and refs[t[0, 1]] == 2
  assert int(pk.cache_stats(cache).shared_blocks) == 2
  free_before = int(cache.allocator.num_free)
  # Child writes into the shared partial block: it gets a private copy.
  k, v = rand_kv(rng, cfg, 1, 1)
  cache, _ = pk.append_kv(cache, k, v, [2])
  t2 = np.asarray(cache.block_tables)
  assert t2[2, 0] == t[0, 0] and t2[2, 1] != t[0, 1] and t2[0, 1] == t[0, 1]
  assert int(cache.allocator.num_free) == free_before - 1
  # Parent's data is untouched; the child sees the parent's prefix plus its own token.
  pk_, pv_, plen = pk.lookup_kv(cache, [0], 1)
  np.testing.assert_array_equal(np.asarray(pk_), np.asarray(parent_k))
  ck, cv, clen = pk.lookup_kv(cache, [2], 1)
  assert int(clen[0]) == 7
  np.testing.assert_array_equal(np.asarray(ck)[0, :6], np.asarray(parent_k)[0, :6])
  np.testing.assert_array_equal(np.asarray(ck)[0, 6], np.asarray(k)[1, 0, 0])
  # Parent's next write does not copy (its block is private again).
  k2, v2 = rand_kv(rng, cfg, 1, 1)
  cache, _ = pk.append_kv(cache, k2, v2, [0])
  assert np.asarray(cache.block_tables)[0, 1] == t[0, 1]
  assert pk.check_invariants(cache).ok
  ck2, _, _ = pk.lookup_kv(cache, [2], 1)
  np.testing.assert_array_equal(np.asarray(ck2), np.asarray(ck))


def test_both_sides_copying_the_same_block_in_one_batch_frees_it():
  rng = np.random.default_rng(8)
  cfg = small_config()
  cache = filled_cache(rng, cfg)
  cache, _ = pk.fork_sequence(cache, 0, 2)
  old = int(np.asarray(cache.block_tables)[0, 1])
  free_before = int(cache.allocator.num_free)
  k, v = rand_kv(rng, cfg, 2, 1)
  cache, _ = pk.append_kv(cache, k, v, [0, 2])
  t = np.asarray(cache.block_tables)
  assert t[0, 1] != old and t[2, 1] != old and t[0, 1] != t[2, 1]
  assert int(cache.allocator.ref_counts[old]) == 0
  # Two popped, the orphaned original pushed back.
  assert int(cache.allocator.num_free) == free_before - 1
  assert pk.check_invariants(cache).ok


def test_truncate_frees_emptied_blocks_and_keeps_the_rest():
  rng = np.random.default_rng(9)
  cfg = small_config()
  cache = filled_cache(rng, cfg)
  before_free = int(cache.allocator.num_free)
  k_all, _, _ = pk.lookup_kv(cache, [0], 0)
  cache, st = pk.truncate_sequences(cache, [0, 1], [3, 5])
  assert np.all(np.asarray(st) == 0)
  np.testing.assert_array_equal(np.asarray(cache.seq_lens)[:2], [3, 0])
  assert int(cache.allocator.num_free) == before_free + 1 + 2
  assert pk.check_invariants(cache).ok
  k_now, _, lens = pk.lookup_kv(cache, [0], 0)
  np.testing.assert_array_equal(np.asarray(k_now)[0, :3], np.asarray(k_all)[0, :3])
  assert np.all(np.asarray(k_now)[0, 3:] == 0)


def test_free_returns_every_block():
  rng = np.random.default_rng(10)
  cache = filled_cache(rng)
  cache, _ = pk.fork_sequence(cache, 1, 3)
  cache, _ = pk.free_sequences(cache, [1])
  assert int(cache.allocator.num_free) == cache.config.usable_blocks - 4  # seq 0: 2, seq 3: 2
  cache, _ = pk.free_sequences(cache, [0, 3])
  assert int(cache.allocator.num_free) == cache.config.usable_blocks
  assert pk.check_invariants(cache).ok
  stats = pk.cache_stats(cache)
  assert int(stats.used_blocks) == 0 and int(stats.active_sequences) == 0


def test_stats_against_hand_count():
  rng = np.random.default_rng(11)
  cache = filled_cache(rng)  # 6 and 5 tokens, block 4: 2 + 2 blocks
  cache, _ = pk.fork_sequence(cache, 0, 2)
  s = pk.cache_stats(cache).as_dict()
  assert s["used_blocks"] == 4 and s["shared_blocks"] == 2 and s["active_sequences"] == 3
  assert s["tokens_stored"] == 11 and s["logical_tokens"] == 17
  assert s["allocated_slots"] == 16 and s["utilization"] == pytest.approx(11 / 16)
  assert s["free_blocks"] == cache.config.usable_blocks - 4


# ---------------------------------------------------------------------------------------------
# sentinel, isolation, transformations


def test_padding_rows_never_touch_the_last_block():
  """-1 is a padding row, not an index: JAX would wrap it to the last block."""
  rng = np.random.default_rng(12)
  cfg = small_config(num_blocks=6)
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [0])
  k, v = rand_kv(rng, cfg, 2, 3)
  cache, _ = pk.append_kv(cache, k, v, [-1, 0], num_new=[3, 1])
  assert np.isnan(np.asarray(cache.k_pool)[:, :, -1]).all()
  assert np.isnan(np.asarray(cache.k_pool)[:, :, pk.NULL_BLOCK]).all()


def test_one_sequence_cannot_read_another_through_stale_blocks():
  rng = np.random.default_rng(13)
  cfg = small_config()
  cache = filled_cache(rng, cfg)
  cache, _ = pk.free_sequences(cache, [0])  # its blocks return to the free list with data
  cache, _ = pk.allocate_sequences(cache, [3])
  k, v = rand_kv(rng, cfg, 1, 1)
  cache, _ = pk.append_kv(cache, k, v, [3])  # reuses a freed block of sequence 0
  kk, vv, lens = pk.lookup_kv(cache, [3], 0)
  assert int(lens[0]) == 1 and np.all(np.asarray(kk)[0, 1:] == 0)
  q = jnp.asarray(rng.standard_normal((1, 1, 2, 4)), jnp.float32)
  out = pk.paged_attention(q, cache, [3], 0)
  # One visible key: the output is exactly its value.
  np.testing.assert_allclose(np.asarray(out)[0, 0], np.repeat(np.asarray(v)[0, 0, 0], 1, 0),
                             rtol=1e-6)


def test_vmap_over_independent_caches_matches_separate_calls():
  rng = np.random.default_rng(14)
  cfg = small_config()
  caches = [filled_cache(rng, cfg) for _ in range(2)]
  stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *caches)
  k, v = rand_kv(rng, cfg, 2, 2)

  def step(c, k, v):
    return pk.append_kv(c, k, v, jnp.array([1, 0]), num_new=jnp.array([2, 1]))

  out, st = jax.vmap(step, in_axes=(0, None, None))(stacked, k, v)
  for i, c in enumerate(caches):
    want, _ = step(c, k, v)
    got = jax.tree_util.tree_map(lambda x, i=i: x[i], out)
    assert leaves_equal(got, want, skip_telemetry=False)
  assert np.all(np.asarray(st) == 0)


def test_pmap_over_per_device_caches_matches_separate_calls():
  """One independent cache per device (data parallel serving), updated under pmap."""
  rng = np.random.default_rng(18)
  cfg = small_config()
  caches = [filled_cache(rng, cfg) for _ in range(2)]
  stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *caches)
  k, v = rand_kv(rng, cfg, 2, 2)
  q = jnp.asarray(rng.standard_normal((2, 1, 4, cfg.head_dim)), jnp.float32)

  def step(c, k, v, q):
    c, st = pk.append_kv(c, k, v, jnp.array([1, 0]), num_new=jnp.array([2, 1]))
    return c, pk.paged_attention(q, c, jnp.array([0, 1]), 1), st

  out, att, st = jax.pmap(step, in_axes=(0, None, None, None))(stacked, k, v, q)
  for i, c in enumerate(caches):
    want_cache, want_att, _ = jax.jit(step)(c, k, v, q)
    got = jax.tree_util.tree_map(lambda x, i=i: x[i], out)
    assert leaves_equal(got, want_cache, skip_telemetry=False)
    np.testing.assert_allclose(np.asarray(att[i]), np.asarray(want_att), rtol=1e-6, atol=1e-6)
  assert np.all(np.asarray(st) == 0)


def test_shard_map_over_kv_heads_matches_unsharded():
  """Pools sharded on the kv-head axis; allocator metadata replicated and updated identically."""
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  rng = np.random.default_rng(15)
  cfg = small_config(num_kv_heads=4)
  cache = filled_cache(rng, cfg)
  k, v = rand_kv(rng, cfg, 2, 3)
  q = jnp.asarray(rng.standard_normal((2, 1, 8, cfg.head_dim)), jnp.float32)
  ids = jnp.array([0, 1])

  def step(c, k, v, q):
    c, st = pk.append_kv(c, k, v, ids, num_new=jnp.array([3, 2]))
    return c, pk.paged_attention(q, c, ids, 1), st

  want_cache, want_out, _ = jax.jit(step)(cache, k, v, q)
  mesh = Mesh(np.array(jax.devices()[:4]), ("heads",))
  pool_spec = P(None, "heads")
  spec = jax.tree_util.tree_map(lambda _: P(), cache).replace(k_pool=pool_spec, v_pool=pool_spec)
  kv_spec = P(None, None, None, "heads")
  fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(spec, kv_spec, kv_spec,
                                                         P(None, None, "heads")),
                             out_specs=(spec, P(None, None, "heads"), P())))
  cache_s = jax.device_put(cache, jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), spec))
  got_cache, got_out, st = fn(cache_s, k, v, q)
  assert np.all(np.asarray(st) == 0)
  assert leaves_equal(got_cache, want_cache, skip_telemetry=False)
  np.testing.assert_allclose(np.asarray(got_out), np.asarray(want_out), rtol=1e-6, atol=1e-6)


def test_snapshot_rollback_is_free():
  rng = np.random.default_rng(16)
  cache = filled_cache(rng)
  before = snapshot(cache)
  k, v = rand_kv(rng, cache.config, 2, 3)
  after, _ = pk.append_kv(cache, k, v, [0, 1], donate=False)
  assert not leaves_equal(after, before)
  assert leaves_equal(cache, before)  # the old cache is still the old cache


def test_checkpoint_round_trip_through_numpy_files(tmp_path):
  """The cache is arrays plus a static config: save the leaves, restore, keep decoding."""
  rng = np.random.default_rng(19)
  cache = filled_cache(rng)
  leaves, treedef = jax.tree_util.tree_flatten(cache)
  np.savez(tmp_path / "ckpt.npz", *[np.asarray(x) for x in leaves])
  with np.load(tmp_path / "ckpt.npz") as f:
    restored = jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(f[f"arr_{i}"]) for i in range(len(leaves))])
  assert restored.config == cache.config and leaves_equal(restored, cache, skip_telemetry=False)
  k, v = rand_kv(rng, cache.config, 2, 3)
  a, _ = pk.append_kv(cache, k, v, [0, 1], donate=False)
  b, _ = pk.append_kv(restored, k, v, [0, 1])
  assert leaves_equal(a, b, skip_telemetry=False)


# ---------------------------------------------------------------------------------------------
# contiguous strategy


def test_contiguous_strategy_same_api_same_data():
  rng = np.random.default_rng(17)
  paged_cfg = small_config(num_blocks=41, max_seqs=4, max_seq_len=40)
  contig_cfg = small_config(num_blocks=41, max_seqs=4, max_seq_len=40,
                            strategy=CacheStrategy.CONTIGUOUS)
  caches = {}
  k, v = rand_kv(rng, paged_cfg, 2, 7)
  k2, v2 = rand_kv(rng, paged_cfg, 2, 1)
  for name, cfg in (("paged", paged_cfg), ("contig", contig_cfg)):
    c = pk.init_cache(cfg)
    c, _ = pk.allocate_sequences(c, [0, 2])
    c, _ = pk.append_kv(c, k, v, [0, 2], num_new=[7, 3])
    c, _ = pk.fork_sequence(c, 0, 1)
    c, _ = pk.append_kv(c, k2, v2, [1, 0])
    c, _ = pk.truncate_sequences(c, [2], [1])
    assert pk.check_invariants(c).ok, pk.check_invariants(c).failures()
    caches[name] = c
  t = np.asarray(caches["contig"].block_tables)
  assert t[1, 0] == contig_cfg.contiguous_block(1, 0)
  for layer in range(2):
    a = pk.lookup_kv(caches["paged"], [0, 1, 2], layer)
    b = pk.lookup_kv(caches["contig"], [0, 1, 2], layer)
    for x, y in zip(a, b, strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  s = pk.cache_stats(caches["contig"]).as_dict()
  assert s["used_blocks"] == 3 * contig_cfg.max_blocks_per_seq


def test_a_bool_among_ints_is_refused_not_taken_as_one():
  """NumPy makes [0, True] an int64 array: without a check on the elements, True would free or
  truncate slot / count 1."""
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=8, max_seqs=2,
                       max_seq_len=16, block_size=4)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), [0, 1])
  for call in (lambda: pk.free_sequences(cache, [0, True]),
               lambda: pk.truncate_sequences(cache, [0, 1], [0, np.True_])):
    with pytest.raises(pk.CacheShapeError, match="bool"):
      call()
  assert np.asarray(cache.active).all()


def test_reserve_near_int32_max_reports_too_long_instead_of_wrapping():
  # Huge blocks keep reserve's per-row block count (max_new / block_size) small.
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, block_size=2**20,
                       num_blocks=2, max_seqs=1, max_seq_len=2**20)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), [0])
  k = jnp.ones((1, 1, 10, 1, 2))
  cache, _ = pk.append_kv(cache, k, k, [0])
  # The slots ([1, max_new] int32) are dropped inside jit: 8 GB otherwise.
  f = jax.jit(lambda c, n: pk.reserve(c, jnp.array([0]), n, max_new=2**31 - 1)[::2])
  out, status = f(cache, jnp.array([2**31 - 5], jnp.int32))  # 10 + n wraps in int32
  assert list(np.asarray(status)) == [pk.Status.SEQUENCE_TOO_LONG]
  for x, y in zip(jax.tree_util.tree_leaves(out.replace(telemetry=cache.telemetry)),
                  jax.tree_util.tree_leaves(cache), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_sizes_that_overflow_int32_are_refused():
  with pytest.raises(ValueError, match="does not fit in int32"):
    pk.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, block_size=2**20, num_blocks=8,
                   max_seqs=2, max_seq_len=2**31 - 1)
  with pytest.raises(ValueError, match="does not fit in int32"):
    pk.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, block_size=2**16,
                   num_blocks=2**15, max_seqs=2, max_seq_len=16)
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=8, max_seqs=2,
                       max_seq_len=16, block_size=4)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), [0])
  for kw in (dict(window=2**31), dict(window=4, sink_tokens=2**40)):
    with pytest.raises(pk.CacheShapeError, match="must be an int in"):
      pk.free_outside_window(cache, [0], **kw)


def test_write_kv_with_a_bad_sequence_fails_even_when_every_slot_is_skipped():
  """``seq_ids`` naming no active sequence is a bad row whatever its slots (the skip value
  ``num_blocks * block_size`` included): the status says so, eagerly it raises."""
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=16, max_seqs=4,
                       max_seq_len=16, block_size=4)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), [0])
  skip = np.full((1, 1), cfg.num_blocks * cfg.block_size, np.int32)
  z = jnp.zeros((1, 1, 1, 4))
  for sid in (99, 2):  # out of range; inactive
    with pytest.raises(pk.InvalidTokenSlotError, match=f"sequence {sid}"):
      pk.write_kv(cache, skip, z, z, 0, seq_ids=[sid])
    _, status = jax.jit(lambda c, i: pk.write_kv(c, skip, z, z, 0, seq_ids=i))(
        cache, jnp.array([sid], jnp.int32))
    assert list(np.asarray(status)) == [pk.Status.INVALID_TOKEN_SLOT]
  # Padding (-1) with every slot skipped is fine.
  _, status = pk.write_kv(cache, skip, z, z, 0, seq_ids=[-1])
  assert list(np.asarray(status)) == [0]


def test_invariants_catch_a_block_at_two_positions():
  """Blocks are shared only by forks, which keep a block's table position. A block twice in
  one table, or at different positions in two tables (then a sequence reads another's tokens
  as its own), passed every other invariant once the counts were made to agree."""
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=4, num_blocks=16, max_seqs=2,
                       max_seq_len=16, block_size=4)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), [0, 1])
  k = jnp.ones((1, 2, 10, 1, 4))
  cache, _ = pk.append_kv(cache, k, k, [0, 1])  # three blocks each
  assert pk.check_invariants(cache).ok
  tables = np.asarray(cache.block_tables)
  refs = np.asarray(cache.allocator.ref_counts).copy()

  def corrupt(row, col, block):
    t, r = tables.copy(), refs.copy()
    r[t[row, col]] -= 1
    r[block] += 1
    t[row, col] = block
    # Keep the free stack complete: the block that lost its reference goes on it.
    a = cache.allocator
    stack, n = np.asarray(a.free_stack).copy(), int(a.num_free)
    stack[n] = tables[row, col]
    alloc = dataclasses.replace(a, ref_counts=jnp.asarray(r), free_stack=jnp.asarray(stack),
                                num_free=jnp.asarray(n + 1, a.num_free.dtype))
    return cache.replace(block_tables=jnp.asarray(t), allocator=alloc)

  twice = corrupt(0, 1, tables[0, 0])  # [b0, b0, b2]
  elsewhere = corrupt(1, 0, tables[0, 2])  # row 1 starts with row 0's last block
  for bad in (twice, elsewhere):
    report = pk.check_invariants(bad)
    assert report.failures() == ["blocks_at_one_position"], report.failures()
  forked, _ = pk.free_sequences(cache, [1], donate=False)
  forked, _ = pk.fork_sequence(forked, 0, 1)  # shared at the same positions: fine
  assert pk.check_invariants(forked).ok


@pytest.mark.parametrize("change", [dict(block_size=2), dict(max_seqs=1), dict(num_blocks=8),
                                    dict(max_seq_len=8), dict(dtype=jnp.bfloat16, pool_bits=False)],
                         ids=lambda c: next(iter(c)))
def test_a_cache_rebuilt_under_another_config_is_refused(change):
  """Saved leaves restored under a config they were not made for (a checkpoint) read garbage
  (block_size 2 for leaves of block 4) or passed check_invariants (fewer max_seqs)."""
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=4, num_blocks=16, max_seqs=2,
                       max_seq_len=16, block_size=4)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), [0])
  other = pk.init_cache(dataclasses.replace(cfg, **change))
  assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(other)] != [
      (x.shape, x.dtype) for x in jax.tree_util.tree_leaves(cache)]
  rebuilt = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(other),
                                         jax.tree_util.tree_leaves(cache))
  for call in (lambda: pk.check_invariants(rebuilt), lambda: pk.cache_stats(rebuilt),
               lambda: pk.lookup_kv(rebuilt, [0], 0),
               lambda: pk.allocate_sequences(rebuilt, [1]),
               lambda: jax.jit(pk.free_sequences)(rebuilt, jnp.array([0]))):
    with pytest.raises(pk.CacheShapeError, match="another config"):
      call()
