"""Random sequences of cache operations against a plain-Python model of the allocator.

The model knows nothing of block ids, free stacks or reference-count arrays: it keeps, per slot,
the list of token values and a list of abstract block objects (shared by forks, replaced on
copy-on-write). From that it predicts every status code, the number of free blocks, each
sequence's contents and exactly which table entries share a physical block.
"""

from __future__ import annotations

import dataclasses
import itertools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import jax_paged_kv as pk
from jax_paged_kv.cache.errors import Status
from tests.oracle import channel_k_error_bound

CFG = pk.CacheConfig(num_layers=2, num_kv_heads=1, head_dim=2, num_blocks=13, max_seqs=4,
                     max_seq_len=20, block_size=4, dtype=jnp.float32)
BATCH, T = 3, 6

_append = jax.jit(lambda c, k, v, ids, n: pk.append_kv(c, k, v, ids, num_new=n))
_alloc = jax.jit(pk.allocate_sequences)
_free = jax.jit(pk.free_sequences)
_fork = jax.jit(pk.fork_sequence)
_trunc = jax.jit(pk.truncate_sequences)
_lookup = jax.jit(lambda c, ids, layer: pk.lookup_kv(c, ids, layer))

# Mostly real slots; sometimes padding (-1) or out of range (>= max_seqs).
slot_ids = st.one_of(st.integers(0, CFG.max_seqs - 1), st.integers(0, CFG.max_seqs - 1),
                     st.integers(0, CFG.max_seqs - 1), st.just(-1),
                     st.integers(CFG.max_seqs, CFG.max_seqs + 1))


class Block:
  """A model block: identity for sharing, and how many write calls have touched it (each may
  widen a quantised cache's channel K scales once)."""

  def __init__(self, writes: int = 0):
    self.writes = writes


class Seq:
  def __init__(self):
    self.tokens: list[float] = []
    self.marks: list[int] = []  # per token: its block's write count just after the token's write
    self.blocks: list[Block] = []
    # Quantised K, per token: its error bound (per layer, absolute) from before a rollback
    # narrowed its block's scale; the marks then restart (see truncate).
    self.floors: list[np.ndarray] = []


