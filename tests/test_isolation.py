"""The isolation promises at the API boundary, one regression test per way they were broken.

1. Ids that do not fit in ``int32`` must not alias other slots (and floats/bools are rejected).
2. ``write_kv`` must never write a slot that no active row reserved (negative slots used to wrap
   into the last block of the pool, i.e. another sequence's data).
3. One parent may be forked into several children in one call; errors name the id at fault.
4. (NaN/Inf in V and the masks: ``tests/attention_cases.py``, for every implementation.)

Plus: exhaustion is reported only for an otherwise valid batch, with the blocks needed and free;
checking mode raises from inside ``jit`` with the eager messages; the default path has no
callback.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import jax_paged_kv as pk
from jax_paged_kv import Status


def config(**kw):
  base = dict(num_layers=2, num_kv_heads=1, head_dim=4, num_blocks=12, max_seqs=4,
              max_seq_len=32, block_size=4)
  base.update(kw)
  return pk.CacheConfig(**base)


def filled(cfg=None):
  """Sequences 0 (5 tokens of 1.0) and 1 (6 tokens of 2.0); everything else NaN."""
  cfg = cfg or config()
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [0, 1])
  k = np.stack([np.full((8, 1, 4), 1.0), np.full((8, 1, 4), 2.0)])[None].repeat(2, 0)
  cache, _ = pk.append_kv(cache, k.astype(np.float32), -k.astype(np.float32), [0, 1],
                          num_new=[5, 6])
  return cache


def snapshot(cache):
  return jax.tree_util.tree_map(np.asarray, cache)


def same(a, b, *, skip_telemetry=True):
  if skip_telemetry:
    a = a.replace(telemetry=b.telemetry)
  return all(np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True) for x, y in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


# ---------------------------------------------------------------------------------------------
# 1. ids past int32 never alias; non-integers are rejected


ALIASES = [np.int64(2**32 + 1), np.asarray([2**32 + 1], np.int64), np.uint32(2**32 - 1),
           np.asarray([2**32 - 1], np.uint32), 2**40, [2**40], -(2**40), np.uint64(2**63)]


@pytest.mark.parametrize("ids", ALIASES, ids=repr)
@pytest.mark.parametrize("op", ["lookup_kv", "paged_attention", "free_sequences", "append_kv",
                                "reserve", "truncate_sequences", "allocate_sequences",
                                "fork_parent", "fork_child"])
def test_ids_past_int32_raise_and_alias_nothing(op, ids):
  cache = filled()
  before = snapshot(cache)
  calls = {
      "lookup_kv": lambda: pk.lookup_kv(cache, ids, 0),
      "paged_attention": lambda: pk.paged_attention(jnp.ones((1, 1, 1, 4)), cache, ids, 0),
      "free_sequences": lambda: pk.free_sequences(cache, ids),
      "append_kv": lambda: pk.append_kv(cache, jnp.ones((2, 1, 1, 1, 4)),
                                        jnp.ones((2, 1, 1, 1, 4)), ids),
      "reserve": lambda: pk.reserve(cache, ids, 1),
      "truncate_sequences": lambda: pk.truncate_sequences(cache, ids, 1),
      "allocate_sequences": lambda: pk.allocate_sequences(cache, ids),
      "fork_parent": lambda: pk.fork_sequence(cache, ids, np.full(np.shape(ids), 2)),
      "fork_child": lambda: pk.fork_sequence(cache, np.zeros(np.shape(ids), int), ids),
  }
  with pytest.raises(pk.InvalidSlotError, match="does not fit in int32"):
    calls[op]()
  assert same(cache, before, skip_telemetry=False)


@pytest.mark.parametrize("bad", [0.5, np.asarray([0.0]), True, np.asarray([True]), "0",
                                 [[0]], None], ids=repr)
def test_non_integer_ids_are_rejected_not_truncated(bad):
  cache = filled()
  for call in (lambda: pk.lookup_kv(cache, bad, 0),
               lambda: pk.paged_attention(jnp.ones((1, 1, 1, 4)), cache, bad, 0),
               lambda: pk.free_sequences(cache, bad),
               lambda: pk.reserve(cache, bad, 1)):
    with pytest.raises(pk.CacheShapeError):
      call()


@pytest.mark.parametrize("layer", [1.7, np.float32(1.0), True, np.asarray([1])], ids=repr)
def test_non_integer_layer_is_rejected(layer):
  cache = filled()
  before = snapshot(cache)
  cache2, slots, _ = pk.reserve(cache, [0], 1, donate=False)
  for call in (lambda: pk.lookup_kv(cache, [0], layer),
               lambda: pk.paged_attention(jnp.ones((1, 1, 1, 4)), cache, [0], layer),
               lambda: pk.write_kv(cache2, slots, jnp.ones((1, 1, 1, 4)),
                                   jnp.ones((1, 1, 1, 4)), layer, donate=False)):
    with pytest.raises(pk.CacheShapeError):
      call()
  assert same(cache, before)


@pytest.mark.parametrize("count", [1.5, True, np.asarray([1.0]), 2**40, np.int64(-(2**33))],
                         ids=repr)
def test_non_integer_or_huge_counts_are_rejected(count):
  cache = filled()
  exc = pk.InvalidCountError if isinstance(count, int | np.integer) and not isinstance(
      count, bool) else pk.CacheShapeError
  with pytest.raises(exc):
    pk.truncate_sequences(cache, [0], count)
  with pytest.raises(exc):
    pk.reserve(cache, [0], count, max_new=2)


def test_wide_traced_ids_map_to_invalid_not_to_another_slot():
  """Under jit, a uint32 id past int32 gets INVALID_SLOT (it used to become padding, -1)."""
  cache = filled()
  fn = jax.jit(lambda c, ids: pk.free_sequences(c, ids))
  out, status = fn(cache, np.asarray([2**32 - 1, 1], np.uint32))
  assert list(np.asarray(status)) == [Status.INVALID_SLOT, 0]
  assert same(out, cache)
  k, _, lens = jax.jit(lambda c, ids: pk.lookup_kv(c, ids, 0))(
      cache, np.asarray([2**31 + 1, 0], np.uint32))
  assert list(np.asarray(lens)) == [0, 5]
  assert np.all(np.asarray(k)[0] == 0)


# ---------------------------------------------------------------------------------------------
# 2. write_kv writes only reserved slots


def _write(cache, slots, value=7.0, **kw):
  slots = np.asarray(slots, np.int32)
  kv = jnp.full((*slots.shape, 1, 4), value, jnp.float32)
  return pk.write_kv(cache, slots, kv, kv, 0, donate=False, **kw)


def test_negative_slot_never_writes_the_last_block():
  cfg = config()
  cache = pk.init_cache(cfg)
  # Fill the pool so that the last block belongs to a sequence.
  cache, _ = pk.allocate_sequences(cache, [0, 1, 2])
  k = jnp.ones((2, 3, 16, 1, 4))
  cache, _ = pk.append_kv(cache, k, k, [0, 1, 2], num_new=[16, 16, 12])
  last = cfg.num_blocks - 1
  assert last in np.asarray(cache.block_tables)
  before = snapshot(cache)
  for slot in (-1, -cfg.block_size, -(2**31)):
    with pytest.raises(pk.InvalidTokenSlotError, match=f"slots\\[0, 0\\]={slot}"):
      _write(cache, [[slot]])
    out, status = jax.jit(lambda c, s: pk.write_kv(c, s, jnp.zeros((1, 1, 1, 4)),
                                                   jnp.zeros((1, 1, 1, 4)), 0))(
        cache, np.asarray([[slot]], np.int32))
    assert list(np.asarray(status)) == [Status.INVALID_TOKEN_SLOT]
    assert same(out, before)


def test_unreserved_in_range_slots_are_rejected():
  cfg = config()
  cache = filled(cfg)
  cache, _ = pk.fork_sequence(cache, 1, 2)  # sequence 1's blocks are now shared with 2
  before = snapshot(cache)
  tables = np.asarray(cache.block_tables)
  refs = np.asarray(cache.allocator.ref_counts)
  bs = cfg.block_size
  own = tables[0, 0] * bs + 1  # sequence 0's first block: written only with seq_ids=[0]
  shared = tables[1, 0] * bs  # shared by 1 and 2
  free = int(np.flatnonzero(refs[1:] == 0)[0] + 1) * bs
  for slot in (0, 3, shared, free, cfg.num_blocks * bs + 1):  # null block, shared, free, past
    with pytest.raises(pk.InvalidTokenSlotError):
      _write(cache, [[slot]])
    with pytest.raises(pk.InvalidTokenSlotError):
      _write(cache, [[slot]], seq_ids=[0])
  # With seq_ids: another sequence's exclusively owned block, or past the row's length.
  with pytest.raises(pk.InvalidTokenSlotError):
    _write(cache, [[own]], seq_ids=[1])
  with pytest.raises(pk.InvalidTokenSlotError):
    _write(cache, [[tables[0, 1] * bs + 1]], seq_ids=[0])  # position 5 >= length 5
  with pytest.raises(pk.InvalidTokenSlotError, match="sequence 3"):  # inactive sequence
    _write(cache, [[own]], seq_ids=[3])
  assert same(cache, before)
  # The row's own reserved slot is written, and nothing else moves.
  out, status = _write(cache, [[own, cfg.num_blocks * bs]], seq_ids=[0])
  assert list(np.asarray(status)) == [0]
  want = np.asarray(before.k_pool).copy()
  want[0, :, tables[0, 0], 1] = 7.0
  np.testing.assert_array_equal(np.asarray(out.k_pool), want)


def test_reserve_then_write_with_seq_ids_round_trips():
  cache = filled()
  cache, slots, _ = pk.reserve(cache, [1, 0], [2, 1], max_new=2)
  kv = jnp.arange(16, dtype=jnp.float32).reshape(2, 2, 1, 4)
  for layer in range(2):
    cache, status = pk.write_kv(cache, slots, kv, -kv, layer, seq_ids=[1, 0])
    assert not np.any(np.asarray(status))
  k, v, lens = pk.lookup_kv(cache, [0, 1], 1)
  np.testing.assert_array_equal(np.asarray(lens), [6, 8])
  np.testing.assert_array_equal(np.asarray(k)[0, 5], np.asarray(kv)[1, 0])
  np.testing.assert_array_equal(np.asarray(k)[1, 6:8], np.asarray(kv)[0])
  np.testing.assert_array_equal(np.asarray(v)[1, 6:8], -np.asarray(kv)[0])


# ---------------------------------------------------------------------------------------------
# 3. fork one parent into several children


@pytest.mark.parametrize("strategy", [pk.CacheStrategy.PAGED, pk.CacheStrategy.CONTIGUOUS])
def test_fork_one_parent_into_several_children(strategy):
  cfg = config(num_blocks=1 + 4 * 8, strategy=strategy)
  cache = filled(cfg)
  k0, v0, _ = pk.lookup_kv(cache, [0], 1)
  cache, status = pk.fork_sequence(cache, [0, 0], [2, 3])
  assert list(np.asarray(status)) == [0, 0]
  assert bool(pk.check_invariants(cache).ok)
  k, v, lens = pk.lookup_kv(cache, [0, 2, 3], 1)
  assert list(np.asarray(lens)) == [5, 5, 5]
  for r in range(3):
    np.testing.assert_array_equal(np.asarray(k)[r], np.asarray(k0)[0])
  if strategy is pk.CacheStrategy.PAGED:
    first = np.asarray(cache.block_tables)[0, 0]
    assert np.asarray(cache.allocator.ref_counts)[first] == 3
  # Each child writes into the shared partial block: three private copies, parent intact.
  cache, _ = pk.append_kv(cache, jnp.full((2, 3, 1, 1, 4), 9.0), jnp.full((2, 3, 1, 1, 4), 9.0),
                          [0, 2, 3])
  assert bool(pk.check_invariants(cache).ok)
  k, _, _ = pk.lookup_kv(cache, [0, 2, 3], 1)
  np.testing.assert_array_equal(np.asarray(k)[:, :5], np.asarray(k0)[:, :5].repeat(3, 0))
  assert np.all(np.asarray(k)[:, 5] == 9.0)
  cache, _ = pk.free_sequences(cache, [0, 1, 2, 3])
  assert int(cache.allocator.num_free) == (cfg.usable_blocks if strategy is
                                           pk.CacheStrategy.PAGED else 0)


def test_fork_errors_name_the_id_at_fault():
  cache = filled()
  with pytest.raises(pk.DuplicateSlotError, match=r"row 1, sequence 2\).*child 2"):
    pk.fork_sequence(cache, [0, 1], [2, 2])
  with pytest.raises(pk.InactiveSlotError, match=r"row 0, sequence 3\).*parent 3 is not"):
    pk.fork_sequence(cache, [3], [2])
  with pytest.raises(pk.SlotInUseError, match=r"row 0, sequence 1\).*child 1 is already"):
    pk.fork_sequence(cache, [0], [1])
  with pytest.raises(pk.InvalidSlotError, match=r"parent 7, child 2"):
    pk.fork_sequence(cache, [7], [2])
  with pytest.raises(pk.InvalidSlotError, match=r"parent -1, child 2"):
    pk.fork_sequence(cache, [-1], [2])


# ---------------------------------------------------------------------------------------------
# exhaustion rule and message


def test_healthy_rows_do_not_report_exhaustion_when_another_row_fails():
  cache = filled()  # 7 of 11 usable blocks free
  k = jnp.ones((2, 3, 24, 1, 4))
  # Row 0 is inactive; rows 1 and 2 would need 12 blocks together: still only row 0 reports.
  fn = jax.jit(lambda c, ids: pk.append_kv(c, k, k, ids))
  cache2, _ = pk.allocate_sequences(cache, [2], donate=False)
  out, status = fn(cache2, jnp.asarray([3, 1, 2]))
  assert list(np.asarray(status)) == [Status.INACTIVE_SLOT, 0, 0]
  assert int(out.telemetry.failed_allocations) == int(cache2.telemetry.failed_allocations)
  # The same batch without the bad row runs the pool dry: every row that needed a block says so.
  out, status = jax.jit(lambda c, ids: pk.append_kv(c, k[:, 1:], k[:, 1:], ids))(
      cache2, jnp.asarray([1, 2]))
  assert list(np.asarray(status)) == [Status.POOL_EXHAUSTED] * 2
  with pytest.raises(pk.PoolExhaustedError, match="needs 12 new blocks, 7 are free"):
    pk.append_kv(cache2, k[:, 1:], k[:, 1:], [1, 2])


def test_lookup_rejects_a_negative_max_len():
  cache = filled()
  for bad in (-1, 2.0, True):
    with pytest.raises(pk.CacheShapeError, match="max_len"):
      pk.lookup_kv(cache, [0], 0, max_len=bad)


# ---------------------------------------------------------------------------------------------
# checking mode


def _bad_calls(cache):
  """(name, fn(cache, ids) run under jit) pairs that fail for the given ids."""
  k = jnp.ones((2, 1, 1, 1, 4))
  return {
      "append_kv": lambda c, ids: pk.append_kv(c, k, k, ids),
      "free_sequences": lambda c, ids: pk.free_sequences(c, ids),
      "truncate_sequences": lambda c, ids: pk.truncate_sequences(c, ids, 6),
      "fork_sequence": lambda c, ids: pk.fork_sequence(c, ids, ids + 2),
      "lookup_kv": lambda c, ids: pk.lookup_kv(c, ids, 0)[0],
      "paged_attention": lambda c, ids: pk.paged_attention(jnp.ones((1, 1, 1, 4)), c, ids, 0),
  }


@pytest.mark.parametrize("name", ["append_kv", "free_sequences", "truncate_sequences",
                                  "fork_sequence", "lookup_kv", "paged_attention"])
@pytest.mark.parametrize("ids", [[3], [9], [0]])
def test_checking_mode_raises_inside_jit_with_the_eager_message(name, ids):
  cache = filled()
  fn = _bad_calls(cache)[name]
  ids_arr = jnp.asarray(ids, jnp.int32)
  try:
    fn(jax.tree_util.tree_map(jnp.copy, cache), ids_arr)  # eager (donates its copy)
    eager = None
  except pk.PagedKVCacheError as e:
    eager = e
  # Slot 3 is inactive and 9 out of range for every op; slot 0 is valid, but truncating it by
  # 6 tokens (more than its 5) is not.
  want = {3: pk.InactiveSlotError, 9: pk.InvalidSlotError}.get(ids[0])
  if name == "truncate_sequences" and ids == [0]:
    want = pk.InvalidCountError
  assert type(eager) is (type(None) if want is None else want), eager
  checked = pk.checked(fn)
  if eager is None:
    out = checked(cache, ids_arr)
    ref = jax.jit(fn)(cache, ids_arr)
    assert all(np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True) for a, b in zip(
        jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref), strict=True))
    return
  with pytest.raises(type(eager)) as info:
    checked(cache, ids_arr)
  assert str(info.value) == str(eager)
  assert info.value.status == eager.status


def test_checking_mode_reports_exhaustion_with_counts_and_broken_invariants():
  cache = filled()
  k = jnp.ones((2, 2, 24, 1, 4))
  fn = pk.checked(lambda c: pk.append_kv(c, k, k, jnp.asarray([0, 1])))
  with pytest.raises(pk.PoolExhaustedError, match="needs 12 new blocks, 7 are free"):
    fn(cache)
  # A cache whose reference counts were corrupted by hand: checking mode names the invariant.
  broken = cache.replace(allocator=cache.allocator.__class__(
      cache.allocator.free_stack, cache.allocator.num_free,
      cache.allocator.ref_counts.at[1].add(1)))
  with pytest.raises(pk.CacheInvariantError, match="ref_counts_match_tables"):
    pk.checked(lambda c: pk.free_sequences(c, jnp.asarray([1])))(broken)
  with pk.checking(), pytest.raises(pk.CacheInvariantError, match="ref_counts_match_tables"):
    pk.free_sequences(broken, [1], donate=False)


def test_checking_mode_is_the_outermost_transform():
  """``checked(vmap(fn))`` raises the failing member's eager exception; ``vmap(checked(fn))``
  (or under jit) is refused with the fix, not a tracer error from inside."""
  caches = jax.tree_util.tree_map(lambda x: jnp.stack([x, x]), filled())
  k = jnp.ones((2, 2, 1, 1, 4))  # [layers, batch, T, kv_heads, head_dim]
  append = lambda c, n: pk.append_kv(c, k, k, jnp.asarray([0, 1]), num_new=n)  # noqa: E731
  ok = pk.checked(jax.vmap(append))(caches, jnp.asarray([[1, 1], [1, 1]]))
  want = jax.vmap(append)(caches, jnp.asarray([[1, 1], [1, 1]]))
  jax.tree_util.tree_map(np.testing.assert_array_equal, ok, want)
  with pytest.raises(pk.InvalidCountError, match="row 1, sequence 1"):
    pk.checked(jax.vmap(append))(caches, jnp.asarray([[1, 1], [1, 9]]))
  for outer in (jax.vmap, jax.jit):
    with pytest.raises(TypeError, match=r"pk.checked\(jax.vmap\(fn\)\)"):
      outer(pk.checked(append))(caches, jnp.asarray([[1, 1], [1, 1]]))


def test_default_path_has_no_callback_or_check():
  """The fast path's program has no host callback and no checkify check."""
  cache = filled()
  q = jnp.ones((2, 1, 1, 4))
  k = jnp.ones((2, 2, 1, 1, 4))

  def step(c, ids):
    c, st1 = pk.append_kv(c, k, k, ids)
    c, slots, st2 = pk.reserve(c, ids, 1)
    c, st3 = pk.write_kv(c, slots, k[0], k[0], 1, seq_ids=ids)
    out = pk.paged_attention(q, c, ids, 1)
    kk, _, _ = pk.lookup_kv(c, ids, 0)
    c, st4 = pk.fork_sequence(c, ids[:1], ids[:1] + 2)
    c, st5 = pk.truncate_sequences(c, ids, 1)
    c, st6 = pk.free_sequences(c, ids)
    return c, out, kk, st1, st2, st3, st4, st5, st6

  text = str(jax.make_jaxpr(step)(cache, jnp.asarray([0, 1])))
  for word in ("callback", "check", "debug"):
    assert word not in text
  with pk.checking():
    checked_text = str(jax.make_jaxpr(checkify.checkify(step))(cache, jnp.asarray([0, 1])))
  assert "check" in checked_text or "cond" in checked_text  # the checks are really there


