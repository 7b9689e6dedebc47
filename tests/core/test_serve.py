"""``crosspatch serve`` without a browser: the job queue (order, cancelling queued and running work,
errors), the server's guards (JSON only, its own Host only, loopback unless allowed, interventions
only as JSON of known kinds) and a streamed sweep equal to activation patching run directly."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

pytest.importorskip("starlette", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")

from crosspatch.serve.jobs import Cancelled, JobQueue
from crosspatch.serve.server import RemoteBindingError, check_host, is_loopback


@pytest.fixture
def queue():
    q = JobQueue()
    yield q
    q.close()


def test_jobs_run_in_order_and_cancel(queue):
    gate, order = threading.Event(), []
    first = queue.submit("a", lambda job: (gate.wait(10), order.append("a"))[1])
    second = queue.submit("b", lambda job: order.append("b") or 2)
    third = queue.submit("c", lambda job: order.append("c"))
    assert [e["position"] for j in (first, second, third) for e in j.events if e["event"] == "queued"] == [0, 1, 2]
    assert queue.cancel(third.id) and third.events[-1]["event"] == "cancelled" and third.state == "cancelled"
    assert not queue.cancel(third.id)  # ended already
    gate.set()
    assert second.wait(10) == {"event": "result", "data": 2}
    assert order == ["a", "b"]  # FIFO, the cancelled one never ran

    started = threading.Event()

    def long(job):
        started.set()
        while True:
            job.check()
            threading.Event().wait(0.01)

    running = queue.submit("long", long)
    assert started.wait(10)
    assert queue.cancel(running.id)
    assert running.wait(10)["event"] == "cancelled"
    failing = queue.submit("bad", lambda job: 1 / 0)
    assert failing.wait(10) == {"event": "error", "message": "division by zero"}
    assert queue.submit("after", lambda job: "still serving").wait(10)["data"] == "still serving"
    with pytest.raises(Cancelled):
        job = queue.submit("x", lambda job: None)
        job.cancel_requested.set()
        job.check()


def test_loopback_by_default_and_remote_only_when_allowed(capsys):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(RemoteBindingError, match="--allow-remote"):
        check_host("0.0.0.0", allow_remote=False)
    with pytest.warns(UserWarning, match="anyone who can reach this address"):
        check_host("0.0.0.0", allow_remote=True)
    from crosspatch.cli import app as cli

    code = cli.main(["serve", "no-such-model", "--host", "0.0.0.0"])  # refused before any model is loaded
    err = capsys.readouterr().err
    assert code == 2 and "--allow-remote" in err and "no-such-model" not in err


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("transformers")
    from served_model import serve_tiny_model

    yield from serve_tiny_model(tmp_path_factory)


def _post(url, body, headers=None):
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    request = urllib.request.Request(url, data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _events(url):
    out, event = [], None
    with urllib.request.urlopen(url, timeout=60) as response:
        for raw in response:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))
    return out


def test_guards(served):
    server, session = served
    status, body = _post(server.url + "/api/predict", b'{"prompt": "a"}', {"Content-Type": "text/plain"})
    assert status == 400 and "Content-Type: application/json" in body
    status, body = _post(server.url + "/api/predict", {"prompt": "a"}, {"Host": "attacker.example"})
    assert status == 400 and "Invalid host header" in body
    code = "__import__('os').system('true')"
    status, body = _post(server.url + "/api/predict", {"prompt": session.example["clean"], "interventions": [
        {"site": "resid_pre.0", "intervention": {"kind": "fn", "fn": code}}]})
    assert status == 400 and "unknown intervention kind 'fn'" in body
    status, body = _post(server.url + "/api/jobs", {"kind": "shell"})
    assert status == 400 and "not one of sweep, predict, steering" in body


def test_streamed_sweep_is_activation_patching(served):
    from crosspatch.methods.activation_patching import activation_patching
    from crosspatch.results import metrics

    server, session = served
    ex = session.example
    request = {"kind": "sweep", "sites": "head_out.*[head=*]", "metric": "logit_diff", **ex}
    status, body = _post(server.url + "/api/jobs", request)
    assert status == 202
    events = _events(server.url + json.loads(body)["events"])
    kinds = [e for e, _ in events]
    assert kinds == ["queued", "started", "progress", "progress", "result"]
    partial = events[2][1]["view"]["values"]
    assert all(v is None for v in partial[1]) and all(v is not None for v in partial[0])  # layer 1 not yet run
    shown = np.array(events[-1][1]["data"]["view"]["values"], dtype=float)
    metric = metrics.logit_diff(ex["answer"], ex["distractor"]).resolve(session.m.token_id)
    direct = activation_patching(session.m, ex["clean"], ex["corrupt"], "head_out.*[head=*]", metric, normalize=True)
    # The direct sweep batches every layer's sites into one forward (rows joining at their block), the served one
    # runs a layer at a time: float32 rounding (3e-8 of logit difference here) divided by this random model's
    # small clean-corrupt gap (4.6e-4) moves a normalised value by up to 6.4e-5.
    np.testing.assert_allclose(shown, direct.values, rtol=0, atol=2e-4)

    # The same settings saved as a study file read back as a study.
    import tomllib

    from crosspatch.study.spec import parse_study

    status, text = _post(server.url + "/api/study", {**request, "method": "activation_patching"})
    study = parse_study(tomllib.loads(text))
    assert study.inputs.clean == [ex["clean"]] and study.analyses[0].sites == "head_out.*[head=*]"

    # A saved Result opens as a view.
    document = events[-1][1]["data"]["result"]
    status, body = _post(server.url + "/api/view", {"name": "saved", "document": document})
    assert status == 200 and json.loads(body)["kind"] == "heatmap"


def test_a_running_sweep_stops_at_the_next_forward(served):
    from crosspatch.serve.jobs import Job

    server, session = served
    job = Job("t", "sweep", lambda job: None)
    job.cancel_requested.set()
    request = {"sites": "head_out.1[head=*]", "metric": "logit_diff", **session.example}  # one step: no layer loop
    with pytest.raises(Cancelled):
        session.sweep(job, request)  # the metric checks the flag when the first forward's output reaches it
    job = Job("u", "sweep", lambda job: None)
    out = session.sweep(job, request)
    assert out["view"]["kind"] == "bars" and [e["event"] for e in job.events] == ["progress"]


def test_a_model_without_logits_or_tokenizer_is_refused():
    from types import SimpleNamespace

    from crosspatch.serve.session import RequestError, Session

    encoder = SimpleNamespace(tokenizer=object(), catalog=SimpleNamespace(families={"resid_pre": None}),
                              module=SimpleNamespace())
    with pytest.raises(RequestError, match="no 'logits' output"):
        Session(encoder, "enc")
    with pytest.raises(RequestError, match="no tokenizer"):
        Session(SimpleNamespace(tokenizer=None), "bare")
