"""``paged_attention``: one function, several implementations, picked per backend."""

from __future__ import annotations

import functools
import importlib
import inspect
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np

from jax_paged_kv.attention import per_shard
from jax_paged_kv.cache.config import CacheConfig, CacheStrategy
from jax_paged_kv.cache.errors import CacheShapeError, InvalidCountError, is_tracing
from jax_paged_kv.cache.inputs import INT32_MAX, as_counts, as_ids, as_layer
from jax_paged_kv.cache.ops import (
  _eager_or_traced,
  check_readable,
  check_write,
  gather_tables,
  write_context,
  write_kv,
  write_status,
)
from jax_paged_kv.cache.state import PagedKVCache, pool_values

# name -> (module, function). Modules are imported lazily: the GPU/TPU kernels pull in Pallas
# backends that a CPU-only user never needs.
IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "xla": ("jax_paged_kv.attention.reference", "paged_attention_xla"),
    "pallas_gpu": ("jax_paged_kv.attention.pallas_gpu", "paged_attention_gpu"),
    "pallas_tpu": ("jax_paged_kv.attention.pallas_tpu", "paged_attention_tpu"),
    "pallas_mgpu": ("jax_paged_kv.attention.pallas_mgpu", "paged_attention_mgpu"),
}


_BACKEND_KERNELS = {"gpu": "pallas_gpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu",
                    "tpu": "pallas_tpu"}
_MOSAIC_GPU_BACKENDS = ("gpu", "cuda")  # NVIDIA only


def _compute_capability() -> str | None:
  """The first device's CUDA compute capability (e.g. ``"9.0"``), or None where unknown."""
  try:
    return getattr(jax.devices()[0], "compute_capability", None)
  except RuntimeError:  # pragma: no cover - no devices
    return None


def jax_version() -> tuple[int, ...]:
  """This JAX's ``(major, minor)``."""
  return tuple(int(p) for p in jax.__version__.split(".")[:2] if p.isdigit())


def _mosaic_gpu_jax_ok() -> bool:
  """Whether this JAX has the Mosaic GPU API the kernel is written against (0.10+)."""
  return jax_version() >= (0, 10)


def _supported(name: str, config: CacheConfig) -> bool:
  try:
    get_implementation(name)  # loads the module
    module = importlib.import_module(IMPLEMENTATIONS[name][0])
    module.check_supported(config.kernel_dtype, config.block_size, config.head_dim,
                           kv_quant=config.kv_quant)
  except (ValueError, RuntimeError):
    return False
  return True


def default_implementation(backend: str | None = None, config: CacheConfig | None = None) -> str:
  """The implementation ``implementation=None`` picks.

  Args:
    backend: a JAX backend name (default: JAX's default backend).
    config: the cache's config. The backend's kernel is picked only for pool geometries and
      ``kv_quant`` formats it can tile (e.g. the GPU kernel needs power-of-two ``head_dim >=
      16`` and ``block_size``, and ``head_dim >= 32`` for int4; the TPU kernel needs whole
      sublane tiles per page, ``block_size % 32 == 0`` for 8-bit and int4 pools); other
      caches fall back to ``"xla"``, which takes any geometry. Without a config the backend's
      kernel is named.
      The Mosaic GPU kernel ``"pallas_mgpu"`` is opt-in: it passes every case compiled on
      an H200 (JAX 0.11.2) but runs decode at 0.4-0.6x the Triton kernel's speed there
      (README, kernel table), so a GPU picks the faster Triton kernel ``"pallas_gpu"`` unless
      the environment variable ``JAX_PAGED_KV_MGPU=1`` is set; then an NVIDIA GPU of compute
      capability 9.0+ (Hopper and later) with JAX 0.10+ picks ``"pallas_mgpu"`` for the
      caches it takes (bfloat16 / float16 pools; see
      :func:`~jax_paged_kv.attention.pallas_mgpu.check_supported`).

  Returns:
    ``"pallas_mgpu"``, ``"pallas_gpu"``, ``"pallas_tpu"`` or ``"xla"``.
  """
  backend = backend or jax.default_backend()
  name = _BACKEND_KERNELS.get(backend, "xla")
  if name == "xla" or config is None:
    return name
  if (backend in _MOSAIC_GPU_BACKENDS and os.environ.get("JAX_PAGED_KV_MGPU", "0") == "1"
      and _mosaic_gpu_jax_ok()):
    capability = _compute_capability()
    try:
      hopper = capability is not None and float(capability) >= 9.0
    except ValueError:  # pragma: no cover - an unexpected format
      hopper = False
    if hopper and _supported("pallas_mgpu", config):
      return "pallas_mgpu"
  return name if _supported(name, config) else "xla"


