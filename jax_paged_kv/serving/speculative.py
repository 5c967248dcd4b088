"""Speculative decoding on the paged cache: draft, verify and roll back inside one ``jit``.

Each iteration of the loop proposes up to ``k`` draft tokens per row, runs the target model once
on the row's pending token and its drafts (a ``k + 1``-token chunk, every position's logits:
the target's ``forward`` must take ``all_logits=True``, as the bundled models do), keeps the
longest accepted prefix plus one token of the target's own, and rolls the rejected tail back
with :func:`~jax_paged_kv.truncate_sequences` (a length and reference-count update; the blocks
the tail took go back to the pool). Proposal, verification, acceptance and rollback all run on
device in one ``lax.while_loop``: the host sees the loop only when it ends. A draft ends at its
first stop token (what would follow is never emitted), so ``accepted`` counts only drafts that
were output.

Two ways to draft (:class:`SpeculativeConfig`):

* **Prompt lookup** (``draft_model=None``; Hugging Face's ``prompt_lookup_num_tokens``, vLLM's
  ``"ngram"`` method): the last ``n`` tokens of the row (``n`` from ``prompt_lookup_max`` down to
  ``prompt_lookup_min``) are searched for in the row's earlier tokens, prompt and output; the
  tokens that followed the first earlier occurrence are the draft. No second model, no second
  cache. It pays off where outputs repeat their input (editing, extraction, code, summaries).
  Hugging Face's rule, but for three details that change drafts, never tokens: its default
  ``max_matching_ngram_size`` is 2 (ours 3), it cuts a draft *before* its first EOS (ours after
  the stop token), and it drops drafts its logits processors forbid.
* **A draft model** (``draft_model=`` a small model with the target's vocabulary) with its own
  paged cache: ``k`` decode steps of the draft propose the tokens, and its cache is rolled back
  with the target's.

The output follows the target model's distribution (Leviathan et al. 2023, Chen et al. 2023): a
draft token ``d`` drawn from ``q`` is accepted with probability ``min(1, p(d) / q(d))``, where
``p`` and ``q`` are the target's and the draft's distributions after the row's temperature,
top-k, top-p and min-p (:func:`~jax_paged_kv.serving.decoding.filtered_logits`); at the first
rejection the token is drawn from ``max(p - q, 0)`` (renormalised); when every draft is
accepted, a bonus token is drawn from the target's next distribution. A prompt lookup draft is a
point mass (``q(d) = 1``). Greedy rows (``temperature == 0``) are the special case ``p``, ``q``
one-hot: a draft is kept exactly when it is the target's argmax, so the tokens are greedy
decoding's, up to the float rounding by which a verify step's logits may differ from a decode
step's (bitwise equal on the CPU for the bundled models; a near-tie could flip elsewhere).

Entry points: :func:`speculative_generate` (prompts in, tokens out; builds its caches),
:func:`prepare_speculative` (its caches and state, prefilled) and :func:`speculative_loop` (the
jitted loop on caches you hold).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jax_paged_kv.cache.config import CacheConfig
from jax_paged_kv.cache.errors import Status, raise_for_status
from jax_paged_kv.cache.inputs import INT32_MAX
from jax_paged_kv.cache.ops import _row_checks, allocate_sequences, truncate_sequences
from jax_paged_kv.cache.state import PagedKVCache, init_cache
from jax_paged_kv.models.base import Model, cache_config_for, check_cache_fits, check_model
from jax_paged_kv.serving.decoding import (
    MAX_STOP_TOKENS,
    DecodeState,
    Params,
    SamplingParams,
    _token_keys,
    backend_jit,
    filtered_logits,
    int_in_range,
    pow2_ceil,
    prefill_prompts,
    pytree_dataclass,
    token_logprobs,
)

# Draft tokens per iteration the loop accepts (each costs a draft step and a verified position).
MAX_DRAFT_TOKENS = 16
# Longest n-gram prompt lookup matches (its search costs O(n * history) per row and iteration).
MAX_PROMPT_LOOKUP = 8


def _check_all_logits(model: Model, what: str) -> None:
  """Refuses a model whose ``forward`` cannot return every position's logits."""
  try:
    params = inspect.signature(model.forward).parameters.values()
  except (TypeError, ValueError):  # no signature to read: the call itself will tell
    return
  if not any(p.name == "all_logits" or p.kind is p.VAR_KEYWORD for p in params):
    raise ValueError(f"{what}: the target {type(model).__name__}.forward must take "
                     "all_logits=True and return every position's logits [batch, T, vocab] "
                     "(the verify step scores k + 1 positions at once); the bundled models do")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
  """How :func:`speculative_loop` drafts (static: hashable, part of the compiled program).

  Attributes:
    num_draft_tokens: ``k``, the most draft tokens verified per iteration (1 to
      :data:`MAX_DRAFT_TOKENS`).
    draft_model: the draft :class:`~jax_paged_kv.models.base.Model` (its vocabulary must be the
      target's), or None for prompt lookup.
    prompt_lookup_min, prompt_lookup_max: the n-gram sizes prompt lookup tries, longest first
      (``1 <= min <= max <=`` :data:`MAX_PROMPT_LOOKUP`; Hugging Face's
      ``max_matching_ngram_size`` is ``max`` with ``min = 1``, default 2).
  """

  num_draft_tokens: int = 4
  draft_model: Model | None = None
  prompt_lookup_min: int = 1
  prompt_lookup_max: int = 3

  def __post_init__(self):
    object.__setattr__(self, "num_draft_tokens", int_in_range(
        self.num_draft_tokens, "num_draft_tokens", 1, MAX_DRAFT_TOKENS))
    object.__setattr__(self, "prompt_lookup_max", int_in_range(
        self.prompt_lookup_max, "prompt_lookup_max", 1, MAX_PROMPT_LOOKUP))
    object.__setattr__(self, "prompt_lookup_min", int_in_range(
        self.prompt_lookup_min, "prompt_lookup_min", 1, self.prompt_lookup_max))
    if self.draft_model is not None:
      object.__setattr__(self, "draft_model", check_model(self.draft_model))

  @property
  def method(self) -> str:
    """``"ngram"`` (prompt lookup) or ``"draft_model"``."""
    return "ngram" if self.draft_model is None else "draft_model"


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
  """Per-row state of :func:`speculative_loop` (a pytree of arrays).

  Attributes:
    decode: the rows' :class:`~jax_paged_kv.serving.decoding.DecodeState` (last token, slots,
      limits, stop tokens, sampling settings, keys); penalties are not supported.
    history: ``int32[batch, H]``, each row's tokens: prompt, then generated, the last
      generated (``decode.tokens``, not yet in the cache) at ``length - 1``. Prompt lookup
      searches it; ``H`` must hold every token the row will have (``length`` plus what is
      left of ``max_new_tokens``; else the row gets ``INVALID_COUNT``).
    length: ``int32[batch]`` tokens in ``history``; the target cache holds ``length - 1``.
    draft_ids: ``int32[batch]`` the rows' draft cache slots (``-1`` without a draft model).
    draft_len: ``int32[batch]`` tokens the draft cache holds, ``length - 2`` or ``length - 1``
      (the first ``draft_len`` of ``history``).
  """

  decode: DecodeState
  history: Array
  length: Array
  draft_ids: Array
  draft_len: Array

  def replace(self, **kwargs) -> SpecState:
    return dataclasses.replace(self, **kwargs)


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class SpecResult:
  """What :func:`speculative_loop` generated.

  Attributes:
    tokens: ``int32[batch, max_tokens]`` this call's tokens per row, ``-1`` after the last.
    logprobs: ``float32[batch, max_tokens]`` each token's log-probability under the target's
      raw distribution (:func:`~jax_paged_kv.serving.decoding.token_logprobs`), NaN after.
    num_tokens: ``int32[batch]`` tokens generated in this call.
    drafted: ``int32[batch]`` draft tokens verified (a draft ends at its first stop token).
    accepted: ``int32[batch]`` of them accepted (each one output).
    iterations: ``int32[]`` iterations applied (target model calls).
    status: ``int32[batch]`` the failing iteration's target status (zeros if none failed;
      ``INVALID_COUNT`` at the start: the cache does not hold ``length - 1`` tokens).
    draft_status: ``int32[batch]`` the same for the draft cache.
  """

  tokens: Array
  logprobs: Array
  num_tokens: Array
  drafted: Array
  accepted: Array
  iterations: Array
  status: Array
  draft_status: Array

  def replace(self, **kwargs) -> SpecResult:
    return dataclasses.replace(self, **kwargs)


