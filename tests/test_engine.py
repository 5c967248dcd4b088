"""Continuous batching: outputs against full recomputation, batch invariance, preemption."""

import jax
import numpy as np
import pytest

import jax_paged_kv as pk
from jax_paged_kv import (
  CacheStrategy,
  PoolExhaustedError,
  SequenceTooLongError,
  cache_stats,
  check_invariants,
)
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine, generate
from tests.llama_fixtures import SMALL
from tests.llama_reference import (
  check_top_logprobs,
  reference_greedy,
  reference_log_softmax,
  reference_logprobs,
)

PARAMS = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)
# One compiled shape per step kind (batch width = max_batch, all table columns).
FIXED = dict(prefill_chunk=8, decode_steps=4, batch_bucket_min=4, bucket_blocks=False)
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(0, 128, n).tolist() for n in (3, 17, 9, 30, 6, 12)]
NEW = 10
REFS = [reference_greedy(PARAMS, SMALL, p, NEW) for p in PROMPTS]


def cache_config(num_blocks, strategy=CacheStrategy.PAGED, max_seqs=4):
  return SMALL.cache_config(num_blocks=num_blocks, max_seqs=max_seqs, max_seq_len=48,
                            block_size=4, strategy=strategy)


@pytest.mark.parametrize("strategy", [CacheStrategy.PAGED, CacheStrategy.CONTIGUOUS])
def test_generate_matches_recomputation(strategy):
  cc = cache_config(1 + 4 * 12, strategy)
  stop = REFS[2][3]
  sampling = [SamplingParams(max_new_tokens=NEW)] * len(PROMPTS)
  sampling[2] = SamplingParams(max_new_tokens=NEW, stop_tokens=(stop,))
  outs = generate(PARAMS, SMALL, PROMPTS, sampling, cache_config=cc, **FIXED)
  for i, (out, ref) in enumerate(zip(outs, REFS, strict=True)):
    want = ref[:ref.index(stop) + 1] if i == 2 else ref
    assert out == want, i


def test_batch_invariance_and_late_admission():
  """A sequence's output does not depend on its batch-mates or on when it was admitted."""
  cc = cache_config(1 + 4 * 12)
  # Batch widths bucketed to 1 or 4 rows: the target runs in both shapes.
  kw = dict(prefill_chunk=8, decode_steps=4, bucket_factor=4, batch_bucket_min=1,
            bucket_blocks=False)
  target = PROMPTS[3]
  sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_new_tokens=NEW)

  alone = Engine(PARAMS, SMALL, cc, **kw)
  alone.add_request(target, SamplingParams(max_new_tokens=NEW))
  alone.add_request(target, sampled)
  solo = alone.run()
  assert solo[0].tokens == REFS[3]

  crowd = Engine(PARAMS, SMALL, cc, **kw)
  crowd.add_request(PROMPTS[0], SamplingParams(max_new_tokens=NEW))
  crowd.add_request(PROMPTS[1], SamplingParams(max_new_tokens=NEW))
  crowd.step()
  crowd.step()
  ids = [crowd.add_request(target, SamplingParams(max_new_tokens=NEW))]
  crowd.add_request(PROMPTS[4], SamplingParams(max_new_tokens=NEW))
  crowd.step()
  ids.append(crowd.add_request(target, sampled))
  crowd.add_request(PROMPTS[5], SamplingParams(max_new_tokens=NEW))
  crowd.run()
  outs = crowd.finished
  assert crowd.metrics.peak_running >= 3
  assert outs[ids[0]].tokens == solo[0].tokens
  assert outs[ids[1]].tokens == solo[1].tokens
  assert outs[0].tokens == REFS[0] and outs[1].tokens == REFS[1]


