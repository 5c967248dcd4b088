"""Sampling, chunked prefill and the jitted decode loop, against numpy and full recomputation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_paged_kv import (
  CacheShapeError,
  Status,
  allocate_sequences,
  cache_stats,
  check_invariants,
  fork_sequence,
  init_cache,
  truncate_sequences,
)
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import (
  DecodeState,
  SamplingParams,
  _ordered_bits,
  _top_k_mask,
  _top_p_mask,
  decode_loop,
  decode_step,
  make_key,
  prefill_step,
  sample_tokens,
)
from tests.llama_fixtures import SMALL
from tests.llama_reference import reference_greedy

CACHE = SMALL.cache_config(num_blocks=40, max_seqs=4, max_seq_len=48, block_size=4)
WIDTH, CHUNK, STEPS = 4, 8, 8
PARAMS = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)


def prefill(cache, prompts, slots, sampling):
  """Chunked prefill of every prompt (rows padded to WIDTH); returns (cache, first tokens)."""
  cache, _ = allocate_sequences(cache, np.asarray(slots, np.int32))
  pos = [0] * len(prompts)
  first = [None] * len(prompts)
  pad = [SamplingParams()] * (WIDTH - len(prompts))
  samp = list(sampling) + pad
  temp = np.asarray([s.temperature for s in samp], np.float32)
  top_k = np.asarray([s.top_k for s in samp], np.int32)
  top_p = np.asarray([s.top_p for s in samp], np.float32)
  keys = np.stack([make_key(s.seed) for s in samp])
  while any(p < len(t) for p, t in zip(pos, prompts, strict=True)):
    toks = np.zeros((WIDTH, CHUNK), np.int32)
    num = np.zeros(WIDTH, np.int32)
    ids = np.full(WIDTH, -1, np.int32)
    for i, t in enumerate(prompts):
      piece = t[pos[i]:pos[i] + CHUNK]
      toks[i, :len(piece)] = piece
      num[i] = len(piece)
      ids[i] = slots[i] if piece else -1
    cache, nxt, _, status = prefill_step(PARAMS, cache, toks, ids, num, temp, top_k, top_p, keys,
                                         np.zeros(WIDTH, np.int32), config=SMALL)
    assert not np.any(np.asarray(status))
    for i, t in enumerate(prompts):
      pos[i] += num[i]
      if num[i] and pos[i] == len(t):
        first[i] = int(nxt[i])
  return cache, first


def run_loop(cache, state, num_steps=STEPS):
  return decode_loop(PARAMS, cache, state, np.int32(num_steps), config=SMALL, max_steps=STEPS)


def decode_all(cache, first, slots, sampling, calls):
  """``calls`` decode loops; returns (cache, generated tokens per row, final state)."""
  n = len(first)
  pad = WIDTH - n
  state = DecodeState.create(first + [0] * pad, list(slots) + [-1] * pad,
                             list(sampling) + [SamplingParams()] * pad)
  outs = [[t] for t in first]
  for _ in range(calls):
    cache, state, out, steps, status = run_loop(cache, state)
    assert not np.any(np.asarray(status))
    out = np.asarray(out)
    for i in range(n):
      outs[i] += [int(t) for t in out[i, :int(steps)] if t >= 0]
  return cache, outs, state


# ---- sampling --------------------------------------------------------------------------------


def numpy_filtered_probs(logits, temperature, top_k, top_p, min_p=0.0):
  """The distribution sample_tokens draws from, in float64 numpy (HF filter semantics and
  order: temperature, top-k, top-p, min-p)."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z, kind="stable")
  keep = np.zeros_like(z, bool)
  k = top_k if top_k > 0 else z.size
  keep[order[:k]] = True
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  sp = p[order]
  before = np.cumsum(sp) - sp
  drop = order[(before >= top_p) & (np.arange(z.size) > 0)]
  keep[drop] = False
  p = np.where(keep, np.exp(z - z.max()), 0.0)
  p /= p.sum()
  p[p < min_p * p.max()] = 0.0
  return p / p.sum()


