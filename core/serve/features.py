"""SAE and transcoder features on the page: pick a dictionary and a feature, steer with its decoder
direction, see where it fires on the current prompt.

A *dictionary* is a loaded :class:`~crosspatch.trainable.sae.SAE` or
:class:`~crosspatch.trainable.transcoder.Transcoder`. Feature ``f`` of source ``i`` reads
``reads`` (the SAE's site, the transcoder's ``input_sites[i]``) and writes its decoder row where the
dictionary writes: the SAE's own site, the transcoder's ``output_sites[j]`` for every output ``j``
source ``i`` writes (one for a per-layer transcoder, every later layer for a cross-layer one).
Steering with the feature is ``Add(decoder row, alpha)`` at each of those sites, sent to the page as
the interventions' ``to_dict`` JSON and sent back by the slider with a new ``alpha``: what the
feature would add at activation ``alpha``.

Dictionaries come from the zoo (``<model>-transcoders`` entries already built for the served
model), from folders given when the server starts, or from a folder the page names (an SAE folder
with ``cfg.json``, a transcoder folder with ``transcoder.json``, or a zoo transcoder entry's folder).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Dictionary", "feature_request", "load_dictionary", "zoo_dictionaries"]

logger = logging.getLogger(__name__)

TOP_FEATURES = 12


@dataclass
class Dictionary:
    """One SAE or transcoder the page can pick, by ``name``."""

    name: str
    module: Any  # SAE or Transcoder
    kind: str  # "sae" or "transcoder"

    @property
    def n_features(self) -> int:
        return int(self.module.d_sae if self.kind == "sae" else self.module.n_features)

    def sources(self) -> list[dict[str, Any]]:
        """Per source: the site it reads and the sites its decoder writes."""
        if self.kind == "sae":
            return [{"index": 0, "reads": self.module.site, "writes": [self.module.site]}]
        tc = self.module
        return [{"index": i, "reads": tc.input_sites[i], "writes": [tc.output_sites[j] for j in tc.outputs_of(i)]}
                for i in range(tc.n)]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "n_features": self.n_features, "sources": self.sources()}

    def check(self, source: Any, feature: Any) -> tuple[int, int]:
        n_sources = len(self.sources())
        if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source < n_sources:
            raise ValueError(f"source must be an index 0 .. {n_sources - 1} of {self.name}, got {source!r}")
        if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < self.n_features:
            raise ValueError(f"feature must be an index 0 .. {self.n_features - 1} of {self.name}, got {feature!r}")
        return source, feature

    def decoder_rows(self, source: int, feature: int) -> list[tuple[str, torch.Tensor]]:
        """``(site, vector)`` for each site feature ``feature`` of ``source`` writes: its decoder row there."""
        source, feature = self.check(source, feature)
        with torch.no_grad():
            if self.kind == "sae":
                if self.module.site is None:
                    raise ValueError(f"{self.name} does not know the site it reads; load it with load_sae(path, site=...)")
                one = torch.zeros(self.n_features, dtype=self.module.W_dec.dtype)
                one[feature] = 1.0
                return [(self.module.site, self.module.write(one).detach())]
            tc = self.module
            return [(tc.output_sites[j], tc.decoder(source, j)[feature].detach()) for j in tc.outputs_of(source)]

    def activations(self, model: Any, prompt: str, source: int) -> torch.Tensor:
        """``[pos, n_features]``: every feature of ``source`` at each token of ``prompt``."""
        reads = self.sources()[source]["reads"]
        if reads is None:
            raise ValueError(f"{self.name} does not know the site it reads")
        if self.kind == "transcoder" and self.module.normalized_input:
            raise ValueError(f"{self.name} reads the MLP's normalised input; the page shows features of "
                             f"transcoders that read the site itself")
        with torch.inference_mode():
            x = model.capture(prompt, [reads])[reads][0]
            if x.ndim != 2:
                raise ValueError(f"{reads} is {tuple(x.shape)} per prompt; the page shows features of [pos, d] sites")
            if self.kind == "sae":
                return self.module.encode(x).double()
            return self.module.encode(source, x).double()


def load_dictionary(path: "str | Path", name: str | None = None) -> Dictionary:
    """An SAE folder (``cfg.json``), a transcoder folder (``transcoder.json``), or a zoo transcoder
    entry's folder (holding ``transcoder/``), as a :class:`Dictionary`."""
    from ..trainable.sae import SAE_CFG, load_sae
    from ..trainable.transcoder import TRANSCODER_CFG, load_transcoder

    path = Path(path).expanduser()
    label = name or str(path)
    if (path / TRANSCODER_CFG).is_file():
        return Dictionary(label, load_transcoder(path), "transcoder")
    if (path / "transcoder" / TRANSCODER_CFG).is_file():
        return Dictionary(label, load_transcoder(path / "transcoder"), "transcoder")
    if (path / SAE_CFG).is_file():
        return Dictionary(label, load_sae(path), "sae")
    raise ValueError(f"{path} is neither an SAE folder ({SAE_CFG}) nor a transcoder folder ({TRANSCODER_CFG})")


def zoo_dictionaries(model_name: str) -> list[Dictionary]:
    """The zoo's transcoders of ``model_name`` that are built already (none is trained here: that takes minutes)."""
    from ..zoo import store

    out = []
    for name, spec in store.models().items():
        if name != f"{model_name}-transcoders":
            continue
        try:
            if store.cached(name):
                out.append(Dictionary(name, store.load(name).model, "transcoder"))
        except Exception:  # a broken cache entry: the page simply does not offer it
            logger.debug("zoo dictionary %s not loaded", name, exc_info=True)
    return out


def feature_request(dictionary: Dictionary, model: Any, source: int, feature: int, prompt: str | None,
                    token_strings: list[str] | None) -> dict[str, Any]:
    """The steering interventions of one feature (``alpha`` 1), and where it fires on ``prompt``."""
    rows = dictionary.decoder_rows(source, feature)
    out: dict[str, Any] = {
        "dictionary": dictionary.name, "source": source, "feature": feature,
        "interventions": [{"site": site, "intervention": {"kind": "add", "vector": v.double().tolist(), "alpha": 1.0}}
                          for site, v in rows],
        "norm": float(torch.stack([v.double() for _, v in rows]).norm()),
    }
    if prompt:
        acts = dictionary.activations(model, prompt, source)
        tokens = token_strings or [str(i) for i in range(acts.shape[0])]
        column = acts[:, feature]
        order = torch.argsort(column, descending=True, stable=True)
        out["tokens"] = [{"pos": int(p), "token": tokens[int(p)], "activation": float(column[p])} for p in order]
        peak = acts.max(dim=0)
        top = torch.argsort(peak.values, descending=True, stable=True)[:TOP_FEATURES]
        out["active"] = [{"feature": int(f), "activation": float(peak.values[f]), "pos": int(peak.indices[f]),
                          "token": tokens[int(peak.indices[f])]} for f in top if peak.values[f] > 0]
    return out
