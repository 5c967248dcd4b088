"""Boundary fuzzing: every public op, over every kind of argument a Python caller can produce.

Arguments are drawn across the whole domain: Python ints (tiny, negative, past ``int32``, past
``int64``), NumPy arrays of every integer dtype, floats, bools, wrong ranks, empty batches, and
NaN/Inf in K/V/Q. For each call the plain-Python specification in ``boundary_model.py`` predicts
the outcome: ``CacheShapeError``, the argument's named range error, or per-row status codes and
the new state. Eager calls must raise exactly that (and leave the cache untouched) or succeed
with exactly that state; the same call under ``jit`` (for the argument types ``jit`` takes) must
return exactly those status codes, with the cache bitwise unchanged when any row failed.
The number of cases run is reported at the end of the test session.
"""

from __future__ import annotations

import itertools
import os

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import jax_paged_kv as pk
from jax_paged_kv import Status
from tests import boundary_model as bm
from tests.fuzz_report import record
from tests.oracle import attention_np

CFG = bm.CFG
L, H, D, BS = CFG.num_layers, CFG.num_kv_heads, CFG.head_dim, CFG.block_size
NB = CFG.num_blocks
EXC = {Status.POOL_EXHAUSTED: pk.PoolExhaustedError, Status.INVALID_SLOT: pk.InvalidSlotError,
       Status.INACTIVE_SLOT: pk.InactiveSlotError,
       Status.SEQUENCE_TOO_LONG: pk.SequenceTooLongError, Status.SLOT_IN_USE: pk.SlotInUseError,
       Status.DUPLICATE_SLOT: pk.DuplicateSlotError, Status.INVALID_COUNT: pk.InvalidCountError,
       Status.INVALID_LAYER: pk.InvalidLayerError,
       Status.INVALID_TOKEN_SLOT: pk.InvalidTokenSlotError}
RANGE_ERROR = {"ids": pk.InvalidSlotError, "counts": pk.InvalidCountError,
               "layer": pk.InvalidLayerError}