def test_sample_tokens_matches_numpy_distribution():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 10)).astype(np.float32) * 2
  temp = np.asarray([0.0, 1.0, 0.7, 1.0, 1.0, 2.0], np.float32)
  top_k = np.asarray([0, 0, 3, 1, 0, 4], np.int32)  # rows with 0 share a batch with k > 0
  top_p = np.asarray([1.0, 1.0, 1.0, 1.0, 0.6, 0.9], np.float32)
  n = 6000
  keys = jax.random.split(jax.random.key(3), n * 6).reshape(n, 6)
  draw = jax.jit(jax.vmap(sample_tokens, in_axes=(None, 0, None, None, None)))
  samples = np.asarray(draw(logits, keys, temp, top_k, top_p))  # [n, 6]
  assert np.all(samples[:, 0] == np.argmax(logits[0]))  # temperature 0: greedy
  assert np.all(samples[:, 3] == np.argmax(logits[3]))  # top_k 1: greedy
  for row in (1, 2, 4, 5):
    probs = numpy_filtered_probs(logits[row], temp[row], top_k[row], top_p[row])
    freq = np.bincount(samples[:, row], minlength=10) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs)), row
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-9), (row, freq, probs)


def test_min_p_matches_numpy_distribution():
  """min_p after temperature, top-k and top-p (Hugging Face's order), against the float64
  distribution; min_p = 1 keeps only the most likely token; a greedy row ignores it."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 12)).astype(np.float32) * 2
  temp = np.asarray([1.0, 0.7, 1.5, 2.0, 0.0, 1.0], np.float32)
  top_k = np.asarray([0, 4, 0, 0, 0, 0], np.int32)
  top_p = np.asarray([1.0, 1.0, 0.8, 1.0, 1.0, 1.0], np.float32)
  min_p = np.asarray([0.1, 0.3, 0.2, 1.0, 0.5, 0.0], np.float32)
  n = 6000
  keys = jax.random.split(jax.random.key(4), n * 6).reshape(n, 6)
  draw = jax.jit(jax.vmap(sample_tokens, in_axes=(None, 0, None, None, None, None)))
  samples = np.asarray(draw(logits, keys, temp, top_k, top_p, min_p))  # [n, 6]
  assert np.all(samples[:, 3] == np.argmax(logits[3]))  # min_p 1: the argmax only
  assert np.all(samples[:, 4] == np.argmax(logits[4]))  # temperature 0: greedy
  # The order: probabilities .4 .3 .1 .1 .1, top-p .5 then min-p .5 keep the first two (min-p
  # first, as vLLM v1 does, would leave top-p only the first).
  lg = np.log(np.asarray([[0.4, 0.3, 0.1, 0.1, 0.1]], np.float32))
  keys5 = jax.random.split(jax.random.key(8), 4000)[:, None]
  got = np.asarray(jax.vmap(sample_tokens, in_axes=(None, 0, None, None, None, None))(
      lg, keys5, np.float32([1.0]), np.int32([0]), np.float32([0.5]), np.float32([0.5])))
  freq = np.bincount(got[:, 0], minlength=5) / got.shape[0]
  want = numpy_filtered_probs(lg[0], 1.0, 0, 0.5, 0.5)
  np.testing.assert_allclose(want, [4 / 7, 3 / 7, 0, 0, 0], atol=1e-12)
  np.testing.assert_allclose(freq, want, atol=5 * np.sqrt(0.25 / got.shape[0]))
  for row in (0, 1, 2, 5):
    probs = numpy_filtered_probs(logits[row], temp[row], top_k[row], top_p[row], min_p[row])
    if row != 5:  # the filter removes tokens the unfiltered distribution would draw
      assert np.sum(probs > 0) < np.sum(numpy_filtered_probs(logits[row], temp[row],
                                                             top_k[row], top_p[row]) > 0)
    freq = np.bincount(samples[:, row], minlength=12) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(probs)), row
    sigma = np.sqrt(probs * (1 - probs) / n)
    assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-9), (row, freq, probs)


def test_filter_masks_match_numpy_exactly():
  """The sort-free top-k / top-p thresholds against numpy's sorted definition, every k."""
  rng = np.random.default_rng(5)
  v = 33
  logits = rng.normal(size=(v + 1, v)).astype(np.float32) * 3
  logits[0, :5] = -np.inf  # masked entries (as after an earlier filter)
  ks = np.arange(v + 1, dtype=np.int32)  # 0 (off) .. v
  bits = _ordered_bits(logits)
  got_k = np.asarray(_top_k_mask(bits, ks))
  for row, k in enumerate(ks):
    order = np.argsort(-logits[row], kind="stable")
    want = np.zeros(v, bool)
    want[order[:k if k else v]] = True
    np.testing.assert_array_equal(got_k[row], want, err_msg=f"k={k}")
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  for p in (0.05, 0.3, 0.9, 0.999, 1.0):
    got_p = np.asarray(_top_p_mask(bits, probs, np.full(v + 1, p, np.float32)))
    for row in range(v + 1):
      order = np.argsort(-logits[row], kind="stable")
      sp = probs[row][order].astype(np.float64)
      before = np.cumsum(sp) - sp
      want = np.zeros(v, bool)
      want[order[(before < p) | (np.arange(v) == 0)]] = True
      want = want & (probs[row] > 0) if p < 1 else np.ones(v, bool)  # p = 1: no filter
      np.testing.assert_array_equal(got_p[row], want, err_msg=f"p={p} row={row}")


