"""Speculative decoding: prompt lookup and a draft model, draft / verify / roll back in one jit.

Oracles: a plain-Python model of the loop (Hugging Face's prompt lookup, a greedy draft model,
the acceptance of each draft, the stop-token cut) driven by the float64 models of
tests/llama_reference.py, which also proves that no greedy choice is a near-tie; the exact
distribution the accept rule must reproduce (computed in float64 from the same logits); a cache
prefilled from scratch with the same tokens; the allocator's invariants and free count.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from jax_paged_kv.cache.errors import Status
from jax_paged_kv.models import LlamaConfig, init_params
from jax_paged_kv.serving.decoding import DecodeState
from jax_paged_kv.serving.speculative import (
    MAX_DRAFT_TOKENS,
    SpeculativeConfig,
    _accept,
    prepare_speculative,
    speculative_generate,
    speculative_loop,
)
from tests.llama_fixtures import SMALL, run_chunked
from tests.llama_reference import reference_logits, reference_logprobs

PARAMS = init_params(SMALL, jax.random.key(0))
# A draft of the target's geometry that often agrees with it: the target's weights plus noise.
NOISY = jax.tree.map(lambda w, n: w + 0.6 * jnp.std(w) * n, PARAMS,
                     init_params(SMALL, jax.random.key(7)))
# A draft of its own geometry (one layer, one KV head): it rarely agrees.
TINY = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=1,
                   num_heads=2, num_kv_heads=1)
TINY_PARAMS = init_params(TINY, jax.random.key(3))

_rng = np.random.default_rng(0)
_base = _rng.integers(0, 128, 12).tolist()
PROMPTS = [_base * 3, _rng.integers(0, 128, 7).tolist(), _base[:5] * 2 + [3]]


class Greedy:
  """The float64 greedy next token of a model, remembering its smallest top-2 margin."""

  def __init__(self, params, config):
    self.params, self.config, self.margin = params, config, math.inf

  def __call__(self, seq):
    logits = reference_logits(self.params, self.config, list(seq))[-1]
    top2 = np.sort(logits)[-2:]
    self.margin = min(self.margin, top2[1] - top2[0])
    return int(np.argmax(logits))


def lookup(seq, k, lo, hi):
  """Hugging Face's ``PromptLookupCandidateGenerator``: the continuation of the first earlier
  occurrence of the last ``n`` tokens, ``n`` from ``hi`` down to ``lo``."""
  for n in range(hi, lo - 1, -1):
    pattern = seq[-n:]
    for i in range(len(seq) - n + 1):
      if len(seq) >= n and seq[i:i + n] == pattern and i + n < len(seq):
        return seq[i + n:i + n + k]
  return []


def model_loop(prompt, first, max_new, k, target, propose, stops=()):
  """Plain-Python speculative loop with greedy verification: ``(tokens, drafted, accepted)``.
  ``propose(seq, cap)`` gives the draft (at most ``cap`` tokens)."""
  seq, out = list(prompt) + [first], [first]
  drafted = accepted = 0
  while len(out) < max_new and out[-1] not in stops:
    cap = min(k, max_new - len(out) - 1)
    draft = propose(seq, cap)[:cap]
    for j, t in enumerate(draft):  # a draft ends at its first stop token
      if t in stops:
        draft = draft[:j + 1]
        break
    a = 0
    while a < len(draft) and target(seq + draft[:a]) == draft[a]:
      a += 1
    emitted = draft[:a] + [target(seq + draft[:a])]
    for j, t in enumerate(emitted):
      if t in stops:
        emitted = emitted[:j + 1]
        break
    drafted, accepted = drafted + len(draft), accepted + a
    seq, out = seq + emitted, out + emitted
  return out, drafted, accepted


def _check_against_model(outs, prompts, max_new, k, target, propose, stops=()):
  for p, o in zip(prompts, outs, strict=True):
    want, drafted, accepted = model_loop(p, target(p), max_new, k, target, propose, stops)
    assert o.tokens == want
    assert (o.drafted, o.accepted) == (drafted, accepted)
    np.testing.assert_allclose(o.logprobs, reference_logprobs(PARAMS, SMALL, p, want),
                               atol=2e-4)
  assert target.margin > 1e-4  # no greedy choice of the oracle is a float32 near-tie


def test_prompt_lookup_gives_greedy_decoding_with_hugging_face_s_drafts():
  target = Greedy(PARAMS, SMALL)
  spec = SpeculativeConfig(num_draft_tokens=4, prompt_lookup_min=1, prompt_lookup_max=3)
  stop = model_loop(PROMPTS[1], target(PROMPTS[1]), 24, 4, target,
                    lambda s, c: lookup(s, 4, 1, 3))[0][9]
  sampling = [pk.SamplingParams(max_new_tokens=24), pk.SamplingParams(max_new_tokens=24,
                                                                      stop_tokens=(stop,)),
              pk.SamplingParams(max_new_tokens=17)]
  outs = speculative_generate(PARAMS, SMALL, PROMPTS, sampling, speculative=spec)
  for p, o, s in zip(PROMPTS, outs, sampling, strict=True):
    _check_against_model([o], [p], s.max_new_tokens, 4, target,
                         lambda seq, cap: lookup(seq, 4, 1, 3), s.stop_tokens)
  assert len(outs[1].tokens) <= 10 and outs[1].tokens[-1] == stop
  # The case is not trivial: drafts were accepted and drafts were rejected.
  assert sum(o.accepted for o in outs) > 0
  assert sum(o.drafted - o.accepted for o in outs) > 0


def test_draft_model_gives_greedy_decoding_and_a_perfect_draft_is_always_accepted():
  target, draft = Greedy(PARAMS, SMALL), Greedy(NOISY, SMALL)

  def propose(seq, cap):
    out = []
    for _ in range(cap):
      out.append(draft(seq + out))
    return out

  spec = SpeculativeConfig(num_draft_tokens=3, draft_model=SMALL)
  sp = pk.SamplingParams(max_new_tokens=20)
  outs = speculative_generate(PARAMS, SMALL, PROMPTS, sp, speculative=spec, draft_params=NOISY)
  _check_against_model(outs, PROMPTS, 20, 3, target, propose)
  assert draft.margin > 1e-4
  assert 0 < sum(o.accepted for o in outs) < sum(o.drafted for o in outs)
  # The target as its own draft: every draft token is accepted (same compiled program).
  outs = speculative_generate(PARAMS, SMALL, PROMPTS, sp, speculative=spec, draft_params=PARAMS)

  def itself(seq, cap):
    out = []
    for _ in range(cap):
      out.append(target(seq + out))
    return out

  _check_against_model(outs, PROMPTS, 20, 3, target, itself)
  assert all(o.accepted == o.drafted > 0 for o in outs)
  # A stop token inside a draft ends it: nothing after it is verified or counted.
  # (The second iteration drafts greedy tokens 5-7: token 5, seen nowhere before, is the first.)
  stop = outs[1].tokens[5]
  assert stop not in outs[1].tokens[:5]
  sampling = [sp, pk.SamplingParams(max_new_tokens=20, stop_tokens=(stop,)), sp]
  outs = speculative_generate(PARAMS, SMALL, PROMPTS, sampling, speculative=spec,
                              draft_params=PARAMS)
  for p, o, s in zip(PROMPTS, outs, sampling, strict=True):
    _check_against_model([o], [p], 20, 3, target, itself, s.stop_tokens)
  assert outs[1].tokens[-1] == stop and outs[1].accepted == outs[1].drafted == 4


def _exact(logits, temperature, top_k):
  """float64 sampling distribution: temperature, then the ``top_k`` largest (no ties here)."""
  z = np.asarray(logits, np.float64) / temperature
  z = np.where(z >= np.sort(z)[-top_k], z, -np.inf)
  e = np.exp(z - z.max())
  return e / e.sum()


@pytest.mark.parametrize("drafter", ["draft_model", "prompt_lookup"])
def test_accept_rule_draws_exactly_from_the_target_distribution(drafter):
  """Every emitted token follows the target's (filtered) distribution, whatever the draft."""
  v, k, n = 6, 2, 200_000
  rng = np.random.default_rng(1)
  target = rng.normal(size=(k + 1, v)) * 1.5
  temperature, top_k = 0.8, 5
  p = np.stack([_exact(t, temperature, top_k) for t in target])
  settings = dict(temperature=jnp.full(n, temperature, jnp.float32),
                  top_k=jnp.full(n, top_k, jnp.int32), top_p=jnp.ones(n, jnp.float32),
                  min_p=jnp.zeros(n, jnp.float32))
  d = DecodeState(tokens=None, seq_ids=None, num_generated=None, max_new_tokens=None,
                  done=None, stop_tokens=None, keys=None, **settings)
  if drafter == "draft_model":
    q = np.stack([_exact(t, 1.3, v) for t in rng.normal(size=(k, v))])
    drafts = np.stack([rng.choice(v, size=n, p=q[j]) for j in range(k)], 1)
    logq = jnp.broadcast_to(jnp.log(jnp.asarray(q, jnp.float32)), (n, k, v))
  else:  # a point mass: the target's likeliest token, then one top-k filters out
    drafts = np.tile([np.argmax(p[0]), np.argmin(target[1])], (n, 1))
    assert p[1, drafts[0, 1]] == 0
    logq = None
  keys = jax.random.split(jax.random.key(2), n * (k + 1)).reshape(n, k + 1)
  acc, tok = jax.jit(_accept, static_argnums=7)(
      jnp.broadcast_to(jnp.asarray(target, jnp.float32), (n, k + 1, v)),
      jnp.asarray(drafts, jnp.int32), jnp.full(n, k, jnp.int32), logq, d, keys[:, :k],
      keys[:, k], False)
  acc, tok = np.asarray(acc), np.asarray(tok)
  emitted = np.concatenate([drafts, np.zeros((n, 1), int)], 1)
  emitted[np.arange(n), acc] = tok
  for j in range(k + 1):
    reached = acc >= j  # rows that emitted a token at position j
    if drafter == "prompt_lookup" and j == k:  # its last draft has probability 0
      assert not reached.any()
      continue
    got = np.bincount(emitted[reached, j], minlength=v) / reached.sum()
    sigma = np.sqrt(p[j] * (1 - p[j]) / reached.sum())
    assert np.all(np.abs(got - p[j]) <= 5 * sigma + 1e-9), (j, got, p[j])
    assert reached.sum() > 1000
  assert np.all(acc[drafts[:, 0] != np.argmax(p[0])] >= 0)


