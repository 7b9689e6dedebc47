"""Metrics against hand computations on small logit tensors (and once through a real sweep)."""

from __future__ import annotations

import math

import pytest
import torch

import crosspatch as cp
from crosspatch.results.metrics import Metric, MetricContext, as_metric, kl_to_clean, logit_diff, logprob, probability

close = torch.testing.assert_close


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 4, 6, generator=g, dtype=torch.float64)  # [rows, pos, vocab]


def hand_logprob(row: torch.Tensor, token: int) -> float:
    values = [float(v) for v in row]
    return values[token] - math.log(sum(math.exp(v) for v in values))


# ---------------------------------------------------------------- logit_diff / probability / logprob


def test_logit_diff_shared_ids(logits):
    got = logit_diff(2, 5)(logits)
    want = torch.tensor([logits[b, -1, 2] - logits[b, -1, 5] for b in range(3)], dtype=torch.float64)
    close(got, want)
    assert got.shape == (3,)


def test_logit_diff_per_prompt_ids_and_pos(logits):
    answers, distractors = [0, 3, 5], torch.tensor([1, 1, 2])
    got = logit_diff(answers, distractors, pos=1)(logits)
    want = torch.stack([logits[b, 1, answers[b]] - logits[b, 1, distractors[b]] for b in range(3)])
    close(got, want)


def test_logit_diff_is_antisymmetric(logits):
    close(logit_diff(1, 4)(logits), -logit_diff(4, 1)(logits))
    assert torch.all(logit_diff(3, 3)(logits) == 0)


def test_probability_and_logprob_hand(logits):
    tokens = [4, 0, 2]
    p = probability(tokens)(logits)
    lp = logprob(tokens, pos=-1)(logits)
    want = torch.tensor([hand_logprob(logits[b, -1], tokens[b]) for b in range(3)])
    close(lp, want, check_dtype=False)
    close(p, want.exp(), check_dtype=False)
    close(p.log(), lp)
    # a shared token and another position
    close(
        probability(3, pos=0)(logits),
        torch.tensor([math.exp(hand_logprob(logits[b, 0], 3)) for b in range(3)]),
        check_dtype=False,
    )


def test_probabilities_over_all_tokens_sum_to_one(logits):
    total = sum(probability(t)(logits) for t in range(6))
    close(total, torch.ones(3), check_dtype=False)


def test_probability_of_half_precision_logits_is_computed_in_float32(logits):
    half = logits.half()
    p = probability(1)(half)
    assert p.dtype == torch.float32
    close(p, probability(1)(half.float()))


def test_metrics_on_outputs_without_a_position_axis(logits):
    flat = logits[:, -1]  # [rows, labels], e.g. sequence classification
    close(logit_diff(2, 5)(flat), logit_diff(2, 5)(logits))
    close(logprob(1)(flat), logprob(1)(logits))
    close(probability([1, 2, 3])(flat), probability([1, 2, 3])(logits))


# ---------------------------------------------------------------- kl_to_clean


def test_kl_to_clean_hand(logits):
    g = torch.Generator().manual_seed(6)
    patched = logits + 0.5 * torch.randn(logits.shape, generator=g, dtype=torch.float64)
    ctx = MetricContext(torch.arange(3), clean=logits)
    got = kl_to_clean()(patched, ctx)
    want = []
    for b in range(3):
        kl = 0.0
        for t in range(6):
            lc, lq = hand_logprob(logits[b, -1], t), hand_logprob(patched[b, -1], t)
            kl += math.exp(lc) * (lc - lq)  # KL(clean || patched)
        want.append(kl)
    close(got, torch.tensor(want), check_dtype=False, rtol=1e-5, atol=1e-6)
    assert torch.all(got > 0)


def test_kl_to_clean_is_zero_for_the_clean_output(logits):
    ctx = MetricContext(torch.arange(3), clean=logits)
    close(kl_to_clean()(logits, ctx), torch.zeros(3), check_dtype=False, atol=1e-6, rtol=0)
    close(kl_to_clean(pos=1)(logits, ctx), torch.zeros(3), check_dtype=False, atol=1e-6, rtol=0)
    # shifting all logits of a row leaves the distribution, hence the KL, unchanged
    close(kl_to_clean()(logits + 3.0, ctx), torch.zeros(3), check_dtype=False, atol=1e-5, rtol=0)


def test_kl_to_clean_is_not_symmetric_and_uses_clean_as_reference(logits):
    other = 2.0 * logits + 0.3  # a sharper distribution (a flip would be symmetric: it is an involution)
    forward = kl_to_clean()(other, MetricContext(torch.arange(3), clean=logits))
    backward = kl_to_clean()(logits, MetricContext(torch.arange(3), clean=other))
    assert torch.all(forward > 0) and torch.all(backward > 0)
    assert not torch.allclose(forward, backward)