def _ngram_drafts(history: Array, length: Array, k: int, lo: int, hi: int):
  """Prompt lookup: ``(drafts int32[B, k], count int32[B])``. For ``n`` from ``hi`` down to
  ``lo``, the first earlier occurrence of the row's last ``n`` tokens that has a continuation;
  the draft is up to ``k`` tokens of that continuation (Hugging Face's
  ``PromptLookupCandidateGenerator``)."""
  b, h = history.shape
  start = jnp.full((b,), -1, jnp.int32)
  for n in range(hi, lo - 1, -1):
    if n > h - 1:
      continue
    pattern = jnp.take_along_axis(
        history, jnp.clip(length[:, None] - n + jnp.arange(n)[None, :], 0, h - 1), axis=1)
    match = jnp.ones((b, h - n + 1), bool)
    for c in range(n):
      match &= history[:, c:h - n + 1 + c] == pattern[:, c:c + 1]
    # A window wholly before the last token: its continuation (from i + n) is non-empty.
    match &= (jnp.arange(h - n + 1)[None, :] + n < length[:, None]) & (length[:, None] >= n)
    found = jnp.any(match, axis=1) & (start < 0)
    start = jnp.where(found, jnp.argmax(match, axis=1).astype(jnp.int32) + n, start)
  count = jnp.where(start >= 0, jnp.minimum(k, length - start), 0).astype(jnp.int32)
  drafts = jnp.take_along_axis(history, jnp.clip(start[:, None] + jnp.arange(k)[None, :], 0, h - 1),
                               axis=1)
  return jnp.where(jnp.arange(k)[None, :] < count[:, None], drafts, 0), count