def test_preemption_under_tiny_pool_completes_with_same_output():
  # 16 usable blocks of 4 tokens: the longest request alone needs 10.
  cc = cache_config(1 + 16)
  engine = Engine(PARAMS, SMALL, cc, watermark=0.0, reserve_ratio=0.0, **FIXED)
  for p in PROMPTS:
    engine.add_request(p, SamplingParams(max_new_tokens=NEW))
  outs = engine.run()
  assert engine.metrics.preemptions > 0
  assert sum(o.num_preemptions for o in outs) == engine.metrics.preemptions
  assert [o.tokens for o in outs] == REFS
  assert all(o.finish_reason == "length" for o in outs)
  stats = cache_stats(engine.cache)
  assert int(stats.free_blocks) == 16 and int(stats.active_sequences) == 0
  assert bool(check_invariants(engine.cache).ok)
  assert 0 < engine.metrics.utilization <= 1


def test_engine_rejects_bad_requests_eagerly():
  engine = Engine(PARAMS, SMALL, cache_config(1 + 8), **FIXED)
  with pytest.raises(SequenceTooLongError):
    engine.add_request([1] * 40, SamplingParams(max_new_tokens=9))
  with pytest.raises(PoolExhaustedError):
    engine.add_request([1] * 30, SamplingParams(max_new_tokens=10))  # 10 blocks > 8
  with pytest.raises(ValueError, match="empty prompt"):
    engine.add_request([])
  with pytest.raises(ValueError, match="outside"):
    engine.add_request([1, 128])
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)
  assert not engine.has_work


@pytest.mark.parametrize("strategy", [CacheStrategy.PAGED, CacheStrategy.CONTIGUOUS])
def test_host_mirror_matches_the_device_every_step(strategy):
  """The engine reads no device statistics: its host figures (tokens stored, slots
  allocated, blocks in use, the peak) equal ``cache_stats`` of the cache after every step,
  through admissions, batched frees and preemptions."""
  paged = strategy is CacheStrategy.PAGED
  cc = cache_config(1 + 14 if paged else 1 + 4 * 12, strategy)  # paged: tight, preemptions
  engine = Engine(PARAMS, SMALL, cc, watermark=0.0, reserve_ratio=0.0, **FIXED)
  for p in PROMPTS:
    engine.add_request(p, SamplingParams(max_new_tokens=NEW))
  peak = 0
  while engine.has_work:
    engine.step()
    s = cache_stats(engine.cache)
    assert engine._usage() == (int(s.tokens_stored), int(s.allocated_slots))
    if paged:
      assert engine.ledger.free_blocks() == int(s.free_blocks)
      peak = max(peak, int(s.used_blocks))
  assert engine.metrics.preemptions > 0 or not paged
  if paged:
    assert engine.metrics.peak_blocks >= peak  # the peak inside a step is not visible here
  outs = engine.finished
  assert [outs[i].tokens for i in range(len(PROMPTS))] == REFS


