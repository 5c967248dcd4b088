"""The one shared module of the benchmark programs: machine, timing, tables, saving, RESULTS.md.

Every benchmark ends with :func:`save`, which writes ``benchmarks/results/<name>.json`` (title,
machine, markdown table, notes, plot, raw data) and regenerates ``benchmarks/RESULTS.md`` from
all of them, so the file always holds the latest table of each benchmark, the GPU one included
(``gpu_decode`` saves here when it runs on a GPU; interpret-mode smoke runs go to
``benchmarks/out/`` instead and never replace GPU numbers).

``python -m benchmarks`` runs every CPU benchmark; ``python -m benchmarks.report`` only
regenerates RESULTS.md from the saved JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax

HERE = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"  # committed: the latest run of each benchmark
PLOTS_DIR = HERE / "plots"  # committed: figures referenced from RESULTS.md
OUT_DIR = HERE / "out"  # ignored by git: scratch output (smoke runs, demo plots)
RESULTS_MD = HERE / "RESULTS.md"

# Section order in RESULTS.md; any other results/*.json follow, sorted by name.
CPU_BENCHMARKS = ("append_scaling", "decode_step", "serving", "block_size", "reliability",
                  "prefix_cache", "prefix_cache_concurrency", "prefix_cache_preemption",
                  "streaming", "sharding")
GPU_BENCHMARKS = ("gpu_decode", "gpu_decode_h200", "gpu_kernel_ab", "decode_step_gpu",
                  "serving_gpu", "sharding_gpu", "speculative_gpu")


# A quick (smoke) run writes its JSON and plots to ``out/``, never over the committed full
# results: every benchmark calls :func:`set_quick` with its ``--quick`` flag after parsing.
_QUICK = False


def set_quick(quick: bool) -> None:
  """Routes this process's :func:`save` and :func:`save_figure` to ``out/`` if ``quick``."""
  global _QUICK
  _QUICK = bool(quick)


def result_name(script: str) -> str:
  """The results name of ``script``'s run here: ``script``, or ``script_gpu`` on a GPU.

  The CPU benchmarks also run on the GPU machine; their GPU runs are kept beside (not over)
  the CPU ones, in the GPU section of RESULTS.md.
  """
  return f"{script}_gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else script


# ---- machine ----------------------------------------------------------------------------------


def _cpu_model() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return model


def machine() -> dict:
  """Where the numbers come from: device, backend, JAX and Python versions, date."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    device = f"CPU ({_cpu_model()}, {os.cpu_count()} cores)"
  else:
    device = getattr(dev, "device_kind", str(dev))
  return {
      "device": device,
      "backend": dev.platform,
      "jax": jax.__version__,
      "python": platform.python_version(),
      "date": datetime.date.today().isoformat(),
  }


def machine_name() -> str:
  """One line, e.g. ``"CPU (AMD EPYC 7B13, 2 cores), jax 0.10.2"``."""
  m = machine()
  return f"{m['device']}, jax {m['jax']}"


# ---- timing -----------------------------------------------------------------------------------


def time_fn(fn: Callable[[], object], *, repeats: int = 7, number: int = 10,
            warmup: int = 2) -> float:
  """Median over ``repeats`` of the mean seconds per call of ``fn()`` over ``number`` calls.

  ``fn`` must block until its result is ready (call ``.block_until_ready()`` inside).
  """
  for _ in range(warmup):
    fn()
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(number):
      fn()
    samples.append((time.perf_counter() - t0) / number)
  return statistics.median(samples)


def repeat(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> list[float]:
  """Wall seconds of each of ``repeats`` calls of ``fn`` (its result blocked until ready),
  after ``warmup`` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def first_call(fn: Callable[[], object]) -> tuple[float, float]:
  """``(wall seconds, compile seconds)`` of a call of ``fn`` (its result blocked until ready):
  call it first, and the wall time is the cold start a user pays for that shape. The compile
  seconds are JAX's own tracing, lowering and compilation inside the call (its compile
  events), 0 when this process compiled the same programs before."""
  from jax_paged_kv.serving.engine.metrics import compile_timer

  with compile_timer() as compiling:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    wall = time.perf_counter() - t0
  return wall, compiling[0]


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


# ---- tables -----------------------------------------------------------------------------------


def _cells(rows: Sequence[dict | Sequence], columns: Sequence[str]) -> list[list[str]]:
  return [[str(r.get(c, "")) for c in columns] if isinstance(r, dict) else [str(x) for x in r]
          for r in rows]


def markdown_table(columns: Sequence[str], rows: Sequence[dict | Sequence]) -> str:
  """A markdown table; ``rows`` are dicts keyed by column or sequences in column order."""
  out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  out += ["| " + " | ".join(r) + " |" for r in _cells(rows, columns)]
  return "\n".join(out)