def _dist(logits: Array, d: DecodeState, all_greedy: bool) -> Array:
  """Log-probabilities ``[B, T, V]`` of each row's sampling distribution at ``logits [B, T,
  V]`` (one-hot for greedy rows)."""
  b, t, v = logits.shape
  flat = logits.reshape(b * t, v).astype(jnp.float32)
  if all_greedy:
    z = jnp.where(jnp.arange(v)[None, :] == jnp.argmax(flat, axis=-1)[:, None], 0.0, -jnp.inf)
  else:
    rep = lambda x: None if x is None else jnp.repeat(x, t)  # noqa: E731
    z = filtered_logits(flat, rep(d.temperature), rep(d.top_k), rep(d.top_p), rep(d.min_p))
  return jax.nn.log_softmax(z, axis=-1).reshape(b, t, v)


def _draw(keys: Array, logp: Array) -> Array:
  """One token per row from log-probabilities ``[B, V]`` (a point mass gives its token)."""
  return jax.vmap(jax.random.categorical)(keys, logp).astype(jnp.int32)


def _model_drafts(dparams, dcache: PagedKVCache, st: SpecState, live: Array, cap: Array,
                  keys: Array, *, dmodel: Model, k: int, all_greedy: bool,
                  implementation: str | None):
  """Draft-model steps: ``(dcache, drafts int32[B, k], logq float32[B, k, V] or None, fed
  int32[B], status int32[B])``. The first step feeds every live row the history its draft
  cache lacks (one or two tokens) and proposes draft 1; step ``j`` feeds draft ``j`` to the
  rows with ``cap > j`` and proposes draft ``j + 1``. After a failed step nothing more is fed;
  ``fed`` counts the tokens each row's draft cache took (the caller rolls them back)."""
  d = st.decode
  h = st.history.shape[1]
  at = jnp.clip(st.draft_len[:, None] + jnp.arange(2)[None, :], 0, h - 1)
  first = jnp.take_along_axis(st.history, at, axis=1)
  n1 = jnp.where(live, st.length - st.draft_len, 0)
  dcache, logits, status = dmodel.forward(
      dparams, dcache, first, jnp.where(live, st.draft_ids, -1), n1,
      implementation=implementation)
  fed = jnp.where(jnp.all(status == 0), n1, 0)
  logq = _dist(logits[:, None], d, all_greedy)[:, 0]
  tok = _draw(keys[:, 0], logq)

  def step(carry, j):
    dcache, tok, fed, status = carry
    go = live & (cap > j) & jnp.all(status == 0)
    dcache, logits, s = dmodel.forward(dparams, dcache, tok[:, None],
                                       jnp.where(go, st.draft_ids, -1), go.astype(jnp.int32),
                                       implementation=implementation)
    fed = fed + (go & jnp.all(s == 0)).astype(jnp.int32)
    status = jnp.where(jnp.all(status == 0), s, status)
    lq = _dist(logits[:, None], d, all_greedy)[:, 0]
    return (dcache, _draw(keys[:, j], lq), fed, status), (tok, None if all_greedy else lq)

  (dcache, last, fed, status), (toks, lqs) = jax.lax.scan(
      step, (dcache, tok, fed, status), jnp.arange(1, k))
  drafts = jnp.concatenate([toks.T, last[:, None]], axis=1)
  if all_greedy:
    return dcache, drafts, None, fed, status
  logq = jnp.concatenate([logq[:, None], jnp.moveaxis(lqs, 0, 1)], axis=1)
  return dcache, drafts, logq, fed, status


