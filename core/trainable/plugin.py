"""Entry point of the built-in trainable interventions (group ``crosspatch``, name ``trainable``).

Offers DAS's subspaces, learned masks, the concept eraser and SAE feature edits to the plugin
registry, so ``crosspatch.interventions.from_dict`` and :func:`crosspatch.trainable.load` rebuild
them by kind.
"""

from __future__ import annotations

from ..plugins.hookspecs import hookimpl


@hookimpl
def register_interventions(register):
    from .das import BoundlessDAS, LowRankRotatedSubspace, RotatedSubspace
    from .erasure import Erase
    from .masks import LearnedMask
    from .sae_features import SAEFeatures

    for cls in (RotatedSubspace, LowRankRotatedSubspace, BoundlessDAS, LearnedMask, Erase, SAEFeatures):
        register(cls)
