"""crosspatch: causal interventions inside neural networks, one engine for every architecture.

    import crosspatch as cp
    m = cp.wrap(model, tokenizer=tok)                    # adapter found through the plugin registry
    m = cp.wrap("ioi-gpt2-tiny")                         # or a zoo model / checkpoint folder with its tokenizer
    cache = m.capture(clean_ids, ["resid_post.*"])
    out = m.run(corrupt_ids, {"resid_post.1[pos=3]": cp.Patch(cache)})
    res = cp.activation_patching(m, clean_ids, corrupt_ids, "head_out.*[head=*]",
                                 metric=cp.metrics.logit_diff(answer, distractor))

Names are imported on first use, so ``import crosspatch`` (and the command line) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _moved

_moved.install()

_EXPORTS: dict[str, str] = {
    "Adapter": "engine.adapter", "AdapterError": "engine.adapter",
    "Cache": "engine.cache",
    "Axis": "sites.catalog", "Catalog": "sites.catalog", "LinearFrom": "sites.catalog", "SiteFamily": "sites.catalog",
    "Sweep": "sites.catalog",
    "Bound": "engine.forward", "Run": "engine.forward",
    "Add": "engine.interventions", "ApplyContext": "engine.interventions", "Intervention": "engine.interventions",
    "Mean": "engine.interventions", "Noise": "engine.interventions", "Patch": "engine.interventions",
    "ProjectOut": "engine.interventions", "Resample": "engine.interventions", "Scale": "engine.interventions",
    "Set": "engine.interventions", "Zero": "engine.interventions",
    # The two shardable methods take ``executor=`` here: crosspatch.scale wraps the plain methods.
    "activation_patching": "scale.shardable", "attribution_patching": "scale.shardable",
    "path_patching": "methods.path_patching",
    "cdt": "methods.cdt",
    "localize": "methods.localize",
    "mediation": "methods.mediation", "faithfulness": "methods.faithfulness",
    "faithfulness_table": "methods.faithfulness", "faithfulness_curve": "methods.faithfulness",
    "steering_vector": "methods.steering", "steering_curve": "methods.steering",
    "fit_eraser": "trainable.erasure", "Erase": "trainable.erasure",
    "train_das": "trainable.das", "iia": "trainable.das", "RotatedSubspace": "trainable.das",
    "BoundlessDAS": "trainable.das", "LearnedMask": "trainable.masks", "train_masks": "trainable.masks",
    "train_iit": "methods.iit",
    "SAE": "trainable.sae", "train_sae": "trainable.sae", "load_sae": "trainable.sae",
    "SAEFeatures": "trainable.sae_features",
    "latent_traversal": "methods.latent", "factor_mediation": "methods.vae_metrics",
    "WrappedModel": "engine.model", "TrainingModeWarning": "engine.model", "wrap": "zoo.sources",
    "Fn": "engine.interventions",
    "TokenizationError": "engine.text", "FormatError": "results.formats",
    "Result": "results.result",
    "Site": "sites.site", "SiteError": "sites.site", "Span": "sites.site",
    "head_roles": "methods.head_roles", "cdt_circuit": "methods.cdt_circuit",
    "Knockout": "engine.knockout", "KnockoutEdges": "engine.interventions", "cross_modal_flow": "methods.vlm_flow",
    "attribution_graph": "methods.attribution_graph.graph", "AttributionGraph": "methods.attribution_graph.graph",
    "feature_intervention": "methods.attribution_graph.interventions",
    "qk_attribution": "methods.attribution_graph.qk", "QKAttribution": "methods.attribution_graph.qk",
    "Transcoder": "trainable.transcoder", "train_transcoder": "trainable.transcoder",
    "load_transcoder": "trainable.transcoder",
    "run_study": "study.runner", "load_study": "study.spec",
}
_RENAMED = {
    "intervention_from_dict": ("engine.interventions", "from_dict"),
    "prune_graph": ("methods.attribution_graph.prune", "prune"),
    "graph_scores": ("methods.attribution_graph.prune", "scores"),
    "load_published_transcoder": ("trainable.transcoder_formats", "load_published"),
}
# Submodules reachable as attributes (``cp.metrics.logit_diff``), by the module that holds them.
_SUBMODULES = {
    "metrics": "results.metrics", "tasks": "zoo.tasks", "zoo": "zoo", "testing": "testing", "report": "results.report",
    "methods": "methods", "plugins": "plugins", "trainable": "trainable", "sae": "trainable.sae", "study": "study",
}

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
        value = importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    elif f"{__name__}.{name}" in _moved.MOVED:  # cp.interventions: a module from before the packages
        value = importlib.import_module(_moved.MOVED[f"{__name__}.{name}"])
    else:
        raise AttributeError(f"module 'crosspatch' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return list(__all__)


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from . import zoo
    from .engine.adapter import Adapter, AdapterError
    from .engine.cache import Cache
    from .engine.forward import Bound, Run
    from .engine.interventions import (
        Add, ApplyContext, Fn, Intervention, Mean, Noise, Patch, ProjectOut, Resample, Scale, Set, Zero,
    )
    from .engine.interventions import from_dict as intervention_from_dict
    from .engine.model import TrainingModeWarning, WrappedModel
    from .engine.text import TokenizationError
    from .results.formats import FormatError
    from .zoo.sources import wrap
    from .methods.faithfulness import faithfulness, faithfulness_curve, faithfulness_table
    from .methods.iit import train_iit
    from .methods.latent import latent_traversal
    from .methods.mediation import mediation
    from .methods.path_patching import path_patching
    from .methods.steering import steering_curve, steering_vector
    from .methods.vae_metrics import factor_mediation
    from .results import metrics
    from .results.result import Result
    from .scale.shardable import activation_patching, attribution_patching
    from .sites.catalog import Axis, Catalog, LinearFrom, SiteFamily, Sweep
    from .sites.site import Site, SiteError, Span
    from .trainable.das import BoundlessDAS, RotatedSubspace, iia, train_das
    from .trainable.erasure import Erase, fit_eraser
    from .trainable.masks import LearnedMask, train_masks
    from .trainable.sae import SAE, load_sae, train_sae
    from .trainable.sae_features import SAEFeatures
    from .zoo import tasks
    from .engine.interventions import KnockoutEdges
    from .engine.knockout import Knockout
    from .methods.attribution_graph.graph import AttributionGraph, attribution_graph
    from .methods.attribution_graph.interventions import feature_intervention
    from .methods.attribution_graph.prune import prune as prune_graph
    from .methods.attribution_graph.qk import QKAttribution, qk_attribution
    from .methods.attribution_graph.prune import scores as graph_scores
    from .methods.cdt_circuit import cdt_circuit
    from .methods.head_roles import head_roles
    from .methods.vlm_flow import cross_modal_flow
    from .study.runner import run_study
    from .study.spec import load_study
    from .trainable.transcoder import Transcoder, load_transcoder, train_transcoder
    from .trainable.transcoder_formats import load_published as load_published_transcoder