# ---- the decode loop ---------------------------------------------------------------------------


def test_decode_loop_greedy_matches_recomputation_with_stops_and_limits():
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 128, n).tolist() for n in (5, 9, 2)]
  refs = [reference_greedy(PARAMS, SMALL, p, 20) for p in prompts]
  stop = refs[2][6]  # row 2 must stop at the first occurrence of this token
  sampling = [SamplingParams(max_new_tokens=20), SamplingParams(max_new_tokens=4),
              SamplingParams(max_new_tokens=20, stop_tokens=(stop, 127))]
  cache = init_cache(CACHE, pool_fill=float("nan"))
  cache, first = prefill(cache, prompts, [2, 0, 3], sampling)
  cache, outs, state = decode_all(cache, first, [2, 0, 3], sampling, calls=3)
  assert outs[0] == refs[0]
  assert outs[1] == refs[1][:4]
  cut = refs[2].index(stop) + 1
  assert outs[2] == refs[2][:cut] and outs[2][-1] == stop
  assert np.asarray(state.done).tolist() == [True, True, True, True]
  # The last generated token is never written: lengths are prompt + generated - 1.
  lens = np.asarray(cache.seq_lens)
  assert [lens[s] for s in (2, 0, 3)] == [len(p) + len(o) - 1 for p, o in
                                          zip(prompts, outs, strict=True)]


def test_decode_loop_stops_on_pool_exhaustion_and_reports_status():
  rng = np.random.default_rng(2)
  # 39 usable blocks of 4: three prompts of 38 tokens (10 blocks, 2 free slots each) and one of
  # 34 (9 blocks, 2 free slots) fill the pool; two steps fit, the third needs 4 new blocks.
  prompts = [rng.integers(0, 128, n).tolist() for n in (38, 38, 38, 34)]
  sampling = [SamplingParams(max_new_tokens=9)] * 4
  cache = init_cache(CACHE)
  cache, first = prefill(cache, prompts, [0, 1, 2, 3], sampling)
  assert int(cache.allocator.num_free) == 0
  state = DecodeState.create(first, [0, 1, 2, 3], sampling)
  cache, state, out, steps, status = run_loop(cache, state)
  assert int(steps) == 2
  assert np.asarray(status).tolist() == [Status.POOL_EXHAUSTED] * 4  # every row asked
  assert np.asarray(cache.seq_lens).tolist() == [40, 40, 40, 36]
  assert int(cache.telemetry.failed_allocations) == 1
  assert np.all(np.asarray(out)[:, :2] >= 0) and np.all(np.asarray(out)[:, 2:] == -1)
  assert bool(check_invariants(cache).ok)
  for i in range(4):  # the two applied steps are the greedy continuation
    ref = reference_greedy(PARAMS, SMALL, prompts[i], 3)
    assert [first[i], *np.asarray(out)[i, :2].tolist()] == ref


