"""Steady state compiles nothing; cache ops give the same answer with and without jit.

* ``chex.assert_max_traces``: the decode step and decode loop trace once for a whole run of
  same-shaped calls (the cache and state they return feed back in without a retrace).
* ``jax.monitoring``: after a warm-up, an :class:`~jax_paged_kv.Engine` with fixed shapes
  serves new requests (other lengths, seeds, preemptions) without tracing or compiling.
* ``chex.variants(with_jit, without_jit)``: cache ops and ``paged_attention`` against NumPy.
* ``chex.assert_trees_all_equal``: a rejected update under ``jit`` returns its input cache.

Every check is paired with an oracle for the values (float64 numpy) and a control showing the
counter is live (a new shape does trace / compile).
"""

from __future__ import annotations

import contextlib
import math
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import (
  DecodeState,
  SamplingParams,
  decode_loop,
  decode_step,
  make_key,
  prefill_step,
)
from jax_paged_kv.serving.engine import Engine
from tests.llama_fixtures import SMALL
from tests.llama_reference import reference_greedy, reference_logits
from tests.oracle import attention_np

PARAMS = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)
MODEL_CACHE = SMALL.cache_config(num_blocks=40, max_seqs=4, max_seq_len=48, block_size=4)
WIDTH, CHUNK, MAX_STEPS = 4, 8, 4

# jax.monitoring events (jax/_src/dispatch.py): a top-level jit trace, an XLA compilation (also
# emitted when the persistent compilation cache serves the executable).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations():
  """Collects ``(event, fun_name)`` of every jit trace and XLA compilation inside the block."""
  events: list[tuple[str, str]] = []

  def listener(event, duration, **kwargs):
    del duration
    if event in (TRACE_EVENT, COMPILE_EVENT):
      events.append((event, kwargs.get("fun_name", "?")))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def counted(fn, *static):
  """``jax.jit(fn)`` (cache donated) that fails on a second trace (``chex.assert_max_traces``)."""
  return jax.jit(chex.assert_max_traces(fn, n=1), static_argnames=static,
                 donate_argnames=("cache",))


# ---------------------------------------------------------------------------------------------
# decode step and decode loop: one trace for a whole run


def test_decode_step_traces_once_for_a_ragged_token_by_token_run():
  """Prompts of different lengths fed one token per call (rows drop out as padding): one trace,
  and each row's last logits equal a float64 recomputation of its prompt."""
  chex.clear_trace_counter()
  step = counted(decode_step.__wrapped__, "config", "implementation", "max_blocks")
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, SMALL.vocab_size, n).tolist() for n in (5, 11, 2)]
  cache = pk.init_cache(MODEL_CACHE, pool_fill=float("nan"))
  cache, _ = pk.allocate_sequences(cache, np.arange(3, dtype=np.int32))
  last = [None] * len(prompts)
  for t in range(max(map(len, prompts))):
    toks = np.zeros(WIDTH, np.int32)
    ids = np.full(WIDTH, -1, np.int32)
    for i, p in enumerate(prompts):
      if t < len(p):
        toks[i], ids[i] = p[t], i
    cache, logits, status = step(PARAMS, cache, toks, ids, config=SMALL)
    assert not np.any(np.asarray(status))
    for i, p in enumerate(prompts):
      if t == len(p) - 1:
        last[i] = np.asarray(logits[i])
  for p, got in zip(prompts, last, strict=True):
    np.testing.assert_allclose(got, reference_logits(PARAMS, SMALL, p)[-1], rtol=1e-4,
                               atol=1e-4)
  assert [int(x) for x in np.asarray(cache.seq_lens)[:3]] == [len(p) for p in prompts]
  # Control: another batch width is a new shape, so the counter trips.
  with pytest.raises(AssertionError, match="traced > 1"):
    step(PARAMS, cache, np.zeros(WIDTH + 1, np.int32), np.full(WIDTH + 1, -1, np.int32),
         config=SMALL)


