"""HuggingFace transformers: GPT-2, GPT-NeoX, the Llama family (Llama, Mistral, Qwen2) and BERT-family encoders."""

from .adapter import TransformersAdapter

__all__ = ["TransformersAdapter"]