def test_all_greedy_programs_until_a_request_samples():
  """Until a request with temperature > 0 is added, the engine runs programs without the
  sampling branch; from then on the full ones. Greedy rows give the float64 reference either
  way, and a sampled request gives the tokens it gets from an engine in full mode from the
  start (sampling depends on its seed and position, not on the program)."""
  cc = SMALL.cache_config(num_blocks=64, max_seqs=4, max_seq_len=64, block_size=4)
  kw = dict(prefill_chunk=8, decode_steps=4, batch_bucket_min=4, bucket_blocks=False)
  sampled = SamplingParams(temperature=0.8, top_k=20, seed=5, max_new_tokens=NEW)
  engine = Engine(PARAMS, SMALL, cc, **kw)
  first = [engine.add_request(p, SamplingParams(max_new_tokens=NEW)) for p in PROMPTS[:2]]
  engine.run()
  assert engine._compiled and all(greedy for *_, greedy, _ in engine._compiled)
  later = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=NEW))
  rid = engine.add_request(PROMPTS[0], sampled)
  engine.run()
  assert any(not greedy for *_, greedy, _ in engine._compiled)
  done = engine.finished
  for i, p in zip(first + [later], PROMPTS[:3], strict=True):
    assert done[i].tokens == reference_greedy(PARAMS, SMALL, p, NEW)
  full = Engine(PARAMS, SMALL, cc, **kw)
  want = full.add_request(PROMPTS[0], sampled)
  full.run()
  assert all(not greedy for *_, greedy, _ in full._compiled)
  assert done[rid].tokens == full.finished[want].tokens


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(max_new_tokens=0), r"max_new_tokens must be in \[1,"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(top_k=2**40), r"top_k must be in \[0, 2147483647\]"),
    (dict(stop_tokens=(2**40,)), "stop token must be in"),
    (dict(stop_tokens=(1.0,)), "stop token must be an integer"),
    (dict(seed=2**32), r"seed must be in \[0, 4294967295\]"),
    (dict(seed=-1), "seed must be in"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(temperature="1"), "temperature must be a real number"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(min_p=-0.1), r"min_p must be in \[0, 1\]"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(min_p=float("nan")), r"min_p must be in \[0, 1\]"),
    (dict(min_p="0.1"), "min_p must be a real number"),
    (dict(min_p=True), "min_p must be a real number"),
    (dict(logprobs=1), "logprobs must be a bool"),
    (dict(logprobs="yes"), "logprobs must be a bool"),
    (dict(logprobs=True, top_logprobs=21), r"top_logprobs must be in \[0, 20\]"),
    (dict(logprobs=True, top_logprobs=-1), r"top_logprobs must be in \[0, 20\]"),
    (dict(logprobs=True, top_logprobs=2.0), "top_logprobs must be an integer"),
    (dict(logprobs=True, top_logprobs=True), "top_logprobs must be an integer"),
    (dict(top_logprobs=3), "top_logprobs=3 needs logprobs=True"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_sampling_params_refuse_what_the_step_cannot_hold(kwargs, match):
  """A value the compiled step would truncate or wrap is refused when the request is made, so
  one bad request can never wedge an engine that serves others."""
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_distinct_seeds_draw_distinct_tokens_up_to_2_pow_32():
  from jax_paged_kv.serving.decoding import make_key
  keys = {tuple(make_key(SamplingParams(seed=s).seed)) for s in (0, 1, 2**31, 2**32 - 1)}
  assert len(keys) == 4


def test_engine_refuses_bad_tokens_and_batch_sizes():
  engine = Engine(PARAMS, SMALL, cache_config(1 + 8), **FIXED)
  for prompt in ([1.7, 2.2], [True, 3], ["1"]):
    with pytest.raises(ValueError, match="prompt token must be an integer"):
      engine.add_request(prompt)
  with pytest.raises(ValueError, match="stop token 128 is outside"):
    engine.add_request([1, 2], SamplingParams(stop_tokens=(128,)))
  with pytest.raises(TypeError, match="SamplingParams"):
    engine.add_request([1, 2], {"max_new_tokens": 3})
  assert not engine.has_work
  for max_batch in (0, -1, 1.5):
    with pytest.raises(ValueError, match="max_batch"):
      Engine(PARAMS, SMALL, cache_config(1 + 8), max_batch=max_batch, **FIXED)


def test_compile_seconds_counts_jax_compile_events_and_nothing_warm():
  """``metrics.compile_seconds`` is JAX's own compile time inside the steps (checked against a
  listener of the test's own), and 0 for a second engine that runs the same programs."""
  from jax_paged_kv.serving.engine.metrics import COMPILE_EVENTS, compile_timer

  cc = cache_config(1 + 4 * 12 + 3)  # a pool size no other test uses: these programs are new
  seen = []

  def listener(name, seconds, **_):
    if name in COMPILE_EVENTS:
      seen.append(seconds)

  runs = []
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for _ in range(2):
      engine = Engine(PARAMS, SMALL, cc, **FIXED)
      for p in PROMPTS[:3]:
        engine.add_request(p, SamplingParams(max_new_tokens=4))
      before = len(seen)
      engine.run()
      runs.append((engine.metrics.compile_seconds, sum(seen[before:]), engine.metrics))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  (cold, cold_events, m), (warm, warm_events, _) = runs
  assert cold_events > 0 and cold == pytest.approx(cold_events, rel=1e-9)
  assert cold < m.wall_seconds
  assert warm == 0.0 and warm_events == 0.0

  # Per thread: a compile on another thread does not reach this thread's timer.
  import threading

  with compile_timer() as mine:
    t = threading.Thread(target=lambda: jax.jit(lambda x: x * 3 + 1)(np.ones(7, np.float32)))
    t.start()
    t.join()
  assert mine[0] == 0.0
  with compile_timer() as outer:
    with compile_timer() as inner:  # equal values when it closes: the outer one keeps counting
      jax.jit(lambda x: x * 5 + 2)(np.ones(9, np.float32))
    jax.jit(lambda x: x * 7 + 4)(np.ones(11, np.float32))
  assert outer[0] > inner[0] > 0
  with compile_timer() as after:
    jax.jit(lambda x: x * 9 + 6)(np.ones(13, np.float32))
  assert after[0] > 0 and inner[0] < outer[0]  # closed timers count nothing more


@pytest.mark.parametrize("strategy", [CacheStrategy.PAGED, CacheStrategy.CONTIGUOUS])
def test_abort_running_and_waiting_requests(strategy):
  """Aborted requests stop where they were, give their blocks back at once, and change
  nothing for the others (float64 greedy references)."""
  cc = cache_config(1 + 4 * 12, strategy)
  engine = Engine(PARAMS, SMALL, cc, **FIXED)
  ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW)) for p in PROMPTS]
  engine.step()
  engine.step()
  engine.step()
  decoding = [r.out.request_id for r in engine.scheduler.running if r.out.tokens]
  waiting = [r.out.request_id for r in engine.scheduler.waiting]
  assert len(decoding) >= 2 and len(waiting) == 2, (decoding, waiting)
  victim_run, victim_wait = decoding[1], waiting[-1]
  lens_before = np.asarray(engine.cache.seq_lens).copy()
  slot = next(r.slot for r in engine.scheduler.running if r.out.request_id == victim_run)
  assert lens_before[slot] > 0
  out = engine.abort_request(victim_run)
  assert out.finish_reason == "abort" and out.request_id == victim_run
  assert 0 < len(out.tokens) < NEW and out.tokens == REFS[victim_run][:len(out.tokens)]
  # Its slot is free now, not at the next step: the others' lengths are untouched.
  lens = np.asarray(engine.cache.seq_lens)
  assert lens[slot] == 0 and not bool(np.asarray(engine.cache.active)[slot])
  np.testing.assert_array_equal(np.delete(lens, slot), np.delete(lens_before, slot))
  if strategy is CacheStrategy.PAGED:
    held = int(engine.ledger.held_at(engine.ledger.lens).sum())
    assert int(engine.cache.allocator.num_free) == cc.usable_blocks - held
  out_w = engine.abort_request(victim_wait)
  assert out_w.finish_reason == "abort" and out_w.tokens == []
  assert engine.num_waiting == 1
  # Already aborted: None; never issued: KeyError; not an integer: ValueError.
  assert engine.abort_request(victim_run) is None
  with pytest.raises(KeyError, match="no request 6"):
    engine.abort_request(len(PROMPTS))
  with pytest.raises(KeyError, match="no request -1"):
    engine.abort_request(-1)
  with pytest.raises(ValueError, match="request_id must be an integer"):
    engine.abort_request(1.0)
  while engine.has_work:
    engine.step()
    report = check_invariants(engine.cache)
    assert bool(report.ok), report.failures()
  done = engine.finished
  assert sorted(done) == ids and engine.metrics.aborted_requests == 2
  for i in ids:
    if i not in (victim_run, victim_wait):
      assert done[i].tokens == REFS[i] and done[i].finish_reason == "length", i
  assert engine.abort_request(ids[0]) is None  # finished: nothing to stop
  stats = cache_stats(engine.cache)
  assert int(stats.active_sequences) == 0
  if strategy is CacheStrategy.PAGED:
    assert int(stats.free_blocks) == cc.usable_blocks
  # pop_finished hands the outputs out once, and the engine forgets them.
  popped = engine.pop_finished()
  assert sorted(popped) == ids and popped[ids[0]].tokens == REFS[0]
  assert engine.finished == {} and engine.pop_finished() == {}
  rid = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=NEW))
  engine.run()
  assert list(engine.pop_finished()) == [rid]