TRACED_FALLBACK = {"ids": 2**31 - 1, "counts": -1, "layer": -1}
# CI: 60 examples per test; ``benchmarks/reliability.py`` runs more through the environment.
EXAMPLES = int(os.environ.get("JAX_PAGED_KV_FUZZ_EXAMPLES", "60"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ---------------------------------------------------------------------------------------------
# the starting state: sequences 0 (6 tokens), 1 (3 tokens), 2 (a fork of 0); slot 3 inactive

_counter = itertools.count(1)


def kv_of(values, layers=L):
  """K/V arrays ``[layers, batch, T, H, D]`` encoding token values (K = v + 100 * layer)."""
  vals = np.asarray(values, np.float32)  # [batch, T]
  k = vals[None, :, :, None, None] + 100.0 * np.arange(layers, dtype=np.float32)[
      :, None, None, None, None]
  k = np.broadcast_to(k, (layers, *vals.shape, H, D)).astype(np.float32)
  return k, -k


def _base():
  cache = pk.init_cache(CFG, pool_fill=np.nan)
  cache, _ = pk.allocate_sequences(cache, [0, 1])
  vals = [[float(next(_counter)) for _ in range(6)] for _ in range(2)]
  k, v = kv_of(vals)
  cache, _ = pk.append_kv(cache, k, v, [0, 1], num_new=[6, 3])
  cache, _ = pk.fork_sequence(cache, 0, 2)
  a, b, c = object(), object(), object()
  state = bm.State({0: vals[0], 1: vals[1][:3], 2: list(vals[0])},
                   {0: [a, b], 1: [c], 2: [a, b]})
  return cache, state


BASE, STATE = _base()
BASE_NP = jax.tree_util.tree_map(np.asarray, BASE)


def unchanged(cache):
  """Bitwise equal to the starting cache, telemetry aside (it counts rejections)."""
  got = jax.tree_util.tree_leaves(cache.replace(telemetry=BASE.telemetry))
  return all(np.array_equal(np.asarray(x), y, equal_nan=True)
             for x, y in zip(got, jax.tree_util.tree_leaves(BASE_NP), strict=True))


_lookup_all = jax.jit(lambda c, layer: pk.lookup_kv(c, jnp.arange(CFG.max_seqs), layer))


def assert_state(cache, state: bm.State):
  """The cache holds exactly ``state``: lengths, contents, free count and sharing."""
  report = pk.check_invariants(cache)
  assert bool(report.ok), report.failures()
  active, lens = np.asarray(cache.active), np.asarray(cache.seq_lens)
  for s in range(CFG.max_seqs):
    assert active[s] == (s in state.tokens)
    assert lens[s] == len(state.tokens.get(s, []))
  assert int(cache.allocator.num_free) == state.free_blocks()
  for layer in range(L):
    k, v, _ = _lookup_all(cache, layer)
    k, v = np.asarray(k), np.asarray(v)
    for s, toks in state.tokens.items():
      want = np.asarray(toks, np.float32) + 100 * layer
      np.testing.assert_array_equal(k[s, :len(toks), 0, 0], want)
      np.testing.assert_array_equal(v[s, :len(toks), 0, 1], -want)
  tables = np.asarray(cache.block_tables)
  entries = [(s, j, b) for s, bl in state.blocks.items() for j, b in enumerate(bl)]
  for (s1, j1, b1), (s2, j2, b2) in itertools.combinations(entries, 2):
    assert (tables[s1, j1] == tables[s2, j2]) == (b1 is b2)


# ---------------------------------------------------------------------------------------------
# argument strategies

WEIRD = [-(2**31), 2**31 - 1, 2**31, -(2**31) - 1, 2**32 - 1, 2**32 + 1, 2**40, -(2**40),
         2**63 - 1, -(2**63), 2**64 - 1, 2**70]
DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]
JIT_DTYPES = {np.dtype(t) for t in (np.int8, np.int16, np.int32, np.uint8, np.uint16,
                                    np.uint32)}


def int_values(lo, hi):
  return st.one_of(st.integers(lo, hi), st.integers(lo, hi), st.integers(lo, hi),
                   st.sampled_from(WEIRD))


def _fits(dtype, vals):
  info = np.iinfo(dtype)
  return all(info.min <= v <= info.max for v in vals)


@st.composite
def vector_arg(draw, n, lo, hi):
  """A 1-D argument of ``n`` entries in one of the forms a caller may pass."""
  vals = draw(st.lists(int_values(lo, hi), min_size=n, max_size=n))
  form = draw(st.sampled_from(["list", "np", "np", "np", "jax", "float", "bool", "2d"]))
  if form == "np":
    fitting = [t for t in DTYPES if _fits(t, vals)]
    if fitting:
      return np.asarray(vals, draw(st.sampled_from(fitting)))
  if form == "jax" and _fits(np.int32, vals):
    return jnp.asarray(vals, jnp.int32)
  if form == "float":
    return np.asarray([(v % 7) + 0.5 for v in vals], np.float64)
  if form == "bool":
    return np.asarray([v % 2 == 0 for v in vals], bool)
  if form == "2d" and _fits(np.int32, vals):
    return np.asarray(vals, np.int32).reshape(1, n)
  return vals


@st.composite
def scalar_arg(draw, lo, hi):
  v = draw(int_values(lo, hi))
  form = draw(st.sampled_from(["int", "int", "np", "np0d", "float", "bool"]))
  if form == "np":
    fitting = [t for t in DTYPES if _fits(t, [v])]
    if fitting:
      return draw(st.sampled_from(fitting))(v)
  if form == "np0d" and _fits(np.int64, [v]):
    return np.asarray(v, np.int64)
  if form == "float":
    return (v % 5) + 0.7
  if form == "bool":
    return v % 2 == 0
  return v


def counts_arg(n, lo, hi):
  return st.one_of(scalar_arg(lo, hi), vector_arg(n, lo, hi))


def expect_values(arg, kind, n=None, *, scalar_ok=True):
  """``("ok", ints)``, ``("raise", exc)``: what the eager call must do with this argument."""
  try:
    vals = bm.ints(arg, scalar_ok=scalar_ok)
  except bm.BadType:
    return "raise", pk.CacheShapeError
  except bm.OutOfInt32:
    return "raise", RANGE_ERROR[kind]
  if n is not None:
    if isinstance(vals, int):
      vals = [vals] * n
    elif len(vals) != n:
      return "raise", pk.CacheShapeError
  return "ok", vals


def jit_form(arg):
  """The argument as ``jit`` would take it (None if JAX itself would reject or narrow it)."""
  if isinstance(arg, jax.Array):
    return arg
  if isinstance(arg, np.ndarray | np.generic) and np.dtype(arg.dtype) in JIT_DTYPES:
    return np.asarray(arg)
  return None


def traced_values(arg, kind):
  """What the op sees of a traced argument: out-of-int32 values become the rejected fallback."""
  vals = np.asarray(arg).astype(np.int64).reshape(-1).tolist()
  vals = [v if bm.I32_MIN <= v <= bm.I32_MAX else TRACED_FALLBACK[kind] for v in vals]
  return vals if np.ndim(arg) else vals[0]


# ---------------------------------------------------------------------------------------------
# the checks


def check_eager(op, call, outcome, spec):
  """Runs ``call(cache)`` eagerly; ``outcome`` is ``("raise", exc)`` or ``("spec", None)``."""
  if outcome[0] == "raise":
    with pytest.raises(outcome[1]):
      call(BASE)
    assert unchanged(BASE)
    record(op, "raised " + outcome[1].__name__)
    return
  codes, new = spec()
  if any(codes):
    first = int(np.flatnonzero(codes)[0])
    with pytest.raises(EXC[Status(codes[first])]) as info:
      call(BASE)
    assert info.value.status == codes[first] and info.value.row in (first, 0)
    assert unchanged(BASE)
    record(op, "raised " + EXC[Status(codes[first])].__name__)
    return
  out = call(BASE)
  cache, status = out[0], out[-1]
  assert not np.any(np.asarray(status))
  assert_state(cache, new)
  assert unchanged(BASE)
  record(op, "ok")


def check_jit(op, fn, args, spec):
  """``fn(cache, *args)`` under jit returns ``spec()``'s codes; on failure, the input cache."""
  codes, new = spec()
  out = jax.jit(fn)(BASE, *args)
  cache, status = out[0], np.atleast_1d(np.asarray(out[-1]))
  np.testing.assert_array_equal(status, np.asarray(codes, np.int32).reshape(status.shape))
  if any(codes):
    assert unchanged(cache)
  else:
    assert_state(cache, new)
  record(op + " (jit)", "status" if any(codes) else "ok")


# ---------------------------------------------------------------------------------------------
# allocate / free / truncate / fork


@SETTINGS
@given(data=st.data())
def test_fuzz_allocate_and_free(data):
  n = data.draw(st.integers(0, 3))
  arg = data.draw(st.one_of(vector_arg(n, -3, 6), scalar_arg(-3, 6)))
  for op, fn, spec in (("allocate_sequences", pk.allocate_sequences, bm.spec_allocate),
                       ("free_sequences", pk.free_sequences, bm.spec_free)):
    kind, vals = expect_values(arg, "ids")
    outcome = ("raise", vals) if kind == "raise" else ("spec", None)
    ids = [vals] if isinstance(vals, int) else vals
    check_eager(op, lambda c, fn=fn: fn(c, arg, donate=False), outcome,
                lambda spec=spec, ids=ids: spec(STATE, ids))
    jarg = jit_form(arg)
    if jarg is not None and np.ndim(jarg) <= 1:
      tv = traced_values(jarg, "ids")
      tv = [tv] if isinstance(tv, int) else tv
      check_jit(op, fn, (jarg,), lambda spec=spec, tv=tv: spec(STATE, tv))


@SETTINGS
@given(data=st.data())
def test_fuzz_truncate(data):
  n = data.draw(st.integers(0, 3))
  ids = data.draw(vector_arg(n, -2, 5))
  counts = data.draw(counts_arg(n, -2, 8))
  k1, ivals = expect_values(ids, "ids")
  k2, cvals = expect_values(counts, "counts", n=None if k1 == "raise" else len(ivals))
  if k1 == "raise":
    outcome = ("raise", ivals)
  elif k2 == "raise":
    outcome = ("raise", cvals)
  else:
    outcome = ("spec", None)
  check_eager("truncate_sequences", lambda c: pk.truncate_sequences(c, ids, counts, donate=False),
              outcome, lambda: bm.spec_truncate(STATE, ivals, cvals))
  ji, jc = jit_form(ids), jit_form(counts)
  if ji is not None and jc is not None and np.ndim(ji) == 1 and np.ndim(jc) <= 1 and (
      np.ndim(jc) == 0 or np.shape(jc) == np.shape(ji)):
    tv, tc = traced_values(ji, "ids"), traced_values(jc, "counts")
    tc = [tc] * len(tv) if isinstance(tc, int) else tc
    check_jit("truncate_sequences", pk.truncate_sequences, (ji, jc),
              lambda: bm.spec_truncate(STATE, tv, tc))


@SETTINGS
@given(data=st.data())
def test_fuzz_fork(data):
  n = data.draw(st.integers(0, 3))
  parents = data.draw(st.one_of(vector_arg(n, -2, 5), st.lists(st.sampled_from([0, 1, 2]),
                                                                 min_size=n, max_size=n)))
  children = data.draw(vector_arg(n, -2, 5))
  k1, pvals = expect_values(parents, "ids")
  k2, cvals = expect_values(children, "ids")
  if k1 == "raise":
    outcome = ("raise", pvals)
  elif k2 == "raise":
    outcome = ("raise", cvals)
  elif len(pvals) != len(cvals):
    outcome = ("raise", pk.CacheShapeError)
  else:
    outcome = ("spec", None)
  check_eager("fork_sequence", lambda c: pk.fork_sequence(c, parents, children, donate=False),
              outcome, lambda: bm.spec_fork(STATE, pvals, cvals))
  jp, jc = jit_form(np.asarray(parents) if isinstance(parents, list) and all(
      -5 < p < 6 for p in parents) else parents), jit_form(children)
  if jp is not None and jc is not None and np.ndim(jp) == 1 and np.shape(jp) == np.shape(jc):
    tp, tc = traced_values(jp, "ids"), traced_values(jc, "ids")
    check_jit("fork_sequence", pk.fork_sequence, (jp, jc),
              lambda: bm.spec_fork(STATE, tp, tc))


@SETTINGS
@given(data=st.data())
def test_fuzz_reorder(data):
  n = data.draw(st.integers(0, 3))
  ids = data.draw(st.one_of(vector_arg(n, -2, 5), st.lists(st.sampled_from([0, 1, 2]),
                                                             min_size=n, max_size=n)))
  srcs = data.draw(st.one_of(vector_arg(n, -2, 5), st.lists(st.sampled_from([0, 1, 2]),
                                                              min_size=n, max_size=n)))
  k1, ivals = expect_values(ids, "ids")
  k2, svals = expect_values(srcs, "ids")
  if k1 == "raise":
    outcome = ("raise", ivals)
  elif k2 == "raise":
    outcome = ("raise", svals)
  elif len(ivals) != len(svals):
    outcome = ("raise", pk.CacheShapeError)
  else:
    outcome = ("spec", None)
  check_eager("reorder_sequences",
              lambda c: pk.reorder_sequences(c, ids, srcs, donate=False), outcome,
              lambda: bm.spec_reorder(STATE, ivals, svals))
  ji, js = jit_form(ids), jit_form(srcs)
  if ji is not None and js is not None and np.ndim(ji) == 1 and np.shape(ji) == np.shape(js):
    ti, ts = traced_values(ji, "ids"), traced_values(js, "ids")
    check_jit("reorder_sequences", pk.reorder_sequences, (ji, js),
              lambda: bm.spec_reorder(STATE, ti, ts))


# ---------------------------------------------------------------------------------------------
# append / reserve


@SETTINGS
@given(data=st.data())
def test_fuzz_append(data):
  n = data.draw(st.integers(0, 3))
  t = data.draw(st.integers(1, 6))
  ids = data.draw(st.one_of(vector_arg(n, -2, 5), st.lists(st.sampled_from([0, 1, 2, -1]),
                                                             min_size=n, max_size=n)))
  num_new = data.draw(st.one_of(st.none(), counts_arg(n, -1, 7)))
  vals = [[float(next(_counter)) for _ in range(t)] for _ in range(n)]
  k, v = kv_of(vals) if n else (np.zeros((L, 0, t, H, D), np.float32),) * 2
  poison = data.draw(st.sampled_from([None, np.nan, np.inf, -np.inf]))
  if poison is not None and n:
    # Token 0 of row 0 carries NaN/Inf in K and V: stored as it is, never spread elsewhere.
    k, v = k.copy(), v.copy()
    k[:, 0, 0], v[:, 0, 0] = poison, -poison
    vals[0][0] = poison
  bad_kv = data.draw(st.sampled_from([None, None, None, "dtype", "shape"]))
  if bad_kv == "dtype":
    k, v = k.astype(np.float16), v.astype(np.float16)
  elif bad_kv == "shape":
    k, v = k[..., :1], v[..., :1]
  k1, ivals = expect_values(ids, "ids")
  k2, cvals = expect_values(t if num_new is None else num_new, "counts",
                            n=None if k1 == "raise" else len(ivals))
  if bad_kv:
    outcome = ("raise", pk.CacheShapeError)
  elif k1 == "raise":
    outcome = ("raise", ivals)
  elif len(ivals) != n:
    outcome = ("raise", pk.CacheShapeError)
  elif k2 == "raise":
    outcome = ("raise", cvals)
  else:
    outcome = ("spec", None)

  check_eager("append_kv", lambda c: pk.append_kv(c, k, v, ids, num_new=num_new, donate=False),
              outcome, lambda: bm.spec_append(STATE, ivals, cvals, t, vals))
  jids = jit_form(ids if not isinstance(ids, list) or not _fits(np.int32, ids)
                  else np.asarray(ids, np.int32))
  jn = None if num_new is None else jit_form(num_new)
  if (not bad_kv and jids is not None and np.ndim(jids) == 1
      and len(jids) == n and (num_new is None or (jn is not None and (
          np.ndim(jn) == 0 or np.shape(jn) == (n,))))):
    tv = traced_values(jids, "ids")
    tc = [t] * n if num_new is None else traced_values(jn, "counts")
    tc = [tc] * n if isinstance(tc, int) else tc
    # K and V are arguments, not constants baked into the program: examples of the same shapes
    # then lower to the same program, which the run's compilation cache serves (conftest.py).
    fn = (lambda c, k, v, i: pk.append_kv(c, k, v, i)) if num_new is None else (
        lambda c, k, v, i, m: pk.append_kv(c, k, v, i, num_new=m))
    check_jit("append_kv", fn, (k, v, jids) if num_new is None else (k, v, jids, jn),
              lambda: bm.spec_append(STATE, tv, tc, t, vals))


@SETTINGS
@given(data=st.data())
def test_fuzz_reserve_max_new(data):
  n = data.draw(st.integers(1, 2))
  ids = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, -1]), min_size=n, max_size=n))
  num_new = data.draw(st.one_of(st.integers(-1, 5), st.just(True), st.just(2.0),
                                st.lists(st.integers(-1, 5), min_size=n, max_size=n)))
  max_new = data.draw(st.sampled_from([None, 0, 3, 5, -1, True, 2.5, 2**40]))
  if max_new is None and (isinstance(num_new, bool) or not isinstance(num_new, int)):
    outcome = ("raise", pk.CacheShapeError)
  elif max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int)
                                or not 0 <= max_new < 2**31):
    outcome = ("raise", pk.CacheShapeError)
  else:
    kind, cvals = expect_values(num_new, "counts", n=n)
    outcome = ("raise", cvals) if kind == "raise" else ("spec", None)
  mn = num_new if max_new is None else max_new

  def spec():
    cv = [num_new] * n if isinstance(num_new, int) else num_new
    vals = [[float(next(_counter)) for _ in range(max(mn, 1))] for _ in range(n)]
    codes, new = bm.spec_append(STATE, ids, cv, mn, vals)
    if new is not None:  # reserve grows lengths; the new tokens' K/V are not written yet
      for s in new.tokens:
        old = len(STATE.tokens.get(s, []))
        new.tokens[s] = new.tokens[s][:old]
    return codes, new

  if outcome[0] == "raise":
    return check_eager("reserve", lambda c: pk.reserve(c, ids, num_new, max_new=max_new,
                                                       donate=False), outcome, spec)
  codes, new = spec()
  if any(codes):
    return check_eager("reserve", lambda c: pk.reserve(c, ids, num_new, max_new=max_new,
                                                       donate=False), outcome, spec)
  cache, slots, status = pk.reserve(BASE, ids, num_new, max_new=max_new, donate=False)
  assert not np.any(np.asarray(status)) and bool(pk.check_invariants(cache).ok)
  cv = [num_new] * n if isinstance(num_new, int) else num_new
  lens = np.asarray(cache.seq_lens)
  for r, s in enumerate(ids):
    if s >= 0:
      assert lens[s] == len(STATE.tokens[s]) + cv[r]
      row = np.asarray(slots)[r]
      assert np.all(row[cv[r]:] == NB * BS) and np.all(row[:cv[r]] < NB * BS)
  record("reserve", "ok")