class CacheMachine(RuleBasedStateMachine):
  cfg = CFG


  @initialize(lens=st.lists(st.integers(0, T), min_size=2, max_size=2))
  def setup(self, lens):
    self.cache = pk.init_cache(self.cfg, pool_fill=np.nan)
    self.seqs: dict[int, Seq] = {}
    self.counter = itertools.count(1)
    self.failed = 0
    # Start from two live sequences so that short runs still exercise sharing and exhaustion.
    self.cache, _ = _alloc(self.cache, jnp.array([0, 1], jnp.int32))
    self.seqs = {0: Seq(), 1: Seq()}
    self.do_append([0, 1, -1], [*lens, 0])

  # --- model helpers ----------------------------------------------------------------------

  def pick(self, data, want_active=True):
    """Mostly a slot the op accepts; sometimes any id (inactive, padding, out of range)."""
    pool = sorted(self.seqs) if want_active else [s for s in range(self.cfg.max_seqs)
                                                   if s not in self.seqs]
    if pool and data.draw(st.integers(0, 4)) > 0:
      return data.draw(st.sampled_from(pool))
    return data.draw(slot_ids)

  def refcount(self, block) -> int:
    return sum(b is block for s in self.seqs.values() for b in s.blocks)

  def live_blocks(self) -> int:
    return len({id(b) for s in self.seqs.values() for b in s.blocks})

  def row_status(self, ids, want_active=True):
    seen, codes = set(), []
    for s in ids:
      if s < 0:
        codes.append(Status.OK)
      elif s >= self.cfg.max_seqs:
        codes.append(Status.INVALID_SLOT)
      elif want_active and s not in self.seqs:
        codes.append(Status.INACTIVE_SLOT)
      elif not want_active and s in self.seqs:
        codes.append(Status.SLOT_IN_USE)
      elif s in seen:
        codes.append(Status.DUPLICATE_SLOT)
      else:
        codes.append(Status.OK)
      if 0 <= s < self.cfg.max_seqs:
        seen.add(s)
    return codes

  def assert_unchanged(self, before):
    after = jax.tree_util.tree_leaves(self.cache.replace(telemetry=before.telemetry))
    for x, y in zip(after, jax.tree_util.tree_leaves(before), strict=True):
      assert np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)

  # --- rules ------------------------------------------------------------------------------

  @rule(data=st.data(), n=st.integers(1, 2))
  def allocate(self, data, n):
    ids = [self.pick(data, want_active=False) for _ in range(n)]
    codes = self.row_status(ids, want_active=False)
    before = self.cache
    self.cache, status = _alloc(self.cache, jnp.asarray(ids, jnp.int32))
    assert list(np.asarray(status)) == codes
    if any(codes):
      return self.assert_unchanged(before)
    for s in ids:
      if s >= 0:
        self.seqs[s] = Seq()

  @rule(data=st.data(), n=st.integers(1, BATCH), pad_first=st.booleans())
  def append(self, data, n, pad_first):
    count = st.one_of(st.integers(0, T), st.integers(0, T), st.integers(-1, T + 1))
    rows = [(self.pick(data), data.draw(count)) for _ in range(n)]
    pad = [(-1, 0)] * (BATCH - len(rows))
    rows = pad + rows if pad_first else rows + pad
    self.do_append([r[0] for r in rows], [r[1] for r in rows])

  def do_append(self, ids, counts):
    bs = self.cfg.block_size
    codes = self.row_status(ids)
    need = [0] * BATCH
    for r, (s, n) in enumerate(zip(ids, counts, strict=True)):
      if codes[r] or s < 0:
        continue
      seq = self.seqs[s]
      if n < 0 or n > T:
        codes[r] = Status.INVALID_COUNT
      elif len(seq.tokens) + n > self.cfg.max_seq_len:
        codes[r] = Status.SEQUENCE_TOO_LONG
      else:
        old = len(seq.tokens)
        cow = n > 0 and old % bs and self.refcount(seq.blocks[-1]) > 1
        need[r] = -(-(old + n) // bs) - -(-old // bs) + int(bool(cow))
    free = self.cfg.usable_blocks - self.live_blocks()
    ok_rows = not any(codes)
    exhausted = sum(need) > free
    # Exhaustion is reported only when every row is otherwise valid (errors.py's rule).
    codes = [Status.POOL_EXHAUSTED if (ok_rows and exhausted and need[r]) else c
             for r, c in enumerate(codes)]
    vals = np.zeros((BATCH, T), np.float32)
    for r in range(BATCH):
      for i in range(T):
        vals[r, i] = next(self.counter)
    k = jnp.asarray(np.broadcast_to(vals[None, :, :, None, None], (2, BATCH, T, 1, 2)))
    before = self.cache
    self.cache, status = _append(self.cache, k, -k, jnp.asarray(ids, jnp.int32),
                                 jnp.asarray(counts, jnp.int32))
    assert list(np.asarray(status)) == codes, (list(np.asarray(status)), codes)
    if ok_rows and exhausted:
      self.failed += 1
    assert int(self.cache.telemetry.failed_allocations) == self.failed
    event(f"append: {'rejected ' + Status(max(codes)).name if any(codes) else 'ok'}")
    if any(codes):
      return self.assert_unchanged(before)
    for r, s in enumerate(ids):
      if s < 0 or counts[r] == 0:
        continue
      seq = self.seqs[s]
      old = len(seq.tokens)
      if old % bs and self.refcount(seq.blocks[-1]) > 1:
        event("append: copy-on-write")
        seq.blocks[-1] = Block(seq.blocks[-1].writes)  # copy-on-write (codes and scales copied)
      seq.tokens.extend(vals[r, : counts[r]].tolist())
      while len(seq.blocks) * bs < len(seq.tokens):
        seq.blocks.append(Block())
      for j in range(old // bs, (len(seq.tokens) - 1) // bs + 1):
        seq.blocks[j].writes += 1
      seq.marks.extend(seq.blocks[p // bs].writes for p in range(old, len(seq.tokens)))
      seq.floors.extend(np.zeros(self.cfg.num_layers) for _ in range(old, len(seq.tokens)))

  @rule(data=st.data(), n=st.integers(1, 2))
  def free(self, data, n):
    ids = [self.pick(data) for _ in range(n)]
    codes = self.row_status(ids)
    before = self.cache
    self.cache, status = _free(self.cache, jnp.asarray(ids, jnp.int32))
    assert list(np.asarray(status)) == codes
    if any(codes):
      return self.assert_unchanged(before)
    for s in ids:
      if s >= 0:
        del self.seqs[s]

  @rule(data=st.data())
  def fork(self, data):
    parent, child = self.pick(data), self.pick(data, want_active=False)
    code = self.row_status([parent])[0]
    if code == 0:
      code = self.row_status([child], want_active=False)[0]
    if code == 0 and (parent < 0) != (child < 0):
      code = Status.INVALID_SLOT
    before = self.cache
    self.cache, status = _fork(self.cache, jnp.int32(parent), jnp.int32(child))
    assert int(status) == code
    event(f"fork: {Status(code).name}")
    if code:
      return self.assert_unchanged(before)
    if parent >= 0:
      src = self.seqs[parent]
      dst = self.seqs[child] = Seq()
      dst.tokens, dst.marks, dst.blocks = list(src.tokens), list(src.marks), list(src.blocks)
      dst.floors = list(src.floors)

  @rule(data=st.data(), rows=st.integers(1, 2), n=st.integers(-1, 9))
  def truncate(self, data, rows, n):
    ids = [self.pick(data) for _ in range(rows)]
    codes = self.row_status(ids)
    for r, s in enumerate(ids):
      if codes[r] == 0 and s >= 0 and not 0 <= n <= len(self.seqs[s].tokens):
        codes[r] = Status.INVALID_COUNT
    before = self.cache
    self.cache, status = _trunc(self.cache, jnp.asarray(ids, jnp.int32), jnp.int32(n))
    assert list(np.asarray(status)) == codes
    if any(codes):
      return self.assert_unchanged(before)
    for s in ids:
      if s >= 0 and n:
        seq = self.seqs[s]
        del seq.tokens[len(seq.tokens) - n:]
        del seq.marks[len(seq.marks) - n:]
        del seq.floors[len(seq.floors) - n:]
        del seq.blocks[-(-len(seq.tokens) // self.cfg.block_size):]
        bs, kept = self.cfg.block_size, len(seq.tokens)
        if self.cfg.kv_quant is not None and kept % bs:
          # The rollback may narrow the new last block's scale and requantise its tokens:
          # their error so far (bounded in the old steps) becomes a floor, and each is
          # rounded once more (the "first" term of the bound, in the new steps).
          steps = np.asarray(before.k_scale.astype(jnp.float32), np.float64)
          blk = int(np.asarray(before.block_tables)[s, kept // bs])
          for p in range(kept - kept % bs, kept):
            later = seq.blocks[p // bs].writes - seq.marks[p]
            seq.floors[p] = seq.floors[p] + channel_k_error_bound(steps[:, 0, blk, 0], later,
                                                                  "int8")
            seq.marks[p] = seq.blocks[p // bs].writes

  # --- invariants -------------------------------------------------------------------------

  @invariant()
  def invariants_hold(self):
    report = pk.check_invariants(self.cache)
    assert bool(report.ok), report.failures()

  @invariant()
  def model_agrees(self):
    c = self.cache
    assert int(c.allocator.num_free) == self.cfg.usable_blocks - self.live_blocks()
    active = np.asarray(c.active)
    lens = np.asarray(c.seq_lens)
    tables = np.asarray(c.block_tables)
    for s in range(self.cfg.max_seqs):
      assert active[s] == (s in self.seqs)
      assert lens[s] == (len(self.seqs[s].tokens) if s in self.seqs else 0)
    ids = jnp.arange(self.cfg.max_seqs)
    if self.cfg.kv_quant is not None:
      k_step = np.asarray(c.k_scale.astype(jnp.float32), np.float64)
    for layer in range(self.cfg.num_layers):
      k, v, _ = _lookup(c, ids, layer)
      k, v = np.asarray(k), np.asarray(v)
      for s, seq in self.seqs.items():
        n = len(seq.tokens)
        want = np.asarray(seq.tokens, np.float32)
        if self.cfg.kv_quant is None:
          np.testing.assert_array_equal(k[s, :n, 0, 0], want)
          np.testing.assert_array_equal(v[s, :n, 0, 1], -want)
        else:  # V: both dims hold the token's value (code +-127, scale |value| / 127); K:
          # within the rounding / requantisation bound of its block's channel scale (int8 K
          # scales are per block and channel, widened by later writes into the block)
          np.testing.assert_allclose(v[s, :n, 0, 1], -want, rtol=1e-6)
          pos = np.arange(n) // self.cfg.block_size
          step = k_step[layer, 0, tables[s, pos], 0]
          later = np.array([seq.blocks[j].writes for j in pos]) - np.asarray(seq.marks)
          bound = channel_k_error_bound(step, later, "int8") + np.asarray(
              [f[layer] for f in seq.floors], np.float64).reshape(n)
          assert (np.abs(k[s, :n, 0, 0] - want) <= bound).all()
    # Sharing structure: two table entries name the same block iff the model says they share.
    entries = [(s, j, b) for s, seq in self.seqs.items() for j, b in enumerate(seq.blocks)]
    for (s1, j1, b1), (s2, j2, b2) in itertools.combinations(entries, 2):
      assert (tables[s1, j1] == tables[s2, j2]) == (b1 is b2)
    refs = np.asarray(c.allocator.ref_counts)
    for s, j, b in entries:
      assert refs[tables[s, j]] == self.refcount(b)


CacheMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCacheMachine = CacheMachine.TestCase


class Int8CacheMachine(CacheMachine):
  """The same machine on an int8 cache: scales follow forks, copy-on-write, truncate, free."""
  cfg = dataclasses.replace(CFG, kv_quant="int8")


Int8CacheMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestInt8CacheMachine = Int8CacheMachine.TestCase
