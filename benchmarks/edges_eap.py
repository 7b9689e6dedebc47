"""EAP's cost in forward-equivalents (process CPU time, 1 thread, against the bare forward in the same
process) at the bench geometry (GPT-2, 4 layers, 8 heads, d_model 256, 16 prompts) for both pair kinds
(differing in the middle token, and at the first position too), split into its phases, next to the
floor an exact EAP cannot go below here: a forward with gradients, the corrupt run's share of a forward
(the positions from the first differing one: half for the middle-token pair) and a backward to the
inputs alone (measured: the model's own backward with no parameter gradients).

    python benchmarks/edges_eap.py [--seq 16 32]
    python benchmarks/edges_eap.py --geometry 12 768 12 --seq 32 --prompts 4   # GPT-2 small's geometry
    python benchmarks/edges_eap.py --ab   # head_in slot gradients row by row against blocks of rows, alternated
    python benchmarks/edges_eap.py --before REV   # the working tree's EAP against revision REV's, alternated
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import gpt2_setup

import crosspatch.adapters.transformers.inputs as inputs
import crosspatch.adapters.transformers.slot_grad as slot_grad
import crosspatch.methods.edges.gradient_scores as scores
import crosspatch.methods.edges.patching as patching
from crosspatch.methods.edges import eap, edge_graph

PHASES = {  # what each timed function does inside eap
    "senders": "forward with gradients (taps at every receiver)",
    "capture_sharing_prefix": "corrupt forward",
    "_sender_diffs": "sender differences (with the corrupt forward)",
    "grad": "backward with the head_in scoring",
}


def _timed(acc: dict, obj, name: str):
    f = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t = time.process_time()
        try:
            return f(*args, **kwargs)
        finally:
            acc[name] = acc.get(name, 0.0) + time.process_time() - t

    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, f)


GEOMETRY = (4, 256, 8)  # layers, d_model, heads: the bench geometry (``--geometry`` changes it)


def _setup(seq: int, prompts: int):
    """The model at ``seq`` tokens, its edge graph and both pairs: ``{"middle": .., "first": ..}``."""
    layers, d_model, heads = GEOMETRY
    s = gpt2_setup(layers, d_model, seq, prompts, heads)
    unshared = s.corrupt.clone()
    unshared[:, 0] = (unshared[:, 0] + 1) % 1000
    return s, edge_graph(s.m), {"middle": s.corrupt, "first": unshared}


def _bare(s) -> float:
    """CPU seconds of one bare forward (the unit)."""
    t = time.process_time()
    with torch.inference_mode():
        s.model(s.clean, use_cache=False)
    return time.process_time() - t


def _row(seq: int, kind: str, cells: list[float]) -> str:
    return (f"| {seq} | differ at {'the middle token' if kind == 'middle' else 'position 1 too'} | "
            + " | ".join(f"{c:.2f}" for c in cells) + " |")


def _timed_eap(s, corrupt, g, phases, method=None) -> dict[str, float]:
    """One ``eap`` call's CPU seconds (``method``, by default ``eap``): ``total`` and each of ``phases``
    (``(object, function name)``)."""
    acc: dict[str, float] = {}
    undo = [_timed(acc, obj, name) for obj, name in phases]
    t = time.process_time()
    try:
        (method or eap)(s.m, s.clean, corrupt, s.metric, graph=g)
    finally:
        acc["total"] = time.process_time() - t
        for u in undo:
            u()
    return acc


def main() -> None:
    global GEOMETRY
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--geometry", type=int, nargs=3, default=list(GEOMETRY), metavar=("LAYERS", "D_MODEL", "HEADS"),
                        help="another GPT-2 geometry than the bench's 4 x 256 x 8 (GPT-2 small: 12 768 12)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ab", action="store_true", help="alternate the slot gradients made row by row and in blocks")
    parser.add_argument("--block-bytes", type=int, nargs="+", default=None,
                        help="with --ab: the block sizes to alternate with row by row (default: slot_grad.BLOCK_BYTES)")
    parser.add_argument("--before", metavar="REV", help="alternate the working tree's EAP with git revision REV's")
    args = parser.parse_args()
    GEOMETRY = tuple(args.geometry)
    torch.set_num_threads(1)
    if args.ab:
        return ab(args)
    if args.before:
        return before(args)
    print("| T | pair | EAP | forward w/ grad | corrupt forward | sender diffs | backward + scoring | "
          "input backward alone | floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq in args.seq:
        s, g, pairs = _setup(seq, args.prompts)
        emb = s.model.transformer.wte(s.clean).detach()

        def backward_only() -> float:
            e = emb.clone().requires_grad_(True)
            out = s.model(inputs_embeds=e, use_cache=False).logits[:, -1, :2].sum()
            t = time.process_time()
            torch.autograd.grad(out, [e])
            return time.process_time() - t

        for _ in range(2):
            eap(s.m, s.clean, s.corrupt, s.metric, graph=g)
        times: dict[str, list[float]] = {"bare": [], "backward": []}
        phases: dict[str, dict[str, float]] = {"middle": {}, "first": {}}
        for _ in range(args.repeats):
            times["bare"].append(_bare(s))
            times["backward"].append(backward_only())
            for kind, corrupt in pairs.items():
                acc = _timed_eap(s, corrupt, g, [(patching.EdgePatcher, "senders"), (patching, "capture_sharing_prefix"),
                                                 (scores, "_sender_diffs"), (torch.autograd, "grad")])
                for k, v in acc.items():
                    phases[kind].setdefault(k, []).append(v)
        b = statistics.median(times["bare"])
        med = {k: statistics.median(v) / b for k, v in times.items()}
        for kind in ("middle", "first"):
            p = {k: statistics.median(v) / b for k, v in phases[kind].items()}
            corrupt = (seq - seq // 2) / seq if kind == "middle" else 1.0  # the positions it must compute
            floor = 1.0 + corrupt + med["backward"]
            print(f"| {seq} | differ at {'the middle token' if kind == 'middle' else 'position 1 too'} | "
                  f"**{p['total']:.2f}** | {p['senders']:.2f} | {p['capture_sharing_prefix']:.2f} | "
                  f"{p['_sender_diffs'] - p['capture_sharing_prefix']:.2f} | {p['grad']:.2f} | {med['backward']:.2f} | "
                  f"{floor:.2f} |")


def ab(args) -> None:
    """EAP and its backward in forward-equivalents, alternated in one process (medians): "before" makes the
    head_in slot gradients one prompt row at a time (``BLOCK_BYTES = 0``) and adds a zero term to each
    projection's output for their gradient (``carry=False``); then blocks of rows of each ``--block-bytes``
    (default ``slot_grad.BLOCK_BYTES``; a block never exceeds ``slot_grad.BLOCK_POSITIONS`` positions) with the
    zero term, the last size with the output carrying the gradient itself, and that with each block scored by one
    matmul (the current code)."""
    default = slot_grad.BLOCK_BYTES
    made = inputs.slot_gradient

    def zero_term(slots, x, norm, weight, output, bias, sink=None, where=(0, 1), carry=False):
        return output + made(slots, x, norm, weight, output, bias, sink, where)

    sizes = args.block_bytes or [default]
    ways = ([("before", 0, zero_term, False)] + [(f"{size >> 10} KiB", size, zero_term, False) for size in sizes]
            + [(f"{sizes[-1] >> 10} KiB, carried", sizes[-1], made, False),
               (f"{sizes[-1] >> 10} KiB, carried, scored per block", sizes[-1], made, True)])
    print("| T | pair | " + " | ".join(f"EAP, {w}" for w, *_ in ways) + " | "
          + " | ".join(f"backward + scoring, {w}" for w, *_ in ways) + " | "
          + " | ".join(f"forward w/ grad, {w}" for w, *_ in ways) + " |")
    print("|---|---|" + "---|" * (3 * len(ways)))
    for seq in args.seq:
        s, g, pairs = _setup(seq, args.prompts)
        for _ in range(2):
            eap(s.m, s.clean, pairs["first"], s.metric, graph=g)
        bare: list[float] = []
        res: dict[tuple[str, str], dict[str, list[float]]] = {}
        for _ in range(args.repeats):
            bare.append(_bare(s))
            for kind, corrupt in pairs.items():
                for way, size, fn, per_block in ways:
                    slot_grad.BLOCK_BYTES, inputs.slot_gradient = size, fn
                    scores._SlotScores.takes_row_blocks = per_block
                    acc = _timed_eap(s, corrupt, g, [(torch.autograd, "grad"), (patching.EdgePatcher, "senders")])
                    for k, v in acc.items():
                        res.setdefault((kind, way), {}).setdefault(k, []).append(v)
        slot_grad.BLOCK_BYTES, inputs.slot_gradient = default, made
        scores._SlotScores.takes_row_blocks = True
        b = statistics.median(bare)
        for kind in ("middle", "first"):
            m = {w: {k: statistics.median(v) / b for k, v in res[(kind, w)].items()} for w, *_ in ways}
            print(_row(seq, kind, [m[w][k] for k in ("total", "grad", "senders") for w, *_ in ways]), flush=True)


# The modules EAP's cost depends on, in import order (a later one imports from an earlier one), with their files.
MODULES = {
    "crosspatch.engine.output_positions": "core/engine/output_positions.py",
    "crosspatch.adapters.transformers.slot_grad": "adapters/transformers/slot_grad.py",
    "crosspatch.adapters.transformers.inputs": "adapters/transformers/inputs.py",
    "crosspatch.methods.edges.graph": "core/methods/edges/graph.py",
    "crosspatch.methods.edges.patching": "core/methods/edges/patching.py",
    "crosspatch.methods.edges.gradient_scores": "core/methods/edges/gradient_scores.py",
}
ADAPTER = "adapters/transformers/adapter.py"  # of which TransformersAdapter.output_at


def _namespaces(rev: str | None) -> dict:
    """Each of ``MODULES``' namespaces as at git revision ``rev`` (None: as imported), and the adapter's
    ``output_at``: the revision's source run in a copy of the module's namespace, each module seeing the
    revision's versions of those before it. The working tree's stay in place."""
    root = Path(__file__).resolve().parent.parent
    from crosspatch.adapters.transformers.adapter import TransformersAdapter

    def source(path: str) -> str:
        return subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], capture_output=True, text=True,
                              check=True).stdout

    mods = {name: importlib.import_module(name) for name in MODULES}
    current = {name: dict(mod.__dict__) for name, mod in mods.items()}
    if rev is None:
        return {**current, "output_at": TransformersAdapter.output_at}
    out = {}
    try:
        for name, path in MODULES.items():
            space = dict(current[name])
            exec(compile(source(path), f"{mods[name].__file__}@{rev}", "exec"), space)
            out[name] = space
            _use({name: space})  # the next modules import from this one
    finally:
        _use(current)
    adapter = dict(sys.modules[TransformersAdapter.__module__].__dict__)
    exec(compile(source(ADAPTER), f"adapter.py@{rev}", "exec"), adapter)
    out["output_at"] = adapter["TransformersAdapter"].output_at
    return out


def _use(spaces: dict) -> None:
    """Put ``spaces`` (from :func:`_namespaces`) in place: functions look their globals up at call time."""
    for name, space in spaces.items():
        if name == "output_at":
            from crosspatch.adapters.transformers.adapter import TransformersAdapter

            TransformersAdapter.output_at = space
            continue
        mod = sys.modules[name]
        mod.__dict__.clear()
        mod.__dict__.update(space)


class _In:
    """A namespace's dict as attributes, for :func:`_timed`: a revision's functions look their globals up in the
    namespace they were run in (:func:`_namespaces`), not in the module."""

    def __init__(self, space: dict):
        object.__setattr__(self, "space", space)

    def __getattr__(self, name: str):
        return self.space[name]

    def __setattr__(self, name: str, value) -> None:
        self.space[name] = value


def before(args) -> None:
    """EAP in forward-equivalents, the working tree's against revision ``--before``'s, alternated in one process
    (each round: a bare forward, then every pair kind with each version; medians): the total, the forward with
    gradients, the backward (with the head_in scoring) and the sender differences (without the corrupt run)."""
    variants = {args.before: _namespaces(args.before), "now": _namespaces(None)}
    print(f"| T | pair | EAP, {args.before} | EAP, now | forward w/ grad, {args.before} | now | "
          f"backward + scoring, {args.before} | now | sender diffs, {args.before} | now |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        for seq in args.seq:
            s, g, pairs = _setup(seq, args.prompts)
            for spaces in variants.values():
                _use(spaces)
                for corrupt in pairs.values():
                    sys.modules["crosspatch.methods.edges.gradient_scores"].eap(s.m, s.clean, corrupt, s.metric, graph=g)
            bare: list[float] = []
            res: dict[tuple[str, str], dict[str, list[float]]] = {}
            for _ in range(args.repeats):
                bare.append(_bare(s))
                for kind, corrupt in pairs.items():
                    for name, spaces in variants.items():
                        _use(spaces)
                        patcher = sys.modules["crosspatch.methods.edges.patching"].EdgePatcher
                        method = sys.modules["crosspatch.methods.edges.gradient_scores"].eap
                        acc = _timed_eap(s, corrupt, g, [(torch.autograd, "grad"), (patcher, "senders"),
                                                         (_In(patcher.__init__.__globals__), "capture_sharing_prefix"),
                                                         (_In(method.__globals__), "_sender_diffs")], method)
                        acc["diffs"] = acc["_sender_diffs"] - acc["capture_sharing_prefix"]
                        for k, v in acc.items():
                            res.setdefault((kind, name), {}).setdefault(k, []).append(v)
            b = statistics.median(bare)
            for kind in pairs:
                m = {w: {k: statistics.median(v) / b for k, v in res[(kind, w)].items()} for w in variants}
                print(_row(seq, kind, [m[w][k] for k in ("total", "senders", "grad", "diffs") for w in variants]), flush=True)
    finally:
        _use(variants["now"])


if __name__ == "__main__":
    main()
