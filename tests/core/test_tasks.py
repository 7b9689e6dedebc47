"""Text tasks (IOI, greater-than): seeded, split, one factor per pair, same length, registered as plugins."""

from __future__ import annotations

import types

import pytest
import torch

from crosspatch.plugins import registry as plugins
from crosspatch.plugins.hookspecs import hookimpl
from crosspatch.results.metrics import MetricContext
from crosspatch.plugins.registry import get_registry, reset_registry
from crosspatch.zoo.tasks import (
    GreaterThanTask,
    IOITask,
    TaskError,
    TextPair,
    get_task,
    greater_than_metric,
    tasks,
    tokenize_pairs,
    words,
)
from crosspatch.zoo.tasks import greater_than as gt
from crosspatch.zoo.tasks import ioi

TEXT_TASKS = [IOITask(), GreaterThanTask()]
ids = pytest.mark.parametrize("task", TEXT_TASKS, ids=lambda t: t.name)


def _zoo_tokenizer(task):
    pytest.importorskip("transformers")
    from crosspatch.adapters.transformers.zoo import word_tokenizer

    return word_tokenizer(task.vocabulary())


# -- seeded, split ---------------------------------------------------------------------


@ids
def test_seeded_and_deterministic(task):
    assert task.pairs(20, seed=3) == task.pairs(20, seed=3)
    assert task.pairs(20, seed=3) != task.pairs(20, seed=4)
    assert task.pairs(20, seed=3, split="train") != task.pairs(20, seed=3, split="test")
    assert task.pairs(5, seed=3) == task.pairs(20, seed=3)[:5]  # a prefix of a longer draw


def test_ioi_train_and_test_names_are_disjoint():
    task = IOITask()
    train, test = set(task.names("train")), set(task.names("test"))
    assert train and test and not train & test
    assert train | test == set(ioi.NAMES) and len(ioi.NAMES) == len(set(ioi.NAMES))
    for split, names in (("train", train), ("test", test)):
        others = set(ioi.NAMES) - names
        for p in task.pairs(300, seed=1, split=split):
            assert {p.meta["io"], p.meta["s"], p.meta["c"]} <= names
            assert len({p.meta["io"], p.meta["s"], p.meta["c"]}) == 3
            assert not set(words(p.clean + " " + p.corrupt)) & others


def test_greater_than_splits_are_disjoint():
    task = GreaterThanTask()
    train, test = set(task.start_years("train")), set(task.start_years("test"))
    assert train and test and not train & test and train | test == set(gt.START_YEARS)
    for split, starts in (("train", train), ("test", test)):
        assert {p.meta["start"] for p in task.pairs(400, seed=2, split=split)} <= starts


# -- one factor, same length -------------------------------------------------------------


@ids
def test_clean_and_corrupt_differ_in_exactly_one_word(task):
    for p in task.pairs(200, seed=5):
        a, b = words(p.clean), words(p.corrupt)
        assert len(a) == len(b)
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        assert len(diff) == 1, (p.clean, p.corrupt)
        assert p.factor in task.factors
        assert a[diff[0]] != b[diff[0]]


def test_ioi_pairs_are_what_they_say():
    task = IOITask()
    pairs = task.pairs(300, seed=7)
    assert {p.meta["order"] for p in pairs} == {"ABBA", "BABA"}
    assert {p.meta["template"] for p in pairs} == set(range(len(task.templates)))
    for p in pairs:
        w, c = words(p.clean), words(p.corrupt)
        pos = p.meta["positions"]
        assert w[pos["io"]] == p.answer == p.meta["io"]
        assert w[pos["s1"]] == w[pos["s2"]] == p.distractor == p.meta["s"]
        assert c[pos["s2"]] == p.meta["c"] and c[pos["s1"]] == p.distractor
        assert len(w) == pos["end"] + 1 == 14  # every template has the same shape
        assert p.factor == "subject_repeat" and p.answer_prefix == " "
    example = task.pairs(1, seed=0, template=0, order="ABBA")[0]
    a, b = example.meta["io"], example.meta["s"]
    assert example.clean.startswith(f"When {a} and {b} went to the ") and example.clean.endswith(" to")
    assert f", {b} gave a " in example.clean and f", {example.meta['c']} gave a " in example.corrupt
    baba = task.pairs(1, seed=0, template=0, order="BABA")[0]
    assert baba.clean.startswith(f"When {baba.meta['s']} and {baba.meta['io']} ")


