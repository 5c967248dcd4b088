"""Beam search on the paged cache, the whole search inside one ``jit``.

Each prompt keeps ``beam_width`` live beams, one cache slot each. A step runs the model on every
beam's last token, scores each beam's continuations by the beam's summed log-probability plus
the token's, and keeps the best; :func:`~jax_paged_kv.reorder_sequences` then points each kept
beam's slot at its parent's blocks. That is a reference-count update of block tables: no KV is
copied but the partly filled last block of a parent with several children (copy-on-write, one
block per child, at its next write), where a contiguous cache (Hugging Face's
``reorder_cache``) copies every beam's whole KV every step. The prompt's blocks are held once
for all beams. Selection, reordering, finished hypotheses and the stopping rule all run on
device in one ``lax.while_loop``: the host sees the search only when it ends.

The search is Hugging Face ``transformers``' (``generate(num_beams=...)``, its vectorised form
of 4.50+ and 5.x), so ``length_penalty`` and ``early_stopping`` mean what they mean there:

* each step takes the ``(1 + max(1, len(stop_tokens))) * beam_width`` best continuations of all
  the prompt's beams; those ending in a stop token whose rank is below ``beam_width`` become
  finished hypotheses, the best ``beam_width`` of the others are the next beams;
* a finished hypothesis scores ``sum of its token log-probabilities / generated_len **
  length_penalty`` (``generated_len`` counts its stop token); at ``max_new_tokens`` every kept
  continuation finishes; the result is the ``beam_width`` best finished hypotheses;
* a prompt's search ends when no beam can enter its finished set: ``early_stopping=True`` as
  soon as it holds ``beam_width`` hypotheses, ``False`` by Hugging Face's heuristic (the best
  beam's score at the current length), ``"never"`` by a true bound when ``length_penalty > 0``
  (the best beam's sum over the largest length; with ``length_penalty <= 0`` the heuristic is
  one already: a longer hypothesis can only score lower).

Entry points: :func:`beam_search` (prompts in, hypotheses out; builds its own cache) and
:func:`beam_search_loop` (the jitted search on a cache you hold, prompts already prefilled).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jax_paged_kv.cache.config import CacheConfig, CacheStrategy
from jax_paged_kv.cache.errors import raise_for_status
from jax_paged_kv.cache.inputs import INT32_MAX, to_int32
from jax_paged_kv.cache.ops import (
    _row_checks,
    allocate_sequences,
    fork_sequence,
    free_sequences,
    reorder_sequences,
)
from jax_paged_kv.cache.state import PagedKVCache, init_cache
from jax_paged_kv.models.base import Model, cache_config_for, check_cache_fits, check_model
from jax_paged_kv.serving.decoding import (
    MAX_STOP_TOKENS,
    Params,
    backend_jit,
    int_in_range,
    pow2_ceil,
    prefill_prompts,
    pytree_dataclass,
    resolve_model,
)

# Beams per prompt the search accepts: its per-step work grows with beam_width * vocab.
MAX_BEAM_WIDTH = 64


@dataclasses.dataclass(frozen=True)
class BeamSearchParams:
  """How :func:`beam_search` searches.

  Only ``beam_width`` and two sizes rounded up (``max_new_tokens`` to a power of two, at least
  8; the number of stop tokens to a power of two) shape the compiled search: searches that
  differ in anything else share one program.

  Attributes:
    beam_width: live beams per prompt, and hypotheses returned per prompt (Hugging Face's
      ``num_beams``), in ``[1, MAX_BEAM_WIDTH]``; with the stop tokens, it keeps
      :attr:`candidates` continuations a step, which must not exceed the vocabulary (Hugging
      Face fills the rest with dummy beams; refused here). ``1`` is a one-beam search, where
      Hugging Face runs greedy decoding instead: the two agree without stop tokens (tested);
      with them a one-beam search may pass over a stopped hypothesis for a longer one, as
      ``length_penalty`` and ``early_stopping`` rule.
    max_new_tokens: the longest hypothesis, in tokens (a beam that reaches it finishes).
    length_penalty: a finished hypothesis scores ``sum_logprob / generated_len **
      length_penalty``: above 0 favours longer ones, below 0 shorter ones (Hugging Face's
      default 1.0).
    early_stopping: ``True``, ``False`` or ``"never"``: when a prompt's search ends (the module
      docstring; Hugging Face's meaning and default ``False``).
    stop_tokens: a beam that picks one of these finishes with it (included in its tokens); at
      most ``MAX_STOP_TOKENS``.
  """

  beam_width: int = 4
  max_new_tokens: int = 16
  length_penalty: float = 1.0
  early_stopping: bool | str = False
  stop_tokens: tuple[int, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "beam_width",
                       int_in_range(self.beam_width, "beam_width", 1, MAX_BEAM_WIDTH))
    object.__setattr__(self, "max_new_tokens",
                       int_in_range(self.max_new_tokens, "max_new_tokens", 1))
    lp = self.length_penalty
    if (isinstance(lp, (bool, np.bool_)) or not isinstance(lp, (numbers.Real, np.floating))
        or not math.isfinite(lp)):
      raise ValueError(f"length_penalty must be a finite real number, got {lp!r}")
    object.__setattr__(self, "length_penalty", float(lp))
    es = self.early_stopping
    if not (isinstance(es, (bool, np.bool_)) or es == "never"):
      raise ValueError(f"early_stopping must be True, False or 'never', got {es!r}")
    object.__setattr__(self, "early_stopping", es if es == "never" else bool(es))
    stops = tuple(int_in_range(t, "stop token", 0) for t in self.stop_tokens)
    if len(stops) > MAX_STOP_TOKENS:
      raise ValueError(f"{len(stops)} stop tokens; at most {MAX_STOP_TOKENS=} are supported")
    object.__setattr__(self, "stop_tokens", stops)

  @property
  def candidates(self) -> int:
    """Continuations Hugging Face keeps per step (``(1 + max(1, len(stop_tokens))) *
    beam_width``): enough that ``beam_width`` of them do not stop, however many pick a stop
    token. The compiled search may keep more (its stop-token table is rounded up): the same
    ``beam_width`` non-stopping ones are among them, so the result is the same."""
    return (1 + max(1, len(self.stop_tokens))) * self.beam_width

  def _split(self) -> tuple[_Shape, _Knobs]:
    """The static part of the search and its traced values."""
    shape = _Shape(self.beam_width, max(8, pow2_ceil(self.max_new_tokens)),
                   pow2_ceil(max(1, len(self.stop_tokens))))
    stops = np.full(shape.stop_width, -1, np.int32)
    stops[:len(self.stop_tokens)] = self.stop_tokens
    mode = {False: 0, True: 1, "never": 2}[self.early_stopping]
    return shape, _Knobs(max_new=np.int32(self.max_new_tokens),
                         length_penalty=np.float32(self.length_penalty), mode=np.int32(mode),
                         stops=stops)


@dataclasses.dataclass(frozen=True)
class _Shape:
  """What shapes a compiled search: beams per prompt, the token buffers' width (``>=
  max_new_tokens``) and the stop-token table's."""

  beam_width: int
  capacity: int
  stop_width: int

  def candidates(self, vocab: int) -> int:
    """Continuations kept per step: at least Hugging Face's count, at most the vocabulary."""
    return min((1 + self.stop_width) * self.beam_width, vocab)


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class _Knobs:
  """The traced values of a search: ``max_new`` int32[], ``length_penalty`` float32[],
  ``mode`` int32[] (``early_stopping``: 0 False, 1 True, 2 "never"), ``stops``
  int32[stop_width] (-1 padded)."""

  max_new: Array
  length_penalty: Array
  mode: Array
  stops: Array



