"""What a person did on the serve page, saved as a study file, runs with ``crosspatch run`` to the
numbers the page showed: a streamed noising sweep over positions (probability metric) saved with
"Save as study.toml", run from the command line into a report folder, compared value for value with
the sweep's final view (test_serve checks the streamed sweep against activation patching itself)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("starlette", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")

from test_serve import _events, _post  # noqa: E402  (after the skips)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from served_model import serve_tiny_model

    yield from serve_tiny_model(tmp_path_factory)


def test_saved_study_reproduces_the_served_sweep(served, tmp_path, capsys):
    from crosspatch.cli import app as cli
    from crosspatch.results.result import Result

    server, session = served
    settings = {"sites": "resid_pre.*[pos=*]", "metric": "probability", "method": "activation_patching",
                "direction": "noising"}
    request = {"kind": "sweep", **session.examples[1], **settings}
    status, body = _post(server.url + "/api/jobs", request)
    assert status == 202
    events = _events(server.url + json.loads(body)["events"])
    assert events[-1][0] == "result"
    shown = np.array(events[-1][1]["data"]["view"]["values"], dtype=float)

    status, text = _post(server.url + "/api/study", request)
    assert status == 200 and "[[analysis]]" in text
    study = tmp_path / "study.toml"
    study.write_text(text, encoding="utf-8")
    out = tmp_path / "report"
    assert cli.main(["run", str(study), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    record = json.loads((out / "study.json").read_text(encoding="utf-8"))
    [(name, entry)] = record["results"].items()
    result = Result.load(out / entry["file"])
    assert result.metadata["method"] == "activation_patching"
    # The study runs the whole sweep in one call (rows of several layers joining one forward), the server a layer
    # at a time: float32 rounding over this random model's small probability gap (up to 8e-5 normalised).
    np.testing.assert_allclose(result.values.reshape(shown.shape), shown, rtol=0, atol=2e-4)
    assert record["study"]["analyses"][0]["options"] == {"normalize": True, "direction": "noising"}
    assert record["study"]["inputs"]["clean"] == [session.examples[1]["clean"]]
