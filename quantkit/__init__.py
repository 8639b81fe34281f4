"""quantkit: quantize and convert Mistral/Llama checkpoints, and prove the result still behaves like the original."""

__version__ = "0.1.0"