def get_implementation(name: str):
  """The kernel function registered under ``name`` (see the contract in ``reference.py``)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"unknown implementation={name!r}; choose one of "
                     f"{sorted(IMPLEMENTATIONS)} or None for the backend's best")
  module, fn = IMPLEMENTATIONS[name]
  try:
    return getattr(importlib.import_module(module), fn)
  except ImportError as e:  # pragma: no cover - depends on the installed jax
    raise RuntimeError(f"implementation={name!r} cannot be loaded here: {e}") from e


# Keyword arguments paged_attention passes to every implementation itself: never knobs.
_PASSED = frozenset({"scale", "soft_cap", "sliding_window", "return_lse", "k_scale", "v_scale",
                     "new_kv"})


def implementation_knobs(name: str) -> tuple[str, ...]:
  """The tuning knobs (keyword-only options) implementation ``name`` takes (a kernel declared
  with ``**knobs`` takes any: :func:`check_knobs` passes them all through)."""
  params = inspect.signature(get_implementation(name)).parameters.values()
  return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name not in _PASSED)


def check_knobs(name: str, knobs, *, picked: bool = False, op: str = "paged_attention") -> None:
  """Raises ``TypeError`` naming the knobs ``name`` does not take, the ones it does, and which
  implementations take the strays (e.g. ``block_k`` meant for ``pallas_gpu`` reaching ``xla``
  because ``implementation=None`` picked it on this backend)."""
  params = inspect.signature(get_implementation(name)).parameters.values()
  if any(p.kind is p.VAR_KEYWORD for p in params):  # a kernel of yours taking **knobs
    return
  own = implementation_knobs(name)
  bad = sorted(set(knobs) - set(own))
  if not bad:
    return
  owners = []
  for other in IMPLEMENTATIONS:
    try:
      if other != name and set(bad) <= set(implementation_knobs(other)):
        owners.append(other)
    except RuntimeError:  # pragma: no cover - a kernel this JAX cannot load
      continue
  how = " (picked by implementation=None for this backend and cache)" if picked else ""
  hint = (f"; {', '.join(bad)} {'is a knob' if len(bad) == 1 else 'are knobs'} of "
          f"{' / '.join(repr(o) for o in owners)}: pass implementation= explicitly"
          if owners else "")
  raise TypeError(f"{op}: implementation={name!r}{how} takes no knob {', '.join(bad)}; its "
                  f"knobs are {', '.join(own) or 'none'}{hint}")


def paged_attention(q, cache: PagedKVCache, seq_ids, layer, *, q_lens=None,
                    scale: float | None = None, soft_cap: float | None = None,
                    sliding_window: int | None = None, return_lse: bool = False,
                    implementation: str | None = None, **knobs):
  """Attention of new queries over each sequence's cached keys and values.

  Decode is ``q_len == 1``; chunked prefill is ``q_len > 1``, causal with respect to the new
  tokens' positions: query ``i`` of row ``b`` sits at position ``len_b - q_lens[b] + i``, where
  ``len_b`` is the sequence's length in the cache *after* its new tokens were written (call
  :func:`~jax_paged_kv.reserve` and :func:`~jax_paged_kv.write_kv` first).

  Args:
    q: ``[batch, q_len, q_heads, head_dim]``; ``q_heads`` a multiple of ``kv_heads`` (any GQA /
      MQA ratio).
    cache: the cache.
    seq_ids: ``int32[batch]`` slot ids; padding (negative) and, inside ``jit``, invalid or
      inactive ids give zeros and read nothing.
    layer: ``int32[]`` layer index, may be traced.
    q_lens: ``int32[batch]`` valid queries per row (ragged prefill; default ``q_len``,
      clipped to each row's length: a row holding fewer tokens has queries at positions 0 to
      length - 1 only). Queries past it give zeros.
    scale: logit scale, default ``head_dim ** -0.5`` (q is *not* expected pre-scaled).
    soft_cap: optional logit soft cap ``c``: ``c * tanh(logits / c)``, ``0 < c <= 1e30``
      (``MAX_SOFT_CAP``; float32 flushes ``logits / c`` to 0 for larger caps).
    sliding_window: optional window ``w``: a query sees the last ``w`` positions (itself
      included).
    return_lse: also return the float32 log-sum-exp ``[batch, q_len, q_heads]``, for merging
      partial attention (``-inf`` where a query sees nothing).
    implementation: ``"xla"``, ``"pallas_gpu"``, ``"pallas_mgpu"``, ``"pallas_tpu"`` or None:
      the backend's
      kernel where it takes this cache's geometry, else ``"xla"`` (:func:`default_implementation`).
    **knobs: keyword-only tuning options of the chosen kernel (e.g. ``interpret=True``;
      :func:`implementation_knobs` lists them).

  Returns:
    ``out`` ``[batch, q_len, q_heads, head_dim]`` in ``q.dtype`` (float32 accumulation), or
    ``(out, lse)`` with ``return_lse``.

  Raises:
    CacheShapeError: shapes that do not fit the cache (trace time).
    InvalidSlotError, InactiveSlotError, InvalidLayerError: eager calls with bad ids or layer.
    TypeError: a knob the chosen implementation does not take (the message names the ones it
      takes and the implementations that take the stray one).
  """
  q, seq_ids, layer, q_lens, scale, soft_cap, sliding_window = _check_query(
      q, cache, seq_ids, layer, q_lens, scale, soft_cap, sliding_window, op="paged_attention")
  _check_return_lse(return_lse)
  cfg = cache.config
  name = default_implementation(config=cfg) if implementation is None else implementation
  get_implementation(name)  # fail early, outside the trace, for an unknown name
  check_knobs(name, knobs, picked=implementation is None)
  if q.size == 0:  # no query: nothing to read (the kernels' grids would be empty)
    out = jnp.zeros(q.shape, q.dtype)
    return (out, jnp.full(q.shape[:3], -jnp.inf, jnp.float32)) if return_lse else out
  if name == "xla" and cfg.strategy is CacheStrategy.CONTIGUOUS:
    knobs.setdefault("interleave", 1)  # one slab per sequence: read it in order
  return _paged_attention(
      q, cache, seq_ids, layer, q_lens, scale=scale, soft_cap=soft_cap,
      sliding_window=sliding_window, return_lse=bool(return_lse), implementation=name,
      knobs=tuple(sorted(knobs.items())))


def _check_return_lse(return_lse) -> None:
  if not isinstance(return_lse, (bool, np.bool_)):
    raise CacheShapeError(f"return_lse must be a bool, got {return_lse!r}")


# The largest soft cap float32 computes faithfully: logits / cap flushes to 0 only below
# cap * 2**-126 (1.2e-8 at this cap, under float32 rounding of any logit that matters), and
# cap * log2(e) (the Triton kernel's base-2 softmax) stays finite. Real caps are 30-50.
MAX_SOFT_CAP = 1e30


def _check_query(q, cache, seq_ids, layer, q_lens, scale, soft_cap, sliding_window, *, op):
  """Validates an attention call's query side (trace time; eagerly also the ids and layer)."""
  cfg = cache.config
  q = jnp.asarray(q)
  if q.ndim != 4:
    raise CacheShapeError(f"q must be [batch, q_len, q_heads, head_dim], got shape {q.shape}")
  b, q_len, qh, d = q.shape
  if d != cfg.head_dim:
    raise CacheShapeError(f"q head_dim={d} does not match the cache's head_dim={cfg.head_dim}")
  kv_heads = cache.k_pool.shape[1]  # the local shard's heads under shard_map
  if qh % kv_heads:
    raise CacheShapeError(f"q_heads={qh} must be a multiple of num_kv_heads={kv_heads}")
  if not jnp.issubdtype(q.dtype, jnp.floating):
    raise CacheShapeError(f"q must be floating point, got {q.dtype}")
  seq_ids = as_ids(seq_ids)
  layer = as_layer(layer)
  if seq_ids.shape != (b,):
    raise CacheShapeError(f"seq_ids must have shape ({b},), got {seq_ids.shape}")
  if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(
      sliding_window, (int, np.integer)) or not 1 <= sliding_window <= INT32_MAX):
    raise CacheShapeError(f"sliding_window must be a positive int (< 2**31), got "
                          f"{sliding_window!r}")
  sliding_window = None if sliding_window is None else int(sliding_window)
  soft_cap = _static_float(soft_cap, "soft_cap")
  if soft_cap is not None and not 0 < soft_cap <= MAX_SOFT_CAP:
    raise CacheShapeError(
        f"soft_cap must be positive and at most {MAX_SOFT_CAP:g}, got {soft_cap!r}: in float32 "
        "a larger cap flushes logits / cap to 0 (every logit capped to 0: uniform attention) "
        "or overflows; for no cap pass None")
  scale = _static_float(d ** -0.5 if scale is None else scale, "scale")
  if not abs(scale) < float("inf"):  # also NaN
    raise CacheShapeError(f"scale must be finite, got {scale!r}")
  check_readable(cache, seq_ids, layer, op=op)
  explicit = q_lens is not None
  q_lens = as_counts(q_len if q_lens is None else q_lens, b, "q_lens")
  if explicit and not is_tracing(cache, seq_ids, q_lens):
    _check_q_lens(cache, seq_ids, q_lens, q_len, op=op)
  return q, seq_ids, layer, q_lens, scale, soft_cap, sliding_window


