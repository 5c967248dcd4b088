"""The small Llama configuration shared by the model, decoding, engine and export tests, and
helpers that drive any bundled model through chunked prefill and greedy decoding."""

import functools

import jax
import numpy as np

from jax_paged_kv import allocate_sequences
from jax_paged_kv.models import LlamaConfig

# 2 layers, GQA 2:1, rope base far from the default so a wrong base shows up in the logits.
SMALL = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, rope_theta=500.0)


@functools.partial(jax.jit, static_argnames=("config", "implementation", "max_blocks",
                                             "all_logits"), donate_argnums=1)
def forward_jit(params, cache, tokens, seq_ids, num_new=None, *, config, implementation=None,
                max_blocks=None, all_logits=False):
  """``config.forward`` of a bundled model (LlamaConfig or Gemma2Config), jitted."""
  return config.forward(params, cache, tokens, seq_ids, num_new, implementation=implementation,
                        max_blocks=max_blocks, all_logits=all_logits)


def run_chunked(params, config, cache, prompts, slots, chunk, max_blocks=None):
  """Interleaved chunked prefill of every prompt; returns (cache, per-prompt logits [S, vocab])."""
  cache, st = allocate_sequences(cache, np.asarray(slots, np.int32))
  pos = [0] * len(prompts)
  out = [[] for _ in prompts]
  while any(p < len(t) for p, t in zip(pos, prompts, strict=True)):
    toks = np.zeros((len(prompts), chunk), np.int32)
    num = np.zeros(len(prompts), np.int32)
    for i, t in enumerate(prompts):
      piece = t[pos[i]:pos[i] + chunk]
      toks[i, :len(piece)] = piece
      num[i] = len(piece)
      pos[i] += len(piece)
    ids = np.where(num > 0, np.asarray(slots), -1).astype(np.int32)
    cache, logits, status = forward_jit(params, cache, toks, ids, num, config=config,
                                        all_logits=True, max_blocks=max_blocks)
    assert not np.any(np.asarray(status))
    for i in range(len(prompts)):
      out[i].append(np.asarray(logits[i, :num[i]], np.float32))
  return cache, [np.concatenate(o) for o in out]


def decode_greedy(params, config, cache, slots, last_logits, steps, max_blocks=None):
  """Greedy single-token steps for every slot; returns (cache, tokens, logits per step)."""
  toks, logs = [], []
  cur = np.argmax(np.stack(last_logits), -1).astype(np.int32)
  for _ in range(steps):
    toks.append(cur)
    cache, logits, status = forward_jit(params, cache, cur[:, None], np.asarray(slots, np.int32),
                                        config=config, max_blocks=max_blocks)
    assert not np.any(np.asarray(status))
    logs.append(np.asarray(logits, np.float32))
    cur = np.argmax(logs[-1], -1).astype(np.int32)
  return cache, np.stack(toks, 1), np.stack(logs, 1)
