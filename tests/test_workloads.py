"""The shared workloads: Poisson arrivals and the simulated-clock latency driver, against hand
counts and against full recomputation on the engine."""

import dataclasses

import jax
import numpy as np
import pytest

from jax_paged_kv import CacheStrategy
from jax_paged_kv.models import init_params
from jax_paged_kv.serving.decoding import SamplingParams
from jax_paged_kv.serving.engine import Engine
from jax_paged_kv.serving.engine.metrics import RequestOutput
from jax_paged_kv.workloads import busy_mean, latency_summary, poisson_arrivals, serve_arrivals
from tests.llama_fixtures import SMALL
from tests.llama_reference import reference_greedy


def test_poisson_arrivals_have_exponential_gaps():
  rate, n = 4.0, 20_000
  t = poisson_arrivals(n, rate, seed=3)
  np.testing.assert_array_equal(t, poisson_arrivals(n, rate, seed=3))  # seeded
  gaps = np.diff(np.concatenate([[0.0], t]))
  assert np.all(gaps >= 0)
  # Exponential gaps: mean 1/rate and standard deviation 1/rate; 5 standard errors.
  se = (1 / rate) / np.sqrt(n)
  assert abs(gaps.mean() - 1 / rate) < 5 * se
  assert abs(gaps.std() - 1 / rate) < 5 * se * np.sqrt(2)
  # P(gap > mean) = exp(-1) for an exponential.
  assert abs(np.mean(gaps > 1 / rate) - np.exp(-1)) < 5 * np.sqrt(np.exp(-1) / n)
  for rate in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="positive and finite"):
      poisson_arrivals(3, rate)


@pytest.mark.parametrize("arrivals", [[0.0, float("nan")], [0.0, float("inf")], [1.0, 0.5],
                                      [0.0]])
def test_serve_arrivals_refuses_bad_times(arrivals):
  """A NaN time compares False both ways: unchecked, no request would ever arrive and the
  simulated server would step an empty engine forever."""
  class NoEngine:  # never reached: the arrivals are refused first
    has_work = False

  with pytest.raises(ValueError, match="finite, non-decreasing"):
    serve_arrivals(NoEngine(), [([1], None), ([2], None)], arrivals)


class FakeClock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@dataclasses.dataclass
class FakeMetrics:
  compile_seconds: float = 0.0


class OneAtATime:
  """One request at a time, one token per step; a step takes 1 s, the first one 5 s more
  (compiling). Stamps like the engine: admission at the step's start, tokens at its end."""

  def __init__(self, clock):
    self.clock, self.metrics = clock, FakeMetrics()
    self.waiting, self.current, self.steps, self.next_id = [], None, 0, 0

  @property
  def has_work(self):
    return bool(self.waiting or self.current)

  def add_request(self, prompt, sampling):
    self.next_id += 1
    self.waiting.append((RequestOutput(self.next_id, prompt, arrival_time=self.clock()),
                         sampling.max_new_tokens))
    return self.next_id

  def step(self):
    if self.current is None:
      self.current = self.waiting.pop(0)
      self.current[0].first_scheduled_time = self.clock()
    if self.steps == 0:
      self.clock.now += 5.0
      self.metrics.compile_seconds += 5.0
    self.steps += 1
    self.clock.now += 1.0
    out, need = self.current
    out.tokens.append(0)
    if out.first_token_time is None:
      out.first_token_time = self.clock()
    if len(out.tokens) < need:
      return []
    out.finish_time = self.clock()
    self.current = None
    return [out]


def test_simulated_clock_against_hand_count():
  # r0 arrives at 0 and needs 2 steps; r1 arrives at 0.5, during r0's first (compiling) step,
  # and waits for r0; the server then idles until r2 arrives at 10.
  clock = FakeClock()
  requests = [([1], SamplingParams(max_new_tokens=k)) for k in (2, 1, 1)]
  done = []
  lat = serve_arrivals(OneAtATime(clock), requests, [0.0, 0.5, 10.0], clock=clock,
                       progress=done.append)
  # r0: steps [0, 1] (the 5 s of compiling excluded) and [1, 2]; r1: admitted at 2, done at 3;
  # r2: admitted on arrival at 10, done at 11.
  np.testing.assert_allclose(lat["ttft"], [1.0, 2.5, 1.0])
  np.testing.assert_allclose(lat["e2e"], [2.0, 2.5, 1.0])
  np.testing.assert_allclose(lat["queue"], [0.0, 1.5, 0.0])
  np.testing.assert_allclose(lat["tpot"], [1.0, 0.0, 0.0])
  assert lat["makespan"] == 11.0 and lat["steps"] == 4 and lat["compiled_steps"] == 1
  assert lat["compile_s"] == 5.0 and lat["engine_wall_s"] == 9.0 and done == [1, 1, 1]
  s = latency_summary(lat)
  assert s["ttft_p50"] == 1.0 and s["e2e_mean"] == pytest.approx(5.5 / 3)
  assert s["tokens_per_s"] == 4 / 11
  with pytest.raises(ValueError):
    serve_arrivals(OneAtATime(FakeClock()), requests, [1.0, 0.0, 2.0])


