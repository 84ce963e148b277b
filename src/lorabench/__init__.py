"""lorabench: a LoRA fine-tuning benchmark and trainer for Llama-family models."""
__version__ = "0.1.0"
