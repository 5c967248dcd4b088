"""Jitted prefill and decoding on the paged cache: chunked prefill, a multi-step decode loop
inside one ``jit`` (``lax.while_loop``, cache donated), and sampling.

Sampling is per row, so requests with different settings share one compiled step: greedy
(``temperature == 0``), temperature, top-k, top-p (nucleus) and min-p, each row with its own
explicit PRNG key; repetition, presence and frequency penalties (:class:`Penalties`, on-device
token counts) act before them. Logprobs (the sampled token's, the top alternatives, the
prompt's) are those of the raw distribution. The key of a row's ``n``-th generated token is
``fold_in(row_key, n)``, so a sequence samples the same tokens whatever else is in the batch,
and again after it was preempted and recomputed.

The steps take any model that implements the model protocol (:mod:`jax_paged_kv.models.base`:
a hashable object with the cache geometry, ``vocab_size`` and a pure ``forward``), passed as the
static ``model=`` argument; a :class:`~jax_paged_kv.LlamaConfig` is one. ``config=`` is the
earlier name of the same argument and still accepted.

Three jitted entry points, all donating the cache (``donate_argnames="cache"``):

* :func:`prefill_step`: one chunk of up to ``T`` prompt tokens per row (ragged ``num_new``), then
  samples a token from each row's last logits (used for rows whose prompt is complete).
* :func:`decode_step`: one token per row, returns the logits (benchmarks, export).
* :func:`decode_loop`: up to ``num_steps`` decode steps in one ``lax.while_loop``; stops early
  when every row is done (stop token, per-row ``max_new_tokens``) or when a step fails (e.g.
  the pool ran dry: that step is not applied and its status comes back).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jax_paged_kv.cache.errors import is_tracing, raise_for_status
from jax_paged_kv.cache.inputs import INT32_MAX, INT32_MIN
from jax_paged_kv.cache.ops import free_outside_window
from jax_paged_kv.cache.state import PagedKVCache
from jax_paged_kv.models.base import Model, check_cache_fits, check_model, last_token

Params = Any  # the model's parameter pytree

# XLA:CPU compiles these programs without its MLIR fusion emitters where its version can (JAX
# 0.10's XLA has the option; from 0.11 the emitters are always on). Their first use in a process
# holds about 130 MiB for the rest of it: on the ``vs_transformers`` model (2-core Xeon, JAX
# 0.10.2) the first prefill compilation raised RSS by ~165 MiB with them and ~37 MiB without,
# and a ``generate`` process peaked at about 730 instead of about 890 MiB, its warm calls about
# 8% slower. Other backends compile with their defaults. ``JAX_PAGED_KV_CPU_FUSION_EMITTERS=1``
# (read at the first CPU compilation) keeps XLA's default on the CPU too.
_CPU_OPTIONS_WANTED = {"xla_cpu_use_fusion_emitters": False}


@functools.lru_cache(maxsize=1)
def cpu_compiler_options() -> dict:
  """The ``compiler_options`` of the jitted entry points on the CPU: the emitters off where this
  XLA has the option (probed once with a trivial compilation), else none."""
  if os.environ.get("JAX_PAGED_KV_CPU_FUSION_EMITTERS") == "1":
    return {}
  try:
    jax.jit(lambda x: x + 1, compiler_options=_CPU_OPTIONS_WANTED).lower(
        jax.ShapeDtypeStruct((), jnp.int32)).compile()
  except Exception:  # noqa: BLE001 - "No such compile option" (JAX >= 0.11), however raised
    return {}
  return dict(_CPU_OPTIONS_WANTED)


class BackendJit:
  """``jax.jit(fun, **jit_kwargs)``, compiled with :func:`cpu_compiler_options` when JAX's
  default backend is the CPU (chosen per call; the two jitted functions keep their own caches).
  Attributes (``lower``, ``trace``, ...) are those of the jitted function the call would use."""

  def __init__(self, fun, **jit_kwargs):
    self._fun, self._jit_kwargs = fun, jit_kwargs
    self._default = jax.jit(fun, **jit_kwargs)
    self._cpu = None  # built at the first CPU call
    functools.update_wrapper(self, fun)

  def _pick(self):
    if jax.default_backend() != "cpu":
      return self._default
    if self._cpu is None:
      options = cpu_compiler_options()
      self._cpu = (jax.jit(self._fun, compiler_options=options, **self._jit_kwargs)
                   if options else self._default)
    return self._cpu

  def __call__(self, *args, **kwargs):
    fn = self._pick()
    if fn is self._default:
      return fn(*args, **kwargs)
    # Called inside another trace (a user's jit, shard_map, vmap): jit refuses compiler_options
    # on a nested jit, and the outer program's options are what count anyway.
    if is_tracing(args, kwargs):
      return self._default(*args, **kwargs)
    try:
      return fn(*args, **kwargs)
    except ValueError as e:  # nested inside a trace that none of the arguments shows
      if "compiler_options" not in str(e):
        raise
      return self._default(*args, **kwargs)

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self._pick(), name)


def backend_jit(**jit_kwargs):
  """Decorator form of :class:`BackendJit`."""
  return lambda fun: BackendJit(fun, **jit_kwargs)


_JIT_STATIC = ("model", "config", "implementation", "max_blocks")
# Width of every DecodeState's stop-token table: the number of stop tokens a request has is not
# part of any compiled shape (requests with 0 or 3 stop tokens share one program).
MAX_STOP_TOKENS = 16
# Most alternatives a request can ask for per token (``SamplingParams.top_logprobs``; OpenAI's
# and vLLM's default limit). The engine's programs return this many once any request asks, so
# requests asking for 1 or 20 share one compiled program.
MAX_TOP_LOGPROBS = 20

# Most parallel samples one request can ask for (``SamplingParams.n``; OpenAI's limit): each is
# a request of the engine's, queued at once.
MAX_SAMPLES = 128


def resolve_model(model: Model | None, config: Model | None) -> Model:
  """The model given as ``model=`` or under its earlier name ``config=`` (checked)."""
  if model is None and config is None:
    raise TypeError("pass the model as model=... (any object implementing "
                    "jax_paged_kv.models.base.Model, e.g. a LlamaConfig)")
  if model is not None and config is not None and model != config:
    raise TypeError("model= and config= name the same argument; pass one")
  return check_model(model if model is not None else config)


def pytree_dataclass(cls):
  """Registers a dataclass whose every field is a pytree child (the serving states)."""
  jax.tree_util.register_dataclass(
      cls, data_fields=[f.name for f in dataclasses.fields(cls)], meta_fields=[])
  return cls


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request picks its tokens.

  Attributes:
    temperature: ``0`` is greedy (argmax); otherwise logits are divided by it.
    top_k: keep the ``top_k`` most likely tokens (``0``: no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
      (``1.0``: no limit), plus every token tied with the last one kept (like ``top_k``'s
      ties; Hugging Face cuts ties by sort order). Applied after ``top_k``.
    min_p: keep only tokens at least ``min_p`` times as likely as the most likely one
      (``0.0``: no limit; Hugging Face's ``min_p``). Applied last, in Hugging Face's (and
      vLLM v0's) order, after temperature, top-k and top-p; vLLM v1 applies it before top-k /
      top-p (top-p then cuts a smaller, renormalised set, so it can keep fewer tokens).
    max_new_tokens: generate at most this many tokens.
    stop_tokens: generation ends after any of these (it is included in the output); at most
      :data:`MAX_STOP_TOKENS`.
    seed: the request's PRNG seed (``fold_in(key(seed), n)`` samples its ``n``-th token).
    logprobs: also report each generated token's log-probability under the model's own
      distribution (:func:`token_logprobs`: the log-softmax of the raw logits, before
      temperature, top-k and top-p; ``RequestOutput.logprobs``).
    repetition_penalty: a token already in the prompt or the output has its logit divided by
      it if positive, multiplied if negative (``1.0``: none; Hugging Face's and vLLM's
      ``repetition_penalty``, > 0).
    presence_penalty: subtracted from the logit of every token the output holds (``0.0``:
      none; OpenAI's, in ``[-2, 2]``).
    frequency_penalty: times a token's count in the output, subtracted from its logit
      (``0.0``: none; OpenAI's, in ``[-2, 2]``). The three penalties act on the raw logits,
      before temperature and the filters, greedy rows included (:class:`Penalties`);
      ``logprobs`` stay those of the raw distribution.
    prompt_logprobs: also report each prompt token's log-probability given the tokens before
      it (``RequestOutput.prompt_logprobs``, None for the first; vLLM's ``prompt_logprobs=0``):
      scoring and perplexity. Needs a model whose ``forward`` takes ``all_logits`` (the
      bundled ones); such a request takes no cached prefix blocks (it computes every
      position; its own blocks are cached for others as usual). Under the engine's token
      eviction (``window_eviction``) each position sees what the eviction kept, as generated
      tokens do (an approximation of the full context); an aborted request keeps the
      positions scored so far.
    top_logprobs: with ``logprobs``, also report the ``top_logprobs`` most likely tokens at
      each position and their log-probabilities, most likely first (OpenAI's
      ``top_logprobs``; :func:`top_token_logprobs`; ``RequestOutput.top_logprobs``), at most
      :data:`MAX_TOP_LOGPROBS`.
    n: the engine generates ``n`` continuations of the prompt (parallel sampling; OpenAI's
      and vLLM's ``n``), at most :data:`MAX_SAMPLES`: sample ``i`` draws with seed
      ``seed + i`` (vLLM's rule), so it gives the tokens of a request of its own with that
      seed, and the samples share the prompt's full blocks
      (:meth:`~jax_paged_kv.Engine.add_request`).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  max_new_tokens: int = 16
  stop_tokens: tuple[int, ...] = ()
  seed: int = 0
  logprobs: bool = False
  top_logprobs: int = 0
  repetition_penalty: float = 1.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  prompt_logprobs: bool = False
  n: int = 1

  def __post_init__(self):
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty"):
      value = getattr(self, name)
      if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real,
                                                                      np.floating)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not self.temperature >= 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not 0 <= self.min_p <= 1:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
    if not 0 < self.repetition_penalty < math.inf:
      raise ValueError(f"repetition_penalty must be a finite number > 0, got "
                       f"{self.repetition_penalty}")
    for name in ("presence_penalty", "frequency_penalty"):
      if not -2 <= getattr(self, name) <= 2:
        raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
    # Integers the compiled step holds as int32 (the seed: as a 32-bit PRNG seed): a float
    # is never truncated (max_new_tokens=2.5 would stop on device and not on the host) and
    # nothing wraps (two seeds 2**32 apart would draw the same tokens).
    object.__setattr__(self, "top_k", int_in_range(self.top_k, "top_k", 0))
    object.__setattr__(self, "max_new_tokens",
                       int_in_range(self.max_new_tokens, "max_new_tokens", 1))
    object.__setattr__(self, "seed", int_in_range(self.seed, "seed", 0, 2**32 - 1))
    # Sample i draws with seed + i: the last must still be a distinct 32-bit seed.
    object.__setattr__(self, "n", int_in_range(self.n, "n", 1,
                                               min(MAX_SAMPLES, 2**32 - self.seed)))
    object.__setattr__(self, "stop_tokens", tuple(
        int_in_range(t, "stop token", 0) for t in self.stop_tokens))
    if not isinstance(self.logprobs, (bool, np.bool_)):
      raise ValueError(f"logprobs must be a bool, got {self.logprobs!r}")
    object.__setattr__(self, "logprobs", bool(self.logprobs))
    if not isinstance(self.prompt_logprobs, (bool, np.bool_)):
      raise ValueError(f"prompt_logprobs must be a bool, got {self.prompt_logprobs!r}")
    object.__setattr__(self, "prompt_logprobs", bool(self.prompt_logprobs))
    object.__setattr__(self, "top_logprobs", int_in_range(self.top_logprobs, "top_logprobs", 0,
                                                          MAX_TOP_LOGPROBS))
    if self.top_logprobs and not self.logprobs:
      raise ValueError(f"top_logprobs={self.top_logprobs} needs logprobs=True")
    if len(self.stop_tokens) > MAX_STOP_TOKENS:
      raise ValueError(f"{len(self.stop_tokens)} stop tokens; at most {MAX_STOP_TOKENS=} are "
                       "supported (the stop-token table has one fixed width, so that requests "
                       "with different numbers of stop tokens share one compiled step)")


  @property
  def has_penalties(self) -> bool:
    """Whether any of the repetition, presence and frequency penalties is on."""
    return (self.repetition_penalty != 1 or self.presence_penalty != 0
            or self.frequency_penalty != 0)


def pow2_ceil(n: int) -> int:
  """The smallest power of two ``>= n`` (1 for ``n <= 1``): static sizes that calls share."""
  return 1 << max(0, int(n) - 1).bit_length()


def int_in_range(value, name: str, low: int = INT32_MIN, high: int = INT32_MAX) -> int:
  """``value`` as an int in ``[low, high]`` (default: int32); a bool, float or out-of-range
  value raises ``ValueError``."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  try:
    value = operator.index(value)
  except TypeError:
    raise ValueError(f"{name} must be an integer, got {value!r}") from None
  if not low <= value <= high:
    raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
  return value


