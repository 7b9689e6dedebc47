"""Generative vision-language models (LLaVA, PaliGemma, Idefics3, Gemma 3, Qwen2-VL, LLaVA-NeXT ...): vision
tower, projector and language model sites, with named position groups (``image``, ``text``, ``last``, per
image, per crop, and groups given with the inputs)."""

from .adapter import VLMAdapter

__all__ = ["VLMAdapter"]
