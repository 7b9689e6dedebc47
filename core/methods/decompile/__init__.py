"""Decompiling transformers into RASP-like Python: prune causally, match parts to primitives, emit code.

    from crosspatch.methods.decompile import extract_program
    report = extract_program(model, out="report/")   # a tracr model, a zoo name or a wrapped transformer
    report.decompiles, report.verification.model_accuracy, print(report.program_text)

Modules: ``ablation`` (optimal ablation, node pruning), ``variables`` (named residual subspaces,
clustering), ``match`` (Select/Aggregate and lookup matching), ``primitives`` (the interpreter the
emitted file carries), ``program`` (the program and its source), ``build`` (kept components to a
program), ``verify``, ``extract`` (the pipeline), ``trained`` (small transformers trained on the
algorithmic tasks), ``plot``, ``zoo`` (their zoo entries). See docs/decompile.md.
"""

from .ablation import AblationFit, PrunedGraph, optimal_ablation, prune_nodes
from .extract import DecompileReport, extract_program
from .program import Lookup, Program, SelectAggregate

__all__ = ["AblationFit", "DecompileReport", "Lookup", "Program", "PrunedGraph", "SelectAggregate", "extract_program",
           "optimal_ablation", "prune_nodes"]
