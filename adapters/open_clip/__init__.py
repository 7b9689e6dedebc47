"""open_clip CLIP models: both towers on the shared site vocabulary (``vision.*``, ``text.*``,
``image_embed``, ``text_embed``, ``logits``).

    import open_clip, crosspatch as cp
    m = cp.wrap(model)                                  # an open_clip CLIP; found through the plugin registry
    out = m.run({"images": images, "texts": token_ids})  # out.output: logits [images, texts]

Fused attention (``nn.MultiheadAttention``) is served by :class:`UnfusedAttention` twins that share
its weights, during crosspatch runs only; :func:`unfuse` makes a permanent unfused copy. Importing
this package does not import open_clip.
"""

from .adapter import OpenClipAdapter
from .attention import UnfusedAttention, unfuse
from crosspatch.adapters.transformers.twotower import Candidates, TwoTowerOutput

__all__ = ["OpenClipAdapter", "UnfusedAttention", "unfuse", "Candidates", "TwoTowerOutput", "to_transformers"]


def __getattr__(name: str):
    if name == "to_transformers":
        from .convert import to_transformers

        return to_transformers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
