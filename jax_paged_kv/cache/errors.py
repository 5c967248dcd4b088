"""Status codes (inside ``jit``) and the named exceptions they map to (eager calls).

Every cache update returns ``(cache, status)``. ``status`` is an ``int32`` array, one code per
batch row (a scalar for single-sequence ops such as ``fork_sequence``). ``0`` means OK. When any
row fails, the *whole* update is rejected and the returned cache is bitwise equal to the input.
Rows that did nothing wrong but were rejected because another row failed carry ``0``; the pool
running dry is reported on every row that asked for a block, and only when every row is
otherwise valid (a batch with a bad row reports that row's code; its healthy rows carry ``0``
whatever the pool holds).

Called eagerly (no tracer among the arguments), the public functions validate first and raise the
exception below for the first failing row, leaving the caller's cache untouched (and not donated).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class Status(enum.IntEnum):
  """Per-row status codes returned by cache updates."""

  OK = 0
  POOL_EXHAUSTED = 1  # not enough free blocks for the whole batch
  INVALID_SLOT = 2  # sequence id >= max_seqs
  INACTIVE_SLOT = 3  # sequence slot is not active (never allocated or already freed)
  SEQUENCE_TOO_LONG = 4  # the append would exceed max_seq_len
  SLOT_IN_USE = 5  # allocating or forking into a slot that is already active
  DUPLICATE_SLOT = 6  # the same sequence id appears twice in one batch
  INVALID_COUNT = 7  # negative token count, more than the row holds, or truncating too much
  INVALID_LAYER = 8  # layer index outside [0, num_layers)
  INVALID_TOKEN_SLOT = 9  # write_kv: a token slot that no active row reserved
  FREED_BLOCK = 10  # truncating into a block freed by free_outside_window
  INVALID_TOKEN = 11  # a model step: a token id outside [0, vocab_size)


class PagedKVCacheError(Exception):
  """Base class of every error the cache raises for bad input.

  Attributes:
    status: the :class:`Status` code.
    row: the batch row that failed (``None`` for whole-call errors).
    seq_id: the sequence slot that row targeted (``None`` if not applicable).
  """

  def __init__(self, message: str, status: Status = Status.OK, row: int | None = None,
               seq_id: int | None = None):
    super().__init__(message)
    self.status = status
    self.row = row
    self.seq_id = seq_id


class PoolExhaustedError(PagedKVCacheError):
  """The free list has fewer blocks than the batch needs."""


class InvalidSlotError(PagedKVCacheError, IndexError):
  """A sequence id outside ``[0, max_seqs)``."""


class InactiveSlotError(PagedKVCacheError):
  """A sequence slot that is not active (never allocated, or freed)."""


class SequenceTooLongError(PagedKVCacheError):
  """An append would take a sequence past ``max_seq_len``."""


class SlotInUseError(PagedKVCacheError):
  """Allocating or forking into a slot that is already active."""


class DuplicateSlotError(PagedKVCacheError):
  """The same sequence id appears twice in one batch."""


class InvalidCountError(PagedKVCacheError, ValueError):
  """A token count that is negative, larger than the row holds, or a truncation past zero."""


class InvalidLayerError(PagedKVCacheError, IndexError):
  """A layer index outside ``[0, num_layers)``."""


class InvalidTokenSlotError(PagedKVCacheError, IndexError):
  """``write_kv`` was given a token slot that is not a reserved slot of an active sequence."""


class CacheInvariantError(PagedKVCacheError):
  """Checking mode only: an update left a cache invariant broken (a library bug; please report)."""


class InvalidTokenError(PagedKVCacheError, ValueError):
  """A model step was given a token id outside ``[0, vocab_size)`` (it was never clamped)."""


class FreedBlockError(PagedKVCacheError, ValueError):
  """The operation needs a block that :func:`~jax_paged_kv.free_outside_window` freed."""


class CacheShapeError(PagedKVCacheError, ValueError):
  """An argument has the wrong shape or dtype (raised at trace time)."""


_EXCEPTIONS: dict[Status, type[PagedKVCacheError]] = {
    Status.POOL_EXHAUSTED: PoolExhaustedError,
    Status.INVALID_SLOT: InvalidSlotError,
    Status.INACTIVE_SLOT: InactiveSlotError,
    Status.SEQUENCE_TOO_LONG: SequenceTooLongError,
    Status.SLOT_IN_USE: SlotInUseError,
    Status.DUPLICATE_SLOT: DuplicateSlotError,
    Status.INVALID_COUNT: InvalidCountError,
    Status.INVALID_LAYER: InvalidLayerError,
    Status.INVALID_TOKEN_SLOT: InvalidTokenSlotError,
    Status.FREED_BLOCK: FreedBlockError,
    Status.INVALID_TOKEN: InvalidTokenError,
}

_MESSAGES: dict[Status, str] = {
    Status.POOL_EXHAUSTED: "the block pool is exhausted: the batch needs more blocks than are free",
    Status.INVALID_SLOT: "sequence id is outside [0, max_seqs)",
    Status.INACTIVE_SLOT: "sequence slot is not active (allocate it first, or it was freed)",
    Status.SEQUENCE_TOO_LONG: "the sequence would exceed max_seq_len",
    Status.SLOT_IN_USE: "the target slot is already active",
    Status.DUPLICATE_SLOT: "the same sequence id appears more than once in the batch",
    Status.INVALID_COUNT: "invalid token count (negative, larger than the row holds, or more "
                          "than the sequence length)",
    Status.INVALID_LAYER: "layer index is outside [0, num_layers)",
    Status.INVALID_TOKEN_SLOT: "a token slot is not a reserved slot of an active sequence (pass "
                               "the slots reserve() returned)",
    Status.FREED_BLOCK: "the operation needs a block free_outside_window freed (its tokens "
                        "are gone: truncate less, or keep them with a larger window)",
    Status.INVALID_TOKEN: "a token id is outside [0, vocab_size) (nothing was written)",
}


def is_tracing(*args) -> bool:
  """True if any leaf of ``args`` is a tracer (we are inside jit/vmap/scan/...)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args))


