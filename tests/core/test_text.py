"""Text in, tokens out: a tokenizer on the wrapped model, text through runs, captures and methods,
metrics with text answers, tokenisation errors shown side by side, results labelled with tokens."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.engine.model import TrainingModeWarning
from crosspatch.engine.text import TokenizationError

pytest.importorskip("transformers")

from fake_zoo import FAKE, fake_zoo  # noqa: E402,F401  (a fixture)

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Paul gave a drink to"


@pytest.fixture(scope="module")
def tok():
    from crosspatch.adapters.transformers.zoo import word_tokenizer
    from crosspatch.zoo.tasks import IOITask

    return word_tokenizer(IOITask().vocabulary())


@pytest.fixture(scope="module")
def model(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=len(tok))
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def m(model, tok):
    return cp.wrap(model, tokenizer=tok)


def ids_of(tok, text):
    return torch.tensor([tok.encode(text)])


# ---------------------------------------------------------------- 1. training mode


def test_wrap_puts_a_model_in_training_mode_into_eval_mode_and_says_so_once():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16))
    assert model.training  # as transformers builds it: dropout is active
    assert cp.TrainingModeWarning is TrainingModeWarning
    with pytest.warns(TrainingModeWarning, match=r"GPT2LMHeadModel was in training mode.*train_ok=True"):
        m = cp.wrap(model)
    assert not model.training and not any(mod.training for mod in model.modules())
    x = torch.randint(0, 50, (2, 6))
    assert torch.equal(m.run(x).output, m.run(x).output)  # dropout would make these differ
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cp.wrap(model)  # already in eval mode: nothing to say
        cp.activation_patching(m, x, x, "resid_pre.0", lambda out: out[:, -1, 0], progress=False)

    model.train()  # put back into training mode after wrapping: the next method run switches it again
    with pytest.warns(TrainingModeWarning):
        cp.activation_patching(m, x, x, "resid_pre.0", lambda out: out[:, -1, 0], progress=False)
    assert not model.training


def test_train_ok_keeps_training_mode_without_a_warning():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = cp.wrap(model, train_ok=True)
        cp.wrap(m)
    assert model.training and m.train_ok


# ---------------------------------------------------------------- 2. text in


def test_tokens_and_str_tokens(m, tok):
    assert torch.equal(m.tokens(CLEAN), ids_of(tok, CLEAN))
    assert m.to_str_tokens("When Mary and John") == ["When", "Mary", "and", "John"]
    assert m.to_str_tokens(["When Mary", "John"]) == [["When", "Mary"], ["John"]]
    assert m.to_str_tokens(ids_of(tok, "When Mary")[0]) == ["When", "Mary"]
    assert m.token_id(" Mary") == tok.convert_tokens_to_ids("Mary")


def test_text_runs_and_captures_equal_their_ids(m, tok):
    ids = ids_of(tok, CLEAN)
    by_text = m.capture(CLEAN, "resid_post.*")
    by_ids = m.capture(ids, "resid_post.*")
    for key in by_ids:
        assert torch.equal(by_text[key], by_ids[key])
    patched = m.run(CORRUPT, {"resid_post.0[pos=9]": cp.Patch(CLEAN)}).output
    want = m.run(ids_of(tok, CORRUPT), {"resid_post.0[pos=9]": cp.Patch(ids)}).output
    assert torch.equal(patched, want)


def test_a_list_of_texts_of_different_lengths_is_padded_with_a_mask(m, tok):
    texts = ["When Mary and John went to the store", "When Mary went"]
    prepared = m.prepare(texts)
    assert prepared["input_ids"].shape == (2, 8)
    assert prepared["attention_mask"].tolist() == [[1] * 8, [1, 1, 1] + [0] * 5]  # right padding
    assert prepared["input_ids"][1, 3:].tolist() == [tok.pad_token_id] * 5
    # the short prompt's real tokens read the same values as when it runs alone
    alone = m.capture("When Mary went", "resid_post.1")["resid_post.1"][0]
    batched = m.capture(texts, "resid_post.1")["resid_post.1"][1, :3]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_activation_patching_on_text_equals_it_on_ids(m, tok):
    metric_ids = cp.metrics.logit_diff(tok.convert_tokens_to_ids("Mary"), tok.convert_tokens_to_ids("John"))
    by_ids = cp.activation_patching(m, ids_of(tok, CLEAN), ids_of(tok, CORRUPT), "resid_pre.*[pos=*]", metric_ids,
                                    progress=False)
    by_text = cp.activation_patching(m, CLEAN, CORRUPT, "resid_pre.*[pos=*]",
                                     cp.metrics.logit_diff(" Mary", " John"), progress=False)
    np.testing.assert_array_equal(by_text.values, by_ids.values)
    # lists of texts, one answer per prompt
    two = cp.activation_patching(m, [CLEAN, CLEAN], [CORRUPT, CORRUPT], "resid_pre.1[pos=9]",
                                 cp.metrics.logit_diff([" Mary", " Mary"], [" John", " John"]), progress=False)
    np.testing.assert_allclose(two.values, by_ids.sel(layer=1, pos=9).values, atol=1e-6)


def test_different_token_lengths_show_both_tokenisations(m):
    with pytest.raises(TokenizationError) as info:
        cp.activation_patching(m, "When Mary and John went", "When Mary and John", "resid_pre.*",
                               cp.metrics.logit_diff(" Mary", " John"), progress=False)
    message = str(info.value)
    assert "5 and 4 tokens" in message and "pad" in message
    lines = message.splitlines()
    assert lines[1].split() == ["pos", "clean", "corrupt"]
    assert lines[2].split() == ["0", "'When'", "'When'"] and lines[6].split() == ["4", "'went'", "-"]


def test_a_multi_token_answer_shows_its_tokens(m):
    with pytest.raises(TokenizationError, match=r"answer ' Mary John' is 2 tokens.*\['Mary', 'John'\]"):
        cp.activation_patching(m, CLEAN, CORRUPT, "resid_pre.0", cp.metrics.logit_diff(" Mary John", " John"),
                               progress=False)
    with pytest.raises(TokenizationError, match="distractor ' ' is 0 tokens"):
        cp.activation_patching(m, CLEAN, CORRUPT, "resid_pre.0", cp.metrics.logit_diff(" Mary", " "),
                               progress=False)


def test_a_word_outside_the_vocabulary_raises_naming_it(m):
    with pytest.raises(TokenizationError, match=r"does not know 'Zork' in 'When Zork went'"):
        m.capture("When Zork went", "resid_pre.0")
    with pytest.raises(TokenizationError, match="'Zork'"):
        cp.activation_patching(m, CLEAN, CORRUPT, "resid_pre.0", cp.metrics.logit_diff(" Zork", " John"),
                               progress=False)


def test_text_without_a_tokenizer_says_how_to_give_one(model):
    m = cp.wrap(model)
    with pytest.raises(TokenizationError, match=r"no tokenizer.*cp.wrap\(model, tokenizer=tok\)"):
        m.capture(CLEAN, "resid_pre.0")
    metric = cp.metrics.logit_diff(" Mary", " John")
    assert metric.needs_tokens
    with pytest.raises(ValueError, match=r"text answers.*metric.resolve\(m.token_id\)"):
        metric(torch.zeros(1, 3, 10))


def test_a_checkpoint_folder_brings_its_tokenizer(model, tok, tmp_path):
    model.save_pretrained(tmp_path / "with")
    tok.save_pretrained(tmp_path / "with")
    m = cp.wrap(str(tmp_path / "with"))
    assert m.tokenizer is not None and m.to_str_tokens("When Mary") == ["When", "Mary"]
    model.save_pretrained(tmp_path / "without")
    m = cp.wrap(tmp_path / "without")
    assert m.tokenizer is None
    with pytest.raises(TokenizationError, match=r"checkpoint folder .*without holds no tokenizer"):
        m.tokens("When Mary")
    with pytest.raises(cp.zoo.ZooError, match="there is no folder"):
        cp.wrap(str(tmp_path / "nowhere"))


def test_a_zoo_model_brings_its_tokenizer(fake_zoo):
    m = cp.wrap(FAKE)
    assert m.tokenizer is not None and not m.module.training
    assert m.to_str_tokens("When Mary and John") == ["When", "Mary", "and", "John"]
    with pytest.raises(cp.zoo.ZooError, match=r"did you mean 'fake-ioi-tiny'\?"):
        cp.wrap("fake-ioi-tiyn")


# ---------------------------------------------------------------- 3. results carry their tokens


def test_results_are_labelled_with_tokens_and_mark_skipped_sites(m, tok):
    res = cp.activation_patching(m, CLEAN, CORRUPT, "resid_pre.*[pos=*]", cp.metrics.logit_diff(" Mary", " John"),
                                 progress=False)
    assert res.coords["pos"][:4] == ["0 When", "1 Mary", "2 and", "3 John"] and res.coords["pos"][9] == "9 John"
    assert res.sel(pos=9).dims == ("layer",)  # an int still picks a position
    # causal model: before position 9 (the first that differs) patching changes nothing and is not run
    assert res.skipped[:, :9].all() and not res.skipped[:, 9].any()
    assert res.metadata["sites_run"] == int((~res.skipped).sum())
    assert (res.values[res.skipped] == 0).all()

    # ids with a known tokenizer are labelled too
    by_ids = cp.activation_patching(m, ids_of(tok, CLEAN), ids_of(tok, CORRUPT), "resid_pre.1[pos=*]",
                                    cp.metrics.logit_diff(" Mary", " John"), progress=False)
    assert by_ids.coords["pos"][1] == "1 Mary"

    figure = res.plot()
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == res.coords["pos"]
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == int(res.skipped.sum())
    assert "0 by construction" in ax.get_legend().get_texts()[0].get_text()


def test_attribution_patching_takes_text_and_labels_positions(m):
    res = cp.attribution_patching(m, CLEAN, CORRUPT, "resid_pre.*[pos=*]", cp.metrics.logit_diff(" Mary", " John"))
    assert res.coords["pos"][9] == "9 John" and res.values.shape == (2, 14)
