"""Small reference models used by the demo, the tests and the benchmarks.

They are ordinary PyTorch modules written the way users write them; oases_fx never needs them
changed. Hugging Face models are built from tiny random-init configs (no downloads).
"""
from oases_fx.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
