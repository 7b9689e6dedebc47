"""From a pruned model to a program: read the variables each kept component writes, match it, chain them.

Components are visited in forward order; each layer's heads see the variables defined before the
layer, its MLP also those the heads wrote. A variable a component writes that an earlier kept
component already defined is not redefined (tracr's selector-width MLP also cleans its head's
scratch dimension); that is recorded in the program's notes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch

from .match import Trace, match_head, match_lookup
from .program import Program
from .subject import Subject
from .variables import Layout, cluster_codes

__all__ = ["build_program", "collect_trace", "group_by_length"]


def group_by_length(seqs: Sequence[Sequence[Any]]) -> dict[int, list[list[Any]]]:
    groups: dict[int, list[list[Any]]] = defaultdict(list)
    for s in seqs:
        groups[len(s)].append(list(s))
    return dict(sorted(groups.items()))


def _layer(node: str) -> int:
    return int(node.split(".")[1].split("[")[0])


def _head(node: str) -> int | None:
    return int(node.split("head=")[1].rstrip("]")) if "head=" in node else None


def collect_trace(subject: Subject, seqs: Sequence[Sequence[Any]], kept: Sequence[str]) -> tuple[dict, dict, list[list[Any]]]:
    """Run ``seqs`` and capture, per kept node, its output and (heads) its attention pattern, plus the
    residual after it. Returns ``(captures, patterns, order)`` with one entry per sequence in ``order``."""
    m = subject.wrapped
    layers = sorted({_layer(n) for n in kept})
    sites = ["embed"] + [f"{fam}.{L}" for L in layers for fam in ("resid_mid", "resid_post", "attn_pattern", "head_out", "mlp_out")]
    if subject.layout is None:
        sites = ["embed"] + [f"{fam}.{L}" for L in layers for fam in ("attn_pattern", "head_out", "mlp_out")]
    caps: dict[str, list[torch.Tensor]] = defaultdict(list)
    order: list[list[Any]] = []
    for _, group in group_by_length(seqs).items():
        run = m.run(subject.encode(group), capture=sites)
        for s in sites:
            caps[s].extend(run.cache[s].detach().float().cpu().unbind(0))
        order.extend(group)
    return caps, {}, order


def _decode(var, rows: list[torch.Tensor]) -> list[list[Any]]:
    return [var.decode(r.unsqueeze(0))[0] for r in rows]


def build_program(subject: Subject, seqs: Sequence[Sequence[Any]], kept: Sequence[str], *,
                  relabel: bool = False) -> tuple[Program, Trace]:
    """Match every kept node on ``seqs`` and chain the matches into a :class:`Program`."""
    caps, _, order = collect_trace(subject, seqs, kept)
    layout = subject.layout
    trace: Trace = {}
    notes: list[str] = []
    trace["tokens"] = [["BOS"] + list(s) for s in order]
    trace["indices"] = [[None] + list(range(subject.index_start, subject.index_start + len(s))) for s in order]
    available = ["tokens", "indices"]
    if layout is not None:
        _check_inputs(layout, caps["embed"], trace, notes)
    ops = []
    for node in kept:
        L, h = _layer(node), _head(node)
        if h is not None:
            out_rows = [x[:, h] for x in caps[f"head_out.{L}"]]
            after = caps.get(f"resid_mid.{L}")
        else:
            out_rows = caps[f"mlp_out.{L}"]
            after = caps.get(f"resid_post.{L}")
        if layout is not None:
            written = layout.written(torch.cat([r.reshape(-1, r.shape[-1]) for r in out_rows]).unsqueeze(0))
            new = [w for w in written if w not in trace and w not in ("tokens", "indices")]
            for w in written:
                if w in trace and w not in new:
                    notes.append(f"{node} also writes {w}, defined earlier; not redefined")
            defs = [(w, layout.variables[w].numerical, _decode(layout.variables[w], after)) for w in new]
        else:
            codes, _ = cluster_codes(np.concatenate([r.reshape(-1, r.shape[-1]).numpy() for r in out_rows]))
            values, start = [], 0
            for r in out_rows:
                values.append([None] + [int(c) for c in codes[start + 1: start + r.shape[0]]])
                start += r.shape[0]
            name = node.replace(".", "_").replace("[head=", "_h").rstrip("]")
            defs = [(name, False, values)]
        # heads of one layer read only what was defined before the layer
        candidates = [v for v in reversed(available) if _defined_before(v, node, ops)]
        for name, numerical, values in defs:
            trace[name] = values
            if h is not None:
                patterns = [p[h].numpy() for p in caps[f"attn_pattern.{L}"]]
                op = match_head(node, patterns, trace, candidates, name, numerical, causal=subject.causal, relabel=relabel)
            else:
                op = match_lookup(node, trace, candidates, name, numerical)
            ops.append(op)
        available.extend(name for name, _, _ in defs)
    output = subject.output_var if subject.output_var is not None else (ops[-1].out if ops else "tokens")
    if output not in trace:
        notes.append(f"output variable {output} is written by no kept component")
    program = Program(subject.name, ops, output, subject.numerical, subject.index_start, subject.causal, notes)
    return program, trace


def _defined_before(var: str, node: str, ops: list) -> bool:
    """A head at layer L reads variables written before layer L (not by another head of layer L)."""
    if "head=" not in node:
        return True
    for op in ops:
        if op.out == var and "head=" in op.node and _layer(op.node) == _layer(node):
            return False
    return True


def _check_inputs(layout: Layout, embeds: list[torch.Tensor], trace: Trace, notes: list[str]) -> None:
    """The embedding's ``tokens`` and ``indices`` must be what the program assumes."""
    for name in ("tokens", "indices"):
        if name not in layout.variables:
            continue
        decoded = _decode(layout.variables[name], embeds)
        if decoded != trace[name]:
            notes.append(f"the embedding's {name} differ from the program's inputs (first: {decoded[0]} vs {trace[name][0]})")
