"""Decoding and continuous batching on a device mesh, composed from the one-device pieces.

* :func:`decode_loop_on_mesh` / :func:`prefill_step_on_mesh`: the jitted steps of
  :mod:`jax_paged_kv.serving.decoding` as one program on a
  :class:`~jax_paged_kv.sharding.MeshLayout`.
  Tensor parallel: one cache and one model instance over the model axis (weights placed with
  :func:`~jax_paged_kv.sharding.param_shardings`). Data parallel: every shard runs its own
  step on its own cache slice (leading ``[data_shards]`` axis on every per-shard argument).
* :class:`MeshEngine`: one host scheduler over ``data_shards`` cache shards. It routes each
  request to the shard with the least outstanding work and runs one
  :class:`~jax_paged_kv.Engine` per shard, each on its own devices (tensor parallel over the
  shard's model axis when the layout has one). Greedy outputs equal a one-device engine's:
  a sequence's tokens do not depend on its batch-mates.

Each shard's engine compiles its own programs (XLA executables are bound to their devices), so
a first step on ``n`` shards compiles ``n`` times; a persistent compilation cache
(``jax_compilation_cache_dir``) makes later processes reuse them. Beyond one machine, run one
``MeshEngine`` per host on :func:`~jax_paged_kv.sharding.local_mesh` (tensor parallel inside
the host) and balance requests across hosts outside JAX: no traffic crosses hosts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

from jax_paged_kv.cache import CacheConfig, PagedKVCache
from jax_paged_kv.models.base import Model
from jax_paged_kv.serving.decoding import (
  SamplingParams,
  decode_loop,
  int_in_range,
  prefill_step,
)
from jax_paged_kv.serving.engine import Engine, EngineMetrics, RequestOutput, StreamDelta
from jax_paged_kv.serving.engine.engine import stream_deltas
from jax_paged_kv.sharding import (
    MeshLayout,
    on_mesh,
    param_shardings,
    place_cache,
    use_layout,
)


def _check_auto(layout: MeshLayout) -> None:
  if layout.explicit:
    raise ValueError("decoding on a mesh needs a mesh with auto axes (local_mesh, host_mesh, or "
                     "jax.sharding.Mesh(..., axis_types=(AxisType.Auto, ...))): the model's "
                     "matmuls are partitioned by XLA")


@functools.partial(jax.jit, static_argnames=("layout", "model", "max_steps", "implementation",
                                             "max_blocks", "return_logprobs",
                                             "top_logprobs"),
                   donate_argnames=("cache",))
def decode_loop_on_mesh(params: Any, cache: PagedKVCache, state: Any, num_steps, *,
                        layout: MeshLayout, model: Model, max_steps: int,
                        implementation: str | None = None, max_blocks: int | None = None,
                        return_logprobs: bool = False, top_logprobs: int = 0):
  """:func:`~jax_paged_kv.decode_loop` on a mesh layout, as one jitted program.

  Tensor parallel: ``params`` placed with :func:`~jax_paged_kv.sharding.param_shardings` and
  ``cache`` with :func:`~jax_paged_kv.sharding.cache_shardings`; arguments and results as for
  ``decode_loop``. Data parallel: the cache, ``state`` (every field), ``num_steps``
  (``int32[data_shards]``) and every result carry a leading ``[data_shards]`` axis; each shard
  runs its own loop (its own step count, early exit and status) and ``params`` are shared.

  Args:
    params: model weights.
    cache: the cache on the mesh (donated).
    state: the :class:`~jax_paged_kv.DecodeState` (stacked per shard with ``data_axis``).
    num_steps: steps to run (``int32[data_shards]`` with ``data_axis``).
    layout: the :class:`~jax_paged_kv.sharding.MeshLayout` (static).
    model, max_steps, implementation, max_blocks, return_logprobs, top_logprobs: as for
      ``decode_loop`` (static).

  Returns:
    ``(cache, state, out_tokens, steps, status)`` as ``decode_loop`` (per shard with
    ``data_axis``), and the logprobs after them with ``return_logprobs`` (and the top
    alternatives with ``top_logprobs``).
  """
  _check_auto(layout)
  extra = {"return_logprobs": True} if return_logprobs else {}
  if top_logprobs:
    extra["top_logprobs"] = top_logprobs
  fn = functools.partial(decode_loop, model=model, max_steps=max_steps,
                         implementation=implementation, max_blocks=max_blocks, **extra)
  return on_mesh(fn, layout, shared_argnums=(0,))(params, cache, state, num_steps)


@functools.partial(jax.jit, static_argnames=("layout", "model", "implementation", "max_blocks"),
                   donate_argnames=("cache",))
def prefill_step_on_mesh(params: Any, cache: PagedKVCache, tokens, seq_ids, num_new,
                         temperature, top_k, top_p, keys, key_index, *, layout: MeshLayout,
                         model: Model, implementation: str | None = None,
                         max_blocks: int | None = None, min_p=None):
  """:func:`~jax_paged_kv.prefill_step` on a mesh layout, as one jitted program.

  Arguments and results as for ``prefill_step``; with a ``data_axis`` every argument but
  ``params`` (``min_p`` too, when given), and every result, has a leading ``[data_shards]``
  axis.
  """
  _check_auto(layout)
  def fn(*args):
    *args, min_p = args
    return prefill_step(*args, model=model, implementation=implementation,
                        max_blocks=max_blocks, min_p=min_p)
  return on_mesh(fn, layout, shared_argnums=(0,))(params, cache, tokens, seq_ids, num_new,
                                                  temperature, top_k, top_p, keys, key_index,
                                                  min_p)


class MeshEngine:
  """Continuous batching on a mesh: one host scheduler, one cache shard per data index.

  Args:
    params: model weights (host or any device: each shard gets its own placed copy).
    model: the model (:class:`~jax_paged_kv.Model`, e.g. a :class:`~jax_paged_kv.LlamaConfig`),
      as for ``Engine``; :func:`~jax_paged_kv.sharding.param_shardings` splits Llama-style
      weights (a model with other weight names gets its weights replicated).
    cache_config: the config of *each* shard's cache.
    layout: a :class:`~jax_paged_kv.sharding.MeshLayout` with auto axes. ``data_axis``: one
      cache shard (and one :class:`~jax_paged_kv.Engine`) per index; ``model_axis``: each shard
      tensor parallel over it.
    **engine_kwargs: passed to every shard's :class:`~jax_paged_kv.Engine`.

  Each shard's cache is built on the host CPU and then placed (no accelerator ever holds more
  than its shard).
  """

  def __init__(self, params: Any, model: Model, cache_config: CacheConfig, layout: MeshLayout,
               **engine_kwargs):
    _check_auto(layout)
    layout.check(cache_config)
    self.layout = layout
    self.layouts = [layout.shard_layout(i) for i in range(layout.data_shards)]
    self.engines: list[Engine] = []
    host = jax.devices("cpu")[0]
    for sub in self.layouts:
      with jax.default_device(host):
        engine = Engine(params, model, cache_config, **engine_kwargs)
      engine.cache = place_cache(engine.cache, sub)
      engine.params = jax.device_put(params, param_shardings(params, model, sub))
      self.engines.append(engine)
    self._where: dict[int, tuple[int, int]] = {}  # request id -> (shard, the shard's id)
    self._load = [0] * layout.data_shards  # outstanding tokens routed to each shard
    self._cost: dict[int, int] = {}
    self._next_id = 0

  @property
  def data_shards(self) -> int:
    return self.layout.data_shards

  # ---- requests ------------------------------------------------------------------------------

  def add_request(self, prompt: Sequence[int], sampling: SamplingParams | None = None, *,
                  shard: int | None = None, cache_salt: str | None = None) -> int:
    """Queues a request on ``shard`` (default: the least loaded); returns its id.

    ``cache_salt``: as for :meth:`~jax_paged_kv.Engine.add_request` (with prefix caching,
    only requests with equal salts share cached blocks, within their shard). With
    ``SamplingParams(n=k)`` its ``k`` samples go to one shard (they share the prompt's
    blocks), with ids ``id`` to ``id + k - 1``.

    Raises:
      What :meth:`~jax_paged_kv.Engine.add_request` raises.
    """
    sampling = sampling or SamplingParams()
    if shard is None:
      shard = min(range(self.data_shards), key=lambda s: (self._load[s], s))
    if not 0 <= shard < self.data_shards:
      raise ValueError(f"{shard=} is not in [0, {self.data_shards})")
    local = self.engines[shard].add_request(prompt, sampling, cache_salt=cache_salt)
    first = self._next_id
    for i in range(sampling.n):  # the shard gave its samples the ids local .. local + n - 1
      self._where[first + i] = (shard, local + i)
      self._cost[first + i] = len(prompt) + sampling.max_new_tokens
      self._load[shard] += self._cost[first + i]
    self._next_id += sampling.n
    return first

  def shard_of(self, request_id: int) -> tuple[int, int]:
    """``(shard, the shard engine's request id)`` of a request."""
    return self._where[request_id]

  @property
  def has_work(self) -> bool:
    return any(e.has_work for e in self.engines)

  @property
  def finished(self) -> dict[int, RequestOutput]:
    """Every request finished so far, by (mesh-wide) request id."""
    out = {}
    for rid, (shard, local) in self._where.items():
      done = self.engines[shard].finished.get(local)
      if done is not None:
        out[rid] = dataclasses.replace(done, request_id=rid)
    return out

  def pop_finished(self) -> dict[int, RequestOutput]:
    """Returns :attr:`finished` and forgets it (each shard's outputs and the ids' routes), so
    a long-running server holds only what it has not handed out yet."""
    ids = {v: k for k, v in self._where.items()}
    out = {}
    for shard, engine in enumerate(self.engines):
      for local, done in engine.pop_finished().items():
        rid = ids[(shard, local)]
        del self._where[rid]
        out[rid] = dataclasses.replace(done, request_id=rid)
    return dict(sorted(out.items()))

  def abort_request(self, request_id: int) -> RequestOutput | None:
    """Stops a request on its shard (:meth:`~jax_paged_kv.Engine.abort_request`); returns
    its output so far (``finish_reason="abort"``), or None if it had already finished.

    Raises:
      KeyError: an id never returned by :meth:`add_request`, or one whose output
        :meth:`pop_finished` already handed out.
    """
    request_id = int_in_range(request_id, "request_id")  # True / 1.0 are not request 1
    if request_id not in self._where:
      raise KeyError(f"abort_request: no request {request_id} on this mesh (never added, or "
                     "its output was already taken by pop_finished)")
    shard, local = self._where[request_id]
    with use_layout(self.layouts[shard]):
      out = self.engines[shard].abort_request(local)
    if out is None:
      return None
    self._load[shard] -= self._cost.pop(request_id)
    return dataclasses.replace(out, request_id=request_id)

  @property
  def caches(self) -> list[PagedKVCache]:
    """Each shard's cache (on that shard's devices)."""
    return [e.cache for e in self.engines]

  @property
  def metrics(self) -> list[EngineMetrics]:
    """Each shard's :class:`~jax_paged_kv.EngineMetrics`."""
    return [e.metrics for e in self.engines]

  # ---- stepping ------------------------------------------------------------------------------

  def step(self) -> list[RequestOutput]:
    """One step of every shard that has work; returns the requests that finished."""
    ids = {v: k for k, v in self._where.items()}
    finished = []
    for shard, (engine, sub) in enumerate(zip(self.engines, self.layouts, strict=True)):
      if not engine.has_work:
        continue
      with use_layout(sub):
        done = engine.step()
      for out in done:
        rid = ids[(shard, out.request_id)]
        self._load[shard] -= self._cost.pop(rid)
        finished.append(dataclasses.replace(out, request_id=rid))
    return finished

  def stream(self) -> Iterator[list[StreamDelta]]:
    """Token streaming over every shard: as :meth:`~jax_paged_kv.Engine.stream`, with
    mesh-wide request ids (each yield follows one :meth:`step` of every shard with work)."""
    sent: dict[int, int] = {}
    while self.has_work or sent:
      done = {o.request_id: o for o in self.step()} if self.has_work else {}
      ids = {v: k for k, v in self._where.items()}
      now = {ids[(shard, local)]: out for shard, e in enumerate(self.engines)
             for local, out in e.in_flight().items()}

      def finished(rid):
        where = self._where.get(rid)
        return None if where is None else self.engines[where[0]].finished.get(where[1])

      yield stream_deltas(sent, {rid: now.get(rid) or done.get(rid) or finished(rid)
                                 for rid in set(sent) | set(now) | set(done)})

  def run(self, progress: Callable[[int], object] | None = None) -> list[RequestOutput]:
    """Steps until every request finished; returns them ordered by request id."""
    done = []
    while self.has_work:
      fin = self.step()
      done += fin
      if progress is not None and fin:
        progress(len(fin))
    return sorted(done, key=lambda o: o.request_id)
