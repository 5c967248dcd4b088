"""The model protocol: all that the serving layer (decoding loop, engine, export) asks of a model.

A *model* is a frozen, hashable object (it rides along as a static argument of the jitted steps,
so equal models share compilations) with five attributes and one pure function::

    vocab_size                                   # logits are [batch, vocab_size]
    num_layers, num_kv_heads, head_dim, dtype    # the cache geometry the model needs
    forward(params, cache, tokens, seq_ids, num_new, *, implementation=None, max_blocks=None)
        -> (cache, logits, status)

Like optax's ``GradientTransformation`` it is small and pure: ``forward`` takes the parameter
pytree and the cache and returns a new cache, it holds no state of its own. One call is one step
for a batch of rows: reserve room for row ``b``'s ``num_new[b]`` new tokens once
(:func:`~jax_paged_kv.reserve`), then per layer write the new keys and values
(:func:`~jax_paged_kv.write_kv`) and attend (:func:`~jax_paged_kv.paged_attention`). Its contract:

* ``tokens``: ``int32[batch, T]``; row ``b`` uses ``tokens[b, :num_new[b]]``.
* ``seq_ids``: ``int32[batch]`` sequence slots; a negative id is a padding row (nothing written).
* ``num_new``: ``int32[batch]`` in ``[0, T]``.
* ``implementation``: static, passed on to :func:`~jax_paged_kv.paged_attention`.
* ``max_blocks``: static hint: every row's length after the step is at most
  ``max_blocks * block_size``, so attention may read only that many block-table columns (pass
  :func:`attention_knobs` on to :func:`~jax_paged_kv.paged_attention`); ignoring it is correct.
* returns the new cache, ``float32[batch, vocab_size]`` logits at each row's last new token, and
  ``reserve``'s ``int32[batch]`` status. If any row fails, ``reserve`` rejects the whole update
  and returns only out-of-range slots, so a model that writes through those slots leaves the
  cache unchanged (but for its telemetry counters).

:class:`~jax_paged_kv.models.llama.LlamaConfig` and
:class:`~jax_paged_kv.models.gemma2.Gemma2Config` implement it; so can any user model (see the
README, "Plugging the cache into your own model"). The helpers below are what the bundled models
use to implement it: :func:`begin_step`, :func:`scan_layers`, :func:`last_token`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jax_paged_kv.attention import default_implementation
from jax_paged_kv.cache.config import CacheConfig, CacheStrategy
from jax_paged_kv.cache.errors import CacheShapeError, Status
from jax_paged_kv.cache.ops import gather_tables, reserve
from jax_paged_kv.cache.state import PagedKVCache

_GEOMETRY = ("num_layers", "num_kv_heads", "head_dim", "dtype")
LAYER_TYPES = ("full_attention", "sliding_attention")


@runtime_checkable
class Model(Protocol):
  """A decoder that keeps its keys and values in the paged cache (see the module docstring).

  Attributes:
    vocab_size: tokens in the vocabulary (prompts are checked against it).
    num_layers: layers the cache must hold.
    num_kv_heads: key/value heads per layer.
    head_dim: size of one head.
    dtype: dtype of the cache pools the model writes.
  """

  vocab_size: int
  num_layers: int
  num_kv_heads: int
  head_dim: int
  dtype: Any

  def forward(self, params: Any, cache: PagedKVCache, tokens: Array, seq_ids: Array,
              num_new: Array, *, implementation: str | None = None,
              max_blocks: int | None = None) -> tuple[PagedKVCache, Array, Array]:
    """One step: ``(cache, float32[batch, vocab_size] logits, int32[batch] status)``."""
    ...


def check_model(model: Any) -> Model:
  """Returns ``model`` if it implements :class:`Model`, else raises ``TypeError`` saying why."""
  missing = [n for n in ("vocab_size", *_GEOMETRY, "forward") if not hasattr(model, n)]
  if missing:
    raise TypeError(f"{type(model).__name__} does not implement the Model protocol: it has no "
                    f"{', '.join(missing)} (see jax_paged_kv.models.base)")
  if not callable(model.forward):
    raise TypeError(f"{type(model).__name__}.forward must be callable")
  try:
    hash(model)
  except TypeError as e:
    raise TypeError(f"a model is a static jit argument and must be hashable (e.g. a frozen "
                    f"dataclass): {e}") from e
  return model


def check_cache_fits(model: Model, cache_config: CacheConfig) -> None:
  """Raises :class:`~jax_paged_kv.CacheShapeError` unless the cache has the model's geometry."""
  cc = cache_config
  got = (cc.num_layers, cc.num_kv_heads, cc.head_dim, jnp.dtype(cc.dtype))
  want = (model.num_layers, model.num_kv_heads, model.head_dim, jnp.dtype(model.dtype))
  if got != want:
    raise CacheShapeError(
        f"cache (num_layers, num_kv_heads, head_dim, dtype)={got} does not fit the model's "
        f"{want}")


