"""Prompt logprobs (scoring): each prompt token's log-probability given the ones before it,
through chunked prefill, preemption and prefix caching, against the float64 model."""

import jax
import numpy as np
import pytest

from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine
from tests.llama_fixtures import SMALL
from tests.llama_reference import reference_greedy, reference_prompt_logprobs

PARAMS = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)
RNG = np.random.default_rng(5)
PROMPTS = [RNG.integers(0, 128, n).tolist() for n in (1, 3, 17, 30, 9, 8)]
NEW = 6
FIXED = dict(prefill_chunk=8, decode_steps=4, batch_bucket_min=4, bucket_blocks=False)


def cache_config(num_blocks, max_seqs=4):
  return SMALL.cache_config(num_blocks=num_blocks, max_seqs=max_seqs, max_seq_len=48,
                            block_size=4)


def check(out, prompt):
  want = reference_prompt_logprobs(PARAMS, SMALL, prompt)
  assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
  np.testing.assert_allclose(np.asarray(out.prompt_logprobs[1:], float),
                             np.asarray(want[1:], float), atol=2e-4, rtol=0)


@pytest.mark.parametrize("preemption", ["recompute", "swap"])
def test_prompt_logprobs_match_the_float64_model(preemption):
  """Prompts of 1 to 30 tokens (up to four chunks of 8, chunks of several rows together) in a
  pool small enough to preempt: every prompt position scored once (a re-prefill scores
  nothing again), the generated tokens unchanged, streamed once with the first tokens; a
  request that did not ask gets None."""
  engine = Engine(PARAMS, SMALL, cache_config(1 + 16), watermark=0.0, reserve_ratio=0.0,
                  preemption=preemption, **FIXED)
  ids = [engine.add_request(p, SamplingParams(max_new_tokens=NEW, prompt_logprobs=i != 4))
         for i, p in enumerate(PROMPTS)]
  streamed = {}  # request id -> the prompt logprobs of its deltas
  for deltas in engine.stream():
    for d in deltas:
      if d.prompt_logprobs is not None:
        assert d.tokens and d.request_id not in streamed  # once, with the first tokens
        streamed[d.request_id] = list(d.prompt_logprobs)
  outs = engine.finished
  assert sum(o.num_preemptions for o in outs.values()) > 0
  for i, rid in enumerate(ids):
    assert outs[rid].tokens == reference_greedy(PARAMS, SMALL, PROMPTS[i], NEW), i
    if i == 4:
      assert outs[rid].prompt_logprobs is None and rid not in streamed
    else:
      check(outs[rid], PROMPTS[i])
      assert streamed[rid] == outs[rid].prompt_logprobs
  assert any(lp for kind, *_, lp in engine._compiled if kind == "prefill")


def test_a_scoring_request_computes_its_whole_prompt_under_prefix_caching():
  """With prefix caching, a request asking for prompt logprobs takes no cached blocks (it
  scores every position, as the float64 model does), waits for no other request's prefill of
  them, and its own blocks are cached for the next request."""
  engine = Engine(PARAMS, SMALL, cache_config(1 + 32), enable_prefix_caching=True, **FIXED)
  shared = PROMPTS[3][:24]
  scored = engine.add_request(shared + [3, 4], SamplingParams(max_new_tokens=2,
                                                             prompt_logprobs=True))
  out = {o.request_id: o for o in engine.run()}[scored]
  check(out, shared + [3, 4])
  assert out.tokens == reference_greedy(PARAMS, SMALL, shared + [3, 4], 2)
  plain = engine.add_request(shared + [5], SamplingParams(max_new_tokens=2))
  out = {o.request_id: o for o in engine.run()}[plain]  # a hit on the scoring request's blocks
  assert engine.metrics.prefix_hits == 1 and out.prompt_logprobs is None
  assert out.tokens == reference_greedy(PARAMS, SMALL, shared + [5], 2)
  # Cached blocks of the prefix exist now; a second scoring request does not take them, and
  # is admitted beside a plain request still prefilling past the same prefix (it waits for
  # no block: a plain request would, for the block being written).
  hits = engine.metrics.prefix_hits
  engine.add_request(shared + PROMPTS[4] + PROMPTS[5], SamplingParams(max_new_tokens=2))
  again = engine.add_request(shared + [6], SamplingParams(max_new_tokens=2,
                                                          prompt_logprobs=True))
  engine.step()
  assert engine.in_flight()[again].first_scheduled_time is not None
  out = {o.request_id: o for o in engine.run()}[again]
  assert engine.metrics.prefix_hits == hits + 1  # the plain request's hit only
  check(out, shared + [6])


def test_a_step_scores_only_when_a_row_asks_and_an_abort_streams_what_was_scored():
  """A prefill step computes every position's logits only when one of its rows scores
  prompt positions: after the scoring request, plain ones run the last-logits programs again.
  A scoring request aborted during its prefill keeps (and streams, in its last delta) the
  positions scored so far, the float64 model's."""
  engine = Engine(PARAMS, SMALL, cache_config(1 + 16), **FIXED)
  prompt = PROMPTS[3]  # 30 tokens: 4 chunks of 8
  rid = engine.add_request(prompt, SamplingParams(max_new_tokens=NEW, prompt_logprobs=True))
  deltas = []
  for step, ds in enumerate(engine.stream()):
    deltas += ds
    if step == 1:
      engine.abort_request(rid)
  out = engine.finished[rid]
  assert out.finish_reason == "abort" and not out.tokens
  assert len(out.prompt_logprobs) == 17  # None, then tokens 1..16 (two chunks' predictions)
  want = reference_prompt_logprobs(PARAMS, SMALL, prompt)[:17]
  np.testing.assert_allclose(out.prompt_logprobs[1:], want[1:], atol=2e-4, rtol=0)
  assert [d.prompt_logprobs for d in deltas] == [tuple(out.prompt_logprobs)]
  assert {lp for kind, *_, lp in engine._compiled if kind == "prefill"} == {True}
  engine._compiled.clear()
  plain = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=2))
  assert {o.request_id: o for o in engine.run()}[plain].tokens == reference_greedy(
      PARAMS, SMALL, PROMPTS[2], 2)
  assert {lp for kind, *_, lp in engine._compiled if kind == "prefill"} == {False}


def test_prompt_logprobs_must_be_a_bool():
  with pytest.raises(ValueError, match="prompt_logprobs must be a bool"):
    SamplingParams(prompt_logprobs=1)
