"""ftserve: fine-tuned LLMs from LoRA training to multi-adapter serving."""

__version__ = "0.1.0"
