"""A template crosspatch plugin: an adapter for :class:`MLPClassifier` (sites hidden_in, hidden, logits)."""

from .adapter import MLPAdapter
from .model import MLPClassifier

__all__ = ["MLPAdapter", "MLPClassifier"]
__version__ = "0.1.0"
