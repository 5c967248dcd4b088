"""Paged attention: a plain-XLA reference plus Pallas kernels behind one dispatcher."""

from jax_paged_kv.attention.api import (
  default_implementation,
  fuse_write,
  fused_write_supported,
  paged_attention,
  write_and_attend,
)

__all__ = ["default_implementation", "fuse_write", "fused_write_supported", "paged_attention",
           "write_and_attend"]
