"""The engine's wall time per decode step against the jitted decode loop alone, same batch.

For each batch size ``B``: ``B`` greedy requests with equal prompts and output lengths, so every
decode call of the engine has ``B`` live rows, one batch width and one bucket of block-table
columns. The engine is warmed up with one such run (compilation), then timed on a second one:
the wall time of the :meth:`~jax_paged_kv.Engine.step` calls that only decoded (no prefill),
divided by the decode steps they took. The baseline is
:func:`~jax_paged_kv.serving.decoding.decode_loop` alone, called the same way (same cache
shape, batch, block-table columns read, ``decode_steps`` steps per call, outputs fed back and
each call waited for), nothing around it. Ratio = engine / loop alone; goal <= 1.25 (the host
work of scheduling, packing and reading the tokens back must stay small next to a step).

    python -m benchmarks.engine_overhead [--quick] [--model small] [--batch 8 32]

Saves ``benchmarks/results/engine_overhead.json`` (``engine_overhead_gpu.json`` on a GPU) and
its RESULTS.md section.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks import report
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import DecodeState, SamplingParams, decode_loop
from jax_paged_kv.serving.engine import Engine
from jax_paged_kv.workloads import MODELS, model_config

PROMPT, NEW, BLOCK = 32, 200, 16


def engine_runner(params, model, cc, batch: int, decode_steps: int):
  """A function that runs the workload through one engine (warmed up) and returns its wall
  seconds per decode step over its decode-only steps; and its first run's cold start."""
  engine = Engine(params, model, cc, decode_steps=decode_steps, batch_bucket_min=batch)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, model.vocab_size, PROMPT).tolist() for _ in range(batch)]

  def one_run():
    for p in prompts:
      engine.add_request(p, SamplingParams(max_new_tokens=NEW))
    wall, cpu, steps = 0.0, 0.0, 0
    while engine.has_work:
      m = engine.metrics
      prefills, decoded = m.prefill_calls, m.decode_steps
      t0, c0 = time.perf_counter(), time.process_time()
      engine.step()
      dt, dc = time.perf_counter() - t0, time.process_time() - c0
      if m.prefill_calls == prefills and m.decode_steps > decoded:
        wall += dt
        cpu += dc
        steps += m.decode_steps - decoded
    return wall / steps, cpu / steps

  return one_run, report.first_call(one_run)  # the first run compiles