def text_table(columns: Sequence[str], rows: Sequence[dict | Sequence]) -> str:
  """The same table as plain, right-aligned text for the terminal."""
  cells = _cells(rows, columns)
  widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
  line = "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))
  out = [line, "-" * len(line)]
  out += ["  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True)) for r in cells]
  return "\n".join(out)


# ---- plots ------------------------------------------------------------------------------------


def pyplot():
  """``matplotlib.pyplot`` on the non-interactive Agg backend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig, name: str) -> str:
  """Saves ``fig`` as ``benchmarks/plots/<name>.png``; returns the path relative to
  ``benchmarks/`` (what RESULTS.md links)."""
  folder = OUT_DIR if _QUICK else PLOTS_DIR
  folder.mkdir(parents=True, exist_ok=True)
  fig.savefig(folder / f"{name}.png", dpi=100)
  pyplot().close(fig)
  return f"{folder.name}/{name}.png"


# ---- saving -----------------------------------------------------------------------------------


def save(name: str, *, title: str, markdown: str, data: dict, notes: str = "",
         plot: str | None = None, directory: pathlib.Path | None = None,
         script: str | None = None) -> pathlib.Path:
  """Writes ``<directory>/<name>.json`` (default ``results/``) and regenerates RESULTS.md.

  Args:
    name: the benchmark's name (its module in ``benchmarks/``).
    title: section title in RESULTS.md.
    markdown: the result table.
    data: raw numbers (JSON-serialisable; numpy scalars are converted).
    notes: a paragraph printed above the table (what was measured, the conclusion).
    plot: a figure path relative to ``benchmarks/`` (see :func:`save_figure`).
    directory: where to write; anything but ``results/`` leaves RESULTS.md alone (smoke runs).
    script: the program that produced it (default ``name``), as ``benchmarks/<script>.py``.
  """
  if directory is None:
    directory = OUT_DIR if _QUICK else RESULTS_DIR
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  record = {"name": name, "script": script or name, "title": title, "machine": machine(),
            "markdown": markdown, "notes": notes, "plot": plot, "data": data}
  path = directory / f"{name}.json"
  path.write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
  if directory.resolve() == RESULTS_DIR.resolve():
    write_results_md()
  return path


def _jsonable(x):
  if hasattr(x, "item"):  # numpy / jax scalars
    return x.item()
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


def load_results() -> dict[str, dict]:
  """Every ``results/*.json`` by name."""
  return {p.stem: json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob("*.json"))}


def _section(r: dict) -> list[str]:
  m = r["machine"]
  parts = [f"### {r['title']}", "",
           f"`benchmarks/{r.get('script', r['name'])}.py` on **{m['device']}**, JAX {m['jax']}, "
           f"Python {m['python']}, {m['date']}.", ""]
  if r.get("notes"):
    parts += [r["notes"], ""]
  parts += [r["markdown"], ""]
  if r.get("plot"):
    parts += [f"![{r['title']}]({r['plot']})", ""]
  return parts


def write_results_md() -> pathlib.Path:
  """Regenerates ``benchmarks/RESULTS.md`` from every ``results/*.json``."""
  results = load_results()
  cpu = [results[n] for n in CPU_BENCHMARKS if n in results]
  gpu = [results[n] for n in GPU_BENCHMARKS if n in results]
  other = [r for n, r in results.items() if n not in CPU_BENCHMARKS + GPU_BENCHMARKS]
  parts = ["# Benchmark results", "",
           "Generated from `benchmarks/results/*.json` by `python -m benchmarks` (every CPU "
           "benchmark; `--quick`, `--only NAME`) or `python -m benchmarks.report` (this file "
           "only). Each section is the latest run of one benchmark, with the machine it ran on; "
           "ratios compare against a baseline measured in the same run, times are medians of "
           "repeats. Do not edit by hand.", ""]
  runs = sorted({(r["machine"]["device"], r["machine"]["jax"], r["machine"]["date"])
                 for r in cpu + other})
  if runs:
    parts += ["## CPU benchmarks", ""]
    parts += [f"Machine: **{d}**, JAX {j}, {day}." for d, j, day in runs] + [""]
    for r in cpu + other:
      parts += _section(r)
  parts += ["## GPU benchmarks", "",
            "Run on the GPU machine from the checkout: `PYTHONPATH=. python "
            "benchmarks/gpu_decode.py` saves `results/gpu_decode.json` and regenerates "
            "this file (`--interpret --tiny` is a CPU smoke test that writes "
            "`benchmarks/out/` only); `decode_step` and `serving` run there save as "
            "`decode_step_gpu` and `serving_gpu`. `benchmarks/gpu_session.sh` runs them all "
            "with the compiled-kernel tests in one go.", ""]
  if gpu:
    for r in gpu:
      parts += _section(r)
  else:
    parts += ["_No GPU result saved yet._", ""]
  RESULTS_MD.write_text("\n".join(parts).rstrip("\n") + "\n")
  return RESULTS_MD


if __name__ == "__main__":
  print(f"wrote {write_results_md()}")