def _prefill(cache, prompts, sampling):
  """Chunked prefill of rows ``0..len(prompts)-1`` with the real ``prefill_step``."""
  n = len(prompts)
  cache, _ = pk.allocate_sequences(cache, np.arange(n, dtype=np.int32))
  samp = list(sampling) + [SamplingParams()] * (WIDTH - n)
  temp = np.asarray([s.temperature for s in samp], np.float32)
  top_k = np.asarray([s.top_k for s in samp], np.int32)
  top_p = np.asarray([s.top_p for s in samp], np.float32)
  keys = np.stack([make_key(s.seed) for s in samp])
  first = [None] * n
  for start in range(0, max(map(len, prompts)), CHUNK):
    toks = np.zeros((WIDTH, CHUNK), np.int32)
    num = np.zeros(WIDTH, np.int32)
    ids = np.full(WIDTH, -1, np.int32)
    for i, p in enumerate(prompts):
      piece = p[start:start + CHUNK]
      toks[i, :len(piece)], num[i], ids[i] = piece, len(piece), i if piece else -1
    cache, nxt, _, status = prefill_step(PARAMS, cache, toks, ids, num, temp, top_k, top_p,
                                         keys, np.zeros(WIDTH, np.int32), config=SMALL)
    assert not np.any(np.asarray(status))
    for i, p in enumerate(prompts):
      if num[i] and start + num[i] == len(p):
        first[i] = int(nxt[i])
  return cache, first


def test_decode_loop_traces_once_across_calls_step_counts_and_sampling_settings():
  """Two batches of requests (greedy, top-k, top-p, stop tokens, other seeds), step counts 1..4:
  one trace; greedy rows equal the float64 greedy recomputation."""
  chex.clear_trace_counter()
  loop = counted(decode_loop.__wrapped__, "config", "max_steps", "implementation", "max_blocks")
  rng = np.random.default_rng(1)
  batches = [
      [SamplingParams(max_new_tokens=12),
       SamplingParams(temperature=0.8, top_k=10, seed=3, max_new_tokens=12),
       SamplingParams(max_new_tokens=7, stop_tokens=(5,))],
      [SamplingParams(temperature=1.3, top_p=0.8, seed=9, max_new_tokens=9),
       SamplingParams(max_new_tokens=10),
       SamplingParams(max_new_tokens=10, stop_tokens=(77,)),
       SamplingParams(temperature=0.5, seed=2**31 - 1, max_new_tokens=10)],
  ]
  for sampling in batches:
    prompts = [rng.integers(0, SMALL.vocab_size, int(n)).tolist()
               for n in rng.integers(1, 20, len(sampling))]
    cache, first = _prefill(pk.init_cache(MODEL_CACHE), prompts, sampling)
    pad = WIDTH - len(prompts)
    state = DecodeState.create(first + [0] * pad, list(range(len(prompts))) + [-1] * pad,
                               list(sampling) + [SamplingParams()] * pad, num_stop=1)
    outs = [[t] for t in first]
    num_steps = iter([1, 3, 4, 2, 4, 4, 4, 4])
    while not bool(np.all(np.asarray(state.done))):
      cache, state, out, steps, status = loop(PARAMS, cache, state, jnp.int32(next(num_steps)),
                                              config=SMALL, max_steps=MAX_STEPS)
      assert not np.any(np.asarray(status))
      for i in range(len(prompts)):
        outs[i] += [int(t) for t in np.asarray(out)[i, :int(steps)] if t >= 0]
    for p, s, got in zip(prompts, sampling, outs, strict=True):
      assert len(got) <= s.max_new_tokens
      if s.temperature == 0:
        assert got == reference_greedy(PARAMS, SMALL, p, s.max_new_tokens, s.stop_tokens)
  # Control: a wider stop-token table is a new shape, so the counter trips.
  wide = DecodeState.create([0] * WIDTH, [-1] * WIDTH, [SamplingParams()] * WIDTH, num_stop=2)
  with pytest.raises(AssertionError, match="traced > 1"):
    loop(PARAMS, pk.init_cache(MODEL_CACHE), wide, jnp.int32(1), config=SMALL,
         max_steps=MAX_STEPS)


# ---------------------------------------------------------------------------------------------
# the engine: nothing new compiles after a warm-up with fixed shapes