def _static_float(x, name: str) -> float | None:
  """A static float argument (``scale``, ``soft_cap``): a real number, not a bool or an array."""
  if x is None:
    return None
  if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Real, np.floating,
                                                            np.integer)):
    raise CacheShapeError(f"{name} must be a Python or NumPy real number (static), got {x!r}")
  return float(x)


def _check_q_lens(cache, seq_ids, q_lens, q_len: int, *, op: str) -> None:
  """Eager calls: each row's explicit ``q_lens`` must be in ``[0, q_len]`` and, for a row
  naming a sequence, at most its length (its queries are its last ``q_lens`` tokens). Inside
  ``jit`` a row's count is clipped into that range instead (nothing to raise there)."""
  ids, counts = np.asarray(seq_ids), np.asarray(q_lens)
  lens = np.asarray(cache.seq_lens)[np.clip(ids, 0, cache.config.max_seqs - 1)]
  for row, (sid, n) in enumerate(zip(ids.tolist(), counts.tolist(), strict=True)):
    top = q_len if sid < 0 else min(q_len, int(lens[row]))
    if not 0 <= n <= top:
      why = (f"more than q_len={q_len}" if n > q_len else "negative" if n < 0 else
             f"more than the {int(lens[row])} tokens sequence {sid} holds")
      raise InvalidCountError(f"{op}: q_lens[{row}]={n} is {why} (row {row}, sequence {sid})")


