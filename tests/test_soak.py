"""CI-sized soaks: the engine under random arrivals and preemption, the cache ops under jit.

Both run through the drivers in ``benchmarks/soak.py``; the long version is
``PYTHONPATH=. python -m benchmarks.soak --steps 20000``. The figures (steps run, requests,
preemptions, forks, truncations, blocks leaked, mismatches) are printed (``pytest -s``) and
recorded as test properties (``--junitxml``).
"""

import dataclasses

import jax
import jax.numpy as jnp

from benchmarks import soak
from jax_paged_kv import fork_sequence
from jax_paged_kv.models import init_params
from tests.llama_fixtures import SMALL
from tests.llama_reference import reference_greedy_penalised

PARAMS = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)


def emit(rep: soak.SoakReport, record_property) -> None:
  print(f"\n{soak.table([rep])}")
  for msg in rep.problems:
    print(f"{rep.name}: {msg}")
  for name, n in rep.figures.items():
    record_property(name, n)
  record_property("seconds", round(rep.seconds, 1))


def test_engine_soak_random_arrivals_with_preemption(record_property):
  """~300 engine steps on a 16-block pool: invariants every step, nothing leaked at the end,
  every request's tokens equal to an unconstrained run (greedy and seeded sampled alike; with
  min-p, penalties, logprobs, top alternatives and prompt logprobs on some, their scores too;
  parallel samples sample by sample),
  and greedy ones equal to a float64 numpy recomputation (penalised ones: its penalised
  greedy decoder)."""
  rep = soak.engine_soak(300, seed=0, model=SMALL, params=PARAMS, usable_blocks=16)
  emit(rep, record_property)
  f = rep.figures
  # The workload did what it is for: arrivals over time, preemptions, sampled requests.
  assert f["engine steps"] >= 250 and f["requests"] >= 100
  assert f["preemptions"] > 0 and f["sampled requests"] > 0
  assert f["reference preemptions"] == 0
  assert f["invariant failures"] == 0 and f["free count drifts"] == 0
  assert f["blocks leaked"] == 0 and f["nonzero ref counts"] == 0 and f["live slots"] == 0
  assert f["mismatches"] == 0
  assert rep.problems == []
  assert f["requests with min-p, penalties or logprobs"] >= 20
  assert f["requests with n > 1 samples"] >= 5 and f["prompt tokens shared by samples"] > 0
  greedy = [(i, p, s, toks) for i, (p, s, toks) in rep.outputs.items() if s.temperature == 0]
  assert len(greedy) >= 50 and sum(s.has_penalties for _, _, s, _ in greedy) >= 5
  wrong = [i for i, p, s, toks in greedy
           if toks != reference_greedy_penalised(
               PARAMS, SMALL, p, s.max_new_tokens, s.stop_tokens,
               repetition_penalty=s.repetition_penalty, presence_penalty=s.presence_penalty,
               frequency_penalty=s.frequency_penalty)]
  assert wrong == []


def test_engine_soak_with_swap_preemption(record_property):
  """The engine soak with ``preemption="swap"`` (preempted requests copied to host memory and
  back), parallel samples among the requests: every output equal to its own request's in an
  unconstrained run, nothing leaked."""
  rep = soak.engine_soak(100, seed=1, model=SMALL, params=PARAMS, usable_blocks=16,
                         preemption="swap")
  emit(rep, record_property)
  f = rep.figures
  assert f["preemptions"] > 0 and f["requests with n > 1 samples"] >= 3
  assert f["invariant failures"] == 0 and f["mismatches"] == 0 and rep.problems == []
  assert f["free count drifts"] == 0
  assert f["blocks leaked"] == 0 and f["nonzero ref counts"] == 0 and f["live slots"] == 0


def test_cache_soak_forks_truncations_under_jit(record_property):
  """400 random allocate/append/fork/reorder/truncate/free calls under jit against a
  plain-Python model of each sequence's tokens and blocks; then everything is freed."""
  rep = soak.cache_soak(400, seed=0)
  emit(rep, record_property)
  f = rep.figures
  for op in ("allocations", "appends", "forks", "reorders", "truncations", "frees"):
    assert f[op] >= 20, op
  assert f["copy-on-write copies"] > 0 and f["peak shared blocks"] > 0
  assert f["pool exhausted"] > 0 and f["rejected calls"] > f["pool exhausted"]
  assert f["invariant failures"] == 0 and f["status mismatches"] == 0 and f["mismatches"] == 0
  assert f["blocks leaked"] == 0 and f["nonzero ref counts"] == 0 and f["live slots"] == 0
  assert rep.problems == []


def test_cache_soak_catches_a_fork_that_forgets_its_references(monkeypatch):
  """The soak's checks are live: a fork that shares blocks without counting the references
  is caught (invariants, free count, model comparison and leaks)."""

  def forgetful_fork(cache, parents, children):
    out, status = fork_sequence(cache, parents, children)
    refs = cache.allocator.ref_counts
    return out.replace(allocator=dataclasses.replace(out.allocator, ref_counts=refs)), status

  monkeypatch.setitem(soak._OPS, "fork", jax.jit(forgetful_fork))
  rep = soak.cache_soak(150, seed=1)
  f = rep.figures
  assert f["forks"] > 0
  assert f["invariant failures"] > 0 and f["mismatches"] > 0
  assert rep.problems and not rep.ok


def test_cache_soak_catches_a_reorder_that_drops_references_first(monkeypatch):
  """... and a reorder that releases a sequence's old blocks before taking the new references
  (a block both hold would pass through zero onto the free list while still in use)."""
  from jax_paged_kv.cache import allocator as alloc_lib
  from jax_paged_kv.cache.ops import reorder_sequences

  def early_release(cache, ids, srcs):
    sid = jnp.clip(ids, 0, cache.config.max_seqs - 1)
    nb = -(-cache.seq_lens[sid] // cache.config.block_size)
    held = (ids >= 0)[:, None] & (jnp.arange(cache.config.max_blocks_per_seq)[None, :]
                                  < nb[:, None])
    dropped = cache.replace(allocator=alloc_lib.release_blocks(
        cache.allocator, cache.block_tables[sid], held))
    out, status = reorder_sequences(dropped, ids, srcs)
    retaken = alloc_lib.retain_blocks(out.allocator, cache.block_tables[sid], held)
    bad = out.replace(allocator=retaken)
    return jax.tree.map(lambda a, b: jnp.where(jnp.any(status != 0), a, b), cache, bad), status

  monkeypatch.setitem(soak._OPS, "reorder", jax.jit(early_release))
  rep = soak.cache_soak(150, seed=1)
  assert rep.figures["reorders"] > 0
  assert rep.problems and not rep.ok