def test_fork_gives_identical_continuations():
  prompt = np.random.default_rng(3).integers(0, 128, 6).tolist()  # 1.5 blocks: a shared tail
  samp = SamplingParams(temperature=1.0, top_k=20, seed=11, max_new_tokens=12)
  # Oracle: the same prompt decoded alone, no fork.
  solo_cache = init_cache(CACHE)
  solo_cache, first = prefill(solo_cache, [prompt], [0], [samp])
  _, solo, _ = decode_all(solo_cache, first, [0], [samp], calls=2)
  cache = init_cache(CACHE)
  cache, first = prefill(cache, [prompt], [1], [samp])
  cache, _ = fork_sequence(cache, np.int32(1), np.int32(3))
  cache, _ = fork_sequence(cache, np.int32(1), np.int32(0))
  assert int(cache_stats(cache).shared_blocks) == 2
  greedy = SamplingParams(max_new_tokens=12)
  cache, outs, _ = decode_all(cache, first * 3, [1, 3, 0], [samp, samp, greedy], calls=2)
  assert outs[0] == outs[1] == solo[0]
  assert outs[2][1:] == reference_greedy(PARAMS, SMALL, prompt + [first[0]], 11)
  assert bool(check_invariants(cache).ok)


def test_truncate_and_redecode_reproduces_tokens():
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, 128, n).tolist() for n in (7, 3)]
  sampling = [SamplingParams(max_new_tokens=12),
              SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_new_tokens=12)]
  cache = init_cache(CACHE)
  cache, first = prefill(cache, prompts, [0, 1], sampling)
  cache, outs, _ = decode_all(cache, first, [0, 1], sampling, calls=2)
  assert outs[0] == reference_greedy(PARAMS, SMALL, prompts[0], 12)
  free_before = int(cache.allocator.num_free)
  # The cache holds prompt + outs[:11]; roll back 9 tokens (across block boundaries).
  cache, status = truncate_sequences(cache, np.asarray([0, 1], np.int32), 9)
  assert np.asarray(status).tolist() == [0, 0]
  assert int(cache.allocator.num_free) > free_before
  state = DecodeState.create([o[2] for o in outs] + [0, 0], [0, 1, -1, -1],
                             sampling + [SamplingParams()] * 2, num_generated=[3, 3, 0, 0])
  cache, state, out, steps, status = run_loop(cache, state)
  out = np.asarray(out)
  assert int(steps) == 8 and not np.any(np.asarray(status))
  for i in range(2):
    again = outs[i][:3] + [int(t) for t in out[i] if t >= 0]
    assert again == outs[i][:11]


def test_decode_loop_runs_the_allocator_only_in_steps_where_a_row_crosses_a_block(monkeypatch):
  """The allocator (pop, table entries, copy-on-write) sits in a lax.cond in reserve: it runs
  in exactly the steps where some live row starts a new block (plain-Python count below),
  and in the other steps the allocator state and block tables stay as they were."""
  from jax_paged_kv.cache import allocator

  calls = []
  pop = allocator.pop_blocks

  def counted(*args, **kwargs):
    jax.debug.callback(lambda: calls.append(1))
    return pop(*args, **kwargs)

  monkeypatch.setattr(allocator, "pop_blocks", counted)
  # A geometry no other test compiles, so that the patched allocator is traced.
  cfg = SMALL.cache_config(num_blocks=41, max_seqs=4, max_seq_len=48, block_size=4)
  prompts = [list(range(1, n + 1)) for n in (5, 9, 2)]
  sampling = [SamplingParams(max_new_tokens=20)] * 3
  cache, first = prefill(init_cache(cfg), prompts, [2, 0, 3], sampling)
  state = DecodeState.create(first + [0], [2, 0, 3, -1], sampling + [SamplingParams()])
  lens = [len(p) for p in prompts]
  for step in range(STEPS):  # one step per call: compare the state around each step
    calls.clear()
    before = jax.tree.map(np.asarray, (cache.allocator, cache.block_tables))
    cache, state, _, steps, status = run_loop(cache, state, num_steps=1)
    jax.effects_barrier()
    assert int(steps) == 1 and not np.any(np.asarray(status))
    crosses = any(n % cfg.block_size == 0 for n in lens)  # the new token opens a block
    assert len(calls) == int(crosses), f"step {step}: lengths {lens}"
    after = jax.tree.map(np.asarray, (cache.allocator, cache.block_tables))
    same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(after), strict=True))
    assert same != crosses
    lens = [n + 1 for n in lens]
  assert [int(n) for n in np.asarray(cache.seq_lens)[[2, 0, 3]]] == lens
  assert bool(check_invariants(cache).ok)


