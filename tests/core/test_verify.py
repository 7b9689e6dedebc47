"""crosspatch.testing.verify and `crosspatch verify`: per-family verdicts, and a failing family fails."""

from __future__ import annotations

import json
import warnings

import pytest

from crosspatch.adapters.transformers.adapter import TransformersAdapter
from crosspatch.adapters.transformers.tiny import tiny_model
from crosspatch.cli.app import main
from crosspatch.testing import verify


def test_a_table_model_is_exact_in_every_family():
    result = verify(tiny_model("gpt2"), cuda=False)
    assert result.ok, result.table()
    statuses = {f.family: f.status for f in result.families}
    assert statuses["head_out"] == statuses["head_in"] == statuses["resid_pre"] == "exact"
    assert all(f.error is not None and f.error <= 1e-5 for f in result.families)


def test_an_inferred_model_lists_what_it_does_not_serve():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = verify(tiny_model("cohere"), cuda=False)  # its norm centres but is no nn.LayerNorm
    assert result.ok
    statuses = {f.family: f for f in result.families}
    assert statuses["head_out"].status == "exact"
    assert statuses["head_in"].status == "unavailable" and "norm" in statuses["head_in"].note


class _Broken(TransformersAdapter):
    """Reports what a wrong mapping would: resid_post off by 0.3, mlp_out off a little."""

    name = "broken-for-test"

    def family_oracles(self, model):
        found = super().family_oracles(model)
        found["resid_post"] = (0.3, "resid_pre + attn_out + mlp_out != resid_post: max difference 3.00e-01")
        found["mlp_out"] = (5e-5, None)
        return found


def test_a_failing_family_fails_the_verification():
    result = verify(tiny_model("llama"), adapter=_Broken(), cuda=False)
    statuses = {f.family: f for f in result.families}
    assert not result.ok
    assert statuses["resid_post"].status == "failed" and "3.00e-01" in statuses["resid_post"].note
    assert statuses["mlp_out"].status == "approximate" and statuses["mlp_out"].error == 5e-5
    assert "failed" in result.table() and result.counts()["failed"] == 1


def test_cli_verify_config(capsys):
    assert main(["verify", "--config", "llama"]) == 0
    out = capsys.readouterr().out
    assert "verify LlamaForCausalLM (adapter 'transformers'): ok" in out
    assert any(line.split()[:2] == ["head_out", "exact"] for line in out.splitlines())


def test_cli_verify_json(capsys):
    assert main(["verify", "--config", "gpt2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] and data["counts"]["failed"] == 0 and data["counts"]["exact"] == len(data["families"])


@pytest.mark.parametrize("argv,expected", [
    (["verify"], "one of them"),
    (["verify", "ioi-gpt2-tiny", "--config", "gpt2"], "one of them"),
    (["verify", "--config", "no_such_type"], "no_such_type"),
])
def test_cli_verify_errors_name_the_problem(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in capsys.readouterr().err