def make_key(seed: int) -> np.ndarray:
  """Raw ``uint32`` key data of ``jax.random.key(seed)`` (rows of a batch stack these).

  Cached per seed and PRNG implementation (a read-only array): the engine builds every row's
  key before every call, and an eager ``jax.random.key`` costs several dispatches.
  """
  return _make_key(int(seed), str(jax.config.jax_default_prng_impl))


@functools.lru_cache(maxsize=4096)
def _make_key(seed: int, impl: str) -> np.ndarray:
  del impl  # part of the cache key only
  data = np.asarray(jax.random.key_data(jax.random.key(seed)))
  data.flags.writeable = False
  return data


def _token_keys(keys: Array, index: Array) -> Array:
  """Typed keys ``[batch]``: row ``b``'s ``key`` folded with ``index[b]``."""
  return jax.vmap(lambda k, i: jax.random.fold_in(jax.random.wrap_key_data(k), i))(keys, index)


def _ordered_bits(x: Array) -> Array:
  """``uint32`` keys with the order of the float32 values ``x`` (NaN-free)."""
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  i = jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)
  return jax.lax.bitcast_convert_type(i, jnp.uint32) ^ jnp.uint32(0x80000000)


def _bisect(lo: Array, hi: Array, go_up) -> Array:
  """32 bisection steps over ``uint32`` per row: ``go_up(mid)`` moves ``lo`` up, else ``hi``
  down. Returns ``hi``, the smallest value where ``go_up`` is False."""
  def body(_, lh):
    lo, hi = lh
    mid = lo + (hi - lo) // 2
    up = go_up(mid)
    return jnp.where(up, mid, lo), jnp.where(up, hi, mid)
  return jax.lax.fori_loop(0, 32, body, (lo, hi))[1]


