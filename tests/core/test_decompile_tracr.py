"""Decompiling the tracr-compiled programs: the emitted Python equals the compiled model on every input
of the exported lengths (1..5), equals a hand-written RASP reference, and keeps exactly the components
the compiler wrote. hist runs by default; frac_prevs, reverse and sort_unique with CROSSPATCH_SLOW=1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import crosspatch as cp
from crosspatch.adapters.tracr import TracrAdapter, load
from crosspatch.methods.decompile import extract_program
from crosspatch.methods.decompile.verify import enumerate_inputs

DATA = Path(__file__).resolve().parents[1] / "data" / "tracr"
SLOW = bool(os.environ.get("CROSSPATCH_SLOW"))


def _reverse(s):
    return list(reversed(s))


def _hist(s):
    return [s.count(t) for t in s]


def _frac_prevs(s):
    return [sum(t == "x" for t in s[: i + 1]) / (i + 1) for i in range(len(s))]


def _sort_unique(s):
    # RASP semantics of make_sort_unique: position i holds the key with exactly i smaller keys; a
    # position no key lands on (duplicates) is None
    out = []
    for i in range(len(s)):
        hit = {t for t in s if sum(u < t for u in s) == i}
        out.append(hit.pop() if len(hit) == 1 else None)
    return out


REFERENCE = {"reverse": _reverse, "hist": _hist, "frac_prevs": _frac_prevs, "sort_unique": _sort_unique}
PROGRAMS = ["hist"] + (["frac_prevs", "reverse", "sort_unique"] if SLOW else [])


@pytest.fixture(scope="module", params=PROGRAMS)
def decompiled(request, tmp_path_factory):
    model = load(DATA, request.param)
    out = tmp_path_factory.mktemp(request.param)
    report = extract_program(cp.wrap(model, TracrAdapter()), out=out, progress=False, ablation_steps=10)
    return request.param, model, report, out


def test_program_equals_the_compiled_model_on_every_input(decompiled):
    name, model, report, _ = decompiled
    v = report.verification
    n_vocab = len([t for t, _ in model.meta["input_encoding"]]) - 2
    assert v.sequences == sum(n_vocab**n for n in range(1, 6))  # every input of lengths 1..5
    assert v.program_errors == 0
    if name == "sort_unique":
        # duplicates leave positions no key lands on; the compiled model's output there is empty or a
        # mixture (not defined), the program says None. Where the model defines its output, all equal.
        assert v.equivalent_where_defined
        assert v.defined_sequences == 5 + 20 + 60 + 120 + 120  # exactly the inputs with distinct tokens
    else:
        assert v.equivalent, v.first_mismatch


def test_program_equals_the_rasp_reference(decompiled):
    name, model, report, _ = decompiled
    program = report.program.compiled()
    vocab = [t for t, _ in model.meta["input_encoding"] if t not in (model.meta["bos"], model.meta["pad"])]
    seqs, _ = enumerate_inputs(vocab, range(1, 6))
    for s in seqs:
        got, want = program(s), REFERENCE[name](s)
        if name == "frac_prevs":
            assert got == pytest.approx(want, abs=1e-3)
        else:
            assert got == want, s


def test_keeps_the_components_the_compiler_wrote(decompiled):
    name, model, report, _ = decompiled
    written = {n for n in model.meta["circuit"]["nodes"] if n != "embed"}
    assert set(report.graph.kept) == written
    assert report.graph.pruned_accuracy == 1.0
    assert all(report.graph.scores[n] > 1e-3 for n in report.graph.kept)


def test_emitted_file_runs_without_crosspatch(decompiled):
    name, model, report, out = decompiled
    path = Path(report.files["program"])
    assert path.read_text() == report.program_text and "crosspatch import" not in "".join(
        line for line in report.program_text.splitlines() if line.startswith(("import", "from")))
    assert {"program", "verification", "graph"} <= set(report.files) and Path(report.files["graph"]).stat().st_size > 0
    seq = ["x", "y", "x"] if name == "frac_prevs" else ["a", "c", "a"]
    code = f"import runpy; print(runpy.run_path({str(path)!r})['program']({seq!r}))"
    # -S: no site-packages, so crosspatch (and everything else installed) cannot be imported
    done = subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(report.program.compiled()(seq))