# A context maps a status code to extra detail for its message: ``(fmt, values)`` where
# ``values(row)`` returns the named values (arrays or numbers) that ``fmt`` formats. The same
# callable serves eager calls (``row`` an int, values read back) and checking mode (``row`` traced,
# values formatted by ``checkify``), so both raise the same message.
Context = Mapping[Status, tuple[str, Callable[[Any], Mapping[str, Any]]]]


def _where(with_ids: bool) -> str:
  return " (row {row}, sequence {seq_id})" if with_ids else ""


def _plain(x):
  x = np.asarray(x)
  return x.item() if x.ndim == 0 else x


def raise_for_status(status, seq_ids=None, *, op: str = "cache update",
                     context: Context | None = None) -> None:
  """Raises the named exception for the first failing row of a concrete ``status``.

  Args:
    status: int32 status codes, a scalar or one per row.
    seq_ids: the sequence ids of the rows (for the message), same shape as ``status``.
    op: name of the operation, for the message.
    context: optional ``{Status: (fmt, values)}`` adding detail to the message (see
      :data:`Context`).
  """
  codes = np.atleast_1d(np.asarray(status))
  bad = np.flatnonzero(codes)
  if bad.size == 0:
    return
  row = int(bad[0])
  code = Status(int(codes[row]))
  ids = None if seq_ids is None else np.atleast_1d(np.asarray(seq_ids))
  seq_id = None if ids is None else int(ids[row])
  fmt = f"{op}: {_MESSAGES[code]}{_where(ids is not None)}"
  values: dict[str, Any] = {"row": row, "seq_id": seq_id}
  if context and code in context:
    detail_fmt, detail = context[code]
    fmt += ": " + detail_fmt
    values.update({k: _plain(v) for k, v in detail(row).items()})
  raise _EXCEPTIONS[code](fmt.format(**values), status=code, row=row, seq_id=seq_id)


# ---------------------------------------------------------------------------------------------
# checking mode


_CHECKING: contextvars.ContextVar[bool] = contextvars.ContextVar("jax_paged_kv_checking",
                                                                 default=False)


def checking_enabled() -> bool:
  """Whether :func:`checking` is on (read when a function is traced)."""
  return _CHECKING.get()


