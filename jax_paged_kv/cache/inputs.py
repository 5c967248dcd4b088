"""The boundary: ids, counts and layer indices as a caller may pass them, made ``int32``.

Every public entry point converts its integer arguments here, *before* any cast, so that no value
can alias another: an ``int64`` id ``2**32 + 1`` must not become slot 1, a ``uint32`` ``2**32 - 1``
must not become the padding id ``-1``, and ``layer=1.7`` must not become layer 1.

* Concrete inputs (Python ints, lists, NumPy arrays, concrete ``jax.Array``\\ s) are checked on the
  host: a bool, float, complex or non-numeric value raises
  :class:`~jax_paged_kv.cache.errors.CacheShapeError`; a value that does not fit in ``int32`` raises
  the named error of the argument (:class:`~jax_paged_kv.cache.errors.InvalidSlotError` for ids,
  :class:`~jax_paged_kv.cache.errors.InvalidCountError` for counts,
  :class:`~jax_paged_kv.cache.errors.InvalidLayerError` for layers), naming the entry.
* Traced inputs (inside ``jit``) must have an integer dtype (checked at trace time). ``int32`` is
  used as it is; a wider or unsigned dtype is narrowed with every value outside ``int32`` mapped
  to one that the op rejects with a status (an id ``>= max_seqs``, a count ``-1``, a layer
  ``-1``), never to a value that names something else.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from jax_paged_kv.cache.errors import (
    CacheShapeError,
    InvalidCountError,
    InvalidLayerError,
    InvalidSlotError,
    PagedKVCacheError,
    Status,
)

INT32_MIN, INT32_MAX = int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max)

# kind -> (error raised for a concrete out-of-int32 value, its status, the int32 value a traced
# out-of-range value becomes: one that every op rejects).
_KINDS: dict[str, tuple[type[PagedKVCacheError], Status, int]] = {
    "ids": (InvalidSlotError, Status.INVALID_SLOT, INT32_MAX),
    "counts": (InvalidCountError, Status.INVALID_COUNT, -1),
    "layer": (InvalidLayerError, Status.INVALID_LAYER, -1),
}


def _is_int_dtype(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.integer) and dtype != jnp.bool_


def _host_ints(x, name: str) -> np.ndarray:
  """A NumPy integer (or object-of-int) array of concrete ``x``; rejects non-integers."""
  try:
    a = np.asarray(x)
  except (TypeError, ValueError) as e:  # ragged lists and the like
    raise CacheShapeError(f"{name} must be integers, got {x!r}") from e
  if a.size == 0 and not isinstance(x, (np.ndarray, np.generic, jax.Array)):
    return a.astype(np.int32)  # an empty Python list is an empty batch (NumPy calls it float)
  if isinstance(x, (list, tuple)) and any(
      isinstance(v, (bool, np.bool_)) for v in np.asarray(x, dtype=object).reshape(-1).tolist()):
    # NumPy promotes [0, True] to int64: a bool among ints would silently become 1.
    raise CacheShapeError(f"{name} must be integers, got a bool in {x!r}")
  if a.dtype == object:
    flat = a.reshape(-1).tolist()
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in flat):
      raise CacheShapeError(f"{name} must be integers, got {x!r}")
    return a
  if not _is_int_dtype(a.dtype):
    raise CacheShapeError(f"{name} must have an integer dtype, got {a.dtype} ({x!r}); floats "
                          "and bools are not truncated")
  return a


def to_int32(x, name: str, kind: str) -> Array:
  """``x`` as an ``int32`` array of the same shape, range-checked before the cast.

  Args:
    x: a Python int or sequence, a NumPy array, or a (possibly traced) ``jax.Array``.
    name: the argument's name, for messages.
    kind: ``"ids"``, ``"counts"`` or ``"layer"``: picks the error and the traced fallback.

  Raises:
    CacheShapeError: a non-integer value or dtype.
    InvalidSlotError, InvalidCountError, InvalidLayerError: a concrete value outside ``int32``.
  """
  error, status, fallback = _KINDS[kind]
  if isinstance(x, jax.core.Tracer):
    if not _is_int_dtype(x.dtype):
      raise CacheShapeError(f"{name} must have an integer dtype, got {x.dtype}")
    if x.dtype == jnp.int32:
      return x
    info = jnp.iinfo(x.dtype)
    bad = jnp.zeros(x.shape, bool)
    if info.max > INT32_MAX:
      bad = bad | (x > INT32_MAX)
    if info.min < INT32_MIN:
      bad = bad | (x < INT32_MIN)
    return jnp.where(bad, fallback, x.astype(jnp.int32))
  a = _host_ints(x, name)
  flat = a.reshape(-1)
  if a.dtype == object:
    out_of_range = np.asarray([not INT32_MIN <= int(v) <= INT32_MAX for v in flat.tolist()],
                              bool)
  else:
    info = np.iinfo(a.dtype)
    out_of_range = np.zeros(flat.shape, bool)
    if info.max > INT32_MAX:
      out_of_range |= flat > INT32_MAX
    if info.min < INT32_MIN:
      out_of_range |= flat < INT32_MIN
  if out_of_range.any():
    i = int(np.flatnonzero(out_of_range)[0])
    value = int(flat.tolist()[i])
    where = f"{name}[{i}]" if a.ndim else name
    raise error(f"{where}={value} does not fit in int32 and cannot name anything",
                status=status, row=i if a.ndim else None,
                seq_id=value if kind == "ids" else None)
  return jnp.asarray(a.astype(np.int32))


def as_ids(x, name: str = "seq_ids") -> Array:
  """Sequence ids as ``int32[batch]`` (a scalar becomes one row)."""
  ids = to_int32(x, name, "ids")
  if ids.ndim > 1:
    raise CacheShapeError(f"{name} must be a scalar or 1-D array of sequence ids, got shape "
                          f"{ids.shape}")
  return jnp.atleast_1d(ids)


def as_counts(x, batch: int, name: str) -> Array:
  """Token counts as ``int32[batch]`` (a scalar is broadcast)."""
  counts = to_int32(x, name, "counts")
  if counts.ndim == 0:
    counts = jnp.broadcast_to(counts, (batch,))
  if counts.shape != (batch,):
    raise CacheShapeError(f"{name} must be a scalar or have shape ({batch},), got "
                          f"{counts.shape}")
  return counts


def as_layer(x, name: str = "layer") -> Array:
  """A layer index as ``int32[]`` (its range is each op's check: a status, or an eager error)."""
  layer = to_int32(x, name, "layer")
  if layer.ndim:
    raise CacheShapeError(f"{name} must be a scalar, got shape {layer.shape}")
  return layer


def is_concrete(*args) -> bool:
  """No leaf of ``args`` is a tracer."""
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args))
