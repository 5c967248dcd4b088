"""Repetition, presence and frequency penalties: the tables and their application against a
float64 numpy model of vLLM's semantics, and penalised greedy decoding end to end (decode
loop, engine, preemption) against the float64 model."""

import jax
import numpy as np
import pytest

import jax_paged_kv as pk
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import (
  DecodeState,
  Penalties,
  SamplingParams,
  decode_loop,
  prefill_step,
)
from jax_paged_kv.serving.engine import Engine
from tests.llama_fixtures import SMALL
from tests.llama_reference import (
  penalise,
  reference_greedy,
  reference_greedy_penalised,
  reference_logits,
  reference_logprobs,
)

PARAMS = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)
RNG = np.random.default_rng(3)
PROMPTS = [RNG.integers(0, 128, n).tolist() for n in (3, 17, 9, 30, 6, 12)]
NEW = 12
FIXED = dict(prefill_chunk=8, decode_steps=4, batch_bucket_min=4, bucket_blocks=False)
KINDS = [dict(repetition_penalty=1.8), dict(presence_penalty=2.0, frequency_penalty=1.5),
         dict(repetition_penalty=0.7, frequency_penalty=-0.5), dict()]


def cache_config(num_blocks, max_seqs=4):
  return SMALL.cache_config(num_blocks=num_blocks, max_seqs=max_seqs, max_seq_len=48,
                            block_size=4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=True), "repetition_penalty must be a real number"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=float("nan")), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(presence_penalty="1"), "presence_penalty must be a real number"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_sampling_params_refuse_bad_penalties(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_tables_and_application_match_numpy():
  """Penalties.create counts each row's prompt and output (repeats, a token in both, an
  out-of-vocabulary id that counts for nothing, an empty padding row); apply matches the float64
  model on positive, negative and zero logits; update counts only the rows that took a token."""
  v = 40
  prompts = [[1, 2, 2, 39], [5], [], [7, 7, 7]]
  outputs = [[2, 3, 3, 3], [5, 6, 99], [], [8]]
  samp = [SamplingParams(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25),
          SamplingParams(repetition_penalty=0.5, presence_penalty=-1.0),
          SamplingParams(), SamplingParams(frequency_penalty=2.0)]
  pen = Penalties.create(prompts, outputs, samp, v)
  assert pen.seen.shape == pen.counts.shape == (4, v)
  logits = RNG.normal(size=(4, v)).astype(np.float32) * 3
  logits[:, 0] = 0.0
  got = np.asarray(pen.apply(logits))
  for i, s in enumerate(samp):
    out = [t for t in outputs[i] if t < v]
    want = penalise(logits[i], prompts[i], out, s.repetition_penalty, s.presence_penalty,
                    s.frequency_penalty)
    np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6, err_msg=str(i))
  assert not np.array_equal(got[0], logits[0]) and np.array_equal(got[2], logits[2])
  toks, take = np.int32([3, 9, 4, 8]), np.asarray([True, True, False, True])
  upd = pen.update(toks, take)
  for i in range(4):
    out = [t for t in outputs[i] if t < v] + ([int(toks[i])] if take[i] else [])
    np.testing.assert_array_equal(np.asarray(upd.counts[i]), np.bincount(out, minlength=v))
    seen = np.bincount(out + prompts[i], minlength=v) > 0
    np.testing.assert_array_equal(np.asarray(upd.seen[i]), seen)
  with pytest.raises(ValueError, match="more than length=4"):
    Penalties.create([[1] * 5], [[]], [samp[0]], v, length=4)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_engine_penalised_greedy_matches_the_float64_model(preemption):
  """Greedy requests with each kind of penalty (and one without) through the engine with a
  pool small enough to preempt: each gives the float64 model's penalised greedy tokens (prefill's
  first token on the prompt's counts, the decode loop's on the growing output, a re-prefilled
  request's on what it had generated); logprobs stay the raw distribution's."""
  engine = Engine(PARAMS, SMALL, cache_config(1 + 16), watermark=0.0, reserve_ratio=0.0,
                  preemption=preemption, **FIXED)
  ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW, logprobs=True,
                                              **KINDS[i % 4]))
         for i, p in enumerate(PROMPTS)]
  outs = {o.request_id: o for o in engine.run()}
  assert any(outs[i].num_preemptions for i in ids), "no request was preempted"
  changed = 0
  for i in ids:
    kw = KINDS[i % 4]
    want = reference_greedy_penalised(PARAMS, SMALL, PROMPTS[i], NEW, **kw)
    assert outs[i].tokens == want, (i, kw)
    changed += want != reference_greedy(PARAMS, SMALL, PROMPTS[i], NEW)
    np.testing.assert_allclose(outs[i].logprobs,
                               reference_logprobs(PARAMS, SMALL, PROMPTS[i], want),
                               atol=2e-4, rtol=0)
  assert changed >= 3  # the penalties changed what greedy decoding picks


