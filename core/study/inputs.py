"""The inputs and the metric a study names: prompts for a model with a tokenizer, or two images for
a VAE or a CLIP-style model (:mod:`crosspatch.study.images`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..results import metrics as _metrics
from ..results.metrics import Metric
from .images import image_inputs, image_metric
from .spec import IMAGE_METRICS, Study, StudyError

__all__ = ["StudyInputs", "seed_everything", "study_inputs", "study_metric"]


@dataclass
class StudyInputs:
    """Token ids (or texts) of the clean and corrupt prompts, the answers, and a description."""

    clean: Any
    corrupt: Any
    answer: Any
    distractor: Any
    labels: list[str]  # one short label per prompt (the clean text)
    description: str


def study_inputs(study: Study, m: Any) -> StudyInputs:
    """A task's pairs (drawn with the study's seed), the prompts of the file, or the two images."""
    spec = study.inputs
    if spec.has_images:
        pair = image_inputs(study, m)
        return StudyInputs(pair.clean, pair.corrupt, None, None, [pair.label], pair.description)
    if m.tokenizer is None:
        raise StudyError(f"model {study.model!r} has no tokenizer, and a study's prompts are text")
    if spec.clean is not None:
        lengths = {len(m.to_str_tokens(t)) for t in [*spec.clean, *spec.corrupt]}
        if len(lengths) != 1:
            raise StudyError(f"the study's prompts tokenize to different lengths {sorted(lengths)}; patching pairs "
                             f"them position by position, so give prompts of one length")
        return StudyInputs(list(spec.clean), list(spec.corrupt), spec.answer, spec.distractor, list(spec.clean),
                           f"{len(spec.clean)} prompt pair(s), e.g. {spec.clean[0]!r} vs {spec.corrupt[0]!r}")
    from ..zoo.tasks import get_task
    from ..zoo.tasks.base import tokenize_pairs

    if spec.task is None:
        raise StudyError("[inputs] names no task and no prompts; give task = \"ioi\" or clean/corrupt lists")
    task = get_task(spec.task)
    pairs = task.pairs(spec.n, seed=study.seed, split=spec.split)
    data = tokenize_pairs(pairs, m.tokenizer)
    first = data.pairs[0]
    return StudyInputs(data.clean, data.corrupt, data.answer, data.distractor, [p.clean for p in data.pairs],
                       f"{len(data)} pairs of task {spec.task!r} ({spec.split} split, seed {study.seed}), e.g. "
                       f"{first.clean!r} vs {first.corrupt!r}")


def study_metric(name: str, inputs: StudyInputs, m: Any) -> Metric:
    """The named metric with the study's answers as token ids (an image metric toward image B)."""
    if name in IMAGE_METRICS:
        return image_metric(name, m, inputs.clean)
    if name == "kl":
        return _metrics.kl_to_clean()
    if inputs.answer is None:
        raise StudyError(f"metric {name!r} needs the answer token: [inputs] answer = \" Mary\"")
    if name == "probability":
        metric = _metrics.probability(inputs.answer)
    else:
        if inputs.distractor is None:
            raise StudyError("metric 'logit_diff' needs a distractor: [inputs] distractor = \" John\"")
        metric = _metrics.logit_diff(inputs.answer, inputs.distractor)
    return metric.resolve(m.token_id) if isinstance(inputs.answer, (str, list)) and metric.needs_tokens else metric


def seed_everything(seed: int) -> None:
    """torch's global generator, for anything a method draws (resample ablations)."""
    torch.manual_seed(seed)
