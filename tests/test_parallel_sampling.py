"""Parallel sampling: ``SamplingParams(n=k)`` gives ``k`` samples that share the prompt's blocks.

Oracles: each sample against a request of its own with seed ``seed + i`` served by an engine
where nothing is shared (the same tokens and log-probabilities, bitwise), the float64 model
(log-probabilities of the tokens drawn; greedy tokens), the device's block tables and reference
counts (the shared blocks are the same physical blocks, held once), and the free count after.
"""

import dataclasses

import jax
import numpy as np
import pytest

from jax_paged_kv import CacheStrategy, cache_stats, check_invariants
from jax_paged_kv.cache.config import NULL_BLOCK
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine, generate
from tests.llama_fixtures import SMALL
from tests.llama_reference import reference_greedy, reference_logprobs

PARAMS = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)
FIXED = dict(prefill_chunk=8, decode_steps=4, batch_bucket_min=4, bucket_blocks=False)
RNG = np.random.default_rng(1)
PROMPT = RNG.integers(0, 128, 17).tolist()  # 4 full blocks of 4, and one token
OTHER = RNG.integers(0, 128, 9).tolist()
NEW = 10
SAMPLED = SamplingParams(temperature=1.0, top_k=40, seed=5, max_new_tokens=NEW, logprobs=True,
                         n=4)


def cache_config(num_blocks, strategy=CacheStrategy.PAGED, max_seqs=6, model=SMALL):
  return model.cache_config(num_blocks=num_blocks, max_seqs=max_seqs, max_seq_len=48,
                            block_size=4, strategy=strategy)


def alone(prompt, sampling, model=SMALL, params=PARAMS, strategy=CacheStrategy.PAGED, **kw):
  """The oracle: each sample as a request of its own (seed + i), in an engine with room for
  all of them and nothing shared."""
  engine = Engine(params, model, cache_config(1 + 40 if strategy is CacheStrategy.PAGED
                                              else 1 + 6 * 12, strategy, model=model),
                  **FIXED, **kw)
  for i in range(sampling.n):
    engine.add_request(prompt, dataclasses.replace(sampling, n=1, seed=sampling.seed + i))
  return engine.run()


def check_samples(outs, first, want, prompt=PROMPT, exact=True):
  """Sample ``i`` has the tokens and log-probabilities of ``want[i]`` (bitwise, when ``exact``:
  the same computation; a recompute preemption prefills generated tokens instead, which moves
  the last bits), and those are the float64 model's."""
  for i, ref in enumerate(want):
    out = outs[first + i]
    assert out.index == i and out.request_id == first + i and out.prompt == prompt
    assert out.tokens == ref.tokens, i
    if exact:
      assert out.logprobs == ref.logprobs, i
    else:
      np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.logprobs, reference_logprobs(PARAMS, SMALL, prompt,
                                                                out.tokens), atol=2e-4, rtol=0)
  assert len({tuple(o.tokens) for o in want}) > 1, "the seeds drew one continuation"


@pytest.mark.parametrize("strategy", [CacheStrategy.PAGED, CacheStrategy.CONTIGUOUS])
def test_samples_are_requests_with_consecutive_seeds_and_share_the_prompt_blocks(strategy):
  engine = Engine(PARAMS, SMALL, cache_config(1 + 40 if strategy is CacheStrategy.PAGED
                                              else 1 + 6 * 12, strategy), **FIXED)
  first = engine.add_request(PROMPT, SAMPLED)
  greedy = engine.add_request(PROMPT, SamplingParams(max_new_tokens=NEW, n=2))
  other = engine.add_request(OTHER, SamplingParams(max_new_tokens=NEW))
  assert (greedy, other) == (first + 4, first + 6)
  paged = strategy is CacheStrategy.PAGED
  shared_seen = 0
  while engine.has_work:
    engine.step()
    assert bool(check_invariants(engine.cache).ok)
    if not paged:
      continue
    tables = np.asarray(engine.cache.block_tables)
    refs = np.asarray(engine.cache.allocator.ref_counts)
    for ids in (range(first, first + 4), range(greedy, greedy + 2)):
      members = [r for r in engine.scheduler.running if r.out.request_id in ids
                 and engine.ledger.lens[r.slot] >= 16]
      if len(members) > 1:  # the 4 full prompt blocks: the same physical blocks, held by all
        head = tables[members[0].slot, :4]
        for r in members:
          assert list(tables[r.slot, :4]) == list(head)
        assert list(refs[head]) == [len(members)] * 4
        shared_seen += len(members)
  outs = engine.finished
  check_samples(outs, first, alone(PROMPT, SAMPLED, strategy=strategy))
  assert outs[greedy].tokens == outs[greedy + 1].tokens == reference_greedy(PARAMS, SMALL,
                                                                            PROMPT, NEW)
  assert outs[greedy + 1].index == 1 and outs[other].index == 0
  assert outs[other].tokens == reference_greedy(PARAMS, SMALL, OTHER, NEW)
  m = engine.metrics
  # Each of the 4 samples after the first took the 16 tokens of the full blocks.
  assert m.shared_prompt_tokens == 4 * 16
  assert m.prompt_tokens == 2 * 17 + 4 * 1 + len(OTHER)
  if paged:
    assert shared_seen > 0
    assert int(cache_stats(engine.cache).free_blocks) == 40
    print("PEAK", m.peak_blocks)


