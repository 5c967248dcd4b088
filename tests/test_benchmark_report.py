"""A quick (smoke) benchmark run never overwrites the committed full results or plots."""

import pathlib

from benchmarks import report


def test_quick_runs_write_to_out_not_results(tmp_path, monkeypatch):
  for name in ("RESULTS_DIR", "PLOTS_DIR", "OUT_DIR"):
    monkeypatch.setattr(report, name, tmp_path / name.lower())
  monkeypatch.setattr(report, "RESULTS_MD", tmp_path / "RESULTS.md")
  try:
    report.set_quick(True)
    path = report.save("demo_bench", title="t", markdown="| a |\n|---|\n| 1 |", data={"x": 1})
    assert pathlib.Path(path).parent == tmp_path / "out_dir"
    assert not (tmp_path / "results_dir").exists() and not (tmp_path / "RESULTS.md").exists()
    report.set_quick(False)
    path = report.save("demo_bench", title="t", markdown="| a |\n|---|\n| 2 |", data={"x": 2})
    assert pathlib.Path(path).parent == tmp_path / "results_dir"
    assert "| 2 |" in (tmp_path / "RESULTS.md").read_text()
  finally:
    report.set_quick(False)