def _kernel_rows(cache, seq_ids, layer, q_lens, q_len: int):
  """The kernel contract's per-row inputs: ``(tables, kv_lens, layer, q_lens)``. A bad layer
  reads nothing (lengths 0); a row may not claim more queries than it has tokens or q holds."""
  num_layers = cache.config.num_layers
  tables, kv_lens = gather_tables(cache, seq_ids)
  kv_lens = jnp.where((layer >= 0) & (layer < num_layers), kv_lens, 0)
  q_lens = jnp.clip(q_lens, 0, jnp.minimum(kv_lens, q_len))
  return tables, kv_lens, jnp.clip(layer, 0, num_layers - 1), q_lens


@functools.partial(jax.jit, static_argnames=("scale", "soft_cap", "sliding_window",
                                             "return_lse", "implementation", "knobs"))
def _paged_attention(q, cache, seq_ids, layer, q_lens, *, scale, soft_cap, sliding_window,
                     return_lse, implementation, knobs):
  cfg = cache.config
  tables, kv_lens, layer, q_lens = _kernel_rows(cache, seq_ids, layer, q_lens, q.shape[1])
  call = functools.partial(get_implementation(implementation), scale=scale, soft_cap=soft_cap,
                           sliding_window=sliding_window, return_lse=return_lse, **dict(knobs))
  # On pools sharded over kv heads, once per shard (shard_map): never on a gathered pool. A
  # quantised cache's scales share the pools' [layers, kv_heads, ...] leading axes and go along.
  # A pool_bits pool is read as its values (a bitcast, no copy).
  k_pool, v_pool = pool_values(cache.k_pool, cfg.dtype), pool_values(cache.v_pool, cfg.dtype)
  return per_shard.run(call, q, k_pool, v_pool, layer, tables, kv_lens, q_lens,
                       return_lse=return_lse, k_scale=cache.k_scale, v_scale=cache.v_scale)