def test_samples_waiting_for_their_prompt_let_the_requests_behind_them_in():
  engine = Engine(PARAMS, SMALL, cache_config(1 + 40), **FIXED)
  first = engine.add_request(PROMPT, SamplingParams(max_new_tokens=NEW, n=3))
  other = engine.add_request(OTHER, SamplingParams(max_new_tokens=NEW))
  engine.step()  # the prompt's first chunk: its other samples wait, the next request goes in
  assert {r.out.request_id for r in engine.scheduler.running} == {first, other}
  assert [r.out.request_id for r in engine.scheduler.waiting] == [first + 1, first + 2]
  outs = {o.request_id: o for o in engine.run()}
  want = reference_greedy(PARAMS, SMALL, PROMPT, NEW)
  assert [outs[first + i].tokens for i in range(3)] == [want] * 3
  assert outs[other].tokens == reference_greedy(PARAMS, SMALL, OTHER, NEW)
  assert engine.metrics.shared_prompt_tokens == 2 * 16


def test_samples_of_a_short_request_share_before_its_first_sample_finishes():
  """The first sample's prompt completes and it finishes in the same step's decode (3 tokens,
  decode loops of 4): the others join right after the prefill, while it still holds the
  prompt, not at the next step, when its blocks are gone."""
  prompt = PROMPT + OTHER[:6]  # 23 tokens: its 5th full block is written by the last chunk
  engine = Engine(PARAMS, SMALL, cache_config(1 + 40), **FIXED)
  first = engine.add_request(prompt, SamplingParams(max_new_tokens=3, n=3))
  outs = {o.request_id: o for o in engine.run()}
  want = reference_greedy(PARAMS, SMALL, prompt, 3)
  assert [outs[first + i].tokens for i in range(3)] == [want] * 3
  assert engine.metrics.shared_prompt_tokens == 2 * 20


def test_waiting_samples_stay_ahead_of_the_requests_behind_them():
  """Two at a time: the samples waiting for their prompt let one request in, and stay at the
  head of the queue, so they are admitted before the request behind it."""
  engine = Engine(PARAMS, SMALL, cache_config(1 + 40), max_batch=2, **FIXED)
  first = engine.add_request(PROMPT, SamplingParams(max_new_tokens=NEW, n=3))
  other = engine.add_request(OTHER, SamplingParams(max_new_tokens=NEW))
  last = engine.add_request(OTHER[:5], SamplingParams(max_new_tokens=NEW))
  engine.step()
  assert {r.out.request_id for r in engine.scheduler.running} == {first, other}
  assert [r.out.request_id for r in engine.scheduler.waiting] == [first + 1, first + 2, last]
  outs = {o.request_id: o for o in engine.run()}
  admitted = sorted(outs, key=lambda i: outs[i].first_scheduled_time)
  assert admitted == [first, other, first + 1, first + 2, last]
  want = reference_greedy(PARAMS, SMALL, PROMPT, NEW)
  assert [outs[first + i].tokens for i in range(3)] == [want] * 3
  assert outs[last].tokens == reference_greedy(PARAMS, SMALL, OTHER[:5], NEW)


def test_a_sample_waiting_for_another_request_s_block_holds_the_queue():
  """Prefix caching: sample 0 of a request waits for a block another request is writing, as
  any request does, first in line (the requests behind it wait too); only waiting for a
  sibling lets them pass."""
  engine = Engine(PARAMS, SMALL, cache_config(1 + 40), enable_prefix_caching=True, **FIXED)
  writer = engine.add_request(PROMPT, SamplingParams(max_new_tokens=NEW))
  first = engine.add_request(PROMPT[:16] + OTHER[:4], SamplingParams(max_new_tokens=NEW, n=2))
  other = engine.add_request(OTHER, SamplingParams(max_new_tokens=NEW))
  engine.step()  # the writer's first chunk: 8 of the 16 tokens the samples want
  assert [r.out.request_id for r in engine.scheduler.running] == [writer]
  assert [r.out.request_id for r in engine.scheduler.waiting] == [first, first + 1, other]
  outs = {o.request_id: o for o in engine.run()}
  admitted = sorted(outs, key=lambda i: outs[i].first_scheduled_time)
  assert admitted.index(other) > admitted.index(first)
  want = reference_greedy(PARAMS, SMALL, PROMPT[:16] + OTHER[:4], NEW)
  assert outs[first].tokens == outs[first + 1].tokens == want
  assert engine.metrics.cached_prompt_tokens >= 2 * 16


