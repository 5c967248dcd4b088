"""Batch packing: bucketed static shapes and the arrays one jitted step takes.

Every jitted step compiles once per static shape, so the shapes come from a small set fixed
when the engine is built, whatever the workload:

* prefill: one batch width (``prefill_rows``) and, while the cache's block table is at most
  ``PREFILL_READ_TOKENS`` tokens wide, every table column: one shape;
* decode: batch widths ``batch_bucket_min * bucket_factor**i`` up to ``max_batch``, and (with
  the XLA attention path) block-table columns read ``block_bucket_min * bucket_factor**j`` up to
  the table's width.

Padding rows carry sequence id ``-1``, which every op ignores. :meth:`Batcher.shapes` lists
every shape an engine can compile.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from jax_paged_kv.serving.decoding import DecodeState, SamplingParams, make_key
from jax_paged_kv.serving.engine.scheduler import Request

# Prefill reads every block-table column while the table holds at most this many tokens (one
# compiled prefill shape); wider tables bucket the columns read from this size up.
PREFILL_READ_TOKENS = 2048
# The default smallest bucket of block-table columns a decode step reads, in tokens.
DECODE_READ_MIN_TOKENS = 256


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
    batch_bucket_min, block_bucket_min, bucket_factor, decode_width_step, prefill_rows: see
      :class:`~jax_paged_kv.serving.engine.Engine` (``block_bucket_min=None``: the columns of
      ``DECODE_READ_MIN_TOKENS`` tokens).
  """

  def __init__(self, *, max_batch: int, table_width: int, block_size: int, bucket_blocks: bool,
               batch_bucket_min: int, block_bucket_min: int | None, bucket_factor: int,
               decode_width_step: int | None, prefill_rows: int):
    self.max_batch = max_batch
    self.table_width = table_width
    self.block_size = block_size
    self.bucket_blocks = bucket_blocks
    self.batch_bucket_min = min(max(1, batch_bucket_min), max_batch)
    if block_bucket_min is None:
      block_bucket_min = -(-DECODE_READ_MIN_TOKENS // block_size)
    self.block_bucket_min = min(max(1, block_bucket_min), table_width)
    self.bucket_factor = bucket_factor
    self.decode_width_step = decode_width_step
    self.prefill_rows = min(max(1, prefill_rows), max_batch)
    self.prefill_block_min = min(table_width, max(self.block_bucket_min,
                                                  -(-PREFILL_READ_TOKENS // block_size)))

  def width(self, rows: int, decode: bool = False) -> int:
    """The padded batch width of a call with ``rows`` live rows (prefill: always
    ``prefill_rows``)."""
    if not decode:
      if rows > self.prefill_rows:
        raise ValueError(f"{rows} prefill rows > prefill_rows={self.prefill_rows}")
      return self.prefill_rows
    if self.decode_width_step:
      step = self.decode_width_step
      return min(self.max_batch, step * math.ceil(rows / step))
    return bucket(rows, self.max_batch, self.batch_bucket_min, self.bucket_factor)

  def max_blocks(self, max_len: int, decode: bool = True) -> int | None:
    """Block-table columns attention reads for rows up to ``max_len`` tokens (None: all)."""
    if not self.bucket_blocks:
      return None
    need = -(-max_len // self.block_size)
    low = self.block_bucket_min if decode else self.prefill_block_min
    return bucket(need, self.table_width, low, self.bucket_factor)

  def shapes(self) -> list[tuple[str, int, int | None]]:
    """Every ``(kind, batch width, block-table columns read)`` this batcher can produce: the
    most compilations an engine does (one per shape, each at its first use)."""
    def ladder(low, cap, factor):
      out = [bucket(low, cap, low, factor)]
      while out[-1] < cap:
        out.append(bucket(out[-1] + 1, cap, low, factor))
      return out
    if self.decode_width_step:
      widths = sorted({self.width(n, decode=True) for n in range(1, self.max_batch + 1)})
    else:
      widths = ladder(self.batch_bucket_min, self.max_batch, self.bucket_factor)
    if self.bucket_blocks:
      reads = ladder(self.block_bucket_min, self.table_width, self.bucket_factor)
      prefill_reads = ladder(self.prefill_block_min, self.table_width, self.bucket_factor)
    else:
      reads = prefill_reads = [None]
    return ([("prefill", self.prefill_rows, r) for r in prefill_reads]
            + [("decode", w, r) for w in widths for r in reads])

  @staticmethod
  def sampling_rows(reqs: Sequence[Request], width: int):
    """Per-row sampling parameters and PRNG keys, padded with greedy rows."""
    pad = SamplingParams()
    samp = [r.sampling for r in reqs] + [pad] * (width - len(reqs))
    temp = np.asarray([s.temperature for s in samp], np.float32)
    top_k = np.asarray([s.top_k for s in samp], np.int32)
    top_p = np.asarray([s.top_p for s in samp], np.float32)
    keys = np.stack([make_key(s.seed) for s in samp])
    min_p = np.asarray([s.min_p for s in samp], np.float32)
    return samp, temp, top_k, top_p, keys, min_p

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

  def decode_state(self, reqs: Sequence[Request], width: int, *,
                   vocab_size: int | None = None,
                   history_length: int | None = None) -> DecodeState:
    """The :class:`~jax_paged_kv.serving.decoding.DecodeState` of the decoding rows; with
    ``vocab_size``, carrying their penalties (padded to ``history_length`` tokens)."""
    samp, *_ = self.sampling_rows(reqs, width)
    pad = width - len(reqs)
    history = None
    if vocab_size is not None:
      history = [(r.out.prompt, r.out.tokens) for r in reqs] + [((), ())] * pad
    return DecodeState.create(
        tokens=[r.out.tokens[-1] for r in reqs] + [0] * pad,
        seq_ids=[r.slot for r in reqs] + [-1] * pad,
        sampling=samp,
        num_generated=[len(r.out.tokens) for r in reqs] + [0] * pad,
        history=history, vocab_size=vocab_size, history_length=history_length)