def test_sampled_rows_do_not_depend_on_the_batch_and_greedy_rows_stay_greedy():
  spec = SpeculativeConfig(num_draft_tokens=3, draft_model=TINY)
  prompts = PROMPTS + [PROMPTS[1][:3]]
  sampling = [pk.SamplingParams(temperature=0.9, top_k=20, seed=5, max_new_tokens=16),
              pk.SamplingParams(max_new_tokens=16),
              pk.SamplingParams(temperature=1.2, top_p=0.9, seed=9, max_new_tokens=16),
              pk.SamplingParams(temperature=8.0, seed=3, max_new_tokens=16)]
  outs = speculative_generate(PARAMS, SMALL, prompts, sampling, speculative=spec,
                              draft_params=TINY_PARAMS)
  order = [2, 0, 3, 1]
  again = speculative_generate(PARAMS, SMALL, [prompts[i] for i in order],
                               [sampling[i] for i in order], speculative=spec,
                               draft_params=TINY_PARAMS)
  for i, o in zip(order, again, strict=True):
    assert o == outs[i]
  target = Greedy(PARAMS, SMALL)
  assert outs[1].tokens == model_loop(PROMPTS[1], target(PROMPTS[1]), 16, 3, target,
                                      lambda s, c: [])[0]
  for p, o in zip(prompts, outs, strict=True):
    assert len(o.tokens) == 16
    np.testing.assert_allclose(o.logprobs, reference_logprobs(PARAMS, SMALL, p, o.tokens),
                               atol=2e-4)
  # Row 0 draws from its 20 likeliest tokens only.
  ref = reference_logits(PARAMS, SMALL, PROMPTS[0] + outs[0].tokens[:-1])[len(PROMPTS[0]) - 1:]
  rank = (ref > ref[np.arange(16), outs[0].tokens][:, None]).sum(1)
  assert np.all(rank < 20) and np.any(rank > 0)
  # Row 3 samples a nearly flat distribution (temperature 8): fresh randomness every iteration
  # gives ~15 distinct tokens of 16; randomness reused across iterations would repeat a few.
  assert len(set(outs[3].tokens)) >= 11


