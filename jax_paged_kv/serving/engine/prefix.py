"""Prefix caching: the host index from full-block content to the sequence slots that hold it.

A *full* block of a sequence is identified by a SHA-256 chain: block ``j``'s hash covers the hash
of block ``j - 1`` (block 0's covers a root that names the model, the cache layout and the
request's ``cache_salt``) and the block's token ids. Two blocks with the same hash hold the same
K/V, because K/V at a position depend only on the tokens up to it (and on the model's weights:
assigning ``Engine.params`` drops every cached block). For int8 / int4 caches "the same" means
within the format's error bound, not bitwise: their per-(block, channel) K scales make a
block's bits depend on how it was written (token by token or in one prefill chunk).

Blocks are shared through the device allocator as forks are: the index maps a block hash to the
sequence slots whose table holds such a block at that depth (*holders*). A new request whose
prompt starts with ``k`` cached blocks forks a holder of the ``k``-th block into its own slot and
truncates the copy to ``k`` blocks (reference counts, no data moves), then prefills only the rest.
A finished request's slot is not freed but kept, truncated to its full registered blocks, as a
*cached* slot: its blocks keep their reference counts, so every allocator invariant holds as it
is, and the engine evicts cached slots (least recently used first, tail blocks first) when it
needs blocks or slots.

Hash collisions must never serve wrong K/V: SHA-256 makes an accidental collision practically
impossible, but the hash is computed from request data a client controls, so the index also
stores each block's token ids and parent hash (and salt at depth 0) and compares them on every
hit. A lookup that matches the hash but not the tokens is a miss, never a wrong answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np


def _digest(data: bytes) -> bytes:
  """SHA-256 of ``data`` (one place, so a test can swap in a colliding hash)."""
  return hashlib.sha256(data).digest()


@dataclasses.dataclass
class _Entry:
  """One cached block content: what it must equal, and the slots holding it."""

  parent: bytes
  tokens: tuple[int, ...]
  salt: str | None
  holders: dict[int, None] = dataclasses.field(default_factory=dict)  # ordered set of slots


class PrefixIndex:
  """Block hashes -> holding slots, per-slot registered hashes, and the cached (idle) slots.

  Args:
    block_size: tokens per block.
    namespace: bytes naming the model and cache layout (part of every root hash).
  """

  def __init__(self, block_size: int, namespace: bytes):
    self.block_size = block_size
    self.namespace = namespace
    self.entries: dict[bytes, _Entry] = {}
    self.slot_hashes: dict[int, list[bytes]] = {}  # slot -> hashes of its blocks 0..m-1
    self.cached: dict[int, None] = {}  # idle cached slots, least recently used first

  # ---- hashing -------------------------------------------------------------------------------

  def root(self, salt: str | None) -> bytes:
    return _digest(self.namespace + b"\0salt:" + repr(salt).encode())

  def hashes(self, tokens: Sequence[int], salt: str | None, num_blocks: int | None = None,
             start: int = 0, parent: bytes | None = None) -> list[bytes]:
    """Hashes of full blocks ``start..`` of ``tokens`` (at most ``num_blocks`` in all)."""
    bs = self.block_size
    n = len(tokens) // bs if num_blocks is None else min(num_blocks, len(tokens) // bs)
    h = self.root(salt) if parent is None else parent
    out = []
    for j in range(start, n):
      blk = np.asarray(tokens[j * bs:(j + 1) * bs], np.int64).tobytes()
      h = _digest(h + blk)
      out.append(h)
    return out

  # ---- lookup --------------------------------------------------------------------------------

  def match(self, tokens: Sequence[int], salt: str | None, max_blocks: int,
            hashes: Sequence[bytes] | None = None) -> tuple[int, int]:
    """``(k, holder)``: the first ``k`` full blocks of ``tokens`` are cached; ``holder`` holds them.

    Every hit is verified against the stored token ids, parent hash and salt. ``hashes``: the
    block hashes of ``tokens`` if the caller has them (:meth:`hashes`), else computed here.
    """
    bs = self.block_size
    parent = self.root(salt)
    k, holder = 0, -1
    if hashes is None:
      hashes = self.hashes(tokens, salt, max_blocks)
    for j, h in enumerate(hashes[:max_blocks]):
      e = self.entries.get(h)
      if (e is None or not e.holders or e.parent != parent
          or e.tokens != tuple(tokens[j * bs:(j + 1) * bs]) or (j == 0 and e.salt != salt)):
        break
      k, holder, parent = j + 1, next(iter(e.holders)), h
    return k, holder

  # ---- registration --------------------------------------------------------------------------

  def register(self, slot: int, tokens: Sequence[int], salt: str | None, written: int,
               max_blocks: int | None = None) -> None:
    """Registers the full blocks of ``slot`` among its first ``written`` tokens (K/V written),
    at most its first ``max_blocks`` (a slot whose table has holes from the window eviction
    registers only the blocks before its first hole: a hit forks the holder's table)."""
    have = self.slot_hashes.setdefault(slot, [])
    n = written // self.block_size
    if max_blocks is not None:
      n = min(n, max_blocks)
    if n <= len(have):
      return
    parent = have[-1] if have else None
    bs = self.block_size
    new = self.hashes(tokens, salt, n, start=len(have), parent=parent)
    for j, h in enumerate(new, start=len(have)):
      e = self.entries.get(h)
      prev = have[j - 1] if j else self.root(salt)
      blk = tuple(int(t) for t in tokens[j * bs:(j + 1) * bs])
      if e is None:
        e = self.entries[h] = _Entry(prev, blk, salt if j == 0 else None)
      elif e.parent != prev or e.tokens != blk:
        # A SHA-256 collision: keep the first content; this slot's block stays unregistered.
        break
      e.holders[slot] = None
      have.append(h)

  def unregister(self, slot: int, keep_blocks: int = 0) -> None:
    """Forgets ``slot``'s blocks from index ``keep_blocks`` on (freed or truncated)."""
    have = self.slot_hashes.get(slot, [])
    for h in have[keep_blocks:]:
      e = self.entries.get(h)
      if e is not None:
        e.holders.pop(slot, None)
        if not e.holders:
          del self.entries[h]
    del have[keep_blocks:]
    if not have:
      self.slot_hashes.pop(slot, None)
      self.cached.pop(slot, None)

  def registered(self, slot: int) -> int:
    return len(self.slot_hashes.get(slot, []))

  # ---- cached slots --------------------------------------------------------------------------

  def park(self, slot: int) -> None:
    """``slot`` finished and stays cached (most recently used)."""
    self.cached.pop(slot, None)
    self.cached[slot] = None

  def touch(self, slot: int) -> None:
    """A hit used ``slot``: it becomes the most recently used cached slot."""
    if slot in self.cached:
      self.park(slot)

  def lru(self, exclude: int = -1) -> int:
    """The least recently used cached slot other than ``exclude`` (-1 if none)."""
    for s in self.cached:
      if s != exclude:
        return s
    return -1