def _accept(vlogits: Array, drafts: Array, count: Array, logq: Array | None, d: DecodeState,
            ukeys: Array, ckey: Array, all_greedy: bool):
  """Speculative sampling: ``(accepted int32[B], token int32[B])`` from the target's logits at
  the ``k + 1`` verified positions. ``logq`` None: point-mass drafts (prompt lookup)."""
  b, k = drafts.shape
  pos = jnp.arange(k)[None, :]
  logp = _dist(vlogits, d, all_greedy)  # [B, k+1, V]
  lp_d = jnp.take_along_axis(logp[:, :k], drafts[..., None], axis=-1)[..., 0]
  if all_greedy:  # p one-hot and q one-hot: kept exactly when the draft is the argmax
    ok = lp_d == 0
  else:
    lq_d = (jnp.zeros_like(lp_d) if logq is None
            else jnp.take_along_axis(logq, drafts[..., None], axis=-1)[..., 0])
    u = jax.vmap(jax.vmap(jax.random.uniform))(ukeys)
    ok = u * jnp.exp(lq_d) < jnp.exp(lp_d)
  ok &= pos < count[:, None]
  acc = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
  p_a = jnp.exp(jnp.take_along_axis(logp, acc[:, None, None], axis=1)[:, 0])  # [B, V]
  if all_greedy:
    return acc, jnp.argmax(p_a, axis=-1).astype(jnp.int32)
  at = jnp.minimum(acc, k - 1)[:, None]
  if logq is None:
    q_a = jax.nn.one_hot(jnp.take_along_axis(drafts, at, axis=1)[:, 0], p_a.shape[-1],
                         dtype=p_a.dtype)
  else:
    q_a = jnp.exp(jnp.take_along_axis(logq, at[..., None], axis=1)[:, 0])
  residual = jnp.maximum(p_a - q_a, 0.0)
  # After a rejection: max(p - q, 0) renormalised; after k acceptances: p (the bonus token).
  # A residual that rounding left empty (p == q to float precision) falls back to p.
  rejected = (acc < count) & (jnp.sum(residual, axis=-1) > 0)
  dist = jnp.where(rejected[:, None], residual, p_a)
  return acc, _draw(ckey, jnp.log(dist))


@backend_jit(static_argnames=("model", "spec", "max_tokens", "implementation", "max_blocks",
                              "all_greedy"), donate_argnames=("cache", "draft_cache"))