def test_engine_compiles_nothing_after_warm_up():
  # A pool size no other test uses, so the warm-up compiles here whatever ran before it in
  # this process (the control that the counter sees the engine's compilations).
  cc = SMALL.cache_config(num_blocks=1 + 15, max_seqs=4, max_seq_len=48, block_size=4)
  engine = Engine(PARAMS, SMALL, cc, prefill_chunk=8, decode_steps=4, batch_bucket_min=4,
                  bucket_blocks=False, watermark=0.0, reserve_ratio=0.0)
  rng = np.random.default_rng(2)

  def add(n, seed0):
    ids = {}
    for i in range(n):
      prompt = rng.integers(0, SMALL.vocab_size, int(rng.integers(1, 25))).tolist()
      new = int(rng.integers(1, 17))
      s = (SamplingParams(max_new_tokens=new, stop_tokens=(int(rng.integers(128)),))
           if i % 3 == 0 else SamplingParams(max_new_tokens=new) if i % 3 == 1 else
           SamplingParams(temperature=1.0, top_k=16, top_p=0.9, seed=seed0 + 7919 * i,
                          max_new_tokens=new))
      ids[engine.add_request(prompt, s)] = (prompt, s)
    return ids

  with count_compilations() as warm_up:
    add(6, 1)  # every step kind once
    engine.run()
  for fn in ("prefill_step", "decode_loop"):
    assert any(ev == COMPILE_EVENT and fn in name for ev, name in warm_up), (fn, warm_up)
  warm_preemptions = engine.metrics.preemptions
  with count_compilations() as events:
    reqs = add(16, 2**30)  # other lengths, seeds and stop tokens; preemptions
    engine.run()
  assert events == []
  assert engine.metrics.preemptions > warm_preemptions
  done = engine.finished
  assert set(reqs) <= set(done)
  for rid, (prompt, s) in reqs.items():
    if s.temperature == 0:
      assert done[rid].tokens == reference_greedy(PARAMS, SMALL, prompt, s.max_new_tokens,
                                                  s.stop_tokens)


# ---------------------------------------------------------------------------------------------
# cache ops with and without jit, against NumPy


def cache_config(**kw):
  base = dict(num_layers=2, num_kv_heads=2, head_dim=4, num_blocks=16, max_seqs=4,
              max_seq_len=40, block_size=4, dtype=jnp.float32)
  return pk.CacheConfig(**(base | kw))


def rand_kv(rng, cfg, batch, t):
  shape = (cfg.num_layers, batch, t, cfg.num_kv_heads, cfg.head_dim)
  return (rng.standard_normal(shape).astype(np.float32),
          rng.standard_normal(shape).astype(np.float32))


def blocks(n, bs=4):
  return math.ceil(n / bs)


