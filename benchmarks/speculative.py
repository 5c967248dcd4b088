"""Speculative decoding (prompt lookup, draft models) against greedy ``decode_loop``, one jit each.

``--prompts`` prompts get ``--new-tokens`` greedy tokens each (no stop token, so every way
generates the same tokens), on two workloads:

* **repetitive**: a random passage of ``--passage`` tokens repeated ``--copies`` times, then
  ``--tail`` random tokens (what prompt lookup is for: outputs that repeat their input; a
  random-weight model's greedy output also tends to fall into cycles, which lookup finds too);
* **random**: ``passage * copies + tail`` random tokens (lookup rarely finds anything).

Every way starts from the same prefilled target cache (``prepare_speculative``) and is timed
from there to the tokens on the host:

* **greedy** (the baseline): the jitted ``decode_loop``, one target step per token;
* **prompt lookup**, ``k`` in ``--ks``: ``speculative_loop`` with n-gram drafts (sizes 3 down
  to 1, Hugging Face's ``prompt_lookup_num_tokens``);
* **1-layer draft**, ``k`` in ``--draft-ks``: a random draft model of one layer, a quarter of
  the target's width (acceptance near zero: its weights have nothing to do with the target's);
* **noisy copy**: the target's weights plus ``0.6 * std`` noise per weight (the test suite's
  ``NOISY`` draft), which agrees with the target part of the time; its steps cost a target
  step each;
* **self draft (bound)**: the target as its own draft. Every draft is accepted, so this is the
  upper bound of acceptance; each of its ``k`` draft steps costs a target step, so it shows the
  cost structure, not a speedup (not a setup to use).

Every way's tokens must equal the greedy ones (checked, every run). Reported: acceptance
(accepted / drafted draft tokens), target model calls (loop iterations) per generated token of
a row (an iteration serves the whole batch, so the row that gains least sets it), the loop's
steady wall time (median of ``--repeats`` after a first, compiling call; the
ways alternate) and tokens/s, its ratio to greedy's in the same run, and the first call's wall
and compile seconds. A draft model's prefill (done by ``prepare_speculative``) is not timed.

    python -m benchmarks.speculative [--quick] [--ks 2 4 8] [--new-tokens 128]

Saves ``benchmarks/results/speculative.json``, ``benchmarks/plots/speculative.png`` and its
RESULTS.md section (``--quick`` writes to ``benchmarks/out/`` instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from benchmarks import report
from jax_paged_kv.models import LlamaConfig, init_params
from jax_paged_kv.serving.decoding import SamplingParams, decode_loop
from jax_paged_kv.serving.engine.metrics import compile_timer
from jax_paged_kv.serving.speculative import SpeculativeConfig, prepare_speculative
from jax_paged_kv.workloads import MODELS, model_config

WORKLOADS = ("repetitive", "random")
GREEDY, LOOKUP, SMALL_DRAFT, NOISY, SELF = (
    "greedy", "prompt lookup", "1-layer draft", "noisy copy", "self draft (bound)")
DRAFTS = (SMALL_DRAFT, NOISY, SELF)


def draft_config(model: LlamaConfig) -> LlamaConfig:
  """The small draft: one layer, a quarter of the width, two query heads and one KV head."""
  return LlamaConfig(vocab_size=model.vocab_size, hidden_size=model.hidden_size // 4,
                     intermediate_size=model.intermediate_size // 4, num_layers=1,
                     num_heads=2, num_kv_heads=1, rope_theta=model.rope_theta)


def make_prompts(workload: str, args, vocab: int, rng) -> list[list[int]]:
  n = args.passage * args.copies + args.tail
  if workload == "random":
    return [rng.integers(0, vocab, n).tolist() for _ in range(args.prompts)]
  return [rng.integers(0, vocab, args.passage).tolist() * args.copies
          + rng.integers(0, vocab, args.tail).tolist() for _ in range(args.prompts)]


def fresh(prep, spec):
  """``prep`` with copies of its caches (the loops donate them) and ``spec``."""
  cache = jax.tree.map(jnp.copy, prep.cache)
  dcache = None if prep.draft_cache is None else jax.tree.map(jnp.copy, prep.draft_cache)
  jax.block_until_ready((cache, dcache))
  return dataclasses.replace(prep, cache=cache, draft_cache=dcache, spec=spec)


def decode(prep, spec) -> dict:
  """One generation from the prefilled caches, timed until its tokens are on the host;
  ``spec`` None: greedy ``decode_loop``."""
  p, n = fresh(prep, spec), prep.num_prompts
  with compile_timer() as compiling:
    t0 = time.perf_counter()
    if spec is None:
      _, st, out, steps, status = decode_loop(
          p.params, p.cache, p.state.decode, p.max_tokens, max_steps=p.max_tokens,
          model=p.model, implementation=p.implementation, all_greedy=True)
      out, steps, status, gen = jax.device_get((out, steps, status, st.num_generated))
      wall = time.perf_counter() - t0
      assert not np.any(status), status
      tokens = [out[i, :gen[i] - 1].tolist() for i in range(n)]
      calls, drafted, accepted = int(steps), 0, 0
    else:
      _, _, _, res = p.loop()
      res = jax.device_get(res)
      wall = time.perf_counter() - t0
      assert not np.any(res.status) and not np.any(res.draft_status), (res.status,
                                                                      res.draft_status)
      tokens = [res.tokens[i, :res.num_tokens[i]].tolist() for i in range(n)]
      calls = int(res.iterations)
      drafted, accepted = int(res.drafted[:n].sum()), int(res.accepted[:n].sum())
  return {"wall_s": wall, "compile_s": compiling[0], "calls": calls, "drafted": drafted,
          "accepted": accepted, "tokens": tokens}


def plot(rows, ks) -> str:
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  styles = {LOOKUP: "s-", SMALL_DRAFT: "v--", NOISY: "o-.", SELF: "^:"}
  for ax, w in zip(axes[:2], WORKLOADS, strict=True):
    for way, style in styles.items():
      rs = [r for r in rows if r["workload"] == w and r["drafting"] == way]
      if rs:
        ax.plot([r["k"] for r in rs], [float(r["vs greedy"][:-1]) for r in rs], style,
                label=way)
        axes[2].plot([r["k"] for r in rs], [float(r["acceptance"]) for r in rs],
                     style, color=ax.lines[-1].get_color(),
                     alpha=1.0 if w == WORKLOADS[0] else 0.45,
                     label=f"{way}, {w}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_title(f"{w} prompts: tokens/s vs greedy")
  axes[2].set_title("acceptance (accepted / drafted)")
  for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("draft tokens per iteration (k)")
    ax.legend(fontsize=7)
  fig.suptitle("Speculative decoding vs greedy decode_loop (random weights, CPU)")
  fig.tight_layout()
  return report.save_figure(fig, "speculative")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="model tiny, k 2 4 (drafts 4), shorter prompts and outputs, 1 repeat")
  p.add_argument("--model", choices=sorted(MODELS), default=None, help="default small")
  p.add_argument("--ks", type=int, nargs="+", default=None,
                 help="prompt lookup draft tokens (default 2 4 8; 2 4 with --quick)")
  p.add_argument("--draft-ks", type=int, nargs="+", default=None,
                 help="draft model draft tokens (default 2 4 8; 4 with --quick)")
  p.add_argument("--prompts", type=int, default=None, help="default 4 (2 with --quick)")
  p.add_argument("--passage", type=int, default=None, help="default 64 (32 with --quick)")
  p.add_argument("--copies", type=int, default=4)
  p.add_argument("--tail", type=int, default=None, help="default 16 (8 with --quick)")
  p.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 with --quick)")
  p.add_argument("--repeats", type=int, default=None, help="default 3 (1 with --quick)")
  p.add_argument("--block-size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  q = args.quick
  args.model = args.model or ("tiny" if q else "small")
  args.ks = args.ks or ([2, 4] if q else [2, 4, 8])
  args.draft_ks = args.draft_ks or ([4] if q else [2, 4, 8])
  args.prompts = args.prompts or (2 if q else 4)
  args.passage = args.passage or (32 if q else 64)
  args.tail = args.tail or (8 if q else 16)
  args.new_tokens = args.new_tokens or (32 if q else 128)
  args.repeats = args.repeats or (1 if q else 3)
  model = model_config(args.model)
  params = init_params(model, jax.random.PRNGKey(0))
  small = draft_config(model)
  drafts = {
      SMALL_DRAFT: (small, init_params(small, jax.random.PRNGKey(3))),
      # The test suite's NOISY draft: the target's weights plus noise of 0.6 std per weight.
      NOISY: (model, jax.tree.map(lambda w, n: w + 0.6 * jnp.std(w) * n, params,
                                  init_params(model, jax.random.PRNGKey(7)))),
      SELF: (model, params),
  }
  ways = ([(GREEDY, 1)] + [(LOOKUP, k) for k in args.ks]
          + [(d, k) for d in DRAFTS for k in args.draft_ks])
  machine = report.machine_name()
  print(f"machine: {machine}", flush=True)
  sampling = SamplingParams(max_new_tokens=args.new_tokens)  # greedy, no stop token
  rng = np.random.default_rng(args.seed)
  rows, data = [], {"args": vars(args), "draft_model": dataclasses.asdict(small), "runs": {}}
  bar = tqdm(total=len(WORKLOADS) * len(ways) * (1 + args.repeats), desc="speculative",
             unit="run")
  for w in WORKLOADS:
    prompts = make_prompts(w, args, model.vocab_size, rng)
    bar.set_postfix_str(f"{w}: prefill")
    # The same target prefill for every way; each draft model's cache prefilled as well.
    preps = {GREEDY: prepare_speculative(params, model, prompts, sampling,
                                         block_size=args.block_size)}
    preps[LOOKUP] = preps[GREEDY]
    for d in DRAFTS:
      dm, dp = drafts[d]
      preps[d] = prepare_speculative(
          params, model, prompts, sampling, draft_params=dp, block_size=args.block_size,
          speculative=SpeculativeConfig(num_draft_tokens=args.draft_ks[0], draft_model=dm))
    specs = {(GREEDY, 1): None}
    specs |= {(LOOKUP, k): SpeculativeConfig(num_draft_tokens=k) for k in args.ks}
    specs |= {(d, k): SpeculativeConfig(num_draft_tokens=k, draft_model=drafts[d][0])
              for d in DRAFTS for k in args.draft_ks}
    runs = {way: [] for way in ways}
    for rep in range(1 + args.repeats):  # the first call of each way compiles
      for way in ways:
        bar.set_postfix_str(f"{w}, {way[0]}" + (f" k={way[1]}" if way[0] != GREEDY else ""))
        r = decode(preps[way[0]], specs[way])
        same = r["tokens"] == runs[ways[0]][0]["tokens"] if runs[ways[0]] else True
        assert same, f"{w}, {way}: tokens differ from greedy decoding's"
        runs[way].append(r)
        bar.update()
        if rep == 0:
          acc = f", acceptance {r['accepted'] / r['drafted']:.2f}" if r["drafted"] else ""
          tqdm.write(f"{w:10s} {way[0]:18s} k={way[1]}: first call {r['wall_s']:.2f} s "
                     f"(compile {r['compile_s']:.2f} s), {r['calls']} target calls{acc}")
    base = report.median([r["wall_s"] for r in runs[ways[0]][1:]])
    for way in ways:
      cold, warm = runs[way][0], runs[way][1:]
      wall = report.median([r["wall_s"] for r in warm])
      per_row = len(cold["tokens"][0])
      total = sum(len(t) for t in cold["tokens"])
      rows.append({
          "workload": w, "drafting": way[0], "k": "-" if way[0] == GREEDY else way[1],
          "acceptance": f"{cold['accepted'] / cold['drafted']:.2f}" if cold["drafted"] else "-",
          "accepted / drafted": f"{cold['accepted']} / {cold['drafted']}",
          "calls / token": f"{cold['calls'] / per_row:.2f}", "same tokens": "yes",
          "loop s": f"{wall:.3f}", "tokens/s": f"{total / wall:.0f}",
          "vs greedy": f"{base / wall:.2f}x", "first call s": f"{cold['wall_s']:.2f}",
          "compile s": f"{cold['compile_s']:.2f}"})
      data["runs"][f"{w}_{way[0]}_k{way[1]}"] = [
          {k: v for k, v in r.items() if k != "tokens"} for r in runs[way]]
  bar.close()
  columns = list(rows[0])
  print(f"\nmachine: {machine}\n")
  print(report.text_table(columns, rows))

  def at(w, way, k):
    return next(r for r in rows if r["workload"] == w and r["drafting"] == way
                and r["k"] == k)

  best = {w: max((at(w, LOOKUP, k) for k in args.ks), key=lambda r: float(r["vs greedy"][:-1]))
          for w in WORKLOADS}
  kd = args.draft_ks[len(args.draft_ks) // 2]
  rep, rnd = best["repetitive"], best["random"]
  notes = (
      f"Model `{args.model}` (random weights), {args.prompts} prompts of "
      f"{args.passage * args.copies + args.tail} tokens (repetitive: a random "
      f"{args.passage}-token passage {args.copies} times, then {args.tail} random tokens; "
      f"random: all random), {args.new_tokens} greedy tokens each (no stop token), block "
      f"{args.block_size}. Every way starts from the same prefilled cache and runs in one jit: "
      "greedy is `decode_loop`, the others `speculative_loop` (prompt lookup: n-grams of 3 down "
      f"to 1; 1-layer draft: hidden {small.hidden_size}, 1 layer, random; noisy copy: the "
      "target's weights plus 0.6 std noise; self draft: the target drafting for itself, the "
      "bound of acceptance whose draft steps each cost a target step, not a setup to use). "
      "Every way's tokens equal greedy decoding's in every run (checked). Calls / token: "
      "target model calls (loop iterations, one for the whole batch: the loop runs until its "
      "slowest row is done) per generated token of a row. Steady state: "
      f"median of {args.repeats} loops after a compiling one, the ways alternating, on "
      f"{machine}; a draft model's prefill is not timed. First call: the loop's cold start, "
      "compilation included, paid by the workload run first (the random prompts have the same "
      "shapes and reuse its programs, as the self draft reuses the noisy copy's: compile 0). "
      "Prompt lookup on repetitive prompts, "
      f"best at k = {rep['k']}: acceptance {rep['acceptance']}, {rep['calls / token']} "
      f"target calls per token, **{rep['vs greedy']}** greedy's tokens/s; on random prompts "
      f"(best k = {rnd['k']}) acceptance {rnd['acceptance']}, {rnd['vs greedy']}. At k = {kd} "
      f"(repetitive): the 1-layer draft accepts {at('repetitive', SMALL_DRAFT, kd)['acceptance']}"
      f" ({at('repetitive', SMALL_DRAFT, kd)['vs greedy']}), the noisy copy "
      f"{at('repetitive', NOISY, kd)['acceptance']} "
      f"({at('repetitive', NOISY, kd)['vs greedy']}), the self draft "
      f"{at('repetitive', SELF, kd)['acceptance']} ({at('repetitive', SELF, kd)['vs greedy']}"
      ", its k draft steps costing as much as the target steps they save).")
  report.save(report.result_name("speculative"), script="speculative",
              title="Speculative decoding: prompt lookup and draft models vs greedy decoding",
              markdown=report.markdown_table(columns, rows), notes=notes,
              plot=plot(rows, sorted(set(args.ks) | set(args.draft_ks))), data=data)
  return 0


if __name__ == "__main__":
  main()
