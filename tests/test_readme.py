"""The README's code runs as written: the quickstart (and its invariants hold), and the model of
one's own run through generate and the Engine."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def run_block(marker: str) -> dict:
  (code,) = [b for b in BLOCKS if marker in b]
  namespace: dict = {}
  exec(compile(code, f"README.md:{marker}", "exec"), namespace)  # noqa: S102
  return namespace


def test_quickstart_runs(capsys):
  namespace = run_block("pk.CacheConfig(")
  cache = namespace["cache"]
  pk = namespace["pk"]
  # Hand count: slot 0 holds 40 - 5 = 35 tokens in ceil(35 / 16) = 3 blocks, nothing else lives.
  stats = pk.cache_stats(cache).as_dict()
  assert stats["active_sequences"] == 1 and stats["tokens_stored"] == 35
  assert stats["used_blocks"] == 3 and stats["free_blocks"] == 255 - 3
  assert "utilization" in capsys.readouterr().out


def test_own_model_runs_through_generate_and_engine():
  namespace = run_block("class MyModel")
  outs = namespace["outs"]
  assert [len(o) for o in outs] == [8, 8]
  assert all(0 <= t < 256 for o in outs for t in o)
  assert namespace["engine"].metrics.generated_tokens == 8
