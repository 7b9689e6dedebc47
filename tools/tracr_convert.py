"""Compile RASP programs with tracr and export them for crosspatch's tracr adapter (run ONCE, needs jax).

Runs in a separate environment, not crosspatch's::

    python3 -m venv /tmp/tracr-venv
    /tmp/tracr-venv/bin/pip install tracr-pypi numpy        # brings jax, dm-haiku (tested: tracr-pypi 1.0.0,
                                                            # jax/jaxlib 0.10.2, dm-haiku 0.0.17, numpy 2.4.6)
    /tmp/tracr-venv/bin/python tools/tracr_convert.py [--out tests/data/tracr]

For every program it writes ``<program>.npz`` (float32 weights: token and position embeddings, per layer
the attention Q/K/V/O weights and biases and the MLP W1/b1/W2/b2, the unembedding projection) and
``<program>.json`` (config, input/output encodings, residual labels, the ground-truth circuit and reference
input/output pairs computed by the compiled tracr model itself).

Ground truth (see docs/tracr.md): nodes are the non-empty blocks of the compiled model (each attention
head / MLP the compiler allocated for a RASP expression). An edge ``s -> r`` exists when ``s`` writes into a
residual direction that ``r`` reads: the non-zero output columns of ``s`` (embedding rows, W_O, W2) intersect
the non-zero input rows of ``r`` (W_Q, W_K, W_V per head and role, W1, the unembedding). This is
cross-checked against the RASP graph: every dependency between RASP expressions must appear as an edge.
Needs no crosspatch; this script may print.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import numpy as np

from tracr.compiler import (
    basis_inference,
    craft_graph_to_model,
    craft_model_to_transformer,
    expr_to_craft_graph,
    lib,
    nodes,
    rasp_to_graph,
)
from tracr.compiler.compiling import COMPILER_BOS, COMPILER_PAD
from tracr.craft import bases
from tracr.rasp import rasp

MAX_SEQ_LEN = 5


def programs():
    """name -> (program, vocab, reference inputs (lists of values, without BOS))."""
    abc = ["a", "b", "c"]
    allseq = lambda vocab, n: [list(s) for s in itertools.product(vocab, repeat=n)]
    reverse_in = allseq(abc, 5) + allseq(abc, 3)
    frac_in = allseq(["x", "y"], 5) + allseq(["x", "y"], 4)
    sort_in = [list(p) for p in itertools.permutations([1, 2, 3, 4, 5])] + [list(p) for p in itertools.permutations([1, 3, 5, 2], 3)]
    hist_in = allseq(abc, 5) + allseq(abc, 4)
    return {
        "reverse": (lib.make_reverse(rasp.tokens), set(abc), reverse_in),
        "frac_prevs": (lib.make_frac_prevs(rasp.tokens == "x"), {"x", "y"}, frac_in),
        "sort_unique": (lib.make_sort_unique(rasp.tokens, rasp.tokens), {1, 2, 3, 4, 5}, sort_in),
        "hist": (lib.make_hist(), set(abc), hist_in),
    }


def compile_program(program, vocab, max_seq_len):
    """compiling.compile_rasp_to_model, step by step, keeping the graph and the craft model."""
    extracted = rasp_to_graph.extract_rasp_graph(program)
    graph, sources, sink = extracted.graph, extracted.sources, extracted.sink
    basis_inference.infer_bases(graph, sink, vocab, max_seq_len)
    expr_to_craft_graph.add_craft_components_to_rasp_graph(
        graph, bos_dir=bases.BasisDirection(rasp.tokens.label, COMPILER_BOS), mlp_exactness=100
    )
    craft_model = craft_graph_to_model.craft_graph_to_model(graph, sources)
    assembled = craft_model_to_transformer.craft_model_to_transformer(
        craft_model=craft_model, graph=graph, sink=sink, max_seq_len=max_seq_len,
        causal=False, compiler_bos=COMPILER_BOS, compiler_pad=COMPILER_PAD,
    )
    return graph, sink, craft_model, assembled


def jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    return v


def export(name, program, vocab, inputs, out_dir: Path):
    graph, sink, craft_model, model = compile_program(program, vocab, MAX_SEQ_LEN)
    cfg = model.model_config
    p = {k: {kk: np.asarray(vv, dtype=np.float32) for kk, vv in v.items()} for k, v in model.params.items()}
    L, H, dk = cfg.num_layers, cfg.num_heads, cfg.key_size
    labels = list(model.residual_labels)
    d = len(labels)
    categorical = isinstance(model.output_encoder, type(model.input_encoder)) and hasattr(model.output_encoder, "encoding_map")
    out_space = sink[nodes.OUTPUT_BASIS]
    out_labels = [str(b) for b in out_space]
    unembed = np.zeros((d, len(out_labels)), dtype=np.float32)
    for j, lab in enumerate(out_labels):
        unembed[labels.index(lab), j] = 1.0

    arrays = {
        "token_embed": p["token_embed"]["embeddings"],
        "pos_embed": p["pos_embed"]["embeddings"],
        "unembed": unembed,
    }
    for l in range(L):
        a, m = f"transformer/layer_{l}/attn", f"transformer/layer_{l}/mlp"
        for role in ("query", "key", "value", "linear"):
            arrays[f"{l}.{role}.w"] = p[f"{a}/{role}"]["w"]
            arrays[f"{l}.{role}.b"] = p[f"{a}/{role}"]["b"]
        for lin in ("linear_1", "linear_2"):
            arrays[f"{l}.{lin}.w"] = p[f"{m}/{lin}"]["w"]
            arrays[f"{l}.{lin}.b"] = p[f"{m}/{lin}"]["b"]

    # --- ground truth from the weights: non-zero residual directions written / read ---
    nz_cols = lambda w: set(np.flatnonzero(np.abs(w).sum(axis=0) > 0).tolist())
    nz_rows = lambda w: set(np.flatnonzero(np.abs(w).sum(axis=1) > 0).tolist())
    writes = {"embed": nz_cols(arrays["token_embed"]) | nz_cols(arrays["pos_embed"])}
    reads: dict[str, set] = {}
    senders = ["embed"]
    receivers_order = []
    for l in range(L):
        q, k, v, o = (arrays[f"{l}.{r}.w"] for r in ("query", "key", "value", "linear"))
        for h in range(H):
            cols = slice(h * dk, (h + 1) * dk)
            written = nz_cols(o[cols]) if nz_rows(v[:, cols]) else set()
            qr, kr, vr = nz_rows(q[:, cols]), nz_rows(k[:, cols]), nz_rows(v[:, cols])
            if written and vr:  # a live head (tracr pads layers with all-zero heads)
                for role, rd in enumerate((qr, kr, vr)):
                    reads[f"head_in.{l}[qkv={role},head={h}]"] = rd
                    receivers_order.append(f"head_in.{l}[qkv={role},head={h}]")
                writes[f"head_out.{l}[head={h}]"] = written
                senders.append(f"head_out.{l}[head={h}]")
        w1, w2, b2 = arrays[f"{l}.linear_1.w"], arrays[f"{l}.linear_2.w"], arrays[f"{l}.linear_2.b"]
        written = nz_cols(w2) | set(np.flatnonzero(b2).tolist())
        if written:
            reads[f"mlp_in.{l}"] = nz_rows(w1)
            receivers_order.append(f"mlp_in.{l}")
            writes[f"mlp_out.{l}"] = written
            senders.append(f"mlp_out.{l}")
    reads["logits_in"] = nz_rows(unembed)
    receivers_order.append("logits_in")

    edges = []
    for r in receivers_order:
        for s in senders:
            if not _before(s, r):
                continue
            shared = writes[s] & reads[r]
            if shared:
                edges.append({"edge": f"{s}->{r}", "dirs": sorted({labels[i] for i in shared})})

    # --- which RASP expression each node computes (by the residual directions it writes) ---
    node_exprs = {}
    for s in senders:
        node_exprs[s] = sorted({labels[i].split(":")[0] for i in writes[s]})

    # --- cross-check with the RASP graph: every SOp dependency must be an edge of some role ---
    label_writer: dict[str, list[str]] = {}
    for s in senders:
        for lab in node_exprs[s]:
            label_writer.setdefault(lab, []).append(s)
    edge_set = {e["edge"] for e in edges}
    sender_of_receiver = lambda r: (r.replace("head_in", "head_out").split("[qkv=")[0] + "[head=" + r.split("head=")[1]) if r.startswith("head_in") else r.replace("mlp_in", "mlp_out")

    def sop_inputs(node_id):
        """The SOps a RASP expression reads, looking through selectors."""
        out = set()
        for pred in graph.predecessors(node_id):
            expr = graph.nodes[pred][nodes.EXPR]
            if isinstance(expr, rasp.Selector):
                out |= sop_inputs(pred)
            else:
                out.add(pred)
        return out

    checked, missing = [], []
    for node_id in graph.nodes:
        expr = graph.nodes[node_id][nodes.EXPR]
        if isinstance(expr, rasp.Selector) or node_id in (rasp.tokens.label, rasp.indices.label):
            continue
        writers = label_writer.get(node_id, [])
        for src in sop_inputs(node_id):
            src_writers = ["embed"] if src in (rasp.tokens.label, rasp.indices.label) else label_writer.get(src, [])
            # the block(s) computing node_id must read src from (one of) src's writers
            ok = any(
                f"{sw}->{r}" in edge_set
                for sw in src_writers
                for r in reads
                if sender_of_receiver(r) in writers
            )
            (checked if ok else missing).append(f"{src}->{node_id}")
    assert not missing, f"{name}: RASP dependencies without an edge: {missing}"

    # --- reference input/output pairs from the compiled tracr model ---
    enc = model.input_encoder
    refs = []
    for seq in inputs:
        out = model.apply([COMPILER_BOS, *seq])
        unemb = np.asarray(out.unembedded)[0]
        refs.append({
            "ids": [int(i) for i in enc.encode([COMPILER_BOS, *seq])],
            "tokens": [jsonable(t) for t in seq],
            "output": [int(x) for x in unemb] if categorical else [float(x) for x in unemb],
            "decoded": [jsonable(x) for x in out.decoded],
        })

    meta = {
        "program": name,
        "tracr": "tracr-pypi 1.0.0",
        "max_seq_len": MAX_SEQ_LEN,
        "config": {"n_layers": L, "n_heads": H, "key_size": dk, "mlp_hidden": cfg.mlp_hidden_size, "d_model": d,
                   "causal": bool(cfg.causal), "layer_norm": bool(cfg.layer_norm), "activation": "relu"},
        "residual_labels": labels,
        "input_encoding": [[jsonable(k), int(v)] for k, v in enc.encoding_map.items()],
        "bos": COMPILER_BOS,
        "pad": COMPILER_PAD,
        "categorical_output": bool(categorical),
        "output_labels": out_labels,
        "output_values": [jsonable(b.value) for b in out_space],
        "circuit": {
            "nodes": {s: node_exprs[s] for s in senders},
            "receivers": receivers_order,
            "edges": [e["edge"] for e in edges],
            "edge_directions": {e["edge"]: e["dirs"] for e in edges},
            "rasp_dependencies_checked": checked,
            "rasp_graph": sorted(f"{a}->{b}" for a, b in graph.edges),
        },
        "reference": refs,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / f"{name}.npz", **arrays)
    (out_dir / f"{name}.json").write_text(json.dumps(meta, separators=(",", ":")))
    print(f"{name}: {L} layers x {H} heads, d_model {d}, {len(senders) - 1} live blocks, {len(edges)} true edges, "
          f"{len(refs)} reference pairs, npz {os.path.getsize(out_dir / f'{name}.npz')} B, "
          f"json {os.path.getsize(out_dir / f'{name}.json')} B")


def _before(s: str, r: str) -> bool:
    """Whether sender ``s`` feeds receiver ``r`` in crosspatch's edge graph (attention before MLP in a layer)."""
    if s == "embed" or r == "logits_in":
        return True
    layer = lambda n: int(n.split(".", 1)[1].split("[")[0])
    ls, lr = layer(s), layer(r)
    if ls != lr:
        return ls < lr
    return s.startswith("head_out") and r.startswith("mlp_in")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "tests" / "data" / "tracr"))
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    for name, (program, vocab, inputs) in programs().items():
        if args.only and name not in args.only:
            continue
        export(name, program, vocab, inputs, Path(args.out))


if __name__ == "__main__":
    main()
