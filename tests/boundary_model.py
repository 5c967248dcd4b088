"""A plain-Python specification of the cache's API boundary, for the fuzz tests.

It knows a small starting state (which sequences exist, their token values, which physical block
holds what) and, for any argument a Python caller can produce, predicts what a call must do:
raise :class:`CacheShapeError` (wrong type, dtype or rank), raise the named range error (a value
that does not fit in ``int32``), or return these per-row status codes and, if they are all 0,
this new state. Nothing here imports the package's internals: only the public names.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import jax_paged_kv as pk
from jax_paged_kv import Status

I32_MIN, I32_MAX = -(2**31), 2**31 - 1

CFG = pk.CacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, num_blocks=10, max_seqs=4,
                     max_seq_len=16, block_size=4)


class BadType(Exception):
  """Expected: CacheShapeError."""


class OutOfInt32(Exception):
  """Expected: the argument's named range error."""


def ints(value, *, scalar_ok=True, one_d=True) -> list[int] | int:
  """The integer values of an argument, or BadType / OutOfInt32 as the package must raise."""
  if isinstance(value, bool | np.bool_ | float | complex):
    raise BadType
  if isinstance(value, int | np.integer):
    if not scalar_ok:
      raise BadType
    v = int(value)
    if not I32_MIN <= v <= I32_MAX:
      raise OutOfInt32
    return v
  a = np.asarray(value)
  if a.size == 0 and isinstance(value, list):
    return []
  if a.dtype == object:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in a.reshape(-1).tolist()):
      raise BadType
  elif a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
    raise BadType
  if a.ndim > (1 if one_d else 2):
    raise BadType
  vals = [int(v) for v in a.reshape(-1).tolist()]
  if any(not I32_MIN <= v <= I32_MAX for v in vals):
    raise OutOfInt32
  if a.ndim == 0:
    if not scalar_ok:
      raise BadType
    return vals[0]
  return vals if a.ndim == 1 else [vals[i:i + a.shape[1]] for i in range(0, a.size, a.shape[1])]


@dataclasses.dataclass
class State:
  """Token values per live sequence (``tokens[s][i]``: K of token ``i`` is that value in every
  layer/head/dim with the layer added; V is its negation) and the physical table entries."""

  tokens: dict[int, list[float]]
  blocks: dict[int, list[object]]  # abstract blocks, shared by forks (identity = sharing)

  def live_blocks(self) -> int:
    return len({id(b) for bl in self.blocks.values() for b in bl})

  def refcount(self, block) -> int:
    return sum(b is block for bl in self.blocks.values() for b in bl)

  def clone(self) -> State:
    memo = {}
    return State({s: list(t) for s, t in self.tokens.items()},
                 {s: [memo.setdefault(id(b), b) for b in bl] for s, bl in self.blocks.items()})

  def free_blocks(self) -> int:
    return CFG.usable_blocks - self.live_blocks()


def row_status(state: State, ids: list[int], *, want_active=True, duplicates=True) -> list[int]:
  seen, codes = set(), []
  for s in ids:
    if s < 0:
      codes.append(Status.OK)
    elif s >= CFG.max_seqs:
      codes.append(Status.INVALID_SLOT)
    elif want_active and s not in state.tokens:
      codes.append(Status.INACTIVE_SLOT)
    elif not want_active and s in state.tokens:
      codes.append(Status.SLOT_IN_USE)
    elif duplicates and s in seen:
      codes.append(Status.DUPLICATE_SLOT)
    else:
      codes.append(Status.OK)
    if 0 <= s < CFG.max_seqs:
      seen.add(s)
  return codes


def spec_allocate(state, ids):
  codes = row_status(state, ids, want_active=False)
  if any(codes):
    return codes, None
  new = state.clone()
  for s in ids:
    if s >= 0:
      new.tokens[s], new.blocks[s] = [], []
  return codes, new