def _speculative_loop(params: Params, cache: PagedKVCache, state: SpecState, *, model: Model,
                     spec: SpeculativeConfig, max_tokens: int, draft_params: Params = None,
                     draft_cache: PagedKVCache | None = None, implementation: str | None = None,
                     max_blocks: int | None = None, all_greedy: bool = False,
                     num_iterations=None):
  """:func:`speculative_loop`, jitted (``num_iterations`` checked by the caller)."""
  check_cache_fits(model, cache.config)
  _check_all_logits(model, "speculative_loop")
  k = spec.num_draft_tokens
  dmodel = spec.draft_model
  if dmodel is not None:
    if draft_cache is None or draft_params is None:
      raise ValueError("speculative_loop: a draft model needs draft_params and draft_cache")
    check_cache_fits(dmodel, draft_cache.config)
    if dmodel.vocab_size != model.vocab_size:
      raise ValueError(f"speculative_loop: the draft model's vocabulary ({dmodel.vocab_size}) "
                       f"is not the target's ({model.vocab_size})")
  d = state.decode
  if d.penalties is not None:
    raise ValueError("speculative_loop: repetition, presence and frequency penalties are not "
                     "supported (the draft and target distributions would change per token)")
  b, h = state.history.shape
  max_tokens = int_in_range(max_tokens, "max_tokens", 1, INT32_MAX)
  gen0, len0 = d.num_generated, state.length
  if max_tokens < k + 1:
    raise ValueError(f"speculative_loop: max_tokens={max_tokens} cannot hold one iteration's "
                     f"k + 1 = {k + 1} tokens")

  def pauses(d: DecodeState) -> Array:
    """Rows whose next iteration might not fit this call's output: they pause (not done: a
    later call continues them). An iteration only ever runs whole, so the tokens do not depend
    on how the loop is cut into calls."""
    most = jnp.clip(d.max_new_tokens - d.num_generated - 1, 0, k) + 1
    return d.num_generated - gen0 + most > max_tokens

  # (No row pauses at the start: max_tokens holds any one iteration.)
  done = d.done | (d.seq_ids < 0) | (gen0 >= d.max_new_tokens)
  ids = jnp.where(done, -1, d.seq_ids)
  _, _, status = _row_checks(cache, ids)
  held = cache.seq_lens[jnp.clip(ids, 0, cache.config.max_seqs - 1)]
  # The history holds the row's tokens, the pending one last, and room for the rest.
  pending = jnp.take_along_axis(state.history, jnp.clip(len0 - 1, 0, h - 1)[:, None], axis=1)
  bad = ((held != len0 - 1) | (len0 < 1) | (pending[:, 0] != d.tokens)
         | (len0 + d.max_new_tokens - gen0 > h))
  status = jnp.where((status == 0) & (ids >= 0) & bad, Status.INVALID_COUNT, status)
  dstatus = jnp.zeros((b,), jnp.int32)
  if dmodel is not None:
    dids = jnp.where(done, -1, state.draft_ids)
    _, _, dstatus = _row_checks(draft_cache, dids)
    dheld = draft_cache.seq_lens[jnp.clip(dids, 0, draft_cache.config.max_seqs - 1)]
    bad = (dheld != state.draft_len) | (state.draft_len < len0 - 2) | (state.draft_len > len0 - 1)
    dstatus = jnp.where((dstatus == 0) & (dids >= 0) & bad, Status.INVALID_COUNT, dstatus)
    # A live row needs a draft slot (a draft of nothing would only waste its verify work).
    dstatus = jnp.where((dstatus == 0) & (ids >= 0) & (dids < 0), Status.INVALID_SLOT, dstatus)
  state = state.replace(decode=d.replace(done=done))
  idle = done
  result = SpecResult(
      tokens=jnp.full((b, max_tokens), -1, jnp.int32),
      logprobs=jnp.full((b, max_tokens), jnp.nan, jnp.float32),
      num_tokens=jnp.zeros((b,), jnp.int32), drafted=jnp.zeros((b,), jnp.int32),
      accepted=jnp.zeros((b,), jnp.int32), iterations=jnp.zeros((), jnp.int32),
      status=status, draft_status=dstatus)

  if num_iterations is not None and (jnp.ndim(num_iterations) != 0 or not jnp.issubdtype(
      jnp.result_type(num_iterations), jnp.integer)):
    raise ValueError(f"speculative_loop: num_iterations must be an integer scalar, got "
                     f"{jnp.result_type(num_iterations)}{list(jnp.shape(num_iterations))}")
  limit_iters = jnp.asarray(INT32_MAX if num_iterations is None else num_iterations, jnp.int32)

  def cond(carry):
    _, _, _, res, idle = carry
    return (~jnp.all(idle) & jnp.all(res.status == 0)
            & jnp.all(res.draft_status == 0) & (res.iterations < limit_iters))

  def body(carry):
    cache, dcache, st, res, idle = carry
    d = st.decode
    live = ~idle
    cap = jnp.where(live, jnp.clip(d.max_new_tokens - d.num_generated - 1, 0, k), 0)
    keys = jax.vmap(lambda key: jax.random.split(key, 2 * k + 1))(
        _token_keys(d.keys, d.num_generated))
    # 1. Draft.
    dstat = jnp.zeros((b,), jnp.int32)
    if dmodel is None:
      drafts, count = _ngram_drafts(st.history, st.length, k, spec.prompt_lookup_min,
                                    spec.prompt_lookup_max)
      count, logq = jnp.minimum(count, cap), None
    else:
      dcache, drafts, logq, fed, dstat = _model_drafts(
          draft_params, dcache, st, live, cap, keys[:, :k], dmodel=dmodel, k=k,
          all_greedy=all_greedy, implementation=implementation)
      count = cap
    # A draft ends at its first stop token: what would follow it is never emitted.
    pos_k = jnp.arange(k)[None, :]
    hit = jnp.any(drafts[..., None] == d.stop_tokens[:, None, :], axis=-1) & (
        pos_k < count[:, None])
    count = jnp.where(jnp.any(hit, axis=1), jnp.minimum(count, jnp.argmax(hit, axis=1) + 1),
                      count).astype(jnp.int32)
    dok = jnp.all(dstat == 0)
    # 2. Verify: the pending token and the drafts, every position's logits.
    go = live & dok
    chunk = jnp.concatenate([d.tokens[:, None], drafts], axis=1)
    new_cache, vlogits, vstat = model.forward(
        params, cache, chunk, jnp.where(go, d.seq_ids, -1), jnp.where(go, 1 + count, 0),
        implementation=implementation, max_blocks=max_blocks, all_logits=True)
    if vlogits.shape != (b, k + 1, model.vocab_size):
      raise ValueError(f"speculative_loop: {type(model).__name__}.forward(all_logits=True) "
                       f"returned logits of shape {vlogits.shape}, not [batch, k + 1, vocab] = "
                       f"[{b}, {k + 1}, {model.vocab_size}]")
    ok = dok & jnp.all(vstat == 0)
    # 3. Accept, then cut at a stop token.
    acc, nxt = _accept(vlogits, drafts, count, logq, d, keys[:, k:2 * k], keys[:, 2 * k],
                       all_greedy)
    pos = jnp.arange(k + 1)[None, :]
    emitted = jnp.where(pos < acc[:, None],
                        jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1),
                        nxt[:, None])
    stop = jnp.any(emitted[..., None] == d.stop_tokens[:, None, :], axis=-1) & (
        pos <= acc[:, None])
    stopped = jnp.any(stop, axis=1)
    n_out = jnp.where(stopped, jnp.argmax(stop, axis=1) + 1, acc + 1).astype(jnp.int32)
    n_out = jnp.where(live & ok, n_out, 0)
    lps = jax.vmap(token_logprobs)(vlogits, emitted)
    # 4. Record.
    keep = pos < n_out[:, None]
    hist_at = jnp.where(keep, st.length[:, None] + pos, h)
    history = st.history.at[jnp.arange(b)[:, None], hist_at].set(emitted, mode="drop")
    out_at = jnp.where(keep, st.length[:, None] - len0[:, None] + pos, max_tokens)
    rows = jnp.arange(b)[:, None]
    res = res.replace(
        tokens=res.tokens.at[rows, out_at].set(emitted, mode="drop"),
        logprobs=res.logprobs.at[rows, out_at].set(lps, mode="drop"),
        num_tokens=res.num_tokens + n_out,
        drafted=res.drafted + jnp.where(live & ok, count, 0),
        accepted=res.accepted + jnp.where(live & ok, acc, 0),
        iterations=res.iterations + ok.astype(jnp.int32), status=vstat, draft_status=dstat)
    # 5. Roll back: the target keeps the pending token and the emitted tokens but the last.
    applied = live & ok
    cache, _ = truncate_sequences(new_cache, jnp.where(applied, d.seq_ids, -1),
                                  jnp.where(applied, 1 + count - n_out, 0))
    length = st.length + n_out
    draft_len = st.draft_len
    if dmodel is not None:
      # The draft cache took the history it lacked and drafts 1..cap-1; it keeps those of the
      # emitted tokens but the last (so it lags the target by at most one token). After a
      # failed step it gives back all it took.
      drafted = jnp.maximum(cap - 1, 0)
      kept = jnp.minimum(n_out - 1, drafted)
      dcache, _ = truncate_sequences(dcache, jnp.where(live, st.draft_ids, -1),
                                     jnp.where(ok, drafted - kept, fed))
      draft_len = jnp.where(applied, st.length + kept, st.draft_len)
    gen = d.num_generated + n_out
    last = jnp.take_along_axis(emitted, jnp.maximum(n_out - 1, 0)[:, None], axis=1)[:, 0]
    new_done = d.done | (applied & (stopped | (gen >= d.max_new_tokens)))
    st = st.replace(
        decode=d.replace(tokens=jnp.where(applied, last, d.tokens), num_generated=gen,
                         done=new_done),
        history=history, length=length, draft_len=draft_len)
    idle = idle | new_done | (applied & pauses(st.decode))
    return cache, dcache, st, res, idle

  carry = (cache, draft_cache, state, result, idle)
  cache, draft_cache, state, result, _ = jax.lax.while_loop(cond, body, carry)
  return cache, draft_cache, state, result


