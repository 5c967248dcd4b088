"""What each sampling feature costs per decode step, against greedy decoding, same loop.

For each batch size and each way of picking tokens (greedy; temperature sampling; top-k 50 with
top-p 0.9; min-p 0.05; repetition / presence / frequency penalties; logprobs; the 20 top
alternatives), ``decode_loop`` runs the same workload as the engine would: every call builds its
:class:`~jax_paged_kv.DecodeState` on the host (with the penalties: the rows' token lists, sent
and counted on device), takes ``decode_steps`` steps and reads the tokens back. Steady state:
median ms per step over alternating repeats; cold start: the first call's wall and compile
seconds. The vocabulary is what sampling work scales with: the default ``wide`` model has a
Llama-sized one (32,000).

    python -m benchmarks.sampling [--quick] [--model wide] [--batch 8 32]

Saves ``benchmarks/results/sampling.json``, ``benchmarks/plots/sampling.png`` and its
RESULTS.md section.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks import report
from jax_paged_kv import allocate_sequences, init_cache, reserve
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import DecodeState, SamplingParams, decode_loop
from jax_paged_kv.workloads import MODELS, model_config

PROMPT, BLOCK = 32, 16

# name -> (SamplingParams keywords, decode_loop keywords)
VARIANTS = {
    "greedy": ({}, {"all_greedy": True}),
    "temperature 1": ({"temperature": 1.0}, {}),
    "top-k 50 + top-p 0.9": ({"temperature": 1.0, "top_k": 50, "top_p": 0.9}, {}),
    "min-p 0.05": ({"temperature": 1.0, "min_p": 0.05}, {}),
    "penalties (greedy)": ({"repetition_penalty": 1.1, "presence_penalty": 0.5,
                            "frequency_penalty": 0.5}, {"all_greedy": True}),
    "logprobs": ({"logprobs": True}, {"all_greedy": True, "return_logprobs": True}),
    "top 20 logprobs": ({"logprobs": True, "top_logprobs": 20},
                        {"all_greedy": True, "return_logprobs": True, "top_logprobs": 20}),
}


def runner(params, model, batch: int, decode_steps: int, calls: int, variant: str,
           history: int):
  """A function that decodes ``calls`` calls of ``decode_steps`` steps for ``batch`` rows and
  returns the wall seconds per step (state building and token read-back included; the
  penalties' token lists padded to ``history``, as the engine pads them to its
  ``max_seq_len``)."""
  samp_kw, loop_kw = VARIANTS[variant]
  samp = SamplingParams(max_new_tokens=10**6, seed=1, **samp_kw)
  new = calls * decode_steps + 1
  max_len = BLOCK * -(-(PROMPT + new) // BLOCK)
  cc = model.cache_config(num_blocks=1 + batch * max_len // BLOCK, max_seqs=batch,
                          max_seq_len=max_len, block_size=BLOCK)
  ids = np.arange(batch, dtype=np.int32)
  rng = np.random.default_rng(0)
  prompts = rng.integers(0, model.vocab_size, (batch, PROMPT)).tolist()
  history_len = max(history, max_len)

  def one_run():
    cache = init_cache(cc)
    cache, _ = allocate_sequences(cache, ids)
    cache, _, _ = reserve(cache, ids, PROMPT, max_new=PROMPT)  # the prompts' room (not timed)
    outputs = [[1] for _ in range(batch)]
    jax.block_until_ready(cache)
    wall, steps = 0.0, 0
    for _ in range(calls):
      t0 = time.perf_counter()
      history = None
      if samp.has_penalties:
        history = list(zip(prompts, outputs, strict=True))
      state = DecodeState.create([o[-1] for o in outputs], ids.tolist(), [samp] * batch,
                                 [len(o) for o in outputs], history=history,
                                 vocab_size=model.vocab_size if history else None,
                                 history_length=history_len if history else None)
      cache, state, out, n, *_ = decode_loop(params, cache, state, jnp.int32(decode_steps),
                                             model=model, max_steps=decode_steps, **loop_kw)
      out = np.asarray(out)
      wall += time.perf_counter() - t0
      steps += int(n)
      for o, row in zip(outputs, out, strict=True):
        o.extend(int(t) for t in row if t >= 0)
    return wall / steps

  return one_run


def _reading(rows, vocab: int) -> str:
  """What the table says, from its own numbers."""
  def ratio(v):
    return max(r["ratio"] for r in rows if r["variant"] == v)
  return (f" Reading: sampling at a temperature costs up to {ratio('temperature 1'):.2f}x "
          f"greedy here, the price of an exact draw on CPU (one Gumbel, two logarithms and "
          f"threefry bits, per vocabulary entry: {vocab} per row per step); top-k with top-p "
          f"adds two 32-pass bisections ({ratio('top-k 50 + top-p 0.9'):.2f}x), min-p (one "
          f"comparison) adds about nothing to sampling ({ratio('min-p 0.05'):.2f}x); the "
          f"penalties "
          f"(tables built per call included, {ratio('penalties (greedy)'):.2f}x), logprobs "
          f"({ratio('logprobs'):.2f}x) and 20 top alternatives ({ratio('top 20 logprobs'):.2f}x) "
          "cost far less (the largest ratio over the batch sizes is quoted).")


def plot(rows, batches) -> str:
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4))
  names = list(VARIANTS)[1:]
  width = 0.8 / len(batches)
  for i, b in enumerate(batches):
    ratios = [next(r["ratio"] for r in rows if r["batch"] == b and r["variant"] == v)
              for v in names]
    ax.bar(np.arange(len(names)) + i * width, ratios, width, label=f"batch {b}")
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_xticks(np.arange(len(names)) + width * (len(batches) - 1) / 2)
  ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
  ax.set_ylabel("ms per step / greedy's")
  ax.set_title("Sampling features: decode step time relative to greedy")
  ax.legend()
  fig.tight_layout()
  return report.save_figure(fig, "sampling")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="model tiny, batch 8, 2 repeats")
  p.add_argument("--model", choices=sorted(MODELS), default=None, help="default wide")
  p.add_argument("--batch", type=int, nargs="+", default=None, help="default 8 32")
  p.add_argument("--decode-steps", type=int, default=8)
  p.add_argument("--calls", type=int, default=None, help="calls per run (default 6, 2 quick)")
  p.add_argument("--repeats", type=int, default=None, help="default 5 (2 with --quick)")
  p.add_argument("--history", type=int, default=2048,
                 help="padded token-list length of the penalties (an engine's max_seq_len)")
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  name = args.model or ("tiny" if args.quick else "wide")
  batches = args.batch or ([8] if args.quick else [8, 32])
  repeats = args.repeats or (2 if args.quick else 5)
  calls = args.calls or (2 if args.quick else 6)
  model = model_config(name)
  params = init_params(model, jax.random.PRNGKey(0))
  machine = report.machine_name()
  rows = []
  bar = tqdm(total=len(batches) * len(VARIANTS) * (1 + repeats), desc="sampling", unit="run")
  for b in batches:
    runs = {v: runner(params, model, b, args.decode_steps, calls, v, args.history)
            for v in VARIANTS}
    cold = {}
    for v, run in runs.items():
      cold[v] = report.first_call(run)
      bar.update()
    times = {v: [] for v in VARIANTS}
    for _ in range(repeats):  # alternate: load drift hits every variant
      for v, run in runs.items():
        times[v].append(run())
        bar.update()
    base = times["greedy"]
    for v in VARIANTS:
      rows.append({"batch": b, "variant": v, "ms": 1e3 * report.median(times[v]),
                   "ratio": report.median([t / g for t, g in zip(times[v], base, strict=True)]),
                   "first_s": cold[v][0], "compile_s": cold[v][1], "times": times[v]})
  bar.close()
  columns = ["batch", "sampling", "ms / step", "vs greedy", "first call s", "compile s"]
  table = [[r["batch"], r["variant"], f"{r['ms']:.2f}", f"{r['ratio']:.2f}x",
            f"{r['first_s']:.2f}", f"{r['compile_s']:.2f}"] for r in rows]
  print(report.text_table(columns, table))
  notes = (f"Model `{name}` (vocabulary {model.vocab_size}, random weights), {PROMPT}-token "
           f"prompts, `decode_loop` with `decode_steps={args.decode_steps}`, {calls} calls per "
           "run, each building its `DecodeState` on the host (with penalties: the rows' token "
           f"lists padded to {args.history} tokens, as an engine with that `max_seq_len` pads "
           "them, then counted on device into `[batch, vocab]` tables) and reading the tokens "
           "back, as the engine does. Steady "
           f"state: medians of {repeats} alternating runs (vs greedy: median of the runs' "
           f"ratios) on {machine}. Cold start: each variant's first run, in one process after "
           "the previous variants (a program they share compiles once): its wall seconds and "
           "JAX's compile seconds in it. Greedy runs the argmax-only program (`all_greedy`); "
           "the others add their work to it." + _reading(rows, model.vocab_size))
  report.save(report.result_name("sampling"), script="sampling",
              title="Sampling features per decode step",
              markdown=report.markdown_table(columns, table), notes=notes,
              plot=plot(rows, batches),
              data={"model": name, "rows": rows, "repeats": repeats, "calls": calls,
                    "decode_steps": args.decode_steps, "history": args.history})
  return 0


if __name__ == "__main__":
  main()
