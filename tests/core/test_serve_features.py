"""The feature picker of ``crosspatch serve``, through the HTTP API of a running server on a tiny
GPT-2: a transcoder's or an SAE's feature becomes ``Add`` of its decoder row (the JSON the page
sends back with a new ``alpha``), and its activation on each token of the prompt.

Oracles outside the engine: the served vector is the dictionary's decoder row, bit for bit; the
distribution the server answers under ``alpha`` equals GPT-2 run with a forward hook adding
``alpha * row`` to the MLP's output; the activations equal the transcoder's encoder applied to the
input of GPT-2's second layer norm (the residual the MLP reads), read by a hook."""

from __future__ import annotations

import json
import types
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("starlette", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")

from fake_zoo import fake_zoo  # noqa: E402,F401  (a fixture; after the skips)
from test_serve import _post as post_text  # noqa: E402


def tiny_dictionaries(folder):
    """A per-layer and a cross-layer ReLU transcoder over mlp_in.L -> mlp_out.L of a 2-layer width-16 GPT-2,
    random (positive encoder biases, so features fire), and an SAE on resid_pre.1 saved in ``folder``."""
    from crosspatch.serve.features import Dictionary
    from crosspatch.trainable.sae import SAE
    from crosspatch.trainable.transcoder import Transcoder

    gen = torch.Generator().manual_seed(7)
    out = []
    for name, cross in (("plt", False), ("clt", True)):
        tc = Transcoder(16, 16, 8, ["mlp_in.0", "mlp_in.1"], ["mlp_out.0", "mlp_out.1"], cross_layer=cross, kind="relu")
        with torch.no_grad():
            for p in tc.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            tc.b_enc.abs_()
        out.append(Dictionary(name, tc, "transcoder"))
    sae = SAE(16, 6, "relu", metadata={"site": "resid_pre.1"})
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    sae.save(folder / "sae")
    return out, sae


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fake_zoo import build

    from crosspatch.serve.server import start_in_thread, task_examples
    from crosspatch.serve.session import Session
    from crosspatch.zoo.sources import wrap

    folder = tmp_path_factory.mktemp("serve-features")
    build(folder / "ckpt", types.SimpleNamespace(seed=0))
    dictionaries, sae = tiny_dictionaries(folder)
    session = Session(wrap(str(folder / "ckpt")), "tiny", task_examples("ioi", 2), dictionaries)
    server = start_in_thread(session)
    yield server, session, folder, sae
    server.stop()


def _post(url, body):
    status, text = post_text(url, body)
    return status, json.loads(text)


def _hf_distribution(session, prompt, hooks):
    """Softmax of GPT-2's last-position logits with ``hooks`` ({module: forward hook}) registered."""
    model = session.m.module
    handles = [module.register_forward_hook(hook) for module, hook in hooks.items()]
    try:
        with torch.no_grad():
            ids = session.m.tokenizer(prompt, return_tensors="pt")["input_ids"]
            return torch.softmax(model(ids).logits[0, -1].double(), -1)
    finally:
        for h in handles:
            h.remove()


def test_transcoder_feature_steers_with_its_decoder_row(served):
    server, session, _, _ = served
    info = json.loads(urllib.request.urlopen(server.url + "/api/info", timeout=60).read())
    assert [d["name"] for d in info["features"]] == ["plt", "clt"]
    assert info["features"][0]["sources"][1] == {"index": 1, "reads": "mlp_in.1", "writes": ["mlp_out.1"]}
    assert info["features"][1]["sources"][0]["writes"] == ["mlp_out.0", "mlp_out.1"]

    tc = session.dictionaries["plt"].module
    prompt = session.example["corrupt"]
    status, out = _post(server.url + "/api/feature", {"dictionary": "plt", "source": 1, "feature": 5, "prompt": prompt})
    assert status == 200, out
    [steer] = out["interventions"]
    row = tc.W_dec[1][5, 0]
    assert steer["site"] == "mlp_out.1" and steer["intervention"]["kind"] == "add"
    assert torch.equal(torch.tensor(steer["intervention"]["vector"], dtype=torch.float32), row)

    # The distribution served at alpha is GPT-2 with alpha * row added to layer 1's MLP output.
    mlp = session.m.module.transformer.h[1].mlp
    answers = {}
    for alpha in (3.0, -4.0):
        status, shown = _post(server.url + "/api/predict", {"prompt": prompt, "interventions": [
            {"site": steer["site"], "intervention": {**steer["intervention"], "alpha": alpha}}]})
        expected = _hf_distribution(session, prompt, {mlp: lambda module, args, output: output + alpha * row})
        ids = [t["id"] for t in shown["patched"]]
        np.testing.assert_allclose([t["p"] for t in shown["patched"]], expected[ids], rtol=1e-5, atol=1e-7)
        assert ids == expected.topk(len(ids)).indices.tolist()
        answers[alpha] = ids
    base = _hf_distribution(session, prompt, {})
    np.testing.assert_allclose([t["p"] for t in shown["base"]], base[[t["id"] for t in shown["base"]]], rtol=1e-5)

    # Where the feature fires: relu(W_enc x + b) on the residual GPT-2's layer-1 MLP reads (ln_2's input).
    seen = {}
    handle = session.m.module.transformer.h[1].ln_2.register_forward_pre_hook(
        lambda module, args: seen.__setitem__("x", args[0][0].detach()))
    try:
        _hf_distribution(session, prompt, {})
    finally:
        handle.remove()
    acts = torch.relu(seen["x"] @ tc.W_enc[1] + tc.b_enc[1]).detach().double()
    tokens = session.tokens(prompt)
    by_pos = {t["pos"]: t for t in out["tokens"]}
    assert sorted(by_pos) == list(range(len(tokens)))
    np.testing.assert_allclose([by_pos[p]["activation"] for p in range(len(tokens))], acts[:, 5], rtol=1e-5, atol=1e-6)
    assert [by_pos[p]["token"] for p in range(len(tokens))] == tokens
    assert [t["activation"] for t in out["tokens"]] == sorted((t["activation"] for t in out["tokens"]), reverse=True)
    peak = acts.max(0).values
    assert [a["feature"] for a in out["active"]] == peak.argsort(descending=True)[:len(out["active"])].tolist()

    # A cross-layer transcoder's feature writes every later layer: one Add per output, each its decoder row.
    clt = session.dictionaries["clt"].module
    status, out = _post(server.url + "/api/feature", {"dictionary": "clt", "source": 0, "feature": 2})
    assert [i["site"] for i in out["interventions"]] == ["mlp_out.0", "mlp_out.1"] and "tokens" not in out
    for j, item in enumerate(out["interventions"]):
        assert torch.equal(torch.tensor(item["intervention"]["vector"], dtype=torch.float32), clt.W_dec[0][2, j])


def test_sae_folder_loads_and_steers_with_its_decoder_row(served):
    server, session, folder, sae = served
    status, described = _post(server.url + "/api/dictionaries", {"path": str(folder / "sae")})
    assert status == 200, described
    assert described["kind"] == "sae" and described["n_features"] == 6 and described["sources"][0]["reads"] == "resid_pre.1"
    status, out = _post(server.url + "/api/feature", {"dictionary": described["name"], "feature": 4,
                                                      "prompt": session.example["clean"]})
    [steer] = out["interventions"]
    assert steer["site"] == "resid_pre.1"
    assert torch.equal(torch.tensor(steer["intervention"]["vector"], dtype=torch.float32), sae.W_dec[4])
    block = session.m.module.transformer.h[1]
    x = {}
    handle = block.register_forward_pre_hook(lambda module, args: x.__setitem__("x", args[0][0].detach()))
    try:
        _hf_distribution(session, session.example["clean"], {})
    finally:
        handle.remove()
    acts = torch.relu((x["x"] - sae.b_dec) @ sae.W_enc + sae.b_enc)[:, 4].detach().double()
    shown = sorted(out["tokens"], key=lambda t: t["pos"])
    np.testing.assert_allclose([t["activation"] for t in shown], acts, rtol=1e-5, atol=1e-6)


def test_feature_requests_say_what_is_wrong(served):
    server, _, folder, _ = served
    status, out = _post(server.url + "/api/feature", {"dictionary": "nope", "feature": 0})
    assert status == 400 and "dictionary 'nope' is not one of plt, clt" in out["error"]
    status, out = _post(server.url + "/api/feature", {"dictionary": "plt", "source": 1, "feature": 8})
    assert status == 400 and "feature must be an index 0 .. 7 of plt, got 8" in out["error"]
    status, out = _post(server.url + "/api/feature", {"dictionary": "plt", "source": 2, "feature": 0})
    assert status == 400 and "source must be an index 0 .. 1" in out["error"]
    status, out = _post(server.url + "/api/dictionaries", {"path": str(folder)})
    assert status == 400 and "neither an SAE folder (cfg.json) nor a transcoder folder" in out["error"]


def test_zoo_transcoders_are_offered_once_built(fake_zoo):
    """The picker offers ``<model>-transcoders`` from the zoo only when it is built already: serving never trains."""
    from crosspatch.plugins.registry import get_registry
    from crosspatch.serve.features import zoo_dictionaries
    from crosspatch.trainable.transcoder import Transcoder, load_transcoder
    from crosspatch.zoo import store

    def build(folder, settings):
        Transcoder(16, 16, 4, ["mlp_in.0"], ["mlp_out.0"], kind="relu").save(folder / "transcoder")
        return {"note": "untrained"}

    def load(folder):
        return store.Loaded(load_transcoder(folder / "transcoder"), None, {})

    plugin = types.ModuleType("fake_transcoders")
    from crosspatch.plugins.hookspecs import hookimpl

    @hookimpl
    def register_models(register):
        register(store.ZooModel("fake-ioi-tiny-transcoders", "tiny transcoder for tests", "transformers", "ioi",
                                build, load))

    plugin.register_models = register_models
    get_registry().register(plugin, "fake-transcoders")
    assert zoo_dictionaries("fake-ioi-tiny") == []  # not built: not offered, and not trained here
    assert not store.cached("fake-ioi-tiny-transcoders")
    store.load("fake-ioi-tiny-transcoders")
    [offered] = zoo_dictionaries("fake-ioi-tiny")
    assert offered.name == "fake-ioi-tiny-transcoders" and offered.kind == "transcoder" and offered.n_features == 4
    assert zoo_dictionaries("other-model") == []