def _top_k_mask(bits: Array, k: Array) -> Array:
  """``bool[batch, vocab]``: values at least the ``k``-th largest of each row (all if k == 0).

  The ``k``-th largest value is found by bisection over the float bits (32 passes, no sort:
  XLA's sort of a whole vocabulary costs more than the model on CPU). Ties at the threshold
  are all kept.
  """
  v = bits.shape[-1]
  k = jnp.where(k > 0, jnp.minimum(k, v), v).astype(jnp.int32)
  lo = jnp.min(bits, axis=-1) - 1  # >= 0: real floats (even -inf) never map to 0
  hi = jnp.max(bits, axis=-1)
  # The smallest t with fewer than k values above it is the k-th largest value.
  thresh = _bisect(lo, hi, lambda t: jnp.sum(bits > t[:, None], -1, dtype=jnp.int32) >= k)
  return bits >= thresh[:, None]


def _top_p_mask(bits: Array, probs: Array, top_p: Array) -> Array:
  """``bool[batch, vocab]``: tokens whose strictly more likely tokens hold less than ``top_p``.

  That is the smallest set of most likely tokens whose mass reaches ``top_p`` (HF / vLLM
  nucleus semantics), found by bisection on the threshold, without sorting.
  """
  lo = jnp.zeros(bits.shape[:1], jnp.uint32)
  hi = jnp.max(bits, axis=-1)
  def mass_above(t):
    return jnp.sum(jnp.where(bits > t[:, None], probs, 0.0), axis=-1)
  thresh = _bisect(lo, hi, lambda t: mass_above(t) >= top_p)
  return (bits >= thresh[:, None]) | (top_p >= 1)[:, None]


