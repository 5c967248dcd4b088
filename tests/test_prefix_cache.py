"""Prefix caching in the engine: outputs against full recomputation (float64 references),
reference counts, salts, verification of hash hits, LRU eviction, preemption."""

import jax
import numpy as np
import pytest

from jax_paged_kv import CacheStrategy, cache_stats, check_invariants, fork_sequence, init_cache
from jax_paged_kv.cache.ops import truncate_sequences
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine, generate
from jax_paged_kv.serving.engine import prefix as prefix_lib
from jax_paged_kv.serving.engine.prefix import PrefixIndex
from tests.llama_fixtures import SMALL, forward_jit, run_chunked
from tests.llama_reference import reference_greedy, reference_logits, reference_logprobs

PARAMS = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)
FIXED = dict(prefill_chunk=8, decode_steps=4, batch_bucket_min=4, bucket_blocks=False)
BS = 4
NEW = 6


def cache_config(num_blocks=1 + 48, max_seqs=4, strategy=CacheStrategy.PAGED):
  return SMALL.cache_config(num_blocks=num_blocks, max_seqs=max_seqs, max_seq_len=48,
                            block_size=BS, strategy=strategy)


def tokens(rng, n):
  return rng.integers(0, SMALL.vocab_size, n).tolist()


def run_checked(engine):
  """Runs to completion, checking every allocator invariant after each step."""
  while engine.has_work:
    engine.step()
    report = check_invariants(engine.cache)
    assert bool(report.ok), report.failures()
  return sorted(engine.finished.values(), key=lambda o: o.request_id)


