"""Run a study into a report folder, and check a folder by running its study again.

The folder holds what :func:`~crosspatch.results.report.write_report` writes (``index.html``,
``explorer.html``, a JSON, CSV and PNG per result) plus ``study.toml`` (the study, normalised, so it
runs as it is) and ``study.json``: the SHA-256 of every result file, the library versions and torch's
thread count (a reduction may split differently over another number of threads). :func:`check_study`
reruns ``study.toml`` with that thread count into a temporary folder and compares the digests: equal
digests are equal results, bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..results.report import file_stems, write_report
from ..results.result import collect_versions
from .analyses import run_analysis
from .inputs import seed_everything, study_inputs
from .spec import Study, StudyError, load_study

__all__ = ["run_study", "check_study", "Check", "STUDY_FILE", "RECORD_FILE"]

logger = logging.getLogger(__name__)

STUDY_FILE = "study.toml"
RECORD_FILE = "study.json"
RECORD_FORMAT = "crosspatch.study-run"
DEFAULT_OUTPUT = "crosspatch-out"


@dataclass
class Check:
    """What a rerun found: the result files whose digests differ (empty when it reproduces)."""

    folder: Path
    compared: list[str]
    differing: list[str]

    @property
    def ok(self) -> bool:
        return not self.differing


def run_study(
    study: "Study | str | Path",
    out: "str | Path | None" = None,
    *,
    on_progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Run every analysis of ``study`` (a Study or a study file) and write the report folder.

    ``out`` overrides the study's ``output`` (default ``crosspatch-out``). ``on_progress(done, total,
    name)`` is called before each analysis and once at the end.
    """
    if not isinstance(study, Study):
        study = load_study(study)
    folder = Path(out if out is not None else (study.output or DEFAULT_OUTPUT))
    from ..zoo.sources import wrap

    seed_everything(study.seed)
    dtype = getattr(torch, study.dtype) if study.dtype else None
    m = wrap(study.model, seed=study.model_seed, dtype=dtype)
    inputs = study_inputs(study, m)
    results = {}
    total = len(study.analyses)
    for i, analysis in enumerate(study.analyses):
        if on_progress:
            on_progress(i, total, analysis.name)
        logger.info("study: %s (%s)", analysis.name, analysis.method)
        results[analysis.name] = run_analysis(m, inputs, study.metric, analysis, study.seed)
    if on_progress:
        on_progress(total, total, "")
    context = {"model": study.model, "inputs": inputs.description, "metric": study.metric, "seed": study.seed,
               "study": STUDY_FILE, "versions": collect_versions()}
    title = study.title or f"Study of {Path(study.model).name}"
    write_report(results, folder, title=title, context=context, pictures=study.pictures)
    saved = dataclasses.replace(study, output=None)
    (folder / STUDY_FILE).write_text(saved.to_toml(), encoding="utf-8")
    record = {
        "format": RECORD_FORMAT, "version": 1, "study": saved.to_dict(),
        "results": {name: {"file": f"{stem}.json", "sha256": _digest(folder / f"{stem}.json")}
                    for name, stem in file_stems(list(results)).items()},
        "versions": collect_versions(), "torch_threads": torch.get_num_threads(),
    }
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return folder


def check_study(folder: str | Path) -> Check:
    """Run the study of a report folder again (same thread count) and compare every result's digest."""
    folder = Path(folder)
    record_path = folder / RECORD_FILE
    if not record_path.is_file():
        raise StudyError(f"{folder} has no {RECORD_FILE}: it was not written by a study run")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if record.get("format") != RECORD_FORMAT:
        raise StudyError(f"{record_path} is not a study record (format {record.get('format')!r})")
    study = load_study(folder / STUDY_FILE)
    threads = torch.get_num_threads()
    torch.set_num_threads(int(record.get("torch_threads", threads)))
    try:
        with tempfile.TemporaryDirectory(prefix="crosspatch-check-") as tmp:
            rerun = run_study(study, Path(tmp) / "rerun")
            fresh = json.loads((rerun / RECORD_FILE).read_text(encoding="utf-8"))["results"]
    finally:
        torch.set_num_threads(threads)
    saved = record["results"]
    differing = sorted(
        name for name, entry in saved.items()
        if fresh.get(name) != entry or not (folder / entry["file"]).is_file()
        or _digest(folder / entry["file"]) != entry["sha256"]
    )
    return Check(folder, sorted(saved), differing)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
