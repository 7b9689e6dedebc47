"""The methods a study file can name, each as ``run(m, inputs, metric, analysis, seed) -> Result``.

``activation_patching`` takes ``per_prompt = true`` to keep every prompt's effect (a ``prompt`` dim
whose mean is the batch value; normalised by the batch's clean-corrupt gap, so the mean equals
the normalised batch result); ``attention`` captures every head's pattern on one prompt
(``options.prompt``, default 0) as a ``(layer, head, pos, key_pos)`` Result with token labels.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..methods.activation_patching import activation_patching
from ..methods.attribution import attribution_patching
from ..methods.edges import acdc, eap, eap_ig
from ..methods.faithfulness import faithfulness_table
from ..methods.pairs import label_positions
from ..results.result import Result, collect_versions
from .inputs import StudyInputs, study_metric
from .spec import Analysis, StudyError

__all__ = ["METHODS", "IMAGE_METHODS", "attention_patterns", "run_analysis"]

#: The methods a study of two images can name.
IMAGE_METHODS = ("activation_patching", "attribution_patching")


def run_analysis(m: Any, inputs: StudyInputs, metric_name: str, analysis: Analysis, seed: int) -> Result:
    """Run one analysis of a study; a method it does not know, or a bad option, is a StudyError."""
    method = METHODS.get(analysis.method)
    if method is None:
        raise StudyError(f"analysis {analysis.name!r}: unknown method {analysis.method!r}; methods: "
                         f"{', '.join(sorted(METHODS))}")
    if isinstance(inputs.clean, dict) and analysis.method not in IMAGE_METHODS:
        raise StudyError(f"analysis {analysis.name!r}: a study of images runs {', '.join(IMAGE_METHODS)}, not "
                         f"{analysis.method!r}")
    torch.manual_seed(seed)
    try:
        result = method(m, inputs, metric_name, analysis, seed)
    except TypeError as exc:  # an option the method does not take
        raise StudyError(f"analysis {analysis.name!r} ({analysis.method}): {exc}") from None
    result.metadata.setdefault("seed", seed)
    if result.metadata.get("seed") is None:
        result.metadata["seed"] = seed
    return result


def _sites(analysis: Analysis) -> Any:
    if analysis.sites is None:
        raise StudyError(f"analysis {analysis.name!r} ({analysis.method}) needs sites = \"...\" (e.g. "
                         f"\"head_out.*[head=*]\")")
    return analysis.sites


def _patching(m, inputs, metric_name, analysis, seed):
    options = dict(analysis.options)
    if not options.pop("per_prompt", False):
        return activation_patching(m, inputs.clean, inputs.corrupt, _sites(analysis),
                                   study_metric(metric_name, inputs, m), **options)
    normalize = options.pop("normalize", False)
    rows = []
    for i in range(len(inputs.labels)):
        one = _prompt(inputs, i)
        rows.append(activation_patching(m, one.clean, one.corrupt, _sites(analysis), study_metric(metric_name, one, m),
                                        normalize=False, **options))
    clean = float(np.mean([r.metadata["baseline"]["clean"] for r in rows]))
    corrupt = float(np.mean([r.metadata["baseline"]["corrupt"] for r in rows]))
    values = np.stack([r.values for r in rows])
    if normalize:
        values = values / (clean - corrupt)
    first = rows[0]
    skipped = np.stack([r.skipped for r in rows]) if first.skipped is not None else None
    meta = {**first.metadata, "normalize": normalize, "n_prompts": len(rows), "per_prompt": True,
            "baseline": {"clean": clean, "corrupt": corrupt}}
    return Result(values, ("prompt", *first.dims), {"prompt": inputs.labels, **first.coords}, meta, skipped)


def _prompt(inputs: StudyInputs, i: int) -> StudyInputs:
    def one(value):
        if isinstance(value, torch.Tensor):
            return value[i:i + 1]
        if isinstance(value, list):
            return value[i:i + 1] if len(value) == len(inputs.labels) else value
        return value

    return StudyInputs(one(inputs.clean), one(inputs.corrupt), one(inputs.answer), one(inputs.distractor),
                       [inputs.labels[i]], inputs.description)


def _attribution(m, inputs, metric_name, analysis, seed):
    return attribution_patching(m, inputs.clean, inputs.corrupt, _sites(analysis),
                                study_metric(metric_name, inputs, m), **analysis.options)


def _edges(method: Callable) -> Callable:
    def run(m, inputs, metric_name, analysis, seed):
        return method(m, inputs.clean, inputs.corrupt, study_metric(metric_name, inputs, m), **analysis.options)

    return run


def _faithfulness(m, inputs, metric_name, analysis, seed):
    options = dict(analysis.options)
    circuit = options.pop("circuit", None)
    if circuit is None:
        raise StudyError(f"analysis {analysis.name!r} (faithfulness_table) needs options.circuit: the sites kept, "
                         f"e.g. [\"head_out.1[head=0]\"]; sites names the candidates")
    options.setdefault("seed", seed)
    return faithfulness_table(m, inputs.clean, circuit, _sites(analysis), study_metric(metric_name, inputs, m),
                              **options)


def _attention(m, inputs, metric_name, analysis, seed):
    options = dict(analysis.options)
    row = options.pop("prompt", 0)
    if options:
        raise StudyError(f"analysis {analysis.name!r} (attention) takes only options.prompt, got {sorted(options)}")
    if not 0 <= row < len(inputs.labels):
        raise StudyError(f"analysis {analysis.name!r}: options.prompt = {row}, but there are {len(inputs.labels)} "
                         f"prompts")
    clean = inputs.clean[row:row + 1]
    return attention_patterns(m, clean, family=analysis.sites or "attn_pattern")


def attention_patterns(m: Any, inputs: Any, family: str = "attn_pattern") -> Result:
    """Every head's attention pattern on one prompt: dims ``(layer, head, pos, key_pos)``, positions
    labelled with the prompt's tokens."""
    fam = m.catalog.family(family)
    prepared = m.prepare(inputs)
    run = m.run(prepared, capture=[f"{family}.*"])
    layers = list(range(fam.layers or 0))
    values = torch.stack([run.cache[f"{family}.{layer}"][0] for layer in layers]).double()
    coords = label_positions({"pos": list(range(values.shape[-2])), "key_pos": list(range(values.shape[-1]))},
                             m.position_labels(prepared))
    meta = {"method": "attention", "sites": f"{family}.*", "model": m.describe(), "adapter": m.adapter.name,
            "versions": collect_versions()}
    return Result(values, ("layer", "head", "pos", "key_pos"), {"layer": layers, **coords}, meta)


METHODS: dict[str, Callable[..., Result]] = {
    "activation_patching": _patching,
    "attribution_patching": _attribution,
    "eap": _edges(eap),
    "eap_ig": _edges(eap_ig),
    "acdc": _edges(acdc),
    "faithfulness_table": _faithfulness,
    "attention": _attention,
}