def test_cpu_programs_compile_without_the_fusion_emitters_and_agree(monkeypatch):
  """The jitted entry points compile with ``cpu_compiler_options()`` when the default backend is
  the CPU and with XLA's defaults elsewhere; both programs give the reference's greedy tokens."""
  import jax_paged_kv.serving.decoding as decoding

  options = decoding.cpu_compiler_options()
  # JAX 0.10's XLA has the option; later ones always use the emitters (and reject it).
  assert options == ({"xla_cpu_use_fusion_emitters": False}
                     if jax.__version_info__ < (0, 11) else {})
  for fn in (prefill_step, decode_loop, decoding.decode_step):
    assert fn._pick() is fn._cpu
    assert (fn._cpu is not fn._default) == bool(options)
    assert fn.__wrapped__.__name__ == fn.__name__
  rng = np.random.default_rng(4)
  prompts = [rng.integers(0, 128, n).tolist() for n in (6, 3)]
  sampling = [SamplingParams(max_new_tokens=8)] * 2
  refs = [reference_greedy(PARAMS, SMALL, p, 8) for p in prompts]
  outs = {}
  for backend in ("cpu", "gpu"):  # "gpu": the dispatch only; the programs still run on the CPU
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    want = decode_loop._cpu if backend == "cpu" else decode_loop._default
    assert decode_loop._pick() is want
    cache = init_cache(CACHE, pool_fill=float("nan"))
    cache, first = prefill(cache, prompts, [0, 1], sampling)
    _, outs[backend], _ = decode_all(cache, first, [0, 1], sampling, calls=2)
  assert outs["cpu"] == outs["gpu"] == refs


def test_entry_points_run_nested_in_a_users_jit():
  """Inside another trace the entry points use plain ``jit`` (``compiler_options`` are refused
  on a nested jit): with traced arguments, and with every argument a closed-over constant."""
  import jax.numpy as jnp

  import jax_paged_kv.serving.decoding as decoding

  cache = init_cache(CACHE, pool_fill=float("nan"))
  cache, _ = allocate_sequences(cache, np.asarray([0, 1], np.int32))
  tokens = jnp.asarray([3, 9], jnp.int32)
  ids = jnp.asarray([0, 1], jnp.int32)
  step = functools.partial(decoding.decode_step, model=SMALL)
  top = step(PARAMS, jax.tree.map(jnp.copy, cache), tokens, ids)[1]
  traced = jax.jit(lambda c: step(PARAMS, c, tokens, ids)[1])(jax.tree.map(jnp.copy, cache))
  consts = jax.tree.map(jnp.copy, cache)
  closed = jax.jit(lambda: step(PARAMS, consts, tokens, ids)[1])()
  np.testing.assert_allclose(np.asarray(traced), np.asarray(top), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(closed), np.asarray(top), rtol=1e-5, atol=1e-5)


def _two_rows():
  cache = init_cache(SMALL.cache_config(num_blocks=16, max_seqs=2, max_seq_len=32,
                                        block_size=4))
  cache, _ = allocate_sequences(cache, np.asarray([0, 1], np.int32))
  cache, _, status = decode_step(PARAMS, cache, np.asarray([3, 4], np.int32),
                                 np.asarray([0, 1], np.int32), model=SMALL)
  assert not np.any(np.asarray(status))
  return cache