def test_reserve_negative_count_without_max_new_is_a_bad_row():
  """Found by the 240-example fuzz: ``reserve(c, ids, -1)`` raised CacheShapeError about a
  ``max_new`` the caller never passed; it is a bad count (a status under jit)."""
  for count in (-1, 2**31, 2**40):  # a scalar past int32 is refused whole (no row)
    with pytest.raises(pk.InvalidCountError, match="num_new") as info:
      pk.reserve(BASE, [0], count, donate=False)
    assert info.value.status == Status.INVALID_COUNT
    assert info.value.row == (0 if count < 0 else None)
  out, slots, status = jax.jit(lambda c: pk.reserve(c, [0, 1], -1))(BASE)
  assert list(np.asarray(status)) == [Status.INVALID_COUNT] * 2 and slots.shape == (2, 0)
  assert unchanged(out) and unchanged(BASE)


def test_write_kv_refuses_a_float_layer_before_reading_the_slots():
  """Found by the 240-example fuzz: a float layer with uint32 slots past int32 raised
  InvalidSlotError; the wrong-type argument is named first, whatever the slots hold."""
  k = np.ones((1, 1, H, D), np.float32)
  slots = np.asarray([[-1]], np.int64).astype(np.uint32)
  with pytest.raises(pk.CacheShapeError, match="layer"):
    pk.write_kv(BASE, slots, k, -k, 1.5, donate=False)
  assert unchanged(BASE)