def _used(cache):
  return int(pk.cache_stats(cache).used_blocks)


def _blocks_for(cache, ids):
  bs = cache.config.block_size
  return sum(math.ceil(int(cache.seq_lens[i]) / bs) for i in ids)


def _same_kv(params, config, cache, ids, sequences):
  """Each sequence's K/V in ``cache`` equal a fresh prefill of its tokens."""
  fresh = pk.init_cache(cache.config)
  fresh, _ = run_chunked(params, config, fresh, sequences, list(range(len(sequences))), 16)
  for layer in range(config.num_layers):
    k, v, n = pk.lookup_kv(cache, np.asarray(ids, np.int32), layer)
    fk, fv, fn = pk.lookup_kv(fresh, np.arange(len(sequences), dtype=np.int32), layer)
    np.testing.assert_array_equal(n, fn)
    np.testing.assert_allclose(k, fk, atol=1e-4)
    np.testing.assert_allclose(v, fv, atol=1e-4)


def test_loop_leaves_both_caches_holding_the_tokens_and_a_second_call_continues():
  spec = SpeculativeConfig(num_draft_tokens=3, draft_model=SMALL)
  run = prepare_speculative(PARAMS, SMALL, PROMPTS, pk.SamplingParams(max_new_tokens=20),
                            speculative=spec, draft_params=NOISY)
  st = run.state
  st = st.replace(decode=st.decode.replace(max_new_tokens=jnp.full(4, 8, jnp.int32)))
  cache, dcache, st, res = speculative_loop(
      PARAMS, run.cache, st, model=SMALL, spec=spec, max_tokens=32, draft_params=NOISY,
      draft_cache=run.draft_cache)
  assert not np.any(np.asarray(res.status)) and not np.any(np.asarray(res.draft_status))
  target = Greedy(PARAMS, SMALL)
  want = [model_loop(p, target(p), 20, 3, target, lambda s, c: [])[0] for p in PROMPTS]
  hist, length, dlen = (np.asarray(x) for x in (st.history, st.length, st.draft_len))
  for i, p in enumerate(PROMPTS):
    assert [int(run.first[i])] + np.asarray(res.tokens)[i, :7].tolist() == want[i][:8]
    assert length[i] == len(p) + 8 and int(cache.seq_lens[i]) == length[i] - 1
    assert hist[i, :length[i]].tolist() == p + want[i][:8]
    assert length[i] - 2 <= dlen[i] <= length[i] - 1 and int(dcache.seq_lens[i]) == dlen[i]
  ids = range(3)
  # Both caches hold exactly their tokens: what a fresh prefill writes, no rolled-back block.
  _same_kv(PARAMS, SMALL, cache, ids, [hist[i, :length[i] - 1].tolist() for i in ids])
  _same_kv(NOISY, SMALL, dcache, ids, [hist[i, :dlen[i]].tolist() for i in ids])
  for c in (cache, dcache):
    assert bool(pk.check_invariants(c).ok) and _used(c) == _blocks_for(c, ids)
  # A row stays done (as in decode_loop) until the caller says otherwise.
  st = st.replace(decode=st.decode.replace(max_new_tokens=jnp.full(4, 20, jnp.int32),
                                           done=jnp.asarray([False] * 3 + [True])))
  cache, dcache, st, res = speculative_loop(
      PARAMS, cache, st, model=SMALL, spec=spec, max_tokens=32, draft_params=NOISY,
      draft_cache=dcache)
  for i in ids:
    assert np.asarray(res.tokens)[i, :12].tolist() == want[i][8:]
    assert int(res.num_tokens[i]) == 12