@pytest.mark.parametrize("preemption, pool", [("recompute", 12), ("swap", 12), ("swap", 9)])
def test_preempted_samples_give_the_same_tokens(preemption, pool):
  """A tiny pool: samples are preempted (recomputed: sharing again from a sibling in the cache;
  or swapped out and in, the free count read back after the swap-in) and still give their
  own requests' tokens."""
  engine = Engine(PARAMS, SMALL, cache_config(1 + pool), watermark=0.0, reserve_ratio=0.0,
                  preemption=preemption, **FIXED)
  sampling = dataclasses.replace(SAMPLED, n=3)
  other = engine.add_request(OTHER, SamplingParams(max_new_tokens=NEW))
  first = engine.add_request(PROMPT, sampling)  # the newest: preempted first
  outs = {o.request_id: o for o in engine.run()}
  assert engine.metrics.preemptions > 0
  assert sum(outs[first + i].num_preemptions for i in range(3)) > 0
  check_samples(outs, first, alone(PROMPT, sampling), exact=preemption == "swap")
  assert outs[other].tokens == reference_greedy(PARAMS, SMALL, OTHER, NEW)
  assert int(cache_stats(engine.cache).free_blocks) == pool
  assert bool(check_invariants(engine.cache).ok)


def test_swap_after_a_parallel_request_reads_the_free_count_back():
  """Once a request with n > 1 ran, the engine's free count is the device's: later requests
  swapped out and back in (none of them shared) must see it updated, or the pool overcommits."""
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, 128, int(rng.integers(5, 20))).tolist() for _ in range(5)]
  engine = Engine(PARAMS, SMALL, cache_config(1 + 8), watermark=0.0, reserve_ratio=0.0,
                  preemption="swap", **FIXED)
  engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=2, n=2))
  engine.run()
  ids = [engine.add_request(p, SamplingParams(max_new_tokens=min(14, 32 - len(p))))
         for p in prompts]
  outs = {o.request_id: o for o in engine.run()}
  assert engine.metrics.preemptions > 0
  for i, p in zip(ids, prompts, strict=True):
    assert outs[i].tokens == reference_greedy(PARAMS, SMALL, p, min(14, 32 - len(p)))
  assert int(cache_stats(engine.cache).free_blocks) == 8


def test_stream_and_abort_one_sample():
  """Each sample streams on its own (deltas carry its index); aborting one frees only its own
  blocks: the others keep the shared prompt blocks and give their tokens."""
  engine = Engine(PARAMS, SMALL, cache_config(1 + 40), **FIXED)
  sampling = dataclasses.replace(SAMPLED, n=3)
  first = engine.add_request(PROMPT, sampling)
  got, index, victim = {}, {}, first + 1
  for deltas in engine.stream():
    for d in deltas:
      got.setdefault(d.request_id, []).extend(d.tokens)
      index[d.request_id] = d.index
    if victim not in engine.finished and len(engine.in_flight()[victim].tokens) >= 3:
      before = int(cache_stats(engine.cache).free_blocks)
      out = engine.abort_request(victim)
      # Its own blocks only (the partial prompt block and its tokens'): the shared 4 stay.
      held = int(engine.ledger.blocks(len(PROMPT) + len(out.tokens) - 1)) - 4
      assert int(cache_stats(engine.cache).free_blocks) == before + held
  want = alone(PROMPT, sampling)
  outs = engine.finished
  assert outs[victim].finish_reason == "abort"
  assert got[victim] == outs[victim].tokens == want[1].tokens[:len(got[victim])]
  for i in (0, 2):
    assert got[first + i] == outs[first + i].tokens == want[i].tokens
  assert index == {first: 0, first + 1: 1, first + 2: 2}
  assert int(cache_stats(engine.cache).free_blocks) == 40


def test_samples_with_prefix_caching_share_through_the_index():
  engine = Engine(PARAMS, SMALL, cache_config(1 + 40), enable_prefix_caching=True, **FIXED)
  first = engine.add_request(PROMPT, SAMPLED)
  outs = {o.request_id: o for o in engine.run()}
  check_samples(outs, first, alone(PROMPT, SAMPLED))
  assert engine.metrics.prefix_hits == 3 and engine.metrics.cached_prompt_tokens == 3 * 16
  assert engine.metrics.shared_prompt_tokens == 0