def _assert_unchanged(out, cache):
  for x, y in zip(jax.tree_util.tree_leaves(out.replace(telemetry=cache.telemetry)),
                  jax.tree_util.tree_leaves(cache), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_step_refuses_tokens_outside_the_vocabulary():
  """Token 5000 (vocab 128) was clamped to token 127 with status OK; now the step fails with
  INVALID_TOKEN on that row and changes nothing."""
  cache = _two_rows()
  keep = jax.tree_util.tree_map(np.asarray, cache)
  for bad in (SMALL.vocab_size, 5000, -7):
    out, _, status = decode_step(PARAMS, jax.tree_util.tree_map(jnp.asarray, keep),
                                 np.asarray([bad, 5], np.int32), np.asarray([0, 1], np.int32),
                                 model=SMALL)
    assert np.asarray(status)[0] == Status.INVALID_TOKEN
    _assert_unchanged(out, keep)
  with pytest.raises(ValueError, match="token must be an integer"):
    DecodeState.create([1.7], [0], [SamplingParams()])


def test_a_step_refuses_rows_longer_than_max_blocks():
  """max_blocks bounds the table columns attention reads: a row growing past it would attend
  without its later keys (NaN logits became token 0 with status OK). It fails with
  SEQUENCE_TOO_LONG and nothing changes."""
  cache = _two_rows()  # one token per row; block 4
  keep = jax.tree_util.tree_map(np.asarray, cache)
  tokens = np.zeros((2, 4), np.int32)
  args = (np.zeros(2, np.float32), np.zeros(2, np.int32), np.ones(2, np.float32),
          np.stack([make_key(0)] * 2), np.zeros(2, np.int32))
  out, _, _, status = prefill_step(PARAMS, cache, tokens, np.asarray([0, 1], np.int32),
                                   np.asarray([4, 3], np.int32), *args, model=SMALL,
                                   max_blocks=1)
  assert list(np.asarray(status)) == [Status.SEQUENCE_TOO_LONG, 0]  # 1 + 4 > 4; 1 + 3 fits
  _assert_unchanged(out, keep)


def test_steps_refuse_a_cache_of_another_geometry():
  """A protocol model is checked against the cache at trace time by every step entry point
  (a 1-layer cache under a 2-layer model read zeros for layer 1 with status OK)."""
  cc = SMALL.cache_config(num_blocks=8, max_seqs=1, max_seq_len=16, block_size=4)
  cache = init_cache(dataclasses.replace(cc, num_layers=cc.num_layers - 1))
  with pytest.raises(CacheShapeError, match="does not fit the model"):
    decode_step(PARAMS, cache, np.asarray([1], np.int32), np.asarray([0], np.int32),
                model=SMALL)


def test_tiny_temperatures_sample_the_argmax():
  """logits / 2e-38 overflowed to +inf and the draw took the first token (the lowest logit);
  a subnormal temperature (flushed to 0) gave 0 / 0 = NaN and, with a filter, token 0."""
  from jax_paged_kv.serving.decoding import filtered_logits

  keys = jax.random.split(jax.random.key(0), 6)
  # Host arrays: a subnormal stays subnormal (jnp.full would flush it to 0, i.e. greedy).
  for logits, best in ((np.asarray([[100.0, 300.0, 200.0]] * 6, np.float32), 1),
                       (np.eye(8, dtype=np.float32)[[5] * 6] * 3, 5)):
    for t in (1e-39, 2e-38, 1e-30, 1e-3):
      for top_k, top_p, min_p in ((0, 1.0, 0.0), (2, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.9, 0.0),
                                  (0, 1.0, 0.1)):
        args = (np.full(6, t, np.float32), np.full(6, top_k, np.int32),
                np.full(6, top_p, np.float32), np.full(6, min_p, np.float32))
        # Eager for subnormals (op by op, the division saw a flushed 0), jitted for the rest.
        wrap = (lambda f: f) if t < np.finfo(np.float32).tiny else jax.jit
        got = wrap(sample_tokens)(jnp.asarray(logits), keys, *args)
        assert np.asarray(got).tolist() == [best] * 6, (t, top_k, top_p, min_p)
        z = np.asarray(wrap(filtered_logits)(jnp.asarray(logits), *args))
        assert not np.isnan(z).any() and (np.argmax(z, axis=1) == best).all(), (t, z)


@pytest.mark.parametrize("kw, match", [
    (dict(head_dim=8.9), "head_dim"), (dict(rms_norm_eps=float("inf")), "finite"),
    (dict(rope_theta=float("inf")), "finite")])
def test_model_configs_refuse_truncation_and_infinities(kw, match):
  with pytest.raises(ValueError, match=match):
    dataclasses.replace(SMALL, **kw)
