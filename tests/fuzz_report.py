"""Counts of fuzz cases run, summed over pytest-xdist workers and printed at the end of a run.

Each worker appends its counts to a file in a folder the controller names through an
environment variable (set in ``conftest.py`` before the workers start); the controller's
terminal summary adds them up.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib

ENV = "JAX_PAGED_KV_FUZZ_DIR"
_COUNTS: collections.Counter = collections.Counter()


def record(op: str, outcome: str) -> None:
  """Counts one case of ``op`` that ended in ``outcome`` (and held: a failure raises first)."""
  _COUNTS[f"{op}: {outcome}"] += 1


def flush(worker: str) -> None:
  folder = os.environ.get(ENV)
  if folder and _COUNTS:
    path = pathlib.Path(folder) / f"{worker}.json"
    path.write_text(json.dumps(dict(_COUNTS)))


def collect(folder: str) -> collections.Counter:
  total: collections.Counter = collections.Counter()
  for path in pathlib.Path(folder).glob("*.json"):
    total.update(json.loads(path.read_text()))
  return total