@pytest.mark.parametrize("strategy", [CacheStrategy.PAGED, CacheStrategy.CONTIGUOUS])
def test_arrivals_on_the_engine_match_recomputation(strategy):
  params = init_params(SMALL, jax.random.PRNGKey(7), scale=2.0)
  rng = np.random.default_rng(1)
  prompts = [rng.integers(0, SMALL.vocab_size, n).tolist() for n in (5, 13, 3, 9, 7)]
  new = [6, 3, 8, 1, 5]
  requests = [(p, SamplingParams(max_new_tokens=k)) for p, k in zip(prompts, new, strict=True)]
  cc = SMALL.cache_config(num_blocks=1 + 3 * 8, max_seqs=3, max_seq_len=32, block_size=4,
                          strategy=strategy)
  engine = Engine(params, SMALL, cc, prefill_chunk=8, decode_steps=4, batch_bucket_min=3,
                  bucket_blocks=False)
  engine.add_request(prompts[0], requests[0][1])
  engine.run()  # compiles the engine's two shapes: the timed steps below compile nothing
  warm_steps = engine.metrics.steps
  # Three at once (one waits for a slot or for blocks), then two after long idle gaps.
  arrivals = [0.0, 0.0, 0.0, 1e4, 2e4]
  lat = serve_arrivals(engine, requests, arrivals)
  assert lat["compiled_steps"] == 0
  for out, p, k in zip(lat["outputs"], prompts, new, strict=True):
    assert out == reference_greedy(params, SMALL, p, k)
  assert np.all(lat["queue"] >= 0) and np.all(lat["queue"] <= lat["ttft"])
  assert np.all(lat["ttft"] > 0) and np.all(lat["ttft"] <= lat["e2e"])
  # Requests that arrive at an idle server are admitted in the step that starts on arrival.
  for i in (3, 4):
    (k,) = np.flatnonzero(lat["step_start"] == arrivals[i])
    assert 0 <= lat["queue"][i] <= lat["step_span"][k]
  assert lat["queue"][0] <= lat["step_span"][0] and lat["makespan"] > 2e4
  assert lat["steps"] == engine.metrics.steps - warm_steps


def test_demo_runs_end_to_end(tmp_path, capsys):
  """The README's main job at a toy size: both passes, both strategies, and the headline."""
  from jax_paged_kv import demo

  res = demo.main(["--requests", "6", "--max-seq-len", "128", "--slabs", "2", "--max-batch", "4",
                   "--prefill-chunk", "32", "--decode-steps", "4", "--prompt-mean", "20",
                   "--output-mean", "12", "--quiet", "--no-compile-cache",
                   "--plot", str(tmp_path / "demo.png")])
  out = capsys.readouterr().out
  capacity, latency = res["capacity"], res["latency"]
  # The contiguous engine is the paged one's oracle: every run yields the same tokens, each
  # request exactly its budget (no stop tokens).
  runs = [r["outputs"] for r in capacity + latency]
  budgets = [len(o) for o in runs[1]]
  assert all(o == runs[1] for o in runs) and min(budgets) >= 4
  for r in latency:
    assert np.all(r["queue"] >= 0) and np.all(r["queue"] <= r["ttft"])
    assert np.all(r["ttft"] <= r["e2e"])
  assert [r["strategy"] for r in capacity] == ["paged", "contiguous"]
  assert capacity[0]["kv_utilization"] > capacity[1]["kv_utilization"]
  assert "What paging buys here" in out and "What it buys little of, or none" in out
  assert (tmp_path / "demo.png").exists() and (tmp_path / "demo_latency.png").exists()


def test_busy_mean_weights_steps_by_their_time_and_counts_idle_time_as_zero():
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 7, 50)
  spans = rng.exponential(0.01, 50) * (1 + counts)  # a step of a bigger batch takes longer
  total = spans.sum() + 0.3  # 0.3 s idle between steps
  # Plain integral over a fine time grid: the count in force at each instant, 0 when idle.
  edges = np.concatenate([[0.0], np.cumsum(spans)])
  t = np.linspace(0, total, 400_001)[:-1] + total / 800_000
  step = np.searchsorted(edges, t, side="right") - 1
  held = np.where(step < len(counts), counts[np.minimum(step, len(counts) - 1)], 0)
  assert busy_mean(counts, spans, total) == pytest.approx(held.mean(), rel=2e-3)
  assert busy_mean(counts, spans, total) != pytest.approx(counts.mean(), rel=0.05)
  assert busy_mean([], [], 0.0) == 0.0
  with pytest.raises(ValueError):
    busy_mean([1, 2], [0.1], 1.0)


@pytest.mark.parametrize("argv", [["--rate", "0"], ["--load", "nan"], ["--load", "-1"],
                                  ["--requests", "0"], ["--block-size", "0"],
                                  ["--prompt-mean", "-5"], ["--output-mean", "0"],
                                  ["--reserve-ratio", "2"]],
                         ids=lambda a: "".join(a))
def test_demo_refuses_nonsense_flags_before_any_work(argv, capsys):
  from jax_paged_kv import demo

  with pytest.raises(SystemExit) as e:
    demo.main(argv)
  assert e.value.code == 2 and "must be" in capsys.readouterr().err