def test_decode_loop_carries_the_counts_across_calls():
  """Two decode_loop calls of 4 steps continue from the returned state (its counts updated by
  the loop) exactly as one call of 8; a state with penalties needs the rows' history."""
  prompt, kw = PROMPTS[1], {**KINDS[1], "repetition_penalty": 1.8}
  want = reference_greedy_penalised(PARAMS, SMALL, prompt, 9, **kw)
  samp = SamplingParams(max_new_tokens=20, **kw)
  runs = []
  for chunks in ((8,), (4, 4)):
    engine_cache = pk.init_cache(cache_config(1 + 16))
    engine_cache, _ = pk.allocate_sequences(engine_cache, np.int32([0]))
    toks = np.asarray([prompt], np.int32)
    one = np.ones(1, np.float32)
    pen = Penalties.create([prompt], [[]], [samp], SMALL.vocab_size)
    engine_cache, first, _, _ = prefill_step(
        PARAMS, engine_cache, toks, np.int32([0]), np.int32([len(prompt)]), 0 * one,
        np.int32([0]), one, np.zeros((1, 2), np.uint32), np.int32([0]), model=SMALL,
        penalties=pen)
    got = [int(first[0])]
    state = DecodeState.create(got, [0], [samp], history=[(prompt, got)],
                               vocab_size=SMALL.vocab_size)
    for n in chunks:
      engine_cache, state, out, _, _ = decode_loop(PARAMS, engine_cache, state, np.int32(n),
                                                   max_steps=n, model=SMALL)
      got += [int(t) for t in np.asarray(out)[0] if t >= 0]
    runs.append(got)
  assert runs[0] == runs[1] == want
  with pytest.raises(ValueError, match="pass history"):
    DecodeState.create([1], [0], [samp])
  with pytest.raises(ValueError, match="history needs vocab_size"):
    DecodeState.create([1], [0], [SamplingParams()], history=[([1], [1])])


def _prefill_rows(cache, contexts, penalties):
  """One prefill_step of ``contexts`` (one per slot 0..), greedy; returns the next tokens."""
  n, width = len(contexts), max(len(c) for c in contexts)
  toks = np.zeros((n, width), np.int32)
  for i, c in enumerate(contexts):
    toks[i, :len(c)] = c
  cache, _ = pk.allocate_sequences(cache, np.arange(n, dtype=np.int32))
  zeros, ones = np.zeros(n, np.float32), np.ones(n, np.float32)
  cache, nxt, _, status = prefill_step(
      PARAMS, cache, toks, np.arange(n, dtype=np.int32),
      np.int32([len(c) for c in contexts]), zeros, np.zeros(n, np.int32), ones,
      np.zeros((n, 2), np.uint32), np.zeros(n, np.int32), model=SMALL, penalties=penalties)
  assert not np.any(np.asarray(status))
  return np.asarray(nxt).tolist()


def test_a_recomputed_prefill_penalises_what_the_request_had_generated():
  """What a preempted request's re-prefill does: context = prompt + its first k tokens, the
  penalties counted over those k as output; the next token is the float64 model's penalised
  greedy token k, for every k (presence and frequency act only through the output)."""
  prompt, kw, n = PROMPTS[0], KINDS[1], 8  # unpenalised, token 4 would repeat token 3
  want = reference_greedy_penalised(PARAMS, SMALL, prompt, n, **kw)
  samp = [SamplingParams(**kw)] * (n - 1)
  contexts = [prompt + want[:k] for k in range(1, n)]
  pen = Penalties.create([prompt] * (n - 1), [want[:k] for k in range(1, n)], samp,
                         SMALL.vocab_size)
  got = _prefill_rows(pk.init_cache(cache_config(1 + 64, max_seqs=8)), contexts, pen)
  assert got == want[1:]
  assert want != reference_greedy(PARAMS, SMALL, prompt, n)


