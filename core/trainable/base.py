"""Trainable interventions: ``nn.Module`` s that are also crosspatch :class:`Intervention` s.

A trainable intervention holds parameters (a rotation for DAS, mask logits for learned masks) and
is applied by the engine like any other intervention: ``apply(x, ctx)`` receives the selected
activation ``x`` of shape ``[rows, *selected axes]`` and an :class:`ApplyContext`. Run the model
with ``grad=True`` (``WrappedModel.run(..., grad=True)`` or ``engine.execute(..., grad=True)``) and
gradients flow into the intervention's parameters.

Serialisation keeps the full configuration next to the weights:

- ``to_dict()`` / ``from_dict()`` give ``{"kind", "config", "state"}`` (state = tensors on CPU),
  the form the intervention registry and :func:`crosspatch.interventions.from_dict` use;
- ``save(path)`` writes a folder with ``config.json`` and ``weights.safetensors`` (a
  :class:`~crosspatch.results.tensor_folder.TensorFolder`; folders holding ``weights.pt`` load too);
  :func:`load` reads it back onto the CPU, then moves it to ``device`` when one is given. Loading
  never assumes a GPU.

Subclasses implement :meth:`config` (the JSON-able constructor arguments) and ``apply``, and set
a unique ``kind``. They register with :func:`register` (and so become known to :func:`load` and
:func:`from_dict`); the built-in ones are offered to the plugin registry by :mod:`crosspatch.trainable.plugin`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from ..engine.interventions import ApplyContext, Intervention
from ..results.formats import FormatError, json_field, read_versioned
from ..results.tensor_folder import TensorFolder, load_tensors
from ..sites.site import SiteError

__all__ = [
    "TrainableIntervention", "register", "registered", "from_dict", "load", "source_rows",
    "FORMAT", "FORMAT_VERSION", "TRAINABLE_FOLDER",
]

logger = logging.getLogger(__name__)

FORMAT = "crosspatch.trainable"
FORMAT_VERSION = 1
#: ``weights`` in the config names the weights file: ``weights.safetensors`` (folders saved where safetensors was
#: missing hold ``weights.pt``, and load as well)
TRAINABLE_FOLDER = TensorFolder("config.json", "weights.safetensors", "a trainable intervention", sort_keys=True,
                                final_newline=True)
_TORCH = "weights.pt"

_REGISTRY: dict[str, type["TrainableIntervention"]] = {}


def register(cls: type["TrainableIntervention"]) -> type["TrainableIntervention"]:
    """Class decorator: make ``cls`` known to :func:`load` and :func:`from_dict` under ``cls.kind``."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} needs a non-empty `kind` to be registered")
    other = _REGISTRY.get(cls.kind)
    if other is not None and other is not cls:
        raise ValueError(f"intervention kind {cls.kind!r} is already registered by {other.__qualname__}")
    _REGISTRY[cls.kind] = cls
    return cls


def registered() -> dict[str, type["TrainableIntervention"]]:
    """Trainable intervention classes by kind: the plugin registry's (the built-in DAS and masks come
    from :mod:`crosspatch.trainable.plugin`) and every class registered with :func:`register`."""
    from ..plugins.registry import get_registry

    offered = {
        kind: cls for kind, cls in get_registry().interventions().items()
        if isinstance(cls, type) and issubclass(cls, TrainableIntervention)
    }
    return {**offered, **_REGISTRY}


