"""Head-to-head with Hugging Face ``transformers`` on one random-weight Llama, each side in its
own fresh process.

The model: a random-weight ``LlamaForCausalLM`` built with ``transformers`` (hidden 512,
8 layers, 8 query / 2 KV heads, vocab 8192, intermediate 1376, float32: 30.5M parameters),
saved as safetensors and loaded into ours with :func:`~jax_paged_kv.load_hf_checkpoint`. The
workload: 32 requests with log-normal prompt / output lengths (means ~105 / ~140 tokens),
greedy, no stop token (every request produces exactly its drawn output length).

* **ours**: :func:`~jax_paged_kv.generate` with its defaults (continuous batching, default
  cache), called twice in the same process.
* **transformers**: ``LlamaForCausalLM.generate`` (``attn_implementation="sdpa"``), batches of
  8 requests in order, left-padded, each batch generating its longest output (``min_new_tokens
  = max_new_tokens``; only each request's own tokens count), called twice in the same process.

Reported per side (median over ``--repeats`` fresh processes): useful tokens per second of the
first call in a fresh process (compilation included for ours; no persistent compilation cache)
and of a second call in the same process, peak RSS of the process, and how many generated
tokens agree with ``transformers`` run on each prompt alone (unpadded, batch 1) on a subset of
the requests (the first ``--check``; a request agrees up to its first different
token).

    python -m benchmarks.vs_transformers [--quick] [--repeats 3]

Skips with a message when ``torch`` or ``transformers`` is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import report

HF_CONFIG = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
    bos_token_id=1, eos_token_id=2, pad_token_id=0, attention_bias=False, mlp_bias=False,
    torch_dtype="float32")
PROMPT_MEAN, OUTPUT_MEAN = 105, 140
HF_BATCH = 8


def peak_rss_mib() -> float:
  """Peak resident set size of this process, MiB (Linux ``ru_maxrss`` is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_workload(n: int, seed: int, *, max_prompt: int = 1024, max_output: int = 1024):
  """``(prompts, output_lens)``: ``n`` log-normal request lengths and random prompt tokens."""
  from jax_paged_kv.workloads import sharegpt_like_lengths
  rng = np.random.default_rng(seed)
  p_lens, o_lens = sharegpt_like_lengths(n, rng, prompt_mean=PROMPT_MEAN,
                                         output_mean=OUTPUT_MEAN, max_prompt=max_prompt,
                                         max_output=max_output)
  # Token 0 is HF's pad token and 2 its eos: prompts use neither.
  prompts = [rng.integers(3, HF_CONFIG["vocab_size"], int(p)).tolist() for p in p_lens]
  return prompts, [int(o) for o in o_lens]


# ---- the two sides (each runs in its own process) ---------------------------------------------


def run_ours(ckpt: str, prompts, outs) -> dict:
  """Loads the checkpoint into ours and calls :func:`~jax_paged_kv.generate` twice."""
  import jax  # noqa: F401  (imported before timing, like torch on the other side)

  from jax_paged_kv import SamplingParams, generate, load_hf_checkpoint
  from jax_paged_kv.serving.engine.engine import default_cache_config
  model, params = load_hf_checkpoint(ckpt)
  sampling = [SamplingParams(max_new_tokens=o) for o in outs]
  times, cpu, tokens = [], [], None
  for _ in range(2):
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = generate(params, model, prompts, sampling)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  cc = default_cache_config(model, prompts, sampling)
  return {"times": times, "cpu": cpu, "tokens": tokens, "rss_mib": peak_rss_mib(),
          "kv_pool_mib": cc.pool_bytes / 2**20}


def run_hf(ckpt: str, prompts, outs, check: int) -> dict:
  """``LlamaForCausalLM.generate`` on left-padded batches of 8, twice; then ``check`` requests
  alone (unpadded) for the agreement reference (not timed)."""
  import torch
  from transformers import LlamaForCausalLM
  model = LlamaForCausalLM.from_pretrained(ckpt, attn_implementation="sdpa",
                                           torch_dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None  # fixed lengths: ignore eos
  pad = HF_CONFIG["pad_token_id"]

  def batch_generate():
    got = []
    for s in range(0, len(prompts), HF_BATCH):
      ps, os_ = prompts[s:s + HF_BATCH], outs[s:s + HF_BATCH]
      width = max(map(len, ps))
      ids = torch.tensor([[pad] * (width - len(p)) + p for p in ps])
      mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
      n = max(os_)
      with torch.inference_mode():
        y = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
      got += [y[i, width:width + o].tolist() for i, o in enumerate(os_)]
    return got

  times, cpu, tokens = [], [], None
  for _ in range(2):
    t0, c0 = time.perf_counter(), time.process_time()
    tokens = batch_generate()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  rss = peak_rss_mib()
  alone = []
  for p, o in zip(prompts[:check], outs[:check], strict=True):
    with torch.inference_mode():
      y = model.generate(input_ids=torch.tensor([p]), do_sample=False, max_new_tokens=o,
                         min_new_tokens=o, pad_token_id=pad)
    alone.append(y[0, len(p):].tolist())
  return {"times": times, "cpu": cpu, "tokens": tokens, "rss_mib": rss, "alone": alone}


def _worker(args) -> int:
  with open(os.path.join(args.dir, "workload.json")) as f:
    w = json.load(f)
  if args.worker == "ours":
    res = run_ours(args.dir, w["prompts"], w["outs"])
  else:
    res = run_hf(args.dir, w["prompts"], w["outs"], w["check"])
  with open(os.path.join(args.dir, f"{args.worker}.json"), "w") as f:
    json.dump(res, f)
  return 0


# ---- the driver -------------------------------------------------------------------------------


def agreement(got, want) -> tuple[int, int]:
  """``(tokens, total)``: tokens of ``got`` equal to ``want`` up to each request's first
  difference, over all requests."""
  same = 0
  for g, w in zip(got, want, strict=True):
    for a, b in zip(g, w, strict=False):
      if a != b:
        break
      same += 1
  return same, sum(map(len, want))


def build_checkpoint(path: str, seed: int) -> int:
  """Saves a random-weight ``LlamaForCausalLM`` to ``path``; returns its parameter count."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(seed)
  model = LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).eval()
  model.save_pretrained(path, safe_serialization=True)
  return sum(p.numel() for p in model.parameters())


def spawn(side: str, path: str, timeout: float) -> dict:
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # a fresh process compiles from scratch
  env["PYTHONPATH"] = os.pathsep.join(
      [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), env.get("PYTHONPATH", "")])
  subprocess.run([sys.executable, "-m", "benchmarks.vs_transformers", "--worker", side,
                  "--dir", path], check=True, env=env, timeout=timeout)
  with open(os.path.join(path, f"{side}.json")) as f:
    return json.load(f)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="8 shorter requests, one repeat")
  p.add_argument("--requests", type=int, default=None, help="default 32 (8 with --quick)")
  p.add_argument("--repeats", type=int, default=None,
                 help="fresh processes per side (default 3, 1 with --quick)")
  p.add_argument("--check", type=int, default=None,
                 help="requests also run alone on transformers (default 4, 2 with --quick)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
  p.add_argument("--dir", help=argparse.SUPPRESS)
  p.add_argument("--assemble", nargs="+", metavar="DIR",
                 help="report from worker outputs already in these directories (each holds "
                      "workload.json, hf.json, ours.json of one repeat); runs nothing")
  args = p.parse_args(argv)
  if args.worker:
    return _worker(args)
  report.set_quick(args.quick)
  missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
  if missing:
    print(f"vs_transformers: skipped ({' and '.join(missing)} not installed; "
          "pip install torch transformers)")
    return 0
  if args.assemble:
    runs = {"ours": [], "hf": []}
    for d in args.assemble:
      for side in runs:
        with open(os.path.join(d, f"{side}.json")) as f:
          runs[side].append(json.load(f))
    with open(os.path.join(args.assemble[0], "workload.json")) as f:
      w = json.load(f)
    from transformers import LlamaConfig, LlamaForCausalLM
    params = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**HF_CONFIG)).parameters())
    return summarize(runs, w["prompts"], w["outs"], w["check"], params, len(args.assemble))
  from tqdm.auto import tqdm
  n = args.requests or (8 if args.quick else 32)
  repeats = args.repeats or (1 if args.quick else 3)
  check = min(n, args.check if args.check is not None else (2 if args.quick else 4))
  limits = dict(max_prompt=256, max_output=128) if args.quick else {}
  prompts, outs = make_workload(n, args.seed, **limits)
  runs = {"ours": [], "hf": []}
  with tempfile.TemporaryDirectory(prefix="vs_transformers_") as path:
    params = build_checkpoint(path, args.seed)
    with open(os.path.join(path, "workload.json"), "w") as f:
      json.dump({"prompts": prompts, "outs": outs, "check": check}, f)
    bar = tqdm(total=2 * repeats, desc="vs_transformers", unit="process")
    for _ in range(repeats):
      for side in ("hf", "ours"):  # alternate, so drift in the machine's load hits both
        bar.set_postfix_str(side)
        runs[side].append(spawn(side, path, timeout=1800))
        bar.update()
    bar.close()
  return summarize(runs, prompts, outs, check, params, repeats)


def summarize(runs: dict, prompts, outs, check: int, params: int, repeats: int) -> int:
  """Prints the table and saves the results of the worker outputs ``runs[side]``."""
  n, useful = len(prompts), sum(outs)
  med = report.median
  fig = {}
  for side, rs in runs.items():
    fig[side] = {"first_tps": med([useful / r["times"][0] for r in rs]),
                 "warm_tps": med([useful / r["times"][1] for r in rs]),
                 "first_s": med([r["times"][0] for r in rs]),
                 "warm_s": med([r["times"][1] for r in rs]),
                 "rss_mib": med([r["rss_mib"] for r in rs]),
                 "first_cpu_s": med([r["cpu"][0] for r in rs]),
                 "warm_cpu_s": med([r["cpu"][1] for r in rs])}
  alone = runs["hf"][0]["alone"]
  agree_ours, total = agreement(runs["ours"][0]["tokens"][:check], alone)
  agree_hf, _ = agreement(runs["hf"][0]["tokens"][:check], alone)
  same_all, total_all = agreement(runs["ours"][0]["tokens"], runs["hf"][0]["tokens"])
  pool = runs["ours"][0]["kv_pool_mib"]
  o, h = fig["ours"], fig["hf"]
  rows = [
      ["first call in a fresh process, tokens/s", f"{o['first_tps']:.0f} ({o['first_s']:.1f} s)",
       f"{h['first_tps']:.0f} ({h['first_s']:.1f} s)", f"{o['first_tps'] / h['first_tps']:.2f}x"],
      ["second call, same process, tokens/s", f"{o['warm_tps']:.0f} ({o['warm_s']:.1f} s)",
       f"{h['warm_tps']:.0f} ({h['warm_s']:.1f} s)", f"{o['warm_tps'] / h['warm_tps']:.2f}x"],
      ["first call, process CPU seconds", f"{o['first_cpu_s']:.1f}", f"{h['first_cpu_s']:.1f}",
       f"{h['first_cpu_s'] / o['first_cpu_s']:.2f}x less"],
      ["second call, process CPU seconds", f"{o['warm_cpu_s']:.1f}", f"{h['warm_cpu_s']:.1f}",
       f"{h['warm_cpu_s'] / o['warm_cpu_s']:.2f}x less"],
      ["peak RSS, MiB", f"{o['rss_mib']:.0f} (KV pool {pool:.0f})", f"{h['rss_mib']:.0f}",
       f"{o['rss_mib'] - h['rss_mib'] - pool:+.0f} MiB vs transformers + pool"],
      ["greedy tokens equal, ours vs transformers padded (all requests)",
       f"{same_all}/{total_all}", "", ""],
  ]
  if check:
    rows.insert(-1, [f"greedy tokens equal to transformers alone ({check} requests)",
                     f"{agree_ours}/{total}", f"{agree_hf}/{total} (padded batches)", ""])
  columns = ["", "ours (generate, defaults)", "transformers (sdpa, batches of 8)", "ratio"]
  print(report.text_table(columns, rows))
  mean_prompt = np.mean([len(q) for q in prompts])
  notes = (f"{n} requests (prompt / output lengths log-normal, means {mean_prompt:.0f} / "
           f"{np.mean(outs):.0f} tokens; {useful} useful tokens), random-weight Llama of "
           f"{params / 1e6:.1f}M parameters (float32), greedy; medians of {repeats} fresh "
           "processes per side. First call: ours compiles (no persistent compilation cache); "
           "second call: same process. Process CPU seconds (user + system, both sides use "
           "every core) are shown too: on a shared machine they move less with other "
           "processes' load than wall time. Goals: first >= 1.0x, second >= 2x, RSS <= "
           "transformers' + the KV pool.")
  report.save("vs_transformers", title="Head-to-head with transformers (CPU)",
              markdown=report.markdown_table(columns, rows), notes=notes,
              data={"requests": n, "useful_tokens": useful, "params": params,
                    "repeats": repeats, "figures": fig, "kv_pool_mib": pool,
                    "agreement_alone": [agree_ours, agree_hf, total],
                    "agreement_padded": [same_all, total_all],
                    "runs": {s: [{k: v for k, v in r.items() if k not in ("tokens", "alone")}
                                 for r in rs] for s, rs in runs.items()}})
  return 0


if __name__ == "__main__":
  sys.exit(main())
