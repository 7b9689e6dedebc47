"""Feature interventions in the real model, and steering a zoo model's feature the way its graph predicts."""

from __future__ import annotations

import os

import pytest
import torch

import crosspatch as cp
from crosspatch.methods.attribution_graph import attribution_graph
from crosspatch.methods.attribution_graph.interventions import FeatureEdit, feature_intervention, generate
from test_attribution_graph import random_transcoder


@pytest.fixture(scope="module")
def gpt2():
    from conftest import randomize, tiny_gpt2

    return cp.wrap(randomize(tiny_gpt2()).double())


@pytest.mark.parametrize("cross_layer", [False, True], ids=["plt", "clt"])
def test_an_edit_adds_the_decoder_times_the_change(gpt2, cross_layer):
    tc = random_transcoder(64, 2, cross_layer=cross_layer, seed=7)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    cache = gpt2.capture(ids, ["mlp_in.0"])
    with torch.no_grad():
        a = tc.encode(0, cache["mlp_in.0"].clone())  # [rows, pos, features]
    f = int(a[:, 3].abs().sum(0).argmax())
    edited = feature_intervention(gpt2, tc, ids, [(0, 3, f, 2.5)])
    writes = {0: tc.decoder(0, 0)[f].detach()}
    if cross_layer:
        writes[1] = tc.decoder(0, 1)[f].detach()

    def add(L):
        def fn(x):
            x = x.clone()
            x[:, 3] += (2.5 - a[:, 3, f])[:, None] * writes[L]
            return x
        return fn

    manual = gpt2.run(ids, {f"mlp_out.{L}": add(L) for L in writes}).output
    torch.testing.assert_close(edited.output, manual, rtol=1e-12, atol=1e-12)
    # setting a feature to its own value changes nothing; restricting the layers drops the later writes
    same = feature_intervention(gpt2, tc, ids[:1], [FeatureEdit(0, 3, f, float(a[0, 3, f]))]).output
    torch.testing.assert_close(same, gpt2.run(ids[:1]).output, rtol=0, atol=1e-12)
    if cross_layer:
        only0 = feature_intervention(gpt2, tc, ids, [(0, 3, f, 2.5)], layers=(0, 0)).output
        torch.testing.assert_close(only0, gpt2.run(ids, {"mlp_out.0": add(0)}).output, rtol=1e-12, atol=1e-12)


def test_frozen_attention_keeps_the_unedited_patterns(gpt2):
    tc = random_transcoder(64, 2, cross_layer=False, seed=8)
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    clean = gpt2.capture(ids, ["attn_pattern.1"])["attn_pattern.1"]
    free = feature_intervention(gpt2, tc, ids, [(0, None, 2, 5.0)], capture=["attn_pattern.1"])
    frozen = feature_intervention(gpt2, tc, ids, [(0, None, 2, 5.0)], freeze_attention=True,
                                  capture=["attn_pattern.1"])
    assert float((free.cache["attn_pattern.1"] - clean).abs().max()) > 1e-4
    torch.testing.assert_close(frozen.cache["attn_pattern.1"], clean, rtol=0, atol=0)
    assert not torch.equal(frozen.output, free.output)  # small here: the random model attends almost uniformly


def test_generation_applies_open_ended_edits(gpt2):
    tc = random_transcoder(64, 2, cross_layer=False, seed=9)
    ids = torch.randint(1, 100, (1, 4), generator=torch.Generator().manual_seed(2))
    out = generate(gpt2, tc, ids, [(1, None, 0, 30.0)], max_new_tokens=3)
    assert out.shape == (1, 7) and torch.equal(out[:, :4], ids)
    step = feature_intervention(gpt2, tc, out[:, :6], [(1, None, 0, 30.0)]).output[0, -1].argmax()
    assert int(out[0, 6]) == int(step)  # the last token is the edited model's choice on the grown prompt
    plain = generate(gpt2, tc, ids, [], max_new_tokens=3)
    assert not torch.equal(plain, out)


