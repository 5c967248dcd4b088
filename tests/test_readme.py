"""The README's quickstart runs as written (and its invariants hold)."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs(capsys):
  code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
  namespace: dict = {}
  exec(compile(code, "README.md:quickstart", "exec"), namespace)  # noqa: S102
  cache = namespace["cache"]
  pk = namespace["pk"]
  # Hand count: slot 0 holds 40 - 5 = 35 tokens in ceil(35 / 16) = 3 blocks, nothing else lives.
  stats = pk.cache_stats(cache).as_dict()
  assert stats["active_sequences"] == 1 and stats["tokens_stored"] == 35
  assert stats["used_blocks"] == 3 and stats["free_blocks"] == 255 - 3
  assert "utilization" in capsys.readouterr().out
