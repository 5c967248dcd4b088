"""Reliability: bad-input fuzz cases held, tests failed, and soak steps / leaks / mismatches.

    PYTHONPATH=. python -m benchmarks.reliability            # fuzz x4 examples, 2000-step soaks
    PYTHONPATH=. python -m benchmarks.reliability --quick    # CI-sized, written to benchmarks/out

Two parts, each an existing check run bigger:

* **Bad input.** The boundary fuzz (``tests/test_boundary_fuzz.py``: every public op, arguments
  across the whole domain a Python caller can produce, eager and under ``jit``, against a
  plain-Python specification) and the isolation regression tests (``tests/test_isolation.py``)
  run in a pytest subprocess with ``JAX_PAGED_KV_FUZZ_EXAMPLES`` examples per fuzz test. A case
  *held* when the call did exactly what the specification says; *broken* counts the failing
  tests (each stops at its first broken case, after shrinking it).
* **Soak.** ``benchmarks/soak.py``'s engine soak (random arrivals, sampled and greedy requests,
  some with min-p, penalties, logprobs, top alternatives, prompt logprobs or parallel samples,
  preemption on a 16-block pool, invariants every step, outputs and scores against an
  unconstrained run where parallel samples are requests of their own), once with recompute
  and once with swap preemption, and cache soak (random ops under ``jit``, forks with several
  children, beam-search reorders, truncations, against a plain-Python model), then everything
  freed: blocks leaked and mismatches must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from benchmarks import report, soak

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_fuzz(examples: int) -> dict:
  """Runs the fuzz and isolation tests in a subprocess; returns the case counts."""
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, JAX_PAGED_KV_FUZZ_EXAMPLES=str(examples),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    junit = pathlib.Path(tmp) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "tests/test_boundary_fuzz.py", "tests/test_isolation.py"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
  out = proc.stdout
  held = re.search(r"boundary fuzz: (\d+) cases held", out)
  summary = re.search(r"(\d+) failed", out), re.search(r"(\d+) passed", out)
  counts = {}
  for line in out.splitlines():
    m = re.match(r"\s+(\d+)\s+(\S.*)$", line)
    if m and ":" in m[2]:
      counts[m[2]] = int(m[1])
  return {
      "fuzz cases held": int(held[1]) if held else 0,
      "regression/property tests passed": int(summary[1][1]) if summary[1] else 0,
      "tests broken": int(summary[0][1]) if summary[0] else 0,
      "seconds": round(seconds, 1),
      "cases": counts,
      "returncode": proc.returncode,
      "tail": "\n".join(out.splitlines()[-5:]),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="CI-sized run, saved to benchmarks/out")
  p.add_argument("--examples", type=int, default=None,
                 help="hypothesis examples per fuzz test (default 240; 60 with --quick)")
  p.add_argument("--steps", type=int, default=None,
                 help="soak steps (default 2000; 300 with --quick)")
  p.add_argument("--seed", type=int, default=1)
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  examples = args.examples or (60 if args.quick else 240)
  steps = args.steps or (300 if args.quick else 2000)
  print(f"machine: {report.machine_name()}", flush=True)
  print(f"[1/4] boundary fuzz + isolation tests, {examples} examples per fuzz test ...",
        flush=True)
  fuzz = run_fuzz(examples)
  print(f"      {fuzz['fuzz cases held']} cases held, {fuzz['tests broken']} tests broken "
        f"({fuzz['seconds']:.0f} s)", flush=True)
  say = lambda msg: print("      " + msg, flush=True)  # noqa: E731
  print(f"[2/4] engine soak, recompute preemption, {steps} steps ...", flush=True)
  eng = soak.engine_soak(steps, seed=args.seed, progress=say, progress_every=max(1, steps // 5))
  print(f"[3/4] engine soak, swap preemption, {steps} steps ...", flush=True)
  swap = soak.engine_soak(steps, seed=args.seed + 1, preemption="swap", progress=say,
                          progress_every=max(1, steps // 5))
  print(f"[4/4] cache soak, {steps} ops ...", flush=True)
  cache = soak.cache_soak(steps, seed=args.seed, progress=say, progress_every=max(1, steps // 5))
  e, s, c = eng.figures, swap.figures, cache.figures
  rows = [
      ("bad-input fuzz cases held (eager + jit; a case that breaks fails its test)",
       fuzz["fuzz cases held"]),
      ("fuzz + isolation pytest tests passed", fuzz["regression/property tests passed"]),
      ("fuzz + isolation pytest tests failed", fuzz["tests broken"]),
      ("engine soak steps, recompute (requests, preemptions)",
       f"{e['engine steps']} ({e['requests']}, {e['preemptions']})"),
      ("engine soak steps, swap (requests, preemptions)",
       f"{s['engine steps']} ({s['requests']}, {s['preemptions']})"),
      ("engine soak requests sampled; with min-p, penalties or logprobs; with n > 1 samples",
       f"{e['sampled requests'] + s['sampled requests']}; "
       f"{e['requests with min-p, penalties or logprobs'] + s['requests with min-p, penalties or logprobs']}; "  # noqa: E501
       f"{e['requests with n > 1 samples'] + s['requests with n > 1 samples']}"),
      ("cache soak ops (forks, reorders, truncations)",
       f"{c['ops']} ({c['forks']}, {c['reorders']}, {c['truncations']})"),
      ("blocks leaked (engine + cache)",
       e["blocks leaked"] + s["blocks leaked"] + c["blocks leaked"]),
      ("invariant failures", e["invariant failures"] + s["invariant failures"]
       + c.get("invariant failures", 0)),
      ("engine free-count drifts (its count vs the device's, every step)",
       e["free count drifts"] + s["free count drifts"]),
      ("mismatches (outputs vs unconstrained run; contents vs model)",
       e["mismatches"] + s["mismatches"] + c["mismatches"]),
  ]
  markdown = report.markdown_table(["check", "count"], rows)
  print("\n" + report.text_table(["check", "count"], rows))
  problems = eng.problems + swap.problems + cache.problems
  for msg in problems:
    print("problem:", msg)
  notes = (
      f"Fuzz: {examples} hypothesis examples per fuzz test over every public op "
      f"(`tests/test_boundary_fuzz.py`), each call eager and, where `jit` takes the argument "
      f"type, under `jit`, against the plain-Python specification in "
      f"`tests/boundary_model.py`; plus `tests/test_isolation.py`. Soaks: "
      f"`benchmarks/soak.py`, seeds {args.seed} (recompute, cache) and {args.seed + 1} "
      "(swap). Every check must read 0 broken / leaked / "
      "mismatched; a nonzero count fails the run (exit status 1).")
  data = {"fuzz": fuzz, "engine_soak": e, "engine_soak_swap": s, "cache_soak": c,
          "problems": problems,
          "examples": examples, "steps": steps, "seed": args.seed}
  report.save("reliability", title="Reliability: bad input, isolation and soak",
              markdown=markdown, data=json.loads(json.dumps(data, default=str)), notes=notes,
              directory=report.OUT_DIR if args.quick else None)
  bad = fuzz["tests broken"] or fuzz["returncode"] or problems
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
