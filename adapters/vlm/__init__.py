"""Generative vision-language models (LLaVA): vision tower, projector and language model sites, with
named position groups (``image``, ``text``, ``last`` and groups given with the inputs)."""

from .adapter import VLMAdapter

__all__ = ["VLMAdapter"]