def speculative_loop(params: Params, cache: PagedKVCache, state: SpecState, *, model: Model,
                     spec: SpeculativeConfig, max_tokens: int, draft_params: Params = None,
                     draft_cache: PagedKVCache | None = None, implementation: str | None = None,
                     max_blocks: int | None = None, all_greedy: bool = False,
                     num_iterations=None):
  """Speculative decoding until every row is done (or ``num_iterations``), inside one ``jit``.

  Each iteration drafts up to ``spec.num_draft_tokens`` tokens per live row (never more than
  the row has left to generate, less one), verifies them with one target step over the pending
  token and the drafts, accepts a prefix (see the module docstring), writes the accepted tokens
  and the target's next one to ``history`` and the output, and truncates the rejected tail
  from the target cache and the draft cache. A row is done after a stop token (tokens the
  iteration accepted after it are dropped and rolled back) or ``max_new_tokens``; a row whose
  next iteration might overflow this call's output (``max_tokens``) only pauses: it is not
  marked done, and a later call continues it with the tokens one whole loop gives. An
  iteration whose target or draft step fails changes nothing (the draft tokens it fed are
  rolled back) and ends the loop with the status.

  On return the target cache holds each row's tokens but its last (``length - 1``, as
  :func:`~jax_paged_kv.serving.decoding.decode_loop` leaves it), and the draft cache holds
  ``draft_len`` of them; a later call continues from the returned state.

  Args:
    params: target model parameters.
    cache: the target cache (donated).
    state: the :class:`SpecState`.
    model: the target model (static).
    spec: :class:`SpeculativeConfig` (static).
    max_tokens: static width of the output (a row generates at most this many tokens here;
      at least ``num_draft_tokens + 1``, one iteration's most).
    draft_params: the draft model's parameters (with ``spec.draft_model``).
    draft_cache: the draft model's cache (donated; with ``spec.draft_model``).
    implementation: paged attention implementation (static).
    max_blocks: static bound on block-table columns read (XLA attention).
    all_greedy: static; True only if every row is greedy (the program then compares argmaxes
      and leaves the sampling out).
    num_iterations: ``int32[]`` or None (no limit): stop after that many iterations (may be
      traced: one compilation serves all). The returned state continues in a later call (a
      server streaming the tokens as they come).

  Returns:
    ``(cache, draft_cache, state, SpecResult)``.
  """
  if num_iterations is not None and not isinstance(num_iterations, jax.core.Tracer):
    # A concrete count: an int32 scalar (a Python int and an np.int32 share one program),
    # never wrapped (np.int64(2**32 + 1) is not 1) nor truncated (2.5 is not 2).
    value = np.asarray(num_iterations)
    if value.ndim or not np.issubdtype(value.dtype, np.integer):
      raise ValueError(f"speculative_loop: num_iterations must be an integer scalar, got "
                       f"{num_iterations!r}")
    num_iterations = np.int32(int_in_range(int(value), "num_iterations", 0, INT32_MAX))
  return _speculative_loop(params, cache, state, model=model, spec=spec, max_tokens=max_tokens,
                           draft_params=draft_params, draft_cache=draft_cache,
                           implementation=implementation, max_blocks=max_blocks,
                           all_greedy=all_greedy, num_iterations=num_iterations)