def assert_all_free_or_cached(engine):
  """Every held block belongs to a cached slot; after a reset every count is back to zero."""
  cc = engine.cache_config
  lens = np.asarray(engine.cache.seq_lens)
  active = np.asarray(engine.cache.active)
  cached = set(engine.prefix.cached)
  assert set(np.flatnonzero(active).tolist()) == cached
  assert all(lens[s] % BS == 0 and lens[s] // BS == engine.prefix.registered(s) for s in cached)
  engine.reset_prefix_cache()
  stats = cache_stats(engine.cache)
  assert int(stats.free_blocks) == cc.usable_blocks
  assert int(stats.active_sequences) == 0 and not engine.prefix.entries
  assert not np.any(np.asarray(engine.cache.allocator.ref_counts))
  assert bool(check_invariants(engine.cache).ok)


def test_system_prompt_matches_recomputation():
  rng = np.random.default_rng(1)
  system = tokens(rng, 13)
  prompts = [system + tokens(rng, n) for n in (3, 5, 1, 8, 4, 3, 2)]
  refs = [reference_greedy(PARAMS, SMALL, p, NEW) for p in prompts]
  sampling = SamplingParams(max_new_tokens=NEW)
  plain = generate(PARAMS, SMALL, prompts, sampling, cache_config=cache_config(), **FIXED)
  engine = Engine(PARAMS, SMALL, cache_config(), enable_prefix_caching=True, **FIXED)
  for p in prompts:
    engine.add_request(p, sampling)
  outs = run_checked(engine)
  assert plain == refs
  assert [o.tokens for o in outs] == refs
  m = engine.metrics
  # The others wait until the first request wrote the 3 full system-prompt blocks, then hit.
  assert m.prefix_hits == 6 and m.cached_prompt_tokens == 6 * 3 * BS
  assert m.prompt_tokens + m.cached_prompt_tokens == sum(len(p) for p in prompts)
  assert 0 < m.prefix_hit_rate < 1
  assert_all_free_or_cached(engine)


def test_generate_passes_the_option_and_contiguous_is_refused():
  rng = np.random.default_rng(2)
  prompts = [tokens(rng, 9)] * 2
  out = generate(PARAMS, SMALL, prompts, SamplingParams(max_new_tokens=NEW),
                 enable_prefix_caching=True, max_batch=1, **FIXED)
  assert out == [reference_greedy(PARAMS, SMALL, prompts[0], NEW)] * 2
  with pytest.raises(ValueError, match="PAGED"):
    Engine(PARAMS, SMALL, cache_config(strategy=CacheStrategy.CONTIGUOUS),
           enable_prefix_caching=True)


def test_multi_turn_continuation_reuses_the_generated_blocks():
  rng = np.random.default_rng(3)
  engine = Engine(PARAMS, SMALL, cache_config(), enable_prefix_caching=True, **FIXED)
  first = tokens(rng, 10)
  engine.add_request(first, SamplingParams(max_new_tokens=NEW))
  (turn1,) = run_checked(engine)
  assert turn1.tokens == reference_greedy(PARAMS, SMALL, first, NEW)
  # Written: the prompt and every generated token but the last.
  written = len(first) + NEW - 1
  second = first + turn1.tokens + tokens(rng, 5)
  engine.add_request(second, SamplingParams(max_new_tokens=NEW))
  before = engine.metrics.cached_prompt_tokens
  (_, turn2) = run_checked(engine)
  assert engine.metrics.cached_prompt_tokens - before == (written // BS) * BS
  assert turn2.tokens == reference_greedy(PARAMS, SMALL, second, NEW)
  assert_all_free_or_cached(engine)


def test_identical_prompts_arriving_together_and_block_boundary():
  rng = np.random.default_rng(4)
  prompt = tokens(rng, 3 * BS)  # ends exactly on a block boundary
  ref = reference_greedy(PARAMS, SMALL, prompt, NEW)
  engine = Engine(PARAMS, SMALL, cache_config(), enable_prefix_caching=True, **FIXED)
  for _ in range(3):
    engine.add_request(prompt, SamplingParams(max_new_tokens=NEW))
  engine.step()
  # One is admitted; the others wait for its blocks to be written rather than compute them too.
  assert engine.num_running == 1 and engine.metrics.prefix_hits == 0
  engine.add_request(prompt, SamplingParams(max_new_tokens=NEW))
  outs = run_checked(engine)
  assert [o.tokens for o in outs] == [ref] * 4
  # The last prompt token is always computed: each hit stops one block short.
  assert engine.metrics.prefix_hits == 3
  assert engine.metrics.cached_prompt_tokens == 3 * 2 * BS
  assert engine.metrics.prompt_tokens == 3 * BS + 3 * BS
  assert_all_free_or_cached(engine)


def test_prompts_too_short_to_share_are_admitted_together():
  rng = np.random.default_rng(11)
  prompt = tokens(rng, BS)  # the only full block holds the last token: nothing to share
  engine = Engine(PARAMS, SMALL, cache_config(), enable_prefix_caching=True, **FIXED)
  for _ in range(3):
    engine.add_request(prompt, SamplingParams(max_new_tokens=NEW))
  engine.step()
  assert engine.metrics.peak_running == 3
  outs = run_checked(engine)
  assert [o.tokens for o in outs] == [reference_greedy(PARAMS, SMALL, prompt, NEW)] * 3
  assert engine.metrics.prefix_hits == 0
  assert_all_free_or_cached(engine)


def test_shared_prefix_logits_match_float64_reference():
  """The engine's sharing (fork a holder, truncate to the hit) then a suffix prefill."""
  rng = np.random.default_rng(5)
  a = tokens(rng, 11)
  b = a[:8] + tokens(rng, 6)
  cache = init_cache(cache_config())
  cache, (logits_a,) = run_chunked(PARAMS, SMALL, cache, [a], [0], chunk=8)
  cache, _ = fork_sequence(cache, np.int32(0), np.int32(1))
  cache, _ = truncate_sequences(cache, np.int32(1), np.int32(len(a) - 8))
  toks = np.asarray([b[8:]], np.int32)
  cache, logits_b, status = forward_jit(PARAMS, cache, toks, np.asarray([1], np.int32),
                                        np.asarray([6], np.int32), config=SMALL,
                                        all_logits=True)
  assert not np.any(np.asarray(status))
  assert bool(check_invariants(cache).ok)
  np.testing.assert_allclose(np.asarray(logits_b[0]), reference_logits(PARAMS, SMALL, b)[8:],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits_a, reference_logits(PARAMS, SMALL, a), rtol=1e-5, atol=1e-5)


def test_different_salts_never_share():
  rng = np.random.default_rng(6)
  prompt = tokens(rng, 13)
  engine = Engine(PARAMS, SMALL, cache_config(max_seqs=8), enable_prefix_caching=True,
                  max_batch=1, **FIXED)
  for salt in (None, "alice", "bob", "", "alice", None):
    engine.add_request(prompt, SamplingParams(max_new_tokens=NEW), cache_salt=salt)
  outs = run_checked(engine)
  assert all(o.tokens == outs[0].tokens for o in outs)
  # Only the second "alice" and the second None hit.
  assert engine.metrics.prefix_hits == 2
  roots = {engine.prefix.root(s) for s in (None, "alice", "bob", "")}
  assert len(roots) == 4
  # One request at a time: it references its own ceil((13 + 6 - 1) / 4) blocks at most. The
  # cached blocks of finished requests count only in peak_blocks: when the last request runs,
  # None, alice, bob and "" hold 4 full blocks each, the second alice 1 more (its first 3 are
  # shared), and the last request 2 of its own beside the 3 it shares.
  assert engine.metrics.peak_running_blocks == 5
  assert engine.metrics.peak_blocks == 4 * 4 + 1 + 2
  assert_all_free_or_cached(engine)


def test_hash_collisions_are_verified(monkeypatch):
  """With a hash that collides on every block, hits are still verified token by token."""
  monkeypatch.setattr(prefix_lib, "_digest", lambda data: len(data).to_bytes(8, "little"))
  rng = np.random.default_rng(7)
  prompts = [tokens(rng, 13) for _ in range(4)]
  engine = Engine(PARAMS, SMALL, cache_config(), enable_prefix_caching=True, max_batch=1,
                  **FIXED)
  for p in prompts:
    engine.add_request(p, SamplingParams(max_new_tokens=NEW))
  outs = run_checked(engine)
  assert [o.tokens for o in outs] == [reference_greedy(PARAMS, SMALL, p, NEW) for p in prompts]
  assert engine.metrics.prefix_hits == 0


def test_lru_eviction_order_and_leaves_first():
  rng = np.random.default_rng(8)
  engine = Engine(PARAMS, SMALL, cache_config(num_blocks=1 + 12, max_seqs=8),
                  enable_prefix_caching=True, watermark=0.0, **FIXED)
  a, b, c = (tokens(rng, 2 * BS + 1) for _ in range(3))
  slots = []
  for p in (a, b, c):
    engine.add_request(p, SamplingParams(max_new_tokens=2))
    run_checked(engine)
    slots.append(next(reversed(engine.prefix.cached)))
  assert list(engine.prefix.cached) == slots  # each holds 2 full blocks (the rest dropped)
  assert int(cache_stats(engine.cache).free_blocks) == 12 - 6
  engine.add_request(a + [1], SamplingParams(max_new_tokens=2))  # hits a: a is now most recent
  run_checked(engine)
  assert engine.metrics.prefix_hits == 1
  assert list(engine.prefix.cached)[:2] == [slots[1], slots[2]]
  # d needs 7 blocks, 6 are free: one block is evicted, the tail (leaf) block of b, the least
  # recently used cached sequence; b's first block, c and a stay cached.
  d = tokens(rng, 6 * BS + 1)
  engine.add_request(d, SamplingParams(max_new_tokens=3))
  before = engine.metrics.evicted_blocks
  run_checked(engine)
  assert engine.metrics.evicted_blocks - before == 1
  assert engine.prefix.match(b, None, 2)[0] == 1
  assert engine.prefix.match(c, None, 2)[0] == 2
  assert engine.prefix.match(a, None, 2)[0] == 2


def test_slot_pressure_evicts_the_least_recently_used_sequence_whole():
  rng = np.random.default_rng(10)
  engine = Engine(PARAMS, SMALL, cache_config(max_seqs=3), enable_prefix_caching=True, **FIXED)
  a, b, c = (tokens(rng, 2 * BS + 1) for _ in range(3))
  for p in (a, b, c):
    engine.add_request(p, SamplingParams(max_new_tokens=2))
    run_checked(engine)
  assert len(engine.prefix.cached) == 3 and not engine.scheduler.free_slots
  # a's request needs a slot: b, the least recently used cached sequence other than a (whose
  # blocks it is about to share), is evicted whole.
  engine.add_request(a + [1], SamplingParams(max_new_tokens=2))
  run_checked(engine)
  assert engine.metrics.prefix_hits == 1
  assert [engine.prefix.match(p, None, 2)[0] for p in (a, b, c)] == [2, 0, 2]
  assert_all_free_or_cached(engine)


def test_partial_eviction_drops_tail_blocks_first():
  idx = PrefixIndex(BS, b"model")
  toks = list(range(3 * BS))
  idx.register(5, toks, None, written=3 * BS)
  idx.park(5)
  assert idx.match(toks + [0], None, 3) == (3, 5)
  idx.unregister(5, keep_blocks=1)  # a truncation: blocks 1 and 2 leave the index
  assert idx.match(toks + [0], None, 3) == (1, 5)
  idx.register(5, toks[:BS] + [9] * BS, None, written=BS + 2)  # partly rewritten: not full
  assert idx.registered(5) == 1
  idx.unregister(5)
  assert not idx.entries and not idx.cached


def test_preemption_with_prefix_caching_matches_recomputation():
  rng = np.random.default_rng(9)
  system = tokens(rng, 9)
  prompts = [system + tokens(rng, n) for n in (3, 8, 14, 6, 11, 2)]
  refs = [reference_greedy(PARAMS, SMALL, p, 10) for p in prompts]
  engine = Engine(PARAMS, SMALL, cache_config(num_blocks=1 + 16), enable_prefix_caching=True,
                  watermark=0.0, reserve_ratio=0.0, **FIXED)
  for p in prompts:
    engine.add_request(p, SamplingParams(max_new_tokens=10))
  outs = run_checked(engine)
  assert [o.tokens for o in outs] == refs
  assert engine.metrics.preemptions > 0 and engine.metrics.prefix_hits > 0
  assert_all_free_or_cached(engine)


def test_new_params_drop_the_cached_prefixes_and_wait_for_an_idle_engine():
  """K/V cached under the old weights are never served after ``engine.params`` changes (the
  root hash names the model config, not the weights), and the weights cannot change under a
  request in flight."""
  new_params = init_params(SMALL, jax.random.PRNGKey(99), scale=2.0)
  prompt = list(range(1, 14))
  engine = Engine(PARAMS, SMALL, cache_config(), enable_prefix_caching=True, **FIXED)
  engine.add_request(prompt, SamplingParams(max_new_tokens=NEW))
  engine.step()
  with pytest.raises(ValueError, match="in flight"):
    engine.params = new_params
  engine.run()
  assert cache_stats(engine.cache).used_blocks > 0  # the finished prompt's blocks are cached
  engine.params = new_params
  assert int(cache_stats(engine.cache).used_blocks) == 0
  rid = engine.add_request(prompt + [5], SamplingParams(max_new_tokens=NEW))
  engine.run()
  assert engine.metrics.cached_prompt_tokens == 0
  assert engine.finished[rid].tokens == reference_greedy(new_params, SMALL, prompt + [5], NEW)


def test_abort_mid_prefill_keeps_its_written_blocks_cached():
  """A request aborted halfway through its prompt leaves the full blocks it wrote in the prefix
  cache (their K/V are complete): the same prompt later hits them and matches the float64
  reference; a request deferred behind it is not left waiting."""
  rng = np.random.default_rng(5)
  prompt = tokens(rng, 30)  # 4 prefill chunks of 8
  engine = Engine(PARAMS, SMALL, cache_config(), enable_prefix_caching=True, **FIXED)
  rid = engine.add_request(prompt, SamplingParams(max_new_tokens=NEW))
  engine.step()
  engine.step()  # 16 tokens written: 4 full blocks
  twin = engine.add_request(prompt, SamplingParams(max_new_tokens=NEW))
  engine.step()  # the twin waits for the blocks the first one is writing
  assert engine.num_waiting == 1
  out = engine.abort_request(rid)
  assert out.finish_reason == "abort" and out.tokens == []
  written = 24
  assert engine.prefix.registered(0) == written // BS
  outs = run_checked(engine)
  assert outs[1].request_id == twin and outs[1].tokens == reference_greedy(PARAMS, SMALL,
                                                                           prompt, NEW)
  assert engine.metrics.cached_prompt_tokens == written
  assert engine.metrics.aborted_requests == 1
  assert_all_free_or_cached(engine)


def test_abort_mid_decode_parks_its_generated_blocks():
  """A request aborted while decoding keeps its full written blocks cached, generated tokens
  included: a later prompt that continues its text hits them, and its greedy tokens are the
  float64 reference's for that prompt."""
  rng = np.random.default_rng(6)
  prompt = tokens(rng, 9)
  engine = Engine(PARAMS, SMALL, cache_config(), enable_prefix_caching=True, **FIXED)
  rid = engine.add_request(prompt, SamplingParams(max_new_tokens=20))
  engine.step()
  while len(engine.scheduler.running[0].out.tokens) < 8:
    engine.step()
  out = engine.abort_request(rid)
  made = out.tokens
  assert out.finish_reason == "abort" and made == reference_greedy(PARAMS, SMALL, prompt,
                                                                   len(made))
  written = len(prompt) + len(made) - 1  # the last token was emitted, not yet written
  assert engine.prefix.registered(0) == written // BS
  follow = prompt + made + tokens(rng, 3)
  fid = engine.add_request(follow, SamplingParams(max_new_tokens=NEW))
  outs = run_checked(engine)
  assert [o.request_id for o in outs] == [rid, fid]
  assert outs[1].tokens == reference_greedy(PARAMS, SMALL, follow, NEW)
  assert engine.metrics.cached_prompt_tokens == (written // BS) * BS
  assert_all_free_or_cached(engine)


def test_logprobs_after_a_prefix_hit_match_the_float64_model():
  """A request served from cached blocks reports its first token's logprob from the prefill of
  its uncached tail, and the rest from decode, as a cold run would."""
  rng = np.random.default_rng(8)
  system = tokens(rng, 12)
  engine = Engine(PARAMS, SMALL, cache_config(), enable_prefix_caching=True, **FIXED)
  engine.add_request(system + tokens(rng, 3), SamplingParams(max_new_tokens=NEW))
  engine.run()
  prompt = system + tokens(rng, 5)
  rid = engine.add_request(prompt, SamplingParams(max_new_tokens=NEW, logprobs=True))
  (out,) = engine.run()
  assert out.request_id == rid and engine.metrics.cached_prompt_tokens == 12
  assert out.tokens == reference_greedy(PARAMS, SMALL, prompt, NEW)
  np.testing.assert_allclose(out.logprobs, reference_logprobs(PARAMS, SMALL, prompt, out.tokens),
                             atol=2e-4, rtol=0)