def cache_config_for(model: Model, *, num_blocks: int | None = None, max_seqs: int,
                     max_seq_len: int, block_size: int = 16, budget_bytes: int | None = None,
                     strategy: CacheStrategy = CacheStrategy.PAGED) -> CacheConfig:
  """A :class:`~jax_paged_kv.CacheConfig` with the model's layers, kv heads, head_dim and dtype.

  Give either ``num_blocks`` or ``budget_bytes`` (then
  :meth:`~jax_paged_kv.CacheConfig.from_memory_budget` sizes the pool; for ``CONTIGUOUS``
  ``max_seqs`` is capped at the slabs that fit).
  """
  common = dict(num_layers=model.num_layers, num_kv_heads=model.num_kv_heads,
                head_dim=model.head_dim, max_seq_len=max_seq_len, block_size=block_size,
                dtype=model.dtype)
  if budget_bytes is not None:
    strategy = CacheStrategy(strategy)
    if strategy is CacheStrategy.CONTIGUOUS:
      probe = CacheConfig(num_blocks=2, max_seqs=1, **common)
      fit = (budget_bytes // probe.block_bytes - 1) // probe.max_blocks_per_seq
      max_seqs = min(max_seqs, max(fit, 1))
    return CacheConfig.from_memory_budget(budget_bytes, max_seqs=max_seqs, strategy=strategy,
                                          **common)
  if num_blocks is None:
    raise ValueError("give num_blocks or budget_bytes")
  return CacheConfig(num_blocks=num_blocks, max_seqs=max_seqs, strategy=strategy, **common)


def attention_knobs(implementation: str | None, max_blocks: int | None,
                    cache_config: CacheConfig | None = None) -> dict[str, Any]:
  """Keyword knobs for :func:`~jax_paged_kv.paged_attention`: ``max_blocks`` reaches only the
  XLA path (the kernels skip pages past each row's length by themselves)."""
  name = implementation or default_implementation(config=cache_config)
  return {"max_blocks": int(max_blocks)} if (max_blocks and name == "xla") else {}


# ---------------------------------------------------------------------------------------------
# helpers for the bundled models' configs


def check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
  """Casts ``config``'s fields ``names`` to int, raising ``ValueError`` unless they are >= 1."""
  for name in names:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{type(config).__name__}.{name} must be a positive int, got "
                       f"{name}={value!r}")
    object.__setattr__(config, name, int(value))


def check_windows(config: Any) -> None:
  """Validates ``sliding_window`` / ``layer_types`` of a config (as Hugging Face spells them)."""
  c = config
  if c.sliding_window is not None:
    w = c.sliding_window
    if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1:
      raise ValueError(f"sliding_window must be a positive int or None, got {c.sliding_window!r}")
    object.__setattr__(c, "sliding_window", int(c.sliding_window))
  if c.layer_types is not None:
    types = tuple(c.layer_types)
    if len(types) != c.num_layers or not set(types) <= set(LAYER_TYPES):
      raise ValueError(f"layer_types must name {c.num_layers} layers, each one of "
                       f"{LAYER_TYPES}, got {types}")
    if "sliding_attention" in types and c.sliding_window is None:
      raise ValueError("layer_types has sliding_attention layers but sliding_window is None")
    object.__setattr__(c, "layer_types", types)


