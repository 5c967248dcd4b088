"""The README's code runs as written: the quickstart (and its invariants hold), and the model of
one's own run through generate and the Engine."""

import pathlib
import re

import numpy as np

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
  # Every V is 1, so any query's attention output is exactly 1; lookup_kv returns rows 0 (40
  # tokens) and 1 (7 tokens) of ones, zero-padded to max_seq_len.
  np.testing.assert_array_equal(np.asarray(namespace["out"]), np.ones((2, 1, 8, 64)))
  keys, values, lens = (np.asarray(x) for x in (namespace["keys"], namespace["values"],
                                                namespace["lens"]))
  np.testing.assert_array_equal(lens, [40, 7])
  want = np.zeros((2, 1024, 2, 64), np.float32)
  want[0, :40] = want[1, :7] = 1.0
  np.testing.assert_array_equal(keys, want)
  np.testing.assert_array_equal(values, want)
  # Hand count: slot 0 holds 40 - 5 = 35 tokens in ceil(35 / 16) = 3 blocks, nothing else lives.
  stats = pk.cache_stats(cache).as_dict()
  assert stats["active_sequences"] == 1 and stats["tokens_stored"] == 35
  assert stats["used_blocks"] == 3 and stats["free_blocks"] == 255 - 3
  assert "utilization" in capsys.readouterr().out


def _my_model_greedy(params, prompt, steps):
  """float64 NumPy greedy decoding of the README's ``MyModel``: full causal recomputation of
  the whole sequence at every step (two heads of 32, no positions, residual attention only)."""
  embed = np.asarray(params["embed"], np.float64)
  wqkv = np.asarray(params["layers"]["wqkv"], np.float64)
  wo = np.asarray(params["layers"]["wo"], np.float64)
  seq = list(prompt)
  for _ in range(steps):
    x = embed[seq]  # [T, 64]
    t = len(seq)
    for layer in range(2):
      q, k, v = (a.reshape(t, 2, 32) for a in np.split(x @ wqkv[layer], 3, axis=-1))
      s = np.einsum("qhd,khd->hqk", q, k) * 32 ** -0.5
      s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      o = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v)
      x = x + o.reshape(t, 64) @ wo[layer]
    seq.append(int(np.argmax(x[-1] @ embed.T)))
  return seq[len(prompt):]


def test_own_model_runs_through_generate_and_engine():
  namespace = run_block("class MyModel")
  params = namespace["params"]
  outs = namespace["outs"]
  assert [list(o) for o in outs] == [_my_model_greedy(params, p, 8) for p in ([1, 2, 3], [4, 5])]
  (engine_out,) = namespace["engine"].finished.values()
  assert engine_out.tokens == _my_model_greedy(params, [7, 8, 9], 8)
  assert namespace["engine"].metrics.generated_tokens == 8


def test_serving_snippet_streams_the_reference_tokens_and_logprobs(capsys):
  """The README's streaming snippet: the kept request streams the float64 model's greedy tokens,
  log-probabilities and top 3 alternatives; the aborted one stops early with its blocks back."""
  from tests.llama_reference import (
    check_top_logprobs,
    reference_greedy,
    reference_log_softmax,
    reference_logprobs,
  )
  ns = run_block("engine.stream()")
  params, model, engine = ns["params"], ns["model"], ns["engine"]
  prompt = [1, 2, 3, 4]
  assert ns["text"] == reference_greedy(params, model, prompt, 12)
  np.testing.assert_allclose(ns["logprobs"], reference_logprobs(params, model, prompt, ns["text"]),
                             atol=2e-4)
  check_top_logprobs(ns["alternatives"], ns["text"],
                     reference_log_softmax(params, model, prompt, ns["text"]), 3)
  gone = engine.finished[ns["gone"]]
  assert gone.finish_reason == "abort" and 0 < len(gone.tokens) < 12
  assert gone.tokens == reference_greedy(params, model, [5, 6, 7], len(gone.tokens))
  assert int(ns["pk"].cache_stats(engine.cache).free_blocks) == engine.cache_config.usable_blocks
  assert str(ns["text"][:3])[:-1] in capsys.readouterr().out


def test_parallel_sampling_snippet_gives_the_requests_with_consecutive_seeds(capsys):
  """The README's parallel-sampling snippet (run after the streaming one, whose engine it
  uses): sample i has the tokens of a request of its own with seed 7 + i, and the three
  shared the prompt's two full blocks."""
  ns = run_block("engine.stream()")
  (code,) = [b for b in BLOCKS if "SamplingParams(n=3" in b]
  exec(compile(code, "README.md:parallel sampling", "exec"), ns)  # noqa: S102
  pk, engine = ns["pk"], ns["engine"]
  alone = pk.Engine(ns["params"], ns["model"], engine.cache_config)
  for i in range(3):
    alone.add_request(ns["prompt"], pk.SamplingParams(temperature=1.0, seed=7 + i,
                                                      max_new_tokens=8))
  want = {i: o.tokens for i, o in enumerate(alone.run())}
  assert ns["samples"] == want and len({tuple(t) for t in want.values()}) > 1
  assert engine.metrics.shared_prompt_tokens == 2 * 32
  assert int(pk.cache_stats(engine.cache).free_blocks) == engine.cache_config.usable_blocks
  assert str(want[0])[:-1] in capsys.readouterr().out


def test_beam_search_snippet_gives_the_float64_search(capsys):
  """The README's beam-search snippet (with the streaming snippet's model): each prompt's
  hypotheses are the plain-Python float64 search's, and what it prints is theirs."""
  from tests.beam_reference import reference_beam_search

  ns = run_block("engine.stream()")
  (code,) = [b for b in BLOCKS if "pk.beam_search(" in b]
  exec(compile(code, "README.md:beam search", "exec"), ns)  # noqa: S102
  beam = ns["pk"].BeamSearchParams(beam_width=3, max_new_tokens=8, stop_tokens=(9,))
  for prompt, hyps in zip([[1, 2, 3, 4], [5, 6, 7]], ns["beams"], strict=True):
    ref, margin = reference_beam_search(ns["params"], ns["model"], prompt, beam)
    assert margin > 1e-4
    assert [h.tokens for h in hyps] == [r[1] for r in ref]
    np.testing.assert_allclose([h.score for h in hyps], [r[0] for r in ref], atol=2e-4)
  assert str(ns["beams"][0][0].tokens) in capsys.readouterr().out


def test_speculative_snippet_gives_greedy_decoding(capsys):
  """The README's speculative-decoding snippet (with the streaming snippet's model): the tokens
  are the float64 greedy continuation, and prompt lookup drafted something."""
  from tests.llama_reference import reference_greedy

  ns = run_block("engine.stream()")
  (code,) = [b for b in BLOCKS if "pk.speculative_generate(" in b]
  exec(compile(code, "README.md:speculative decoding", "exec"), ns)  # noqa: S102
  (out,) = ns["out"]
  assert out.tokens == reference_greedy(ns["params"], ns["model"], [1, 2, 3, 4, 5, 1, 2, 3], 12)
  assert out.drafted > 0
  assert str(out.tokens) in capsys.readouterr().out
