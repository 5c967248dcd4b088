"""A plain-Python beam search over the float64 reference model: the oracle of tests/test_beam.py.

No cache and no arrays of beams: every beam is a token list, every step recomputes each beam's
logits from its whole sequence (tests/llama_reference.py), and candidates are ordered by
Python's sort. The rules are Hugging Face's ``generate(num_beams=...)`` as documented in
``jax_paged_kv/serving/beam.py``; the search also reports its smallest decision margin, so a
test can tell that float32 rounding cannot flip one of its choices.
"""

import math

import numpy as np

from tests.llama_reference import reference_logits


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.exp(x).sum())


def reference_beam_search(params, config, prompt, beam, logits_fn=reference_logits):
  """Returns ``(hypotheses, margin)``: the ``beam_width`` best ``(score, tokens, logprobs)``,
  best first, and the smallest gap between two scores whose order decided something."""
  w, m, lp = beam.beam_width, beam.max_new_tokens, beam.length_penalty
  stops = set(beam.stop_tokens)
  k = (1 + max(1, len(stops))) * w
  beams = [(0.0, [], [])]  # (summed logprob, tokens, logprobs)
  finished = []  # (score, tokens, logprobs)
  improvable = True
  margin = math.inf
  for t in range(m):
    length = t + 1
    cands = []
    for s, toks, lps in beams:
      logp = _log_softmax(logits_fn(params, config, list(prompt) + toks)[-1])
      cands += [(s + logp[v], toks + [v], lps + [logp[v]]) for v in range(len(logp))]
    cands.sort(key=lambda c: -c[0])  # stable: parent order, then token
    scores = [c[0] for c in cands[:k + 1]]
    margin = min([margin, *(a - b for a, b in zip(scores, scores[1:], strict=False))])
    top = cands[:k]
    ends = [toks[-1] in stops or length == m for _, toks, _ in top]
    closed = not improvable or (beam.early_stopping is True and len(finished) == w)
    if not closed:
      new = [(s / length ** lp, toks, lps)
             for r, ((s, toks, lps), end) in enumerate(zip(top, ends, strict=True))
             if end and r < w]
      merged = sorted(finished + new, key=lambda f: -f[0])
      if len(merged) > w:
        margin = min(margin, merged[w - 1][0] - merged[w][0])
      finished = merged[:w]
    beams = [c for c, end in zip(top, ends, strict=True) if not end][:w]
    if length == m:
      break
    best_len = m if (beam.early_stopping == "never" and lp > 0) else length
    best = beams[0][0] / best_len ** lp
    if len(finished) == w:
      worst = finished[-1][0]
      margin = min(margin, abs(best - worst))
      improvable = improvable and best > worst
    if not improvable or (beam.early_stopping is True and len(finished) == w):
      break
  return finished, margin