def loop_runner(params, model, cc, batch: int, decode_steps: int):
  """A function that runs ``decode_loop`` alone at the engine's shape (warmed up) and returns
  its seconds per step; and its first run's cold start."""
  from jax_paged_kv import allocate_sequences, init_cache, reserve
  ids = np.arange(batch, dtype=np.int32)
  mb = -(-(PROMPT + NEW) // BLOCK)
  mb = 1 << (mb - 1).bit_length()  # the engine's bucket (a power of two of 256 tokens or more)
  mb = max(mb, 256 // BLOCK)

  def one_run():
    cache = init_cache(cc)
    cache, _ = allocate_sequences(cache, ids)
    cache, _, _ = reserve(cache, ids, PROMPT, max_new=PROMPT)  # the prompts' room (not timed)
    state = DecodeState.create([1] * batch, ids.tolist(),
                               [SamplingParams(max_new_tokens=NEW)] * batch)
    jax.block_until_ready((cache, state))
    wall, cpu, steps = 0.0, 0.0, 0
    while not bool(np.all(np.asarray(state.done))):
      t0, c0 = time.perf_counter(), time.process_time()
      cache, state, out, n, _ = decode_loop(params, cache, state, jnp.int32(decode_steps),
                                            model=model, max_steps=decode_steps, max_blocks=mb)
      n = int(n)
      np.asarray(out)
      wall += time.perf_counter() - t0
      cpu += time.process_time() - c0
      steps += n
    return wall / steps, cpu / steps

  return one_run, report.first_call(one_run)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="batch 8 only, 2 repeats")
  p.add_argument("--model", choices=sorted(MODELS), default="small")
  p.add_argument("--batch", type=int, nargs="+", default=None, help="default 8 32")
  p.add_argument("--decode-steps", type=int, default=8)
  p.add_argument("--repeats", type=int, default=None, help="default 5 (2 with --quick)")
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  batches = args.batch or ([8] if args.quick else [8, 32])
  repeats = args.repeats or (2 if args.quick else 5)
  model = model_config(args.model)
  params = init_params(model, jax.random.PRNGKey(0))
  machine = report.machine_name()
  rows = []
  for b in tqdm(batches, desc="engine_overhead", unit="batch"):
    cc = model.cache_config(num_blocks=1 + b * -(-(PROMPT + NEW) // BLOCK), max_seqs=b,
                            max_seq_len=BLOCK * -(-(PROMPT + NEW) // BLOCK), block_size=BLOCK)
    loop, loop_cold = loop_runner(params, model, cc, b, args.decode_steps)
    engine, engine_cold = engine_runner(params, model, cc, b, args.decode_steps)
    pairs = [(loop(), engine()) for _ in range(repeats)]  # alternate: load drift hits both
    med = report.median
    rows.append({"batch": b, "loop_ms": 1e3 * med([a[0] for a, _ in pairs]),
                 "engine_ms": 1e3 * med([e[0] for _, e in pairs]),
                 "ratio": med([e[0] / a[0] for a, e in pairs]),
                 "loop_cpu_ms": 1e3 * med([a[1] for a, _ in pairs]),
                 "engine_cpu_ms": 1e3 * med([e[1] for _, e in pairs]),
                 "cpu_ratio": med([e[1] / a[1] for a, e in pairs]), "pairs": pairs,
                 "loop_first_s": loop_cold[0], "loop_compile_s": loop_cold[1],
                 "engine_first_s": engine_cold[0], "engine_compile_s": engine_cold[1]})
  columns = ["batch", "decode_loop alone ms/step", "engine ms/step", "engine / loop",
             "CPU ms/step, loop alone", "CPU ms/step, engine", "engine / loop (CPU)",
             "first run s, loop / engine", "compile s, loop / engine"]
  table = [[r["batch"], f"{r['loop_ms']:.2f}", f"{r['engine_ms']:.2f}", f"{r['ratio']:.2f}x",
            f"{r['loop_cpu_ms']:.2f}", f"{r['engine_cpu_ms']:.2f}", f"{r['cpu_ratio']:.2f}x",
            f"{r['loop_first_s']:.1f} / {r['engine_first_s']:.1f}",
            f"{r['loop_compile_s']:.1f} / {r['engine_compile_s']:.1f}"]
           for r in rows]
  print(report.text_table(columns, table))
  notes = (f"Model `{args.model}` (random weights), {PROMPT}-token prompts, {NEW} new tokens "
           f"each, greedy, `decode_steps={args.decode_steps}`; engine: wall time of its "
           "decode-only steps per decode step; loop alone: the jitted `decode_loop` at the same "
           f"shape, each call waited for. Runs alternate; medians of {repeats} runs (the ratio: "
           f"median of the runs' ratios) on {machine}. Process CPU time (all threads) per step is "
           "shown too: on a shared machine it moves less with other processes' load than wall "
           "time. Goal: engine / loop <= 1.25. Cold start: each side's first run (the same "
           "requests, compilation included; the engine also prefills and compiles its prefill "
           "program, and runs after the loop in one process, so a program both use compiles "
           "once, in the loop's run) and the JAX compile seconds in it.")
  report.save(report.result_name("engine_overhead"), script="engine_overhead",
              title="Engine overhead per decode step",
              markdown=report.markdown_table(columns, table), notes=notes,
              data={"model": args.model, "rows": rows, "repeats": repeats,
                    "decode_steps": args.decode_steps})
  return 0


if __name__ == "__main__":
  main()
