"""Random admissions (with prefix-cache hits), decode appends, finishes, forks, truncations,
evictions of cached blocks, swaps and window frees (holes), against a plain-Python model of
block ownership.

The engine's prefix caching is the cache ops (fork, truncate, free, swap) driven by the host
:class:`~jax_paged_kv.serving.engine.prefix.PrefixIndex`; this machine drives them the way
:class:`~jax_paged_kv.serving.engine.Engine` does, without a model. The plain-Python model keeps,
per slot, its tokens and a list of abstract block objects (shared by hits and forks, replaced on
copy-on-write, fresh after a swap-in) and finds prefix hits by comparing token lists. From that
it predicts the hit length, the free count, which table entries share a block and every
reference count; and the K/V each position reads back, a function of its salt and all the
tokens up to it, so a hit that served the wrong block would show.
"""

from __future__ import annotations

import hashlib

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import jax_paged_kv as pk
from jax_paged_kv.serving.engine.prefix import PrefixIndex

BS, T = 2, 8
CFG = pk.CacheConfig(num_layers=1, num_kv_heads=1, head_dim=2, num_blocks=1 + 20, max_seqs=8,
                     max_seq_len=12, block_size=BS, dtype=jnp.float32)

_append = jax.jit(lambda c, k, v, ids, n: pk.append_kv(c, k, v, ids, num_new=n))
_alloc = jax.jit(pk.allocate_sequences)
_free = jax.jit(pk.free_sequences)
_fork = jax.jit(pk.fork_sequence)
_trunc = jax.jit(pk.truncate_sequences)
_window = jax.jit(lambda c, ids, w, s: pk.free_outside_window(c, ids, window=w, sink_tokens=s),
                  static_argnums=(2, 3))
_lookup = jax.jit(lambda c, ids: pk.lookup_kv(c, ids, 0))

# Prompts: one of a few shared starts plus a short suffix, from a two-letter alphabet, so that
# prefixes repeat.
prompts = st.builds(lambda base, tail: (base + tail) or [0],
                    st.sampled_from([[0, 1, 1, 0], [0, 1, 1, 1, 0], [1, 0], []]),
                    st.lists(st.integers(0, 1), max_size=2))
salts = st.sampled_from([None, None, "tenant"])


def content(salt, tokens) -> float:
  """The K value stored at the last position of ``tokens`` (exact in float32)."""
  h = hashlib.sha256(repr((salt, tuple(tokens))).encode()).digest()
  return float(int.from_bytes(h[:3], "little") + 1)