class TestCacheOpsWithAndWithoutJit(chex.TestCase):
  """Each op through ``self.variant`` (jitted or eager), then read back eagerly and compared
  with what NumPy says the sequences hold (``dense``: slot -> (k, v) ``[len, L, H, D]``)."""

  def setUp(self):
    super().setUp()
    self.rng = np.random.default_rng(zlib.crc32(self.id().encode()))
    self.cfg = cache_config()
    cache = pk.init_cache(self.cfg, pool_fill=np.nan)
    cache, _ = pk.allocate_sequences(cache, np.asarray([0, 1, 2], np.int32))
    k, v = rand_kv(self.rng, self.cfg, 3, 9)
    lens = [6, 3, 9]
    cache, _ = pk.append_kv(cache, k, v, np.asarray([0, 1, 2], np.int32),
                            num_new=np.asarray(lens, np.int32))
    self.cache = cache
    self.dense = {s: (k[:, s, :n].transpose(1, 0, 2, 3), v[:, s, :n].transpose(1, 0, 2, 3))
                  for s, n in enumerate(lens)}

  def assert_holds(self, cache, dense):
    """Lengths, active flags, contents and the free count match ``dense``."""
    np.testing.assert_array_equal(
        np.asarray(cache.active), [s in dense for s in range(self.cfg.max_seqs)])
    for s, (k, v) in dense.items():
      for layer in range(self.cfg.num_layers):
        kk, vv, lens = pk.lookup_kv(cache, np.asarray([s], np.int32), layer, max_len=len(k))
        assert int(lens[0]) == len(k)
        np.testing.assert_array_equal(np.asarray(kk)[0], k[:, layer])
        np.testing.assert_array_equal(np.asarray(vv)[0], v[:, layer])
    assert bool(pk.check_invariants(cache).ok)

  @chex.variants(with_jit=True, without_jit=True)
  def test_append_kv(self):
    append = self.variant(
        lambda c, k, v, ids, n: pk.append_kv(c, k, v, ids, num_new=n, donate=False))
    k, v = rand_kv(self.rng, self.cfg, 3, 5)
    n = [5, 0, 2]
    ids = [2, -1, 0]  # a padding row in the middle
    free = int(self.cache.allocator.num_free)
    out, status = append(self.cache, k, v, np.asarray(ids, np.int32), np.asarray(n, np.int32))
    np.testing.assert_array_equal(np.asarray(status), [0, 0, 0])
    dense = dict(self.dense)
    for r, s in enumerate(ids):
      if s >= 0:
        old = dense[s]
        dense[s] = tuple(np.concatenate([o, x[:, r, :n[r]].transpose(1, 0, 2, 3)])
                         for o, x in zip(old, (k, v), strict=True))
    self.assert_holds(out, dense)
    grew = sum(blocks(len(dense[s][0])) - blocks(len(self.dense[s][0])) for s in (0, 2))
    assert int(out.allocator.num_free) == free - grew

  @chex.variants(with_jit=True, without_jit=True)
  def test_fork_sequence_then_copy_on_write(self):
    fork = self.variant(lambda c, p, ch: pk.fork_sequence(c, p, ch, donate=False))
    free = int(self.cache.allocator.num_free)
    out, status = fork(self.cache, np.asarray([0], np.int32), np.asarray([3], np.int32))
    np.testing.assert_array_equal(np.asarray(status), [0])
    dense = dict(self.dense) | {3: self.dense[0]}
    self.assert_holds(out, dense)
    nb = blocks(6)
    tables = np.asarray(out.block_tables)
    np.testing.assert_array_equal(tables[3, :nb], tables[0, :nb])
    np.testing.assert_array_equal(np.asarray(out.allocator.ref_counts)[tables[0, :nb]], [2] * nb)
    assert int(out.allocator.num_free) == free
    # The child writes into the shared half-full block: it gets its own copy, the parent keeps
    # its data.
    k, v = rand_kv(self.rng, self.cfg, 1, 1)
    out, _ = pk.append_kv(out, k, v, np.asarray([3], np.int32), donate=False)
    dense[3] = tuple(np.concatenate([d, x[:, 0].transpose(1, 0, 2, 3)])
                     for d, x in zip(dense[3], (k, v), strict=True))
    self.assert_holds(out, dense)
    assert int(out.allocator.num_free) == free - 1

  @chex.variants(with_jit=True, without_jit=True)
  def test_truncate_sequences(self):
    truncate = self.variant(lambda c, ids, n: pk.truncate_sequences(c, ids, n, donate=False))
    free = int(self.cache.allocator.num_free)
    ids, n = [2, 1, 0], [5, 0, 6]
    tables = np.asarray(self.cache.block_tables)
    dropped_blocks = np.concatenate([tables[2, 1:3], tables[0, 0:2]])  # 9 -> 4 and 6 -> 0
    out, status = truncate(self.cache, np.asarray(ids, np.int32), np.asarray(n, np.int32))
    np.testing.assert_array_equal(np.asarray(status), [0, 0, 0])
    dense = {s: tuple(x[:len(x) - c] for x in self.dense[s]) for s, c in zip(ids, n, strict=True)}
    self.assert_holds(out, dense)
    # 9 -> 4 tokens frees 2 blocks, 6 -> 0 frees 2.
    assert int(out.allocator.num_free) == free + 4
    refs = np.asarray(out.allocator.ref_counts)
    np.testing.assert_array_equal(refs[dropped_blocks], 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_free_sequences(self):
    free_seqs = self.variant(lambda c, ids: pk.free_sequences(c, ids, donate=False))
    held = np.asarray(self.cache.block_tables)[[0, 2]]
    out, status = free_seqs(self.cache, np.asarray([2, -1, 0], np.int32))
    np.testing.assert_array_equal(np.asarray(status), [0, 0, 0])
    self.assert_holds(out, {1: self.dense[1]})
    assert int(out.allocator.num_free) == self.cfg.num_blocks - 1 - blocks(3)
    np.testing.assert_array_equal(np.asarray(out.allocator.ref_counts)[held[held > 0]], 0)
    np.testing.assert_array_equal(np.asarray(out.block_tables)[[0, 2]], 0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_paged_attention(self):
    attend = self.variant(lambda q, c, ids, layer, q_lens: pk.paged_attention(
        q, c, ids, layer, q_lens=q_lens))
    cfg = self.cfg
    ids = np.asarray([2, -1, 0, 1], np.int32)
    q_lens = np.asarray([3, 0, 1, 2], np.int32)
    q = self.rng.standard_normal((4, 3, 4, cfg.head_dim)).astype(np.float32)  # GQA 2:1
    tables = np.asarray(self.cache.block_tables)[np.maximum(ids, 0)]
    kv_lens = np.where(ids >= 0, np.asarray(self.cache.seq_lens)[np.maximum(ids, 0)], 0)
    for layer in range(cfg.num_layers):
      out = attend(q, self.cache, ids, np.int32(layer), q_lens)
      want, _ = attention_np(q, self.cache.k_pool, self.cache.v_pool, layer, tables, kv_lens,
                             q_lens, scale=cfg.head_dim ** -0.5)
      np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# a rejected update under jit returns its input cache


def _base_cache():
  cfg = cache_config(num_blocks=1 + 5)
  cache = pk.init_cache(cfg, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, np.asarray([0, 1], np.int32))
  k, v = rand_kv(np.random.default_rng(3), cfg, 2, 7)
  cache, _ = pk.append_kv(cache, k, v, np.asarray([0, 1], np.int32),
                          num_new=np.asarray([6, 7], np.int32))  # 4 of 5 blocks held
  return cache


def _append(n):
  def run(c):
    k = jnp.ones((2, 1, n, 2, 4), jnp.float32)
    return pk.append_kv(c, k, k, jnp.asarray([0], jnp.int32))
  return run


REJECTED = {
    # name: (update under jit, expected status, counts as a failed allocation)
    "allocate an active slot": (
        lambda c: pk.allocate_sequences(c, jnp.asarray([2, 1], jnp.int32)),
        [0, pk.Status.SLOT_IN_USE], False),
    "append past the pool": (_append(8), [pk.Status.POOL_EXHAUSTED], True),
    "append past max_seq_len": (_append(35), [pk.Status.SEQUENCE_TOO_LONG], False),
    "reserve past the pool": (
        lambda c: pk.reserve(c, jnp.asarray([0, 1], jnp.int32), 4, max_new=4)[::2],
        [pk.Status.POOL_EXHAUSTED] * 2, True),
    "fork into an active slot": (
        lambda c: pk.fork_sequence(c, jnp.asarray([0, 1], jnp.int32),
                                   jnp.asarray([2, 0], jnp.int32)),
        [0, pk.Status.SLOT_IN_USE], False),
    "truncate more than held": (
        lambda c: pk.truncate_sequences(c, jnp.asarray([1, 0], jnp.int32),
                                        jnp.asarray([2, 7], jnp.int32)),
        [0, pk.Status.INVALID_COUNT], False),
    "free an inactive slot": (
        lambda c: pk.free_sequences(c, jnp.asarray([0, 3], jnp.int32)),
        [0, pk.Status.INACTIVE_SLOT], False),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_update_under_jit_returns_the_input_cache(name):
  fn, want, pool = REJECTED[name]
  cache = _base_cache()
  before = jax.tree_util.tree_map(np.array, cache)
  out, status = jax.jit(fn)(cache)
  np.testing.assert_array_equal(np.asarray(status), np.asarray(want, np.int32))
  # Bitwise the input (NaN-filled free blocks included), but for the rejection counter.
  chex.assert_trees_all_equal(out.replace(telemetry=before.telemetry), before)
  assert int(out.telemetry.failed_allocations) == int(before.telemetry.failed_allocations) + pool


# ---------------------------------------------------------------------------------------------
# generate and the engine's shape set: compile once, for good


def test_generate_second_call_with_other_prompts_compiles_nothing():
  """Two ``generate`` calls with different prompt sets (counts, lengths, stop tokens) under
  the default cache: the second compiles nothing; greedy outputs equal the float64 greedy
  recomputation."""
  rng = np.random.default_rng(11)

  def workload(n, seed0):
    prompts = [rng.integers(0, SMALL.vocab_size, int(rng.integers(2, 30))).tolist()
               for _ in range(n)]
    sampling = [SamplingParams(max_new_tokens=int(rng.integers(1, 12)),
                               stop_tokens=tuple(int(t) for t in
                                                 rng.integers(0, SMALL.vocab_size, i % 4)))
                if i % 2 else
                SamplingParams(temperature=0.9, top_p=0.8, seed=seed0 + i,
                               max_new_tokens=int(rng.integers(1, 12)))
                for i in range(n)]
    return prompts, sampling

  first = workload(7, 0)
  second = workload(5, 100)
  assert (pk.serving.default_cache_config(SMALL, *first)
          == pk.serving.default_cache_config(SMALL, *second))
  with count_compilations() as warm_up:
    pk.generate(PARAMS, SMALL, *first)
  assert any(ev == COMPILE_EVENT and "decode_loop" in name for ev, name in warm_up), warm_up
  with count_compilations() as events:
    outs = pk.generate(PARAMS, SMALL, *second)
  assert events == []
  for p, s, got in zip(*second, outs, strict=True):
    if s.temperature == 0:
      assert got == reference_greedy(PARAMS, SMALL, p, s.max_new_tokens, s.stop_tokens)


def test_engine_compiles_only_shapes_from_its_fixed_set():
  """A run with a changing number of running requests and lengths compiles only shapes of
  ``Engine.shapes()`` (one prefill shape), each once; greedy outputs match the oracle."""
  cc = SMALL.cache_config(num_blocks=1 + 40, max_seqs=8, max_seq_len=64, block_size=4)
  engine = Engine(PARAMS, SMALL, cc, prefill_chunk=8, decode_steps=4, batch_bucket_min=2,
                  block_bucket_min=4)
  shapes = engine.shapes()
  assert [s for s in shapes if s[0] == "prefill"] == [("prefill", 4, 16)]
  assert {s[1] for s in shapes if s[0] == "decode"} == {2, 4, 8}
  assert {s[2] for s in shapes if s[0] == "decode"} == {4, 8, 16}
  rng = np.random.default_rng(5)
  reqs = {}
  for _ in range(12):
    prompt = rng.integers(0, SMALL.vocab_size, int(rng.integers(1, 30))).tolist()
    s = SamplingParams(max_new_tokens=int(rng.integers(1, 30)))
    reqs[engine.add_request(prompt, s)] = (prompt, s)
  with count_compilations() as events:
    engine.run()
  assert engine.compiled_shapes <= set(shapes)
  compiled = [name for ev, name in events if ev == COMPILE_EVENT]
  steps = [n for n in compiled if "prefill_step" in n or "decode_loop" in n]
  # Each step program compiled at most once per shape (another test may have compiled some).
  assert len(steps) <= len(engine.compiled_shapes)
  for rid, (prompt, s) in reqs.items():
    assert engine.finished[rid].tokens == reference_greedy(PARAMS, SMALL, prompt,
                                                           s.max_new_tokens)


def test_stop_token_count_is_not_a_compiled_shape():
  """Requests with 0, 1 and ``MAX_STOP_TOKENS`` stop tokens share one decode program; more
  are refused with a clear error."""
  from jax_paged_kv.serving.decoding import MAX_STOP_TOKENS
  states = [DecodeState.create([0] * WIDTH, [-1] * WIDTH,
                               [SamplingParams(stop_tokens=tuple(range(n)))] * WIDTH)
            for n in (0, 1, MAX_STOP_TOKENS)]
  assert {s.stop_tokens.shape for s in states} == {(WIDTH, MAX_STOP_TOKENS)}
  with pytest.raises(ValueError, match="MAX_STOP_TOKENS"):
    SamplingParams(stop_tokens=tuple(range(MAX_STOP_TOKENS + 1)))