@dataclasses.dataclass(frozen=True)
class SpeculativeOutput:
  """One prompt's result of :func:`speculative_generate`.

  Attributes:
    tokens: the generated tokens (a stop token included).
    logprobs: each token's log-probability under the target's raw distribution.
    drafted: draft tokens verified for this prompt.
    accepted: of them, accepted.
  """

  tokens: list[int]
  logprobs: list[float]
  drafted: int
  accepted: int

  @property
  def acceptance_rate(self) -> float:
    """``accepted / drafted`` (0 when nothing was drafted)."""
    return self.accepted / self.drafted if self.drafted else 0.0


def _cache_config(model: Model, lens: Sequence[int], rows: int, block_size: int) -> CacheConfig:
  """A ``PAGED`` cache for ``rows`` slots holding sequences of ``lens`` tokens, sized in
  powers of two (at least 256 tokens a sequence) so calls of similar size share programs."""
  max_len = block_size * math.ceil(pow2_ceil(max(256, *lens)) / block_size)
  blocks = sum(math.ceil(n / block_size) + 1 for n in lens)
  return cache_config_for(model, num_blocks=pow2_ceil(1 + blocks), max_seqs=rows,
                          max_seq_len=max_len, block_size=block_size)


def speculative_generate(params: Params, model: Model, prompts: Sequence[Sequence[int]],
                         sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
                         speculative: SpeculativeConfig | None = None, draft_params: Params = None,
                         cache_config: CacheConfig | None = None,
                         draft_cache_config: CacheConfig | None = None, block_size: int = 16,
                         prefill_chunk: int = 256,
                         implementation: str | None = None) -> list[SpeculativeOutput]:
  """Generates from every prompt at once with speculative decoding.

  The prompts are prefilled in chunks into a fresh target cache (and the draft model's), the
  first token is drawn from the prefill, then :func:`speculative_loop` runs on device.

  Args:
    params: the target model's parameters.
    model: the target model.
    prompts: token-id lists (non-empty).
    sampling: one :class:`~jax_paged_kv.SamplingParams` for every prompt, or one per prompt
      (default greedy, 16 tokens). Penalties, ``n > 1``, ``top_logprobs`` and
      ``prompt_logprobs`` are refused; every token's log-probability is always reported.
    speculative: :class:`SpeculativeConfig` (default: prompt lookup, 4 draft tokens).
    draft_params: the draft model's parameters (with ``speculative.draft_model``).
    cache_config, draft_cache_config: the caches (default: ``PAGED``, a slot per prompt, room
      for every prompt and its ``max_new_tokens``).
    block_size: block size of the default caches.
    prefill_chunk: prompt tokens per prefill step.
    implementation: paged attention implementation.

  Returns:
    One :class:`SpeculativeOutput` per prompt.

  Raises:
    ValueError: bad prompts or settings; the named cache errors if a step failed.
  """
  run = prepare_speculative(params, model, prompts, sampling, speculative=speculative,
                            draft_params=draft_params, cache_config=cache_config,
                            draft_cache_config=draft_cache_config, block_size=block_size,
                            prefill_chunk=prefill_chunk, implementation=implementation)
  if run is None:
    return []
  _, _, _, res = run.loop()
  raise_for_status(res.status, run.slots, op="speculative_generate")
  raise_for_status(res.draft_status, run.slots, op="speculative_generate (draft)")
  toks, lps, num, drafted, accepted = (np.asarray(x) for x in (
      res.tokens, res.logprobs, res.num_tokens, res.drafted, res.accepted))
  return [SpeculativeOutput(tokens=[int(run.first[i])] + toks[i, :num[i]].tolist(),
                            logprobs=[float(run.first_logprobs[i])] + lps[i, :num[i]].tolist(),
                            drafted=int(drafted[i]), accepted=int(accepted[i]))
          for i in range(run.num_prompts)]


@dataclasses.dataclass
class PreparedSpeculation:
  """Prefilled caches and state, ready for :func:`speculative_loop` (see
  :func:`prepare_speculative`). ``loop()`` runs it with the prepared settings."""

  params: Params
  cache: PagedKVCache
  draft_params: Params
  draft_cache: PagedKVCache | None
  state: SpecState
  model: Model
  spec: SpeculativeConfig
  max_tokens: int
  all_greedy: bool
  implementation: str | None
  slots: np.ndarray
  first: np.ndarray
  first_logprobs: np.ndarray
  num_prompts: int

  def loop(self):
    """:func:`speculative_loop` on the prepared caches (donated: use the results)."""
    return speculative_loop(self.params, self.cache, self.state, model=self.model,
                            spec=self.spec, max_tokens=self.max_tokens,
                            draft_params=self.draft_params, draft_cache=self.draft_cache,
                            implementation=self.implementation, all_greedy=self.all_greedy)