@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class BeamResult:
  """What :func:`beam_search_loop` found, per prompt, best hypothesis first (a pytree).

  Attributes:
    tokens: ``int32[batch, beam_width, capacity]`` (``capacity``: ``max_new_tokens`` rounded
      up to a power of two, at least 8), ``-1`` after each hypothesis' end.
    lengths: ``int32[batch, beam_width]`` tokens per hypothesis (0: none, e.g. a padding row).
    scores: ``float32[batch, beam_width]``: ``sum of logprobs / lengths ** length_penalty``
      (Hugging Face's ``sequences_scores``); ``-inf`` where there is no hypothesis.
    logprobs: ``float32[batch, beam_width, capacity]``: each token's log-probability
      under the model's raw distribution (NaN after the end).
    steps: ``int32[]`` model steps the search ran (prefill excluded).
    status: ``int32[batch, beam_width]``: zeros, or why the search stopped early: a bad slot
      (column 0: the prompt slots; the others: the fork into the beam slots), or a model
      step's (e.g. ``POOL_EXHAUSTED``).
    peak_blocks: ``int32[]`` the most blocks in use in the whole cache at any point of the
      search (its memory high-water mark, other sequences' blocks included).
  """

  tokens: Array
  lengths: Array
  scores: Array
  logprobs: Array
  steps: Array
  status: Array
  peak_blocks: Array



