"""The shared paged-attention test base: the same cases for every implementation.

A test module subclasses :class:`AttentionCases` and sets ``implementation`` and ``knobs``
(e.g. ``{"interpret": True}`` for a Pallas kernel on CPU). Every case builds a fresh random cache
whose block tables are random permutations, whose free blocks, unused slots and other layer are
NaN-poisoned, and compares with the float64 NumPy oracle in ``oracle.py``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jax_paged_kv as pk
from tests.oracle import (
    attention_np,
    pack_int4_np,
    quantize_channel_k_np,
    quantize_int4_np,
    quantize_np,
    unpack_int4_np,
)

TOLERANCES = {  # (atol, rtol) for outputs; LSE uses the same atol
    jnp.dtype(jnp.float32): (2e-5, 2e-5),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
    jnp.dtype(jnp.float16): (4e-3, 4e-3),
}


@dataclasses.dataclass(frozen=True)
class Case:
  lengths: tuple[int, ...]  # kv length per row; -1 marks a padding row (seq_id -1)
  block_size: int = 16
  kv_heads: int = 2
  ratio: int = 1  # q_heads // kv_heads
  head_dim: int = 64
  q_len: int = 1  # 1 = decode; > 1 = chunked prefill
  q_lens: tuple[int, ...] | None = None  # ragged valid queries (default: min(q_len, length))
  dtype: str = "float32"
  soft_cap: float | None = None
  sliding_window: int | None = None
  seed: int = 0

  def __str__(self):
    parts = [f"L{'-'.join(map(str, self.lengths))}", f"bs{self.block_size}",
             f"h{self.kv_heads}x{self.ratio}", f"d{self.head_dim}", f"q{self.q_len}", self.dtype]
    if self.soft_cap:
      parts.append(f"cap{self.soft_cap}")
    if self.sliding_window:
      parts.append(f"win{self.sliding_window}")
    if self.q_lens:
      parts.append(f"ql{'-'.join(map(str, self.q_lens))}")
    return "_".join(parts)


ODD_LENGTHS = (0, 1, 3, 15, 16, 17, 255)

DECODE_CASES = [
    # issue-2 grid: block sizes 8/16/32, GQA 1/2/5/8, head_dim 64/128, both dtypes
    Case(ODD_LENGTHS, block_size=16, ratio=1, head_dim=64),
    Case(ODD_LENGTHS, block_size=8, ratio=2, head_dim=128),
    Case(ODD_LENGTHS, block_size=32, ratio=5, head_dim=64),
    Case(ODD_LENGTHS, block_size=16, ratio=8, head_dim=128, kv_heads=1),
    Case(ODD_LENGTHS, block_size=16, ratio=2, head_dim=64, dtype="bfloat16"),
    Case(ODD_LENGTHS, block_size=8, ratio=5, head_dim=128, dtype="bfloat16"),
    # issue-3 grid additions: GQA 4/20, block 64, length 513, padding rows
    Case((513, 0, 17, -1, 64), block_size=64, ratio=4, head_dim=64),
    Case((1, 40, -1, 100), block_size=8, ratio=20, head_dim=64, kv_heads=1),
    Case((513, 3, 16), block_size=32, ratio=4, head_dim=128, dtype="bfloat16"),
    # options
    Case((1, 17, 100), ratio=2, soft_cap=5.0),
    Case((1, 17, 100, 255), block_size=8, ratio=4, sliding_window=20),
    Case((0, 30, 100), ratio=2, soft_cap=3.0, sliding_window=7, dtype="bfloat16"),
]

PREFILL_CASES = [
    Case((16, 17, 40), q_len=16, ratio=2),
    Case((5, 33, 255), q_len=5, block_size=8, ratio=5, head_dim=128),
    Case((0, 9, 64, 100), q_len=12, q_lens=(0, 9, 12, 3), block_size=16, ratio=4),
    Case((20, 100, -1), q_len=8, block_size=32, ratio=1, dtype="bfloat16"),
    Case((30, 130), q_len=16, ratio=2, sliding_window=9, soft_cap=4.0),
    Case((513, 64), q_len=16, block_size=64, ratio=20, kv_heads=1, head_dim=64),
]


NAN, INF = float("nan"), float("inf")


@dataclasses.dataclass(frozen=True)
class Poison:
  """A non-finite value written into V of one cached token (a valid position of a row)."""
  row: int
  pos: int
  value: float
  kv_head: int | None = None  # None: every KV head
  dims: tuple[int, ...] | None = None  # None: every dim


@dataclasses.dataclass(frozen=True)
class PoisonedV:
  """A case plus the non-finite V values written into it (``test_nonfinite_v``)."""
  name: str
  case: Case
  poisons: tuple[Poison, ...]
  # Every query is one vector u and the poisoned tokens' K is -1000 u: their probability
  # underflows to exactly 0 (IEEE would turn an Inf V into NaN; the contract reports the Inf).
  underflow: bool = False

  def __str__(self):
    return self.name


NONFINITE_V_CASES = [
    # Chunked prefill, causal, GQA. Row 0: a whole token NaN, queries before it clean. Row 1: one
    # dim of one KV head, ragged q_lens. Row 2: two dims of the last token (only the last query).
    PoisonedV("nan_causal", Case((40, 29, 12), q_len=12, q_lens=(12, 9, 12), block_size=8,
                                 ratio=2, head_dim=16), (
        Poison(0, 31, NAN),
        Poison(1, 22, NAN, kv_head=1, dims=(3,)),
        Poison(2, 11, NAN, kv_head=0, dims=(0, 5)),
    )),
    # Sliding window 5, bfloat16: +Inf and -Inf on overlapping dims, so queries see neither,
    # one, both (NaN where they overlap) or, past the window, neither again. Row 1: a NaN token
    # before every window and a -Inf one that some queries see.
    PoisonedV("inf_window", Case((45, 30), q_len=10, block_size=16, ratio=2, head_dim=16,
                                 sliding_window=5, dtype="bfloat16"), (
        Poison(0, 37, INF, dims=(0, 1, 2, 3)),
        Poison(0, 39, -INF, dims=(2, 3, 4, 5)),
        Poison(1, 10, NAN),
        Poison(1, 24, -INF, kv_head=0, dims=(7,)),
    )),
    # One sequence's V entirely NaN; the other rows of the batch must not notice.
    PoisonedV("nan_row", Case((20, 33, 7), q_len=8, block_size=8, kv_heads=1, ratio=4,
                              head_dim=16), tuple(Poison(1, p, NAN) for p in range(33))),
    # Decode with a window: a visible NaN, an Inf outside the window, a visible -Inf.
    PoisonedV("decode_window", Case((20, 9, 30), block_size=8, ratio=3, head_dim=16,
                                    sliding_window=6), (
        Poison(0, 19, NAN, kv_head=1, dims=(1, 2)),
        Poison(2, 10, INF),
        Poison(2, 27, -INF, kv_head=0, dims=(0,)),
    )),
    # +-Inf whose probability underflows to 0: the sign is reported, not NaN.
    PoisonedV("inf_underflow", Case((24, 16), q_len=6, block_size=8, kv_heads=1, ratio=2,
                                    head_dim=16), (
        Poison(0, 20, INF, dims=(0, 1)),
        Poison(1, 12, -INF, dims=(1, 2)),
    ), underflow=True),
    # The same in decode, where every row's one query sees all its keys; row 1 also gets
    # -Inf and +Inf on one dim (NaN); row 2 stays clean.
    PoisonedV("decode_inf_underflow", Case((24, 16, 9), block_size=8, kv_heads=1, ratio=2,
                                           head_dim=16), (
        Poison(0, 20, INF, dims=(0, 1)),
        Poison(1, 12, -INF, dims=(1, 2)),
        Poison(1, 13, INF, dims=(2, 3)),
    ), underflow=True),
]


def poison_v(pv: PoisonedV, cache, q, layer, *, write_v: bool = True):
  """``(cache, q)`` with ``pv``'s values written into V (and, for ``underflow``, K and q)."""
  case = pv.case
  tables = np.asarray(cache.block_tables)
  k_pool = np.asarray(cache.k_pool, np.float32).copy()
  v_pool = np.asarray(cache.v_pool, np.float32).copy()
  if pv.underflow:
    u = np.random.default_rng(case.seed + 1).standard_normal(case.head_dim)
    q = jnp.asarray(np.broadcast_to(u, q.shape), q.dtype)
  for p in pv.poisons:
    assert 0 <= p.pos < case.lengths[p.row]
    blk, off = tables[p.row, p.pos // case.block_size], p.pos % case.block_size
    heads = range(case.kv_heads) if p.kv_head is None else [p.kv_head]
    dims = list(range(case.head_dim) if p.dims is None else p.dims)
    for h in heads:
      if write_v:
        v_pool[layer, h, blk, off, dims] = p.value
      if pv.underflow:
        k_pool[layer, h, blk, off] = -1000.0 * u
  dtype = jnp.dtype(case.dtype)
  return cache.replace(k_pool=jnp.asarray(k_pool, dtype), v_pool=jnp.asarray(v_pool, dtype)), q


def sees_poison(pv: PoisonedV, q_lens) -> np.ndarray:
  """``bool[batch, q_len, q_heads]``: outputs whose query may see a poisoned token."""
  case = pv.case
  out = np.zeros((len(case.lengths), case.q_len, case.kv_heads * case.ratio), bool)
  for p in pv.poisons:
    n, ql = case.lengths[p.row], int(q_lens[p.row])
    heads = (slice(None) if p.kv_head is None
             else slice(p.kv_head * case.ratio, (p.kv_head + 1) * case.ratio))
    for i in range(ql):
      pos = n - ql + i
      if p.pos <= pos and (case.sliding_window is None or p.pos > pos - case.sliding_window):
        out[p.row, i, heads] = True
  return out


def build_case(case: Case, *, num_layers: int = 2, layer: int = 1, spare_blocks: int = 5):
  """A cache holding random data for each row, with every other memory cell NaN.

  Returns ``(cache, q, seq_ids, q_lens, layer)``.
  """
  rng = np.random.default_rng(case.seed)
  dtype = jnp.dtype(case.dtype)
  bs = case.block_size
  batch = len(case.lengths)
  lengths = [max(n, 0) for n in case.lengths]
  max_len = max(max(lengths), 1)
  blocks_needed = [-(-n // bs) for n in lengths]
  total = sum(blocks_needed)
  cfg = pk.CacheConfig(num_layers=num_layers, num_kv_heads=case.kv_heads,
                       head_dim=case.head_dim, num_blocks=1 + total + spare_blocks,
                       max_seqs=batch, max_seq_len=max_len, block_size=bs, dtype=dtype)
  perm = rng.permutation(np.arange(1, cfg.num_blocks))[:total]
  tables = np.zeros((batch, cfg.max_blocks_per_seq), np.int32)
  k_pool = np.full(cfg.pool_shape, np.nan, np.float32)
  v_pool = np.full(cfg.pool_shape, np.nan, np.float32)
  start = 0
  for r, n in enumerate(lengths):
    nb = blocks_needed[r]
    tables[r, :nb] = perm[start:start + nb]
    start += nb
    for p in range(n):
      blk, off = tables[r, p // bs], p % bs
      k_pool[layer, :, blk, off] = rng.standard_normal((case.kv_heads, case.head_dim))
      v_pool[layer, :, blk, off] = rng.standard_normal((case.kv_heads, case.head_dim))
  cache = pk.init_cache(cfg)
  active = np.array([n >= 0 for n in case.lengths])
  cache = cache.replace(
      k_pool=jnp.asarray(k_pool, dtype), v_pool=jnp.asarray(v_pool, dtype),
      block_tables=jnp.asarray(tables), seq_lens=jnp.asarray(lengths, jnp.int32),
      active=jnp.asarray(active))
  seq_ids = np.array([r if n >= 0 else -1 for r, n in enumerate(case.lengths)], np.int32)
  qh = case.kv_heads * case.ratio
  q = jnp.asarray(rng.standard_normal((batch, case.q_len, qh, case.head_dim)), dtype)
  if case.q_lens is None:
    q_lens = np.array([min(case.q_len, n) for n in lengths], np.int32)
  else:
    q_lens = np.array(case.q_lens, np.int32)
  return cache, q, seq_ids, q_lens, layer


def oracle(case: Case, cache, q, seq_ids, q_lens, layer):
  lengths = np.array([max(n, 0) for n in case.lengths])
  return attention_np(q, cache.k_pool, cache.v_pool, layer, np.asarray(cache.block_tables),
                      lengths, q_lens, scale=case.head_dim ** -0.5, soft_cap=case.soft_cap,
                      sliding_window=case.sliding_window)


QUANT_FORMATS = ("int8", "fp8", "int4")
# Relative L2 error bound of the output vs float64 attention on the unquantised data (issue 12).
QUANT_BOUNDS = {
    ("int8", "normal"): 1.5e-2, ("fp8", "normal"): 6e-2,
    ("int8", "heavy"): 5e-2, ("fp8", "heavy"): 6e-2,
    ("int4", "normal"): 0.2, ("int4", "heavy"): 0.3,
}
QUANT_CASES = [  # GQA decode and chunked prefill; block 32 is one int8 / fp8 TPU tile per page
    Case((1, 37, 100), block_size=32, ratio=4, head_dim=64),
    Case((8, 45, 70), q_len=8, block_size=32, ratio=2, head_dim=64, seed=1),
]


def heavy_tailed(cache, case: Case):
  """``cache`` with K outlier channels (x12, +6 on 4 channels) and log-normal V token norms."""
  rng = np.random.default_rng(case.seed + 7)
  k = np.asarray(cache.k_pool, np.float64).copy()
  v = np.asarray(cache.v_pool, np.float64)
  channels = rng.choice(case.head_dim, 4, replace=False)
  k[..., channels] = k[..., channels] * 12.0 + 6.0
  v = v * np.exp(rng.standard_normal(v.shape[:-1]))[..., None]
  dtype = jnp.dtype(case.dtype)
  return cache.replace(k_pool=jnp.asarray(k, dtype), v_pool=jnp.asarray(v, dtype))


def quantized_cache(cache, kv_quant: str):
  """The same cache stored in ``kv_quant`` by the NumPy format model (NaN slots: NaN scale)."""
  cfg = dataclasses.replace(cache.config, kv_quant=kv_quant, pool_bits=None)
  out = {}
  if kv_quant == "int4":
    kc, ks, vc, vs = quantize_int4_np(cache.k_pool, cache.v_pool)
    for name, c, sc in (("k", kc, ks), ("v", vc, vs)):
      out[f"{name}_pool"] = jnp.asarray(pack_int4_np(c))
      out[f"{name}_scale"] = jnp.asarray(sc, jnp.bfloat16)
    return cache.replace(config=cfg, **out)
  names = ("k", "v")
  if kv_quant == "int8":  # K: per (block, channel) scales
    kc, ks = quantize_channel_k_np(cache.k_pool, kv_quant)
    out["k_pool"] = jnp.asarray(kc, cfg.storage_dtype)
    out["k_scale"] = jnp.asarray(ks, jnp.float32)
    names = ("v",)
  for name in names:
    codes, scale = quantize_np(getattr(cache, f"{name}_pool"), kv_quant)
    codes = np.where(np.isfinite(codes), codes, 0.0)
    out[f"{name}_pool"] = jnp.asarray(codes, cfg.storage_dtype)
    out[f"{name}_scale"] = jnp.asarray(scale, jnp.float32)
  return cache.replace(config=cfg, **out)


def dequantized_pools(qcache):
  """float64 ``(k_pool, v_pool)`` of a quantised cache, decoded in NumPy (the format model)."""
  def f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)

  if qcache.config.kv_quant == "int8":  # K per (block, channel), V per token
    return (f64(qcache.k_pool) * f64(qcache.k_scale)[..., None, :],
            f64(qcache.v_pool) * f64(qcache.v_scale)[..., None])
  if qcache.config.kv_quant == "fp8":
    return tuple(f64(getattr(qcache, f"{n}_pool")) * f64(getattr(qcache, f"{n}_scale"))[..., None]
                 for n in ("k", "v"))
  k = unpack_int4_np(qcache.k_pool) * f64(qcache.k_scale)[..., None, :]
  vc = unpack_int4_np(qcache.v_pool)
  vs = f64(qcache.v_scale)
  d, groups = vc.shape[-1], vs.shape[-1]
  v = (vc.reshape(*vc.shape[:-1], groups, d // groups) * vs[..., None]).reshape(vc.shape)
  return k, v


def relative_l2(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


class AttentionCases:
  """Subclass with ``implementation`` / ``knobs`` to run every case on one implementation.

  ``decode_cases`` / ``prefill_cases`` (lists of :class:`Case` or ``pytest.param(case,
  marks=pytest.mark.slow)``) parametrize ``test_decode`` / ``test_prefill`` through the
  ``pytest_generate_tests`` hook in ``conftest.py``; a subclass may narrow them or mark the
  expensive ones slow. ``unsupported(case)`` returns a reason when the implementation must
  *reject* that case with a clear error at trace time (checked, not skipped).
  """

  implementation: str = "xla"
  knobs: dict = {}
  decode_cases = DECODE_CASES
  prefill_cases = PREFILL_CASES
  quantized_cases = QUANT_CASES

  def unsupported(self, case: Case) -> str | None:
    del case
    return None

  def unsupported_format(self, kv_quant: str) -> str | None:
    """A reason (regex) when the implementation must reject this ``kv_quant`` at trace time."""
    del kv_quant
    return None

  def attend(self, case: Case, cache, q, seq_ids, q_lens, layer, *, return_lse=True):
    return pk.paged_attention(
        q, cache, seq_ids, layer, q_lens=q_lens, soft_cap=case.soft_cap,
        sliding_window=case.sliding_window, return_lse=return_lse,
        implementation=self.implementation, **self.knobs)

  def check(self, case: Case):
    cache, q, seq_ids, q_lens, layer = build_case(case)
    reason = self.unsupported(case)
    if reason is not None:
      with pytest.raises((ValueError, NotImplementedError), match=reason):
        self.attend(case, cache, q, seq_ids, q_lens, layer)
      return
    out, lse = self.attend(case, cache, q, seq_ids, q_lens, layer)
    want_out, want_lse = oracle(case, cache, q, seq_ids, q_lens, layer)
    atol, rtol = TOLERANCES[jnp.dtype(case.dtype)]
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:3] and lse.dtype == jnp.float32
    out = np.asarray(out, np.float64)
    lse = np.asarray(lse, np.float64)
    assert not np.isnan(out).any(), "NaN leaked into the output"
    np.testing.assert_allclose(out, want_out, atol=atol, rtol=rtol)
    # -inf exactly where the oracle sees no key; finite and close elsewhere.
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], atol=atol, rtol=rtol)

  def test_decode(self, case):
    self.check(case)

  def test_prefill(self, case):
    self.check(case)

  def test_without_lse_matches_with_lse(self):
    case = Case((3, 17, 40), ratio=2)
    cache, q, seq_ids, q_lens, layer = build_case(case)
    out1 = self.attend(case, cache, q, seq_ids, q_lens, layer, return_lse=False)
    out2, _ = self.attend(case, cache, q, seq_ids, q_lens, layer)
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(out2))

  @pytest.mark.parametrize("pv", NONFINITE_V_CASES, ids=str)
  def test_nonfinite_v(self, pv: PoisonedV):
    """NaN / Inf in V reaches exactly the queries that may see that token (the contract)."""
    case = pv.case
    assert self.unsupported(case) is None
    cache, q0, seq_ids, q_lens, layer = build_case(case)
    cache, q = poison_v(pv, cache, q0, layer, write_v=False)  # same K and q, clean V
    bad_cache, _ = poison_v(pv, cache, q0, layer)
    clean_out, clean_lse = oracle(case, cache, q, seq_ids, q_lens, layer)
    want_out, _ = oracle(case, bad_cache, q, seq_ids, q_lens, layer)
    sees = sees_poison(pv, q_lens)
    # The scenario tests something: poisoned outputs, and valid clean ones beside them.
    valid = np.arange(case.q_len)[None, :, None] < np.asarray(q_lens)[:, None, None]
    assert (~np.isfinite(want_out[sees])).any(axis=-1).all()
    assert (valid & ~sees).any() and np.isfinite(want_out[~sees]).all()
    out, lse = self.attend(case, bad_cache, q, seq_ids, q_lens, layer)
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    atol, rtol = TOLERANCES[jnp.dtype(case.dtype)]
    # Queries that cannot see a poisoned token: the answer on the clean data.
    assert np.isfinite(out[~sees]).all(), "a non-finite V leaked to queries that cannot see it"
    np.testing.assert_allclose(out[~sees], clean_out[~sees], atol=atol, rtol=rtol)
    # Queries that see one: NaN / +Inf / -Inf exactly where the oracle has them.
    for what in (np.isnan, np.isposinf, np.isneginf):
      np.testing.assert_array_equal(what(out), what(want_out), err_msg=what.__name__)
    fin = np.isfinite(want_out)
    np.testing.assert_allclose(out[fin], want_out[fin], atol=atol, rtol=rtol)
    # V never changes the log-sum-exp.
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(clean_lse))
    fin = np.isfinite(clean_lse)
    np.testing.assert_allclose(lse[fin], clean_lse[fin], atol=atol, rtol=rtol)

  nan_logits_dtype = "float32"

  @pytest.mark.parametrize("overflow", [False, True], ids=["nan", "overflow"])
  def test_nan_logits_give_nan_not_zero(self, overflow):
    """A query whose logits are NaN (a NaN in the query, or in the K of a key it sees) or
    overflow to +Inf (finite data, a huge scale) gets output and LSE NaN, as the float64
    oracle does: never the 0 / -inf of a query that sees nothing. Other queries are exact."""
    case = Case((5, 17, 33), ratio=2, q_len=3, dtype=self.nan_logits_dtype)
    cache, q, seq_ids, q_lens, layer = build_case(case)
    scale = case.head_dim ** -0.5
    if overflow:  # row 1's logits overflow float32 (~1e39); the others' are as usual
      scale = 1e20
      q = q * jnp.asarray(np.where(np.arange(q.shape[0])[:, None, None, None] == 1, 1e19,
                                   1e-20), q.dtype)
    else:
      q = q.at[1, 2, 1, 0].set(jnp.nan)  # row 1's last query, q head 1
      k_pool = np.asarray(cache.k_pool, np.float32).copy()
      blk = int(cache.block_tables[2, 0])  # row 2's key 5: every one of its queries sees it
      k_pool[layer, 0, blk, 5, 3] = np.nan  # KV head 0: q heads 0 and 1
      cache = cache.replace(k_pool=jnp.asarray(k_pool, cache.k_pool.dtype))
    out, lse = pk.paged_attention(q, cache, seq_ids, layer, q_lens=q_lens, scale=scale,
                                  return_lse=True, implementation=self.implementation,
                                  **self.knobs)
    want_out, want_lse = attention_np(q, cache.k_pool, cache.v_pool, layer,
                                      np.asarray(cache.block_tables), np.array(case.lengths),
                                      q_lens, scale=scale)
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    bad = np.isnan(want_lse)
    if overflow:  # float64 does not overflow: row 1's queries that see a key are the NaN ones
      bad = (np.arange(q.shape[0]) == 1)[:, None, None] & np.isfinite(want_lse)
    assert bad.any() and (~bad & np.isfinite(want_lse)).any()  # the scenario tests something
    np.testing.assert_array_equal(np.isnan(lse), bad)
    np.testing.assert_array_equal(np.isnan(out).all(axis=-1), bad)
    assert not np.isnan(out[~bad]).any()
    atol, rtol = TOLERANCES[jnp.dtype(case.dtype)]
    np.testing.assert_allclose(out[~bad], want_out[~bad], atol=atol, rtol=rtol)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    fin = np.isfinite(want_lse) & ~bad
    np.testing.assert_allclose(lse[fin], want_lse[fin], atol=atol, rtol=rtol)

  def test_stale_finite_data_is_never_read(self):
    """Garbage that is *finite* (not NaN) past each length would change a wrong kernel's output."""
    case = Case((5, 17, 33), block_size=8, ratio=2)
    cache, q, seq_ids, q_lens, layer = build_case(case)
    out, _ = self.attend(case, cache, q, seq_ids, q_lens, layer)
    junk_k = jnp.where(jnp.isnan(cache.k_pool), 1e4, cache.k_pool)
    junk_v = jnp.where(jnp.isnan(cache.v_pool), -1e4, cache.v_pool)
    cache2 = cache.replace(k_pool=junk_k, v_pool=junk_v)
    out2, _ = self.attend(case, cache2, q, seq_ids, q_lens, layer)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))

  @pytest.mark.parametrize("data", ["normal", "heavy"])
  @pytest.mark.parametrize("kv_quant", QUANT_FORMATS)
  def test_quantized(self, case, kv_quant, data):
    """An int8 / fp8 cache vs float64 attention on the unquantised data (issue-12 bounds)."""
    cache, q, seq_ids, q_lens, layer = build_case(case)
    if data == "heavy":
      cache = heavy_tailed(cache, case)
    want_out, want_lse = oracle(case, cache, q, seq_ids, q_lens, layer)
    qcache = quantized_cache(cache, kv_quant)
    reason = self.unsupported_format(kv_quant)
    if reason is not None:  # rejected at trace time, with the reason
      with pytest.raises(ValueError, match=reason):
        self.attend(case, qcache, q, seq_ids, q_lens, layer)
      return
    out, lse = self.attend(case, qcache, q, seq_ids, q_lens, layer)
    out, lse = np.asarray(out, np.float64), np.asarray(lse, np.float64)
    assert np.isfinite(out).all(), "quantised attention produced NaN / Inf"
    err = relative_l2(out, want_out)
    assert err <= QUANT_BOUNDS[kv_quant, data], f"relative L2 error {err:.4g}"
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
    # The exact answer on the dequantised data (independent oracle on the format model's values).
    deq_k, deq_v = dequantized_pools(qcache)
    exact_out, _ = attention_np(q, deq_k, deq_v, layer, np.asarray(cache.block_tables),
                                [max(n, 0) for n in case.lengths], q_lens,
                                scale=case.head_dim ** -0.5)
    atol, rtol = TOLERANCES[jnp.dtype(case.dtype)]
    np.testing.assert_allclose(out, exact_out, atol=atol, rtol=rtol)

  @pytest.mark.parametrize("kv_quant", QUANT_FORMATS)
  def test_quantized_small_values_with_float16_queries(self, kv_quant):
    """float16 queries over a quantised cache of small K / V (V ~ 1e-4): a V scale times a
    probability is far below float16's normal range, so no path may round it to float16."""
    case = Case((37, 64, 5), q_len=4, block_size=32, ratio=3, head_dim=64, dtype="float16",
                seed=5)
    cache, q, seq_ids, q_lens, layer = build_case(case)
    small = 1e-4
    cache = cache.replace(k_pool=(cache.k_pool.astype(jnp.float32) * 1e-2).astype(jnp.float16),
                          v_pool=(cache.v_pool.astype(jnp.float32) * small).astype(jnp.float16))
    qcache = quantized_cache(cache, kv_quant)
    if self.unsupported_format(kv_quant) is not None:
      pytest.skip(f"{self.implementation} rejects {kv_quant} (test_quantized checks how)")
    out, lse = self.attend(case, qcache, q, seq_ids, q_lens, layer)
    deq_k, deq_v = dequantized_pools(qcache)
    want_out, want_lse = attention_np(q, deq_k, deq_v, layer, np.asarray(cache.block_tables),
                                      [max(n, 0) for n in case.lengths], q_lens,
                                      scale=case.head_dim ** -0.5)
    atol, rtol = TOLERANCES[jnp.dtype(case.dtype)]
    np.testing.assert_allclose(np.asarray(out, np.float64), want_out, atol=atol * small,
                               rtol=rtol)
    np.testing.assert_allclose(np.asarray(lse, np.float64), want_lse, atol=atol, rtol=rtol)