class TrainableIntervention(nn.Module, Intervention):
    """Base class: an ``nn.Module`` with parameters that the engine applies as an intervention.

    ``source`` (inputs to run, or a :class:`~crosspatch.cache.Cache`) is where interchange
    interventions read their source activation from; it is run-time state, not configuration,
    and is neither saved nor serialised.
    """

    kind: ClassVar[str] = ""

    def __init__(self, source: Any = None):
        nn.Module.__init__(self)
        self.source = source

    # -- the engine's side -------------------------------------------------------------------

    @property
    def source_inputs(self) -> Any:
        return self.source

    def apply(self, x: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
        return self.apply(x, ctx)

    # -- configuration and state -------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The JSON-able keyword arguments that rebuild this intervention (without its weights)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return {"kind": self.kind, "config": self.config(), "state": state}

    @classmethod
    def from_dict(cls, data: Mapping) -> "TrainableIntervention":
        """Rebuild from :meth:`to_dict` (on the CPU). Called on the base class, it dispatches on ``kind``."""
        kind = data.get("kind", cls.kind)
        target = cls if cls.kind and cls.kind == kind else registered().get(kind)  # type: ignore[arg-type]
        if target is None:
            raise ValueError(
                f"unknown trainable intervention kind {kind!r}; known kinds: {', '.join(sorted(registered()))}"
            )
        module = target(**dict(data.get("config", {})))
        state = data.get("state")
        if state:
            module.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        return module

    @classmethod
    def _from_fields(cls, data: Mapping) -> "TrainableIntervention":
        # What crosspatch.interventions.from_dict calls once the class is in the plugin registry.
        return cls.from_dict({"kind": cls.kind, **data})

    def save(self, path: "str | Path") -> Path:
        """Write ``config.json`` and the weights into folder ``path`` (created); returns the folder."""
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "config": self.config(),
            "weights": TRAINABLE_FOLDER.weights,
        }
        folder = TRAINABLE_FOLDER.write(path, meta, self.state_dict())
        logger.debug("saved %s intervention to %s", self.kind, folder)
        return folder

    @classmethod
    def load(cls, path: "str | Path", device: "torch.device | str | None" = None) -> "TrainableIntervention":
        return load(path, device)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())


def load(path: "str | Path", device: "torch.device | str | None" = None) -> TrainableIntervention:
    """Read a folder written by :meth:`TrainableIntervention.save` onto the CPU, then ``.to(device)``.

    A malformed ``config.json`` is a FormatError naming the field; its ``weights`` must name a file
    inside the folder.
    """
    folder = Path(path)
    config_path, _ = TRAINABLE_FOLDER.require(folder, weights=False, hint="; it was not written by "
                                              "TrainableIntervention.save")
    meta = read_versioned(config_path, "a crosspatch trainable intervention", FORMAT, "format_version", FORMAT_VERSION)
    kind = json_field(meta, "kind", str, config_path)
    config = json_field(meta, "config", dict, config_path, {})
    weights = _weights_file(folder, json_field(meta, "weights", str, config_path, TRAINABLE_FOLDER.weights),
                            config_path)
    try:
        state = load_tensors(weights)
    except FileNotFoundError:
        raise FormatError(f"{config_path}: field 'weights' names {weights.name}, which is not in {folder}") from None
    except Exception as exc:
        raise FormatError(f"{weights} (field 'weights' of {config_path}) is not a weights file: {exc}") from None
    try:
        module = TrainableIntervention.from_dict({"kind": kind, "config": config, "state": state})
    except (TypeError, RuntimeError) as exc:  # constructor arguments or weights that do not fit the kind
        raise FormatError(f"{config_path}: field 'config' does not rebuild a {kind!r} intervention: {exc}") from None
    return module.to(device) if device is not None else module


def _weights_file(folder: Path, name: str, config_path: Path) -> Path:
    """The weights file a config names: a file inside ``folder`` (no absolute path, no ``..``, no link out)."""
    candidate = folder / name
    inside = folder.resolve()
    if Path(name).is_absolute() or ".." in Path(name).parts or inside not in candidate.resolve().parents:
        raise FormatError(
            f"{config_path}: field 'weights' is {name!r}, which points outside the folder; it names a file in it "
            f"({TRAINABLE_FOLDER.weights} or {_TORCH})"
        )
    return candidate


def from_dict(data: Mapping) -> TrainableIntervention:
    """Rebuild any registered trainable intervention from its :meth:`~TrainableIntervention.to_dict`."""
    return TrainableIntervention.from_dict(data)


def source_rows(kind: str, x: torch.Tensor, ctx: ApplyContext) -> torch.Tensor:
    """The source activation selected like ``x``, one row per target row (a single row is shared)."""
    src = ctx.select(ctx.require_source(kind))
    if src.shape[0] == x.shape[0]:
        return src
    if src.shape[0] == 1:
        return src.expand(x.shape[0], *src.shape[1:])
    raise SiteError(
        f"{kind} at {ctx.site}: the source has {src.shape[0]} rows but the target has {x.shape[0]}; "
        f"give a source with {x.shape[0]} rows (one per target row) or 1 (shared)"
    )