@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class _State:
  slots: Array  # int32[B, W] the beams' cache slots (fixed)
  tokens: Array  # int32[B, W] each live beam's last token, not yet in the cache
  scores: Array  # float32[B, W] live beams' summed logprobs, best first (-inf: no beam)
  seqs: Array  # int32[B, W, M] live beams' tokens
  lps: Array  # float32[B, W, M] and their logprobs
  fin_scores: Array  # float32[B, W] finished hypotheses, best first
  fin_seqs: Array  # int32[B, W, M]
  fin_lps: Array  # float32[B, W, M]
  fin_lens: Array  # int32[B, W]
  fin_set: Array  # bool[B, W] entry holds a hypothesis
  done: Array  # bool[B] the prompt's search ended (its beams are freed, its set closed)
  step: Array  # int32[] tokens generated per live beam
  peak: Array  # int32[] most blocks in use (the whole cache) at any point of the search

  def replace(self, **kwargs) -> _State:
    return dataclasses.replace(self, **kwargs)



def _take(x: Array, idx: Array) -> Array:
  """``x[b, idx[b, i], ...]`` for ``x: [B, N, ...]`` and ``idx: [B, K]``."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _select(st: _State, logits: Array, shape: _Shape, knobs: _Knobs) -> tuple[_State, Array]:
  """One beam step from every live beam's next-token ``logits [B, W, V]``: the new beams,
  finished hypotheses and stopping flags, and ``parent int32[B, W]`` (the beam each new beam
  continues). Hugging Face's ``_beam_search`` step, with ``-inf`` for its ``-1e9`` masks."""
  b, w, vocab = logits.shape
  k, m, lp = shape.candidates(vocab), knobs.max_new, knobs.length_penalty
  t = st.step
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  flat = logp.reshape(b, w * vocab)
  vals, idx = jax.lax.top_k((logp + st.scores[..., None]).reshape(b, w * vocab), k)
  parent, tok = idx // vocab, (idx % vocab).astype(jnp.int32)
  seqs = _take(st.seqs, parent).at[:, :, t].set(tok)  # [B, K, capacity]
  lps = _take(st.lps, parent).at[:, :, t].set(jnp.take_along_axis(flat, idx, axis=1))
  hits = jnp.any(tok[..., None] == knobs.stops[None, None, :], axis=-1) | (t + 1 >= m)

  # The next beams: the best W continuations that did not stop.
  running = jnp.where(hits, -jnp.inf, vals)
  _, keep = jax.lax.top_k(running, w)
  new = dict(scores=_take(running, keep), seqs=_take(seqs, keep), lps=_take(lps, keep),
             tokens=_take(tok, keep))
  parent = _take(parent, keep).astype(jnp.int32)

  # Finished hypotheses: stopped continuations ranked below W join the best W so far, unless
  # the prompt's search is done (Hugging Face keeps stepping such a prompt's beams but closes
  # its set: when it is full under early_stopping=True, or when no beam can improve it).
  add = hits & (jnp.arange(k) < w)[None, :] & ~st.done[:, None]
  gen_len = (t + 1).astype(jnp.float32)
  cand = jnp.where(add, vals / gen_len ** lp, -jnp.inf)
  merged = jnp.concatenate([st.fin_scores, cand], axis=1)
  _, top = jax.lax.top_k(merged, w)

  def merge(old, fresh):
    return _take(jnp.concatenate([old, fresh], axis=1), top)

  fin = dict(fin_scores=_take(merged, top), fin_seqs=merge(st.fin_seqs, seqs),
             fin_lps=merge(st.fin_lps, lps),
             fin_lens=merge(st.fin_lens, jnp.broadcast_to(t + 1, (b, k)).astype(jnp.int32)),
             fin_set=merge(st.fin_set, add))

  # Can a live beam still enter the finished set? (Hugging Face's _check_early_stop_heuristic,
  # at the new length: early_stopping="never" with length_penalty > 0 bounds it at the longest
  # length, exactly; otherwise at the current one, a heuristic when length_penalty > 0.)
  best_len = jnp.where((knobs.mode == 2) & (lp > 0), m, t + 1).astype(jnp.float32)
  best = new["scores"][:, 0] / best_len ** lp
  full = jnp.all(fin["fin_set"], axis=1)
  worst = jnp.where(full, jnp.min(fin["fin_scores"], axis=1), -jnp.inf)
  done = st.done | ~(best > worst) | (full & (knobs.mode == 1)) | (t + 1 >= m)
  return st.replace(**new, **fin, done=done, step=t + 1), parent