def layer_windows(config: Any) -> tuple[int | None, ...]:
  """Each layer's sliding window (None: global attention)."""
  c = config
  if c.sliding_window is None:
    return (None,) * c.num_layers
  if c.layer_types is None:
    return (c.sliding_window,) * c.num_layers
  return tuple(c.sliding_window if t == "sliding_attention" else None for t in c.layer_types)


def check_param_tree(want: Any, params: Any) -> None:
  """Raises ``ValueError`` naming the first leaf of ``params`` missing from ``want`` (a tree of
  ``jax.ShapeDtypeStruct``), absent from it, or of another shape or dtype."""
  flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  flat_have = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  for path in sorted(flat_want.keys() | flat_have.keys(), key=jax.tree_util.keystr):
    name = jax.tree_util.keystr(path)
    if path not in flat_have:
      raise ValueError(f"parameter {name} is missing")
    if path not in flat_want:
      raise ValueError(f"unexpected parameter {name}")
    w, h = flat_want[path], flat_have[path]
    if tuple(h.shape) != tuple(w.shape) or jnp.dtype(h.dtype) != jnp.dtype(w.dtype):
      raise ValueError(f"parameter {name} is {jnp.dtype(h.dtype)}{list(h.shape)}, expected "
                       f"{jnp.dtype(w.dtype)}{list(w.shape)}")


# ---------------------------------------------------------------------------------------------
# helpers for implementing forward


@dataclasses.dataclass(frozen=True)
class Step:
  """What :func:`begin_step` prepared for one step (arrays; ``batch`` rows, ``T`` new tokens).

  Attributes:
    cache: the cache after ``reserve``.
    tokens: ``int32[batch, T]``.
    seq_ids: ``int32[batch]``.
    num_new: ``int32[batch]``.
    slots: ``int32[batch, T]`` physical slots for :func:`~jax_paged_kv.write_kv`.
    positions: ``int32[batch, T]`` absolute position of each new token.
    q_lens: ``int32[batch]`` queries to attend per row (0 for padding rows and failed steps).
    status: ``int32[batch]`` ``reserve``'s status.
  """

  cache: PagedKVCache
  tokens: Array
  seq_ids: Array
  num_new: Array
  slots: Array
  positions: Array
  q_lens: Array
  status: Array


