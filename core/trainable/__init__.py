"""Trainable interventions: ``nn.Module`` s the engine applies like any other intervention.

``base`` is :class:`TrainableIntervention` with saving, loading and the kind registry; ``das`` the
rotated subspaces of distributed alignment search with their training and IIA; ``masks`` learned
masks; ``erasure`` LEACE and mean-projection erasers; ``sae`` sparse autoencoders and
``sae_features`` the intervention that edits in their feature basis; ``plugin`` offers the built-in
kinds to the plugin registry. It imports the engine, the results and the plugin registry; methods
that use these objects (IIT, scrubbing, edge masks, SAE sweeps) live above, in :mod:`crosspatch.methods`.
"""

from .base import FORMAT, FORMAT_VERSION, TrainableIntervention, from_dict, load, register, registered, source_rows

__all__ = [
    "TrainableIntervention", "register", "registered", "from_dict", "load", "source_rows", "FORMAT", "FORMAT_VERSION",
]