def test_greater_than_pairs_are_what_they_say():
    task = GreaterThanTask()
    for p in task.pairs(300, seed=8):
        start = p.meta["start"]
        w, c = words(p.clean), words(p.corrupt)
        pos = p.meta["positions"]
        assert w[pos["start"]] == f"{start:02d}" and c[pos["start"]] == "01"
        assert w[pos["century"]] == w[pos["end"]] == str(p.meta["century"])
        assert len(w) == pos["end"] + 1 == 12
        assert int(p.distractor) <= start < int(p.answer) <= 99 and int(p.distractor) >= 2
        assert len(p.answer) == len(p.distractor) == 2 and p.answer_prefix == ""
        assert p.factor == "start_year"
    example = task.pairs(1, seed=0, template=0)[0]
    assert example.clean.startswith("The ") and " lasted from the year " in example.clean


@ids
def test_same_token_length_under_the_zoo_tokenizer(task):
    tokenizer = _zoo_tokenizer(task)
    for split in ("train", "test"):
        pairs = task.pairs(100, seed=9, split=split)
        data = tokenize_pairs(pairs, tokenizer)  # raises if any length differs
        assert data.clean.shape == data.corrupt.shape
        assert data.clean.shape[1] == len(words(pairs[0].clean))
        assert int((data.clean != data.corrupt).sum(dim=1).max()) == 1
        assert tokenizer.unk_token_id not in data.clean.tolist()
        assert tokenizer.unk_token_id not in data.corrupt.tolist()
        # the answers follow the prompt the way the tokenizer would read the full sentence
        for p, answer in zip(pairs[:10], data.answer.tolist()):
            full = tokenizer.encode(p.clean + p.answer_prefix + p.answer, add_special_tokens=False)
            assert full[-1] == answer


@ids
def test_gpt2_style_pretokenization_differs_in_one_piece(task):
    """GPT-2's byte-level pre-tokenizer (its regex) splits clean and corrupt into the same pieces
    except one, a word of the same kind: with names that are single GPT-2 tokens (the IOI list) and
    four-digit years, both sides then have the same number of GPT-2 tokens."""
    pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers")
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False)
    for p in task.pairs(100, seed=10):
        a = [piece for piece, _ in gpt2.pre_tokenize_str(p.clean)]
        b = [piece for piece, _ in gpt2.pre_tokenize_str(p.corrupt)]
        assert len(a) == len(b)
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(diff) == 1
        (x, y), = diff
        assert x.startswith("Ġ") and y.startswith("Ġ")  # a word after a space, as in GPT-2's vocabulary
        if task.name == "greater-than":
            assert x[1:].isdigit() and y[1:].isdigit() and len(x) == len(y) == 5
        else:
            assert x[1:] in ioi.NAMES and y[1:] in ioi.NAMES
        # with the answer appended: a new word " Mary"; or the century's digits go on ("Ġ17" -> "Ġ1770")
        full = [piece for piece, _ in gpt2.pre_tokenize_str(p.clean + p.answer_prefix + p.answer)]
        if task.name == "greater-than":
            assert full == a[:-1] + [a[-1] + p.answer]
        else:
            assert full == a + ["Ġ" + p.answer]


@ids
def test_vocabulary_covers_everything_emitted(task):
    vocab = set(task.vocabulary())
    assert len(vocab) == len(task.vocabulary())
    for split in ("train", "test"):
        for p in task.pairs(500, seed=11, split=split):
            assert set(words(p.clean)) <= vocab
            assert set(words(p.corrupt)) <= vocab
            assert {p.answer, p.distractor} <= vocab


def test_vocabulary_holds_every_name_and_year():
    assert set(ioi.NAMES) <= set(IOITask().vocabulary())
    assert {f"{y:02d}" for y in range(100)} <= set(GreaterThanTask().vocabulary())


def test_words_splits_like_a_word_level_tokenizer():
    assert words("When Mary and John went to the store, John gave") == [
        "When", "Mary", "and", "John", "went", "to", "the", "store", ",", "John", "gave",
    ]
    assert words("from the year 1732 to the year 17") == ["from", "the", "year", "17", "32", "to", "the", "year", "17"]


# -- errors ---------------------------------------------------------------------------------


@ids
def test_bad_arguments(task):
    with pytest.raises(TaskError, match="split"):
        task.pairs(3, split="validation")
    with pytest.raises(TaskError, match="no factor 'colour'"):
        task.pairs(3, factor="colour")
    with pytest.raises(TaskError, match="positive int"):
        task.pairs(0)
    with pytest.raises(TaskError, match="template"):
        task.pairs(3, template=len(task.templates))
    assert task.pairs(3, factor=task.factors[0]) == task.pairs(3)


def test_ioi_bad_order():
    with pytest.raises(TaskError, match="ABBA"):
        IOITask().pairs(2, order="AB")


def test_get_task_unknown_name_lists_the_tasks():
    with pytest.raises(TaskError) as info:
        get_task("ioj")
    message = str(info.value)
    assert "'ioj'" in message and "ioi" in message and "greater-than" in message


# -- the registry -----------------------------------------------------------------------------


