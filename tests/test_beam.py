"""Beam search on the paged cache, and the ``reorder_sequences`` op it is built on.

Oracles: a plain-Python model of sequence contents (reorder, then copy-on-write appends), the
plain-Python float64 beam search of tests/beam_reference.py (every beam's logits recomputed from
its whole sequence, no cache; it also proves its choices are not near-ties), Hugging Face
``transformers``' own ``generate(num_beams=...)`` on the same weights, greedy decoding (one
beam), the ``CONTIGUOUS`` strategy (copies instead of shared blocks) and the allocator's
invariants and free count.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from jax_paged_kv.models import init_params, load_hf_checkpoint
from jax_paged_kv.serving.beam import (
    MAX_BEAM_WIDTH,
    BeamSearchParams,
    _finish,
    _start,
    _step,
    beam_cache_config,
    beam_search,
    beam_search_loop,
)
from jax_paged_kv.serving.decoding import MAX_STOP_TOKENS
from tests.beam_reference import reference_beam_search
from tests.llama_fixtures import SMALL, forward_jit
from tests.llama_reference import reference_greedy, reference_logits

# ---------------------------------------------------------------------------------------------
# reorder_sequences

TINY = dict(num_layers=1, num_kv_heads=1, head_dim=1, num_blocks=73, max_seqs=6,
            max_seq_len=48, block_size=4, dtype=jnp.float32)


def _append(cache, contents, rows, counter, t=3):
  """Appends ``rows[slot]`` new tokens to each slot; token values are unique (k = x, v = -x)."""
  cfg = cache.config
  k = np.zeros((1, cfg.max_seqs, t, 1, 1), np.float32)
  num = np.zeros(cfg.max_seqs, np.int32)
  for s, n in rows.items():
    for i in range(n):
      counter[0] += 1
      k[0, s, i, 0, 0] = counter[0]
      contents[s].append(counter[0])
    num[s] = n
  ids = np.where(num > 0, np.arange(cfg.max_seqs), -1).astype(np.int32)
  cache, status = pk.append_kv(cache, jnp.asarray(k), jnp.asarray(-k), ids, num_new=num)
  assert not np.any(np.asarray(status))
  return cache


def _check_contents(cache, contents):
  ids = np.asarray(sorted(contents), np.int32)
  k, v, lens = pk.lookup_kv(cache, ids, 0)
  for row, s in enumerate(ids):
    want = np.asarray(contents[s], np.float32)
    assert int(lens[row]) == len(want), s
    np.testing.assert_array_equal(np.asarray(k)[row, :len(want), 0, 0], want, err_msg=str(s))
    np.testing.assert_array_equal(np.asarray(v)[row, :len(want), 0, 0], -want, err_msg=str(s))
  report = pk.check_invariants(cache)
  assert bool(report.ok), report


@pytest.mark.parametrize("strategy", [pk.CacheStrategy.PAGED, pk.CacheStrategy.CONTIGUOUS])
def test_reorder_gives_each_sequence_its_source_s_tokens(strategy):
  """Random rounds of reorder (sources repeated, kept, dropped; a sequence its own source) and
  appends to every sequence, against a plain-Python model of each sequence's tokens. In a
  paged cache the reordered sequences share the source's blocks (reference counts), and the
  blocks no sequence names any more go back to the pool."""
  rng = np.random.default_rng(0)
  cfg = pk.CacheConfig(**TINY, strategy=strategy)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg, pool_fill=float("nan")),
                                   np.arange(6, dtype=np.int32))
  contents = {s: [] for s in range(6)}
  counter = [0]
  cache = _append(cache, contents, {s: int(rng.integers(1, 4)) for s in range(6)}, counter)
  shared_seen = False
  for _ in range(8):
    group = rng.permutation(6)[:int(rng.integers(2, 6))]  # the beams; the others look on
    src = rng.choice(group, len(group))
    old_tables = np.asarray(cache.block_tables)
    cache, status = pk.reorder_sequences(cache, group.astype(np.int32), src.astype(np.int32))
    assert not np.any(np.asarray(status))
    before = {s: list(c) for s, c in contents.items()}
    for g, s in zip(group, src, strict=True):
      contents[int(g)] = list(before[int(s)])
    _check_contents(cache, contents)
    if strategy is pk.CacheStrategy.PAGED:
      tables, lens = np.asarray(cache.block_tables), np.asarray(cache.seq_lens)
      for g, s in zip(group, src, strict=True):  # the source's own blocks, before the call
        nb = -(-lens[g] // cfg.block_size)
        np.testing.assert_array_equal(tables[g, :nb], old_tables[s, :nb])
        shared_seen |= bool(g != s and nb > 0)
      refs = np.bincount(tables[tables > 0], minlength=cfg.num_blocks)
      assert int(cache.allocator.num_free) == cfg.num_blocks - 1 - np.count_nonzero(refs)
    cache = _append(cache, contents, {s: int(rng.integers(0, 3)) for s in range(6)}, counter)
    _check_contents(cache, contents)
  cache, _ = pk.free_sequences(cache, np.arange(6, dtype=np.int32))
  assert bool(pk.check_invariants(cache).ok)
  if strategy is pk.CacheStrategy.PAGED:
    assert shared_seen and int(cache.allocator.num_free) == cfg.num_blocks - 1


def test_reorder_bad_input_raises_or_reports_and_changes_nothing():
  cfg = pk.CacheConfig(**TINY)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), np.asarray([0, 1, 2], np.int32))
  cache = _append(cache, {s: [] for s in range(6)}, {0: 3, 1: 2, 2: 1}, [0])
  cases = [  # (seq_ids, src_ids, eager error, status)
      ([0, 1], [1, 4], pk.InactiveSlotError, pk.Status.INACTIVE_SLOT),  # source inactive
      ([0, 4], [1, 1], pk.InactiveSlotError, pk.Status.INACTIVE_SLOT),  # sequence inactive
      ([0, 0], [1, 2], pk.DuplicateSlotError, pk.Status.DUPLICATE_SLOT),
      ([0, -1], [1, 2], pk.InvalidSlotError, pk.Status.INVALID_SLOT),  # padding mismatch
      ([0, 1], [1, 6], pk.InvalidSlotError, pk.Status.INVALID_SLOT),  # out of range
  ]
  jitted = jax.jit(pk.reorder_sequences)
  for seqs, srcs, error, code in cases:
    seqs, srcs = np.asarray(seqs, np.int32), np.asarray(srcs, np.int32)
    with pytest.raises(error, match="reorder_sequences"):
      pk.reorder_sequences(cache, seqs, srcs, donate=False)
    out, status = jitted(cache, seqs, srcs)
    assert int(np.max(np.asarray(status))) == code and int(np.min(np.asarray(status))) >= 0
    jax.tree.map(np.testing.assert_array_equal, out, cache)
  with pytest.raises(pk.CacheShapeError, match="differ in shape"):
    pk.reorder_sequences(cache, np.asarray([0, 1], np.int32), np.asarray([1], np.int32))
  # The messages name the slot at fault.
  with pytest.raises(pk.InactiveSlotError, match="slot 4 is not active"):
    pk.reorder_sequences(cache, np.asarray([0], np.int32), np.asarray([4], np.int32),
                         donate=False)


# ---------------------------------------------------------------------------------------------
# beam search against the float64 search

PARAMS = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)
RNG = np.random.default_rng(1)
PROMPTS = [RNG.integers(0, 128, n).tolist() for n in (17, 9, 5)]
# One cache shape for every search here (one compilation of the prefill per model).
CC = SMALL.cache_config(num_blocks=128, max_seqs=16, max_seq_len=48, block_size=4)

SEARCHES = {
    # early_stopping=True closes PROMPTS[0]'s set while a live beam could still enter it
    # (with False its hypotheses differ: checked below).
    "early-true": BeamSearchParams(beam_width=3, max_new_tokens=8, stop_tokens=(3, 14),
                                   length_penalty=2.0, early_stopping=True),
    # Stop tokens that end hypotheses of these prompts, a length penalty favouring short ones.
    "stops-early": BeamSearchParams(beam_width=4, max_new_tokens=10, stop_tokens=(5, 17, 80),
                                    length_penalty=-1.0, early_stopping=True),
    "stops-never": BeamSearchParams(beam_width=2, max_new_tokens=10, stop_tokens=(5, 80),
                                    length_penalty=2.0, early_stopping="never"),
    # Five stop tokens: four of PROMPTS[0]'s five most likely first tokens and its 6th. Its
    # best hypothesis starts with the 5th, token 0, found only because (1 + 5) * 2 candidates
    # are kept (and because the stop table, 8 wide, is padded with -1, not token 0).
    "many-stops": BeamSearchParams(beam_width=2, max_new_tokens=6,
                                   stop_tokens=(72, 80, 99, 40, 18), length_penalty=2.0,
                                   early_stopping="never"),
}


def check_against_reference(hyps, prompt, beam, params=PARAMS, model=SMALL):
  ref, margin = reference_beam_search(params, model, prompt, beam)
  assert margin > 1e-4, f"near-tie in the float64 search ({margin}): pick other data"
  assert len(hyps) == beam.beam_width == len(ref)
  for h, (score, toks, lps) in zip(hyps, ref, strict=True):
    assert h.tokens == toks
    np.testing.assert_allclose(h.logprobs, lps, atol=2e-4, rtol=0)
    np.testing.assert_allclose(h.score, score, atol=2e-4, rtol=1e-5)
    assert h.stopped == (toks[-1] in beam.stop_tokens)
    np.testing.assert_allclose(h.score, h.cumulative_logprob / len(toks) ** beam.length_penalty,
                               rtol=1e-5)
  return ref


def test_beam_search_matches_the_float64_search():
  first = np.argsort(-reference_logits(PARAMS, SMALL, PROMPTS[0])[-1])[:6].tolist()
  assert first == [72, 80, 99, 40, 0, 18]
  stopped = set()
  for name, beam in SEARCHES.items():
    out = beam_search(PARAMS, SMALL, PROMPTS, beam, cache_config=CC)
    for prompt, hyps in zip(PROMPTS, out, strict=True):
      check_against_reference(hyps, prompt, beam)
      stopped |= {h.stopped for h in hyps}
      assert len({tuple(h.tokens) for h in hyps}) == beam.beam_width, name  # distinct beams
    if name == "many-stops":
      assert out[0][0].tokens[0] == 0
  assert stopped == {True, False}  # both kinds of hypothesis were checked
  assert reference_beam_search(PARAMS, SMALL, PROMPTS[0], SEARCHES["early-true"])[0] != (
      reference_beam_search(PARAMS, SMALL, PROMPTS[0], dataclasses.replace(
          SEARCHES["early-true"], early_stopping=False))[0])


def test_one_beam_is_greedy_decoding():
  beam = BeamSearchParams(beam_width=1, max_new_tokens=8)
  out = beam_search(PARAMS, SMALL, PROMPTS, beam, cache_config=CC)
  for prompt, (hyp,) in zip(PROMPTS, out, strict=True):
    assert hyp.tokens == reference_greedy(PARAMS, SMALL, prompt, 8)


def test_contiguous_copies_give_what_shared_blocks_give():
  """The ``CONTIGUOUS`` strategy copies a parent's whole KV into each child's slab (Hugging
  Face's reorder); shared blocks with copy-on-write must read the same values, so the same
  search, here with int8 KV (a block's scales go with it, copied or shared). The two
  strategies' attention programs differ, which moves the last bits of the logprobs (by ~2e-6
  here)."""
  beam = SEARCHES["stops-early"]
  out = {}
  for strategy in (pk.CacheStrategy.PAGED, pk.CacheStrategy.CONTIGUOUS):
    cc = dataclasses.replace(CC, strategy=strategy, kv_quant="int8",
                             num_blocks=1 + 16 * 12 if strategy is pk.CacheStrategy.CONTIGUOUS
                             else CC.num_blocks)
    out[strategy] = beam_search(PARAMS, SMALL, PROMPTS[:2], beam, cache_config=cc)
  for paged, contiguous in zip(*out.values(), strict=True):
    assert [h.tokens for h in paged] == [h.tokens for h in contiguous]
    assert [h.stopped for h in paged] == [h.stopped for h in contiguous]
    for a, b in zip(paged, contiguous, strict=True):
      np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
      np.testing.assert_allclose(a.score, b.score, atol=1e-5, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# the jitted loop on a cache the caller holds


def _prefilled(num_blocks, prompts, bystander):
  """A cache with ``prompts`` prefilled in slots 0, 4, ... and ``bystander`` in slot 15."""
  cc = dataclasses.replace(CC, num_blocks=num_blocks)
  cache = pk.init_cache(cc, pool_fill=float("nan"))
  slots = [4 * i for i in range(len(prompts))] + [15]
  cache, _ = pk.allocate_sequences(cache, np.asarray(slots, np.int32))
  width = max(map(len, prompts + [bystander]))
  toks = np.zeros((len(slots), width), np.int32)
  for i, p in enumerate(prompts + [bystander]):
    toks[i, :len(p)] = p
  num = np.asarray([len(p) for p in prompts + [bystander]], np.int32)
  cache, logits, status = forward_jit(PARAMS, cache, toks, np.asarray(slots, np.int32), num,
                                      config=SMALL)
  assert not np.any(np.asarray(status))
  return cache, np.asarray(logits)[:len(prompts)]


def _slots(n, w):
  return np.asarray([[4 * i + j for j in range(w)] for i in range(n)], np.int32)


def test_loop_shares_the_prompt_frees_every_beam_and_leaves_other_sequences_alone():
  """The pool holds the prompts once plus each beam's own blocks: the search fits where
  ``beam_width`` copies of each prompt would not. After it every beam is freed (the prompt's
  slot too), and a sequence outside the search reads the same keys and values."""
  beam = SEARCHES["stops-early"]
  prompts = PROMPTS[:2]
  # 5 + 3 prompt blocks + 4 bystander blocks; 4 beams x (10 new tokens: <= 4 blocks each);
  # copying the prompts for every beam would need 4 * (5 + 3) = 32 blocks for them alone.
  num_blocks = 1 + 8 + 4 + 2 * 4 * 4
  cache, logits = _prefilled(num_blocks, prompts, PROMPTS[2] * 3)
  free0 = int(cache.allocator.num_free)
  by_k, by_v, _ = pk.lookup_kv(cache, np.asarray([15], np.int32), 1)
  cache, res = beam_search_loop(PARAMS, cache, logits, _slots(2, 4), beam=beam, model=SMALL)
  assert not np.any(np.asarray(res.status))
  assert int(cache.allocator.num_free) == free0 + 5 + 3  # beams gone, prompts' blocks back
  assert np.asarray(cache.active).nonzero()[0].tolist() == [15]
  assert bool(pk.check_invariants(cache).ok)
  k, v, _ = pk.lookup_kv(cache, np.asarray([15], np.int32), 1)
  np.testing.assert_array_equal(np.asarray(k), np.asarray(by_k))
  np.testing.assert_array_equal(np.asarray(v), np.asarray(by_v))
  for i, prompt in enumerate(prompts):
    ref = reference_beam_search(PARAMS, SMALL, prompt, beam)[0]
    n = np.asarray(res.lengths)[i]
    assert [np.asarray(res.tokens)[i, j, :n[j]].tolist() for j in range(4)] == [
        r[1] for r in ref]
    assert np.all(np.asarray(res.tokens)[i][np.arange(16)[None, :] >= n[:, None]] == -1)
  assert 0 < int(res.steps) <= beam.max_new_tokens
  # The high-water mark: at least what was held before, within the pool, and (the prompts held
  # once) below the 8 * 4 = 32 blocks that copying each prompt for every beam would take.
  assert num_blocks - 1 - free0 < int(res.peak_blocks) < 4 + 32


# Room for the two prompts (8 blocks), the bystander (4) and 2 more: the beams run out.
SHORT = 1 + 8 + 6


def test_loop_that_runs_out_of_blocks_stops_frees_its_beams_and_reports():
  beam = SEARCHES["early-true"]
  cache, logits = _prefilled(SHORT, PROMPTS[:2], PROMPTS[2] * 3)
  free0 = int(cache.allocator.num_free)
  by_k, _, _ = pk.lookup_kv(cache, np.asarray([15], np.int32), 0)
  cache, res = beam_search_loop(PARAMS, cache, logits, _slots(2, 3), beam=beam, model=SMALL)
  assert int(np.max(np.asarray(res.status))) == pk.Status.POOL_EXHAUSTED
  assert int(res.steps) < beam.max_new_tokens
  assert int(cache.allocator.num_free) == free0 + 8 and bool(pk.check_invariants(cache).ok)
  assert np.asarray(cache.active).nonzero()[0].tolist() == [15]
  np.testing.assert_array_equal(np.asarray(pk.lookup_kv(cache, np.asarray([15], np.int32),
                                                        0)[0]), np.asarray(by_k))
  # The same search, one jitted step at a time: the failing step changes neither the beams nor
  # the cache (its telemetry aside), and what the loop returned is what they hold.
  cache, logits = _prefilled(SHORT, PROMPTS[:2], PROMPTS[2] * 3)
  shape, knobs = beam._split()
  cache, st, status = jax.jit(_start, static_argnums=3)(cache, logits, _slots(2, 3), shape,
                                                        knobs)
  step = jax.jit(functools.partial(_step, model=SMALL, implementation=None, max_blocks=None),
                 static_argnums=3)
  while not np.any(np.asarray(status)):
    before = jax.tree.map(np.asarray, (st, cache.replace(telemetry=None)))
    cache, st, status = step(PARAMS, cache, st, shape, knobs)
  after = jax.tree.map(np.asarray, (st, cache.replace(telemetry=None)))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  _, stepped = _finish(cache, st, status)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, stepped),
               jax.tree.map(np.asarray, res))
  # The host entry point raises the named error instead.
  small = dataclasses.replace(CC, num_blocks=SHORT)  # no bystander: 6 blocks for the beams
  with pytest.raises(pk.PoolExhaustedError, match="beam_search"):
    beam_search(PARAMS, SMALL, PROMPTS[:2], beam, cache_config=small)


def test_loop_with_bad_slots_changes_nothing():
  beam = SEARCHES["early-true"]
  cache, logits = _prefilled(SHORT, PROMPTS[:2], PROMPTS[2] * 3)
  one = dataclasses.replace(beam, beam_width=1)  # no fork: only the prompt check stands
  cases = {  # slots -> the status the start reports
      "beam slot in use": (np.asarray([[0, 1, 15], [4, 5, 6]], np.int32), pk.Status.SLOT_IN_USE),
      "prompt slot inactive": (np.asarray([[1, 2, 3], [4, 5, 6]], np.int32),
                               pk.Status.INACTIVE_SLOT),
      "beam slot twice": (np.asarray([[0, 1, 2], [4, 5, 2]], np.int32),
                          pk.Status.DUPLICATE_SLOT),
      "prompt slot twice": (np.asarray([[0, 1, 2], [0, 5, 6]], np.int32),
                            pk.Status.DUPLICATE_SLOT),
      "beam slots on a padding row": (np.asarray([[0, 1, 2], [-1, 5, 6]], np.int32),
                                      pk.Status.INVALID_SLOT),
      "prompt slot out of range": (np.asarray([[0, 1, 2], [16, 5, 6]], np.int32),
                                   pk.Status.INVALID_SLOT),
      "one beam, prompt slot twice": (np.asarray([[0], [0]], np.int32),
                                      pk.Status.DUPLICATE_SLOT),
      "one beam, prompt slot inactive": (np.asarray([[0], [3]], np.int32),
                                         pk.Status.INACTIVE_SLOT),
  }
  with pytest.raises(pk.CacheShapeError, match="slots"):  # 1.5 is no slot (never truncated)
    beam_search_loop(PARAMS, cache, logits, np.asarray([[0, 1, 2], [4, 5, 6.5]]), beam=beam,
                     model=SMALL)
  for name, (slots, code) in cases.items():
    before = jax.tree.map(np.asarray, cache)
    out, res = beam_search_loop(PARAMS, jax.tree.map(jnp.copy, cache), logits, slots,
                                beam=one if slots.shape[1] == 1 else beam, model=SMALL)
    assert code in np.asarray(res.status).ravel().tolist(), name
    assert int(res.steps) == 0 and not np.any(np.asarray(res.lengths)), name
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, out), before)


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_parameters_are_refused():
  bad = [dict(beam_width=0), dict(beam_width=MAX_BEAM_WIDTH + 1), dict(beam_width=2.5),
         dict(max_new_tokens=0), dict(length_penalty=float("nan")), dict(length_penalty=True),
         dict(early_stopping="sometimes"), dict(early_stopping=None),
         dict(stop_tokens=(-1,)), dict(stop_tokens=tuple(range(MAX_STOP_TOKENS + 1)))]
  for kw in bad:
    with pytest.raises(ValueError):
      BeamSearchParams(**kw)
  beam = SEARCHES["early-true"]
  with pytest.raises(ValueError, match="at least one token"):
    beam_search(PARAMS, SMALL, [[1, 2], []], beam)
  with pytest.raises(ValueError, match="token"):
    beam_search(PARAMS, SMALL, [[1, 128]], beam)
  with pytest.raises(ValueError, match="max_seqs"):
    beam_search(PARAMS, SMALL, PROMPTS, beam,
                cache_config=dataclasses.replace(CC, max_seqs=8))
  with pytest.raises(ValueError, match="max_seq_len"):
    beam_search(PARAMS, SMALL, PROMPTS, BeamSearchParams(max_new_tokens=40), cache_config=CC)
  with pytest.raises(ValueError, match="vocabulary"):  # 33 beams keep 66 of 64 candidates
    beam_search(PARAMS, dataclasses.replace(SMALL, vocab_size=64), [[1]],
                BeamSearchParams(beam_width=33))
  assert beam_search(PARAMS, SMALL, [], beam) == []


def test_default_cache_fits_the_worst_case():
  """Beams that never share a block still fit the default cache."""
  beam = BeamSearchParams(beam_width=3, max_new_tokens=20)
  cc = beam_cache_config(SMALL, PROMPTS, beam, block_size=4)
  assert cc.max_seqs >= 9 and cc.max_seq_len >= 17 + 20
  assert cc.num_blocks - 1 >= sum(-(-len(p) // 4) + 3 * (-(-20 // 4) + 1) for p in PROMPTS)


# ---------------------------------------------------------------------------------------------
# transformers


def test_matches_transformers_beam_search(tmp_path):
  from tests.test_families import hf_model

  torch, hf, _ = hf_model("llama2", tmp_path)
  config, params = load_hf_checkpoint(tmp_path)
  prompts = [np.random.default_rng(3).integers(0, 128, n).tolist() for n in (13, 6)]
  searches = [BeamSearchParams(beam_width=3, max_new_tokens=9, stop_tokens=(7,),
                               length_penalty=-1.0, early_stopping=True)]
  stopped = set()
  for beam in searches:
    ours = beam_search(params, config, prompts, beam, block_size=4)
    for prompt, hyps in zip(prompts, ours, strict=True):
      ids = torch.tensor([prompt])
      with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=beam.max_new_tokens, num_beams=beam.beam_width,
                          num_return_sequences=beam.beam_width,
                          early_stopping=beam.early_stopping,
                          length_penalty=beam.length_penalty,
                          eos_token_id=list(beam.stop_tokens), pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)
      want = []
      for row in out.sequences[:, len(prompt):].tolist():  # cut HF's padding after a stop
        ends = [i for i, t in enumerate(row) if t in beam.stop_tokens]
        want.append(row[:ends[0] + 1] if ends else row)
      assert [h.tokens for h in hyps] == want
      np.testing.assert_allclose([h.score for h in hyps], out.sequences_scores.numpy(),
                                 atol=1e-4, rtol=1e-5)
      stopped |= {h.stopped for h in hyps}
  assert stopped == {True, False}


def test_searches_differing_in_settings_or_prompt_count_share_one_program():
  """Only ``beam_width`` and rounded sizes shape the compiled search: other stop tokens (as
  many, rounded), length penalties, stopping rules, ``max_new_tokens`` in the same power of
  two, and 3 or 4 prompts (padded to 4) compile nothing new; the results are still the
  float64 search's. Control: another ``beam_width`` compiles."""
  from tests.test_no_recompile import COMPILE_EVENT, count_compilations

  base = BeamSearchParams(beam_width=2, max_new_tokens=7, stop_tokens=(5,), length_penalty=1.0)
  four = PROMPTS + [PROMPTS[0][:6]]
  beam_search(PARAMS, SMALL, PROMPTS, base, cache_config=CC)
  others = [dataclasses.replace(base, stop_tokens=(80,), length_penalty=-0.5,
                                early_stopping=True, max_new_tokens=5),
            dataclasses.replace(base, length_penalty=2.0, early_stopping="never",
                                max_new_tokens=8)]
  with count_compilations() as events:
    for beam, prompts in zip(others, (four, PROMPTS), strict=True):
      for prompt, hyps in zip(prompts, beam_search(PARAMS, SMALL, prompts, beam,
                                                   cache_config=CC), strict=True):
        check_against_reference(hyps, prompt, beam)
  assert not [e for e in events if e[0] == COMPILE_EVENT], events
  with count_compilations() as events:
    beam_search(PARAMS, SMALL, PROMPTS, dataclasses.replace(base, beam_width=3),
                cache_config=CC)
  assert [e for e in events if e[0] == COMPILE_EVENT]
