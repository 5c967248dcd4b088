"""Paged attention: a plain-XLA reference plus Pallas kernels behind one dispatcher."""

from jax_paged_kv.attention.api import default_implementation, paged_attention

__all__ = ["default_implementation", "paged_attention"]
