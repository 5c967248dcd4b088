"""Caches, weights and decoding on a device mesh: tensor parallel, data parallel, or both.

Layouts (:class:`MeshLayout`; :func:`cache_shardings` gives the ``NamedSharding`` of every leaf):

* **Tensor parallel** (``model_axis``): one cache for one model instance. The pools
  ``[layers, kv_heads, num_blocks, block_size, head_dim]`` are split over kv heads; block
  tables, lengths, the allocator and telemetry are *replicated* and every device computes the
  same update of them from the same inputs, so allocating, forking or freeing needs no
  collective. Attention never mixes heads: every implementation runs once per shard of heads
  (:mod:`jax_paged_kv.attention.per_shard`), so no device ever reads another's pool. The model's
  projections are split to match (:func:`param_shardings`); the only collectives of a decode
  step are the two all-reduces after the attention output and MLP projections.
* **Data parallel** (``data_axis``): ``data_shards`` independent caches, each with its own
  sequence slots, block pool and allocator. The state is one pytree whose every leaf has a
  leading ``[data_shards]`` axis (``k_pool: [data_shards, layers, kv_heads, ...]``,
  ``seq_lens: [data_shards, max_seqs]``, ``num_free: [data_shards]``), sharded on ``data_axis``;
  ``config`` describes *one* shard. This is exactly the layout ``jax.pmap`` takes, so the same
  arrays also go through ``pmap``. A host scheduler names a sequence by ``(shard, slot)`` and
  builds per-shard arguments with a leading axis too: ``seq_ids[data_shards, batch]`` (``-1``
  pads a shard's rows; :func:`shard_seq_ids`). :func:`map_shards` runs any function of one
  cache on every shard at once (``shard_map``; no communication): statuses come back per
  shard, so a pool that runs dry on one shard rejects only that shard's update.
* **Both** on a 2-D mesh: data shards on ``data_axis``, each tensor parallel on ``model_axis``.

Recommended beyond one machine (``jax.distributed.initialize()``): tensor parallel inside a host
(fast links), data parallel across hosts (no traffic between hosts at all): :func:`host_mesh`.

Which meshes: build meshes with *auto* axes (``local_mesh``, ``host_mesh``, or
``jax.sharding.Mesh``): the model's matmuls are partitioned by XLA (GSPMD). With an
auto-axes mesh, enter :func:`use_layout` around the calls you trace (the jitted functions of this
module do it for you) so that attention knows which axis holds the heads; on an
*explicit*-axes mesh (``jax.make_mesh``'s default) the pools' types say it and attention runs
per shard without it.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_paged_kv.attention.per_shard import KERNEL_SHARDING, KernelSharding
from jax_paged_kv.cache import (
  CacheConfig,
  CacheInvariantError,
  CacheShapeError,
  InvariantReport,
  PagedKVCache,
  check_invariants,
  init_cache,
)
from jax_paged_kv.cache.state import POOL_LEAVES as _POOLS  # split over kv heads

# ---------------------------------------------------------------------------------------------
# layouts


@dataclasses.dataclass(frozen=True)
class MeshLayout:
  """Which mesh axis splits what (hashable: it is a static argument of the jitted helpers).

  Attributes:
    mesh: the device mesh.
    model_axis: mesh axis the kv heads (and the model's heads) are split over, or None.
    data_axis: mesh axis that holds independent cache shards, or None.

  Mesh axes named by neither hold replicas.
  """

  mesh: Mesh
  model_axis: str | None = None
  data_axis: str | None = None

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
    names = tuple(self.mesh.axis_names)
    for role in ("model_axis", "data_axis"):
      axis = getattr(self, role)
      if axis is not None and axis not in names:
        raise ValueError(f"{role}={axis!r} is not an axis of the mesh (axes: {names})")
    if self.model_axis is not None and self.model_axis == self.data_axis:
      raise ValueError(f"model_axis and data_axis must differ, both are {self.model_axis!r}")

  @property
  def model_shards(self) -> int:
    """Devices one cache's heads are split over (1 without ``model_axis``)."""
    return 1 if self.model_axis is None else int(self.mesh.shape[self.model_axis])

  @property
  def data_shards(self) -> int:
    """Independent caches (1 without ``data_axis``)."""
    return 1 if self.data_axis is None else int(self.mesh.shape[self.data_axis])

  @property
  def explicit(self) -> bool:
    """Whether the mesh has explicit axes (sharding in types)."""
    return any(t == AxisType.Explicit for t in self.mesh.axis_types)

  def check(self, config: CacheConfig) -> None:
    """Raises ``ValueError`` if ``config`` cannot take this layout."""
    if not isinstance(config, CacheConfig):
      raise TypeError(f"expected a CacheConfig, got {type(config).__name__}")
    n = self.model_shards
    if config.num_kv_heads % n:
      raise ValueError(
          f"tensor parallel over mesh axis {self.model_axis!r} of size {n} splits the kv heads: "
          f"{config.num_kv_heads=} must be divisible by {n} (use a smaller model axis, or "
          "data parallel)")

  def shard_mesh(self, shard: int) -> Mesh:
    """The sub-mesh of data shard ``shard`` (the data axis cut to size 1; other axes kept)."""
    if self.data_axis is None:
      if shard != 0:
        raise ValueError(f"{shard=}: a layout without data_axis has one shard")
      return self.mesh
    if not 0 <= shard < self.data_shards:
      raise ValueError(f"{shard=} is not in [0, {self.data_shards})")
    i = self.mesh.axis_names.index(self.data_axis)
    devices = np.take(self.mesh.devices, [shard], axis=i)
    return Mesh(devices, self.mesh.axis_names, axis_types=self.mesh.axis_types)

  def shard_layout(self, shard: int) -> MeshLayout:
    """The tensor-parallel layout of data shard ``shard`` alone (for one engine per shard)."""
    return MeshLayout(self.shard_mesh(shard), model_axis=self.model_axis)


def _layout(mesh_or_layout, model_axis, data_axis) -> MeshLayout:
  if isinstance(mesh_or_layout, MeshLayout):
    if model_axis is not None or data_axis is not None:
      raise TypeError("give a MeshLayout or a mesh with axes, not both")
    return mesh_or_layout
  return MeshLayout(mesh_or_layout, model_axis=model_axis, data_axis=data_axis)


def use_layout(layout: MeshLayout | None):
  """Context: attention traced inside runs once per heads shard of ``layout.model_axis``.

  Needed with *auto*-axes meshes only (their shardings are invisible while tracing); part of
  the ``jit`` cache key, so functions traced without it are retraced inside it.
  """
  if layout is None or layout.model_axis is None:
    return KERNEL_SHARDING(None)
  return KERNEL_SHARDING(KernelSharding(layout.mesh, layout.model_axis))


def local_mesh(*, model: int = 1, data: int | None = None, devices=None,
               axis_names: tuple[str, str] = ("data", "model")) -> Mesh:
  """A ``[data, model]`` mesh with auto axes over this process's devices.

  Args:
    model: devices per tensor-parallel group (the ``"model"`` axis).
    data: data shards (default: every local device used).
    devices: the devices (default ``jax.local_devices()``, this process's own).
    axis_names: names of the data and model axes.

  Raises:
    ValueError: ``data * model`` exceeds the devices.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  if model < 1 or (data is not None and data < 1):
    raise ValueError(f"{model=} and {data=} must be >= 1")
  data = len(devices) // model if data is None else data
  if data < 1 or data * model > len(devices):
    raise ValueError(f"a {data} x {model} mesh needs {max(data, 1) * model} devices, "
                     f"{len(devices)} are available")
  grid = np.asarray(devices[:data * model], dtype=object).reshape(data, model)
  return Mesh(grid, axis_names, axis_types=(AxisType.Auto, AxisType.Auto))


def host_mesh(*, model: int | None = None,
              axis_names: tuple[str, str] = ("data", "model")) -> Mesh:
  """The recommended multi-host mesh: tensor parallel inside a host, data parallel across hosts.

  Every model-axis group lies inside one process (no collective crosses hosts); data shards
  are ordered by process. After ``jax.distributed.initialize()`` every process builds the same
  mesh. On one process it is :func:`local_mesh`.

  Args:
    model: devices per tensor-parallel group (default: all of a host's devices).
    axis_names: names of the data and model axes.
  """
  per_host = jax.local_device_count()
  model = per_host if model is None else model
  if model < 1 or per_host % model:
    raise ValueError(f"{model=} must divide the {per_host} devices of each host")
  rows = []
  for p in range(jax.process_count()):
    local = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
    rows += [local[i:i + model] for i in range(0, len(local), model)]
  return Mesh(np.asarray(rows, dtype=object), axis_names,
              axis_types=(AxisType.Auto, AxisType.Auto))


# ---------------------------------------------------------------------------------------------
# placement


def _is_pool(path) -> bool:
  return any(getattr(k, "name", None) in _POOLS for k in path)


def cache_specs(config: CacheConfig, layout: MeshLayout) -> PagedKVCache:
  """The ``PartitionSpec`` of every leaf, in a pytree shaped like the cache (see the module)."""
  layout.check(config)
  lead = () if layout.data_axis is None else (layout.data_axis,)
  pool = P(*lead, None, layout.model_axis)
  rest = P(*lead)
  shapes = jax.eval_shape(functools.partial(init_cache, config))
  return jax.tree_util.tree_map_with_path(lambda path, _: pool if _is_pool(path) else rest,
                                          shapes)


def cache_shardings(config: CacheConfig, mesh, *, model_axis: str | None = None,
                    data_axis: str | None = None) -> PagedKVCache:
  """``NamedSharding`` of every leaf of a cache on ``mesh``, in a pytree shaped like the cache.

  Use it as ``jax.device_put(cache, cache_shardings(...))`` and as ``jit`` in/out shardings.

  Args:
    config: the cache's config (with ``data_axis``: of one shard).
    mesh: a ``jax.sharding.Mesh`` (or a :class:`MeshLayout`, then without the axes below).
    model_axis: split the pools' kv heads over this axis (tensor parallel); allocator state,
      tables and lengths are replicated over it.
    data_axis: every leaf has a leading ``[data_shards]`` axis split over this axis (data
      parallel: one independent cache per shard).

  Returns:
    A :class:`~jax_paged_kv.PagedKVCache` whose leaves are ``NamedSharding`` s.

  Raises:
    ValueError: an axis not in the mesh, the same axis twice, or ``num_kv_heads`` not divisible
      by the model axis' size.
  """
  layout = _layout(mesh, model_axis, data_axis)
  return jax.tree_util.tree_map(lambda s: NamedSharding(layout.mesh, s),
                                cache_specs(config, layout))


def init_sharded_cache(config: CacheConfig, mesh, *, model_axis: str | None = None,
                       data_axis: str | None = None, pool_fill: float = 0.0) -> PagedKVCache:
  """An empty cache created in place on the mesh (no device ever holds more than its shard).

  With ``data_axis`` every shard is an empty cache of ``config`` (leading ``[data_shards]``
  axis). Arguments as for :func:`cache_shardings`; ``pool_fill`` as for ``init_cache``.
  """
  layout = _layout(mesh, model_axis, data_axis)
  shardings = cache_shardings(config, layout)
  n = layout.data_shards

  def make():
    cache = init_cache(config, pool_fill=pool_fill)
    if layout.data_axis is None:
      return cache
    return jax.tree_util.tree_map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), cache)

  return jax.jit(make, out_shardings=shardings)()


def stack_shards(caches: Sequence[PagedKVCache]) -> PagedKVCache:
  """Per-shard caches of one config -> the data-parallel layout (a leading shard axis)."""
  caches = list(caches)
  if not caches:
    raise ValueError("stack_shards needs at least one cache")
  if any(c.config != caches[0].config for c in caches):
    raise ValueError("every shard must have the same config")
  return jax.tree_util.tree_map(lambda *x: jnp.stack(x), *caches)


def get_shard(cache: PagedKVCache, shard: int) -> PagedKVCache:
  """Data shard ``shard`` of a data-parallel cache, as a plain cache (a copy)."""
  n = cache.seq_lens.shape[0] if cache.seq_lens.ndim == 2 else None
  if n is None:
    raise ValueError("get_shard expects a data-parallel cache (leading [data_shards] axis)")
  if not 0 <= shard < n:
    raise ValueError(f"{shard=} is not in [0, {n})")

  def take(x):
    s = getattr(x, "sharding", None)
    if isinstance(s, NamedSharding) and any(t == AxisType.Explicit for t in s.mesh.axis_types):
      # Explicit axes type the gather: the shard keeps the rest of the leaf's spec.
      spec = (*s.spec, *(None,) * (x.ndim - len(s.spec)))
      return x.at[shard].get(out_sharding=NamedSharding(s.mesh, P(*spec[1:])))
    return x[shard]

  return jax.tree_util.tree_map(take, cache)


def place_cache(cache: PagedKVCache | Sequence[PagedKVCache], mesh, *,
                model_axis: str | None = None, data_axis: str | None = None) -> PagedKVCache:
  """Moves a cache onto the mesh (``jax.device_put`` with :func:`cache_shardings`).

  With ``data_axis``, give one cache per shard (a list) or a cache already stacked.
  """
  layout = _layout(mesh, model_axis, data_axis)
  if not isinstance(cache, PagedKVCache):
    cache = stack_shards(cache)
  if layout.data_axis is not None:
    n = cache.seq_lens.shape[0] if cache.seq_lens.ndim == 2 else None
    if n != layout.data_shards:
      raise ValueError(f"a data-parallel cache needs a leading axis of {layout.data_shards} "
                       f"shards, got seq_lens of shape {cache.seq_lens.shape}")
  return jax.device_put(cache, cache_shardings(cache.config, layout))


# ---------------------------------------------------------------------------------------------
# model weights

# Parameter name -> (axis split over the model axis, what its size counts). Llama layout
# (models/llama.py): stacked per layer, projections [layers, in, out].
_PARAM_RULES = {
    "wq": (2, "num_heads"), "wk": (2, "num_kv_heads"), "wv": (2, "num_kv_heads"),
    "bq": (1, "num_heads"), "bk": (1, "num_kv_heads"), "bv": (1, "num_kv_heads"),
    "wo": (1, "num_heads"),
    "w_gate": (2, "intermediate_size"), "w_up": (2, "intermediate_size"),
    "w_down": (1, "intermediate_size"),
    # Experts [layers, experts, in, out]: each expert's MLP split like the dense one (the
    # router, [layers, hidden, experts], is replicated).
    "moe_gate": (3, "moe_intermediate_size"), "moe_up": (3, "moe_intermediate_size"),
    "moe_down": (2, "moe_intermediate_size"),
    "shared_w_gate": (2, "shared_expert_intermediate_size"),
    "shared_w_up": (2, "shared_expert_intermediate_size"),
    "shared_w_down": (1, "shared_expert_intermediate_size"),
}


def param_specs(params: Any, model_config: Any, layout: MeshLayout) -> Any:
  """``PartitionSpec`` s that split a model's projections over ``model_axis``.

  Knows the weight names of the bundled models (Llama 2/3, Mistral, Mixtral, Qwen2, Qwen3,
  Qwen3-MoE, Gemma 2, Gemma 3: ``wq, wk, wv, wo, w_gate, w_up, w_down``, the biases
  ``bq, bk, bv``, the experts ``moe_gate, moe_up, moe_down`` and the shared expert
  ``shared_w_gate, shared_w_up, shared_w_down``).

  Query/key/value projections (and biases) are split by heads on their output axis, the output
  projection on its input axis; the MLP's gate/up by columns and down by rows (Megatron style,
  when ``intermediate_size`` divides; else they are replicated), every expert's likewise (by
  ``moe_intermediate_size``). Embeddings, norms, the router and the LM head are replicated, and
  everything is replicated over the data axis.

  Raises:
    ValueError: ``num_heads`` or ``num_kv_heads`` not divisible by the model axis' size.
  """
  n, axis = layout.model_shards, layout.model_axis
  c = model_config
  if axis is not None:
    missing = [a for a in ("num_heads", "num_kv_heads", "intermediate_size") if not hasattr(c, a)]
    if missing:
      raise TypeError(f"param_specs splits Llama-style weights and needs the model's "
                      f"{', '.join(missing)}; {type(c).__name__} has none: place its weights "
                      "with shardings of your own")
    for name in ("num_heads", "num_kv_heads"):
      if getattr(c, name) % n:
        raise ValueError(f"tensor parallel over mesh axis {axis!r} of size {n} splits the "
                         f"model's heads: {name}={getattr(c, name)} must be divisible by {n}")

  def spec(path, x):
    name = getattr(path[-1], "key", None)
    rule = _PARAM_RULES.get(name)
    if axis is None or rule is None or getattr(c, rule[1]) % n:
      return P()
    dims = [None] * len(x.shape)
    dims[rule[0]] = axis
    return P(*dims)

  return jax.tree_util.tree_map_with_path(spec, params)


def param_shardings(params: Any, model_config: Any, mesh, *, model_axis: str | None = None,
                    data_axis: str | None = None) -> Any:
  """``NamedSharding`` s of :func:`param_specs` (``jax.device_put(params, ...)``)."""
  layout = _layout(mesh, model_axis, data_axis)
  return jax.tree_util.tree_map(lambda s: NamedSharding(layout.mesh, s),
                                param_specs(params, model_config, layout))


# ---------------------------------------------------------------------------------------------
# running on every data shard


def map_shards(fn: Callable, layout: MeshLayout, *, shared_argnums: Sequence[int] = ()):
  """``fn`` of one cache, run on every data shard at once (``shard_map`` over ``data_axis``).

  Every array in the positional arguments (arrays and pytrees of arrays), except those in
  ``shared_argnums`` (e.g. the model weights), and in the outputs has a leading
  ``[data_shards]`` axis; ``fn`` sees one shard's
  slice without it. There is no communication between shards. Inside, a ``model_axis`` stays
  automatic (XLA partitions the shard's tensor-parallel work) and attention runs per heads
  shard. Use the result inside ``jit`` (or call it: it is traced on each call). On an
  explicit-axes mesh the sharding is part of each array's type: place the per-shard arguments
  on the mesh over ``data_axis`` first (``jax.device_put(x, NamedSharding(mesh,
  P(data_axis)))``), or JAX refuses them as not matching the ``in_specs``.

  Args:
    fn: a function of arrays and pytrees, e.g. ``lambda c, ids: append_kv(c, k, v, ids)``.
    layout: a layout with a ``data_axis``.
    shared_argnums: positions of arguments passed whole to every shard.

  Returns:
    The mapped function.
  """
  if layout.data_axis is None:
    raise ValueError("map_shards needs a layout with a data_axis")
  shared = frozenset(shared_argnums)
  # Manual over every axis but the model axis: axes the layout does not name hold replicas.
  manual = frozenset(a for a in layout.mesh.axis_names if a != layout.model_axis)

  def body(*args):
    args = [a if i in shared else jax.tree_util.tree_map(lambda x: x[0], a)
            for i, a in enumerate(args)]
    with use_layout(layout):
      out = fn(*args)
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], out)

  @functools.wraps(fn)
  def mapped(*args):
    # Each shard gets its block's first entry: a leading axis that is a multiple of
    # data_shards (not equal to it) would silently drop the others.
    n = layout.data_shards
    for i, a in enumerate(args):
      if i in shared:
        continue
      for leaf in jax.tree_util.tree_leaves(a):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != n:
          raise CacheShapeError(f"map_shards: argument {i} has a leaf of shape "
                                f"{jnp.shape(leaf)}; its leading axis must be the "
                                f"{n} data shards (stack_shards), or pass it in "
                                "shared_argnums")
    in_specs = tuple(P() if i in shared else P(layout.data_axis) for i in range(len(args)))
    f = jax.shard_map(body, mesh=layout.mesh, in_specs=in_specs, out_specs=P(layout.data_axis),
                      axis_names=manual, check_vma=False)
    return f(*args)

  return mapped


def on_mesh(fn: Callable, layout: MeshLayout, *, shared_argnums: Sequence[int] = ()):
  """``fn`` of one cache, run on ``layout``: per data shard (:func:`map_shards`) with a
  ``data_axis``, else as it is (tensor parallel: XLA partitions it) with attention per heads
  shard (:func:`use_layout`). Call the result inside ``jit``."""
  if layout.data_axis is not None:
    return map_shards(fn, layout, shared_argnums=shared_argnums)

  @functools.wraps(fn)
  def run(*args):
    with use_layout(layout):
      return fn(*args)

  return run


def shard_seq_ids(pairs: Sequence[tuple[int, int]], data_shards: int,
                  width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Host-side addressing of ``(shard, slot)`` sequences in a data-parallel batch.

  Args:
    pairs: ``(shard, slot)`` per sequence, in the caller's order.
    data_shards: shards of the layout.
    width: rows per shard (default: the most any shard gets).

  Returns:
    ``(seq_ids int32[data_shards, width], rows int32[len(pairs)])``: shard ``s`` row ``r``
    holds ``seq_ids[s, r]`` (``-1`` pads), and sequence ``i`` of ``pairs`` sits at row
    ``rows[i]`` of its shard, so per-sequence inputs go to ``x[shard, rows[i]]``.
  """
  counts = np.zeros(data_shards, np.int64)
  rows = np.zeros(len(pairs), np.int32)
  for i, (s, _) in enumerate(pairs):
    if not 0 <= s < data_shards:
      raise ValueError(f"shard {s} of pair {i} is not in [0, {data_shards})")
    rows[i] = counts[s]
    counts[s] += 1
  width = int(counts.max(initial=0)) if width is None else width
  if counts.max(initial=0) > width:
    raise ValueError(f"a shard has {int(counts.max())} sequences, more than {width=}")
  ids = np.full((data_shards, width), -1, np.int32)
  for i, (s, slot) in enumerate(pairs):
    ids[s, rows[i]] = slot
  return ids, rows


def shard_invariants(cache: PagedKVCache, layout: MeshLayout) -> list[InvariantReport]:
  """``check_invariants`` of every data shard, plus a check that every device's copy of the
  replicated state (tables, lengths, allocator) is identical; one report per data shard.

  Raises:
    CacheInvariantError: two devices hold different copies of a replicated leaf.
  """
  diverged = replica_mismatches(cache)
  if diverged:
    raise CacheInvariantError(f"replicated cache state differs between devices: {diverged}")
  if layout.data_axis is None:
    return [check_invariants(cache)]
  return [check_invariants(get_shard(cache, i)) for i in range(layout.data_shards)]


def replica_mismatches(tree: Any) -> list[str]:
  """Leaves whose device copies of one index differ (host-side; addressable shards only)."""
  bad = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    seen: dict[tuple, np.ndarray] = {}
    for s in getattr(x, "addressable_shards", ()):
      key = tuple((sl.start, sl.stop) for sl in s.index)
      data = np.asarray(s.data)
      if key in seen and not np.array_equal(seen[key], data, equal_nan=True):
        bad.append(jax.tree_util.keystr(path))
        break
      seen.setdefault(key, data)
  return bad


def device_bytes(tree: Any) -> dict[str, int]:
  """Bytes each device holds of the arrays of ``tree``, by device (``str(device)``)."""
  out: dict[str, int] = {}
  for x in jax.tree_util.tree_leaves(tree):
    for s in getattr(x, "addressable_shards", ()):
      out[str(s.device)] = out.get(str(s.device), 0) + s.data.nbytes
  return out


# ---------------------------------------------------------------------------------------------
# inspecting compiled programs

_COLLECTIVE = re.compile(
    r"=\s*(?P<shape>\(?[a-z0-9]+\[[^=]*?\]\S*)\s+(?P<op>all-gather|all-reduce|all-to-all|"
    r"collective-permute|reduce-scatter)(?:-start)?\(")


def collectives(compiled_text: str) -> list[tuple[str, str]]:
  """``(op, result shape)`` of every collective in compiled HLO text
  (``jit(f).lower(...).compile().as_text()``)."""
  return [(m.group("op"), m.group("shape")) for m in _COLLECTIVE.finditer(compiled_text)]