# ---------------------------------------------------------------------------------------------
# write + attend, optionally fused into one kernel launch


# Whether the bundled models' layers fuse their K/V write into the decode kernel
# (write_and_attend(fuse=...)): False, or "auto" (where it can run). A user context, so that
# entering it changes the jit cache key: a step traced outside is retraced inside.
FUSE_WRITE = jax.make_user_context(False)


def fuse_write(mode: bool | str = "auto"):
  """Context manager: inside it the models' decode layers write their new K/V from inside the
  attention kernel (:func:`write_and_attend` with ``fuse=mode``; ``"auto"`` fuses where it can
  run, i.e. the ``pallas_gpu`` kernel on unquantised, unsharded pools, else writes and attends
  separately; False: never). Off by default until measured faster on a GPU
  (``benchmarks/decode_step.py --fused``).

  Example::

    with pk.fuse_write():
      cache, logits, status = decode_step(params, cache, tokens, ids, model=model)
  """
  if mode not in (False, True, "auto"):
    raise ValueError(f"fuse_write mode must be False, True or 'auto', got {mode!r}")
  return FUSE_WRITE(mode)


def fused_write_supported(cache: PagedKVCache, q_len: int, implementation: str | None) -> str:
  """Why :func:`write_and_attend` cannot fuse here ("" if it can)."""
  cfg = cache.config
  name = default_implementation(config=cfg) if implementation is None else implementation
  if name != "pallas_gpu":
    return f"implementation {name!r} (fusion is in the 'pallas_gpu' decode kernel)"
  if q_len != 1:
    return f"q_len={q_len} (fusion is for decode, q_len == 1)"
  if cfg.kv_quant is not None:
    return f"kv_quant={cfg.kv_quant!r} (a quantised write may rescale its block)"
  if cache.k_pool.dtype != cfg.dtype:
    return f"pools stored as {cache.k_pool.dtype} bit patterns (pool_bits)"
  if per_shard.heads_sharding(cache.k_pool) is not None:
    return "pools sharded over kv heads"
  return ""