# ---------------------------------------------------------------------------------------------
# isolation property: unowned memory and masked positions cannot change any output

import hypothesis.strategies as st  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402

# Geometry every kernel takes (the GPU kernel wants head_dim >= 16, the TPU one 8-token pages).
ISO_CFG = pk.CacheConfig(num_layers=1, num_kv_heads=2, head_dim=16, num_blocks=16, max_seqs=5,
                         max_seq_len=48, block_size=8)
_iso_append = jax.jit(lambda c, k, v, ids, n: pk.append_kv(c, k, v, ids, num_new=n))
_iso_fork = jax.jit(pk.fork_sequence)
_iso_trunc = jax.jit(pk.truncate_sequences)
_iso_free = jax.jit(pk.free_sequences)


def _workload(rng, steps):
  """A random history of appends, forks, truncations and frees (bad calls included)."""
  cache = pk.init_cache(ISO_CFG)
  cache, _ = pk.allocate_sequences(cache, [0, 1, 2])
  for _ in range(steps):
    op = rng.integers(4)
    ids = jnp.asarray(rng.choice(ISO_CFG.max_seqs, 2, replace=False), jnp.int32)
    if op == 0:
      shape = (1, 2, 6, 2, 16)
      cache, _ = _iso_append(cache, jnp.asarray(rng.standard_normal(shape), jnp.float32),
                             jnp.asarray(rng.standard_normal(shape), jnp.float32), ids,
                             jnp.asarray(rng.integers(0, 7, 2), jnp.int32))
    elif op == 1:
      cache, _ = _iso_fork(cache, ids[0], ids[1])
    elif op == 2:
      cache, _ = _iso_trunc(cache, ids[:1], jnp.int32(rng.integers(0, 5)))
    else:
      cache, _ = _iso_free(cache, ids[:1])
  return cache


