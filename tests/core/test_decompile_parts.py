"""Parts of the decompiler against oracles: optimal ablation against its closed form where the loss is
quadratic in the constant, predicate matching on heads whose pattern is known (built, and compiled by
tracr), and the emitted interpreter's primitives."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.adapters.tracr import TracrAdapter, load
from crosspatch.methods.decompile import optimal_ablation
from crosspatch.methods.decompile.ablation import Batch, ablated_run
from crosspatch.methods.decompile.match import match_lookup, match_select
from crosspatch.methods.decompile.primitives import PREDICATES, interpreter
from crosspatch.methods.decompile.program import Lookup, Program, SelectAggregate

DATA = Path(__file__).resolve().parents[1] / "data" / "tracr"


def test_optimal_ablation_reaches_the_closed_form_and_beats_the_mean():
    # hist's MLP writes straight into the output (no later block), so with a squared loss on the output
    # the loss is quadratic in the constant c[p] replacing mlp_out.0: output = (r + c) U with r the rest
    # of the residual and U the unembedding. Per position the best c has c U = mean_n (y_n - r_n U).
    model = load(DATA, "hist")
    m = cp.wrap(model, TracrAdapter())
    rng = random.Random(0)
    seqs = [[rng.choice("abc") for _ in range(5)] for _ in range(64)]
    ids = model.encode(seqs)
    # the target is not the model's own output: the number of "a" tokens, as one-hot over 0..5
    y = torch.zeros(64, 6, 6)
    y[:, 1:] = torch.nn.functional.one_hot(torch.tensor([[s.count("a")] * 5 for s in seqs]), 6).float()

    def loss(out, target):
        return (out[:, 1:] - target[:, 1:]).pow(2).mean()

    fit = optimal_ablation(m, [Batch(ids, y)], "mlp_out.0", loss, steps=120, lr=0.1)
    rest = m.run(ids, capture=["resid_mid.0"]).cache["resid_mid.0"].double()  # r: the residual the MLP adds to
    U = model.unembed.matrix.double()
    t = (y.double() - rest @ U).mean(dim=0)  # [T, 6]: what c U must be
    c_star = torch.linalg.lstsq(U.T, t.T).solution.T  # [T, d] with c U = t (U has full column rank)
    with torch.no_grad():
        closed = float(loss(ablated_run(m, ids, {"mlp_out.0": c_star.float()}), y))
    assert torch.allclose(c_star @ U, t, atol=1e-6)
    assert closed == pytest.approx(float(((rest @ U + t - y.double())[:, 1:]).pow(2).mean()), abs=1e-6)
    assert fit.loss == pytest.approx(closed, abs=2e-4)
    assert fit.mean_loss > closed + 0.005  # mean ablation costs more (measured 0.1323 against 0.1210)
    assert torch.allclose((fit.constant.double() @ U)[1:], t[1:], atol=0.02)


def _uniform_rows(sel: list[list[bool]]) -> np.ndarray:
    a = np.array(sel, dtype=float)
    return a / a.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("predicate", [p for p in PREDICATES if p != "TRUE"])
@pytest.mark.parametrize("bos", ["default", "always"])
def test_a_built_pattern_is_matched_to_its_predicate(predicate, bos):
    fn = interpreter()
    rng = random.Random(1)
    seqs = [[rng.randrange(5) for _ in range(rng.randrange(3, 7))] for _ in range(60)]
    trace = {
        "tokens": [["BOS"] + s for s in seqs],
        "indices": [[None] + list(range(len(s))) for s in seqs],
        "noise": [[None] + [rng.randrange(5) for _ in s] for s in seqs],
    }
    # the head compares tokens (keys) with indices (queries); the pattern is uniform over the selection
    patterns = [_uniform_rows(fn["select"](t, i, predicate, bos)) for t, i in zip(trace["tokens"], trace["indices"])]
    keys, queries, pred, rule, fit = match_select(patterns, trace, ["noise", "tokens", "indices"])
    assert (keys, queries, pred, rule, fit) == ("tokens", "indices", predicate, bos, 1.0)


def test_compiled_heads_are_matched_to_the_predicates_tracr_compiled():
    # make_sort_unique: smaller = Select(keys, keys, LT) and SelectorWidth; make_reverse's last head
    # is Select(indices, opp_idx - 1, EQ); make_hist: Select(tokens, tokens, EQ) and SelectorWidth
    from crosspatch.methods.decompile.build import build_program
    from crosspatch.methods.decompile.subject import compiled_subject

    got = {}
    for name, kept in [("sort_unique", ["head_out.0[head=0]"]), ("hist", ["head_out.0[head=0]"])]:
        subject = compiled_subject(cp.wrap(load(DATA, name), TracrAdapter()))
        subject.output_var = None  # the head's variable is the output of this one-head program
        # sort_unique is defined on distinct tokens; hist needs repeats (on distinct tokens EQ on tokens
        # and EQ on indices select the same keys)
        make = itertools.permutations if name == "sort_unique" else lambda v, n: itertools.product(v, repeat=n)
        seqs = [list(p) for n in (3, 4, 5) for p in make(subject.vocab, n)][::3]
        program, _ = build_program(subject, seqs, kept)
        (op,) = program.operations
        assert op.pattern_fit > 0.999 and op.agreement == 1.0  # tracr's softmax is nearly hard
        got[name] = (op.keys, op.queries, op.predicate, op.bos, op.numerical, op.value_of)
    assert got["sort_unique"] == ("tokens", "tokens", "LT", "always", True, "BOS")
    assert got["hist"] == ("tokens", "tokens", "EQ", "always", True, "BOS")


def test_lookup_finds_the_smallest_inputs_and_fewest_entries():
    rng = random.Random(2)
    seqs = [[rng.randrange(3) for _ in range(5)] for _ in range(200)]
    trace = {
        "tokens": [["BOS"] + s for s in seqs],
        "indices": [[None] + list(range(5)) for _ in seqs],
        "wide": [[None] + [rng.randrange(50) for _ in range(5)] for _ in seqs],  # a near-unique key
    }
    trace["out"] = [[None] + [(t + i) % 3 for t, i in zip(s, range(5))] for s in seqs]
    op = match_lookup("mlp_out.0", trace, ["wide", "tokens", "indices"], "out", False)
    assert op.inputs == ("tokens", "indices") and op.agreement == 1.0 and len(op.table) == 15
    assert op.table[(2, 4)] == 0


def test_the_emitted_program_runs_its_primitives():
    # a hand-written program: reverse of the tokens through an opposite-index map and an EQ select
    ops = [
        Lookup("mlp", "opp", ("indices",), {(i,): 3 - i for i in range(4)}, numerical=False),
        SelectAggregate("head", "rev", keys="indices", queries="opp", predicate="EQ", bos="default", value="tokens",
                        numerical=False),
        SelectAggregate("head2", "frac", keys="indices", queries="indices", predicate="LEQ", bos="default",
                        value="tokens", value_of="a", numerical=True),
    ]
    prog = Program("hand", ops, "rev", numerical_output=False)
    assert prog.compiled()(list("abcd")) == list("dcba")
    assert Program("hand", ops, "frac", True).compiled()(list("abaa")) == [1.0, 0.5, 2 / 3, 0.75]
    assert "crosspatch" not in [line.split()[1] for line in prog.source().splitlines() if line.startswith("import ")]


def test_a_trained_style_head_is_read_by_what_it_copies():
    # a causal previous-token head: attention 0.7 on the previous position, 0.3 on the current one; it
    # writes a vector per copied token plus a per-position vector (which centring per position removes)
    from crosspatch.methods.decompile.match import match_head_codes

    rng = np.random.default_rng(3)
    token_vec, pos_vec = rng.normal(size=(2, 8)), rng.normal(size=(9, 8)) * 5
    seqs = [list(rng.integers(0, 2, size=8)) for _ in range(150)]
    trace = {"tokens": [["BOS"] + [int(t) for t in s] for s in seqs], "indices": [[None] + list(range(8)) for _ in seqs]}
    trace["indices-1"] = [[None] + [i - 1 for i in range(8)] for _ in seqs]
    patterns, vectors = [], []
    for s in seqs:
        a = np.zeros((9, 9))
        a[0, 0] = a[1, 0] = 1.0  # the first token has no previous one: the start position
        v = np.zeros((9, 8))
        for q in range(2, 9):
            a[q, q - 1], a[q, q] = 0.7, 0.3
            v[q] = token_vec[s[q - 2]] + pos_vec[q] + rng.normal(scale=0.01, size=8)
        v[1] = pos_vec[1]
        patterns.append(a)
        vectors.append(v)
    op, values = match_head_codes("head_out.0[head=0]", patterns, trace, ["tokens", "indices", "indices-1"], vectors,
                                  "prev", causal=True, query_only=["indices-1"])
    assert (op.keys, op.queries, op.predicate, op.bos, op.numerical, op.value) == ("indices", "indices-1", "EQ", "default",
                                                                                    False, "tokens")
    # 1 - TV is 0.7 on the 7 rows with a previous token, 1 on the first (all on the start position)
    assert op.agreement > 0.99 and op.pattern_fit == pytest.approx((7 * 0.7 + 1) / 8)
    assert values[0][1:] == [None] + [int(t) for t in seqs[0][:-1]]