@contextlib.contextmanager
def checking(enabled: bool = True):
  """Checking mode: bad input and broken invariants raise from inside ``jit``.

  While active, every cache update traced inside a transformation adds ``checkify`` checks for
  its status (same messages as eager calls) and for every invariant of
  :func:`~jax_paged_kv.check_invariants`, and eager updates also check the invariants of the
  cache they return. The flag is read at *trace* time: functions traced before it was turned on
  keep their unchecked programs, so use :func:`checked`, which traces a fresh program.
  Checks are ``checkify`` *debug* checks: under plain ``jit`` (no ``checkify.checkify``) they are
  dropped, so nothing else changes. The default (off) adds no check and no host callback.
  """
  token = _CHECKING.set(bool(enabled))
  try:
    yield
  finally:
    _CHECKING.reset(token)


def check_status(status, seq_ids=None, *, op: str, context: Context | None = None) -> None:
  """Checking mode, traced: ``checkify`` checks that raise what :func:`raise_for_status` would."""
  from jax.experimental import checkify  # noqa: PLC0415  (only in checking mode)

  codes = jnp.atleast_1d(status)
  row = jnp.argmax(codes != 0)
  code = codes[row]
  ids = None if seq_ids is None else jnp.atleast_1d(seq_ids)
  for c in _EXCEPTIONS:
    fmt = f"{op}: {_MESSAGES[c]}{_where(ids is not None)}"
    values = {"row": row} if ids is None else {"row": row, "seq_id": ids[row]}
    if context and c in context:
      detail_fmt, detail = context[c]
      fmt += ": " + detail_fmt
      values.update({k: jnp.asarray(v) for k, v in detail(row).items()})
    checkify.check(code != c, fmt, debug=True, **values)


def check_report(report, *, op: str) -> None:
  """Checking mode, traced: one ``checkify`` check per invariant of an ``InvariantReport``."""
  from jax.experimental import checkify  # noqa: PLC0415

  for name, value in vars(report).items():
    checkify.check(value, f"{op}: cache invariant {name!r} does not hold", debug=True)


def raise_for_report(report, *, op: str) -> None:
  """Eager checking mode: raises :class:`CacheInvariantError` if an invariant does not hold."""
  broken = report.failures()
  if broken:
    raise CacheInvariantError(f"{op}: cache invariant {broken[0]!r} does not hold")


def checked(fn: Callable) -> Callable:
  """Wraps ``fn`` (a function of caches and arrays) to run jitted in checking mode.

  Returns a function with ``fn``'s signature that traces ``fn`` under :func:`checking`, compiles
  it with ``checkify``, runs it, and raises the same named exception (and message) an eager call
  would raise for the first failing check. Its outputs are ``fn``'s outputs. Static arguments are
  not supported: close over them. It is the outermost transform (it raises on the host): wrap
  ``jax.vmap(fn)``, not the other way round; called on traced values it raises ``TypeError``.
  """
  from jax.experimental import checkify  # noqa: PLC0415

  def traced(*args, **kwargs):
    with checking():
      return fn(*args, **kwargs)

  program = jax.jit(checkify.checkify(traced, errors=checkify.user_checks))

  @functools.wraps(fn)
  def run(*args, **kwargs):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves((args, kwargs))):
      raise TypeError(
          "pk.checked(fn) runs its own compiled program and raises on the host, so it cannot "
          "run inside jit / vmap / another transform: put the transform inside, e.g. "
          "pk.checked(jax.vmap(fn))")
    err, out = program(*args, **kwargs)
    msg = err.get()
    if msg is not None:
      raise error_from_message(msg.removesuffix(" (`check` failed)"))
    return out

  return run


def error_from_message(msg: str) -> PagedKVCacheError:
  """The named exception whose message is ``msg`` (checking mode's failed check)."""
  match = re.search(r" \(row (\d+), sequence (-?\d+)\)", msg)
  row, seq_id = (int(match[1]), int(match[2])) if match else (None, None)
  for code, text in _MESSAGES.items():
    if text in msg:
      return _EXCEPTIONS[code](msg, status=code, row=row, seq_id=seq_id)
  if "cache invariant" in msg:
    return CacheInvariantError(msg)
  return PagedKVCacheError(msg)