def test_running_out_of_blocks_stops_the_loop_with_every_cache_consistent():
  target = Greedy(PARAMS, SMALL)
  sp = pk.SamplingParams(max_new_tokens=24)
  want = [model_loop(p, target(p), 24, 4, target, lambda s, c: lookup(s, 4, 1, 3))[0]
          for p in PROMPTS]
  small = pk.cache_config_for(SMALL, num_blocks=1 + 14 + 5, max_seqs=4, max_seq_len=128,
                              block_size=4)
  spec = SpeculativeConfig(num_draft_tokens=4)
  run = prepare_speculative(PARAMS, SMALL, PROMPTS, sp, speculative=spec, cache_config=small)
  cache, _, st, res = run.loop()
  status, num = np.asarray(res.status), np.asarray(res.num_tokens)
  assert Status.POOL_EXHAUSTED in status.tolist() and num.sum() > 0
  for i, p in enumerate(PROMPTS):
    got = [int(run.first[i])] + np.asarray(res.tokens)[i, :num[i]].tolist()
    assert got == want[i][:len(got)]
    assert int(cache.seq_lens[i]) == len(p) + len(got) - 1 == int(st.length[i]) - 1
  assert bool(pk.check_invariants(cache).ok) and _used(cache) == _blocks_for(cache, range(3))
  with pytest.raises(pk.PoolExhaustedError):
    speculative_generate(PARAMS, SMALL, PROMPTS, sp, speculative=spec, cache_config=small)
  # The draft's pool runs dry: the loop stops, both caches as after the last good iteration.
  spec = SpeculativeConfig(num_draft_tokens=3, draft_model=TINY)
  tiny = pk.cache_config_for(TINY, num_blocks=1 + 14 + 4, max_seqs=4, max_seq_len=128,
                             block_size=4)
  run = prepare_speculative(PARAMS, SMALL, PROMPTS, sp, speculative=spec,
                            draft_params=TINY_PARAMS, draft_cache_config=tiny)
  cache, dcache, st, res = run.loop()
  assert Status.POOL_EXHAUSTED in np.asarray(res.draft_status).tolist()
  assert not np.any(np.asarray(res.status))
  for i in range(3):
    assert int(cache.seq_lens[i]) == int(st.length[i]) - 1
    assert int(dcache.seq_lens[i]) == int(st.draft_len[i])
  for c in (cache, dcache):
    assert bool(pk.check_invariants(c).ok) and _used(c) == _blocks_for(c, range(3))


