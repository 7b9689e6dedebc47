"""EAP, EAP-IG, ACDC and learned edge masks take text prompts and text answers (``logit_diff(" Mary", " John")``)
through the wrapped model's tokenizer, and give exactly what they give on the token ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import crosspatch as cp
from crosspatch.engine.text import TokenizationError
from crosspatch.methods.edge_masks import learn_edge_masks
from crosspatch.methods.edges import acdc, eap, eap_ig, edge_graph

pytest.importorskip("transformers")

from test_text import CLEAN, CORRUPT, tok  # noqa: E402,F401  (tok: a fixture)


@pytest.fixture(scope="module")
def m(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # larger weights than the default init, so the pair's logit difference is not ~0
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=len(tok),
                                       initializer_range=0.5))
    return cp.wrap(model.eval(), tokenizer=tok)


@pytest.fixture(scope="module")
def by_ids(tok):
    ids = lambda text: torch.tensor([tok.encode(text)])  # noqa: E731
    answer, distractor = tok.convert_tokens_to_ids("Mary"), tok.convert_tokens_to_ids("John")
    return ids(CLEAN), ids(CORRUPT), cp.metrics.logit_diff(answer, distractor)


def test_eap_and_eap_ig_on_text_equal_them_on_ids(m, by_ids):
    clean, corrupt, metric = by_ids
    text_metric = cp.metrics.logit_diff(" Mary", " John")
    g = edge_graph(m)
    np.testing.assert_array_equal(eap(m, CLEAN, CORRUPT, text_metric, graph=g).values,
                                  eap(m, clean, corrupt, metric, graph=g).values)
    np.testing.assert_array_equal(eap_ig(m, [CLEAN], [CORRUPT], text_metric, steps=2, graph=g).values,
                                  eap_ig(m, clean, corrupt, metric, steps=2, graph=g).values)


def test_acdc_and_edge_masks_on_text_equal_them_on_ids(m, by_ids):
    clean, corrupt, metric = by_ids
    text_metric = cp.metrics.logit_diff(" Mary", " John")
    g = edge_graph(m)
    gap = float(metric(m.run(clean).output) - metric(m.run(corrupt).output))
    a = acdc(m, CLEAN, CORRUPT, text_metric, threshold=0.02 * abs(gap), graph=g)
    b = acdc(m, clean, corrupt, metric, threshold=0.02 * abs(gap), graph=g)
    assert a.metadata["kept"] == b.metadata["kept"] and a.metadata["final_metric"] == b.metadata["final_metric"]
    assert 0 < len(a.metadata["kept"]) < len(g)  # the threshold removes some edges and keeps some
    kw = dict(graph=g, steps=3, sparsity=0.5)
    x = learn_edge_masks(m, CLEAN, CORRUPT, cp.metrics.logit_diff(" Mary", " John"), **kw)
    y = learn_edge_masks(m, clean, corrupt, metric, **kw)
    np.testing.assert_array_equal(x.values, y.values)


def test_text_of_different_lengths_and_bad_answers_are_refused(m):
    with pytest.raises(TokenizationError, match="5 and 4 tokens"):
        eap(m, "When Mary and John went", "When Mary and John", cp.metrics.logit_diff(" Mary", " John"))
    with pytest.raises(TokenizationError, match="answer ' Mary John' is 2 tokens"):
        acdc(m, CLEAN, CORRUPT, cp.metrics.logit_diff(" Mary John", " John"), threshold=0.1)
