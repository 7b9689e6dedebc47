"""The tracr adapter: serves :class:`TracrTransformer` under the shared site vocabulary.

Sites: ``embed``, ``resid_pre``, ``head_in`` ``[pos, qkv, head, dim]`` (the residual each head's
query / key / value projection reads; no layer norm, so it is the block input, and each slot is
projected on its own, hence writable per head and role), ``attn_pattern``, ``head_out``,
``attn_out``, ``resid_mid``, ``mlp_in`` (what the MLP reads; writing it leaves the residual
passed on untouched), ``mlp_act``, ``mlp_out``, ``resid_post``, ``logits_in`` (the residual the
unembedding reads) and ``logits`` (the residual projected onto the output space). With these the
edge methods of :mod:`crosspatch.methods.edges` apply unchanged.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from crosspatch.engine.adapter import Adapter, Inputs, model_device
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
from crosspatch.results.metrics import Metric
from crosspatch.engine.reach import ModuleInput, ModuleOutput

from .model import TracrTransformer

__all__ = ["TracrAdapter", "output_distance", "output_score"]


class TracrAdapter(Adapter):
    """tracr-compiled RASP programs converted by ``tools/tracr_convert.py``."""

    name = "tracr"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, TracrTransformer)

    def decomposed_forward(self, model: TracrTransformer):
        """CD-T's forward for the program's blocks (no norms, ReLU MLPs)."""
        from .cdt_blocks import TracrDecomposition

        return TracrDecomposition(model)

    def catalog(self, model: TracrTransformer) -> Catalog:
        L, H = model.n_layers, model.n_heads
        pos, dim = Axis("pos"), Axis("dim", model.d_model)
        block = "blocks.{layer}"

        def fam(name, axes, reach, layers=L, doc=""):
            return SiteFamily(name, axes, reach, layers, doc)

        families = [
            fam("embed", (pos, dim), ModuleOutput(model, "embed"), None, "token + position embeddings"),
            fam("resid_pre", (pos, dim), ModuleInput(model, block, name=None), doc="residual entering the layer"),
            fam("head_in", (pos, Axis("qkv", 3), Axis("head", H), dim), ModuleOutput(model, f"{block}.attn.inputs"),
                doc="residual each head's query (0), key (1), value (2) projection reads"),
            fam("attn_pattern", (Axis("head", H), pos, Axis("key_pos")), ModuleOutput(model, f"{block}.attn.pattern"),
                doc="attention probabilities (query pos, key pos)"),
            fam("head_out", (pos, Axis("head", H), dim), ModuleOutput(model, f"{block}.attn.heads"),
                doc="each head's write into the residual (without the output bias)"),
            fam("attn_out", (pos, dim), ModuleOutput(model, f"{block}.attn"), doc="attention output"),
            fam("resid_mid", (pos, dim), ModuleOutput(model, f"{block}.mid"), doc="residual after attention"),
            fam("mlp_in", (pos, dim), ModuleInput(model, f"{block}.mlp", name=None), doc="residual the MLP reads"),
            fam("mlp_act", (pos, Axis("neuron", model.d_mlp)), ModuleOutput(model, f"{block}.mlp.act"), doc="MLP neurons after ReLU"),
            fam("mlp_out", (pos, dim), ModuleOutput(model, f"{block}.mlp"), doc="MLP output"),
            fam("resid_post", (pos, dim), ModuleOutput(model, block), doc="residual leaving the layer"),
            fam("logits_in", (pos, dim), ModuleInput(model, "unembed", name=None), None, "residual the unembedding reads"),
            fam("logits", (pos, Axis("vocab", model.unembed.matrix.shape[1])), ModuleOutput(model, "unembed"), None,
                "residual projected onto the output space"),
        ]
        return Catalog(families, f"TracrTransformer({model.program})")

    def prepare(self, model: TracrTransformer, inputs: Any) -> Inputs:
        if isinstance(inputs, Mapping):
            ids = inputs["input_ids"]
        elif isinstance(inputs, torch.Tensor):
            ids = inputs
        elif inputs and isinstance(inputs[0], (list, tuple)) and inputs[0] and inputs[0][0] == model.meta["bos"]:
            ids = model.encode([seq[1:] for seq in inputs])
        elif inputs and isinstance(inputs[0], (list, tuple)) and any(not isinstance(v, int) for seq in inputs for v in seq):
            ids = model.encode(inputs)  # token values (strings): BOS is added
        else:
            ids = torch.as_tensor(inputs)  # ids, BOS included
        if ids.ndim == 1:
            ids = ids.unsqueeze(0)
        return {"input_ids": ids.long().to(model_device(model))}

    def forward(self, model: TracrTransformer, inputs: Inputs) -> torch.Tensor:
        return model(inputs["input_ids"])

    def sizes(self, inputs: Inputs) -> dict[str, int]:
        T = inputs["input_ids"].shape[1]
        return {"pos": T, "key_pos": T}

    def describe(self, model: TracrTransformer) -> dict[str, Any]:
        return {
            "class": "TracrTransformer",
            "program": model.program,
            "n_layers": model.n_layers,
            "n_heads": model.n_heads,
            "d_model": model.d_model,
            "categorical_output": model.categorical,
            "tracr": model.meta.get("tracr", ""),
        }


def output_distance(categorical: bool, skip_bos: bool = True) -> Metric:
    """Per prompt, how far the output moved from the clean run's, summed over positions (BOS skipped):
    KL(clean || patched) of the output-space softmax for categorical programs, the squared difference
    for numerical ones. 0 when the run matches clean; a metric for ACDC over the whole sequence."""

    def fn(output, ctx):
        clean = ctx.clean.to(output.device)[ctx.example.to(output.device)]
        start = 1 if skip_bos else 0
        out, ref = output[:, start:].double(), clean[:, start:].double()
        if categorical:
            kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
            return kl.sum(dim=(-1, -2))
        return (out - ref).pow(2).sum(dim=(-1, -2))

    return Metric("output_kl" if categorical else "output_sq", fn)


def output_score(categorical: bool, skip_bos: bool = True) -> Metric:
    """Per prompt, a score with a useful gradient at the clean run (for EAP / EAP-IG), summed over
    positions (BOS skipped): the log-probability of the clean run's decoded output for categorical
    programs, the output value itself for numerical ones."""

    def fn(output, ctx):
        start = 1 if skip_bos else 0
        out = output[:, start:].double()
        if categorical:
            clean = ctx.clean.to(output.device)[ctx.example.to(output.device)][:, start:]
            target = clean.argmax(dim=-1, keepdim=True)
            return out.log_softmax(-1).gather(-1, target).squeeze(-1).sum(dim=-1)
        return out.sum(dim=(-1, -2))

    return Metric("clean_logprob" if categorical else "output_sum", fn)
