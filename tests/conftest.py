"""Shared fixtures: tiny models built from configs (no downloads) and a toy adapter for engine tests."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("CROSSPATCH_PROGRESS", "0")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine the spin-waits cost ~0.2 s a forward."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def install_fake_dist(root, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """Write plugin modules and a ``fakeplug-0.1.dist-info`` declaring them in the ``crosspatch`` group."""
    import textwrap

    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    info = root / "fakeplug-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    lines = ["[crosspatch]"] + [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


def randomize(model, seed: int = 3):
    """Random biases and norm weights: they init to 0 and 1, which would hide bias and scale bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            elif ("norm" in name.lower() or ".ln_" in name) and name.endswith(".weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model


def padded_prompts(seed: int, rows: int = 3, length: int = 10, pad: str | None = None) -> dict:
    """Random token rows (each its own prefix) with a mask: no padding, the first row's last 3 positions
    padded (``"right"``) or the second row's first 2 (``"left"``)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    if pad == "right":
        mask[0, -3:] = 0
    elif pad == "left":
        mask[1, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0)
    config.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


def tiny_llama(model_type: str = "llama", **overrides):
    """Llama-family decoder with grouped-query attention (4 query heads share 2 key/value heads)."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[model_type]
    torch.manual_seed(0)
    config = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )
    config.update(overrides)
    return model_cls(config_cls(**config)).eval()


def tiny_neox(parallel: bool = True):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=64, use_parallel_residual=parallel, bos_token_id=0, eos_token_id=0,
    )
    return GPTNeoXForCausalLM(config).eval()


def tiny_bert(head: str = "mlm"):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=64, num_labels=3,
    )
    cls = {
        "mlm": transformers.BertForMaskedLM,
        "base": transformers.BertModel,
        "cls": transformers.BertForSequenceClassification,
    }[head]
    return cls(config).eval()


def tiny_roberta():
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    config = RobertaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=70, pad_token_id=1,
    )
    return RobertaForMaskedLM(config).eval()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(2, 100, (3, 10))


@pytest.fixture
def pair():
    """Clean and corrupt prompts that differ at position 3."""
    torch.manual_seed(2)
    clean = torch.randint(2, 100, (4, 9))
    corrupt = clean.clone()
    corrupt[:, 3] = (clean[:, 3] + 17) % 98 + 2
    return clean, corrupt


# A toy architecture with a plain-torch adapter: the engine's tests do not depend on transformers.


class ToyNet(nn.Module):
    """x [batch, pos, 4] -> two linear layers with a ReLU between -> [batch, pos, 3]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


def toy_adapter():
    from crosspatch.engine.adapter import Adapter, model_device
    from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
    from crosspatch.engine.reach import ModuleInput, ModuleOutput

    class ToyAdapter(Adapter):
        name = "toy"

        def matches(self, model):
            return isinstance(model, ToyNet)

        def catalog(self, model):
            pos, dim = Axis("pos"), Axis("dim", 4)
            return Catalog(
                [
                    SiteFamily("hidden_in", (pos, dim), ModuleInput(model, "layers.{layer}", name=None), 2),
                    SiteFamily("hidden", (pos, dim), ModuleOutput(model, "layers.{layer}"), 2),
                    SiteFamily("out", (pos, Axis("class", 3)), ModuleOutput(model, "head")),
                ],
                "ToyNet",
            )

        def prepare(self, model, inputs):
            x = inputs["x"] if isinstance(inputs, dict) else inputs
            return {"x": x.to(model_device(model))}

        def forward(self, model, inputs):
            return model(inputs["x"])

        def sizes(self, inputs):
            return {"pos": inputs["x"].shape[1]}

    return ToyAdapter()


@pytest.fixture
def toy():
    import crosspatch as cp

    return cp.wrap(ToyNet().eval(), toy_adapter())
