"""The GPU session script and benchmark driver, checked on CPU (no GPU needed)."""

import re
import subprocess
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import gpu_decode

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def test_session_script_parses_and_fits_eight_minutes():
  subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
  text = SCRIPT.read_text()
  gpu_branch = text.split('if [ "$SMOKE" = 1 ]; then')[1].split("\nelse\n", 1)[1]
  # The optional full decode-step grid replaces the default one: count the default.
  gpu_branch = re.sub(r'if \[ "\$\{GPU_SESSION_DECODE_STEP:-0\}" = 1 \]; then.*?else', "",
                      gpu_branch, flags=re.S)
  # Optional parts (GPU_SESSION_ALL=1) are not in the default run either.
  gpu_branch = re.sub(r'if \[ "\$\{GPU_SESSION_(ALL|SPECULATIVE):-0\}" = 1 \]; then.*?fi', "",
                      gpu_branch, flags=re.S)
  limits = [int(n) for n in re.findall(r"part \w+ (\d+)", gpu_branch)]
  assert len(limits) == 5 and sum(limits) <= 8 * 60, limits
  # The device tool brings back at most 8 files: a log per part, plus results.tgz.
  assert len(limits) + 1 <= 8


def test_session_script_names_files_that_exist():
  text = SCRIPT.read_text()
  names = set(re.findall(r"(tests/\w+\.py|benchmarks/\w+\.py)", text))
  names |= {f"benchmarks/{m}.py" for m in re.findall(r"-m benchmarks\.(\w+)", text)}
  assert "tests/test_attention_pallas_mgpu.py" in names
  for name in names:
    assert (ROOT / name).is_file(), name


def test_gpu_decode_help_and_rows(capsys):
  with pytest.raises(SystemExit) as e:
    gpu_decode.main(["--help"])
  assert e.value.code == 0
  assert "--sweep" in capsys.readouterr().out
  assert gpu_decode.IMPLS[:2] == ("ours", "ours_mgpu")


def test_gpu_decode_refuses_an_unknown_quantised_sweep(capsys):
  with pytest.raises(SystemExit) as e:
    gpu_decode.main(["--interpret", "--tiny", "--sweep-quant", "int8,int3"])
  assert e.value.code == 2
  assert "--sweep-quant takes names from ['fp8', 'int8']" in capsys.readouterr().err


@pytest.mark.parametrize("dtype, match", [("float32", "bfloat16 and float16 pools"),
                                          ("bfloat16", "sm90")])
def test_mosaic_gpu_row_skips_with_a_reason_off_hopper(dtype, match):
  cfg = gpu_decode.Config("t", (20, 7), 16, q_heads=4, kv_heads=2, head_dim=64)
  x = gpu_decode.make_inputs(cfg, jnp.dtype(dtype))
  with pytest.raises(gpu_decode.Skip, match=match):
    gpu_decode.impl_mgpu(x, interpret=False)  # a CPU device has no compute capability


def test_mgpu_sweep_grid_varies_the_step_or_the_splits():
  base = dict(block_k=128, num_stages=2, k_splits=4, warp_specialized=False)
  ws = dict(block_k=64, num_stages=4, k_splits=4, warp_specialized=True)
  grid = gpu_decode.mgpu_sweep_grid(base, ws)
  assert base not in grid and len(grid) == len({tuple(sorted(g.items())) for g in grid})
  plain = [g for g in grid if not g["warp_specialized"]]
  for g in plain:  # either smaller steps (and their stage count) or other splits, not both
    assert (g["k_splits"] == base["k_splits"]) != (g["block_k"] == base["block_k"])
  assert np.all([g["num_stages"] >= 2 for g in grid])
  assert {g["k_splits"] for g in plain} == {2, 4, 8, 16}
  # The warp-specialised defaults, with other splits, and with two stages (always even).
  special = [g for g in grid if g["warp_specialized"]]
  assert ws in special and {g["k_splits"] for g in special} == {2, 4, 8}
  assert {g["num_stages"] for g in special} == {2, 4}
  assert gpu_decode.mgpu_sweep_grid(base) == plain


@pytest.mark.slow
def test_mosaic_gpu_row_in_interpret_mode_matches_the_reference():
  """The benchmark's ours_mgpu callable (interpret mode) agrees with the XLA reference."""
  import functools

  import jax

  from jax_paged_kv.attention.reference import paged_attention_xla

  cfg = gpu_decode.Config("t", (40, 7), 16, q_heads=4, kv_heads=2, head_dim=64)
  x = gpu_decode.make_inputs(cfg, jnp.dtype("bfloat16"))
  fn, sync, _ = gpu_decode.impl_mgpu(x, interpret=True)
  out = fn()
  sync(out)
  want = jax.jit(functools.partial(paged_attention_xla, scale=x.scale))(
      x.q.astype(jnp.float32), x.k_pool.astype(jnp.float32), x.v_pool.astype(jnp.float32),
      x.layer, x.tables, x.kv_lens, x.q_lens)
  assert gpu_decode.max_err(out, want) <= 3e-2