def total_effects(graph, target: int) -> torch.Tensor:
    """Per feature, the change of target ``target`` per unit change of its activation in the local replacement
    model, through every path: ``[(I - M)^-1]`` with ``M`` the adjacency per unit of each source feature
    (a feature's change moves every active feature it reaches, which moves the target in turn)."""
    A = graph.dense()
    M = A.clone()
    M[:, : graph.n_features] /= graph.activations.to(A.dtype)[None]
    total = torch.linalg.inv(torch.eye(graph.n_nodes, dtype=A.dtype) - M)
    return total[graph.target_index(target), : graph.n_features]


def _steering_check(m, tc, prompt, top: int = 3):
    """Ablate each of the ``top`` features the graph says move the top logit most: the real model's logit
    (attention frozen, MLPs and norms free) moves the way the local replacement model predicts."""
    graph = attribution_graph(m, tc, prompt, progress=False)
    target = graph.targets[0]
    effect = total_effects(graph, 0)
    base = target.value(m.capture(prompt, ["logits"])["logits"])[0]
    out = []
    for k in effect.abs().argsort(descending=True)[:top].tolist():
        L, p, f = graph.features[k].tolist()
        a = float(graph.activations[k])
        logits = feature_intervention(m, tc, prompt, [(L, p, f, 0.0)], freeze_attention=True,
                                      capture=["logits"]).cache["logits"]
        moved, predicted = float(target.value(logits.to(target.direction.dtype))[0] - base), -float(effect[k]) * a
        assert moved * predicted > 0, (moved, predicted, (L, p, f))
        out.append((moved, predicted))
    return out


def test_steering_a_zoo_models_feature_moves_the_logit_as_the_graph_predicts(tmp_path, monkeypatch):
    from crosspatch import zoo
    from crosspatch.methods.attribution_graph.zoo import build_transcoders
    from crosspatch.trainable.transcoder import load_transcoder
    from crosspatch.zoo.store import TrainSettings

    monkeypatch.setenv("CROSSPATCH_CACHE", str(tmp_path / "cache"))
    metrics = build_transcoders("ioi-gpt2-tiny", "ioi", tmp_path, TrainSettings(seed=0, steps=100, progress=False),
                                n_features=64, base_steps=20)
    assert 0 < metrics["fvu"] < 1 and len(metrics["fvu_per_layer"]) == 2
    loaded = zoo.load("ioi-gpt2-tiny", steps=20, progress=False)
    m = cp.wrap(loaded.model, tokenizer=loaded.tokenizer)
    tc = load_transcoder(tmp_path / "transcoder")
    # a base model trained 20 steps: only the graph's strongest feature is asked to agree (the full models' top
    # three on two prompts are, in the CROSSPATCH_SLOW test below)
    _steering_check(m, tc, "When Mary and John went to the store, John gave a drink to", top=1)


@pytest.mark.skipif(not os.environ.get("CROSSPATCH_SLOW"), reason="trains the zoo's transcoders (CROSSPATCH_SLOW=1)")
def test_steering_the_trained_zoo_transcoders():
    from crosspatch import zoo
    from crosspatch.methods.attribution_graph import zoo as entries
    from crosspatch.plugins.registry import get_registry

    if "ioi-gpt2-tiny-transcoders" not in zoo.models():
        get_registry().register(entries, "attribution-graph-zoo")
    loaded = zoo.load("ioi-gpt2-tiny", progress=False)
    m = cp.wrap(loaded.model, tokenizer=loaded.tokenizer)
    tc = zoo.load("ioi-gpt2-tiny-transcoders", progress=False).model
    for prompt in ("When Mary and John went to the store, John gave a drink to",
                   "When Tom and Anna went to the park, Anna gave a ball to"):
        _steering_check(m, tc, prompt)