def _with_unowned(cache, value):
  """``cache`` with every unowned token slot (free blocks, the null block, the tail of each
  sequence's last block past its length) set to ``value`` in both pools."""
  cfg = cache.config
  owned = np.zeros((cfg.num_blocks, cfg.block_size), bool)
  tables, lens = np.asarray(cache.block_tables), np.asarray(cache.seq_lens)
  for s in np.flatnonzero(np.asarray(cache.active)):
    for p in range(lens[s]):
      owned[tables[s, p // cfg.block_size], p % cfg.block_size] = True
  mask = jnp.asarray(owned)[None, None, :, :, None]
  return cache.replace(k_pool=jnp.where(mask, cache.k_pool, value),
                       v_pool=jnp.where(mask, cache.v_pool, value))


@functools.cache
def _read_fn(window, implementation):
  """One jitted read per (window, implementation), so each compiles once for the whole test."""
  kw = {"interpret": True} if implementation != "xla" else {}

  def read(cache, q, ids, q_lens):
    k, v, _ = pk.lookup_kv(cache, ids, 0)
    out = pk.paged_attention(q, cache, ids, 0, q_lens=q_lens, sliding_window=window,
                             implementation=implementation, **kw)
    return k, v, out

  return jax.jit(read)


def _reads(cache, q, ids, q_lens, window, implementation):
  """lookup_kv and paged_attention of every slot, under jit (inactive rows read as empty)."""
  return tuple(np.asarray(x) for x in _read_fn(window, implementation)(cache, q, ids, q_lens))


@pytest.mark.parametrize("implementation", ["xla", "pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("window", [None, 3, 6])
@settings(max_examples=1, deadline=None, derandomize=True,  # 9 cases: one per combination
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(seed=st.integers(0, 2**16))
def test_unowned_memory_and_masked_v_never_reach_an_output(seed, window, implementation):
  rng = np.random.default_rng(seed)
  cache = _workload(rng, 12)
  ids = jnp.arange(ISO_CFG.max_seqs, dtype=jnp.int32)
  lens = np.asarray(cache.seq_lens) * np.asarray(cache.active)
  q_len = 4
  q_lens = jnp.asarray(np.minimum(lens, q_len), jnp.int32)
  q = jnp.asarray(rng.standard_normal((ISO_CFG.max_seqs, q_len, 4, 16)), jnp.float32)
  clean = _reads(_with_unowned(cache, 0.0), q, ids, q_lens, window, implementation)
  poisoned = _reads(_with_unowned(cache, jnp.nan), q, ids, q_lens, window, implementation)
  for a, b in zip(clean, poisoned, strict=True):
    np.testing.assert_array_equal(a, b)
  assert np.all(np.isfinite(clean[2]))
  # A sequence's own V poisoned at a position some of its chunk's queries cannot see (later
  # in the chunk, or before their window): those queries are unchanged, and so is everyone else.
  # A row whose last token's block no fork shares (poisoning a shared block would change the
  # other sequence's data); a workload without one is redrawn, never silently passed.
  tables = np.asarray(cache.block_tables)
  refs = np.asarray(cache.allocator.ref_counts)
  live = [s for s in range(ISO_CFG.max_seqs)
          if lens[s] >= 2 and refs[tables[s, (lens[s] - 1) // ISO_CFG.block_size]] == 1]
  assume(live)
  s = int(rng.choice(live))
  p = int(lens[s]) - 1  # the chunk's last token: queries before it cannot see it
  blk, off = tables[s, p // ISO_CFG.block_size], p % ISO_CFG.block_size
  bad = cache.replace(v_pool=cache.v_pool.at[0, :, blk, off].set(jnp.nan))
  ref = _reads(cache, q, ids, q_lens, window, implementation)[2]
  got = _reads(bad, q, ids, q_lens, window, implementation)[2]
  n_q = int(q_lens[s])
  blind = np.ones(ref.shape[:2], bool)
  blind[s, n_q - 1] = False  # only the last query of row s sees position p
  # Not bitwise: a visible non-finite V sends the whole call down the exact slow path (see
  # reference.py), which sums in another order; the blind queries must still equal the clean
  # result to float32 rounding, and be finite.
  assert np.all(np.isfinite(got[blind]))
  np.testing.assert_allclose(got[blind], ref[blind], rtol=1e-5, atol=1e-6)
  assert np.all(np.isnan(got[s, n_q - 1]))