def write_and_attend(q, k, v, cache: PagedKVCache, slots, seq_ids, layer, *, q_lens=None,
                     scale: float | None = None, soft_cap: float | None = None,
                     sliding_window: int | None = None, return_lse: bool = False,
                     implementation: str | None = None, fuse: bool | str = False,
                     donate: bool = True, **knobs):
  """Writes one layer's new K/V (:func:`~jax_paged_kv.write_kv`), then attends
  (:func:`paged_attention`): a model layer's cache step.

  With ``fuse`` the decode kernel does both in one launch ("attention fusion", as in the LLMIR
  design; also tpu-inference's design on TPU): it attends to each row's new token from
  registers, not from the pool, and writes it into its page, so the step skips the separate
  scatter and its launch per layer. The result is the unfused one: the same pools bitwise and
  the same attention (tested against float64 attention over the written pools). It needs the
  ``pallas_gpu`` kernel, decode (``q_len == 1``), unquantised pools stored in their dtype and
  unsharded heads (:func:`fused_write_supported` says why not).

  Args:
    q: ``[batch, q_len, q_heads, head_dim]``.
    k, v: ``[batch, T, kv_heads, head_dim]`` in the cache's dtype (as :func:`write_kv`).
    cache: the cache; slots: ``int32[batch, T]`` from :func:`~jax_paged_kv.reserve`.
    seq_ids: ``int32[batch]``; layer: ``int32[]`` (may be traced).
    q_lens, scale, soft_cap, sliding_window, return_lse, implementation, **knobs: as in
      :func:`paged_attention`.
    fuse: False (write, then attend), True (fused; raises ``ValueError`` where it cannot run)
      or ``"auto"`` (fused where it can run).
    donate: eager calls only: donate the input cache.

  Returns:
    ``(cache, out, status)`` or, with ``return_lse``, ``(cache, (out, lse), status)``;
    ``status`` is :func:`write_kv`'s: on a bad slot or layer nothing is written (eager calls
    raise), and attention reads the cache as it was.
  """
  if fuse not in (False, True, "auto"):
    raise ValueError(f"fuse must be False, True or 'auto', got {fuse!r}")
  q_len = jnp.shape(q)[1] if jnp.ndim(q) == 4 else -1
  why = fused_write_supported(cache, q_len, implementation) if fuse else "off"
  if fuse is True and why:
    raise ValueError(f"write_and_attend(fuse=True) cannot fuse: {why}")
  attend = dict(q_lens=q_lens, scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
                return_lse=return_lse, implementation=implementation, **knobs)
  if why:
    cache, status = write_kv(cache, slots, k, v, layer, seq_ids=seq_ids, donate=donate)
    return cache, paged_attention(q, cache, seq_ids, layer, **attend), status
  check_knobs("pallas_gpu", knobs, op="write_and_attend(fuse)")
  q, seq_ids, layer, q_lens, scale, soft_cap, sliding_window = _check_query(
      q, cache, seq_ids, layer, q_lens, scale, soft_cap, sliding_window, op="write_and_attend")
  _check_return_lse(return_lse)
  slots, k, v = check_write(cache, slots, k, v, layer, seq_ids, op="write_and_attend")
  if slots.shape[1] != 1:
    raise CacheShapeError(f"write_and_attend(fuse) writes one token per row, got slots "
                          f"{list(slots.shape)}")
  static = dict(scale=scale, soft_cap=soft_cap, sliding_window=sliding_window,
                return_lse=bool(return_lse),
                knobs=tuple(sorted(knobs.items())))
  cache, *res, status = _fused(cache, slots, k, v, layer, seq_ids, q, q_lens, donate=donate,
                               **static)
  return cache, (tuple(res) if return_lse else res[0]), status


def _fused_impl(cache, slots, k, v, layer, seq_ids, q, q_lens, *, scale, soft_cap,
                sliding_window, return_lse, knobs):
  cfg = cache.config
  bs, nb = cfg.block_size, cfg.num_blocks
  status = write_status(cache, slots, layer, seq_ids)
  ok = jnp.all(status == 0)
  tables, kv_lens, lay, q_lens = _kernel_rows(cache, seq_ids, layer, q_lens, q.shape[1])
  slot = slots[:, 0]
  match = tables == (slot // bs)[:, None]  # the row's table entry holding the slot
  has = ok & (slot < nb * bs) & jnp.any(match, axis=1)
  new_pos = jnp.where(has, jnp.argmax(match, axis=1) * bs + slot % bs, -1).astype(jnp.int32)
  kernel = get_implementation("pallas_gpu")
  res = kernel(q, cache.k_pool, cache.v_pool, lay, tables, kv_lens, q_lens, scale=scale,
               soft_cap=soft_cap, sliding_window=sliding_window, return_lse=return_lse,
               new_kv=(k[:, 0], v[:, 0], new_pos, jnp.where(has, slot, 0)), **dict(knobs))
  *attn, k_pool, v_pool = res
  return (cache.replace(k_pool=k_pool, v_pool=v_pool), *attn, status)


_fused = _eager_or_traced(
    _fused_impl, "write_and_attend", context=lambda cache, slots, k, v, layer, seq_ids, *_, **__:
    write_context(cache, slots, k, v, layer, seq_ids),
    ids=lambda cache, slots, k, v, layer, seq_ids, *_: seq_ids,
    static_argnames=("scale", "soft_cap", "sliding_window", "return_lse", "knobs"))