def test_stream_deltas_concatenate_to_the_reference_under_preemption():
  """Token streaming: after every yield each request's streamed tokens are exactly what it has
  generated so far (nothing held back, nothing taken back by a recompute preemption), and they
  concatenate to the float64 reference; a request added mid-stream that finishes in its first
  step, and one aborted mid-stream, each get their last delta."""
  cc = cache_config(1 + 16)  # the tiny pool: preemption
  engine = Engine(PARAMS, SMALL, cc, watermark=0.0, reserve_ratio=0.0, **FIXED)
  ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW)) for p in PROMPTS]
  got = {}
  finals = {}
  late = aborted = None
  for deltas in engine.stream():
    assert [d.request_id for d in deltas] == sorted({d.request_id for d in deltas})
    for d in deltas:
      assert d.request_id not in finals, "a delta after the request's last one"
      got.setdefault(d.request_id, []).extend(d.tokens)
      if d.finish_reason is not None:
        finals[d.request_id] = d.finish_reason
    in_flight = [r.out for r in (*engine.scheduler.running, *engine.scheduler.waiting)]
    for out in in_flight:  # no lag: what was streamed is all it has
      assert got.get(out.request_id, []) == out.tokens, out.request_id
    if aborted is None and engine.metrics.preemptions:  # after the first preemption
      late = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=1))
      victim = next(o for o in in_flight if o.tokens)
      aborted = victim.request_id
      assert engine.abort_request(aborted).finish_reason == "abort"
  assert engine.metrics.preemptions > 0
  assert finals.pop(aborted) == "abort"
  cut = engine.finished[aborted].tokens
  assert got.pop(aborted) == cut == REFS[aborted][:len(cut)] and cut
  assert finals == {i: "length" for i in ids + [late] if i != aborted}
  for i in ids:
    if i != aborted:
      assert got[i] == REFS[i], i
  assert got[late] == REFS[2][:1]
  # A request admitted, prefilled and finished within one step streams too.
  rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=1))
  assert list(engine.stream()) == [[pk.StreamDelta(rid, tuple(REFS[0][:1]), "length")]]
  assert int(cache_stats(engine.cache).free_blocks) == 16