def _beam_ids(st: _State, live: Array) -> Array:
  """``int32[B * W]``: the slots of the prompts in ``live`` (``bool[B]``), else -1."""
  return jnp.where(live[:, None], st.slots, -1).reshape(-1)


def _check_vocab(beam: BeamSearchParams, vocab: int, op: str) -> None:
  if beam.candidates > vocab:
    raise ValueError(f"{op}: beam_width={beam.beam_width} with {len(beam.stop_tokens)} stop "
                     f"tokens keeps {beam.candidates} candidates a step, more than the "
                     f"vocabulary ({vocab}): Hugging Face would fill the rest with dummy beams")


def beam_search_loop(params: Params, cache: PagedKVCache, logits: Array, slots: Array, *,
                     beam: BeamSearchParams, model: Model | None = None,
                     config: Model | None = None, implementation: str | None = None,
                     max_blocks: int | None = None) -> tuple[PagedKVCache, BeamResult]:
  """The whole beam search of a batch of prefilled prompts, in one ``lax.while_loop``.

  Jitted (the cache donated); it may also be called inside your own ``jit``. Searches with the
  same ``beam_width`` and rounded sizes (:class:`BeamSearchParams`) share one compilation.

  Args:
    params: model parameters.
    cache: the cache (donated). Slot ``slots[b, 0]`` holds prompt ``b`` (prefilled: its last
      token is in the cache), ``slots[b, 1:]`` are free slots for its other beams.
    logits: ``float[batch, vocab]``, each prompt's last-position logits (from
      :func:`~jax_paged_kv.serving.decoding.prefill_step`).
    slots: ``int32[batch, beam_width]``, all distinct; a row of ``-1``: padding.
    beam: :class:`BeamSearchParams`.
    model, config, implementation, max_blocks: static, as for
      :func:`~jax_paged_kv.serving.decoding.prefill_step`.

  Returns:
    ``(cache, BeamResult)``. The search ends every beam it started: the returned cache is the
    input cache with ``slots[:, 0]`` freed (a hypothesis' KV is not kept). If ``slots`` is bad
    (``status``: an inactive, repeated or out-of-range prompt slot in column 0; a beam slot in
    use, repeated, or set on a padding row in the others) nothing changes. If a model step fails
    (e.g. ``POOL_EXHAUSTED``) the search stops there: the result holds what was finished before
    it, and the beams are freed all the same.
  """
  model = resolve_model(model, config)
  slots = to_int32(slots, "slots", "ids")  # integers only; out of int32: refused, never wrapped
  if slots.ndim != 2 or slots.shape[1] != beam.beam_width:
    raise ValueError(f"beam_search_loop: slots of shape {slots.shape}, want [batch, "
                     f"beam_width={beam.beam_width}]")
  if jnp.shape(logits) != (slots.shape[0], model.vocab_size):
    raise ValueError(f"beam_search_loop: logits of shape {jnp.shape(logits)}, want "
                     f"{(slots.shape[0], model.vocab_size)}")
  _check_vocab(beam, model.vocab_size, "beam_search_loop")
  shape, knobs = beam._split()
  return _loop(params, cache, logits, slots, knobs, shape=shape, model=model,
               implementation=implementation, max_blocks=max_blocks)