def sample_tokens(logits: Array, keys: Array, temperature: Array, top_k: Array,
                  top_p: Array, min_p: Array | None = None) -> Array:
  """Samples one token per row with per-row temperature, top-k, top-p and min-p.

  Filters are applied in the usual order (Hugging Face's): temperature, then top-k, then top-p
  on the renormalised top-k distribution, then min-p. Thresholds are found by bisection over
  the float bits rather than by sorting the vocabulary (32 vectorised passes; each filter only
  runs when some row uses it, and an all-greedy batch only takes an argmax).

  Args:
    logits: ``float32[batch, vocab]``.
    keys: ``[batch]`` typed PRNG keys (e.g. ``jax.random.split``), one per row.
    temperature: ``float32[batch]``; ``0`` picks the argmax.
    top_k: ``int32[batch]``; ``0`` keeps every token.
    top_p: ``float32[batch]`` in ``(0, 1]``.
    min_p: ``float32[batch]`` in ``[0, 1]``, or None (no min-p filter): keep tokens whose
      probability is at least ``min_p`` times the row's largest.

  Returns:
    ``int32[batch]`` token ids.
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  sampling = temperature > 0

  def sample(_):
    z = _filtered(logits, sampling, temperature, top_k, top_p, min_p)
    sampled = jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)
    return jnp.where(sampling, sampled, greedy)

  return jax.lax.cond(jnp.any(sampling), sample, lambda _: greedy, None)


def filtered_logits(logits: Array, temperature: Array, top_k: Array, top_p: Array,
                    min_p: Array | None = None) -> Array:
  """``float32[batch, vocab]``: the logits :func:`sample_tokens` draws each row's token from
  (``softmax`` of a row is its sampling distribution): divided by the temperature, ``-inf``
  where top-k, top-p or min-p drop a token. A greedy row (``temperature == 0``) is ``0`` at its
  argmax and ``-inf`` elsewhere. Speculative sampling compares these distributions."""
  logits = logits.astype(jnp.float32)
  sampling = temperature > 0
  onehot = jnp.arange(logits.shape[-1])[None, :] == jnp.argmax(logits, axis=-1)[:, None]
  greedy = jnp.where(onehot, 0.0, -jnp.inf).astype(jnp.float32)
  return jax.lax.cond(
      jnp.any(sampling),
      lambda: jnp.where(sampling[:, None],
                        _filtered(logits, sampling, temperature, top_k, top_p, min_p), greedy),
      lambda: greedy)


def _filtered(logits, sampling, temperature, top_k, top_p, min_p):
  """The sampling rows' filtered logits (see :func:`sample_tokens`; other rows: unscaled)."""
  # At least float32's smallest normal number: a subnormal temperature (1e-39) is flushed to
  # 0 on CPUs and GPUs, and 0 / 0 at the row's max gave NaN (token 0 with a filter on).
  t = jnp.where(sampling, jnp.maximum(temperature, np.finfo(np.float32).tiny),
                1.0).astype(jnp.float32)
  # Shifted by the row's max first: logits / t overflows to +inf for a tiny t (2e-38), and a
  # row of infs samples its first token, not its argmax. Same distribution and thresholds.
  top = jnp.max(logits, axis=-1, keepdims=True)
  z = (logits - jnp.where(jnp.isfinite(top), top, 0.0)) / t[:, None]
  bits = _ordered_bits(z)
  keep = jax.lax.cond(jnp.any(sampling & (top_k > 0)), lambda: _top_k_mask(bits, top_k),
                      lambda: jnp.ones(z.shape, bool))
  z = jnp.where(keep, z, -jnp.inf)

  def nucleus():
    probs = jax.nn.softmax(z, axis=-1)
    return keep & _top_p_mask(bits, probs, jnp.where(sampling, top_p, 1.0))

  keep = jax.lax.cond(jnp.any(sampling & (top_p < 1)), nucleus, lambda: keep)
  z = jnp.where(keep, z, -jnp.inf)
  if min_p is not None:
    # p_i >= min_p * p_max, as z_i >= z_max + log(min_p): top-k and top-p keep the row's
    # most likely token, and renormalising changes no ratio. min_p = 0 keeps every token.
    mp = jnp.where(sampling, min_p, 0.0).astype(jnp.float32)
    floor = jnp.max(z, axis=-1) + jnp.log(mp)
    z = jax.lax.cond(jnp.any(mp > 0), lambda: jnp.where(z >= floor[:, None], z, -jnp.inf),
                     lambda: z)
  return z


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Penalties:
  """Per-row repetition, presence and frequency penalties and the token counts they act on (a
  pytree of arrays; :attr:`DecodeState.penalties`, ``prefill_step(penalties=...)``).

  vLLM's semantics: ``repetition`` on the tokens in the prompt or the output, ``presence`` and
  ``frequency`` on the output only. The counts live on device as ``[batch, vocab]`` tables,
  built from the rows' token lists by :meth:`create` (only the lists cross to the device) and
  updated by the decode loop as it samples.

  Attributes:
    seen: ``bool[batch, vocab]``: the token is in the row's prompt or output.
    counts: ``int32[batch, vocab]``: times the row's output holds the token.
    repetition: ``float32[batch]`` (``1``: none).
    presence: ``float32[batch]`` (``0``: none).
    frequency: ``float32[batch]`` (``0``: none).
  """

  seen: Array
  counts: Array
  repetition: Array
  presence: Array
  frequency: Array

  @classmethod
  def create(cls, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
             sampling: Sequence[SamplingParams], vocab_size: int, *,
             length: int | None = None) -> Penalties:
    """From each row's prompt and output tokens so far (the last generated token included).

    Args:
      prompts, outputs: per row, token ids (tokens outside ``[0, vocab_size)`` count for
        nothing; an empty list for a padding row).
      sampling: per row, the :class:`SamplingParams` holding the penalties.
      vocab_size: the model's vocabulary.
      length: static padded length of the token lists sent to the device (default: the
        longest, rounded up to a power of two, so that few shapes compile; the engine passes
        its ``max_seq_len``: one shape).
    """
    n = len(sampling)
    if not len(prompts) == len(outputs) == n:
      raise ValueError(f"{len(prompts)} prompts, {len(outputs)} outputs and {n} sampling "
                       "params must match")
    longest = max([1, *(len(p) for p in prompts), *(len(o) for o in outputs)])
    length = pow2_ceil(longest) if length is None else int(length)
    if longest > length:
      raise ValueError(f"a row has {longest} tokens, more than {length=}")
    toks = np.full((2, n, length), -1, np.int32)
    for i, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
      toks[0, i, :len(p)] = [int_in_range(t, "token") for t in p]
      toks[1, i, :len(o)] = [int_in_range(t, "token") for t in o]
    seen, counts = _count_tokens(jax.device_put(toks), vocab_size=int(vocab_size))
    return cls(seen=seen, counts=counts,
               repetition=jnp.asarray([s.repetition_penalty for s in sampling], jnp.float32),
               presence=jnp.asarray([s.presence_penalty for s in sampling], jnp.float32),
               frequency=jnp.asarray([s.frequency_penalty for s in sampling], jnp.float32))

  def apply(self, logits: Array) -> Array:
    """``float32[batch, vocab]``: ``logits`` with the penalties applied."""
    logits = logits.astype(jnp.float32)
    rep = self.repetition[:, None]
    logits = jnp.where(self.seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    counts = self.counts.astype(jnp.float32)
    return (logits - self.frequency[:, None] * counts
            - self.presence[:, None] * (counts > 0).astype(jnp.float32))

  def update(self, tokens: Array, take: Array) -> Penalties:
    """Counts ``tokens[b]`` (``int32[batch]``) for the rows where ``take[b]``."""
    rows = jnp.arange(tokens.shape[0])
    vocab = self.counts.shape[-1]
    idx = jnp.where(take & (tokens >= 0) & (tokens < vocab), tokens, vocab)  # else: dropped
    return dataclasses.replace(self, counts=self.counts.at[rows, idx].add(1, mode="drop"),
                               seen=self.seen.at[rows, idx].set(True, mode="drop"))



@functools.partial(jax.jit, static_argnames=("vocab_size",))
def _count_tokens(toks: Array, *, vocab_size: int) -> tuple[Array, Array]:
  """``(seen bool[b, vocab], counts int32[b, vocab])`` from ``toks int32[2, b, L]`` (prompt,
  output; ``-1`` padded)."""
  b = toks.shape[1]
  rows = jnp.arange(b)[:, None]
  def count(t):
    idx = jnp.where((t >= 0) & (t < vocab_size), t, vocab_size)  # out of range: dropped
    return jnp.zeros((b, vocab_size), jnp.int32).at[rows, idx].add(1, mode="drop")
  counts = count(toks[1])
  return (count(toks[0]) > 0) | (counts > 0), counts


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """Per-row state of the decode loop (a pytree of arrays).

  Attributes:
    tokens: ``int32[batch]``, each row's last generated token (not yet in the cache).
    seq_ids: ``int32[batch]`` cache slots; negative: padding row.
    num_generated: ``int32[batch]`` tokens generated so far (``tokens`` included).
    max_new_tokens: ``int32[batch]`` per-row limit.
    done: ``bool[batch]`` rows that finished (stop token or limit) or are padding.
    stop_tokens: ``int32[batch, num_stop]``, ``-1`` padded.
    temperature: ``float32[batch]``.
    top_k: ``int32[batch]``.
    top_p: ``float32[batch]``.
    keys: ``uint32[batch, key_words]`` raw key data (see :func:`make_key`).
    min_p: ``float32[batch]``, or None (no min-p filter; a state built before the field).
    penalties: :class:`Penalties`, or None (no row has a penalty: the loop's program has none
      of their work).
  """

  tokens: Array
  seq_ids: Array
  num_generated: Array
  max_new_tokens: Array
  done: Array
  stop_tokens: Array
  temperature: Array
  top_k: Array
  top_p: Array
  keys: Array
  min_p: Array | None = None
  penalties: Penalties | None = None

  def replace(self, **kwargs) -> DecodeState:
    return dataclasses.replace(self, **kwargs)

  @classmethod
  def create(cls, tokens: Sequence[int], seq_ids: Sequence[int],
             sampling: Sequence[SamplingParams], num_generated: Sequence[int] | None = None,
             *, num_stop: int | None = None,
             history: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
             vocab_size: int | None = None, history_length: int | None = None) -> DecodeState:
    """Host-side constructor from per-row :class:`SamplingParams`.

    Args:
      tokens: each row's last generated token.
      seq_ids: each row's cache slot (negative: padding).
      sampling: each row's sampling parameters.
      num_generated: tokens generated so far per row (default 1: the token from prefill).
      num_stop: width of ``stop_tokens`` (default :data:`MAX_STOP_TOKENS`, so the width is the
        same for every batch).
      history: per row, ``(prompt, output so far)`` token lists (``tokens[i]`` is the output's
        last): the state then carries :class:`Penalties` (needed when a row has a penalty;
        with none, the state's program is the one with penalties, at no effect). Needs
        ``vocab_size``.
      vocab_size: the model's vocabulary (with ``history``).
      history_length: static padded length of the lists (:meth:`Penalties.create`).
    """
    n = len(seq_ids)
    if not (len(tokens) == len(sampling) == n):
      raise ValueError(f"{len(tokens)} tokens, {n} seq_ids and {len(sampling)} sampling params "
                       "must match")
    gen = np.ones(n, np.int32) if num_generated is None else np.asarray(num_generated, np.int32)
    width = MAX_STOP_TOKENS if num_stop is None else int(num_stop)
    longest = max([0, *(len(s.stop_tokens) for s in sampling)])
    if longest > width:
      raise ValueError(f"a request has {longest} stop tokens, more than {num_stop=}")
    stops = np.full((n, width), -1, np.int32)
    for i, s in enumerate(sampling):
      stops[i, :len(s.stop_tokens)] = s.stop_tokens
    # Integers, never truncated (1.7 is not token 1); a token outside the model's vocabulary
    # fails the first step with INVALID_TOKEN.
    ids = np.asarray([int_in_range(i, "seq_id") for i in seq_ids], np.int32)
    max_new = np.asarray([s.max_new_tokens for s in sampling], np.int32)
    last = np.asarray([int_in_range(t, "token") for t in tokens], np.int32)
    done = (ids < 0) | (gen >= max_new) | np.any(stops == last[:, None], axis=1)
    state = cls(
        tokens=last, seq_ids=ids, num_generated=gen, max_new_tokens=max_new, done=done,
        stop_tokens=stops,
        temperature=np.asarray([s.temperature for s in sampling], np.float32),
        top_k=np.asarray([s.top_k for s in sampling], np.int32),
        top_p=np.asarray([s.top_p for s in sampling], np.float32),
        keys=np.stack([make_key(s.seed) for s in sampling]),
        min_p=np.asarray([s.min_p for s in sampling], np.float32))
    state = jax.device_put(state)  # one batched transfer, not ten
    if history is not None or any(s.has_penalties for s in sampling):
      if history is None:
        raise ValueError("a row has a repetition, presence or frequency penalty: pass history "
                         "(each row's prompt and output tokens) and vocab_size")
      if vocab_size is None:
        raise ValueError("history needs vocab_size (the penalties' token tables)")
      if len(history) != n:
        raise ValueError(f"{len(history)} history rows for {n} seq_ids")
      state = state.replace(penalties=Penalties.create(
          [h[0] for h in history], [h[1] for h in history], sampling, vocab_size,
          length=history_length))
    return state



def token_logprobs(logits: Array, tokens: Array) -> Array:
  """``float32[batch]``: ``log_softmax(logits[b])[tokens[b]]``, each token's log-probability
  under the model's raw distribution (before temperature, top-k and top-p; vLLM's default
  ``raw_logprobs``). ``logits``: ``[batch, vocab]``; ``tokens``: ``int32[batch]`` (a
  negative token, e.g. a padding row's ``-1``, gives NaN)."""
  return token_scores(logits, tokens, 0)[0]


def top_token_logprobs(logits: Array, k: int) -> tuple[Array, Array]:
  """The ``k`` most likely tokens of each row and their log-probabilities, most likely first.

  ``logits``: ``[batch, vocab]``; ``k`` (static): ``0 <= k <= vocab``. Returns
  ``(tokens int32[batch, k], logprobs float32[batch, k])`` under the same raw distribution as
  :func:`token_logprobs`; equal log-probabilities are ordered by token id.
  """
  return token_scores(logits, None, k)[1:]


def token_scores(logits: Array, tokens: Array | None, k: int) -> tuple:
  """:func:`token_logprobs` of ``tokens`` (unless None) and, if ``k`` (static), the
  :func:`top_token_logprobs` after it, from one log-softmax: ``(logprobs, top tokens, top
  logprobs)``, the parts asked for."""
  vocab = logits.shape[-1]
  if not 0 <= k <= vocab:
    raise ValueError(f"top_token_logprobs: k={k} is outside [0, vocab={vocab}]")
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  out = ()
  if tokens is not None:
    tokens = jnp.asarray(tokens, jnp.int32)
    got = jnp.take_along_axis(lp, jnp.clip(tokens, 0, vocab - 1)[:, None], axis=-1)[:, 0]
    out += (jnp.where((tokens >= 0) & (tokens < vocab), got, jnp.nan),)
  if k:
    values, top = jax.lax.top_k(lp, k)
    out += (top.astype(jnp.int32), values)
  return out


def _next_tokens(logits, keys, temperature, top_k, top_p, min_p, all_greedy: bool):
  """:func:`sample_tokens`, or only its argmax when the caller guarantees every row is greedy
  (``all_greedy``, static: the engine's programs for all-greedy workloads leave the sampling
  branch out, about a quarter of their compile time; the tokens are the same)."""
  if all_greedy:
    return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
  return sample_tokens(logits, keys, temperature, top_k, top_p, min_p)


@backend_jit(static_argnames=(*_JIT_STATIC, "all_greedy"), donate_argnames=("cache",))
def prefill_step(params: Params, cache: PagedKVCache, tokens: Array, seq_ids: Array,
                 num_new: Array, temperature: Array, top_k: Array, top_p: Array, keys: Array,
                 key_index: Array, *, model: Model | None = None, config: Model | None = None,
                 implementation: str | None = None, max_blocks: int | None = None,
                 all_greedy: bool = False, min_p: Array | None = None,
                 penalties: Penalties | None = None, targets: Array | None = None):
  """One chunk of prefill for a batch of rows, then one sampled token per row.

  Args:
    params: model parameters.
    cache: the cache (donated).
    tokens: ``int32[batch, T]`` prompt chunk; row ``b`` uses its first ``num_new[b]`` tokens.
    seq_ids: ``int32[batch]`` active slots (negative: padding).
    num_new: ``int32[batch]`` valid tokens per row, in ``[0, T]``.
    temperature, top_k, top_p: per-row sampling parameters (see :func:`sample_tokens`).
    keys: ``uint32[batch, key_words]`` per-row raw key data.
    key_index: ``int32[batch]`` index folded into each key (tokens generated so far).
    model: the model (static; :class:`~jax_paged_kv.models.base.Model`).
    config: earlier name of ``model``.
    implementation: paged attention implementation (static).
    max_blocks: static bound on block-table columns read (XLA attention).
    all_greedy: static; True only if every row's temperature is 0 (the program then takes the
      argmax and leaves the sampling branch out; a row with temperature > 0 would be decoded
      greedily). The engine sets it for workloads with no sampled request.
    min_p: ``float32[batch]`` per-row min-p (see :func:`sample_tokens`), or None.
    penalties: :class:`Penalties` applied before sampling, or None.
    targets: ``int32[batch, T]`` or None: the token that follows each chunk position (``-1``:
      none wanted). Given, the model computes every position's logits (its ``forward`` must
      take ``all_logits``) and a fifth result holds their log-probabilities (prompt logprobs).

  Returns:
    ``(cache, next_tokens int32[batch], logits float32[batch, vocab], status int32[batch])``;
    ``next_tokens`` is only meaningful for rows whose prompt this chunk completed. With
    ``targets``, a fifth: ``float32[batch, T]``, ``log_softmax(logits at [b, t])[targets[b,
    t]]`` (NaN where ``targets`` is ``-1`` or ``t >= num_new[b]``).
  """
  model = resolve_model(model, config)
  check_cache_fits(model, cache.config)  # at trace time, for any protocol model
  extra = {} if targets is None else {"all_logits": True}
  cache, logits, status = model.forward(params, cache, tokens, seq_ids, num_new,
                                        implementation=implementation, max_blocks=max_blocks,
                                        **extra)
  if targets is not None:
    b, t = tokens.shape
    if logits.shape[:2] != (b, t) or logits.ndim != 3:
      raise ValueError(f"prefill_step(targets=...): {type(model).__name__}.forward("
                       f"all_logits=True) returned logits of shape {logits.shape}, not "
                       f"[batch, T, vocab] = [{b}, {t}, vocab]")
    targets = jnp.asarray(targets, jnp.int32)
    if targets.shape != (b, t):
      raise ValueError(f"prefill_step: targets of shape {targets.shape}, tokens {(b, t)}")
    every, logits = logits, last_token(logits, num_new)
    want = (targets >= 0) & (jnp.arange(t)[None, :] < num_new[:, None])
    target_lps = token_logprobs(every.reshape(b * t, -1),
                                jnp.where(want, targets, -1).reshape(-1)).reshape(b, t)
  nxt = _next_tokens(logits if penalties is None else penalties.apply(logits),
                     _token_keys(keys, key_index), temperature, top_k, top_p, min_p, all_greedy)
  if targets is not None:
    return cache, nxt, logits, status, target_lps
  return cache, nxt, logits, status


def prefill_prompts(params: Params, cache: PagedKVCache, prompts: Sequence[Sequence[int]],
                    seq_ids: np.ndarray, *, model: Model, chunk: int,
                    sampling: Sequence[SamplingParams] | None = None,
                    implementation: str | None = None, op: str = "prefill"):
  """Host loop: prefills each row's prompt into its (allocated) slot, ``chunk`` tokens a step.

  Rows past ``len(prompts)`` are padding (``seq_ids`` of ``-1``). Each row's first token is
  drawn from its last prompt logits with its :class:`SamplingParams` (key index 0, as the
  engine draws it; default greedy). Returns ``(cache, first_tokens int32[rows], last_logits
  float32[rows, vocab])`` as NumPy arrays; a failed step raises its named cache error.
  """
  rows, n = len(seq_ids), len(prompts)
  lens = np.asarray([len(p) for p in prompts] + [0] * (rows - n))
  sp = list(sampling or [SamplingParams()] * n) + [SamplingParams()] * (rows - n)
  temperature = np.asarray([s.temperature for s in sp], np.float32)
  top_k = np.asarray([s.top_k for s in sp], np.int32)
  top_p = np.asarray([s.top_p for s in sp], np.float32)
  min_p = np.asarray([s.min_p for s in sp], np.float32)
  keys = np.stack([make_key(s.seed) for s in sp])
  first = np.zeros(rows, np.int32)
  last = np.zeros((rows, model.vocab_size), np.float32)
  for start in range(0, int(lens.max(initial=0)), chunk):
    toks = np.zeros((rows, chunk), np.int32)
    for i, p in enumerate(prompts):
      part = p[start:start + chunk]
      toks[i, :len(part)] = part
    num = np.clip(lens - start, 0, chunk).astype(np.int32)
    cache, nxt, logits, status = prefill_step(
        params, cache, toks, np.where(num > 0, seq_ids, -1), num, temperature, top_k, top_p,
        keys, np.zeros(rows, np.int32), model=model, implementation=implementation,
        all_greedy=not np.any(temperature > 0), min_p=min_p)
    raise_for_status(status, seq_ids, op=op)
    ends = (start < lens) & (lens <= start + chunk)
    first[ends] = np.asarray(nxt)[ends]
    last[ends] = np.asarray(logits)[ends]
  return cache, first, last


@backend_jit(static_argnames=_JIT_STATIC, donate_argnames=("cache",))
def decode_step(params: Params, cache: PagedKVCache, tokens: Array, seq_ids: Array, *,
                model: Model | None = None, config: Model | None = None,
                implementation: str | None = None, max_blocks: int | None = None):
  """One decode step: appends ``tokens[b]`` to each row's sequence and returns the next logits.

  Args:
    params: model parameters.
    cache: the cache (donated).
    tokens: ``int32[batch]``, one new token per row.
    seq_ids: ``int32[batch]`` active slots (negative: padding).
    model, config, implementation, max_blocks: static, as for :func:`prefill_step`.

  Returns:
    ``(cache, logits float32[batch, vocab], status int32[batch])``.
  """
  model = resolve_model(model, config)
  check_cache_fits(model, cache.config)  # at trace time, for any protocol model
  num_new = jnp.ones(jnp.shape(seq_ids), jnp.int32)
  return model.forward(params, cache, tokens[:, None], seq_ids, num_new,
                       implementation=implementation, max_blocks=max_blocks)


@backend_jit(static_argnames=(*_JIT_STATIC, "max_steps", "evict", "all_greedy",
                              "return_logprobs", "top_logprobs"), donate_argnames=("cache",))
def decode_loop(params: Params, cache: PagedKVCache, state: DecodeState, num_steps, *,
                max_steps: int, model: Model | None = None, config: Model | None = None,
                implementation: str | None = None, max_blocks: int | None = None,
                evict: tuple[int, int] | None = None, all_greedy: bool = False,
                return_logprobs: bool = False, top_logprobs: int = 0):
  """Up to ``num_steps`` decode steps inside one ``jit`` (a ``lax.while_loop``).

  Each step appends every live row's last token to the cache, runs the model and samples the
  next token. A row is done after a stop token or ``max_new_tokens``; done rows are treated as
  padding (nothing written, nothing read). The loop ends after ``num_steps`` steps, when every
  row is done, or when a step fails: then that step is not applied (the cache is as after the
  previous step) and ``status`` says why (e.g. ``POOL_EXHAUSTED``, ``SEQUENCE_TOO_LONG``).

  Args:
    params: model parameters.
    cache: the cache (donated).
    state: the :class:`DecodeState`.
    num_steps: ``int32[]``, at most ``max_steps`` (may be traced: one compilation serves all).
    max_steps: static size of the output buffer.
    model: the model (static; :class:`~jax_paged_kv.models.base.Model`).
    config: earlier name of ``model``.
    implementation: paged attention implementation (static).
    max_blocks: static bound on block-table columns read (XLA attention); every row's length
      must stay ``<= max_blocks * block_size`` for the steps taken.
    evict: static ``(window, sink_tokens)`` or None: after every step, free each row's blocks
      outside the last ``window`` positions except those holding its first ``sink_tokens``
      tokens (:func:`~jax_paged_kv.free_outside_window`), so a row holds ``O(window)`` blocks.
      Exact for a model whose every layer attends within ``window`` (a sliding-window model,
      ``sink_tokens=0``); for other models it is StreamingLLM's token eviction (attention
      sinks), an approximation (``benchmarks/streaming.py`` measures it).
    all_greedy: static, as for :func:`prefill_step`.
    return_logprobs: static; also return each generated token's :func:`token_logprobs`.
    top_logprobs: static; with ``return_logprobs``, also return each step's
      :func:`top_token_logprobs` (that many per row).

  Returns:
    ``(cache, state, out_tokens int32[batch, max_steps], steps int32[], status int32[batch])``:
    ``out_tokens[b, s]`` is the token row ``b`` generated at step ``s`` or ``-1``; ``steps`` is
    the number of steps applied; ``status`` is the failing step's (zeros if none failed). With
    ``return_logprobs`` a sixth element, ``float32[batch, max_steps]``: the log-probability of
    ``out_tokens[b, s]`` (NaN where it is ``-1``). With ``top_logprobs`` a seventh and eighth,
    ``int32[batch, max_steps, top_logprobs]`` and ``float32[...]``: the most likely tokens
    at the position of ``out_tokens[b, s]`` and their log-probabilities (``-1`` and NaN where
    it is ``-1``).
  """
  model = resolve_model(model, config)
  check_cache_fits(model, cache.config)  # at trace time, for any protocol model
  if top_logprobs and not return_logprobs:
    raise ValueError(f"decode_loop: top_logprobs={top_logprobs} needs return_logprobs=True")
  b = state.seq_ids.shape[0]
  num_steps = jnp.minimum(jnp.asarray(num_steps, jnp.int32), max_steps)
  state = state.replace(done=state.done | (state.seq_ids < 0)
                        | (state.num_generated >= state.max_new_tokens))
  out = jnp.full((b, max_steps), -1, jnp.int32)
  # The logprob buffers only exist when asked for: the default program is unchanged. Each is
  # filled at a step with token_scores' matching part, or with its empty value.
  empty = (jnp.nan, -1, jnp.nan)
  lps = ()
  if return_logprobs:
    lps = (jnp.full((b, max_steps), jnp.nan, jnp.float32),)
  if top_logprobs:
    lps += tuple(jnp.full((b, max_steps, top_logprobs), e, d)
                 for e, d in zip(empty[1:], (jnp.int32, jnp.float32), strict=True))
  status0 = jnp.zeros((b,), jnp.int32)

  def cond(carry):
    _, st, _, _, step, status = carry
    return (step < num_steps) & ~jnp.all(st.done) & jnp.all(status == 0)

  def body(carry):
    cache, st, out, lps, step, _ = carry
    live = ~st.done
    ids = jnp.where(live, st.seq_ids, -1)
    new_cache, logits, status = model.forward(params, cache, st.tokens[:, None], ids,
                                              live.astype(jnp.int32),
                                              implementation=implementation,
                                              max_blocks=max_blocks)
    ok = jnp.all(status == 0)
    nxt = _next_tokens(logits if st.penalties is None else st.penalties.apply(logits),
                       _token_keys(st.keys, st.num_generated), st.temperature, st.top_k,
                       st.top_p, st.min_p, all_greedy)
    take = live & ok
    if st.penalties is not None:
      st = st.replace(penalties=st.penalties.update(nxt, take))
    gen = st.num_generated + take.astype(jnp.int32)
    stop = jnp.any(nxt[:, None] == st.stop_tokens, axis=1)
    done = st.done | (take & (stop | (gen >= st.max_new_tokens)))
    st = st.replace(tokens=jnp.where(take, nxt, st.tokens), num_generated=gen, done=done)
    out = out.at[:, step].set(jnp.where(take, nxt, -1))
    if lps:
      lps = tuple(buf.at[:, step].set(jnp.where(take.reshape((b,) + (1,) * (x.ndim - 1)), x, e))
                  for buf, x, e in zip(lps, token_scores(logits, nxt, top_logprobs), empty,
                                       strict=False))
    if evict is not None:  # the step's attention is done: drop what no later query sees
      new_cache, _, _ = free_outside_window(new_cache, jnp.where(ok, st.seq_ids, -1),
                                            window=evict[0], sink_tokens=evict[1])
    # On failure forward already returned the cache unchanged (but for telemetry).
    return new_cache, st, out, lps, step + ok.astype(jnp.int32), status

  cache, state, out, lps, steps, status = jax.lax.while_loop(
      cond, body, (cache, state, out, lps, jnp.zeros((), jnp.int32), status0))
  return cache, state, out, steps, status, *lps