def _prompt_repeating_its_next_token(repetition, head=()):
  """A prompt (``head`` + a random tail) whose greedy next token is already in ``head`` (in
  it, if ``head`` is empty) and loses to another under ``repetition`` (searched with the
  float64 model)."""
  rng = np.random.default_rng(11)
  for _ in range(400):
    tail = rng.integers(0, 128, int(rng.integers(2 if head else 4, 12))).tolist()
    prompt = list(head) + tail
    logits = reference_logits(PARAMS, SMALL, prompt)[-1]
    top = int(np.argmax(logits))
    if (top in (head or prompt) and top not in (tail if head else ())
        and int(np.argmax(penalise(logits, prompt, [], repetition))) != top):
      return prompt
  raise AssertionError("no such prompt in 400 tries")


def test_the_engine_penalises_the_prompt_in_its_first_token():
  """The repetition penalty covers the prompt: a prompt whose greedy next token it already
  holds gets another first token from the engine's prefill, the float64 model's."""
  rep = 1.8
  prompt = _prompt_repeating_its_next_token(rep)
  engine = Engine(PARAMS, SMALL, cache_config(1 + 16), **FIXED)
  rid = engine.add_request(prompt, SamplingParams(max_new_tokens=3, repetition_penalty=rep))
  plain = engine.add_request(prompt, SamplingParams(max_new_tokens=3))
  outs = {o.request_id: o for o in engine.run()}
  assert outs[rid].tokens == reference_greedy_penalised(PARAMS, SMALL, prompt, 3,
                                                        repetition_penalty=rep)
  assert outs[plain].tokens == reference_greedy(PARAMS, SMALL, prompt, 3)
  assert outs[rid].tokens[0] != outs[plain].tokens[0]


def test_penalties_count_the_whole_prompt_under_prefix_caching():
  """A prefix-cache hit skips prefilling the shared blocks, not counting them: the second
  request (a hit on 4 blocks) has its greedy next token only in the shared part, and still gets
  the float64 model's penalised tokens."""
  rep = 1.8
  shared = PROMPTS[3][:16]
  prompt = _prompt_repeating_its_next_token(rep, head=shared)
  engine = Engine(PARAMS, SMALL, cache_config(1 + 32), enable_prefix_caching=True, **FIXED)
  samp = SamplingParams(max_new_tokens=4, repetition_penalty=rep)
  outs = []
  for p in (shared + [9, 9], prompt):
    rid = engine.add_request(p, samp)
    outs.append({o.request_id: o for o in engine.run()}[rid])
  assert engine.metrics.prefix_hits == 1 and engine.metrics.cached_prompt_tokens == 16
  for out, p in zip(outs, (shared + [9, 9], prompt), strict=True):
    assert out.tokens == reference_greedy_penalised(PARAMS, SMALL, p, 4, repetition_penalty=rep)
  assert outs[1].tokens[0] != reference_greedy(PARAMS, SMALL, prompt, 1)[0]


def test_only_steps_with_a_penalised_row_take_the_counts():
  """A penalised request's prefill and decode steps run the programs with penalties; once it
  is done, plain requests run the programs without (no table building), and give the float64
  model's greedy tokens."""
  engine = Engine(PARAMS, SMALL, cache_config(1 + 16), **FIXED)
  rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=NEW, **KINDS[0]))
  assert {o.request_id: o for o in engine.run()}[rid].tokens == reference_greedy_penalised(
      PARAMS, SMALL, PROMPTS[0], NEW, **KINDS[0])
  assert {(kind, pen) for kind, _, _, pen, *_ in engine._compiled} == {("prefill", True),
                                                                      ("decode", True)}
  engine._compiled.clear()
  ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW)) for p in PROMPTS[1:3]]
  outs = {o.request_id: o for o in engine.run()}
  for i, p in zip(ids, PROMPTS[1:3], strict=True):
    assert outs[i].tokens == reference_greedy(PARAMS, SMALL, p, NEW)
  assert {(kind, pen) for kind, _, _, pen, *_ in engine._compiled} == {("prefill", False),
                                                                      ("decode", False)}