def spec_free(state, ids):
  codes = row_status(state, ids)
  if any(codes):
    return codes, None
  new = state.clone()
  for s in ids:
    if s >= 0:
      del new.tokens[s], new.blocks[s]
  return codes, new


def spec_truncate(state, ids, counts):
  codes = row_status(state, ids)
  for r, s in enumerate(ids):
    if codes[r] == 0 and s >= 0 and not 0 <= counts[r] <= len(state.tokens[s]):
      codes[r] = Status.INVALID_COUNT
  if any(codes):
    return codes, None
  new = state.clone()
  for r, s in enumerate(ids):
    if s >= 0 and counts[r]:
      keep = len(new.tokens[s]) - counts[r]
      del new.tokens[s][keep:]
      del new.blocks[s][-(-keep // CFG.block_size):]
  return codes, new


def spec_fork(state, parents, children):
  pcodes = row_status(state, parents, duplicates=False)
  ccodes = row_status(state, children, want_active=False)
  codes = []
  for r, (p, c) in enumerate(zip(parents, children, strict=True)):
    code = pcodes[r] or ccodes[r]
    if code == 0 and (p < 0) != (c < 0):
      code = Status.INVALID_SLOT
    codes.append(code)
  if any(codes):
    return codes, None
  new = state.clone()
  for p, c in zip(parents, children, strict=True):
    if p >= 0:
      new.tokens[c], new.blocks[c] = list(new.tokens[p]), list(new.blocks[p])
  return codes, new


def spec_reorder(state, ids, srcs):
  """Each sequence takes its source's tokens and blocks as they were before the call."""
  icodes = row_status(state, ids)
  scodes = row_status(state, srcs, duplicates=False)
  codes = []
  for r, (s, src) in enumerate(zip(ids, srcs, strict=True)):
    code = icodes[r] or scodes[r]
    if code == 0 and (s < 0) != (src < 0):
      code = Status.INVALID_SLOT
    codes.append(code)
  if any(codes):
    return codes, None
  new = state.clone()
  for s, src in zip(ids, srcs, strict=True):
    if s >= 0:
      new.tokens[s], new.blocks[s] = list(state.tokens[src]), list(state.blocks[src])
  return codes, new


def spec_append(state, ids, counts, t, values):
  """``values[r][i]``: the value appended as token ``i`` of row ``r``."""
  bs = CFG.block_size
  codes = row_status(state, ids)
  need = [0] * len(ids)
  for r, (s, n) in enumerate(zip(ids, counts, strict=True)):
    if codes[r] or s < 0:
      continue
    old = len(state.tokens[s])
    if not 0 <= n <= t:
      codes[r] = Status.INVALID_COUNT
    elif old + n > CFG.max_seq_len:
      codes[r] = Status.SEQUENCE_TOO_LONG
    else:
      cow = n > 0 and old % bs and state.refcount(state.blocks[s][-1]) > 1
      need[r] = -(-(old + n) // bs) - -(-old // bs) + int(bool(cow))
  if not any(codes) and sum(need) > state.free_blocks():
    codes = [Status.POOL_EXHAUSTED if need[r] else 0 for r in range(len(ids))]
  if any(codes):
    return codes, None
  new = state.clone()
  for r, s in enumerate(ids):
    if s < 0 or counts[r] == 0:
      continue
    old = len(new.tokens[s])
    if old % bs and new.refcount(new.blocks[s][-1]) > 1:
      new.blocks[s][-1] = object()
    new.tokens[s].extend(values[r][:counts[r]])
    while len(new.blocks[s]) * bs < len(new.tokens[s]):
      new.blocks[s].append(object())
  return codes, new


def spec_read(state, ids, layer):
  """Status of lookup_kv / paged_attention rows (eager): ids first, then the layer."""
  codes = row_status(state, ids, duplicates=False)
  if not 0 <= layer < CFG.num_layers:
    return [Status.INVALID_LAYER], None
  return codes, state
