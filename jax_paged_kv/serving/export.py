"""The decode step as a serialisable ``jax.export`` artifact (StableHLO).

``export_decode_step`` traces :func:`~jax_paged_kv.serving.decoding.decode_step` for one batch width
and cache layout and returns an :class:`ExportedDecodeStep`; ``serialize()`` gives bytes that
``ExportedDecodeStep.deserialize`` turns back into a callable in another process (no Python model
code needed to run it, only this small wrapper)::

    step = export_decode_step(params, cache, batch=8, model=model)
    blob = step.serialize()                     # bytes: store or ship them
    step2 = ExportedDecodeStep.deserialize(blob)
    cache, logits, status = step2(params, cache, tokens, seq_ids)

The exported function takes the flat leaves of ``params`` and ``cache`` (plain lists), so no
custom pytree registration is needed to deserialise it; the wrapper flattens and unflattens.
Any model that implements the model protocol (:mod:`jax_paged_kv.models.base`) exports.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_paged_kv.cache.errors import CacheShapeError
from jax_paged_kv.cache.inputs import as_ids, to_int32
from jax_paged_kv.cache.state import PagedKVCache
from jax_paged_kv.models.base import Model
from jax_paged_kv.serving.decoding import Params, decode_step, resolve_model


@dataclasses.dataclass(frozen=True)
class ExportedDecodeStep:
  """A decode step exported with ``jax.export``.

  Attributes:
    exported: the ``jax.export.Exported`` of ``(param_leaves, cache_leaves, tokens, seq_ids) ->
      (cache_leaves, logits, status)``.
  """

  exported: jax.export.Exported
  # The exported cache's CacheConfig as text (config_fingerprint): leaf shapes cannot tell
  # configs apart (max_seq_len 29 and 32 give the same 8-block tables at block 4), and the
  # artifact enforces the one it was traced with. None only for artifacts serialised before
  # it was recorded (their config cannot be checked).
  cache_config: str | None = None

  @property
  def batch(self) -> int:
    """Batch width the step was exported for."""
    return int(self.exported.in_avals[-1].shape[0])

  def __call__(self, params: Params, cache: PagedKVCache, tokens, seq_ids):
    """Runs the exported step.

    Args:
      params: parameters with the exported shapes.
      cache: a cache with the exported config (only its leaves are passed).
      tokens: ``int32[batch]``.
      seq_ids: ``int32[batch]``.

    Returns:
      ``(cache, logits float32[batch, vocab], status int32[batch])``.
    """
    p_leaves = jax.tree_util.tree_leaves(params)
    c_leaves, c_tree = jax.tree_util.tree_flatten(cache)
    n_p, n_c = (x.num_leaves for x in self.exported.in_tree.children()[0].children()[:2])
    if (len(p_leaves), len(c_leaves)) != (n_p, n_c):
      raise CacheShapeError(f"exported step expects {n_p} parameter and {n_c} cache leaves, "
                            f"got {len(p_leaves)} and {len(c_leaves)}")
    if self.cache_config is not None and config_fingerprint(cache.config) != self.cache_config:
      raise CacheShapeError(f"exported step was traced for the cache config "
                            f"{self.cache_config}; this cache has "
                            f"{config_fingerprint(cache.config)}")
    tokens = to_int32(tokens, "tokens", "ids")
    seq_ids = as_ids(seq_ids)
    new_leaves, logits, status = self.exported.call(p_leaves, c_leaves, tokens, seq_ids)
    return jax.tree_util.tree_unflatten(c_tree, new_leaves), logits, status

  def serialize(self) -> bytes:
    """The artifact as bytes: a small header naming the cache config, then the StableHLO
    (``jax.export`` serialisation format)."""
    header = json.dumps({"cache_config": self.cache_config}).encode()
    return _MAGIC + len(header).to_bytes(4, "little") + header + bytes(self.exported.serialize())

  @classmethod
  def deserialize(cls, data: bytes | bytearray) -> ExportedDecodeStep:
    """Inverse of :meth:`serialize` (also reads a bare ``jax.export`` artifact, whose cache
    config is then unknown and unchecked)."""
    data = bytes(data)
    if not data.startswith(_MAGIC):
      return cls(jax.export.deserialize(bytearray(data)))
    n = int.from_bytes(data[len(_MAGIC):len(_MAGIC) + 4], "little")
    start = len(_MAGIC) + 4
    header = json.loads(data[start:start + n])
    return cls(jax.export.deserialize(bytearray(data[start + n:])), header["cache_config"])

  def mlir_module(self) -> str:
    """The StableHLO text (for inspection)."""
    return self.exported.mlir_module()


_MAGIC = b"jax_paged_kv.ExportedDecodeStep/1\n"


def config_fingerprint(config) -> str:
  """A ``CacheConfig`` as canonical text (every field), for comparing configs across
  processes."""
  return ", ".join(f"{f.name}={getattr(config, f.name)!s}" for f in dataclasses.fields(config))


def export_decode_step(params: Params, cache: PagedKVCache, batch: int, *,
                       model: Model | None = None, config: Model | None = None,
                       implementation: str | None = None, max_blocks: int | None = None,
                       platforms: Sequence[str] | None = None) -> ExportedDecodeStep:
  """Exports :func:`~jax_paged_kv.serving.decoding.decode_step` for a batch width and cache layout.

  Args:
    params: model parameters (only shapes and dtypes are used).
    cache: a cache (only its config, shapes and dtypes are used).
    batch: rows per step.
    model: the model (:class:`~jax_paged_kv.models.base.Model`).
    config: earlier name of ``model``.
    implementation: paged attention implementation baked into the artifact.
    max_blocks: static bound on block-table columns read (XLA attention).
    platforms: target platforms, e.g. ``("cpu", "cuda")`` (default: the current backend).

  Returns:
    An :class:`ExportedDecodeStep`.
  """
  if batch < 1:
    raise ValueError(f"{batch=} must be >= 1")
  model = resolve_model(model, config)
  p_tree = jax.tree_util.tree_structure(params)
  c_tree = jax.tree_util.tree_structure(cache)

  def step(p_leaves, c_leaves, tokens, seq_ids):
    p = jax.tree_util.tree_unflatten(p_tree, p_leaves)
    c = jax.tree_util.tree_unflatten(c_tree, c_leaves)
    c, logits, status = decode_step.__wrapped__(p, c, tokens, seq_ids, model=model,
                                                implementation=implementation,
                                                max_blocks=max_blocks)
    return jax.tree_util.tree_leaves(c), logits, status

  def spec(x):
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))

  args = ([spec(x) for x in jax.tree_util.tree_leaves(params)],
          [spec(x) for x in jax.tree_util.tree_leaves(cache)],
          jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))
  kwargs = {} if platforms is None else {"platforms": tuple(platforms)}
  exported = jax.export.export(jax.jit(step, donate_argnums=1), **kwargs)(*args)
  return ExportedDecodeStep(exported, config_fingerprint(cache.config))
