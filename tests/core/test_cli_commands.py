"""``crosspatch zoo``, ``sites`` and ``patch`` on a tiny fake zoo model that "trains" in a blink."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crosspatch.cli import app as cli

pytest.importorskip("transformers")

from fake_zoo import FAKE, fake_zoo  # noqa: F401  (a fixture)


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error_line(err: str) -> str:
    """The one error line: the last line of stderr (a broken plugin may warn on lines before it)."""
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("crosspatch: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and err.endswith("\n"), err
    assert all(line.startswith("crosspatch: ") for line in lines), err  # warnings are one line each too
    assert "Traceback" not in err
    return errors[0]


def _one_line_error(code, out, err, *names):
    assert code == 2, (out, err)
    assert out == ""
    line = _error_line(err)
    for name in names:
        assert name in line, err


def test_zoo_list_and_train(fake_zoo, capsys):
    code, out, _ = _run(["zoo", "list"], capsys)
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["NAME", "ADAPTER", "TASK", "CACHED", "DESCRIPTION"]
    row = next(r for r in rows if r.startswith(FAKE))
    assert row.split()[1:4] == ["transformers", "ioi", "no"]

    code, out, _ = _run(["zoo", "train", FAKE, "--seed", "0"], capsys)
    assert code == 0 and out.startswith(f"trained {FAKE} (seed 0)")
    code, out, _ = _run(["zoo", "list"], capsys)
    assert next(r for r in out.splitlines() if r.startswith(FAKE)).split()[3] == "yes"
    _one_line_error(*_run(["zoo", "train", "nope"], capsys), "'nope'", FAKE)


def test_sites_of_a_zoo_model(fake_zoo, capsys):
    code, out, err = _run(["sites", FAKE], capsys)  # trains on first use
    assert code == 0, err
    assert out.startswith("Catalog of GPT2LMHeadModel")
    assert "head_out" in out and "head=2" in out and "logits" in out


def test_sites_of_a_local_folder(tmp_path, capsys):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=2, n_embd=16, vocab_size=50, n_positions=16)).save_pretrained(gpt2)
    code, out, err = _run(["sites", gpt2, "--dtype", "float64"], capsys)
    assert code == 0, err
    assert "Catalog of GPT2LMHeadModel" in out and "resid_pre     3" in out

    bert = tmp_path / "bert"
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    BertModel(config).save_pretrained(bert)
    code, out, err = _run(["sites", bert], capsys)
    assert code == 0, err
    assert "Catalog of BertModel" in out and "logits" not in out  # the class the config names


def test_patch_end_to_end(fake_zoo, capsys):
    out_dir = fake_zoo / "report"
    code, out, err = _run(["patch", "--model", FAKE, "--n", "4", "--normalize", "--out", out_dir], capsys)
    assert code == 0, err
    assert Path(out.strip()) == out_dir.resolve()
    names = {p.name for p in out_dir.iterdir()}
    assert {"index.html", "resid_pre.png", "resid_pre.json", "resid_pre.csv", "head_out.png"} <= names
    page = (out_dir / "index.html").read_text()
    assert f"{FAKE} on ioi" in page and "resid_pre" in page and "head_out" in page

    from crosspatch import Result

    res = Result.load(out_dir / "head_out.json")
    assert res.dims == ("layer", "head") and res.values.shape == (2, 2)
    assert res.metadata["task"] == "ioi" and res.metadata["seed"] == 0 and res.metadata["normalize"]
    resid = Result.load(out_dir / "resid_pre.json")
    assert all(isinstance(label, str) for label in resid.coords["pos"])  # "0 When", "1 Mary", ...

    code, out, err = _run(["patch", "--model", FAKE, "--n", "3", "--metric", "kl", "--direction", "noising",
                           "--sites", "mlp_out.1[pos=*]", "--out", fake_zoo / "kl"], capsys)
    assert code == 0, err
    assert {p.name for p in (fake_zoo / "kl").iterdir()} >= {"mlp_out.json", "index.html"}


def test_localize_end_to_end(fake_zoo, capsys):
    """The picture, JSON and CSV, and the patched values equal activation patching of those sites on the same
    pairs (built by the same options)."""
    import crosspatch as cp
    from crosspatch.cli.app import build_parser
    from crosspatch.cli.cmd_patch import pair_from_args

    out_dir = fake_zoo / "loc"
    argv = ["localize", "--model", FAKE, "--n", "4", "--normalize", "--tol", "0.05", "--k", "3", "--out", out_dir]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert Path(lines[-1]) == out_dir.resolve() and lines[0].startswith("localize: ")
    assert {p.name for p in out_dir.iterdir()} == {"localize.png", "localize.json", "localize.csv"}
    saved = json.loads((out_dir / "localize.json").read_text())
    assert saved["summary"]["tol"] == 0.05 and saved["summary"]["k"] == 3 and f"{saved['summary']['forwards']} forwards" in lines[0]
    patched = {r["site"]: r["value"] for r in saved["sites"] if r["verified"] and not r["skipped"]}
    assert patched
    pair = pair_from_args(build_parser().parse_args([str(a) for a in argv]))
    sites = sorted(patched)
    exact = cp.activation_patching(pair.m, pair.clean, pair.corrupt, sites, pair.metric, normalize=True,
                                   progress=False)
    np.testing.assert_allclose([patched[s] for s in sites], exact.values, atol=1e-5)
    assert len(lines) == 2 + 3  # the summary, the top 3, the folder


def test_localize_errors_are_one_line(fake_zoo, capsys):
    _one_line_error(*_run(["localize", "--model", FAKE, "--tol", "-1"], capsys), "--tol", "-1")
    _one_line_error(*_run(["localize", "--model", FAKE, "--k", "0"], capsys), "--k", "0")
    _one_line_error(*_run(["localize", "--model", "no-such-model"], capsys), "'no-such-model'", FAKE)


def test_unknown_model_site_task(fake_zoo, capsys):
    from crosspatch.zoo import store as zoo

    zoo.load(FAKE)  # built now, so the commands below print nothing about training
    capsys.readouterr()
    _one_line_error(*_run(["sites", "no-such-model"], capsys), "'no-such-model'", FAKE)
    _one_line_error(*_run(["patch", "--model", "no-such-model"], capsys), "'no-such-model'", FAKE)
    _one_line_error(*_run(["patch", "--model", FAKE, "--task", "no-such-task"], capsys), "'no-such-task'", "ioi")
    common = ["patch", "--model", FAKE, "--n", "2", "--out", fake_zoo / "x", "--sites"]
    _one_line_error(*_run(common + ["nosuch.*[pos=*]"], capsys), "'nosuch'", "resid_pre", "head_out")
    _one_line_error(*_run(common + ["resid_pre.*[pos="], capsys), "resid_pre.*[pos=", "head_out")
    _one_line_error(*_run(common + ["head_out.7[head=*]"], capsys), "layer 7")
    _one_line_error(*_run(["patch", "--model", FAKE, "--device", "cuda:0"], capsys), "cuda")
    assert not (fake_zoo / "x").exists()


def test_help_everywhere(capsys):
    for argv in (["zoo", "--help"], ["zoo", "list", "--help"], ["zoo", "train", "--help"], ["sites", "--help"],
                 ["patch", "--help"], ["localize", "--help"]):
        code, out, _ = _run(argv, capsys)
        assert code == 0 and out.startswith("usage: crosspatch"), argv
    code, out, _ = _run(["--help"], capsys)
    assert all(name in out for name in ("plugins", "zoo", "sites", "patch", "localize"))


def test_console_script_error_has_no_traceback(tmp_path):
    """A real process: the unknown model is named, the zoo listed, exit 2, one stderr line."""
    exe = Path(sys.executable).parent / "crosspatch"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "crosspatch"]
    proc = subprocess.run(
        argv + ["sites", str(tmp_path / "missing")], capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "CROSSPATCH_CACHE": str(tmp_path)},
    )
    assert proc.returncode == 2
    line = _error_line(proc.stderr)
    assert "unknown model" in line and "missing" in line


# ---------------------------------------------------------------- your own prompts, and arguments checked first

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Paul gave a drink to"


def test_patch_on_texts_of_your_own(fake_zoo, capsys):
    out_dir = fake_zoo / "texts"
    code, out, err = _run(["patch", "--model", FAKE, "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Mary",
                           "--distractor", " John", "--sites", "resid_pre.*[pos=*]", "--out", out_dir], capsys)
    assert code == 0, err
    from crosspatch import Result

    res = Result.load(out_dir / "resid_pre.json")
    assert res.coords["pos"][:2] == ["0 When", "1 Mary"] and res.coords["pos"][9] == "9 John"
    assert res.skipped[:, :9].all()  # positions before the first difference are not run
    assert "your prompts" in (out_dir / "index.html").read_text()
    code, out, err = _run(["patch", "--model", FAKE, "--clean", CLEAN, CLEAN, "--corrupt", CORRUPT, CORRUPT,
                           "--metric", "kl", "--sites", "head_out.*[head=*]", "--out", fake_zoo / "kl"], capsys)
    assert code == 0, err


def test_patch_text_errors_are_one_line(fake_zoo, capsys):
    from crosspatch.zoo import store as zoo

    zoo.load(FAKE)
    capsys.readouterr()
    common = ["patch", "--model", FAKE, "--out", fake_zoo / "x", "--sites", "resid_pre.0"]
    _one_line_error(*_run(common + ["--clean", "When Mary went", "--corrupt", "When Mary", "--answer", " a",
                                    "--distractor", " b"], capsys),
                    "3 and 2 tokens", "['When', 'Mary', 'went'] vs corrupt ['When', 'Mary']")
    _one_line_error(*_run(common + ["--clean", "When Zork went", "--corrupt", "When Mary went", "--answer", " Mary",
                                    "--distractor", " John"], capsys), "does not know 'Zork'")
    _one_line_error(*_run(common + ["--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Mary John",
                                    "--distractor", " John"], capsys), "answer ' Mary John' is 2 tokens")
    _one_line_error(*_run(common + ["--clean", CLEAN, "--corrupt", CORRUPT], capsys), "--metric logit_diff needs --answer")
    _one_line_error(*_run(common + ["--clean", CLEAN], capsys), "--clean and --corrupt come together")
    _one_line_error(*_run(common + ["--clean", CLEAN, "--corrupt", CORRUPT, "--task", "ioi", "--metric", "kl"], capsys),
                    "either --task or --clean")
    _one_line_error(*_run(common + ["--clean", CLEAN, CLEAN, "--corrupt", CORRUPT, "--metric", "kl"], capsys),
                    "2 --clean prompts but 1 --corrupt")
    assert not (fake_zoo / "x").exists()


def test_bad_numbers_devices_and_out_folders_exit_2_before_any_work(fake_zoo, capsys):
    from crosspatch.zoo import store as zoo

    (fake_zoo / "afile").write_text("x")
    base = ["patch", "--model", FAKE, "--n", "2"]
    cases = [
        (base + ["--batch-size", "0"], "--batch-size must be at least 1"),
        (base + ["--batch-size", "-3"], "--batch-size must be at least 1"),
        (base + ["--n", "0"], "--n must be at least 1"),
        (base + ["--n", "100000000"], "can generate"),
        (base + ["--out", fake_zoo / "afile"], "that is a file"),
        (base + ["--out", fake_zoo / "afile" / "sub"], "is a file, so no folder"),
        (base + ["--out", "/proc/crosspatch-report"], "cannot write"),
        (base + ["--device", "meta"], "meta device"),
        (["sites", FAKE, "--device", "meta"], "meta device"),
        (["zoo", "train", FAKE, "--steps", "0"], "--steps must be at least 1"),
        (["zoo", "train", FAKE, "--steps", "-1"], "--steps must be at least 1"),
        (["patch", "--model", "", "--n", "2"], "''"),
        (["sites", "fake-ioi-tnyi"], "did you mean 'fake-ioi-tiny'?"),
        (base + ["--task", "iio"], "did you mean 'ioi'?"),
    ]
    for argv, words in cases:
        _one_line_error(*_run(argv, capsys), words)
    assert not zoo.cached(FAKE)  # none of them loaded (or trained) the model


def test_batch_size_default_is_the_python_one():
    from crosspatch.cli.app import build_parser

    args = build_parser().parse_args(["patch", "--model", "x"])
    assert args.batch_size is None  # activation_patching's own default: 64 on an accelerator, one site per forward on a CPU


def test_a_folder_without_a_tokenizer_says_so(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "weights-only"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16)).save_pretrained(folder)
    capsys.readouterr()
    _one_line_error(*_run(["patch", "--model", folder, "--task", "ioi", "--out", tmp_path / "o"], capsys),
                    "weights-only holds no tokenizer (none of tokenizer.json", "save it there")


def test_zoo_train_prints_its_metrics_as_a_table(fake_zoo, capsys):
    code, out, _ = _run(["zoo", "train", FAKE], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"trained {FAKE} (seed 0), cached in ")
    assert lines[1].split() == ["METRIC", "VALUE"]
    rows = dict(line.split() for line in lines[2:])
    assert rows == {"accuracy": "0", "steps": "1", "train_seconds": "0.01"}  # the note (text) is left out


def test_serve_passes_feature_folders_to_the_session(monkeypatch, tmp_path):
    """``crosspatch serve MODEL --features DIR --features DIR2`` hands both folders to the session loader."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    import crosspatch.serve.server as server

    seen = {}
    monkeypatch.setattr(server, "load_session", lambda model, **kw: seen.update(model=model, **kw) or "session")
    monkeypatch.setattr(server, "serve", lambda session, host, port, allow_remote: seen.update(served=session))
    a, b = str(tmp_path / "sae"), str(tmp_path / "transcoder")
    assert cli.main(["serve", "some-model", "--features", a, "--features", b]) == 0
    assert seen["model"] == "some-model" and seen["features"] == [a, b] and seen["served"] == "session"