def begin_step(model: Model, cache: PagedKVCache, tokens: Array, seq_ids: Array,
               num_new: Array | None, max_blocks: int | None = None) -> Step:
  """Validates a step's inputs against the model and reserves room for the new tokens.

  Args:
    model: the model (its geometry is checked against the cache).
    cache: the cache.
    tokens: ``int32[batch, T]``.
    seq_ids: ``int32[batch]``; negative: padding row.
    num_new: ``int32[batch]`` in ``[0, T]``, or None for ``T`` everywhere.
    max_blocks: static; the block-table columns attention will read. A row that would grow
      past ``max_blocks * block_size`` fails the step with ``SEQUENCE_TOO_LONG`` (attention
      could not see its later keys), and, as for any failing row, nothing is reserved.

  Returns:
    A :class:`Step`.

  Raises:
    CacheShapeError: the cache or the inputs do not fit the model (trace time).
  """
  check_cache_fits(model, cache.config)
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise CacheShapeError(f"tokens must be int32[batch, T], got {tokens.dtype}"
                          f"{list(tokens.shape)}")
  b, t = tokens.shape
  seq_ids = jnp.asarray(seq_ids, jnp.int32)
  if seq_ids.shape != (b,):
    raise CacheShapeError(f"seq_ids must have shape ({b},), got {seq_ids.shape}")
  num_new = jnp.full((b,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
  if num_new.shape != (b,):
    raise CacheShapeError(f"num_new must have shape ({b},), got {num_new.shape}")
  # Rows the step cannot run: a token id outside the vocabulary (never clamped to a real
  # one), or, with max_blocks, a length past the columns attention reads. Their count is set
  # past max_new, which fails reserve's row check, so nothing is reserved for any row.
  used = jnp.arange(t)[None, :] < num_new[:, None]
  bad_token = (seq_ids >= 0) & jnp.any(used & ((tokens < 0) | (tokens >= model.vocab_size)),
                                       axis=1)
  overlong = jnp.zeros_like(bad_token)
  if max_blocks is not None:
    _, old = gather_tables(cache, seq_ids)
    overlong = (seq_ids >= 0) & (num_new > max_blocks * cache.config.block_size - old)
  num_new = jnp.where(bad_token | overlong, t + 1, num_new)
  cache, slots, status = reserve(cache, seq_ids, num_new, max_new=t)  # slots [batch, T]
  status = jnp.where(overlong, Status.SEQUENCE_TOO_LONG, status)
  status = jnp.where(bad_token, Status.INVALID_TOKEN, status).astype(jnp.int32)
  ok = jnp.all(status == 0)
  _, lens = gather_tables(cache, seq_ids)  # [batch], lengths including the new tokens
  q_lens = jnp.where(ok & (seq_ids >= 0), num_new, 0)
  positions = (lens - q_lens)[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [batch, T]
  return Step(cache, tokens.astype(jnp.int32), seq_ids, num_new, slots, positions, q_lens,
              status)


def layer_period(windows: Sequence[Any]) -> int:
  """The smallest ``p`` with ``windows[i] == windows[i % p]`` for every layer ``i`` (the
  pattern may end part-way through a period: Gemma 3's 5 sliding + 1 global over 26 layers)."""
  n = len(windows)
  return next(p for p in range(1, n + 1) if all(windows[i] == windows[i % p] for i in range(n)))


def scan_layers(layer_fn: Callable[[Any, Any, Array, Any], Any], carry: Any, layers: Any,
                windows: Sequence[Any]) -> Any:
  """Runs ``layer_fn`` over the stacked layers in one ``lax.scan``, with a static per-layer option.

  Models whose layers differ in a static setting (e.g. Gemma 2 alternates sliding-window and
  global attention) still compile one loop body: the layers are scanned in groups of the
  pattern's period (:func:`layer_period`; 1 for uniform layers, 2 for alternating ones), and the
  body unrolls one group, so each layer sees its option as a Python value. Layers past the last
  whole group (a pattern ending part-way through a period) run after the scan, unrolled.

  Args:
    layer_fn: ``(carry, weights, layer, option) -> carry``; ``weights`` is one layer's slice of
      ``layers``, ``layer`` the ``int32[]`` layer index (traced inside the scan; for
      :func:`~jax_paged_kv.write_kv` and :func:`~jax_paged_kv.paged_attention`), ``option`` the
      layer's entry of ``windows``.
    carry: the loop carry (e.g. ``(x, cache)``).
    layers: pytree of arrays with a leading ``[layers]`` axis.
    windows: one static, comparable option per layer (e.g. its sliding window or None).

  Returns:
    The final carry.
  """
  n = len(windows)
  p = layer_period(windows)

  def run(carry, layer, option):
    # Index the stacked weights in place (a reshape to [n / p, p, ...] would make XLA copy
    # every weight on every call).
    one = jax.tree_util.tree_map(
        lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False), layers)
    return layer_fn(carry, one, layer, option)

  def body(carry, group):
    for j in range(p):
      carry = run(carry, group * p + j, windows[j])
    return carry, None

  carry, _ = jax.lax.scan(body, carry, jnp.arange(n // p, dtype=jnp.int32))
  for layer in range(n - n % p, n):
    carry = run(carry, jnp.int32(layer), windows[layer])
  return carry


def last_token(x: Array, num_new: Array) -> Array:
  """Each row's last new token: ``x [batch, T, ...]`` -> ``[batch, ...]`` at ``num_new - 1``."""
  t = x.shape[1]
  last = jnp.clip(num_new - 1, 0, t - 1).reshape((-1,) + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, last, axis=1)[:, 0]
