"""The small Llama configuration shared by the model, decoding, engine and export tests."""

from jax_paged_kv.models import LlamaConfig

# 2 layers, GQA 2:1, rope base far from the default so a wrong base shows up in the logits.
SMALL = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, rope_theta=500.0)