# ---------------------------------------------------------------------------------------------
# write_kv


def _slot_pool():
  """Token slots of every kind: own (seq 1's block), shared (0 and 2), null, free, junk."""
  tables, refs = BASE_NP.block_tables, BASE_NP.allocator.ref_counts
  own = [int(tables[1, 0]) * BS + o for o in range(BS)]
  shared = [int(tables[0, j]) * BS + o for j in range(2) for o in range(BS)]
  free = [b * BS for b in range(1, NB) if refs[b] == 0][:2]
  return own, shared + free + [0, 1, NB * BS - 1 + 1 + 1, -1, -BS, NB * BS]


OWN_SLOTS, OTHER_SLOTS = _slot_pool()


def spec_write(slots, seq_ids, layer):
  """Per-row status of a write and the expected pools (NumPy model)."""
  tables, refs = BASE_NP.block_tables, BASE_NP.allocator.ref_counts
  codes = []
  for r, row in enumerate(slots):
    ok = True
    for s in row:
      if s == NB * BS:
        continue
      blk = s // BS
      if not (0 <= s < NB * BS and blk != 0 and refs[blk] == 1):
        ok = False
      elif seq_ids is not None:
        sid = seq_ids[r]
        if sid < 0 or sid >= CFG.max_seqs or sid not in STATE.tokens:
          ok = False
        else:
          js = [j for j in range(tables.shape[1]) if tables[sid, j] == blk]
          ok = ok and any(j * BS + s % BS < len(STATE.tokens[sid]) for j in js)
    codes.append(0 if ok else Status.INVALID_TOKEN_SLOT)
  if seq_ids is not None:
    rs = bm.row_status(STATE, seq_ids, duplicates=False)
    codes = [c or (Status.INVALID_TOKEN_SLOT if rs[r] else 0) for r, c in enumerate(codes)]
  if not 0 <= layer < L:
    codes = [Status.INVALID_LAYER] * len(slots)
  return codes


