"""Token eviction for long generations: StreamingLLM's attention sinks vs full attention.

``free_outside_window(cache, ids, window=w, sink_tokens=s)`` after every decode step keeps the
blocks of the first ``s`` tokens and of the last ``w`` positions and frees the rest, so a
sequence holds ``O(w)`` blocks however long it runs; attention then sees exactly the kept keys.
For a model whose layers all attend within ``w`` that is exact; for a full-attention model it
is an approximation. This measures the approximation on the demo's ``tiny`` Llama (random
weights, float32), one prompt of ``--prompt`` tokens and ``--new`` generated tokens:

* **teacher-forced**: the full-attention greedy continuation is fed to both caches; per
  position, whether the next-token argmax agrees with full attention's and the relative L2
  error of the logits (median and p90 over positions);
* **free-running**: greedy generation with eviction (``decode_loop(..., evict=(w, s))``): the
  number of tokens identical to full attention's before the first difference;
* peak blocks held by the sequence, against full attention's.

Configurations: full attention; a window only (``s = 0``); windows of 32-256 with 4 sink
tokens. Weight scales 1 (well-conditioned) and 2 (the demo's sharper weights).

    python -m benchmarks.streaming [--quick] [--prompt 64] [--new 448]

Saves ``benchmarks/results/streaming.json`` and its RESULTS.md section (``--quick`` writes to
``benchmarks/out/``).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from tqdm.auto import tqdm

import jax_paged_kv as pk
from benchmarks import report
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import (
    DecodeState,
    SamplingParams,
    decode_loop,
    decode_step,
    make_key,
    prefill_step,
)
from jax_paged_kv.workloads import model_config

BLOCK = 16


def _prefill(params, model, prompt, max_len):
  cfg = model.cache_config(num_blocks=-(-max_len // BLOCK) + 2, max_seqs=1, max_seq_len=max_len,
                           block_size=BLOCK)
  cache, _ = pk.allocate_sequences(pk.init_cache(cfg), np.zeros(1, np.int32))
  one = np.ones(1, np.float32)
  cache, first, logits, status = prefill_step(
      params, cache, np.asarray([prompt], np.int32), np.zeros(1, np.int32),
      np.asarray([len(prompt)], np.int32), 0 * one, np.zeros(1, np.int32), one,
      np.stack([make_key(0)]), np.zeros(1, np.int32), model=model)
  assert not np.any(np.asarray(status))
  return cache, int(first[0])


def held_blocks(cache) -> int:
  n = int(cache.seq_lens[0])
  return int(np.sum(np.asarray(cache.block_tables[0, :-(-n // BLOCK)]) > 0))


def teacher_forced(params, model, prompt, tokens, evict):
  """Logits at every generated position with ``tokens`` fed in; the peak blocks held; and per
  position whether a block had been freed before its step (its logits can differ from full
  attention's only then)."""
  cache, _ = _prefill(params, model, prompt, len(prompt) + len(tokens) + 1)
  ids = np.zeros(1, np.int32)
  out, peak, evicted, freed = [], held_blocks(cache), [], False
  for t in tokens:
    cache, logits, status = decode_step(params, cache, np.asarray([t], np.int32), ids,
                                        model=model)
    assert not np.any(np.asarray(status))
    out.append(np.asarray(logits[0], np.float64))
    evicted.append(freed)
    if evict is not None:
      cache, _, _ = pk.free_outside_window(cache, ids, window=evict[0], sink_tokens=evict[1])
    held = held_blocks(cache)
    freed = freed or held < -(-int(cache.seq_lens[0]) // BLOCK)
    peak = max(peak, held)
  return np.stack(out), peak, np.asarray(evicted)


def free_running(params, model, prompt, new, evict):
  cache, first = _prefill(params, model, prompt, len(prompt) + new + 1)
  state = DecodeState.create([first], [0], [SamplingParams(max_new_tokens=new)])
  cache, state, out, steps, status = decode_loop(params, cache, state, np.int32(new - 1),
                                                 max_steps=new - 1, model=model, evict=evict)
  assert not np.any(np.asarray(status))
  return [first] + [int(x) for x in np.asarray(out[0, :int(steps)])]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="a short prompt and generation")
  p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 64)")
  p.add_argument("--new", type=int, default=None, help="generated tokens (default 448)")
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  n_prompt = args.prompt or (16 if args.quick else 64)
  new = args.new or (64 if args.quick else 448)
  windows = [16, 32] if args.quick else [32, 64, 128, 256]
  evicts = [None, (windows[-1], 0)] + [(w, 4) for w in windows]
  model = model_config("tiny")
  rng = np.random.default_rng(0)
  prompt = [int(x) for x in rng.integers(0, model.vocab_size, n_prompt)]
  rows, data = [], []
  runs = [(scale, ev) for scale in (1.0, 2.0) for ev in evicts]
  bar = tqdm(runs, desc="streaming", unit="run")
  full = {}
  for scale, ev in bar:
    params = init_params(model, jax.random.PRNGKey(0), scale=scale)
    if ev is None:
      tokens = free_running(params, model, prompt, new, None)
      logits, peak, _ = teacher_forced(params, model, prompt, tokens[:-1], None)
      full[scale] = (tokens, logits, peak)
    ref_tokens, ref_logits, ref_peak = full[scale]
    logits, peak, evicted = teacher_forced(params, model, prompt, ref_tokens[:-1], ev)
    # Agreement and error over the positions after the first eviction (before it both runs
    # attend to the same keys): full attention's own row counts every position.
    scored = evicted if ev is not None else np.ones(len(evicted), bool)
    err_all = np.linalg.norm(logits - ref_logits, axis=-1) / np.linalg.norm(ref_logits, axis=-1)
    if scored.any():
      agree = float(np.mean(logits.argmax(-1)[scored] == ref_logits.argmax(-1)[scored]))
      err = err_all[scored]
    else:
      agree, err = float("nan"), np.full(1, np.nan)
    got = free_running(params, model, prompt, new, ev) if ev is not None else ref_tokens
    same = next((i for i, (a, b) in enumerate(zip(got, ref_tokens, strict=True)) if a != b),
                len(ref_tokens))
    name = ("full attention" if ev is None else
            f"window {ev[0]}" + (f" + {ev[1]} sinks" if ev[1] else ""))
    row = {"weights scale": f"{scale:g}", "attention": name,
           "peak blocks": f"{peak} / {ref_peak}",
           "positions scored": f"{int(scored.sum())}",
           "next-token agreement": f"{100 * agree:.1f}%",
           "logit rel. L2 median": f"{np.median(err):.2e}",
           "logit rel. L2 p90": f"{np.quantile(err, 0.9):.2e}",
           "free-running tokens before a difference": f"{same} / {new}"}
    rows.append(row)
    data.append(dict(scale=scale, window=None if ev is None else ev[0],
                     sinks=None if ev is None else ev[1], peak_blocks=peak,
                     full_peak_blocks=ref_peak, agreement=agree,
                     err_median=float(np.median(err)), err_p90=float(np.quantile(err, 0.9)),
                     scored=int(scored.sum()), same_prefix=same, err=err_all.tolist()))
    bar.set_postfix_str(f"{name}: {100 * agree:.0f}%")
  columns = list(rows[0])
  print(report.text_table(columns, rows))
  plot = save_plot(data, new) if not args.quick else None
  notes = (f"The demo's `tiny` Llama (random weights, float32, {report.machine_name()}), one "
           f"{n_prompt}-token prompt, {new} generated tokens, blocks of {BLOCK} tokens. "
           "Eviction runs after every decode step (`free_outside_window`); the prompt's "
           "prefill sees every key. Teacher-forced: full attention's greedy tokens fed to both; "
           "agreement and logit error count only the positions after the first freed block "
           "('positions scored'; before it both runs see the same keys); "
           "free-running: greedy with eviction (`decode_loop(..., evict=...)`) until its first "
           "token that differs from full attention's.")
  report.save("streaming", title="Token eviction: attention sinks vs full attention",
              markdown=report.markdown_table(columns, rows), notes=notes,
              data={"rows": data, "prompt": n_prompt, "new": new, "block_size": BLOCK},
              plot=plot)


def save_plot(data, new) -> str:
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  for ax, scale in zip(axes, (1.0, 2.0), strict=True):
    for d in data:
      if d["scale"] != scale or d["window"] is None:
        continue
      label = f"window {d['window']}" + (f" + {d['sinks']} sinks" if d["sinks"] else "")
      ax.plot(np.arange(1, len(d["err"]) + 1), d["err"], label=label, lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("generated position")
    ax.set_title(f"weights scale {scale:g}")
    ax.legend(fontsize=8)
  axes[0].set_ylabel("logit relative L2 error vs full attention")
  fig.suptitle(f"Token eviction vs full attention, teacher-forced ({new} tokens)")
  fig.tight_layout()
  return report.save_figure(fig, "streaming")


if __name__ == "__main__":
  main()
