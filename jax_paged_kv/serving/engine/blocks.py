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

  def __init__(self, config: CacheConfig):
    self.config = config
    self.lens = np.zeros(config.max_seqs, np.int64)  # host mirror of seq_lens
    # With prefix caching blocks are shared, so lengths no longer give the free count: the
    # engine reads the device's ``num_free`` after each update instead (a scalar).
    self.device_free: int | None = None

  @property
  def paged(self) -> bool:
    return self.config.strategy is CacheStrategy.PAGED

  def blocks(self, n) -> np.ndarray:
    """Blocks that ``n`` tokens take (elementwise)."""
    return -(-np.asarray(n) // self.config.block_size)

  def free_blocks(self) -> int:
    """Blocks not held by any sequence (``CONTIGUOUS``: every slot's slab counts as free)."""
    if not self.paged:
      return self.config.usable_blocks
    if self.device_free is not None:
      return self.device_free
    return self.config.usable_blocks - int(self.blocks(self.lens).sum())

  def held(self, slot: int) -> int:
    """Blocks sequence ``slot`` holds now."""
    return int(self.blocks(self.lens[slot]))

  def grow(self, slot: int, n: int) -> None:
    self.lens[slot] += n

  def clear(self, slot: int) -> None:
    self.lens[slot] = 0
