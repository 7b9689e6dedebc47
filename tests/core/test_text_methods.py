"""Every method beyond activation, attribution and path patching takes text inputs and text answers as
activation patching does (the same numbers as token ids and id answers), and the methods that build
caches from rows of a run keep their attention mask, so ``pos=last`` on inputs padded on the right gives
the numbers of explicit per-row positions (each prompt run alone, unpadded, at its own last token)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crosspatch as cp
from crosspatch.engine.text import TokenizationError

pytest.importorskip("transformers")

# Pairs of equal token length; the two rows differ in length, so a batch of them is padded on the right.
CLEAN = ["When Mary and John went to the store , John gave a drink to", "When Mary and John went , John gave it to"]
CORRUPT = ["When Mary and John went to the store , Paul gave a drink to", "When Mary and John went , Paul gave it to"]
SAME = [CLEAN[0], CLEAN[0].replace("Mary", "Anna").replace("John", "Paul")]  # two prompts of one length
SAME_CORRUPT = [CORRUPT[0], CORRUPT[0].replace("Mary", "Anna")]


@pytest.fixture(scope="module")
def tok():
    from crosspatch.adapters.transformers.zoo import word_tokenizer
    from crosspatch.zoo.tasks import IOITask

    vocab = IOITask().vocabulary()
    return word_tokenizer(vocab + [w for w in ("it",) if w not in vocab])


@pytest.fixture(scope="module")
def model(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import randomize

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=len(tok),
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # IIT trains in training mode
                        initializer_range=0.2)  # effects well above float rounding
    return randomize(GPT2LMHeadModel(config).eval())


@pytest.fixture
def m(model, tok):
    return cp.wrap(model, tokenizer=tok)


def ids(tok, texts):
    return {"input_ids": torch.tensor([tok.encode(t) for t in texts])}


def tid(tok, word):
    return tok.convert_tokens_to_ids(word)


def text_and_ids(tok):
    """The same metric with text answers and with token ids."""
    return cp.metrics.logit_diff(" Mary", " John"), cp.metrics.logit_diff(tid(tok, "Mary"), tid(tok, "John"))


# ---------------------------------------------------------------- text answers, one method each


def test_mediation_takes_text(m, tok):
    by_text, by_ids = text_and_ids(tok)
    a = cp.mediation(m, SAME, SAME_CORRUPT, ["head_out.1[head=0]", "mlp_out.0"], by_text, n_boot=50)
    b = cp.mediation(m, ids(tok, SAME), ids(tok, SAME_CORRUPT), ["head_out.1[head=0]", "mlp_out.0"], by_ids, n_boot=50)
    assert a.estimates == b.estimates and a.te != 0
    assert a.metadata["metric"] == "logit_diff"


def test_steering_takes_text(m, tok):
    by_text, by_ids = text_and_ids(tok)
    site = "resid_post.0[pos=-1]"
    a = cp.steering_curve(m, SAME, site, [-1.0, 0.0, 2.0], by_text, contrast=(SAME, SAME_CORRUPT))
    b = cp.steering_curve(m, ids(tok, SAME), site, [-1.0, 0.0, 2.0], by_ids, contrast=(ids(tok, SAME), ids(tok, SAME_CORRUPT)))
    np.testing.assert_array_equal(a.values, b.values)
    assert a.values[1] == 0 and a.values[2] != 0


def test_sae_feature_sweeps_take_text(m, tok):
    from crosspatch.methods.sae_patching import sae_feature_ablation, sae_feature_patching

    sae = cp.SAE(32, 6, "relu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    by_text, by_ids = text_and_ids(tok)
    site = "resid_post.0[pos=-1]"
    a = sae_feature_patching(m, SAME, SAME_CORRUPT, site, sae, by_text, progress=False)
    b = sae_feature_patching(m, ids(tok, SAME), ids(tok, SAME_CORRUPT), site, sae, by_ids, progress=False)
    np.testing.assert_array_equal(a.values, b.values)
    c = sae_feature_ablation(m, SAME, site, sae, by_text, progress=False)
    d = sae_feature_ablation(m, ids(tok, SAME), site, sae, by_ids, progress=False)
    np.testing.assert_array_equal(c.values, d.values)
    assert np.abs(a.values).max() > 0 and np.abs(c.values).max() > 0
    with pytest.raises(TokenizationError, match="5 and 4 tokens"):  # shown side by side, as activation patching does
        sae_feature_patching(m, "When Mary and John went", "When Mary and John", site, sae, by_text)


def test_faithfulness_takes_text(m, tok):
    by_text, by_ids = text_and_ids(tok)
    heads = "head_out.*[head=*]"
    circuit = ["head_out.1[head=0]", "head_out.1[head=2]"]
    a = cp.faithfulness_table(m, SAME, circuit, heads, by_text, ablations=("zero", "mean"))
    b = cp.faithfulness_table(m, ids(tok, SAME), circuit, heads, by_ids, ablations=("zero", "mean"))
    np.testing.assert_array_equal(a.values, b.values)
    assert a.metadata["full"] == b.metadata["full"] != 0


def test_causal_scrubbing_takes_text(m, tok):
    from crosspatch.methods.scrubbing import Hypothesis, causal_scrubbing

    by_text, by_ids = text_and_ids(tok)
    texts = SAME + [SAME[0]]
    # a key on the text itself: the name at word 3 (token 3)
    hyp_text = Hypothesis({"resid_post.0": lambda s: s.split()[3]}, others=["mlp_out.1"])
    hyp_ids = Hypothesis({"resid_post.0": lambda row: int(row["input_ids"][3])}, others=["mlp_out.1"])
    a = causal_scrubbing(m, texts, hyp_text, by_text, samples=2)
    b = causal_scrubbing(m, ids(tok, texts), hyp_ids, by_ids, samples=2)
    np.testing.assert_array_equal(a.values, b.values)


def test_path_patching_takes_text_and_labels_sender_positions(m, tok):
    by_text, by_ids = text_and_ids(tok)
    a = cp.path_patching(m, SAME, SAME_CORRUPT, "head_out.0[head=1,pos=*]", "resid_post.1", by_text)
    b = cp.path_patching(m, ids(tok, SAME), ids(tok, SAME_CORRUPT), "head_out.0[head=1,pos=*]", "resid_post.1", by_ids)
    np.testing.assert_array_equal(a.values, b.values)
    assert np.abs(a.values).max() > 0
    assert a.coords["pos"][1] == "1 Mary" and a.coords["pos"][9] == "9 John"


def test_das_takes_text_labels(m, tok):
    site = "resid_post.0[pos=-1]"
    labels = [" Mary", " Anna"]
    a = cp.train_das(m, site, SAME_CORRUPT, SAME, labels, epochs=2, batch_size=2, progress=False)
    b = cp.train_das(m, site, ids(tok, SAME_CORRUPT), ids(tok, SAME), [tid(tok, "Mary"), tid(tok, "Anna")],
                     epochs=2, batch_size=2, progress=False)
    assert a.history == b.history
    assert cp.iia(m, site, a, SAME_CORRUPT, SAME, labels) == cp.iia(m, site, b, ids(tok, SAME_CORRUPT), ids(tok, SAME),
                                                                   [tid(tok, "Mary"), tid(tok, "Anna")])
    with pytest.raises(TokenizationError, match=r"labels ' Mary John' is 2 tokens"):
        cp.train_das(m, site, SAME_CORRUPT, SAME, [" Mary John", " Anna"], epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"one label per pair \(2\)"):
        cp.train_das(m, site, SAME_CORRUPT, SAME, " Mary", epochs=1, progress=False)
    with pytest.raises(TokenizationError, match="no tokenizer"):
        cp.train_das(cp.wrap(m.module), site, ids(tok, SAME_CORRUPT), ids(tok, SAME), labels, epochs=1, progress=False)


def test_iit_takes_text_labels(model, tok):
    from crosspatch.methods.iit import interchange_accuracy

    site = "resid_post.0[pos=-1]"
    runs = []
    for texts, base_labels, cf in [
        ((SAME_CORRUPT, SAME), [" John", " Paul"], [" Mary", " Anna"]),
        ((ids(tok, SAME_CORRUPT), ids(tok, SAME)), [tid(tok, w) for w in ("John", "Paul")],
         [tid(tok, w) for w in ("Mary", "Anna")]),
    ]:
        m = cp.wrap(copy.deepcopy(model), tokenizer=tok)
        losses = cp.train_iit(m, {site: cf}, *texts, base_labels, epochs=2, batch_size=2, lr=1e-3, progress=False)
        runs.append((losses, interchange_accuracy(m, site, *texts, cf)))
    assert runs[0] == runs[1] and runs[0][0][1] != runs[0][0][0]


def test_masks_take_text_labels(m, tok):
    a = cp.train_masks(m, "mlp_out.0", SAME, labels=[" John", " Paul"], epochs=2, mode="sigmoid", progress=False)
    b = cp.train_masks(m, "mlp_out.0", ids(tok, SAME), labels=[tid(tok, "John"), tid(tok, "Paul")], epochs=2,
                       mode="sigmoid", progress=False)
    assert a["mlp_out.0"].history == b["mlp_out.0"].history
    assert torch.equal(a["mlp_out.0"].logits, b["mlp_out.0"].logits)


# ---------------------------------------------------------------- pos=last on right padding


def lengths(tok, texts):
    return [len(tok.encode(t)) for t in texts]


def test_right_padding_is_what_these_tests_run_on(m, tok):
    prepared = m.prepare(CLEAN)
    assert lengths(tok, CLEAN) == lengths(tok, CORRUPT) and len(set(lengths(tok, CLEAN))) == 2
    assert prepared["attention_mask"][1, -1] == 0  # the short row is padded on the right


def test_path_patching_receivers_at_last_equal_each_prompt_at_its_last_token(m, tok):
    metric = cp.metrics.logit_diff(" Mary", " John")
    senders = "head_out.0[head=*]"
    batched = cp.path_patching(m, CLEAN, CORRUPT, senders, "resid_post.0[pos=last]", metric)
    alone = [
        cp.path_patching(m, c, k, senders, f"resid_post.0[pos={n - 1}]", metric).values
        for c, k, n in zip(CLEAN, CORRUPT, lengths(tok, CLEAN))
    ]
    np.testing.assert_allclose(batched.values, np.mean(alone, axis=0), rtol=0, atol=1e-5)
    assert np.abs(batched.values).max() > 1e-3


def test_causal_scrubbing_at_last_equals_each_row_patched_at_its_last_token(m, tok):
    from crosspatch.methods.scrubbing import Hypothesis, _draw, causal_scrubbing, equivalence_classes

    texts = CLEAN + [CORRUPT[0]]
    n, samples, seed = len(texts), 2, 1
    metric = cp.metrics.logit_diff(" Mary", " John")
    key = lambda s: len(s.split()) > 10  # noqa: E731  (the two long prompts are one class)
    site = "resid_post.0[pos=last]"
    res = causal_scrubbing(m, texts, Hypothesis({site: key}), metric, samples=samples, seed=seed)

    # The draws as the method makes them, then every row alone: its last token takes the drawn row's last token.
    rng = np.random.default_rng(seed)
    draws = [_draw(equivalence_classes(key, texts, n), samples, rng), _draw(np.zeros(n, dtype=np.int64), samples, rng)]
    sizes = lengths(tok, texts)
    last = [m.capture(t, "resid_post.0")["resid_post.0"][:, -1:] for t in texts]

    def row_value(r: int, s: int) -> float:
        out = m.run(texts[r], {f"resid_post.0[pos={sizes[r] - 1}]": lambda a: last[s].to(a.dtype)}).output
        return float(metric.resolve(m.token_id)(out))

    expect = [np.mean([row_value(r, int(d[k, r])) for k in range(samples) for r in range(n)]) for d in draws]
    assert len({int(d) for d in draws[1].reshape(-1)}) > 1  # rows of other lengths were drawn
    np.testing.assert_allclose([res.sel(quantity="scrubbed").values, res.sel(quantity="random").values], expect,
                               rtol=0, atol=1e-5)


def _alone_loss(m, tok, site_of, intervention_of, base, source, labels):
    """Mean cross-entropy of each pair run alone (unpadded) with the intervention at its own last token."""
    losses = []
    for b, s, y in zip(base, source, labels):
        n = len(tok.encode(b))
        out = m.run(b, {site_of(n - 1): intervention_of(m.capture(s, "resid_post.0"))}).output[:, -1]
        losses.append(float(F.cross_entropy(out.float(), torch.tensor([m.token_id(y)]))))
    return float(np.mean(losses))


def test_das_at_last_on_right_padding_equals_each_pair_at_its_last_token(m, tok):
    site = "resid_post.0[pos=last]"
    labels = [" Mary", " Anna"]
    start = cp.RotatedSubspace(32, k=4, seed=1)
    trained = cp.train_das(m, site, CORRUPT, CLEAN, labels, intervention=copy.deepcopy(start), epochs=1,
                           batch_size=2, lr=0.0, progress=False)  # lr 0: the loss of the starting rotation

    def with_source(cache):
        moved = copy.deepcopy(start)
        moved.source = cache
        return moved

    expect = _alone_loss(m, tok, lambda p: f"resid_post.0[pos={p}]", with_source, CORRUPT, CLEAN, labels)
    assert trained.history[0] == pytest.approx(expect, abs=1e-5)


def test_iit_at_last_on_right_padding_equals_each_pair_at_its_last_token(model, tok):
    m = cp.wrap(copy.deepcopy(model), tokenizer=tok)
    site = "resid_post.0[pos=last]"
    base_labels, cf = [" John", " Paul"], [" Mary", " Mary"]
    losses = cp.train_iit(m, {site: cf}, CORRUPT, CLEAN, base_labels, epochs=1, batch_size=2, lr=0.0,
                          progress=False)
    task = _alone_loss(m, tok, lambda p: "resid_post.1", lambda cache: (lambda a: a), CORRUPT, CLEAN, base_labels)
    patched = _alone_loss(m, tok, lambda p: f"resid_post.0[pos={p}]", cp.Patch, CORRUPT, CLEAN, cf)
    assert losses[0] == pytest.approx(task + patched, abs=1e-5)


def test_masks_at_last_on_right_padding_equal_each_prompt_at_its_last_token(m, tok):
    site = "resid_post.0[pos=last]"
    start = cp.LearnedMask(32, mode="sigmoid", ablation="source", init=0.5)
    got = cp.train_masks(m, site, CLEAN, source=CORRUPT, masks={site: copy.deepcopy(start)}, sparsity=0.0,
                         epochs=1, batch_size=2, lr=0.0, progress=False)[site]
    kls = []
    for c, k in zip(CLEAN, CORRUPT):
        p = len(tok.encode(c)) - 1
        gate = copy.deepcopy(start)
        gate.source = m.capture(k, "resid_post.0")
        masked = m.run(c, {f"resid_post.0[pos={p}]": gate}).output[:, -1].float()
        clean = m.run(c).output[:, -1].float()
        kls.append(float(F.kl_div(masked.log_softmax(-1), clean.log_softmax(-1), log_target=True, reduction="batchmean")))
    assert got.history[0] == pytest.approx(float(np.mean(kls)), abs=1e-6)
    assert np.mean(kls) > 1e-6


def test_steering_vector_on_padded_texts_averages_real_tokens_only(m, tok):
    """Right-padded prompts give the mean of each prompt's vector computed alone, unpadded: over every
    position (padding skipped) and at each row's last token (pos=last)."""
    negative = [c.replace("Mary", "Anna") for c in CORRUPT]  # differs from CLEAN at positions 1 and 7 or 10
    for pos, site in [(None, "resid_post.0"), (None, "resid_post.0[pos=last]"), (cp.Span(1, 4), "resid_post.0")]:
        batched = cp.steering_vector(m, CLEAN, negative, site, pos=pos)
        alone = torch.stack([cp.steering_vector(m, [c], [k], site, pos=pos) for c, k in zip(CLEAN, negative)]).mean(0)
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
        assert batched.abs().max() > 1e-3
    with pytest.raises(cp.SiteError, match="padded on the right"):
        cp.steering_vector(m, CLEAN, CORRUPT, "resid_post.0[pos=-1]")