@backend_jit(static_argnames=("shape", "model", "implementation", "max_blocks"),
             donate_argnames=("cache",))
def _loop(params: Params, cache: PagedKVCache, logits: Array, slots: Array, knobs: _Knobs, *,
          shape: _Shape, model: Model, implementation: str | None, max_blocks: int | None):
  check_cache_fits(model, cache.config)
  cache, st, status = _start(cache, logits, slots, shape, knobs)
  cache, st, failed = jax.lax.while_loop(
      lambda c: ~jnp.all(c[1].done) & jnp.all(c[2] == 0),
      lambda c: _step(params, c[0], c[1], shape, knobs, model=model,
                      implementation=implementation, max_blocks=max_blocks),
      (cache, st, status))
  return _finish(cache, st, failed)


def _used_blocks(cache: PagedKVCache) -> Array:
  """``int32[]``: blocks some sequence holds (the null block aside): from the free count in a
  ``PAGED`` cache (O(1) a step), counted in a ``CONTIGUOUS`` one (whose slabs never return to
  a free list)."""
  if cache.config.strategy is CacheStrategy.PAGED:
    return cache.config.usable_blocks - cache.allocator.num_free
  return jnp.sum(cache.allocator.ref_counts[1:] > 0, dtype=jnp.int32)


def _start(cache: PagedKVCache, logits: Array, slots: Array, shape: _Shape, knobs: _Knobs):
  """Checks ``slots``, forks every prompt into its beam slots and takes the first step from
  the prefill ``logits``: ``(cache, state, status int32[B, W])`` (nonzero: bad ``slots``,
  nothing changed, and the state is done)."""
  b, w = slots.shape
  vocab = logits.shape[-1]
  live = slots[:, 0] >= 0
  # The prompt slots: active and distinct (the fork checks the beam slots: free, distinct,
  # not a prompt slot (those are active), -1 exactly on padding rows).
  _, _, prompt_status = _row_checks(cache, slots[:, 0])
  prompts_ok = jnp.all(prompt_status == 0)
  parents = jnp.where(live[:, None] & prompts_ok, slots[:, :1], -1).repeat(w - 1, axis=1)
  kids = jnp.where(prompts_ok, slots[:, 1:], -1)
  cache, fork_status = fork_sequence(cache, parents.reshape(-1), kids.reshape(-1))
  status = jnp.concatenate([prompt_status[:, None], fork_status.reshape(b, w - 1)], axis=1)
  started = jnp.all(status == 0)
  cap = shape.capacity
  st = _State(
      slots=slots, tokens=jnp.zeros((b, w), jnp.int32),
      scores=jnp.full((b, w), -jnp.inf, jnp.float32).at[:, 0].set(0.0),
      seqs=jnp.full((b, w, cap), -1, jnp.int32),
      lps=jnp.full((b, w, cap), jnp.nan, jnp.float32),
      fin_scores=jnp.full((b, w), -jnp.inf, jnp.float32),
      fin_seqs=jnp.full((b, w, cap), -1, jnp.int32),
      fin_lps=jnp.full((b, w, cap), jnp.nan, jnp.float32),
      fin_lens=jnp.zeros((b, w), jnp.int32), fin_set=jnp.zeros((b, w), bool),
      done=~live | ~started, step=jnp.zeros((), jnp.int32), peak=_used_blocks(cache))
  # The prefill logits are every beam's (they are identical); only beam 0 scores (the others
  # start at -inf), so the first step's parents are all beam 0.
  cache, st = jax.lax.cond(
      started, functools.partial(_advance, shape=shape, knobs=knobs), lambda c, s, _: (c, s),
      cache, st, jnp.broadcast_to(logits[:, None, :], (b, w, vocab)))
  return cache, st, status