def test_bad_settings_and_states_are_refused_and_change_nothing():
  for bad in (dict(num_draft_tokens=0), dict(num_draft_tokens=MAX_DRAFT_TOKENS + 1),
              dict(num_draft_tokens=2.5), dict(prompt_lookup_min=3, prompt_lookup_max=2),
              dict(prompt_lookup_max=0)):
    with pytest.raises(ValueError):
      SpeculativeConfig(**bad)
  other = dataclasses.replace(TINY, vocab_size=64)
  for package in ("jax_paged_kv", "jax_paged_kv.serving"):
    exec(f"from {package} import *", {})  # noqa: S102  (every name in __all__ exists)
  with pytest.raises(ValueError, match="vocabulary"):
    speculative_generate(PARAMS, SMALL, PROMPTS, speculative=SpeculativeConfig(
        draft_model=other), draft_params=init_params(other, jax.random.key(0)))
  with pytest.raises(ValueError, match="draft_params"):
    speculative_generate(PARAMS, SMALL, PROMPTS,
                         speculative=SpeculativeConfig(draft_model=TINY))
  for sp in (pk.SamplingParams(repetition_penalty=1.2), pk.SamplingParams(n=2),
             pk.SamplingParams(logprobs=True, top_logprobs=2)):
    with pytest.raises(ValueError, match="not supported"):
      speculative_generate(PARAMS, SMALL, PROMPTS, sp)
  with pytest.raises(ValueError, match="at least one token"):
    speculative_generate(PARAMS, SMALL, [[1], []])
  # A protocol model whose forward returns only the last position's logits cannot verify.
  from tests.test_model_protocol import TinyGPT
  with pytest.raises(ValueError, match="all_logits"):
    speculative_generate(TinyGPT().init(jax.random.key(0)), TinyGPT(), [[1, 2]])
  # States that do not match the caches: nothing runs, nothing changes.
  spec = SpeculativeConfig(num_draft_tokens=3, draft_model=SMALL)
  sp = pk.SamplingParams(max_new_tokens=20)

  def run_with(edit):
    run = prepare_speculative(PARAMS, SMALL, PROMPTS, sp, speculative=spec, draft_params=NOISY)
    st, cache, dcache = edit(run.state, run.cache, run.draft_cache)
    lens = np.asarray(cache.seq_lens), np.asarray(dcache.seq_lens)
    free = _used(cache), _used(dcache)
    cache, dcache, _, res = speculative_loop(
        PARAMS, cache, st, model=SMALL, spec=spec, max_tokens=32, draft_params=NOISY,
        draft_cache=dcache)
    assert int(res.iterations) == 0 and int(np.asarray(res.num_tokens).sum()) == 0
    np.testing.assert_array_equal(np.asarray(cache.seq_lens), lens[0])
    np.testing.assert_array_equal(np.asarray(dcache.seq_lens), lens[1])
    assert (_used(cache), _used(dcache)) == free
    return np.asarray(res.status).tolist(), np.asarray(res.draft_status).tolist()

  off = lambda st, c, d: (st.replace(length=st.length + jnp.asarray([0, 1, 0, 0])), c, d)  # noqa: E731
  assert run_with(off)[0][1] == Status.INVALID_COUNT
  dup = lambda st, c, d: (st.replace(decode=st.decode.replace(  # noqa: E731
      seq_ids=jnp.asarray([0, 0, 2, -1], jnp.int32))), c, d)
  assert Status.DUPLICATE_SLOT in run_with(dup)[0]
  gone = lambda st, c, d: (st, pk.free_sequences(c, np.asarray([2], np.int32))[0], d)  # noqa: E731
  assert run_with(gone)[0][2] == Status.INACTIVE_SLOT
  lag = lambda st, c, d: (st.replace(draft_len=st.draft_len - 1), c, d)  # noqa: E731
  assert run_with(lag)[1][:3] == [Status.INVALID_COUNT] * 3
  nodraft = lambda st, c, d: (st.replace(draft_ids=st.draft_ids.at[1].set(-1)), c, d)  # noqa: E731
  assert run_with(nodraft)[1][1] == Status.INVALID_SLOT
  # A history whose last token is not the pending one, or too narrow for what is left.
  other = lambda st, c, d: (st.replace(decode=st.decode.replace(  # noqa: E731
      tokens=st.decode.tokens.at[0].add(1))), c, d)
  assert run_with(other)[0][0] == Status.INVALID_COUNT
  narrow = lambda st, c, d: (st.replace(decode=st.decode.replace(  # noqa: E731
      max_new_tokens=st.decode.max_new_tokens.at[2].set(st.history.shape[1]))), c, d)
  assert run_with(narrow)[0][2] == Status.INVALID_COUNT
  dgone = lambda st, c, d: (st, c, pk.free_sequences(d, np.asarray([0], np.int32))[0])  # noqa: E731
  assert run_with(dgone)[1][0] == Status.INACTIVE_SLOT


