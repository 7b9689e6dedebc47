"""The conformance suite (crosspatch.testing) on models the generic adapter serves, picked by name from the registry."""

from __future__ import annotations

import pytest
import torch

from crosspatch.testing import assert_conforms
from conftest import randomize
from generic_models import CNN, MLP, FieldNet, no_hooks_left, seeded, sequential_mlp


def _gpt2():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50, bos_token_id=0, eos_token_id=0)
    return randomize(GPT2LMHeadModel(config)), torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(1))


CASES = {
    "mlp": lambda: (MLP(), seeded(0, 3, 4)),
    "sequential": lambda: (sequential_mlp(), seeded(0, 3, 4)),
    "cnn": lambda: (CNN(), seeded(0, 3, 3, 12, 12)),
    "fields": lambda: (FieldNet("dict"), seeded(0, 3, 6)),
    "gpt2": _gpt2,
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_generic_adapter_conforms(case):
    model, inputs = CASES[case]()
    model.eval()
    report = assert_conforms(model, inputs, "generic")
    assert report.adapter == "generic"
    assert report["hand_hook"].passed and report["self_patch"].passed and report["writes"].passed
    assert no_hooks_left(model)
