"""Executes every notebook in ``notebooks/`` top to bottom, as CI does.

Each notebook runs on a fresh ``python3`` kernel from an in-memory copy, so the committed files
(saved *with* their outputs, so they read well on GitHub) are never modified by the tests. A
notebook's last cell asserts its results against an independent oracle, so a broken notebook
fails here.

Regenerate the committed outputs after changing a notebook or the library (cells tagged
``timing`` are saved without outputs: their numbers belong to the machine that ran them)::

    python -m tests.test_notebooks --write              # every notebook
    python -m tests.test_notebooks --write 02_decoding  # the ones whose name contains this
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import pytest

from tests.conftest import COMPILE_CACHE_ENV

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 600


def execute(path: pathlib.Path):
  """Runs the notebook at ``path`` on a fresh kernel; returns the executed notebook."""
  import nbclient
  import nbformat

  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
      # The kernel starts in notebooks/, where the setup cell finds the checkout it lives in.
      resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
  client.execute()
  return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_its_checks_pass(path, monkeypatch):
  pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  pytest.importorskip("matplotlib")
  # The kernel shares this run's compilation cache (conftest.py), if there is one.
  folder = os.environ.get(COMPILE_CACHE_ENV)
  if folder and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", folder)
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  nb = execute(path)  # raises CellExecutionError on any failing cell, the final asserts included
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors


def test_notebooks_are_indexed_and_have_a_colab_badge():
  import nbformat

  index = (NOTEBOOKS_DIR / "README.md").read_text()
  assert NOTEBOOKS, "no notebooks found"
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0].source
    assert "colab.research.google.com/github/" in first and path.name in first, path.name
    setup = nb.cells[1].source
    assert "REPO = " in setup and "git+{REPO}" in setup, path.name
    assert path.name in index, f"{path.name} is missing from notebooks/README.md"
    # Committed with outputs: every code cell was executed, in order.
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: outputs not saved in order"
    # Cells tagged "timing" are saved without outputs (``--write`` strips them).
    for c in nb.cells:
      if "timing" in c.get("metadata", {}).get("tags", []):
        assert not c.outputs, f"{path.name}: a timing cell was saved with its outputs"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--write", action="store_true",
                 help="save the executed notebooks (outputs, plots) in place")
  p.add_argument("names", nargs="*", help="only notebooks whose file name contains one of these")
  args = p.parse_args(argv)
  import nbformat

  paths = [n for n in NOTEBOOKS if not args.names or any(s in n.name for s in args.names)]
  total = 0.0
  for path in paths:
    t0 = time.perf_counter()
    nb = execute(path)
    dt = time.perf_counter() - t0
    total += dt
    if args.write:
      for cell in nb.cells:  # timings belong to the machine that ran them: not committed
        if "timing" in cell.get("metadata", {}).get("tags", []):
          cell.outputs = []
      nbformat.write(nb, path)
    print(f"{path.name}: {dt:.1f}s{' (saved)' if args.write else ''}", flush=True)
  print(f"total: {total:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