def test_other_lengths_stop_tokens_and_prompt_counts_share_one_compiled_loop():
  from tests.test_no_recompile import COMPILE_EVENT, count_compilations
  spec = SpeculativeConfig(num_draft_tokens=4)
  speculative_generate(PARAMS, SMALL, PROMPTS, pk.SamplingParams(max_new_tokens=20),
                       speculative=spec)
  with count_compilations() as events:
    outs = speculative_generate(PARAMS, SMALL, PROMPTS + [[5, 6]],
                                pk.SamplingParams(max_new_tokens=17, stop_tokens=(3, 9)),
                                speculative=spec)
  assert not [e for e in events if e[0] == COMPILE_EVENT and "speculative" in e[1]]
  assert all(len(o.tokens) <= 17 for o in outs)


@pytest.mark.slow  # tokens only: the float64 loop above checks them, and the drafts too
def test_matches_transformers_prompt_lookup_and_assisted_generation(tmp_path):
  """Token for token against ``transformers``' own speculative decoding on the same random
  Llama: ``generate(prompt_lookup_num_tokens=k)`` and ``generate(assistant_model=...)`` with a
  noisy copy of the target as the assistant (a stop token in one case)."""
  from tests.test_families import hf_model

  torch, hf, _ = hf_model("llama2", tmp_path / "target")
  import transformers

  torch.manual_seed(5)
  assistant = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "target", attn_implementation="eager").eval()
  with torch.no_grad():
    for p in assistant.parameters():
      p.add_(0.3 * p.std() * torch.randn_like(p))
  assistant.save_pretrained(tmp_path / "draft", safe_serialization=True)
  config, params = pk.load_hf_checkpoint(tmp_path / "target")
  dconfig, dparams = pk.load_hf_checkpoint(tmp_path / "draft")
  rng = np.random.default_rng(11)
  base = rng.integers(0, 128, 6).tolist()
  prompts = [base * 3, rng.integers(0, 128, 9).tolist(), base[:4] * 2 + [base[0]]]

  def hf_generate(prompt, sp, **kw):
    ids = torch.tensor([prompt])
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=sp.max_new_tokens, pad_token_id=0,
                        eos_token_id=list(sp.stop_tokens) or None, **kw)
    row = out[0, len(prompt):].tolist()
    ends = [i for i, t in enumerate(row) if t in sp.stop_tokens]
    return row[:ends[0] + 1] if ends else row

  plain = pk.SamplingParams(max_new_tokens=14)
  stop = hf_generate(prompts[1], plain)[6]
  sampling = [plain, pk.SamplingParams(max_new_tokens=14, stop_tokens=(stop,)), plain]
  k = 3
  lookup = pk.speculative_generate(params, config, prompts, sampling, block_size=4,
                                   speculative=pk.SpeculativeConfig(num_draft_tokens=k))
  drafted = pk.speculative_generate(
      params, config, prompts, sampling, block_size=4, draft_params=dparams,
      speculative=pk.SpeculativeConfig(num_draft_tokens=k, draft_model=dconfig))
  for prompt, sp, a, b in zip(prompts, sampling, lookup, drafted, strict=True):
    assert a.tokens == hf_generate(prompt, sp, prompt_lookup_num_tokens=k)
    assert b.tokens == hf_generate(prompt, sp, assistant_model=assistant,
                                   num_assistant_tokens=k,
                                   num_assistant_tokens_schedule="constant")
  assert lookup[1].tokens[-1] == stop
  assert sum(o.accepted for o in lookup) > 0 and sum(o.accepted for o in drafted) > 0


