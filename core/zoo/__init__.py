"""The zoo and the data it trains on: models with known mechanisms, built and trained here.

``store`` builds small models from configs, trains them on the project's tasks and caches them
(``crosspatch.zoo.get``, ``load``, ``models`` … as before the package existed); ``tasks`` are the
seeded counterfactual datasets (IOI, greater-than, shapes); ``toys`` and ``ground_truth`` are models
whose mechanism is known in closed form, with their adapters; ``sources`` turns "a zoo name or a
local checkpoint folder" into a model for the CLI and for workers alike. It imports the engine, the
results (tasks name their metrics) and the plugin registry.
"""

from .store import (
    CACHE_ENV_VAR, Loaded, TrainSettings, ZooError, ZooModel, cache_dir, cached, get, load, model_dir, models, train,
)

__all__ = [
    "CACHE_ENV_VAR", "Loaded", "TrainSettings", "ZooError", "ZooModel", "cache_dir", "cached", "get",
    "load", "model_dir", "models", "train",
]
