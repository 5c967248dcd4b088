"""The continuous-batching engine, split along its responsibilities.

* :mod:`~jax_paged_kv.serving.engine.engine`: :class:`Engine` (the step loop: admit, prefill,
  decode, finish) and :func:`generate`;
* :mod:`~jax_paged_kv.serving.engine.scheduler`: request queues, sequence slots, admission,
  step budgets and preemption;
* :mod:`~jax_paged_kv.serving.engine.blocks`: host-side block accounting (no device reads);
* :mod:`~jax_paged_kv.serving.engine.batching`: bucketed static shapes and the step arrays;
* :mod:`~jax_paged_kv.serving.engine.metrics`: :class:`RequestOutput`, :class:`EngineMetrics`.
"""

from jax_paged_kv.serving.engine.batching import bucket
from jax_paged_kv.serving.engine.engine import Engine, default_cache_config, generate
from jax_paged_kv.serving.engine.metrics import EngineMetrics, RequestOutput, StreamDelta

__all__ = ["Engine", "EngineMetrics", "RequestOutput", "StreamDelta", "bucket",
           "default_cache_config", "generate"]