def test_contiguous_int8_caches_give_the_engine_s_tokens_on_the_same_cache():
  """Rollback of quantised K/V (int8 block-channel scales narrowed by truncate) in slabs: the
  draft-model loop on ``CONTIGUOUS`` int8 caches gives the engine's greedy tokens on that cache
  config, and both caches end consistent."""
  cc = dataclasses.replace(pk.cache_config_for(
      SMALL, num_blocks=1 + 4 * 32, max_seqs=4, max_seq_len=128, block_size=4,
      strategy=pk.CacheStrategy.CONTIGUOUS), kv_quant="int8")
  sp = pk.SamplingParams(max_new_tokens=16)
  want = pk.generate(PARAMS, SMALL, PROMPTS, sp, cache_config=cc)
  spec = SpeculativeConfig(num_draft_tokens=3, draft_model=SMALL)
  run = prepare_speculative(PARAMS, SMALL, PROMPTS, sp, speculative=spec, draft_params=NOISY,
                            cache_config=cc, draft_cache_config=cc)
  cache, dcache, st, res = run.loop()
  assert not np.any(np.asarray(res.status)) and not np.any(np.asarray(res.draft_status))
  num = np.asarray(res.num_tokens)
  for i in range(3):
    assert [int(run.first[i])] + np.asarray(res.tokens)[i, :num[i]].tolist() == list(want[i])
    assert int(cache.seq_lens[i]) == int(st.length[i]) - 1
    assert int(dcache.seq_lens[i]) == int(st.draft_len[i])
  assert 0 < int(np.asarray(res.accepted).sum()) < int(np.asarray(res.drafted).sum())
  assert bool(pk.check_invariants(cache).ok) and bool(pk.check_invariants(dcache).ok)


