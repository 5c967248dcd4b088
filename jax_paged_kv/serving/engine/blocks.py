"""Host-side block accounting: what the engine knows of the pool without reading the device.

The engine never syncs with the device to decide what fits: it mirrors every sequence's length
on the host (``lens``; the cache's ``seq_lens`` are the truth, and the engine's scheduling keeps
the two equal) and derives block counts from it. A ``CONTIGUOUS`` cache owns a slab per slot,
so nothing there is ever short of blocks.
"""

from __future__ import annotations

import numpy as np

from jax_paged_kv.cache.config import CacheConfig, CacheStrategy


class BlockLedger:
  """The host mirror of the cache's lengths and the block arithmetic built on it.

  Args:
    config: the cache config.
  """

  def __init__(self, config: CacheConfig, evict: tuple[int, int] | None = None):
    self.config = config
    # (window, sink_tokens) when the engine frees blocks outside the window after every call
    # (free_outside_window): a sequence of n tokens then holds held_at(n) blocks.
    self.evict = evict
    self.lens = np.zeros(config.max_seqs, np.int64)  # host mirror of seq_lens
    # Once blocks may be shared (prefix caching, parallel samples), lengths no longer give the
    # free count: the engine reads the device's ``num_free`` after each update instead.
    self.device_free: int | None = None

  @property
  def paged(self) -> bool:
    return self.config.strategy is CacheStrategy.PAGED

  def blocks(self, n) -> np.ndarray:
    """Blocks that ``n`` tokens take (elementwise)."""
    return -(-np.asarray(n) // self.config.block_size)

  def freed(self, n) -> np.ndarray:
    """Blocks of ``n`` tokens that the window eviction has freed (elementwise): ``j`` at or
    past the sink blocks with ``(j + 1) * block_size <= n - window``."""
    n = np.asarray(n)
    if self.evict is None:
      return np.zeros_like(n)
    window, sinks = self.evict
    bs = self.config.block_size
    past = np.maximum(n - window, 0) // bs  # blocks wholly at or below n - 1 - window
    return np.maximum(past - -(-sinks // bs), 0)

  def held_at(self, n) -> np.ndarray:
    """Blocks a sequence of ``n`` tokens holds (elementwise)."""
    return self.blocks(n) - self.freed(n)

  def peak_need(self, total: int, chunk: int) -> int:
    """Most blocks a sequence growing to ``total`` tokens holds at once, counting each call's
    growth before the window eviction runs: a prefill chunk of up to ``chunk`` tokens from any
    block boundary (prefix hits and recomputation start chunks there), or one decode step. Is
    ``blocks(total)`` without eviction."""
    if self.evict is None:
      return int(self.blocks(total))
    bs = self.config.block_size
    p = np.arange(0, total, bs)
    n = np.arange(total)
    chunks = self.held_at(p) + self.blocks(np.minimum(p + chunk, total)) - self.blocks(p)
    steps = self.held_at(n) + self.blocks(n + 1) - self.blocks(n)
    return int(max(chunks.max(initial=0), steps.max(initial=0)))

  def free_blocks(self) -> int:
    """Blocks not held by any sequence (``CONTIGUOUS``: every slot's slab counts as free)."""
    if not self.paged:
      return self.config.usable_blocks
    if self.device_free is not None:
      return self.device_free
    return self.config.usable_blocks - int(self.held_at(self.lens).sum())

  def held(self, slot: int) -> int:
    """Blocks sequence ``slot`` holds now."""
    return int(self.held_at(self.lens[slot]))

  def grow(self, slot: int, n: int) -> None:
    self.lens[slot] += n

  def clear(self, slot: int) -> None:
    self.lens[slot] = 0
