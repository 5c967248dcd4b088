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
from tests.oracle import attention_np

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

  def unsupported(self, case: Case) -> str | None:
    del case
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
