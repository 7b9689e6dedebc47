"""crosspatch: causal interventions inside neural networks, one engine for every architecture.

    import crosspatch as cp
    m = cp.wrap(model)                                   # adapter found through the plugin registry
    cache = m.capture(clean_ids, ["resid_post.*"])
    out = m.run(corrupt_ids, {"resid_post.1[pos=3]": cp.Patch(cache)})
    res = cp.activation_patching(m, clean_ids, corrupt_ids, "head_out.*[head=*]",
                                 metric=cp.metrics.logit_diff(answer, distractor))

Names are imported on first use, so ``import crosspatch`` (and the command line) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "Adapter": "adapter", "AdapterError": "adapter",
    "Cache": "cache",
    "Axis": "catalog", "Catalog": "catalog", "LinearFrom": "catalog", "SiteFamily": "catalog", "Sweep": "catalog",
    "Bound": "engine", "Run": "engine",
    "Add": "interventions", "ApplyContext": "interventions", "Intervention": "interventions", "Mean": "interventions",
    "Noise": "interventions", "Patch": "interventions", "ProjectOut": "interventions", "Resample": "interventions",
    "Scale": "interventions", "Set": "interventions", "Zero": "interventions",
    "activation_patching": "methods",
    "attribution_patching": "methods.attribution", "path_patching": "methods.path_patching",
    "mediation": "methods.mediation", "faithfulness": "methods.faithfulness",
    "faithfulness_table": "methods.faithfulness", "faithfulness_curve": "methods.faithfulness",
    "steering_vector": "methods.steering", "steering_curve": "methods.steering",
    "fit_eraser": "methods.erasure", "Erase": "methods.erasure",
    "train_das": "methods.das", "iia": "methods.das", "RotatedSubspace": "methods.das",
    "BoundlessDAS": "methods.das", "LearnedMask": "methods.masks", "train_masks": "methods.masks",
    "train_iit": "methods.iit",
    "SAE": "sae", "train_sae": "sae", "load_sae": "sae", "SAEFeatures": "methods.sae_patching",
    "latent_traversal": "methods.latent", "factor_mediation": "methods.vae_metrics",
    "WrappedModel": "model", "wrap": "model",
    "Result": "results",
    "Site": "sites", "SiteError": "sites", "Span": "sites",
}
_RENAMED = {"intervention_from_dict": ("interventions", "from_dict")}
_SUBMODULES = {"metrics", "tasks", "zoo", "testing", "report", "methods", "plugins", "trainable", "sae"}

__all__ = sorted([*_EXPORTS, *_RENAMED, "metrics", "tasks", "zoo"])

try:
    from importlib.metadata import version as _version

    __version__ = _version("crosspatch")
except Exception:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _RENAMED:
        module, attr = _RENAMED[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'crosspatch' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return list(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from . import metrics, tasks, zoo
    from .adapter import Adapter, AdapterError
    from .cache import Cache
    from .catalog import Axis, Catalog, LinearFrom, SiteFamily, Sweep
    from .engine import Bound, Run
    from .interventions import (
        Add, ApplyContext, Intervention, Mean, Noise, Patch, ProjectOut, Resample, Scale, Set, Zero,
    )
    from .interventions import from_dict as intervention_from_dict
    from .methods import activation_patching
    from .methods.attribution import attribution_patching
    from .methods.faithfulness import faithfulness, faithfulness_curve, faithfulness_table
    from .methods.mediation import mediation
    from .methods.path_patching import path_patching
    from .methods.das import BoundlessDAS, RotatedSubspace, iia, train_das
    from .methods.erasure import Erase, fit_eraser
    from .methods.iit import train_iit
    from .methods.latent import latent_traversal
    from .methods.masks import LearnedMask, train_masks
    from .methods.sae_patching import SAEFeatures
    from .methods.steering import steering_curve, steering_vector
    from .methods.vae_metrics import factor_mediation
    from .sae import SAE, load_sae, train_sae
    from .model import WrappedModel, wrap
    from .results import Result
    from .sites import Site, SiteError, Span
