"""One process of the two-process run in ``tests/test_sharding.py`` (``jax.distributed``).

    python -m tests.multihost_worker PROCESS_ID PORT

Each process has 4 CPU devices. The global mesh is the recommended multi-host layout
(:func:`jax_paged_kv.sharding.host_mesh`): data shards across the processes, tensor parallel
inside each. One jitted program appends to every shard's cache and attends with the Pallas GPU
kernel (interpret mode) per heads shard; each process checks its own shard against a one-device
run of the same calls, and prints ``OK`` on success.
"""

from __future__ import annotations

import functools
import sys

import jax


def main(process_id: int, port: int) -> None:
  jax.config.update("jax_num_cpu_devices", 4)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import jax_paged_kv as pk
  from jax_paged_kv import sharding as shd

  mesh = shd.host_mesh(model=4)
  assert jax.process_count() == 2 and mesh.shape == {"data": 2, "model": 4}, mesh.shape
  assert [{d.process_index for d in row} for row in mesh.devices] == [{0}, {1}]
  cfg = pk.CacheConfig(num_layers=1, num_kv_heads=4, head_dim=16, num_blocks=10, max_seqs=2,
                       max_seq_len=32, block_size=8)
  layout = shd.MeshLayout(mesh, model_axis="model", data_axis="data")
  cache = shd.init_sharded_cache(cfg, layout)
  rng = np.random.default_rng(process_id)  # each process holds its own shard's inputs
  k = rng.standard_normal((1, cfg.num_layers, 2, 5, 4, 16)).astype(np.float32)
  q = rng.standard_normal((1, 2, 1, 8, 16)).astype(np.float32)

  def step(c, k, q):
    ids = jnp.array([0, 1], jnp.int32)
    c, _ = pk.allocate_sequences(c, ids)
    c, st = pk.append_kv(c, k, k, ids, num_new=jnp.array([5, 3], jnp.int32))
    out = pk.paged_attention(q, c, ids, 0, implementation="pallas_gpu", interpret=True)
    return c, out, st

  def global_array(x):
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x,
                                                  (2, *x.shape[1:]))

  c, out, st = jax.jit(shd.map_shards(step, layout))(cache, global_array(k), global_array(q))
  local = sorted(out.addressable_shards, key=lambda s: s.index[3].start)
  got = np.concatenate([np.asarray(s.data)[0] for s in local], axis=2)  # [batch, 1, heads, d]
  one = jax.device_put(pk.init_cache(cfg), jax.local_devices()[0])
  want_cache, want, want_st = jax.jit(functools.partial(step))(one, k[0], q[0])
  assert not np.any(np.asarray(want_st))
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-6, rtol=1e-6)
  lens = [s for s in c.seq_lens.addressable_shards]
  assert all(np.array_equal(np.asarray(s.data)[0], [5, 3]) for s in lens)
  pools = sorted(c.k_pool.addressable_shards, key=lambda s: s.index[2].start)
  pool = np.concatenate([np.asarray(s.data)[0] for s in pools], axis=1)
  np.testing.assert_array_equal(pool, np.asarray(want_cache.k_pool))
  jax.distributed.shutdown()
  print("OK", process_id, flush=True)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]))
