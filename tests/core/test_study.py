"""Study files: TOML read and written back, a run into a report folder, and a rerun that reproduces
every result bit for bit (``crosspatch run --check``), on a tiny GPT-2 checkpoint folder."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")

from crosspatch import Result
from crosspatch.cli import app as cli
from crosspatch.study import Analysis, Inputs, Study, StudyError, load_study
from crosspatch.study.spec import parse_study

STUDY = """
title = "IOI on a tiny GPT-2"
model = "ckpt"
metric = "logit_diff"
seed = 3
pictures = false

[inputs]
task = "ioi"
n = 3

[[analysis]]
name = "resid pre"
method = "activation_patching"
sites = "resid_pre.*[pos=*]"
options = { normalize = true, per_prompt = true }

[[analysis]]
name = "heads"
method = "activation_patching"
sites = "head_out.*[head=*]"
options = { normalize = true }

[[analysis]]
name = "attention"
method = "attention"

[[analysis]]
name = "edges"
method = "eap"

[[analysis]]
name = "faithfulness"
method = "faithfulness_table"
sites = "head_out.*[head=*]"
options = { circuit = ["head_out.1[head=0]"], ablations = ["zero", "resample"] }
"""


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    from fake_zoo import build

    root = tmp_path_factory.mktemp("study")
    build(root / "ckpt", types.SimpleNamespace(seed=0))
    (root / "study.toml").write_text(STUDY)
    return root


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_run_twice_gives_the_same_bits_and_check_says_so(study_dir, capsys):
    first, second = study_dir / "first", study_dir / "second"
    for out in (first, second):
        code, stdout, err = _run(["run", study_dir / "study.toml", "--out", out], capsys)
        assert code == 0, err
        assert stdout.strip() == str(out.resolve())
    record = json.loads((first / "study.json").read_text())
    assert sorted(record["results"]) == ["attention", "edges", "faithfulness", "heads", "resid pre"]
    for entry in record["results"].values():
        assert (first / entry["file"]).read_bytes() == (second / entry["file"]).read_bytes()
    assert (first / "study.toml").read_text() == (second / "study.toml").read_text()
    names = {p.name for p in first.iterdir()}
    assert {"index.html", "explorer.html", "heads.json", "resid_pre.json"} <= names and "heads.png" not in names

    code, stdout, err = _run(["run", first, "--check"], capsys)
    assert code == 0, err
    assert stdout.startswith("reproduced 5 result(s) bit for bit")

    # One changed bit in a saved result is found.
    saved = Result.load(first / "heads.json")
    saved.values[0, 0] = np.nextafter(saved.values[0, 0], np.inf)
    saved.save(first / "heads.json")
    code, stdout, err = _run(["run", first, "--check"], capsys)
    assert code == 1 and "1 of 5 result(s) differ from the saved ones: heads" in err


def test_saved_study_is_normalised_and_reads_back(study_dir):
    original = load_study(study_dir / "study.toml")
    assert original.model == str((study_dir / "ckpt").resolve())  # relative to the file
    assert original.inputs == Inputs(task="ioi", n=3)
    assert original.analyses[0] == Analysis("resid pre", "activation_patching", "resid_pre.*[pos=*]",
                                            {"normalize": True, "per_prompt": True})
    import tomllib

    assert parse_study(tomllib.loads(original.to_toml())) == original
    odd = Study("m", [Analysis("a", "eap", ["x", "y"], {"q": 'say "hi"\n', "f": 0.1, "t": {"k": [1, 2]}})],
                Inputs(clean=["a b"], corrupt=["c d"], answer=" b"), title="ü")
    assert parse_study(tomllib.loads(odd.to_toml())) == odd


def test_per_prompt_mean_is_the_batch_result(study_dir):
    from crosspatch.study.analyses import run_analysis
    from crosspatch.study.inputs import study_inputs
    from crosspatch.zoo.sources import wrap

    import torch

    study = load_study(study_dir / "study.toml")
    m = wrap(study.model, dtype=torch.float64)  # float64: batched and one-prompt forwards agree to rounding
    inputs = study_inputs(study, m)
    sites = "head_out.*[head=*]"
    per = run_analysis(m, inputs, "logit_diff", Analysis("p", "activation_patching", sites,
                                                         {"normalize": True, "per_prompt": True}), 0)
    batch = run_analysis(m, inputs, "logit_diff", Analysis("b", "activation_patching", sites, {"normalize": True}), 0)
    assert per.dims == ("prompt", "layer", "head") and per.values.shape[0] == 3
    np.testing.assert_allclose(per.values.mean(axis=0), batch.values, rtol=1e-9, atol=1e-12)
    assert per.metadata["baseline"] == pytest.approx(batch.metadata["baseline"], rel=1e-9)


@pytest.mark.parametrize("text, message", [
    ('model = "m"\n[[analysis]]\nmethod = "eap"\ncolour = 1', "unknown keys ['colour']"),
    ('model = "m"\nmetric = "acc"\n[[analysis]]\nmethod = "eap"', "metrics: logit_diff, probability, kl"),
    ('model = "m"', "needs a key 'analysis'"),
    ('model = "m"\nseed = "0"\n[[analysis]]\nmethod = "eap"', "seed = '0' should be a int"),
    ('model = "m"\n[inputs]\nclean = ["a"]\n[[analysis]]\nmethod = "eap"', "clean and corrupt come together"),
    ('model = "m"\n[[analysis]]\nmethod = "eap"\n[[analysis]]\nmethod = "eap"', "two analyses are named 'eap'"),
])
def test_bad_study_files_name_the_key(tmp_path, capsys, text, message):
    path = tmp_path / "s.toml"
    path.write_text(text)
    with pytest.raises(StudyError, match=None) as info:
        load_study(path)
    assert message in str(info.value) and str(path) in str(info.value)
    code, out, err = _run(["run", path], capsys)
    assert code == 2 and err.startswith("crosspatch: error: ") and message in err


def test_unknown_method_is_named(study_dir, tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text(f'model = "{study_dir / "ckpt"}"\n[inputs]\ntask = "ioi"\nn = 1\n[[analysis]]\nmethod = "magic"')
    code, out, err = _run(["run", path, "--out", tmp_path / "o"], capsys)
    assert code == 2 and "unknown method 'magic'; methods: acdc, activation_patching" in err


def test_the_example_study_file_reads():
    from crosspatch.study.analyses import METHODS

    path = Path(__file__).resolve().parents[2] / "examples" / "ioi_study.toml"
    study = load_study(path)
    assert study.model == "ioi-gpt2-tiny" and study.inputs.task == "ioi"
    assert study.output == str((path.parent / "../crosspatch-out/ioi_study").resolve())
    assert {a.method for a in study.analyses} <= set(METHODS)
