"""From a pruned model to a program: read the variables each kept component writes, match it, chain them.

Components are visited in forward order; each layer's heads see the variables defined before the
layer, its MLP also those the heads wrote. A variable a component writes that an earlier kept
component already defined is not redefined (tracr's selector-width MLP also cleans its head's
scratch dimension); that is recorded in the program's notes.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch

from .match import Trace, evaluate, match_head, match_head_codes, match_lookup
from .program import Offset, Program
from .subject import Subject
from .variables import Layout

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


def collect_trace(subject: Subject, seqs: Sequence[Sequence[Any]], kept: Sequence[str]) -> tuple[dict, list[list[Any]], list[list[Any]]]:
    """Run ``seqs`` (grouped by length) capturing the embedding and, at every layer with a kept node,
    the residual after attention and after the MLP, the attention patterns and the head and MLP writes.
    Returns ``(captures, sequences, decoded outputs)``, one entry per sequence, in the order run."""
    m = subject.wrapped
    layers = sorted({_layer(n) for n in kept})
    fams = ("resid_mid", "resid_post", "attn_pattern", "head_out", "mlp_out") if subject.layout is not None else (
        "attn_pattern", "head_out")
    sites = (["embed"] if subject.layout is not None else []) + [f"{fam}.{L}" for L in layers for fam in fams]
    caps: dict[str, list[torch.Tensor]] = defaultdict(list)
    order: list[list[Any]] = []
    outputs: list[list[Any]] = []
    for _, group in group_by_length(seqs).items():
        run = m.run(subject.encode(group), capture=sites)
        for s in sites:
            caps[s].extend(run.cache[s].detach().float().cpu().unbind(0))
        order.extend(group)
        outputs.extend(subject.decode(run.output))
    return caps, order, outputs


def _decode(var, rows: list[torch.Tensor]) -> list[list[Any]]:
    return [var.decode(r.unsqueeze(0))[0] for r in rows]


def build_program(subject: Subject, seqs: Sequence[Sequence[Any]], kept: Sequence[str]) -> tuple[Program, Trace]:
    """Match every kept node on ``seqs`` and chain the matches into a :class:`Program`."""
    caps, order, outputs = collect_trace(subject, seqs, kept)
    trace: Trace = {
        "tokens": [["BOS"] + list(s) for s in order],
        "indices": [[None] + list(range(subject.index_start, subject.index_start + len(s))) for s in order],
    }
    notes: list[str] = []
    if subject.layout is not None:
        ops = _compiled_ops(subject, subject.layout, caps, kept, trace, notes)
        output = subject.output_var or (ops[-1].out if ops else "tokens")
    else:
        ops = _trained_ops(subject, caps, kept, trace, outputs, notes)
        output = ops[-1].out
    if output not in trace:
        notes.append(f"output variable {output} is written by no kept component")
    ops = _live(ops, output, notes)
    program = Program(subject.name, ops, output, subject.numerical, subject.index_start, subject.causal, notes)
    return program, trace


def _compiled_ops(subject: Subject, layout: Layout, caps: dict, kept: Sequence[str], trace: Trace, notes: list[str]) -> list:
    """Named subspaces: each kept node defines the variables it writes first, read from the residual after it."""
    _check_inputs(layout, caps["embed"], trace, notes)
    available = ["tokens", "indices"]
    ops: list = []
    for node in kept:
        L, h = _layer(node), _head(node)
        out_rows = [x[:, h] for x in caps[f"head_out.{L}"]] if h is not None else caps[f"mlp_out.{L}"]
        after = caps[f"resid_mid.{L}"] if h is not None else caps[f"resid_post.{L}"]
        written = layout.written(torch.cat([r.reshape(-1, r.shape[-1]) for r in out_rows]).unsqueeze(0))
        new = [w for w in written if w not in trace]
        notes.extend(f"{node} also writes {w}, defined earlier; not redefined" for w in written if w not in new)
        candidates = [v for v in reversed(available) if _defined_before(v, node, ops)]
        for name in new:
            var = layout.variables[name]
            trace[name] = _decode(var, after)
            if h is not None:
                patterns = [p[h].numpy() for p in caps[f"attn_pattern.{L}"]]
                ops.append(match_head(node, patterns, trace, candidates, name, var.numerical, causal=subject.causal))
            else:
                ops.append(match_lookup(node, trace, candidates, name, var.numerical))
        available.extend(new)
    return ops


_OFFSETS = (-1, -2, -3)


def _trained_ops(subject: Subject, caps: dict, kept: Sequence[str], trace: Trace, outputs: list[list[Any]],
                 notes: list[str]) -> list:
    """No named subspaces: each kept head defines one variable (its writes, clustered or projected), the
    MLPs and the unembedding together are read as one lookup table from those variables to the output."""
    offsets = {f"indices{o}": Offset("map", f"indices{o}", "indices", o) for o in _OFFSETS}
    for name, op in offsets.items():
        trace[name] = evaluate(op, trace)
    available = ["tokens", "indices"]
    ops: list = []
    mlps = [n for n in kept if _head(n) is None]
    if mlps:
        notes.append(f"MLPs {', '.join(mlps)} are kept; with the unembedding they are read as one lookup table (readout)")
    for node in kept:
        L, h = _layer(node), _head(node)
        if h is None:
            continue
        candidates = [v for v in reversed(available) if _defined_before(v, node, ops)] + list(offsets)
        name = f"head{L}_{h}"
        vectors = [x[:, h].numpy() for x in caps[f"head_out.{L}"]]
        patterns = [p[h].numpy() for p in caps[f"attn_pattern.{L}"]]
        op, values = match_head_codes(node, patterns, trace, candidates, vectors, name, causal=subject.causal,
                                      query_only=list(offsets))
        ops.extend(offsets[v] for v in op.reads if v in offsets and offsets[v] not in ops)
        trace[name] = values
        ops.append(op)
        available.append(name)
    trace["output"] = outputs
    node = f"readout ({', '.join(mlps + ['unembedding'])})"
    readout = match_lookup(node, trace, list(reversed(available)), "output", subject.numerical,
                           threshold=subject.readout_threshold)
    ops.append(readout)
    return ops


def _live(ops: list, output: str, notes: list[str]) -> list:
    """The operations the output depends on (dead ones are named in the notes and dropped)."""
    needed, keep = {output}, []
    for op in reversed(ops):
        if op.out in needed:
            keep.append(op)
            needed.update(op.reads)
        elif "head=" in op.node or op.node.startswith("mlp_out"):
            notes.append(f"{op.node} ({op.describe()}) is kept by pruning but the output does not read it")
    return keep[::-1]


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