def stream_field(engine, field: str) -> dict[int, list]:
  """Runs ``engine.stream()`` to the end; per request, the concatenation of its deltas'
  ``field`` (each, when present, one entry per token of its delta)."""
  streamed = {}
  for deltas in engine.stream():
    for d in deltas:
      if getattr(d, field) is not None:
        assert len(getattr(d, field)) == len(d.tokens)
        streamed.setdefault(d.request_id, []).extend(getattr(d, field))
  return streamed


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_logprobs_match_the_float64_model_under_preemption_and_sampling(preemption):
  """``SamplingParams(logprobs=True)``: one log-probability per token, the model's raw
  distribution at it (before temperature / top-k), through prefill (first token), decode, a
  stop token inside the decode loop, preemption (the re-prefilled request's next token too) and
  streaming; a request that did not ask gets None."""
  cc = cache_config(1 + 16)  # the tiny pool: preemption
  engine = Engine(PARAMS, SMALL, cc, watermark=0.0, reserve_ratio=0.0, preemption=preemption,
                  **FIXED)
  kinds = [SamplingParams(max_new_tokens=NEW, logprobs=True),
           SamplingParams(max_new_tokens=NEW, temperature=1.5, top_k=5, seed=4, logprobs=True),
           SamplingParams(max_new_tokens=NEW, stop_tokens=(REFS[2][6],), logprobs=True)]
  ids = [engine.add_request(p, kinds[i % 3]) for i, p in enumerate(PROMPTS)]
  plain = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=NEW))
  streamed = stream_field(engine, "logprobs")
  outs = engine.finished
  assert any(outs[i].num_preemptions for i in ids), "no logprobs request was preempted"
  assert outs[plain].logprobs is None and outs[plain].tokens == REFS[0]
  assert plain not in streamed
  assert any(lp for *_, lp in engine._compiled)
  for i in ids:
    out = outs[i]
    assert len(out.logprobs) == len(out.tokens)
    if i % 3 == 0:
      assert out.tokens == REFS[i]
    if i == 2:  # stopped inside a decode loop, on its 7th token
      assert out.finish_reason == "stop" and out.tokens == REFS[2][:7]
    want = reference_logprobs(PARAMS, SMALL, PROMPTS[i], out.tokens)
    np.testing.assert_allclose(out.logprobs, want, atol=2e-4, rtol=0)
    assert streamed[i] == out.logprobs


