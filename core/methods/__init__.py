"""Methods built only on the engine, so each works for every adapter whose catalog has its sites."""

from .activation_patching import activation_patching

__all__ = ["activation_patching"]
