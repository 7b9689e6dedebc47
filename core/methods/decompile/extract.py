"""``extract_program``: prune under optimal ablation, match what is left, emit Python, verify it.

    from crosspatch.methods.decompile import extract_program
    report = extract_program(tracr_model, out="report/")     # or a zoo name, or a wrapped transformer
    report.verification.equivalent, report.program_text

Pipeline: (1) fit inputs: a seeded sample of the input space (at most ``fit_inputs`` sequences,
spread over the lengths); (2) :func:`.ablation.prune_nodes` over every head output and MLP output;
(3) :func:`.build.build_program` matches each kept component; (4) the emitted source is executed
and compared with the network on every input of the lengths (:func:`.verify.verify`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .ablation import Batch, PrunedGraph, prune_nodes
from .build import build_program, group_by_length
from .program import Program
from .subject import Subject, compiled_subject, model_nodes
from .verify import Verification, enumerate_inputs, verify

__all__ = ["DecompileReport", "extract_program", "fit_inputs", "subject_of"]

logger = logging.getLogger(__name__)


@dataclass
class DecompileReport:
    """What :func:`extract_program` found: the program (object and text), the pruned graph and the verification."""

    name: str
    program: Program
    program_text: str
    graph: PrunedGraph
    verification: Verification
    fit: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def decompiles(self) -> bool:
        """The emitted program equals the network on every verified input whose output the network
        defines (all of them, except where a compiled model's categorical output is empty or a mixture:
        ``verification.equivalent`` is the strict form)."""
        return self.verification.equivalent_where_defined

    def to_dict(self) -> dict[str, Any]:
        ops = [{"node": op.node, "out": op.out, "primitive": op.describe(), "reads": list(op.reads),
                "agreement": op.agreement, **({"pattern_fit": op.pattern_fit} if hasattr(op, "pattern_fit") else {})}
               for op in self.program.operations]
        return {"name": self.name, "decompiles": self.decompiles, "verification": self.verification.to_dict(),
                "graph": self.graph.to_dict(), "operations": ops, "notes": self.program.notes, "fit": self.fit}


def subject_of(source: Any, task: str | None = None) -> Subject:
    """A :class:`Subject` for a zoo name, a tracr-compiled module or a wrapped model."""
    import crosspatch as cp

    if isinstance(source, Subject):
        return source
    from ...zoo.store import Loaded

    if isinstance(source, (str, Loaded)):
        from .trained import trained_subject

        return trained_subject(source, task)
    wrapped = source if hasattr(source, "catalog") and hasattr(source, "module") else cp.wrap(source)
    meta = getattr(wrapped.module, "meta", None)
    if isinstance(meta, dict) and "residual_labels" in meta:
        return compiled_subject(wrapped)
    from .trained import trained_subject

    return trained_subject(wrapped, task)


def fit_inputs(subject: Subject, n: int, seed: int = 0) -> list[list[Any]]:
    """At most ``n`` sequences, as evenly over the lengths as the input space allows (seeded). A causal
    model's outputs on a sequence are its outputs on every prefix, so only the longest length is drawn."""
    rng = random.Random(seed)
    lengths = subject.lengths[-1:] if subject.causal else subject.lengths
    per = max(1, n // len(lengths))
    out: list[list[Any]] = []
    for length in lengths:
        total = len(subject.vocab) ** length
        if total <= per:
            out.extend(enumerate_inputs(subject.vocab, [length])[0])
        else:
            seen: set[tuple] = set()
            while len(seen) < per:
                seen.add(tuple(rng.choice(subject.vocab) for _ in range(length)))
            out.extend(list(s) for s in sorted(seen, key=repr))
    return out


def _batches(subject: Subject, seqs: Sequence[Sequence[Any]]) -> list[Batch]:
    out = []
    for _, group in group_by_length(seqs).items():
        ids = subject.encode(group)
        with torch.inference_mode():
            target = subject.target(subject.wrapped.run(ids).output)
        out.append(Batch(ids, target.clone()))
    return out


def extract_program(source: Any, task: str | None = None, out: "str | Path | None" = None, *,
                    progress: bool | None = None, fit_size: int = 512, min_accuracy: float | None = None,
                    ablation_steps: int = 40, verify_limit: int = 200_000, seed: int = 0) -> DecompileReport:
    """Decompile ``source`` into a RASP-like Python program verified against it.

    ``source``: a zoo name (a transformer trained here on an algorithmic task) or that zoo model already
    loaded (``zoo.load(name)``), a tracr-compiled model
    or any wrapped transformer; ``task``: the algorithmic task giving the ground truth (a zoo entry
    knows its own). ``out``: a folder for ``program.py``, ``verification.json`` and ``graph.png``.
    """
    subject = subject_of(source, task)
    min_accuracy = subject.min_accuracy if min_accuracy is None else min_accuracy
    seqs = fit_inputs(subject, fit_size, seed)
    batches = _batches(subject, seqs)
    graph = prune_nodes(subject.wrapped, batches, model_nodes(subject.wrapped), subject.loss, subject.accuracy,
                        min_accuracy=min_accuracy, steps=ablation_steps, progress=progress)
    program, _ = build_program(subject, seqs, graph.kept)
    program.notes.extend(subject.notes)
    text = program.source()
    verification = verify(subject, program, limit=verify_limit)
    report = DecompileReport(subject.name, program, text, graph, verification,
                             {"fit_sequences": len(seqs), "ablation_steps": ablation_steps, "min_accuracy": min_accuracy})
    if out is not None:
        report.files = write_report(report, Path(out))
    logger.info("%s: %d of %d inputs equal (%s)", subject.name, verification.model_sequences, verification.sequences,
                "decompiles" if report.decompiles else "does not decompile")
    return report


def write_report(report: DecompileReport, folder: Path) -> dict[str, str]:
    """``program.py``, ``verification.json`` and ``graph.png`` into ``folder``."""
    from .plot import plot_graph

    folder.mkdir(parents=True, exist_ok=True)
    files = {"program": folder / "program.py", "verification": folder / "verification.json", "graph": folder / "graph.png"}
    files["program"].write_text(report.program_text)
    files["verification"].write_text(json.dumps(report.to_dict(), indent=2, default=repr))
    plot_graph(report.program, report.graph, files["graph"], title=f"{report.name}: kept components and the variables they pass")
    return {k: str(v) for k, v in files.items()}