def _advance(cache: PagedKVCache, st: _State, logits: Array, *, shape: _Shape, knobs: _Knobs):
  """Selects from ``logits [B, W, V]``, frees the prompts whose search ended, and points every
  other beam's slot at its parent's blocks. (Both updates' slots were checked at the start.)"""
  was = st.done
  st, parent = _select(st, logits, shape, knobs)
  cache, _ = free_sequences(cache, _beam_ids(st, st.done & ~was))
  src = jnp.take_along_axis(st.slots, parent, axis=1)
  cache, _ = reorder_sequences(cache, _beam_ids(st, ~st.done),
                               jnp.where(st.done[:, None], -1, src).reshape(-1))
  return cache, st


def _step(params: Params, cache: PagedKVCache, st: _State, shape: _Shape, knobs: _Knobs, *,
          model: Model, implementation: str | None, max_blocks: int | None):
  """One model step on every live beam's last token, then :func:`_advance`: ``(cache, state,
  status int32[B, W])``. On a failed step the model returned the cache unchanged, and the
  beams stay as they were."""
  b, w = st.slots.shape
  live = ~st.done
  cache, logits, status = model.forward(params, cache, st.tokens.reshape(-1, 1),
                                        _beam_ids(st, live),
                                        jnp.repeat(live, w).astype(jnp.int32),
                                        implementation=implementation, max_blocks=max_blocks)
  st = st.replace(peak=jnp.maximum(st.peak, _used_blocks(cache)))
  cache, st = jax.lax.cond(jnp.all(status == 0),
                           functools.partial(_advance, shape=shape, knobs=knobs),
                           lambda c, s, _: (c, s), cache, st, logits.reshape(b, w, -1))
  return cache, st, status.reshape(b, w)


def _finish(cache: PagedKVCache, st: _State, status: Array):
  """Frees the beams of a search that stopped on a failed step; the :class:`BeamResult`."""
  cache, _ = free_sequences(cache, _beam_ids(st, ~st.done))
  ok = st.fin_set
  return cache, BeamResult(
      tokens=jnp.where(ok[..., None], st.fin_seqs, -1),
      lengths=jnp.where(ok, st.fin_lens, 0), scores=jnp.where(ok, st.fin_scores, -jnp.inf),
      logprobs=jnp.where(ok[..., None], st.fin_lps, jnp.nan), steps=st.step, status=status,
      peak_blocks=st.peak)


@dataclasses.dataclass(frozen=True)
class BeamHypothesis:
  """One finished hypothesis of :func:`beam_search`.

  Attributes:
    tokens: the generated tokens (a stop token included).
    logprobs: each token's log-probability under the model's raw distribution.
    score: ``sum(logprobs) / len(tokens) ** length_penalty``, what the search ranks by.
    stopped: it ends with a stop token (else it reached ``max_new_tokens``).
  """

  tokens: list[int]
  logprobs: list[float]
  score: float
  stopped: bool

  @property
  def cumulative_logprob(self) -> float:
    """``sum(logprobs)``: the hypothesis' log-probability given the prompt."""
    return float(np.sum(np.asarray(self.logprobs, np.float64)))


def beam_cache_config(model: Model, prompts: Sequence[Sequence[int]], beam: BeamSearchParams,
                      *, block_size: int = 16) -> CacheConfig:
  """The ``PAGED`` cache :func:`beam_search` builds when given none: a slot per beam, and
  blocks for every prompt once plus every beam's own blocks if no two beams ever shared one
  (two more per beam: the block its prompt part shares, and a copy-on-write copy). Sizes are
  powers of two (at least 256 tokens), so calls of similar size share compiled programs."""
  w, m = beam.beam_width, beam.max_new_tokens
  longest = max(len(p) for p in prompts) + m
  max_len = block_size * math.ceil(pow2_ceil(max(256, longest)) / block_size)
  blocks = sum(math.ceil(len(p) / block_size) + w * (math.ceil(m / block_size) + 2)
               for p in prompts)
  return cache_config_for(check_model(model), num_blocks=pow2_ceil(1 + blocks),
                          max_seqs=pow2_ceil(len(prompts) * w), max_seq_len=max_len,
                          block_size=block_size)