def test_builtin_tasks_are_registered_through_the_plugin_registry():
    registered = tasks()
    assert {"ioi", "greater-than", "shapes"} <= set(registered)
    assert isinstance(get_task("ioi"), IOITask)
    assert isinstance(get_task("greater-than"), GreaterThanTask)
    assert get_task("shapes").name == "shapes"
    info = next(p for p in get_registry().plugins() if p.name == "tasks")
    assert info.module == "crosspatch.zoo.tasks.plugin" and info.errors == []
    assert set(info.registered["tasks"]) == {"ioi", "greater-than", "shapes"}
    for task in (get_task("ioi"), get_task("greater-than")):
        assert task.modality == "text" and task.description and task.factors


@pytest.fixture
def only_code_plugins(monkeypatch):
    monkeypatch.setenv(plugins.PLUGINS_ENV_VAR, "")
    reset_registry()
    yield
    reset_registry()


def test_a_plugin_task_appears_in_get_task(only_code_plugins):
    class Custom:
        name = "custom-task"
        description = "a plugin's task"
        modality = "text"
        factors = ("x",)

    module = types.ModuleType("cpfake_task_plugin")

    @hookimpl
    def register_tasks(register):
        register(Custom())

    module.register_tasks = register_tasks
    with pytest.raises(TaskError, match="registered tasks: none"):
        get_task("custom-task")
    get_registry().register(module, "cpfake_task_plugin")
    assert list(tasks()) == ["custom-task"]
    assert isinstance(get_task("custom-task"), Custom)


# -- the greater-than metric ---------------------------------------------------------------------


class _YearTokenizer:
    """Token id of "YY" is YY + 5; anything else is one token too."""

    def encode(self, text, add_special_tokens=False):
        return [int(text) + 5] if text.isdigit() and len(text) == 2 else [0]


def test_greater_than_metric_on_known_distributions():
    tok = _YearTokenizer()
    starts = [30, 70]
    metric = greater_than_metric(tok, starts)
    logits = torch.full((2, 110), -1e9)
    logits[0, 5 + 50] = 0.0  # all mass on 50 > 30
    logits[1, 5 + 50] = 0.0  # all mass on 50 <= 70
    torch.testing.assert_close(metric(logits[:, None]), torch.tensor([1.0, -1.0]))
    # half on a year, half off the years: only year mass counts
    half = torch.full((1, 1, 110), -1e9)
    half[0, 0, 5 + 31] = 0.0
    half[0, 0, 0] = 0.0
    torch.testing.assert_close(greater_than_metric(tok, [30])(half), torch.tensor([0.5]))
    # the start year itself is not greater
    at = torch.full((1, 1, 110), -1e9)
    at[0, 0, 5 + 30] = 0.0
    torch.testing.assert_close(greater_than_metric(tok, [30])(at), torch.tensor([-1.0]))


def test_greater_than_metric_maps_rows_to_prompts():
    tok = _YearTokenizer()
    pairs = GreaterThanTask().pairs(3, seed=0)
    metric = greater_than_metric(tok, pairs)
    assert metric.name == "prob_diff_greater"
    logits = torch.full((3, 4, 110), -1e9)
    logits[..., 5:105] = 0.0  # uniform over the years
    per_prompt = metric(logits)
    expected = torch.tensor([(99 - p.meta["start"]) / 100 - (p.meta["start"] + 1) / 100 for p in pairs])
    torch.testing.assert_close(per_prompt, expected)
    rows = logits.repeat(2, 1, 1)  # a batched sweep: two interventions x three prompts
    ctx = MetricContext(torch.arange(3).repeat(2))
    torch.testing.assert_close(metric(rows, ctx), expected.repeat(2))
    # ints and tensors work too
    torch.testing.assert_close(greater_than_metric(tok, [p.meta["start"] for p in pairs])(logits), expected)
    torch.testing.assert_close(
        greater_than_metric(tok, torch.tensor([p.meta["start"] for p in pairs]))(logits), expected
    )


def test_greater_than_metric_errors():
    with pytest.raises(TaskError, match="meta"):
        greater_than_metric(_YearTokenizer(), [TextPair("a", "b", "c", "d", "f")])
    with pytest.raises(TaskError, match="0..99"):
        greater_than_metric(_YearTokenizer(), [120])

    class Wordy:
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(TaskError, match="year '00' is 2 tokens"):
        greater_than_metric(Wordy(), [3])


def test_tokenize_pairs_uses_the_answer_prefix():
    class Recorder:
        def __init__(self):
            self.seen = []

        def encode(self, text, add_special_tokens=False):
            self.seen.append(text)
            return [len(text)]

    rec = Recorder()
    tokenize_pairs([TextPair("a b", "a c", "32", "05", "f", answer_prefix="")], rec)
    tokenize_pairs([TextPair("a b", "a c", "Mary", "John", "f")], rec)
    assert rec.seen[2:4] == ["32", "05"] and rec.seen[6:8] == [" Mary", " John"]
