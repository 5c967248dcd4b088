"""Status codes (inside ``jit``) and the named exceptions they map to (eager calls).

Every cache update returns ``(cache, status)``. ``status`` is an ``int32`` array, one code per
batch row (a scalar for single-sequence ops such as ``fork_sequence``). ``0`` means OK. When any
row fails, the *whole* update is rejected and the returned cache is bitwise equal to the input.
Rows that did nothing wrong but were rejected because another row failed carry ``0``; the pool
running dry is reported on every row that asked for a block.

Called eagerly (no tracer among the arguments), the public functions validate first and raise the
exception below for the first failing row, leaving the caller's cache untouched (and not donated).
"""

from __future__ import annotations

import enum

import jax
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
}


def is_tracing(*args) -> bool:
  """True if any leaf of ``args`` is a tracer (we are inside jit/vmap/scan/...)."""
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args))


def raise_for_status(status, seq_ids=None, *, op: str = "cache update", context=None) -> None:
  """Raises the named exception for the first failing row of a concrete ``status``.

  Args:
    status: int32 status codes, a scalar or one per row.
    seq_ids: the sequence ids of the rows (for the message), same shape as ``status``.
    op: name of the operation, for the message.
    context: optional ``{Status: callable(row) -> str}`` adding detail to the message.
  """
  codes = np.atleast_1d(np.asarray(status))
  bad = np.flatnonzero(codes)
  if bad.size == 0:
    return
  row = int(bad[0])
  code = Status(int(codes[row]))
  ids = None if seq_ids is None else np.atleast_1d(np.asarray(seq_ids))
  seq_id = None if ids is None else int(ids[row])
  where = f" (row {row}, sequence {seq_id})" if seq_id is not None else ""
  detail = ""
  if context and code in context:
    detail = f": {context[code](row)}"
  msg = f"{op}: {_MESSAGES[code]}{where}{detail}"
  raise _EXCEPTIONS[code](msg, status=code, row=row, seq_id=seq_id)
