"""free_outside_window: sliding-window block freeing and attention sinks (issue 13).

Oracles: a plain-Python model of which blocks a window frees and of the allocator's counts,
float64 NumPy attention over exactly the kept keys (holes' data never enters it), and the same
cache before the free (attention within the window must not change).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from jax_paged_kv.cache.config import CacheStrategy
from jax_paged_kv.cache.errors import Status
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import (
    DecodeState,
    SamplingParams,
    decode_loop,
    make_key,
    prefill_step,
)
from tests.attention_cases import TOLERANCES, Case, build_case
from tests.llama_fixtures import SMALL
from tests.llama_reference import reference_greedy, reference_logits
from tests.oracle import attention_np


def _cache(strategy=CacheStrategy.PAGED, num_blocks=64, max_seqs=3, bs=4, max_len=96,
           dtype=jnp.float32):
  cfg = pk.CacheConfig(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=num_blocks,
                       max_seqs=max_seqs, max_seq_len=max_len, block_size=bs, dtype=dtype,
                       strategy=strategy)
  return pk.init_cache(cfg)


def _fill(cache, lengths, seed=0):
  """Allocates one sequence per length and appends random K/V; returns (cache, k, v) with the
  appended values ``[layers, batch, max_len, kv_heads, head_dim]`` (float64 copies)."""
  cfg = cache.config
  rng = np.random.default_rng(seed)
  ids = jnp.arange(len(lengths), dtype=jnp.int32)
  cache, _ = pk.allocate_sequences(cache, ids)
  t = max(lengths)
  k = rng.standard_normal((cfg.num_layers, len(lengths), t, cfg.num_kv_heads, cfg.head_dim))
  v = rng.standard_normal(k.shape)
  cache, _ = pk.append_kv(cache, jnp.asarray(k, cfg.dtype), jnp.asarray(v, cfg.dtype), ids,
                          num_new=jnp.asarray(lengths, jnp.int32))
  return cache, k, v


def _model_freed(length, bs, window, sink_tokens, already=()):
  """Blocks a window frees: every key of the block is at or below length - 1 - window, and the
  block holds no sink token."""
  return [j for j in range(-(-length // bs))
          if (j + 1) * bs <= length - window and j >= -(-sink_tokens // bs) and j not in already]


def _assert_invariants(cache):
  report = pk.check_invariants(cache)
  assert bool(report.ok), report.failures()


@pytest.mark.parametrize("window, sink_tokens", [
    (8, 0), (12, 4), pytest.param(5, 0, marks=pytest.mark.slow),
    pytest.param(1, 0, marks=pytest.mark.slow), pytest.param(9, 6, marks=pytest.mark.slow)])
def test_frees_exactly_the_blocks_no_future_query_sees(window, sink_tokens):
  lengths = [37, 6, 20]
  cache, k, v = _fill(_cache(), lengths)
  before = np.asarray(cache.block_tables)
  free_before = int(cache.allocator.num_free)
  cache, freed, status = pk.free_outside_window(cache, jnp.arange(3), window=window,
                                                sink_tokens=sink_tokens)
  assert np.all(np.asarray(status) == 0)
  tables = np.asarray(cache.block_tables)
  want_total = 0
  for r, n in enumerate(lengths):
    gone = _model_freed(n, 4, window, sink_tokens)
    want_total += len(gone)
    assert int(freed[r]) == len(gone)
    for j in range(before.shape[1]):
      assert tables[r, j] == (0 if j in gone else before[r, j]), (r, j)
  assert int(cache.allocator.num_free) == free_before + want_total
  assert np.all(np.asarray(cache.seq_lens) == lengths)  # positions do not move
  _assert_invariants(cache)
  # lookup_kv: the kept tokens as written, zeros in the holes.
  for layer in range(2):
    got_k, got_v, lens = pk.lookup_kv(cache, jnp.arange(3), layer, max_len=40)
    for r, n in enumerate(lengths):
      gone = _model_freed(n, 4, window, sink_tokens)
      for p in range(n):
        want = 0.0 if p // 4 in gone else k[layer, r, p]
        np.testing.assert_allclose(np.asarray(got_k[r, p]), want, rtol=1e-6, atol=0)
  # A second call frees nothing more.
  cache, freed2, _ = pk.free_outside_window(cache, jnp.arange(3), window=window,
                                            sink_tokens=sink_tokens)
  assert np.all(np.asarray(freed2) == 0)
  _assert_invariants(cache)
  # A smaller window frees more (against the model), never a kept sink block.
  tables = np.asarray(cache.block_tables).copy()
  cache, freed3, _ = pk.free_outside_window(cache, jnp.arange(3), window=max(window // 2, 1),
                                            sink_tokens=sink_tokens)
  for r, n in enumerate(lengths):
    gone_now = set(_model_freed(n, 4, max(window // 2, 1), sink_tokens))
    gone_before = set(_model_freed(n, 4, window, sink_tokens))
    assert int(freed3[r]) == len(gone_now - gone_before), r
    for j in range(-(-n // 4)):
      assert (np.asarray(cache.block_tables)[r, j] == 0) == (j in gone_now), (r, j)
      if j < -(-sink_tokens // 4):
        assert np.asarray(cache.block_tables)[r, j] == tables[r, j] != 0  # sinks kept
  _assert_invariants(cache)


def test_a_long_generation_holds_o_of_the_window():
  """Token by token, freeing after each step: the held blocks stay at ceil(window / bs) + 1
  (+ sink blocks), against a Python model of the allocator's free count."""
  bs, window, sinks = 4, 10, 3
  cache = _cache(num_blocks=12, max_seqs=1, max_len=400)  # 11 usable blocks for 400 tokens
  cache, _ = pk.allocate_sequences(cache, jnp.array([0]))
  rng = np.random.default_rng(1)
  model_held = set()
  for n in range(1, 301):
    x = jnp.asarray(rng.standard_normal((2, 1, 1, 2, 8)), jnp.float32)
    cache, _ = pk.append_kv(cache, x, x, jnp.array([0]))
    model_held.add((n - 1) // bs)
    cache, freed, _ = pk.free_outside_window(cache, jnp.array([0]), window=window,
                                             sink_tokens=sinks)
    gone = set(_model_freed(n, bs, window, sinks)) & model_held
    model_held -= gone
    assert int(freed[0]) == len(gone)
    assert int(cache.allocator.num_free) == 11 - len(model_held)
    assert len(model_held) <= -(-window // bs) + 1 + -(-sinks // bs)
  _assert_invariants(cache)
  cache, _ = pk.free_sequences(cache, jnp.array([0]))
  assert int(cache.allocator.num_free) == 11
  _assert_invariants(cache)


def test_fork_truncate_and_free_keep_the_counts_right():
  cache, _, _ = _fill(_cache(), [30, 9])
  cache, _, _ = pk.free_outside_window(cache, jnp.array([0]), window=8)  # frees blocks 0..4
  parent = np.asarray(cache.block_tables[0])
  assert list(parent[:8]) == [0] * 5 + list(parent[5:8]) and all(parent[5:8] > 0)
  cache, _ = pk.fork_sequence(cache, 0, 2)
  np.testing.assert_array_equal(np.asarray(cache.block_tables[2]), parent)
  refs = np.asarray(cache.allocator.ref_counts)
  assert all(refs[b] == 2 for b in parent[5:8])
  _assert_invariants(cache)
  # Truncating into a hole would leave the last block gone: refused, nothing changes.
  with pytest.raises(pk.FreedBlockError, match="freed"):
    pk.truncate_sequences(cache, jnp.array([2]), 12, donate=False)
  same, status = jax.jit(pk.truncate_sequences)(cache, jnp.array([2]), jnp.array([12]))
  assert int(status[0]) == Status.FREED_BLOCK
  for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(cache),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # 30 -> 24 tokens keeps the last block, but the window of position 24 (keys > 16) reaches
  # into block 4 (keys 16..19), which is gone: refused with or without the window.
  for window in (None, 8):
    with pytest.raises(pk.FreedBlockError, match="hole"):
      pk.truncate_sequences(cache, jnp.array([2]), 6, window=window, donate=False)
  # 30 -> 28 with the window: every hole ends at or before 28 - 8. Without it: unverifiable.
  with pytest.raises(pk.FreedBlockError, match="pass window="):
    pk.truncate_sequences(cache, jnp.array([2]), 2, donate=False)
  # Truncating within the kept blocks works and frees the child's emptied shared block once.
  cache, _ = pk.truncate_sequences(cache, jnp.array([2]), 2, window=8)  # drops block 7
  refs = np.asarray(cache.allocator.ref_counts)
  assert refs[parent[7]] == 1 and refs[parent[5]] == 2
  _assert_invariants(cache)
  free_before = int(cache.allocator.num_free)
  cache, _ = pk.free_sequences(cache, jnp.array([0, 1, 2]))
  assert int(cache.allocator.num_free) == free_before + 3 + 3  # parent's 3 + row 1's 3 blocks
  assert int(cache.allocator.num_free) == cache.config.num_blocks - 1
  _assert_invariants(cache)


def test_bad_input_is_refused_and_changes_nothing():
  cache, _, _ = _fill(_cache(), [20, 8])
  with pytest.raises(pk.CacheShapeError, match="window"):
    pk.free_outside_window(cache, jnp.array([0]), window=0)
  with pytest.raises(pk.CacheShapeError, match="sink_tokens"):
    pk.free_outside_window(cache, jnp.array([0]), window=4, sink_tokens=-1)
  with pytest.raises(pk.InactiveSlotError):
    pk.free_outside_window(cache, jnp.array([0, 2]), window=4, donate=False)
  with pytest.raises(pk.DuplicateSlotError):
    pk.free_outside_window(cache, jnp.array([0, 0]), window=4, donate=False)
  fn = jax.jit(lambda c, ids: pk.free_outside_window(c, ids, window=4))
  out, freed, status = fn(cache, jnp.array([0, 2]))
  assert int(status[1]) == Status.INACTIVE_SLOT and np.all(np.asarray(freed) == 0)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(cache), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  contiguous, _, _ = _fill(_cache(CacheStrategy.CONTIGUOUS, num_blocks=1 + 3 * 24), [20])
  with pytest.raises(pk.CacheShapeError, match="PAGED"):
    pk.free_outside_window(contiguous, jnp.array([0]), window=4)


@pytest.mark.parametrize("kv_quant", [None, "int8"])
def test_swap_moves_only_the_held_blocks_and_restores_the_holes(kv_quant):
  """A window-evicted sequence swaps out only the blocks it holds and comes back with the same
  holes, bitwise (oracle: the cache before the swap, read by lookup_kv and by the pools)."""
  cfg = dataclasses.replace(_cache().config, kv_quant=kv_quant)
  cache, _, _ = _fill(pk.init_cache(cfg), [37, 9])
  cache, _, _ = pk.free_outside_window(cache, jnp.array([0, 1]), window=8, sink_tokens=5)
  table = np.asarray(cache.block_tables[0])
  held = [j for j in range(10) if table[j] != 0]
  assert held == [0, 1, 7, 8, 9]  # sinks 0-1 (5 tokens), window: blocks with keys >= 28
  k0, v0, _ = pk.lookup_kv(cache, jnp.array([0]), 1)
  pools0 = {n: np.asarray(getattr(cache, n))[:, :, table[held]]
            for n in ("k_pool", "v_pool", "k_scale", "v_scale") if getattr(cache, n) is not None}
  free0 = int(cache.allocator.num_free)

  cache, sw = pk.swap_out(cache, 0)
  assert (sw.num_blocks, sw.width, sw.seq_len) == (5, 8, 37)
  assert sw.positions.tolist() == held
  assert int(cache.allocator.num_free) == free0 + 5
  _assert_invariants(cache)
  # The freed blocks change hands, then the sequence comes back in another slot.
  cache, _ = pk.allocate_sequences(cache, jnp.array([0]))
  x = jnp.ones((cfg.num_layers, 1, 6, cfg.num_kv_heads, cfg.head_dim), cfg.dtype)
  cache, _ = pk.append_kv(cache, x, -x, jnp.array([0]))
  cache, status = pk.swap_in(cache, 2, sw)
  assert not np.any(np.asarray(status))
  _assert_invariants(cache)
  new = np.asarray(cache.block_tables[2])
  assert [j for j in range(cfg.max_blocks_per_seq) if new[j] != 0] == held
  assert int(cache.seq_lens[2]) == 37 and int(cache.allocator.num_free) == free0 - 2
  for n, x in pools0.items():
    np.testing.assert_array_equal(np.asarray(getattr(cache, n))[:, :, new[held]], x)
  k2, v2, _ = pk.lookup_kv(cache, jnp.array([2]), 1)
  np.testing.assert_array_equal(np.asarray(k2), np.asarray(k0))
  np.testing.assert_array_equal(np.asarray(v2), np.asarray(v0))

  # Positions that do not describe a sequence are refused; under jit nothing changes.
  cache, _ = pk.free_sequences(cache, jnp.array([2]))
  for positions in ([0, 1, 7, 8, 10], [0, 1, 8, 7, 9], [0, 1, 7, 8, 8]):  # last block a hole,
    bad = dataclasses.replace(sw, positions=np.asarray(positions, np.int32))  # out of order
    with pytest.raises(pk.InvalidCountError):
      pk.swap_in(cache, 2, bad, donate=False)
    data = {n: jnp.asarray(x) for n, x in bad.blocks.items()}
    pos = jnp.asarray(positions + [-1] * 3, jnp.int32)
    out, status = jax.jit(pk.cache.swap._swap_in_impl)(cache, jnp.array([2]), jnp.array([37]),
                                                       data, pos)
    assert int(status[0]) == Status.INVALID_COUNT
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(cache),
                    strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# Attention reads exactly the kept keys, in every implementation.


def _implementations():
  out = [pytest.param("xla", {}, "float32", id="xla"),
         pytest.param("pallas_gpu", {"interpret": True}, "float32", id="pallas_gpu")]
  try:
    from jax.experimental.pallas import tpu as pltpu
    out.append(pytest.param("pallas_tpu", {"interpret": pltpu.InterpretParams(
        out_of_bounds_reads="raise", uninitialized_memory="nan")}, "float32", id="pallas_tpu",
        marks=pytest.mark.slow))
  except ImportError:  # pragma: no cover - depends on the installed jax
    pass
  out.append(pytest.param("pallas_mgpu", {"interpret": True}, "bfloat16", id="pallas_mgpu",
                          marks=pytest.mark.slow))
  return out


@pytest.mark.parametrize("implementation, knobs, dtype", _implementations())
@pytest.mark.parametrize("q_len", [1, 5])
def test_attention_sees_exactly_the_kept_keys(implementation, knobs, dtype, q_len):
  """Sinks + holes inside full attention's range: the freed blocks' data (and the null block,
  NaN here) never reach an output."""
  _check_kept_keys(implementation, knobs, dtype, q_len, (150, 70, 9),
                   {0: [2, 3, 4, 6], 1: [1, 2]})  # row 2 keeps everything


@pytest.mark.parametrize("implementation, knobs, dtype", [  # without their slow marks
    pytest.param(*p.values, id=p.id) for p in _implementations()
    if p.id in ("pallas_tpu", "pallas_mgpu")])
def test_the_slow_kernels_mask_holes_in_a_small_case(implementation, knobs, dtype):
  """The TPU and Mosaic GPU kernels' hole masks on every CI run (their full cases are slow)."""
  _check_kept_keys(implementation, {**knobs}, dtype, 1, (48, 20), {0: [1]})


def _check_kept_keys(implementation, knobs, dtype, q_len, lengths, holes):
  bs = 8 if implementation == "pallas_tpu" else 16
  case = Case(lengths, block_size=bs, ratio=2, head_dim=64, q_len=q_len, dtype=dtype)
  cache, q, seq_ids, q_lens, layer = build_case(case)
  tables = np.asarray(cache.block_tables)
  kept = tables > 0
  holes = {r: [j * 16 // bs for j in js] for r, js in holes.items()}
  holed = tables.copy()
  for r, js in holes.items():
    for j in js:
      holed[r, j] = 0
      kept[r, j] = False
  cache = cache.replace(block_tables=jnp.asarray(holed))
  out = pk.paged_attention(q, cache, seq_ids, layer, q_lens=q_lens,
                           implementation=implementation, **knobs)
  want, _ = attention_np(q, cache.k_pool, cache.v_pool, layer, tables,
                         np.asarray(cache.seq_lens), q_lens, scale=case.head_dim ** -0.5,
                         kept=kept)
  atol, rtol = TOLERANCES[jnp.dtype(dtype)]
  got = np.asarray(out, np.float64)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=atol, rtol=rtol)


def test_attention_within_the_window_is_unchanged_by_the_free():
  cache, _, _ = _fill(_cache(max_len=96), [60, 33, 5])
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((3, 1, 4, 8)), jnp.float32)
  ids = jnp.arange(3)
  before = [pk.paged_attention(q, cache, ids, layer, sliding_window=12) for layer in range(2)]
  cache, freed, _ = pk.free_outside_window(cache, ids, window=12)
  assert int(freed.sum()) > 0
  for layer in range(2):
    after = pk.paged_attention(q, cache, ids, layer, sliding_window=12)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before[layer]), rtol=1e-6,
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------
# In the decode loop: exact for a sliding-window model, StreamingLLM for a full-attention one.


def _generate_with_eviction(model, params, prompts, steps, evict, bs=4):
  """Prefill every prompt, then ``steps`` one-step decode loops; returns (tokens per row, peak
  blocks held per row)."""
  n = len(prompts)
  cfg = model.cache_config(num_blocks=80, max_seqs=n, max_seq_len=96, block_size=bs)
  cache = pk.init_cache(cfg)
  ids = np.arange(n, dtype=np.int32)
  cache, _ = pk.allocate_sequences(cache, ids)
  t = max(len(p) for p in prompts)
  toks = np.zeros((n, t), np.int32)
  for i, p in enumerate(prompts):
    toks[i, :len(p)] = p
  num = np.asarray([len(p) for p in prompts], np.int32)
  zeros = np.zeros(n, np.float32)
  cache, first, _, status = prefill_step(
      params, cache, toks, ids, num, zeros, np.zeros(n, np.int32), np.ones(n, np.float32),
      np.stack([make_key(0)] * n), np.zeros(n, np.int32), model=model)
  assert not np.any(np.asarray(status))
  state = DecodeState.create([int(x) for x in first], list(ids),
                             [SamplingParams(max_new_tokens=steps + 1)] * n)
  outs = [[int(x)] for x in first]
  peak = [0] * n
  for _ in range(steps):
    cache, state, out, done, status = decode_loop(params, cache, state, np.int32(1),
                                                  max_steps=1, model=model, evict=evict)
    assert not np.any(np.asarray(status)) and int(done) == 1
    for i in range(n):
      outs[i].append(int(out[i, 0]))
    tables, lens = np.asarray(cache.block_tables), np.asarray(cache.seq_lens)
    for i in range(n):
      peak[i] = max(peak[i], int(np.sum(tables[i, :-(-lens[i] // bs)] > 0)))
  _assert_invariants(cache)
  return outs, peak


@pytest.mark.slow  # the engine test below covers decode_loop(evict=...) by default
def test_sliding_window_model_generates_the_same_tokens_in_o_of_the_window():
  model = dataclasses.replace(SMALL, sliding_window=8)
  params = init_params(model, jax.random.PRNGKey(3), scale=2.0)
  prompts = [[5, 17, 99, 3, 42, 7, 8, 120, 64, 1, 2], [9, 9, 31, 4, 77]]
  outs, peak = _generate_with_eviction(model, params, prompts, 30, evict=(8, 0))
  for p, o in zip(prompts, outs, strict=True):
    assert o == reference_greedy(params, model, p, 31)  # float64 recomputation, no cache
  assert max(peak) <= -(-8 // 4) + 1  # the window's blocks plus the one being filled


@pytest.mark.parametrize("steps", [18, pytest.param(40, marks=pytest.mark.slow)])
def test_attention_sinks_match_a_float64_model_that_sees_the_same_keys(steps):
  """StreamingLLM on a full-attention model: each query sees its sink blocks and the blocks
  the window had not yet freed when it ran; a float64 recomputation with that mask (per query
  position) must give the same greedy tokens, and the held blocks stay bounded. (18 steps:
  both rows have freed blocks by the end.)"""
  params = init_params(SMALL, jax.random.PRNGKey(4), scale=2.0)
  bs, window, sinks = 4, 12, 4
  prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [27, 18, 28, 18]]
  outs, peak = _generate_with_eviction(SMALL, params, prompts, steps, evict=(window, sinks))
  assert max(peak) <= -(-window // bs) + 1 + -(-sinks // bs)
  for prompt, got in zip(prompts, outs, strict=True):
    P = len(prompt)
    seq = list(prompt) + [got[0]]
    for s in range(steps):
      S = len(seq)
      qi, ki = np.arange(S)[:, None], np.arange(S)[None, :]
      # Query q > P ran after the free at length q: blocks with (j + 1) * bs <= q - window
      # were gone, except the sink blocks; queries up to P saw everything.
      keep = (qi <= P) | (ki < -(-sinks // bs) * bs) | ((ki // bs + 1) * bs > qi - window)
      tok = int(np.argmax(reference_logits(params, SMALL, seq, keep=keep)[-1]))
      assert tok == got[s + 1], (prompt, s)
      seq.append(tok)
    assert not keep[-1].all()  # the last queries did not see every key


def test_invariants_allow_holes_but_not_a_missing_last_block():
  cache, _, _ = _fill(_cache(), [20, 9])
  holed, _, _ = pk.free_outside_window(cache, jnp.array([0]), window=4, donate=False)
  _assert_invariants(holed)
  # A null last block (or a hole in a sequence's table with its count still held) is corrupt.
  tables = np.asarray(holed.block_tables).copy()
  last = tables[0, 4]
  tables[0, 4] = 0
  bad = holed.replace(block_tables=jnp.asarray(tables))
  assert "tables_match_lengths" in pk.check_invariants(bad).failures()
  assert "ref_counts_match_tables" in pk.check_invariants(bad).failures()
  tables[0, 4] = last
  tables[1, 0] = 0  # a hole whose block still counts a reference
  bad = holed.replace(block_tables=jnp.asarray(tables))
  assert "ref_counts_match_tables" in pk.check_invariants(bad).failures()


# ---------------------------------------------------------------------------------------------
# In the engine.

ENGINE_KW = dict(prefill_chunk=8, decode_steps=4, batch_bucket_min=4, bucket_blocks=False,
                 watermark=0.0)


def _serve(model, params, prompts, new, num_blocks, **kw):
  """Runs an engine to the end; checks after every step that the host's block accounting
  equals the device's and every invariant holds. Returns (outputs, engine)."""
  from jax_paged_kv.serving.engine import Engine

  cc = model.cache_config(num_blocks=num_blocks, max_seqs=4, max_seq_len=96, block_size=4)
  engine = Engine(params, model, cc, **ENGINE_KW, **kw)
  for p in prompts:
    engine.add_request(p, SamplingParams(max_new_tokens=new))
  while engine.has_work:
    engine.step()
    assert engine.ledger.free_blocks() == int(engine.cache.allocator.num_free)
    if engine.prefix is None:  # with prefix caching the engine samples cache_stats
      s = pk.cache_stats(engine.cache)
      assert engine._usage() == (int(s.tokens_stored), int(s.allocated_slots))
    _assert_invariants(engine.cache)
  outs = engine.finished
  return [outs[i].tokens for i in range(len(prompts))], engine


PROMPTS = [[5, 17, 99, 3, 42, 7, 8, 120, 64, 1, 2, 77, 31], [9, 9, 31, 4, 77], [1] * 20]


def test_engine_frees_outside_a_sliding_window_model_s_window_by_default():
  model = dataclasses.replace(SMALL, sliding_window=8)
  params = init_params(model, jax.random.PRNGKey(3), scale=2.0)
  got, engine = _serve(model, params, PROMPTS, 40, num_blocks=64)
  assert engine.evict == (8, 0)
  off, plain = _serve(model, params, PROMPTS, 40, num_blocks=64, window_eviction=None)
  assert plain.evict is None and got == off
  for p, o in zip(PROMPTS, got, strict=True):
    assert o == reference_greedy(params, model, p, 40)
  # Three sequences of up to 60 tokens: 45 blocks held at the end without eviction.
  assert engine.metrics.peak_blocks <= 3 * (-(-8 // 4) + 1 + -(-8 // 4))
  assert plain.metrics.peak_blocks > 2 * engine.metrics.peak_blocks


@pytest.mark.slow
def test_engine_streams_a_full_attention_model_in_a_pool_too_small_for_it():
  """StreamingLLM through the engine: 3 sequences of 70 tokens in 20 usable blocks (they
  need 54 blocks whole) all finish, with the greedy tokens of the float64 model that sees the
  same keys."""
  params = init_params(SMALL, jax.random.PRNGKey(4), scale=2.0)
  window, sinks, bs = 12, 4, 4
  got, engine = _serve(SMALL, params, PROMPTS, 50, num_blocks=21,
                       window_eviction=(window, sinks))
  assert engine.metrics.peak_blocks <= 20
  for prompt, toks in zip(PROMPTS, got, strict=True):
    assert len(toks) == 50
    # Prompt chunks of 8 evict after each chunk too: query q saw the blocks not freed at
    # the length before its own chunk or step (per query: the last eviction before it ran).
    P, seq = len(prompt), list(prompt)
    starts = [c for c in range(0, P, 8)] + list(range(P, P + 50))  # each call's first position
    for s in range(len(toks)):
      S = len(seq)
      ki = np.arange(S)[None, :]
      run_at = np.asarray([max(c for c in starts if c <= q) for q in range(S)])[:, None]
      keep = (ki < -(-sinks // bs) * bs) | ((ki // bs + 1) * bs > run_at - window)
      tok = int(np.argmax(reference_logits(params, SMALL, seq, keep=keep)[-1]))
      assert tok == toks[s], (prompt, s)
      seq.append(tok)


def test_engine_refuses_eviction_it_cannot_run():
  from jax_paged_kv.serving.engine import Engine

  cc = SMALL.cache_config(num_blocks=32, max_seqs=2, max_seq_len=64, block_size=4)
  params = init_params(SMALL, jax.random.PRNGKey(0))
  assert Engine(params, SMALL, cc).evict is None  # full attention: auto stays off
  contiguous = SMALL.cache_config(num_blocks=1 + 2 * 16, max_seqs=2, max_seq_len=64,
                                  block_size=4, strategy=CacheStrategy.CONTIGUOUS)
  with pytest.raises(ValueError, match="CONTIGUOUS"):
    Engine(params, SMALL, contiguous, window_eviction=(8, 0))
  for bad in ((0, 0), (8, -1), (8.0, 0), "always", (8,)):
    with pytest.raises(ValueError, match="window_eviction"):
      Engine(params, SMALL, cc, window_eviction=bad)
  windowed = dataclasses.replace(SMALL, sliding_window=8)
  wparams = init_params(windowed, jax.random.PRNGKey(0))
  for kw in (dict(enable_prefix_caching=True), dict(preemption="swap")):
    assert Engine(wparams, windowed, cc, **kw).evict == (8, 0)  # auto: on with both


def test_engine_evicts_with_swap_preemption_and_prefix_caching(monkeypatch):
  """A sliding-window model with swap preemption and prefix caching: requests sharing a prompt
  block hit it while its holder has no holes; a request preempted once its table has holes
  swaps out only the blocks it holds and comes back with its holes; every request gives the
  float64 model's greedy tokens, and host and device block counts agree after every step."""
  from jax_paged_kv.serving.engine import Engine
  from jax_paged_kv.serving.engine import engine as engine_mod

  swapped = []

  def recording_swap_out(cache, seq_id, **kw):
    cache, sw = pk.swap_out(cache, seq_id, **kw)
    swapped.append(sw)
    return cache, sw

  monkeypatch.setattr(engine_mod, "swap_out", recording_swap_out)
  model = dataclasses.replace(SMALL, sliding_window=8)
  params = init_params(model, jax.random.PRNGKey(3), scale=2.0)
  prompts = [[5, 17, 99, 3, 42, 7], [5, 17, 99, 3, 8, 8, 1], [9, 9, 31, 4, 77], [1] * 7]
  cc = model.cache_config(num_blocks=12, max_seqs=4, max_seq_len=96, block_size=4)
  engine = Engine(params, model, cc, preemption="swap", enable_prefix_caching=True,
                  reserve_ratio=0.0, **ENGINE_KW)
  assert engine.evict == (8, 0)
  for p in prompts:
    engine.add_request(p, SamplingParams(max_new_tokens=40))
  preempted = False
  while engine.has_work:
    engine.step()
    newest = max(engine.scheduler.running, key=lambda r: r.admit_order, default=None)
    if (not preempted and newest is not None
        and engine.ledger.freed(engine.ledger.lens[newest.slot]) > 0):
      engine._preempt()  # the engine's own preemption path, at a moment with holes
      preempted = True
    assert engine.ledger.free_blocks() == int(engine.cache.allocator.num_free)
    _assert_invariants(engine.cache)
  got = [engine.finished[i].tokens for i in range(len(prompts))]
  for p, o in zip(prompts, got, strict=True):
    assert o == reference_greedy(params, model, p, 40)
  assert engine.metrics.cached_prompt_tokens > 0
  holed = [sw for sw in swapped if sw.positions is not None]
  assert holed and all(sw.num_blocks <= -(-8 // 4) + 1 for sw in holed)  # O(window)
  assert all(sw.positions[0] > 0 for sw in holed)
  engine.reset_prefix_cache()
  assert int(engine.cache.allocator.num_free) == cc.usable_blocks


@pytest.mark.slow
def test_streaming_sinks_are_shared_by_prefix_caching():
  """StreamingLLM with prefix caching: the sink blocks stay registered after the window frees
  the blocks behind them, so requests sharing the first ``sink_tokens`` tokens share them; the
  tokens equal the same engine without prefix caching (prompt chunks start at the same
  positions, so every query sees the same keys)."""
  params = init_params(SMALL, jax.random.PRNGKey(4), scale=2.0)
  head = [3, 1, 4, 1, 5, 9, 2, 6]  # the two sink blocks
  prompts = [head + [5, 3, 5, 8, 9, 7, 9, 3, 2, 3], head + [27, 18, 28], head + [1] * 12]
  kw = dict(window_eviction=(12, 8), num_blocks=40)
  off, _ = _serve(SMALL, params, prompts, 30, **kw)
  on, engine = _serve(SMALL, params, prompts, 30, enable_prefix_caching=True, **kw)
  assert on == off
  assert engine.metrics.cached_prompt_tokens >= 2 * len(head)


def _serve_one_by_one(params, prompts, new, *, preempt_at=None, **kw):
  """Each prompt served to its end before the next is added (one engine): the tokens of each,
  with ``engine._preempt()`` forced after step ``preempt_at`` of every request."""
  from jax_paged_kv.serving.engine import Engine

  cc = SMALL.cache_config(num_blocks=65, max_seqs=4, max_seq_len=96, block_size=4)
  engine = Engine(params, SMALL, cc, **ENGINE_KW, **kw)
  outs = []
  for p in prompts:
    rid = engine.add_request(p, SamplingParams(max_new_tokens=new))
    steps = 0
    while engine.has_work:
      engine.step()
      steps += 1
      if steps == preempt_at:
        engine._preempt()  # the engine's own preemption path
      _assert_invariants(engine.cache)
    outs.append(engine.finished[rid].tokens)
  return outs, engine


def test_token_eviction_does_not_depend_on_what_else_the_engine_did():
  """Under StreamingLLM eviction a prompt query sees the keys kept when its chunk started, so
  the engine keeps every chunk where a lone run of the request puts it: a prefix hit is cut to
  a chunk boundary (here the one sink block, 4 tokens, is not one: prefill_chunk is 8), a
  recomputed request replays its generated tokens one per step as they were decoded, and the
  token budget never cuts a chunk short. Each request's tokens equal those of the request
  served alone in a fresh engine."""
  params = init_params(SMALL, jax.random.PRNGKey(4), scale=2.0)
  rng = np.random.default_rng(11)
  sink = rng.integers(0, 128, 4).tolist()
  prompts = [sink + rng.integers(0, 128, n).tolist() for n in (20, 20, 13)]
  evict = dict(window_eviction=(8, 4))
  alone = [_serve_one_by_one(params, [p], 12, **evict)[0][0] for p in prompts]
  shared, engine = _serve_one_by_one(params, prompts, 12, enable_prefix_caching=True, **evict)
  assert shared == alone
  # The recompute replay: forced after prefill and a few decode steps.
  for pre in ("recompute", "swap"):
    got, engine = _serve_one_by_one(params, prompts[:1], 30, preempt_at=4, preemption=pre,
                                    **evict)
    assert engine.metrics.preemptions == 1
    assert got[0] == _serve_one_by_one(params, prompts[:1], 30, **evict)[0][0], pre
  # Two prompts prefilled together under a budget of one chunk and 3 tokens: the second waits
  # for a whole chunk instead of taking 3 tokens.
  together, _ = _serve(SMALL, params, prompts[:2], 12, num_blocks=65, prefill_token_budget=11,
                       **evict)
  assert together == alone[:2]