def beam_search(params: Params, model: Model, prompts: Sequence[Sequence[int]],
                beam: BeamSearchParams | None = None, *, cache_config: CacheConfig | None = None,
                block_size: int = 16, prefill_chunk: int = 256,
                implementation: str | None = None) -> list[list[BeamHypothesis]]:
  """Beam search over every prompt at once; ``beam_width`` hypotheses per prompt, best first.

  The prompts are prefilled in chunks of ``prefill_chunk`` tokens, then
  :func:`beam_search_loop` runs the search on device.

  Args:
    params: model parameters.
    model: the model (:class:`~jax_paged_kv.models.base.Model`).
    prompts: token-id lists (non-empty).
    beam: :class:`BeamSearchParams` (default: 4 beams, 16 new tokens).
    cache_config: the cache (default :func:`beam_cache_config`); it needs a slot per beam
      (``max_seqs >= len(prompts) * beam_width``).
    block_size: block size of the default cache.
    prefill_chunk: prompt tokens per prefill step.
    implementation: paged attention implementation.

  Returns:
    Per prompt, ``beam_width`` :class:`BeamHypothesis`, best score first.

  Raises:
    ValueError: bad prompts or a cache with too few slots; PoolExhaustedError (and the other
      named cache errors) if the cache ran out during the search.
  """
  model = check_model(model)
  beam = beam or BeamSearchParams()
  prompts = [[int_in_range(t, "token", 0, model.vocab_size - 1) for t in p] for p in prompts]
  if not prompts:
    return []
  if any(not p for p in prompts):
    raise ValueError("beam_search: every prompt needs at least one token")
  w, m = beam.beam_width, beam.max_new_tokens
  _check_vocab(beam, model.vocab_size, "beam_search")
  cc = cache_config or beam_cache_config(model, prompts, beam, block_size=block_size)
  n = len(prompts)
  if cc.max_seqs < n * w:
    raise ValueError(f"beam_search: {n} prompts x beam_width={w} need {n * w} sequence slots, "
                     f"the cache has max_seqs={cc.max_seqs}")
  longest = max(len(p) for p in prompts)
  if longest + m - 1 > cc.max_seq_len:
    raise ValueError(f"beam_search: a prompt of {longest} tokens and max_new_tokens={m} need "
                     f"max_seq_len >= {longest + m - 1}, the cache has {cc.max_seq_len}")
  prefill_chunk = int_in_range(prefill_chunk, "prefill_chunk", 1, INT32_MAX)
  # The batch is padded to a power of two (rows of -1), so calls with 3 or 4 prompts share the
  # compiled prefill and search.
  rows = pow2_ceil(n)
  slots = np.full((rows, w), -1, np.int32)
  slots[:n] = np.arange(n * w, dtype=np.int32).reshape(n, w)
  cache, _ = allocate_sequences(init_cache(cc), slots[:, 0])
  cache, _, last = prefill_prompts(params, cache, prompts, slots[:, 0], model=model,
                                  chunk=min(prefill_chunk, pow2_ceil(longest)),
                                  implementation=implementation, op="beam_search (prefill)")
  cache, res = beam_search_loop(params, cache, last, slots, beam=beam, model=model,
                                implementation=implementation)
  raise_for_status(res.status.reshape(-1), slots.reshape(-1), op="beam_search")
  tokens, lengths, scores, lps = (np.asarray(x) for x in (res.tokens, res.lengths, res.scores,
                                                           res.logprobs))
  stops = set(beam.stop_tokens)
  return [[BeamHypothesis(tokens=tokens[i, j, :lengths[i, j]].tolist(),
                          logprobs=lps[i, j, :lengths[i, j]].tolist(), score=float(scores[i, j]),
                          stopped=int(tokens[i, j, lengths[i, j] - 1]) in stops)
           for j in range(w)] for i in range(n)]
