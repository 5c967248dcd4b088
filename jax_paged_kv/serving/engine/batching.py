"""Batch packing: bucketed static shapes and the arrays one jitted step takes.

Every jitted step compiles once per static shape, so rows are padded to a bucketed batch width
and (with the XLA attention path) the block-table columns read are bucketed too; padding rows
carry sequence id ``-1``, which every op ignores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jax_paged_kv.serving.decoding import DecodeState, SamplingParams, make_key
from jax_paged_kv.serving.engine.scheduler import Request


def bucket(n: int, cap: int, minimum: int = 1, factor: int = 2) -> int:
  """The smallest ``minimum * factor**i >= n``, capped at ``cap`` (static shapes for jit)."""
  b = max(1, minimum)
  while b < n:
    b *= factor
  return min(b, cap)


class Batcher:
  """Shapes and arrays of the prefill and decode calls.

  Args:
    max_batch: widest batch.
    table_width: block-table columns of the cache (``max_blocks_per_seq``).
    block_size: tokens per block.
    bucket_blocks: read only a bucket of block-table columns (XLA attention path).
    batch_bucket_min, block_bucket_min, bucket_factor, decode_width_step: see
      :class:`~jax_paged_kv.serving.engine.Engine`.
  """

  def __init__(self, *, max_batch: int, table_width: int, block_size: int, bucket_blocks: bool,
               batch_bucket_min: int, block_bucket_min: int, bucket_factor: int,
               decode_width_step: int | None):
    self.max_batch = max_batch
    self.table_width = table_width
    self.block_size = block_size
    self.bucket_blocks = bucket_blocks
    self.batch_bucket_min = batch_bucket_min
    self.block_bucket_min = block_bucket_min
    self.bucket_factor = bucket_factor
    self.decode_width_step = decode_width_step

  def width(self, rows: int, decode: bool = False) -> int:
    """The padded batch width of a call with ``rows`` live rows."""
    if decode and self.decode_width_step:
      step = self.decode_width_step
      return min(self.max_batch, step * math.ceil(rows / step))
    return bucket(rows, self.max_batch, self.batch_bucket_min, self.bucket_factor)

  def max_blocks(self, max_len: int) -> int | None:
    """Block-table columns attention reads for rows up to ``max_len`` tokens (None: all)."""
    if not self.bucket_blocks:
      return None
    need = -(-max_len // self.block_size)
    return bucket(need, self.table_width, self.block_bucket_min, self.bucket_factor)

  @staticmethod
  def sampling_rows(reqs: Sequence[Request], width: int):
    """Per-row sampling parameters and PRNG keys, padded with greedy rows."""
    pad = SamplingParams()
    samp = [r.sampling for r in reqs] + [pad] * (width - len(reqs))
    temp = np.asarray([s.temperature for s in samp], np.float32)
    top_k = np.asarray([s.top_k for s in samp], np.int32)
    top_p = np.asarray([s.top_p for s in samp], np.float32)
    keys = np.stack([make_key(s.seed) for s in samp])
    return samp, temp, top_k, top_p, keys

  @staticmethod
  def prefill_arrays(rows: Sequence[tuple[Request, int]], width: int, chunk: int):
    """``(tokens int32[width, chunk], seq_ids, num_new, key_index int32[width])``."""
    tokens = np.zeros((width, chunk), np.int32)
    seq_ids = np.full(width, -1, np.int32)
    num_new = np.zeros(width, np.int32)
    key_index = np.zeros(width, np.int32)
    for i, (r, n) in enumerate(rows):
      tokens[i, :n] = r.context[r.prefilled:r.prefilled + n]
      seq_ids[i] = r.slot
      num_new[i] = n
      key_index[i] = len(r.out.tokens)
    return tokens, seq_ids, num_new, key_index

  def decode_state(self, reqs: Sequence[Request], width: int) -> DecodeState:
    """The :class:`~jax_paged_kv.serving.decoding.DecodeState` of the decoding rows."""
    samp, *_ = self.sampling_rows(reqs, width)
    pad = width - len(reqs)
    return DecodeState.create(
        tokens=[r.out.tokens[-1] for r in reqs] + [0] * pad,
        seq_ids=[r.slot for r in reqs] + [-1] * pad,
        sampling=samp,
        num_generated=[len(r.out.tokens) for r in reqs] + [0] * pad,
        num_stop=max([1, *(len(s.stop_tokens) for s in samp)]))