def test_sliding_window_samples_share_a_prompt_with_evicted_blocks():
  """A sliding-window model: after the prompt's prefill the window eviction has freed its
  first blocks; the samples fork the table with its holes (no query of theirs can see them)."""
  model = dataclasses.replace(SMALL, sliding_window=8)
  params = init_params(model, jax.random.PRNGKey(3), scale=2.0)
  prompt = RNG.integers(0, 128, 30).tolist()
  engine = Engine(params, model, cache_config(1 + 40, model=model), **FIXED)
  assert engine.evict == (8, 0)
  first = engine.add_request(prompt, SamplingParams(max_new_tokens=NEW, n=3))
  holes, hit_seen = 0, []

  def hit_blocks(r):  # the admission hook, recording (blocks shared, blocks counted as held)
    hit_seen.append((engine._match(r)[0], engine._hit_blocks(r)))
    return hit_seen[-1][1]

  engine.scheduler.hit_blocks = hit_blocks
  while engine.has_work:
    engine.step()
    tables = np.asarray(engine.cache.block_tables)
    for r in engine.scheduler.running:
      holes = max(holes, int(np.sum(tables[r.slot, :5] == NULL_BLOCK)))
  outs = engine.finished
  want = reference_greedy(params, model, prompt, NEW)
  assert [outs[first + i].tokens for i in range(3)] == [want] * 3
  assert holes == 5  # blocks 0-4 wholly before position 28 - 8: freed, and not copied back
  # What admission counted as already held: the 7 shared blocks less the 5 holes.
  assert {hit for k, hit in hit_seen if k == 7} == {7 - 5}
  # The samples after the first took blocks 5-6 (28 tokens, 5 of them holes).
  assert engine.metrics.shared_prompt_tokens == 2 * 28
  assert int(cache_stats(engine.cache).free_blocks) == 40
  # Two at a time: the third sample starts when the others have decoded on and freed blocks
  # 5-6, which its queries see: it computes its prompt instead of forking.
  engine = Engine(params, model, cache_config(1 + 40, model=model), max_batch=2, **FIXED)
  first = engine.add_request(prompt, SamplingParams(max_new_tokens=NEW, n=3))
  outs = {o.request_id: o for o in engine.run()}
  assert [outs[first + i].tokens for i in range(3)] == [want] * 3
  assert engine.metrics.shared_prompt_tokens == 28
  assert engine.metrics.prompt_tokens == 30 + 2 + 30


def test_token_eviction_samples_share_whole_chunks_only():
  """StreamingLLM's token eviction (an approximation whose keys depend on where each chunk
  starts): a sample shares a whole number of prefill chunks (24 of the 28 tokens in full
  blocks, chunks of 8) and computes the rest from a chunk boundary, as its own request does."""
  prompt = RNG.integers(0, 128, 30).tolist()
  evict = dict(window_eviction=(24, 4))
  sampling = SamplingParams(temperature=1.0, seed=3, max_new_tokens=NEW, logprobs=True, n=3)
  engine = Engine(PARAMS, SMALL, cache_config(1 + 40), **FIXED, **evict)
  first = engine.add_request(prompt, sampling)
  outs = {o.request_id: o for o in engine.run()}
  want = alone(prompt, sampling, **evict)
  for i in range(3):
    assert outs[first + i].tokens == want[i].tokens and outs[first + i].logprobs == (
        want[i].logprobs), i
  assert engine.metrics.shared_prompt_tokens == 2 * 24


@pytest.mark.parametrize("kwargs, match", [
    (dict(n=0), r"n must be in \[1, "),
    (dict(n=-2), r"n must be in \[1, "),
    (dict(n=2.0), "n must be an integer"),
    (dict(n=True), "n must be an integer"),
    (dict(n=3, seed=2**32 - 2), r"n must be in \[1, 2\]"),
    (dict(n=129), r"n must be in \[1, 128\]"),  # MAX_SAMPLES
])
def test_bad_n_is_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    SamplingParams(**kwargs)


def test_last_seed_and_generate_refusal():
  s = SamplingParams(n=3, seed=2**32 - 3, temperature=1.0, max_new_tokens=4, logprobs=True)
  with pytest.raises(ValueError, match="use Engine.add_request"):
    generate(PARAMS, SMALL, [OTHER, PROMPT], [SamplingParams(), s])
  with pytest.raises(ValueError, match="use Engine.add_request"):
    generate(PARAMS, SMALL, [PROMPT], s, cache_config=cache_config(1 + 40))
  engine = Engine(PARAMS, SMALL, cache_config(1 + 40), **FIXED)
  first = engine.add_request(PROMPT, s)  # seeds up to 2**32 - 1: fine
  outs = {o.request_id: o for o in engine.run()}
  assert sorted(outs) == [first, first + 1, first + 2]
  check_samples(outs, first, alone(PROMPT, s))