def test_decode_loop_logprobs_are_an_extra_output():
  from jax_paged_kv.serving.decoding import DecodeState, decode_loop, prefill_step, token_logprobs
  cc = cache_config(1 + 16)
  prompt = PROMPTS[1]
  runs = []
  for ret in (False, True):
    cache = pk.init_cache(cc)
    cache, _ = pk.allocate_sequences(cache, np.int32([0]))
    toks = np.zeros((1, len(prompt)), np.int32)
    toks[0] = prompt
    one = np.ones(1, np.float32)
    cache, first, logits, _ = prefill_step(
        PARAMS, cache, toks, np.int32([0]), np.int32([len(prompt)]), 0 * one,
        np.int32([0]), one, np.zeros((1, 2), np.uint32), np.int32([0]), model=SMALL)
    lp0 = float(token_logprobs(logits, first)[0])
    state = DecodeState.create([int(first[0])], [0], [SamplingParams(max_new_tokens=NEW)])
    res = decode_loop(PARAMS, cache, state, np.int32(6), max_steps=6, model=SMALL,
                      **({"return_logprobs": True} if ret else {}))
    assert len(res) == (6 if ret else 5)
    runs.append(res)
  out = np.asarray(runs[1][2])[0]
  np.testing.assert_array_equal(out, np.asarray(runs[0][2])[0])  # same tokens either way
  got = [lp0] + np.asarray(runs[1][5])[0].tolist()
  toks = [int(first[0])] + out.tolist()
  assert toks == REFS[1][:7]
  want = reference_logprobs(PARAMS, SMALL, prompt, toks)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
  assert np.isnan(token_logprobs(logits, np.int32([-1]))[0])