class Slot:
  def __init__(self, tokens, blocks, salt):
    self.tokens: list[int] = list(tokens)
    self.blocks: list[object | None] = list(blocks)  # None: a hole (free_outside_window)
    self.salt = salt

  def shareable(self) -> int:
    """Blocks before the first hole (a prefix hit forks the holder's table: the engine keeps
    only those registered)."""
    return next((j for j, b in enumerate(self.blocks) if b is None), len(self.blocks))

  def registered(self) -> int:
    return min(len(self.tokens) // BS, self.shareable())


class PrefixMachine(RuleBasedStateMachine):

  @initialize(first=prompts)
  def setup(self, first):
    self.cache = pk.init_cache(CFG, pool_fill=np.nan)
    self.index = PrefixIndex(BS, b"machine")
    self.running: dict[int, Slot] = {}
    self.cached: dict[int, Slot] = {}  # least recently used first
    self.swapped: list[tuple[Slot, pk.SwappedSequence]] = []
    self.admit(first, None)  # so that every rule has something to work on from the start

  # --- model helpers ----------------------------------------------------------------------

  def live(self) -> dict[int, Slot]:
    return {**self.running, **self.cached}

  def free_slot(self) -> int:
    used = self.live()
    return next((s for s in range(CFG.max_seqs) if s not in used), -1)

  def model_free(self) -> int:
    return CFG.usable_blocks - len({id(b) for s in self.live().values() for b in s.blocks
                                    if b is not None})

  def refcount(self, block) -> int:
    return sum(b is block for s in self.live().values() for b in s.blocks)

  def register(self, slot: int) -> None:
    """What the engine's ``_register`` does: only blocks before the first hole stay in the
    index (a slot's registrations past it are dropped once the window frees a block)."""
    s = self.live()[slot]
    cap = s.shareable()
    if self.index.registered(slot) > cap:
      self.index.unregister(slot, cap)
    self.index.register(slot, s.tokens, s.salt, len(s.tokens), max_blocks=cap)

  def model_hit(self, tokens, salt) -> int:
    """Longest cached prefix (whole blocks, the last token excluded) any live slot holds."""
    cap = (len(tokens) - 1) // BS
    best = 0
    for s in self.live().values():
      if s.salt != salt:
        continue
      k = 0
      while k < min(cap, s.registered()) and s.tokens[k * BS:(k + 1) * BS] == tokens[
          k * BS:(k + 1) * BS]:
        k += 1
      best = max(best, k)
    return best

  def write(self, slot: int, tokens: list[int], start: int) -> None:
    """Appends ``tokens[start:]`` to ``slot`` (values from the content function)."""
    s = self.running[slot]
    for lo in range(start, len(tokens), T):  # appends of at most T tokens
      n = min(T, len(tokens) - lo)
      vals = np.zeros((1, 1, T, 1, 2), np.float32)
      for i in range(n):
        vals[0, 0, i] = content(s.salt, tokens[:lo + i + 1])
      self.cache, status = _append(self.cache, jnp.asarray(vals), -jnp.asarray(vals),
                                   jnp.int32([slot]), jnp.int32([n]))
      assert int(status[0]) == 0
    if start % BS and self.refcount(s.blocks[-1]) > 1:
      event("copy-on-write")
      s.blocks[-1] = object()
    s.tokens = list(tokens)
    while len(s.blocks) * BS < len(s.tokens):
      s.blocks.append(object())
    self.register(slot)

  def need(self, s: Slot, n: int) -> int:
    old = len(s.tokens)
    cow = n > 0 and old % BS and self.refcount(s.blocks[-1]) > 1
    return -(-(old + n) // BS) - -(-old // BS) + int(bool(cow))

  def evict(self, slot: int, blocks: int) -> None:
    """Drops the last ``blocks`` blocks of cached ``slot`` (all: frees it), as the engine does."""
    s = self.cached[slot]
    held = len(s.blocks)
    if blocks >= held:
      self.cache, st_ = _free(self.cache, jnp.int32([slot]))
      self.index.unregister(slot)
      del self.cached[slot]
    else:
      self.cache, st_ = _trunc(self.cache, jnp.int32([slot]), jnp.int32(blocks * BS))
      self.index.unregister(slot, held - blocks)
      del s.tokens[(held - blocks) * BS:], s.blocks[held - blocks:]
    assert not np.any(np.asarray(st_))

  def make_room(self, blocks: int, slot_needed: bool, keep: int = -1) -> bool:
    """Evicts cached slots (least recently used first, never ``keep``) until it fits."""
    while self.model_free() < blocks or (slot_needed and self.free_slot() < 0):
      victims = [s for s in self.cached if s != keep]
      if not victims:
        event("no room")
        return False
      v = victims[0]
      event("evict for room")
      self.evict(v, len(self.cached[v].blocks))
    return True

  def refill(self, data) -> None:
    """Admits a new prompt when no request runs: with only a few rules enabled, hypothesis
    often gives up drawing one and drops the example."""
    if not self.running:
      self.admit(data.draw(prompts), data.draw(salts))

  # --- rules ------------------------------------------------------------------------------

  @rule(tokens=prompts, salt=salts)
  def admit(self, tokens, salt):
    k = self.model_hit(tokens, salt)
    cap = (len(tokens) - 1) // BS
    got, holder = self.index.match(tokens, salt, cap)
    assert got == k
    if not self.make_room(-(-len(tokens) // BS) - k, True, keep=holder if k else -1):
      return
    slot = self.free_slot()
    if k:
      event("prefix hit")
      h = self.live()[holder]
      assert h.salt == salt and h.tokens[:k * BS] == tokens[:k * BS]
      self.cache, st_ = _fork(self.cache, jnp.int32(holder), jnp.int32(slot))
      self.cache, st2 = _trunc(self.cache, jnp.int32([slot]),
                               jnp.int32(len(h.tokens) - k * BS))
      assert int(st_) == 0 and not np.any(np.asarray(st2))
      assert None not in h.blocks[:k]
      self.running[slot] = Slot(tokens[:k * BS], h.blocks[:k], salt)
      if holder in self.cached:  # a hit makes the holder the most recently used
        event("prefix hit on a cached slot")
        self.cached[holder] = self.cached.pop(holder)
        self.index.touch(holder)
      self.register(slot)
    else:
      self.cache, st_ = _alloc(self.cache, jnp.int32([slot]))
      assert not np.any(np.asarray(st_))
      self.running[slot] = Slot([], [], salt)
    self.write(slot, tokens, k * BS)

  @precondition(lambda self: self.live())
  @rule(data=st.data(), tail=st.lists(st.integers(0, 1), max_size=3))
  def admit_sharing(self, data, tail):
    """A prompt that starts with part of a live slot's tokens (generated ones included), under
    its salt or another: the prefix-hit paths (fork + truncate of a holder, running or cached,
    with holes or copy-on-write after it) come up far more often than from random prompts."""
    holder = self.live()[data.draw(st.sampled_from(sorted(self.live())))]
    keep = data.draw(st.one_of(st.just(len(holder.tokens)), st.integers(0, len(holder.tokens))))
    salt = data.draw(st.sampled_from([holder.salt, holder.salt, "other"]))
    tokens = (holder.tokens[:keep] + tail) or [0]
    if len(tokens) <= CFG.max_seq_len:
      self.admit(tokens, salt)

  @precondition(lambda self: self.running)
  @rule(data=st.data(), new=st.lists(st.integers(0, 1), min_size=1, max_size=3))
  def decode(self, data, new):
    slot = data.draw(st.sampled_from(sorted(self.running)))
    s = self.running[slot]
    if len(s.tokens) + len(new) > CFG.max_seq_len:
      return
    if self.make_room(self.need(s, len(new)), False):
      self.write(slot, s.tokens + new, len(s.tokens))

  @precondition(lambda self: self.running)
  @rule(data=st.data())
  def finish(self, data):
    slot = data.draw(st.sampled_from(sorted(self.running)))
    s = self.running.pop(slot)
    keep = s.registered()
    assert self.index.registered(slot) == keep
    if not keep:
      self.cache, st_ = _free(self.cache, jnp.int32([slot]))
      self.index.unregister(slot)
    else:
      self.cache, st_ = _trunc(self.cache, jnp.int32([slot]),
                               jnp.int32(len(s.tokens) - keep * BS))
      del s.tokens[keep * BS:], s.blocks[keep:]
      self.cached[slot] = s
      self.index.park(slot)
    assert not np.any(np.asarray(st_))
    self.refill(data)

  @precondition(lambda self: self.running)
  @rule(data=st.data())
  def fork(self, data):
    parent = data.draw(st.sampled_from(sorted(self.running)))
    if not self.make_room(0, True):
      return
    child = self.free_slot()
    self.cache, st_ = _fork(self.cache, jnp.int32(parent), jnp.int32(child))
    assert int(st_) == 0
    p = self.running[parent]
    self.running[child] = Slot(p.tokens, p.blocks, p.salt)
    self.register(child)

  @precondition(lambda self: self.running)
  @rule(data=st.data(), n=st.integers(1, 5))
  def truncate(self, data, n):
    slot = data.draw(st.sampled_from(sorted(self.running)))
    s = self.running[slot]
    n = min(n, len(s.tokens))
    new_blocks = -(-(len(s.tokens) - n) // BS)
    self.cache, st_ = _trunc(self.cache, jnp.int32([slot]), jnp.int32(n))
    if new_blocks and s.blocks[new_blocks - 1] is None:  # into a hole: refused, nothing changes
      event("truncate into a hole")
      assert int(np.asarray(st_)[0]) == pk.Status.FREED_BLOCK
      return
    if n and None in s.blocks[:new_blocks]:  # keeps a hole: without the window, unverifiable
      event("truncate keeping a hole")
      assert int(np.asarray(st_)[0]) == pk.Status.FREED_BLOCK
      return
    assert not np.any(np.asarray(st_))
    del s.tokens[len(s.tokens) - n:]
    del s.blocks[new_blocks:]
    self.index.unregister(slot, s.registered())

  @precondition(lambda self: self.cached)
  @rule(blocks=st.integers(1, 4))
  def evict_lru(self, blocks):
    slot = self.index.lru()
    assert slot == next(iter(self.cached))
    self.evict(slot, blocks)

  @precondition(lambda self: self.running)
  @rule(data=st.data())
  def swap_out(self, data):
    slot = data.draw(st.sampled_from(sorted(self.running)))
    self.index.unregister(slot)
    self.cache, sw = pk.swap_out(self.cache, slot, donate=False)
    s = self.running.pop(slot)
    assert sw.seq_len == len(s.tokens)
    assert sw.num_blocks == sum(b is not None for b in s.blocks)  # holes are not swapped
    self.swapped.append((s, sw))
    self.refill(data)

  @precondition(lambda self: self.swapped)
  @rule(data=st.data())
  def swap_in(self, data):
    i = data.draw(st.integers(0, len(self.swapped) - 1))
    s, sw = self.swapped[i]
    if not self.make_room(sw.num_blocks, True):
      return
    slot = self.free_slot()
    self.cache, st_ = pk.swap_in(self.cache, slot, sw, donate=False)
    assert not np.any(np.asarray(st_))
    del self.swapped[i]
    self.running[slot] = Slot(s.tokens, [None if b is None else object() for b in s.blocks],
                              s.salt)
    self.register(slot)

  @precondition(lambda self: self.running)
  @rule(data=st.data(), window=st.integers(1, 6), sinks=st.sampled_from([0, 0, 2, 3]))
  def window_free(self, data, window, sinks):
    """free_outside_window: blocks j past the sink blocks with (j + 1) * BS <= len - window."""
    slot = data.draw(st.sampled_from(sorted(self.running)))
    s = self.running[slot]
    self.cache, freed, st_ = _window(self.cache, jnp.int32([slot]), window, sinks)
    assert not np.any(np.asarray(st_))
    gone = [j for j, b in enumerate(s.blocks) if b is not None and j >= -(-sinks // BS)
            and (j + 1) * BS <= len(s.tokens) - window]
    assert int(np.asarray(freed)[0]) == len(gone)
    if gone:
      event("window freed blocks")
    for j in gone:
      s.blocks[j] = None
    self.register(slot)

  # --- invariants -------------------------------------------------------------------------

  @invariant()
  def cache_invariants_hold(self):
    report = pk.check_invariants(self.cache)
    assert bool(report.ok), report.failures()

  @invariant()
  def model_agrees(self):
    c = self.cache
    live = self.live()
    assert int(c.allocator.num_free) == self.model_free()
    active, lens = np.asarray(c.active), np.asarray(c.seq_lens)
    tables, refs = np.asarray(c.block_tables), np.asarray(c.allocator.ref_counts)
    for slot in range(CFG.max_seqs):
      assert active[slot] == (slot in live)
      assert lens[slot] == (len(live[slot].tokens) if slot in live else 0)
    assert list(self.index.cached) == list(self.cached)
    for slot, s in live.items():
      assert self.index.registered(slot) == s.registered()
    k, v, _ = _lookup(c, jnp.arange(CFG.max_seqs, dtype=jnp.int32))
    k, v = np.asarray(k), np.asarray(v)
    for slot, s in live.items():  # holes read as 0
      want = [0.0 if s.blocks[i // BS] is None else content(s.salt, s.tokens[:i + 1])
              for i in range(len(s.tokens))]
      np.testing.assert_array_equal(k[slot, :len(want), 0, 0], np.float32(want))
      np.testing.assert_array_equal(v[slot, :len(want), 0, 1], -np.float32(want))
      for j, b in enumerate(s.blocks):
        assert (tables[slot, j] == 0) == (b is None)
    entries = [(slot, j, b) for slot, s in live.items() for j, b in enumerate(s.blocks)
               if b is not None]
    for i, (s1, j1, b1) in enumerate(entries):
      assert refs[tables[s1, j1]] == self.refcount(b1)
      for s2, j2, b2 in entries[i + 1:]:
        assert (tables[s1, j1] == tables[s2, j2]) == (b1 is b2)


PrefixMachine.TestCase.settings = settings(
    max_examples=20, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestPrefixMachine = PrefixMachine.TestCase