def prepare_speculative(params: Params, model: Model, prompts: Sequence[Sequence[int]],
                        sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
                        speculative: SpeculativeConfig | None = None,
                        draft_params: Params = None, cache_config: CacheConfig | None = None,
                        draft_cache_config: CacheConfig | None = None, block_size: int = 16,
                        prefill_chunk: int = 256,
                        implementation: str | None = None) -> PreparedSpeculation | None:
  """:func:`speculative_generate`'s checks, caches, prefill and :class:`SpecState` (None for
  no prompts): prompt ``i`` in slot ``i`` of both caches, the batch padded to a power of two."""
  model = check_model(model)
  _check_all_logits(model, "speculative_generate")
  spec = speculative or SpeculativeConfig()
  if spec.draft_model is not None and draft_params is None:
    raise ValueError("speculative_generate: a draft model needs draft_params")
  if spec.draft_model is not None and spec.draft_model.vocab_size != model.vocab_size:
    raise ValueError(f"speculative_generate: the draft model's vocabulary "
                     f"({spec.draft_model.vocab_size}) is not the target's ({model.vocab_size})")
  prompts = [[int_in_range(t, "token", 0, model.vocab_size - 1) for t in p] for p in prompts]
  if not prompts:
    return None
  if any(not p for p in prompts):
    raise ValueError("speculative_generate: every prompt needs at least one token")
  n = len(prompts)
  if sampling is None or isinstance(sampling, SamplingParams):
    sampling = [sampling or SamplingParams()] * n
  sampling = list(sampling)
  if len(sampling) != n:
    raise ValueError(f"speculative_generate: {len(sampling)} sampling params for {n} prompts")
  for s in sampling:
    if s.has_penalties or s.n != 1 or s.top_logprobs or s.prompt_logprobs:
      raise ValueError("speculative_generate: repetition / presence / frequency penalties, "
                       "n > 1, top_logprobs and prompt_logprobs are not supported (got "
                       f"{s})")
  prefill_chunk = int_in_range(prefill_chunk, "prefill_chunk", 1, INT32_MAX)
  rows = pow2_ceil(n)
  lens = [len(p) + s.max_new_tokens for p, s in zip(prompts, sampling, strict=True)]
  slots = np.full(rows, -1, np.int32)
  slots[:n] = np.arange(n)
  chunk = min(prefill_chunk, pow2_ceil(max(len(p) for p in prompts)))
  cc = cache_config or _cache_config(model, lens, rows, block_size)
  if cc.max_seqs < n:
    raise ValueError(f"speculative_generate: {n} prompts need {n} sequence slots, the cache "
                     f"has max_seqs={cc.max_seqs}")
  cache, _ = allocate_sequences(init_cache(cc), slots)
  cache, first, last = prefill_prompts(params, cache, prompts, slots, model=model, chunk=chunk,
                                       sampling=sampling, implementation=implementation,
                                       op="speculative_generate (prefill)")
  dcache = None
  if spec.draft_model is not None:
    dcc = draft_cache_config or _cache_config(spec.draft_model, lens, rows, block_size)
    if dcc.max_seqs < n:
      raise ValueError(f"speculative_generate: {n} prompts need {n} draft cache slots, it "
                       f"has max_seqs={dcc.max_seqs}")
    dcache, _ = allocate_sequences(init_cache(dcc), slots)
    dcache, _, _ = prefill_prompts(draft_params, dcache, prompts, slots, model=spec.draft_model,
                                   chunk=chunk, implementation=implementation,
                                   op="speculative_generate (draft prefill)")
  pad = [SamplingParams()] * (rows - n)
  decode = DecodeState.create(first.tolist(), slots.tolist(), sampling + pad,
                              num_stop=MAX_STOP_TOKENS)
  history = np.full((rows, pow2_ceil(max(lens))), -1, np.int32)
  length = np.zeros(rows, np.int32)
  for i, p in enumerate(prompts):
    history[i, :len(p)] = p
    history[i, len(p)] = first[i]
    length[i] = len(p) + 1
  state = SpecState(decode=decode, history=jnp.asarray(history), length=jnp.asarray(length),
                    draft_ids=jnp.asarray(slots if dcache is not None
                                          else np.full(rows, -1, np.int32)),
                    draft_len=jnp.asarray(np.maximum(length - 1, 0)))
  first_lp = np.asarray(token_logprobs(jnp.asarray(last), jnp.asarray(first)))
  return PreparedSpeculation(
      params=params, cache=cache, draft_params=draft_params, draft_cache=dcache, state=state,
      model=model, spec=spec,
      max_tokens=pow2_ceil(max(spec.num_draft_tokens + 1,
                               *(s.max_new_tokens for s in sampling))),
      all_greedy=all(s.temperature == 0 for s in sampling), implementation=implementation,
      slots=slots, first=first, first_logprobs=first_lp, num_prompts=n)