def test_kl_to_clean_needs_the_clean_output(logits):
    with pytest.raises(ValueError, match=r"needs the clean output.*ctx.clean"):
        kl_to_clean()(logits)


# ---------------------------------------------------------------- per-prompt targets with ctx.example


def test_per_prompt_answers_follow_ctx_example_when_tiled(logits):
    k = 3
    tiled = logits.repeat(k, 1, 1)  # block order: prompts 0,1,2, then again
    ctx = MetricContext(torch.arange(3).repeat(k), clean=logits)
    answers, distractors = [0, 3, 5], [1, 1, 2]
    for metric in (logit_diff(answers, distractors), probability(answers), logprob(answers), kl_to_clean()):
        got = metric(tiled, ctx)
        single = metric(logits, MetricContext(torch.arange(3), clean=logits))
        assert got.shape == (9,)
        close(got, single.repeat(k))


def test_per_prompt_answers_are_indexed_by_ctx_example_in_any_order(logits):
    answers, distractors = [0, 3, 5], [1, 1, 2]
    example = torch.tensor([2, 2, 0, 1, 0])
    rows = logits[example]
    got = logit_diff(answers, distractors)(rows, MetricContext(example))
    want = torch.stack([rows[r, -1, answers[e]] - rows[r, -1, distractors[e]] for r, e in enumerate(example.tolist())])
    close(got, want)
    close(probability(answers)(rows, MetricContext(example)), probability(answers)(logits)[example])


def test_ctx_example_picks_the_clean_row_for_kl(logits):
    # rows of the run are prompts 2, 0, 0, 1: each compares with its own clean row
    run = logits[[2, 0, 0, 1]]
    ctx = MetricContext(torch.tensor([2, 0, 0, 1]), clean=logits)
    close(kl_to_clean()(run, ctx), torch.zeros(4), check_dtype=False, atol=1e-6, rtol=0)
    wrong = MetricContext(torch.tensor([0, 1, 2, 0]), clean=logits)
    assert torch.all(kl_to_clean()(run, wrong)[[0, 1, 3]] > 0)


def test_per_prompt_answers_in_a_real_sweep_match_one_at_a_time(toy):
    g = torch.Generator().manual_seed(7)
    clean, corrupt = torch.randn(4, 5, 4, generator=g), torch.randn(4, 5, 4, generator=g)
    answers, distractors = [0, 1, 2, 0], [1, 2, 0, 2]
    metric = logit_diff(answers, distractors)
    res = cp.activation_patching(toy, clean, corrupt, "hidden.*[pos=*]", metric, batch_size=8, progress=False)
    cache = toy.capture(clean, "hidden.*")
    base = metric(toy.run(corrupt).output)
    for layer in range(2):
        for pos in range(5):
            patched = toy.run(corrupt, {f"hidden.{layer}[pos={pos}]": cp.Patch(cache)}).output
            want = (metric(patched) - base).double().mean().item()
            assert res.values[layer, pos] == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------- padding


def test_last_position_with_right_padding_is_each_rows_last_real_token(logits):
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    ctx = MetricContext(torch.arange(3), clean=logits, attention_mask=mask)
    last = [3, 1, 0]
    want = torch.stack([logits[b, last[b], 2] - logits[b, last[b], 4] for b in range(3)])
    close(logit_diff(2, 4)(logits, ctx), want)
    close(logprob(1)(logits, ctx), torch.stack([logits[b, last[b]].log_softmax(-1)[1] for b in range(3)]))
    # an explicit position ignores the mask
    close(logit_diff(2, 4, pos=3)(logits, ctx), logit_diff(2, 4, pos=3)(logits))
    # kl: patched at the padding positions only changes nothing
    patched = logits.clone()
    patched[1, 2:] += 5.0
    patched[2, 1:] -= 4.0
    close(kl_to_clean()(patched, ctx), torch.zeros(3), check_dtype=False, atol=1e-6, rtol=0)


def test_last_position_with_left_padding_is_each_rows_last_real_token(logits):
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]])
    ctx = MetricContext(torch.arange(3), attention_mask=mask)
    # the last real token of every left-padded row is position 3
    close(logit_diff(2, 4)(logits, ctx), logit_diff(2, 4, pos=3)(logits))


# ---------------------------------------------------------------- as_metric and Metric


def test_as_metric_wraps_a_one_argument_callable(logits):
    def top(output):
        return output[:, -1].max(-1).values

    m = as_metric(top)
    assert isinstance(m, Metric) and m.name == "top"
    close(m(logits), logits[:, -1].max(-1).values)
    close(m(logits, MetricContext(torch.arange(3))), logits[:, -1].max(-1).values)


