"""Runs an attention implementation once per shard of the pools' kv-head axis (``shard_map``).

A Pallas kernel is one opaque custom call: XLA cannot partition it, so on pools sharded over kv
heads inside ``jit`` it either fails (explicit-axes meshes: ``TypeError: sharded ref ... can only
be indexed by slices``) or, on auto-axes meshes, has every device read the whole pool through
collectives. Attention never mixes heads, so the fix is exact and needs no communication: run the
kernel under ``shard_map`` over the heads axis, each device on its own heads (query heads and
their KV group go together: query head ``h`` reads KV head ``h // group``, and a shard of
``q_heads / n`` query heads reads exactly the ``kv_heads / n`` KV heads it holds).

:func:`~jax_paged_kv.attention.paged_attention` calls :func:`run` for every implementation. The
heads axis comes from, in order:

1. the pools' own type when the mesh has *explicit* axes (``jax.typeof(k_pool).sharding``);
2. the layout set with :data:`KERNEL_SHARDING` (``jax_paged_kv.sharding.use_layout``) for
   *auto*-axes meshes, where shardings are not visible while tracing.

Neither: the implementation is called as it is (one device, ``pmap``, or inside a
``shard_map`` whose body already sees one shard). ``KERNEL_SHARDING`` is a
``jax.make_user_context``: entering or leaving it changes the ``jit`` cache key, so a function
traced without it is retraced with it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class KernelSharding(NamedTuple):
  """Where the pools' kv-head axis is sharded: ``mesh`` and the axis name ``heads_axis``."""

  mesh: Mesh
  heads_axis: str


# The active KernelSharding (or None); set by jax_paged_kv.sharding.use_layout.
KERNEL_SHARDING = jax.make_user_context(None)


def _axis_types(mesh) -> dict:
  return dict(zip(mesh.axis_names, mesh.axis_types, strict=True))


def _context_mesh():
  """The abstract mesh of the enclosing ``shard_map`` / ``jax.set_mesh``, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def _explicit_heads_axis(pool) -> tuple[object, str] | None:
  """``(mesh, axis)`` when the pool's type says its kv-head axis is sharded (explicit axes)."""
  try:
    sharding = jax.typeof(pool).sharding
  except (AttributeError, TypeError):  # pragma: no cover - older JAX
    return None
  spec = getattr(sharding, "spec", None)
  if spec is None or len(spec) < 2 or spec[1] is None:
    return None
  axis = spec[1]
  if isinstance(axis, tuple):
    if len(axis) != 1:
      raise ValueError(f"the pools' kv-head axis is sharded over several mesh axes {axis}; "
                       "per-shard attention supports one")
    axis = axis[0]
  return sharding.mesh, axis


def heads_sharding(k_pool) -> tuple[object, str] | None:
  """``(mesh, heads_axis)`` to run attention per shard on, or None to call it directly."""
  found = _explicit_heads_axis(k_pool)
  if found is not None:
    return found
  layout = KERNEL_SHARDING.value
  if layout is None:
    return None
  mesh = _context_mesh()
  if mesh is not None:
    if layout.heads_axis not in mesh.axis_names:
      return None
    if _axis_types(mesh)[layout.heads_axis] == AxisType.Manual:
      return None  # inside a shard_map that already split the heads: the body sees one shard
    return mesh, layout.heads_axis
  return layout.mesh, layout.heads_axis


def run(call, q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *, return_lse: bool,
        k_scale=None, v_scale=None):
  """``call(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens)``, once per heads shard.

  Args:
    call: an implementation with every keyword bound (the kernel contract of ``reference.py``).
    q: ``[batch, q_len, q_heads, head_dim]``.
    k_pool, v_pool: ``[layers, kv_heads, num_blocks, block_size, head_dim]``.
    layer: ``int32[]``; block_tables: ``int32[batch, max_blocks]``; kv_lens, q_lens:
      ``int32[batch]``. These are replicated to every shard (they are small).
    return_lse: whether ``call`` also returns the log-sum-exp.
    k_scale, v_scale: a quantised cache's scales (passed to ``call`` as keywords), whose two
      leading axes are the pools' ``[layers, kv_heads]``; None for an unquantised cache.

  Returns:
    What ``call`` returns, with the query-head axis sharded like the pools' kv-head axis.

  Raises:
    ValueError: kv or query heads not divisible by the heads axis' size.
  """
  if k_scale is not None:
    unquantised = call

    def call(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, k_scale, v_scale):
      return unquantised(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens,
                         k_scale=k_scale, v_scale=v_scale)
    scales = (k_scale, v_scale)
  else:
    scales = ()
  found = heads_sharding(k_pool)
  if found is None:
    return call(q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *scales)
  mesh, axis = found
  n = mesh.shape[axis]
  kv_heads, q_heads = k_pool.shape[1], q.shape[2]
  if kv_heads % n or q_heads % n:
    raise ValueError(f"per-shard attention splits heads over mesh axis {axis!r} of size {n}: "
                     f"{kv_heads=} and {q_heads=} must both be divisible by {n}")
  heads = P(None, None, axis)  # q, out: [batch, q_len, q_heads, ...]
  pool = P(None, axis)
  out_specs = (heads, heads) if return_lse else heads
  # Manual over every axis not yet manual: other axes hold replicas here, and the kernels'
  # interpret modes (host callbacks) need a fully manual program.
  manual = {a for a, t in _axis_types(mesh).items() if t != AxisType.Manual}
  in_specs = (heads, pool, pool, P(), P(), P(), P()) + (pool,) * len(scales)
  args = (q, k_pool, v_pool, layer, block_tables, kv_lens, q_lens, *scales)
  if any(t == AxisType.Explicit for t in mesh.axis_types):  # types must match the specs
    args = tuple(jax.sharding.reshard(x, NamedSharding(mesh, s))
                 for x, s in zip(args, in_specs, strict=True))
  fn = jax.shard_map(call, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                     axis_names=manual, check_vma=False)
  return fn(*args)