def test_trace_steps_bounds_the_per_step_traces():
  """``trace_steps``: the traces keep the last steps of an unbounded run's (same workload),
  between n and 2n of them; the whole-run counters are unchanged."""
  runs = []
  for limit in (None, 3):
    engine = Engine(PARAMS, SMALL, cache_config(1 + 16), watermark=0.0, reserve_ratio=0.0,
                    trace_steps=limit, **FIXED)
    for p in PROMPTS:
      engine.add_request(p, SamplingParams(max_new_tokens=NEW))
    outs = engine.run()
    assert [o.tokens for o in outs] == REFS
    runs.append(engine.metrics)
  full, short = runs
  assert full.steps == short.steps > 6 and len(full.running_trace) == full.steps
  assert 3 <= len(short.running_trace) < 6
  n = len(short.running_trace)
  assert len(short.util_trace) == len(short.time_trace) == n
  assert short.running_trace == full.running_trace[-n:]
  np.testing.assert_array_equal(short.util_trace, full.util_trace[-n:])
  assert (short.util_tokens, short.util_slots, short.peak_running) == (
      full.util_tokens, full.util_slots, full.peak_running)
  with pytest.raises(ValueError, match="trace_steps must be in"):
    Engine(PARAMS, SMALL, cache_config(1 + 16), trace_steps=0)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_top_logprobs_match_the_float64_model_under_preemption_and_sampling(preemption):
  """``SamplingParams(top_logprobs=k)``: per token, the k most likely tokens at its position
  and their log-probabilities (the float64 model's top k, most likely first), whatever k each
  request asks (one compiled width), through prefill, decode, a stop token, preemption and
  streaming; the chosen token's entry, when it is among them, is its ``logprobs`` value."""
  cc = cache_config(1 + 16)
  engine = Engine(PARAMS, SMALL, cc, watermark=0.0, reserve_ratio=0.0, preemption=preemption,
                  **FIXED)
  kinds = [SamplingParams(max_new_tokens=NEW, logprobs=True, top_logprobs=1),
           SamplingParams(max_new_tokens=NEW, temperature=1.5, top_k=5, seed=4, logprobs=True,
                          top_logprobs=20),
           SamplingParams(max_new_tokens=NEW, stop_tokens=(REFS[2][6],), logprobs=True,
                          top_logprobs=5)]
  ids = [engine.add_request(p, kinds[i % 3]) for i, p in enumerate(PROMPTS)]
  only_lp = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=NEW, logprobs=True))
  streamed = stream_field(engine, "top_logprobs")
  outs = engine.finished
  assert any(outs[i].num_preemptions for i in ids), "no top_logprobs request was preempted"
  assert outs[only_lp].top_logprobs is None and only_lp not in streamed
  assert outs[only_lp].tokens == REFS[1]
  assert {lp for kind, *_, lp in engine._compiled if kind == "decode"} == {20}  # one width
  for i in ids:
    out, k = outs[i], kinds[i % 3].top_logprobs
    if i % 3 != 1:  # greedy: the reference tokens, each the top alternative
      assert out.tokens == (REFS[2][:7] if i == 2 else REFS[i])
      assert [alts[0][0] for alts in out.top_logprobs] == out.tokens
    ref = reference_log_softmax(PARAMS, SMALL, PROMPTS[i], out.tokens)
    check_top_logprobs(out.top_logprobs, out.tokens, ref, k)
    for t, lp, alts in zip(out.tokens, out.logprobs, out.top_logprobs, strict=True):
      assert dict(alts).get(t, lp) == lp
    assert streamed[i] == out.top_logprobs


