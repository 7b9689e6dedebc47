"""crosspatch: causal interventions inside neural networks, one engine for every architecture.

    import crosspatch as cp
    m = cp.wrap(model)                                   # adapter found through the plugin registry
    cache = m.capture(clean_ids, ["resid_post.*"])
    out = m.run(corrupt_ids, {"resid_post.1[pos=3]": cp.Patch(cache)})
    res = cp.activation_patching(m, clean_ids, corrupt_ids, "head_out.*[head=*]",
                                 metric=cp.metrics.logit_diff(answer, distractor))
"""

from . import metrics
from .adapter import Adapter, AdapterError
from .cache import Cache
from .catalog import Axis, Catalog, SiteFamily, Sweep
from .engine import Bound, Run
from .interventions import (
    Add,
    ApplyContext,
    Intervention,
    Mean,
    Noise,
    Patch,
    ProjectOut,
    Resample,
    Scale,
    Zero,
    from_dict as intervention_from_dict,
)
from .methods import activation_patching
from .model import WrappedModel, wrap
from .results import Result
from .sites import Site, SiteError, Span

try:
    from importlib.metadata import version as _version

    __version__ = _version("crosspatch")
except Exception:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "Adapter", "AdapterError", "Add", "ApplyContext", "Axis", "Bound", "Cache", "Catalog", "Intervention",
    "Mean", "Noise", "Patch", "ProjectOut", "Resample", "Result", "Run", "Scale", "Site", "SiteError",
    "SiteFamily", "Span", "Sweep", "WrappedModel", "Zero", "activation_patching", "intervention_from_dict",
    "metrics", "wrap",
]