@SETTINGS
@given(data=st.data())
def test_fuzz_write_kv(data):
  n = data.draw(st.integers(1, 3))
  t = data.draw(st.integers(1, 2))
  slot_vals = data.draw(st.lists(st.lists(st.one_of(st.sampled_from(OWN_SLOTS),
                                                      st.sampled_from(OTHER_SLOTS),
                                                      st.just(NB * BS)),
                                          min_size=t, max_size=t), min_size=n, max_size=n))
  seq_ids = data.draw(st.one_of(st.none(), st.lists(st.sampled_from([1, 1, 0, 3, -1, 9]),
                                                    min_size=n, max_size=n)))
  layer = data.draw(st.one_of(st.integers(-1, 2), st.just(1.5), st.just(True)))
  slots_arg = data.draw(st.sampled_from(["np", "list", "uint32", "float"]))
  slots = {"np": np.asarray(slot_vals, np.int32), "list": slot_vals,
           "uint32": np.asarray(slot_vals, np.int64).astype(np.uint32),
           "float": np.asarray(slot_vals, np.float32)}[slots_arg]
  k = np.full((n, t, H, D), 1000.0 + next(_counter), np.float32)
  v = -k
  if isinstance(layer, bool | float) or slots_arg == "float":
    with pytest.raises(pk.CacheShapeError):
      pk.write_kv(BASE, slots, k, v, layer, seq_ids=seq_ids, donate=False)
    assert unchanged(BASE)
    return record("write_kv", "raised CacheShapeError")
  if slots_arg == "uint32":
    u = np.asarray(slots).astype(np.int64)
    if np.any(u > bm.I32_MAX):
      with pytest.raises(pk.InvalidSlotError):
        pk.write_kv(BASE, slots, k, v, layer, seq_ids=seq_ids, donate=False)
      assert unchanged(BASE)
      record("write_kv", "raised InvalidSlotError")
      traced = np.where(u > bm.I32_MAX, bm.I32_MAX, u).tolist()
      codes = spec_write(traced, seq_ids, layer)
      out, st_ = jax.jit(lambda c, s: pk.write_kv(c, s, k, v, layer, seq_ids=seq_ids))(
          BASE, slots)
      np.testing.assert_array_equal(np.asarray(st_), codes)
      assert unchanged(out)
      return record("write_kv (jit)", "status")
  codes = spec_write(slot_vals, seq_ids, layer)
  want_k, want_v = BASE_NP.k_pool.copy(), BASE_NP.v_pool.copy()
  if not any(codes):
    for r, row in enumerate(slot_vals):
      for i, s in enumerate(row):
        if s != NB * BS:
          want_k[layer, :, s // BS, s % BS] = k[r, i]
          want_v[layer, :, s // BS, s % BS] = v[r, i]
  for jit in (False, True):
    if jit:
      out, status = jax.jit(lambda c, s: pk.write_kv(c, s, k, v, layer, seq_ids=seq_ids))(
          BASE, np.asarray(slot_vals, np.int32))
      np.testing.assert_array_equal(np.asarray(status), codes)
    elif any(codes):
      first = int(np.flatnonzero(codes)[0])
      with pytest.raises(EXC[Status(codes[first])]):
        pk.write_kv(BASE, slots, k, v, layer, seq_ids=seq_ids, donate=False)
      out = BASE
    else:
      out, status = pk.write_kv(BASE, slots, k, v, layer, seq_ids=seq_ids, donate=False)
      assert not np.any(np.asarray(status))
    np.testing.assert_array_equal(np.asarray(out.k_pool), want_k)
    np.testing.assert_array_equal(np.asarray(out.v_pool), want_v)
    assert unchanged(out.replace(k_pool=BASE.k_pool, v_pool=BASE.v_pool))
    record("write_kv" + (" (jit)" if jit else ""), "status" if any(codes) else "ok")
  assert unchanged(BASE)


# ---------------------------------------------------------------------------------------------
# reads: lookup_kv and paged_attention


def _expected_read(ids, layer):
  """Dense K/V and lengths the read must return for int32 ``ids`` (bad rows read empty)."""
  ks = np.zeros((len(ids), CFG.max_seq_len, H, D), np.float32)
  lens = np.zeros(len(ids), np.int32)
  for r, s in enumerate(ids):
    if 0 <= s < CFG.max_seqs and s in STATE.tokens and 0 <= layer < L:
      toks = np.asarray(STATE.tokens[s], np.float32) + 100 * layer
      ks[r, :len(toks)] = toks[:, None, None]
      lens[r] = len(toks)
  return ks, -ks, lens


@SETTINGS
@given(data=st.data())
def test_fuzz_lookup(data):
  n = data.draw(st.integers(0, 3))
  ids = data.draw(st.one_of(vector_arg(n, -2, 5), scalar_arg(-2, 5)))
  layer = data.draw(scalar_arg(-1, 2))
  max_len = data.draw(st.sampled_from([None, 0, 5, 16, 20, -1, 2.5, True, 2**40]))
  k1, ivals = expect_values(ids, "ids")
  k2, lay = expect_values(layer, "layer", scalar_ok=True)
  if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)
                              or not 0 <= max_len < 2**31):
    outcome = ("raise", pk.CacheShapeError)
  elif k1 == "raise":
    outcome = ("raise", ivals)
  elif k2 == "raise" or not isinstance(lay, int):
    outcome = ("raise", lay if k2 == "raise" else pk.CacheShapeError)
  else:
    outcome = ("spec", None)
  call = lambda c: pk.lookup_kv(c, ids, layer, max_len=max_len)  # noqa: E731
  if outcome[0] == "raise":
    with pytest.raises(outcome[1]):
      call(BASE)
    return record("lookup_kv", "raised " + outcome[1].__name__)
  iv = [ivals] if isinstance(ivals, int) else ivals
  codes, _ = bm.spec_read(STATE, iv, lay)
  if any(codes):
    first = int(np.flatnonzero(codes)[0])
    with pytest.raises(EXC[Status(codes[first])]):
      call(BASE)
    return record("lookup_kv", "raised " + EXC[Status(codes[first])].__name__)
  k, v, lens = call(BASE)
  m = CFG.max_seq_len if max_len is None else max_len
  wk, wv, wl = _expected_read(iv, lay)
  pad = ((0, 0), (0, max(m - CFG.max_seq_len, 0)), (0, 0), (0, 0))
  np.testing.assert_array_equal(np.asarray(k), np.pad(wk, pad)[:, :m])
  np.testing.assert_array_equal(np.asarray(v), np.pad(wv, pad)[:, :m])
  np.testing.assert_array_equal(np.asarray(lens), np.minimum(wl, m))
  record("lookup_kv", "ok")
  jids, jl = jit_form(ids), jit_form(layer)
  if jids is not None and jl is not None and np.ndim(jids) <= 1 and np.ndim(jl) == 0:
    tv = traced_values(jids, "ids")
    tv = [tv] if isinstance(tv, int) else tv
    k, v, lens = jax.jit(lambda c, i, la: pk.lookup_kv(c, i, la, max_len=m))(BASE, jids, jl)
    wk, wv, wl = _expected_read(tv, traced_values(jl, "layer"))
    np.testing.assert_array_equal(np.asarray(lens), np.minimum(wl, m))
    np.testing.assert_array_equal(np.asarray(k)[:, :CFG.max_seq_len], wk[:, :m])
    np.testing.assert_array_equal(np.asarray(v)[:, :CFG.max_seq_len], wv[:, :m])
    record("lookup_kv (jit)", "ok")


