"""Quantised KV caches: capacity, attention time and accuracy per format, and a serving run.

Per format (unquantised bfloat16 / float32, int8, fp8, int4):

* stored bytes per token (scales included) of a Llama-3-8B-like geometry (32 layers, 8 KV heads,
  head_dim 128), and how many 2048-token sequences fit a 1 GiB budget
  (``CacheConfig.from_memory_budget``), with the ratio to bfloat16;
* one decode attention call (``paged_attention``, XLA path on CPU) over a batch of sequences,
  time and ratio to the float32 cache measured in the same run;
* accuracy: relative L2 error of the output against float64 attention on the unquantised data,
  standard normal K/V and heavy-tailed K/V (4 K channels x12 +6, log-normal V token norms), GQA.

Then the request mix through the engine at equal KV memory, unquantised vs each format (paged):
peak concurrent sequences and generated tokens/s.

    python -m benchmarks.kv_quant [--quick]

Saves ``benchmarks/results/kv_quant.json`` and the RESULTS.md section.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

import jax_paged_kv as pk
from benchmarks import report
from jax_paged_kv import demo
from jax_paged_kv.models import init_params

FORMATS = (None, "int8", "fp8", "int4")


def _name(fmt, dtype=jnp.float32):
  return fmt or jnp.dtype(dtype).name


def capacity_rows(budget: int = 1 << 30, seq_len: int = 2048):
  geo = dict(num_layers=32, num_kv_heads=8, head_dim=128, max_seq_len=seq_len, block_size=16)
  base = pk.CacheConfig.from_memory_budget(budget, dtype=jnp.bfloat16, **geo)
  rows = []
  for fmt in FORMATS:
    cfg = pk.CacheConfig.from_memory_budget(budget, dtype=jnp.bfloat16, kv_quant=fmt, **geo)
    seqs = cfg.usable_blocks // cfg.max_blocks_per_seq
    rows.append({"format": _name(fmt, jnp.bfloat16), "bytes/token": cfg.bytes_per_token,
                 f"{seq_len}-token seqs in {budget >> 20} MiB": seqs,
                 "tokens vs bf16": f"{cfg.usable_blocks / base.usable_blocks:.2f}x"})
  return rows


def _data(rng, shape, heavy):
  """K, V ``[batch, S, kv_heads, head_dim]`` float64 (heavy: outlier K channels, V norms)."""
  k, v = rng.standard_normal(shape), rng.standard_normal(shape)
  if heavy:
    ch = rng.choice(shape[-1], 4, replace=False)
    k[..., ch] = k[..., ch] * 12.0 + 6.0
    v = v * np.exp(rng.standard_normal(shape[:-1]))[..., None]
  return k, v


def _attention_f64(q, k, v, lens):
  """Decode attention in float64: ``q [b, 1, qh, d]``, dense ``k, v [b, S, kvh, d]``."""
  b, _, qh, d = q.shape
  g = qh // k.shape[2]
  kk = np.repeat(k, g, axis=2)  # [b, S, qh, d]
  vv = np.repeat(v, g, axis=2)
  s = np.einsum("bhd,bshd->bhs", q[:, 0], kk) * d ** -0.5
  s = np.where(np.arange(k.shape[1])[None, None, :] < lens[:, None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhs,bshd->bhd", p, vv)[:, None]


def attention_rows(batch: int, context: int, repeats: int):
  kvh, ratio, d, bs = 2, 4, 128, 16
  rng = np.random.default_rng(0)
  lens = np.full(batch, context, np.int32)
  q = rng.standard_normal((batch, 1, kvh * ratio, d))
  rows, times = [], {}
  for fmt in tqdm(FORMATS, desc="attention", unit="format"):
    cfg = pk.CacheConfig(num_layers=1, num_kv_heads=kvh, head_dim=d, block_size=bs,
                         num_blocks=1 + batch * context // bs, max_seqs=batch,
                         max_seq_len=context, dtype=jnp.float32, kv_quant=fmt)
    errors = {}
    for heavy in (False, True):
      k, v = _data(np.random.default_rng(1), (batch, context, kvh, d), heavy)
      cache, _ = pk.allocate_sequences(pk.init_cache(cfg), np.arange(batch))
      cache, _ = pk.append_kv(cache, jnp.asarray(k, jnp.float32)[None],
                              jnp.asarray(v, jnp.float32)[None], np.arange(batch))
      qj, ids = jnp.asarray(q, jnp.float32), jnp.arange(batch)
      out = np.asarray(pk.paged_attention(qj, cache, ids, 0), np.float64)
      want = _attention_f64(q, k, v, lens)
      errors[heavy] = np.linalg.norm(out - want) / np.linalg.norm(want)
    fn = jax.jit(lambda q, c: pk.paged_attention(q, c, jnp.arange(batch), 0))
    call = lambda fn=fn, q=qj, c=cache: fn(q, c)  # noqa: E731
    first_s, compile_s = report.first_call(call)  # the cold start: compile + one call
    times[fmt] = report.median(report.repeat(call, repeats=repeats, warmup=1))
    rows.append({"format": _name(fmt), "batch x context": f"{batch} x {context}",
                 "attention ms": f"{1e3 * times[fmt]:.2f}",
                 "vs float32": f"{times[fmt] / times[None]:.2f}x",
                 "first call s": f"{first_s:.2f}", "compile s": f"{compile_s:.2f}",
                 "rel. L2 (normal)": f"{errors[False]:.2e}",
                 "rel. L2 (heavy-tailed)": f"{errors[True]:.2e}"})
  return rows


def serving_rows(requests: int, slabs: int, max_seq_len: int):
  model = demo.model_config("tiny")
  params = init_params(model, jax.random.PRNGKey(0), scale=2.0)
  half = max_seq_len // 2
  reqs = demo.make_requests(requests, model.vocab_size, 0, max_prompt=half,
                            max_output=max_seq_len - half)
  common = dict(prefill_chunk=128, prefill_token_budget=512, decode_steps=16,
                batch_bucket_min=8, block_bucket_min=8, bucket_factor=2, decode_width_step=8,
                reserve_ratio=0.5, max_batch=64)
  rows, base = [], None
  for fmt in FORMATS:
    cc, _ = demo.equal_memory_configs(model, slabs=slabs, max_seq_len=max_seq_len,
                                      block_size=16, paged_max_seqs=64, kv_quant=fmt)
    demo.run_engine(params, model, cc, reqs, desc=f"serving {_name(fmt)} (warm-up)", **common)
    r = demo.run_engine(params, model, cc, reqs, desc=f"serving {_name(fmt)}", **common)
    base = base or r["tokens_per_s"]
    rows.append({"format": _name(fmt), "KV MiB": f"{cc.pool_bytes / 2**20:.2f}",
                 "blocks": cc.usable_blocks, "peak seqs": r["peak_running"],
                 "mean seqs": f"{r['mean_running']:.1f}", "preempt": r["preemptions"],
                 "tokens/s": f"{r['tokens_per_s']:.0f}",
                 "vs float32": f"{r['tokens_per_s'] / base:.2f}x"})
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="small sizes")
  args = p.parse_args(argv)
  report.set_quick(args.quick)
  batch, context, repeats = (4, 512, 5) if args.quick else (8, 2048, 15)
  requests, slabs, max_seq_len = (24, 2, 1024) if args.quick else (48, 4, 1024)
  machine = report.machine_name()
  cap = capacity_rows()
  att = attention_rows(batch, context, repeats)
  srv = serving_rows(requests, slabs, max_seq_len)
  tables = [
      (["format", "bytes/token", "2048-token seqs in 1024 MiB", "tokens vs bf16"], cap),
      (["format", "batch x context", "attention ms", "vs float32", "first call s", "compile s",
        "rel. L2 (normal)", "rel. L2 (heavy-tailed)"], att),
      (["format", "KV MiB", "blocks", "peak seqs", "mean seqs", "preempt", "tokens/s",
        "vs float32"], srv),
  ]
  print(f"machine: {machine}\n")
  for cols, rows in tables:
    print(report.text_table(cols, rows) + "\n")
  notes = (
      "Capacity: a Llama-3-8B-like geometry (32 layers, 8 KV heads, head_dim 128), 1 GiB, "
      "block 16; int8 stores 1 byte per value plus a bfloat16 K scale per (block, channel) and "
      "a float32 V scale per (token, KV head); fp8 1 byte plus float32 scales per (token, KV "
      "head) for K and V; int4 half a byte plus bfloat16 scales (K per block and channel, V per "
      "token and 32 channels). "
      f"Attention: one decode `paged_attention` call (XLA path, float32 queries, GQA 4, "
      f"head_dim 128), median of {repeats}, beside its cold start (the first call: compile + "
      "one call, and the JAX compile time inside it); the quantised XLA path dequantises the "
      "gathered pages, so on a CPU it is not faster (the GPU goal, int8 decode <= 0.6x bf16, is "
      "measured by `benchmarks/gpu_decode.py`). Accuracy against float64 attention on the "
      "unquantised data. Serving: the demo's `tiny` model (float32), "
      f"{requests} ShareGPT-like requests, the KV memory of {slabs} float32 slabs of "
      f"{max_seq_len} tokens for every format (a quantised pool fits more blocks into it); "
      "one warm-up pass, then one timed pass.")
  print(notes)
  markdown = "\n\n".join(report.markdown_table(c, r) for c, r in tables)
  path = report.save("kv_quant", title="Quantised KV cache: capacity, attention, accuracy, "
                     "serving at equal KV memory", markdown=markdown, notes=notes,
                     data={"args": vars(args), "capacity": cap, "attention": att,
                           "serving": srv})
  print(f"wrote {path}")
  return tables


if __name__ == "__main__":
  main()