def test_a_loop_cut_into_iterations_gives_the_tokens_of_one_loop():
  """``num_iterations`` (traced: one program for every count) stops the loop early, and an
  output buffer of ``max_tokens=4`` (one iteration's most) pauses its rows (not done) after
  each iteration; calls chained on the returned state give the tokens of one whole loop."""
  from tests.test_no_recompile import COMPILE_EVENT, count_compilations

  spec = SpeculativeConfig(num_draft_tokens=3, draft_model=SMALL)
  sp = pk.SamplingParams(max_new_tokens=20, temperature=0.8, seed=4)
  whole = speculative_generate(PARAMS, SMALL, PROMPTS, sp, speculative=spec, draft_params=NOISY)
  run = prepare_speculative(PARAMS, SMALL, PROMPTS, sp, speculative=spec, draft_params=NOISY)
  cache, dcache, st = run.cache, run.draft_cache, run.state
  got = [[int(t)] for t in run.first[:3]]
  calls, filled = 0, 0
  with count_compilations() as events:
    while not bool(np.all(np.asarray(st.decode.done)[:3])):
      calls += 1
      cache, dcache, st, res = speculative_loop(
          PARAMS, cache, st, model=SMALL, spec=spec, max_tokens=4, draft_params=NOISY,
          draft_cache=dcache, num_iterations=(calls % 3 + 1) if calls % 2 else np.int32(
              calls % 3 + 1))
      assert int(res.iterations) <= calls % 3 + 1
      # Every live row paused before its buffer could overflow: fewer iterations than asked.
      filled += int(int(res.iterations) < calls % 3 + 1
                    and not np.all(np.asarray(st.decode.done)[:3]))
      for i in range(3):
        got[i] += np.asarray(res.tokens)[i, :int(res.num_tokens[i])].tolist()
  assert calls > 2 and filled > 0
  assert got == [o.tokens for o in whole]
  assert len([e for e in events if e[0] == COMPILE_EVENT and "speculative" in e[1]]) <= 1
  with pytest.raises(ValueError, match="num_iterations"):
    speculative_loop(PARAMS, cache, st, model=SMALL, spec=spec, max_tokens=4,
                     draft_params=NOISY, draft_cache=dcache, num_iterations=2.5)
  with pytest.raises(ValueError, match="max_tokens"):
    speculative_loop(PARAMS, cache, st, model=SMALL, spec=spec, max_tokens=3,
                     draft_params=NOISY, draft_cache=dcache)
  for bad in (np.int64(2**32 + 1), -1, True, np.ones(2, np.int32)):
    with pytest.raises(ValueError, match="num_iterations"):
      speculative_loop(PARAMS, cache, st, model=SMALL, spec=spec, max_tokens=4,
                       draft_params=NOISY, draft_cache=dcache, num_iterations=bad)