@SETTINGS
@given(data=st.data())
def test_fuzz_paged_attention(data):
  n = data.draw(st.integers(1, 3))
  q_len = data.draw(st.integers(1, 3))
  ids = data.draw(st.one_of(vector_arg(n, -2, 5), st.lists(st.sampled_from([0, 1, 2, -1]),
                                                             min_size=n, max_size=n)))
  layer = data.draw(scalar_arg(-1, 2))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
  q = rng.standard_normal((n, q_len, 2 * H, D)).astype(np.float32)
  poison_q = data.draw(st.booleans())
  if poison_q:
    q[0] = np.nan  # row 0's own queries: only row 0's output may be NaN
  k1, ivals = expect_values(ids, "ids")
  k2, lay = expect_values(layer, "layer")
  if k1 == "raise":
    outcome = ("raise", ivals)
  elif len(ivals) != n:
    outcome = ("raise", pk.CacheShapeError)
  elif k2 == "raise":
    outcome = ("raise", lay)
  else:
    outcome = ("spec", None)
  call = lambda c: pk.paged_attention(q, c, ids, layer, implementation="xla")  # noqa: E731
  if outcome[0] == "raise":
    with pytest.raises(outcome[1]):
      call(BASE)
    return record("paged_attention", "raised " + outcome[1].__name__)
  codes, _ = bm.spec_read(STATE, ivals, lay)
  if any(codes):
    first = int(np.flatnonzero(codes)[0])
    with pytest.raises(EXC[Status(codes[first])]):
      call(BASE)
    return record("paged_attention", "raised " + EXC[Status(codes[first])].__name__)
  out = np.asarray(call(BASE))
  tables = np.zeros((n, CFG.max_blocks_per_seq), np.int32)
  lens = np.zeros(n, np.int32)
  for r, s in enumerate(ivals):
    if s >= 0:
      tables[r] = BASE_NP.block_tables[s]
      lens[r] = len(STATE.tokens[s])
  qlens = np.minimum(lens, q_len)
  want, _ = attention_np(q, BASE_NP.k_pool, BASE_NP.v_pool, lay, tables, lens, qlens,
                         scale=D ** -0.5)
  # The kernel contract (reference.py): a query with NaN logits gives NaN, as the float64
  # oracle does; one that sees no key gives 0 (NaN q or not), and no other row changes.
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  if poison_q:
    assert np.array_equal(np.isnan(out[0]).all(axis=-1), np.isnan(want[0]).all(axis=-1))
  record("paged_attention", "ok" + (" (NaN q)" if poison_q else ""))
