"""tracr-compiled transformers (RASP programs) as torch models, with their ground-truth circuits.

The weights are converted once from tracr (``tools/tracr_convert.py``, in an environment with jax);
loading them needs only torch and numpy. See docs/tracr.md.
"""

from .model import TracrTransformer, bos_default_edges, load
from .adapter import TracrAdapter, output_distance, output_score

__all__ = ["TracrTransformer", "TracrAdapter", "bos_default_edges", "load", "output_distance", "output_score"]
