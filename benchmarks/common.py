"""Shared helpers of the benchmark programs: timing (repeat, median), machine name, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def machine_name() -> str:
  """E.g. ``"cpu: AMD EPYC 7B13 (2 cores), jax 0.10.2"`` or ``"gpu: NVIDIA H100 ..."``."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    model = platform.processor() or platform.machine()
    try:
      with open("/proc/cpuinfo") as f:
        for line in f:
          if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    except OSError:
      pass
    kind = f"cpu: {model} ({os.cpu_count()} cores)"
  else:
    kind = f"{dev.platform}: {dev.device_kind}"
  return f"{kind}, jax {jax.__version__}"


def repeat(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> list[float]:
  """Wall times in seconds of ``repeats`` calls of ``fn`` (blocked until ready), after
  ``warmup`` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def write_json(name: str, payload: dict) -> str:
  """Writes ``benchmarks/out/<name>.json``; returns the path."""
  os.makedirs(OUT_DIR, exist_ok=True)
  path = os.path.join(OUT_DIR, f"{name}.json")
  with open(path, "w") as f:
    json.dump(payload, f, indent=2, default=str)
  return path


def table(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """A plain-text table of ``rows`` (dicts) with the given columns."""
  cells = [[str(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
  line = "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))
  out = [line, "-" * len(line)]
  out += ["  ".join(x.rjust(w) for x, w in zip(r, widths, strict=True)) for r in cells]
  return "\n".join(out)


def markdown(rows: Sequence[dict], columns: Sequence[str]) -> str:
  """Markdown table rows (header included) for benchmarks/RESULTS.md."""
  out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  out += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(out)