def test_as_metric_wraps_a_two_argument_callable_and_passes_ctx(logits):
    seen = []

    def by_example(output, ctx):
        seen.append(ctx)
        return output[torch.arange(output.shape[0]), -1, ctx.example]

    m = as_metric(by_example)
    ctx = MetricContext(torch.tensor([2, 0, 1]))
    close(m(logits, ctx), torch.stack([logits[0, -1, 2], logits[1, -1, 0], logits[2, -1, 1]]))
    assert seen[-1] is ctx
    # without a ctx the metric gets a plain one: example = arange(rows)
    m(logits)
    assert torch.equal(seen[-1].example, torch.arange(3)) and seen[-1].clean is None


def test_as_metric_wraps_lambdas_and_callable_objects(logits):
    one = as_metric(lambda out: out[:, 0, 0])
    close(one(logits), logits[:, 0, 0])

    class Picker:
        def __call__(self, output, ctx):
            return output[:, -1, 1] * 2

    obj = as_metric(Picker())
    assert obj.name == "Picker"
    close(obj(logits), logits[:, -1, 1] * 2)


def test_as_metric_returns_a_metric_unchanged():
    m = logit_diff(0, 1)
    assert as_metric(m) is m


@pytest.mark.parametrize(
    "fn, shown",
    [
        (lambda out: out.sum(), r"returned \(\)"),
        (lambda out: 1.5, "returned float"),
        (lambda out: out[:2, 0, 0], r"returned \(2,\)"),
        (lambda out: out[:, -1], r"returned \(3, 6\)"),
    ],
)
def test_metric_with_wrong_shape_raises_clear_value_error(logits, fn, shown):
    with pytest.raises(ValueError, match=shown + r"; a metric returns one value per batch row, shape \(3,\)"):
        as_metric(fn)(logits)


def test_scalar_metric_in_a_method_raises_before_any_sweep(toy):
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match=r"metric '<lambda>' returned \(\)"):
        cp.activation_patching(toy, x, x + 1, "hidden.0[pos=*]", lambda out: out.sum(), progress=False)


def test_metrics_on_a_toy_run_match_hand(toy):
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(8))
    out = toy.run(x).output  # [rows, pos, class=3]
    with torch.no_grad():
        hand = toy.module(x)[:, -1]
    close(logit_diff([0, 2], [1, 1])(out), torch.stack([hand[0, 0] - hand[0, 1], hand[1, 2] - hand[1, 1]]))
    close(probability(2)(out), hand.softmax(-1)[:, 2])


# ---------------------------------------------------------------- wrong answers name the argument and sizes


def test_logit_diff_with_too_few_answers_names_the_argument_and_sizes(logits):
    ctx = MetricContext(torch.arange(3))
    with pytest.raises(ValueError, match=r"logit_diff answer has 2 ids but the run has 3 prompts"):
        logit_diff([1, 2], 3)(logits, ctx)
    with pytest.raises(ValueError, match=r"logit_diff distractor has 1 ids but the run has 3 prompts"):
        logit_diff([1, 2, 3], [4])(logits, ctx)


def test_ids_outside_the_vocabulary_name_the_argument_and_the_vocabulary(logits):
    with pytest.raises(ValueError, match=r"logit_diff answer holds token id 6, outside the output's vocabulary of 6"):
        logit_diff(6, 1)(logits)
    with pytest.raises(ValueError, match=r"logit_diff distractor holds token id -1"):
        logit_diff(0, [1, -1, 2])(logits)
    with pytest.raises(ValueError, match=r"probability token holds token id 10"):
        probability(10)(logits)
    with pytest.raises(ValueError, match=r"answer must be token ids.*float"):
        logit_diff(torch.tensor([1.0, 2.0, 3.0]), 0)(logits)


def test_text_answers_resolve_with_a_token_id_function(logits):
    ids = {" a": 1, " b": 4}
    metric = logit_diff(" a", " b")
    assert metric.needs_tokens
    resolved = metric.resolve(lambda text, what: ids[text])
    close(resolved(logits), logit_diff(1, 4)(logits))
    per_prompt = logit_diff([" a", " b", " a"], 0).resolve(lambda text, what: ids[text])
    close(per_prompt(logits), logit_diff([1, 4, 1], 0)(logits))
    close(logprob(" b").resolve(lambda t, w: ids[t])(logits), logprob(4)(logits))


def test_negative_positions_count_back_from_each_rows_last_real_token():
    """pos=-2 with right padding reads the token before each row's last real one, as pos=-1 reads the last."""
    logits = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ctx = cp.metrics.MetricContext(torch.arange(2), None, mask)
    for pos, columns in ((-1, [2, 4]), (-2, [1, 3])):
        got = cp.metrics.logit_diff(0, 1, pos=pos)(logits, ctx)
        expected = torch.stack([logits[r, c, 0] - logits[r, c, 1] for r, c in enumerate(columns)])
        torch.testing.assert_close(got, expected)