def test_decode_loop_top_logprobs_are_two_more_outputs():
  """decode_loop(top_logprobs=k): ``int32[batch, steps, k]`` tokens and their log-probabilities
  at each generated position (-1 / NaN for steps a row did not take: it finished, or it is
  padding), against the float64 model; the tokens and logprobs are those of a run without;
  without ``return_logprobs`` it is refused."""
  from jax_paged_kv.serving.decoding import (
    DecodeState,
    decode_loop,
    prefill_step,
    top_token_logprobs,
  )
  cc = cache_config(1 + 16)
  rows, n, k = (1, 3), 6, 4
  width = max(len(PROMPTS[i]) for i in rows)
  toks = np.zeros((3, width), np.int32)
  for r, i in enumerate(rows):
    toks[r, :len(PROMPTS[i])] = PROMPTS[i]
  lens = np.int32([len(PROMPTS[i]) for i in rows] + [0])
  one = np.ones(3, np.float32)
  runs = []
  for extra in ({"return_logprobs": True}, {"return_logprobs": True, "top_logprobs": k}):
    cache = pk.init_cache(cc)
    cache, _ = pk.allocate_sequences(cache, np.int32([0, 1]))
    cache, first, logits, _ = prefill_step(
        PARAMS, cache, toks, np.int32([0, 1, -1]), lens, 0 * one, np.int32([0] * 3), one,
        np.zeros((3, 2), np.uint32), np.int32([0] * 3), model=SMALL)
    first = np.asarray(first)
    state = DecodeState.create([int(first[0]), int(first[1]), 0], [0, 1, -1],
                               [SamplingParams(max_new_tokens=NEW),
                                SamplingParams(max_new_tokens=3), SamplingParams()])
    res = decode_loop(PARAMS, cache, state, np.int32(n), max_steps=n, model=SMALL, **extra)
    assert len(res) == 5 + len(extra) + ("top_logprobs" in extra)
    runs.append(res)
  np.testing.assert_array_equal(runs[1][2], runs[0][2])  # same tokens and logprobs either way
  np.testing.assert_array_equal(runs[1][5], runs[0][5])
  out, top_t, top_v = (np.asarray(runs[1][i]) for i in (2, 6, 7))
  assert top_t.shape == top_v.shape == (3, n, k) and top_t.dtype == np.int32
  for r, i in enumerate(rows):
    taken = out[r] >= 0
    assert taken.sum() == (n if r == 0 else 2)  # row 1 stops at max_new_tokens=3
    assert np.all(top_t[r, ~taken] == -1) and np.all(np.isnan(top_v[r, ~taken]))
    gen = [int(first[r])] + out[r, taken].tolist()
    assert gen == REFS[i][:len(gen)]
    ref = reference_log_softmax(PARAMS, SMALL, PROMPTS[i], gen)[1:]
    alts = [tuple(zip(top_t[r, s].tolist(), top_v[r, s].tolist(), strict=True))
            for s in np.flatnonzero(taken)]
    check_top_logprobs(alts, gen[1:], ref, k)
  assert np.all(top_t[2] == -1) and np.all(np.isnan(top_v[2]))  # the padding row
  with pytest.raises(ValueError, match="needs return_logprobs=True"):
    decode_loop(PARAMS, pk.init_cache(cc), runs[0][1], np.int32(n), max_steps=n, model=SMALL,
                top_logprobs=3)
  with pytest.raises(ValueError, match=r"k=129 is outside \[0, vocab=128\]"):
    top_token_logprobs(np.zeros((1, 128), np.float32), 129)


def test_engine_refuses_top_logprobs_beyond_the_vocabulary():
  """A model with a vocabulary of 16 has no 20 alternatives: refused at add_request, before
  any program runs; 16 are served (the programs' fixed width shrinks to the vocabulary)."""
  import dataclasses
  tiny = dataclasses.replace(SMALL, vocab_size=16)
  params = init_params(tiny, jax.random.PRNGKey(1), scale=2.0)
  engine = Engine(params, tiny, tiny.cache_config(num_blocks=17, max_seqs=2, max_seq_len=48,
                                                  block_size=4), **FIXED)
  with pytest.raises(ValueError, match=r"top_logprobs=17 exceeds the vocabulary \(16\)"):
    engine.add_request([1, 2], SamplingParams(logprobs=True, top_logprobs=17))
  assert not engine.has_work
  rid = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=3, logprobs=True,
                                                     top_logprobs=16))
  out = {o.request_id: o for o in engine.run()}[rid]
  ref = reference_log_softmax(params, tiny, [1, 2, 3], out.tokens)
  check_top_logprobs(out.top_logprobs, out.tokens, ref, 16)


def test_min_p_reaches_prefill_and_decode():
  """A request sampled at temperature 1.5 under min_p=1 keeps only the most likely token at
  every step, prefill's first token and the decode loop's: the float64 model's greedy tokens
  (a lost min_p would sample others), beside an unfiltered sampled request; min_p=0 with
  temperature 0 is plain greedy."""
  engine = Engine(PARAMS, SMALL, cache_config(1 + 32), **FIXED)
  hot = [engine.add_request(p, SamplingParams(max_new_tokens=NEW, temperature=1.5, seed=i,
                                              min_p=1.0)) for i, p in enumerate(PROMPTS[:3])]
  wild = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=NEW, temperature=1.5,
                                                       seed=9))
  cold = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=NEW, min_p=0.0))
  outs = {o.request_id: o for o in engine.run()}
  for i, rid in enumerate(hot):
    assert outs[rid].tokens == REFS[i], i
  assert outs[wild].tokens != REFS[0]  # the same temperature without min_p samples
  assert outs[cold].tokens == REFS[3]
