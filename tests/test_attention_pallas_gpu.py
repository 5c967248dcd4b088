"""The shared attention cases, plus kernel-specific tests, on the Pallas GPU kernel.

Everything runs in Pallas interpret mode (``interpret=True``) so it runs on CPU; on a GPU
machine set ``JAX_PAGED_KV_GPU_COMPILED=1`` to run the same cases compiled.
"""

import os

from tests.attention_cases import AttentionCases

COMPILED = os.environ.get("JAX_PAGED_KV_GPU_COMPILED") == "1"


class TestPallasGPU(AttentionCases):
  implementation = "pallas_gpu"
  knobs = {} if COMPILED else {"interpret": True}
