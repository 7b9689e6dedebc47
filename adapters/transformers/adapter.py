"""The transformers adapter: maps HuggingFace models onto the shared site vocabulary."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import warnings
import weakref
from typing import Any, Mapping

import torch
from torch import nn

from crosspatch.engine.adapter import Adapter, AdapterError, Inputs, model_device
from crosspatch.sites.catalog import Axis, Catalog, LinearFrom, SiteFamily
from crosspatch.engine.output_positions import restrict
from crosspatch.engine.reach import ModuleInput, ModuleOutput, installing, submodule

from . import clip, seq2seq, seq2seq_proof
from .architectures import ARCHITECTURES, Architecture
from .examples import example_inputs, prepare_images, takes_images
from .experts import expert_families
from .infer import _DEPTH, _HEADS, _WIDTH, config_int, sizing_config
from .inputs import input_families
from .mapping import mapping_for
from .proof import prove
from .reaches import AttentionPattern, BranchWrite, HeadOut, HeadZ, ResidualAfterAttention
from .fused_backward import gelu_tanh_hooks
from .copied import HandedCopy
from .flat import Unflattened
from .scaled import ScaledWrite
from .resume import forward_keeping_prefix, mixes_layer_types, resume_forward


class _OutputField:
    """A field of the model's output object (``logits``), read and written at the top-level module."""

    def __init__(self, root: nn.Module, name: str):
        self.root, self.name = root, name

    def install(self, layer, callback):
        name = self.name

        def hook(module, args, output):
            new = callback(getattr(output, name))
            if new is None:
                return None
            output[name] = new
            return output

        with installing() as changes:
            changes.forward_hook(self.root, hook)
            return changes.handles


class InferenceWarning(UserWarning):
    """Site families of an inferred architecture that failed their proof and are not served."""


_CATALOGS: "weakref.WeakKeyDictionary[nn.Module, Catalog]" = weakref.WeakKeyDictionary()


class TransformersAdapter(Adapter):
    """GPT-2, GPT-NeoX, Llama / Mistral / Qwen2 (grouped-query attention) and BERT / RoBERTa;
    ``CLIPModel`` (``model_type == "clip"``) is served by :mod:`.clip` under the two-tower site names."""

    name = "transformers"

    def matches(self, model: nn.Module) -> bool:
        transformers = sys.modules.get("transformers")  # a model of it exists only if it was imported
        return transformers is not None and isinstance(model, transformers.PreTrainedModel)

    def catalog(self, model: nn.Module) -> Catalog:
        if clip.is_clip(model):
            return clip.catalog(model)
        if seq2seq.is_seq2seq(model):
            return seq2seq.catalog(model)
        found = _CATALOGS.get(model)
        if found is None:
            found = _CATALOGS[model] = self._build_catalog(model)
        return found

    def _build_catalog(self, model: nn.Module) -> Catalog:
        mapping = mapping_for(model)
        arch = mapping.arch
        if arch is None:
            config = model.config
            raise AdapterError(
                f"the transformers adapter cannot serve {type(model).__name__} (model_type "
                f"{getattr(config, 'model_type', None)!r}): {mapping.error}. Model types in its table: "
                f"{', '.join(ARCHITECTURES)}; wrap(model, adapter='generic') serves any module at module level."
            )
        families = self._families(model, arch, mapping.layout, mapping.positions, mapping.n_heads)
        _, expert_notes = expert_families(model.base_model, arch.layers, Axis("pos"), Axis("dim"))
        if not mapping.inferred:
            return Catalog(families, type(model).__name__, unavailable=expert_notes)
        notes = {**mapping.notes, **expert_notes}
        families = [f for f in families if f.name not in notes]
        catalog = Catalog(families, type(model).__name__)
        failed = {**notes, **prove(model, self, catalog, arch, mapping.layout).failed}
        if failed:
            warnings.warn(
                f"{type(model).__name__}: inferred site families not served: "
                + "; ".join(f"{name} ({why})" for name, why in failed.items()),
                InferenceWarning, stacklevel=3,
            )
        kept = [f for f in families if f.name not in failed]
        return Catalog(kept, type(model).__name__, unavailable=failed)

    def _families(self, model: nn.Module, arch: Architecture, layout, positions: int | None = None,
                  n_heads: int | None = None) -> list[SiteFamily]:
        config, base = model.config, model.base_model
        block = f"{arch.layers}.{{layer}}"
        n_layers = len(submodule(base, arch.layers, None))
        n_heads = n_heads or config_int(sizing_config(model), _HEADS)
        o_proj = submodule(base, f"{block}.{arch.o_proj}", 0)
        o_in = o_proj.weight.shape[0] if arch.conv1d else o_proj.weight.shape[1]
        d_model = o_proj.weight.shape[1] if arch.conv1d else o_proj.weight.shape[0]
        d_head = o_in // n_heads
        pos, dim = Axis("pos", positions), Axis("dim", d_model)  # a vision encoder's positions are the config's
        head_out = HeadOut(base, f"{block}.{arch.o_proj}", n_heads, arch.conv1d)
        pattern = (ModuleInput(base, f"{block}.{arch.pattern_input}", name=None) if arch.pattern_input
                   else AttentionPattern(base, f"{block}.{arch.attn_core}", config))
        embed = ModuleOutput(base, arch.embed) if arch.embed is not None else ModuleInput(base, block.format(layer=0))

        families = [
            SiteFamily("embed", (pos, dim), embed, doc="token (+ position) embeddings"),
            SiteFamily("resid_pre", (pos, dim), ModuleInput(base, block), n_layers, "residual stream entering the block"),
            SiteFamily(
                "attn_pattern",
                (Axis("head", n_heads), pos, Axis("key_pos", positions)),
                pattern,
                n_layers,
                "attention probabilities (query pos, key pos)",
            ),
            SiteFamily(
                "head_z",
                (pos, Axis("head", n_heads), Axis("d_head", d_head)),
                HeadZ(base, f"{block}.{arch.o_proj}", n_heads),
                n_layers,
                "each head's attention-weighted values, the output projection's input",
            ),
            SiteFamily(
                "head_out",
                (pos, Axis("head", n_heads), dim),
                head_out,
                n_layers,
                "each head's write into the residual (without the output bias)",
                linear_from=LinearFrom("head_z", ("pos", "head"), head_out.writes),
            ),
            SiteFamily("attn_out", (pos, dim), _write(base, block, arch.attn, arch.attn_residual, arch.attn_scale, arch.attn in arch.copied), n_layers,
                       "attention output"),
        ]
        if arch.resid_mid == "sum":
            mid = ResidualAfterAttention(base, block, f"{block}.{arch.attn}")
            families.append(SiteFamily("resid_mid", (pos, dim), mid, n_layers, "residual after attention"))
        elif arch.resid_mid is not None:
            mid = ModuleOutput(base, f"{block}.{arch.resid_mid}")
            families.append(SiteFamily("resid_mid", (pos, dim), mid, n_layers, "residual after attention"))
        if arch.mlp_down is not None:
            down = submodule(base, f"{block}.{arch.mlp_down}", 0)
            d_mlp = down.weight.shape[0] if arch.conv1d else down.weight.shape[1]
            families.append(SiteFamily(
                "mlp_act",
                (pos, Axis("neuron", d_mlp)),
                ModuleInput(base, f"{block}.{arch.mlp_down}", name=None),
                n_layers,
                "MLP neuron activations",
            ))
        families += expert_families(base, arch.layers, pos, dim)[0]  # a mixture of experts: each expert's write
        families += [
            SiteFamily("mlp_out", (pos, dim), _write(base, block, arch.mlp, arch.mlp_residual, arch.mlp_scale, arch.mlp in arch.copied), n_layers,
                       "MLP output"),
            SiteFamily("resid_post", (pos, dim), ModuleOutput(base, block), n_layers, "residual stream leaving the block"),
        ]
        # Receiver inputs (what each head, MLP and the final norm read) go where the forward reaches them.
        after = {"head_in": "resid_pre", "mlp_in": "resid_mid", "logits_in": "resid_post"}
        for fam in input_families(base, arch, layout, block, n_heads, d_model):
            names = [f.name for f in families]
            families.insert(names.index(after[fam.name]) + 1, fam)
        if arch.flat:  # modules that see the tokens flattened (OPT's MLP): their sites unflattened
            at = {"mlp_out": arch.mlp, "mlp_act": arch.mlp_down, "mlp_in": layout.ln_mlp if layout else None}
            families = [dataclasses.replace(f, reach=Unflattened(f.reach, base, block)) if at.get(f.name) in arch.flat else f
                        for f in families]
        logits = self._logits_axes(model)
        if logits is not None:
            families.append(SiteFamily("logits", logits, _OutputField(model, "logits"), doc="model output"))
        return families

    def example_inputs(self, model: nn.Module) -> Any:
        if clip.is_clip(model):
            raise NotImplementedError("CLIP models take images and texts: pass inputs explicitly")
        if seq2seq.is_seq2seq(model):
            return seq2seq.example_inputs(model)
        return example_inputs(model, length=8)

    def tiny_model(self, kind: str) -> nn.Module:
        """A tiny random model of transformers model type ``kind`` (:mod:`.tiny`), causal LM first."""
        from .tiny import TASKS, tiny_model

        if seq2seq.serves(kind):  # the encoder-decoder model, not its decoder alone (BartForCausalLM)
            return tiny_model(kind, "seq2seq-lm")
        problems = []
        for task in TASKS:
            try:
                return tiny_model(kind, task)
            except ValueError as exc:
                problems.append(str(exc))
        raise ValueError(f"no tiny model of {kind!r}: {'; '.join(problems)}")

    def family_oracles(self, model: nn.Module) -> dict[str, tuple[float, str | None]]:
        """Per served family, the largest difference of the proof's checks (:mod:`.proof`) and its first
        failure; ``crosspatch verify`` reports them next to the conformance suite's."""
        if clip.is_clip(model):
            return {}
        if seq2seq.is_seq2seq(model):
            return seq2seq_proof.prove(model, self)
        mapping = mapping_for(model)
        proof = prove(model, self, self.catalog(model), mapping.arch, mapping.layout)
        return {name: (proof.errors.get(name, 0.0), proof.failed.get(name)) for name in proof.families}

    @staticmethod
    def _logits_axes(model: nn.Module) -> tuple[Axis, ...] | None:
        if type(model).__name__.endswith("ForImageClassification"):  # SigLIP's is its own base model
            return (Axis("label", model.config.num_labels),)
        if model is model.base_model:
            return None
        head = model.get_output_embeddings()
        if head is not None:
            return (Axis("pos"), Axis("vocab", head.weight.shape[0]))
        if type(model).__name__.endswith("ForSequenceClassification"):
            return (Axis("label", model.config.num_labels),)
        return None

    def prepare(self, model: nn.Module, inputs: Any) -> Inputs:
        if clip.is_clip(model):
            return clip.prepare(model, inputs)
        if seq2seq.is_seq2seq(model):
            return seq2seq.prepare(model, inputs)
        if takes_images(model):
            return prepare_images(model, inputs)
        if isinstance(inputs, Mapping):
            prepared = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        else:
            ids = inputs if isinstance(inputs, torch.Tensor) else torch.as_tensor(inputs)
            prepared = {"input_ids": ids}
        if "input_ids" not in prepared and "inputs_embeds" not in prepared:
            raise ValueError(f"inputs need 'input_ids' (or 'inputs_embeds'); got keys {sorted(prepared)}")
        device = model_device(model)
        out = {}
        for key, value in prepared.items():
            if value.ndim == 1 and key != "inputs_embeds":
                value = value.unsqueeze(0)
            if key in ("input_ids", "attention_mask", "token_type_ids", "position_ids"):
                value = value.long()
            out[key] = value.to(device)
        return out

    def forward(self, model: nn.Module, inputs: Inputs) -> Any:
        if clip.is_clip(model):
            return clip.forward(model, inputs)
        if seq2seq.is_seq2seq(model):
            return seq2seq.forward(model, inputs)
        extra = {"use_cache": False} if "use_cache" in _forward_parameters(type(model)) else {}
        return model(**inputs, **extra, return_dict=True)

    def output(self, raw: Any) -> torch.Tensor:
        if isinstance(raw, clip.TwoTowerOutput):
            return raw.primary
        logits = getattr(raw, "logits", None)
        return logits if logits is not None else raw.last_hidden_state

    def sizes(self, inputs: Inputs) -> dict[str, int]:
        if "images" in inputs or "texts" in inputs:  # prepared two-tower (CLIP) inputs
            return clip.sizes(inputs)
        if seq2seq.is_prepared(inputs):
            return seq2seq.sizes(inputs)
        tokens = inputs.get("input_ids", inputs.get("inputs_embeds"))
        if tokens is None:  # images: the catalog sizes pos by the config's image size
            return {}
        return {"pos": tokens.shape[1], "key_pos": tokens.shape[1]}

    def describe(self, model: nn.Module) -> dict[str, Any]:
        if clip.is_clip(model):
            return clip.describe(model)
        if seq2seq.is_seq2seq(model):
            return seq2seq.describe(model)
        config, sized = model.config, sizing_config(model)
        return {
            "class": type(model).__name__,
            "model_type": config.model_type,
            "name_or_path": getattr(config, "name_or_path", "") or "",
            "n_layers": config_int(sized, _DEPTH),
            "n_heads": mapping_for(model).n_heads or config_int(sized, _HEADS),
            "d_model": config_int(sized, _WIDTH),
            "mapping": "inferred" if mapping_for(model).inferred else "table",
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        }

    def can_resume(self, model: nn.Module) -> bool:
        # Prefix reuse needs a block list and an output laid out by position (not pooled), and blocks
        # that do not mix attention kinds (sweeps resume at later blocks).
        if clip.is_clip(model) or mixes_layer_types(model):
            return False
        if seq2seq.is_seq2seq(model):
            return False
        mapping = mapping_for(model)
        if mapping.arch is None or mapping.inferred:  # resuming an inferred layout is not proved yet
            return False
        axes = self._logits_axes(model)
        return axes is None or axes[0].name == "pos"

    def forward_keeping_prefix(self, model: nn.Module, inputs: Inputs):
        return forward_keeping_prefix(model, mapping_for(model).arch, inputs)

    def resume(self, model: nn.Module, inputs: Inputs, run):
        return resume_forward(model, mapping_for(model).arch, inputs, run)

    def output_at(self, model: nn.Module, positions: torch.Tensor, keys: set[str]) -> list:
        """A language model's head computed at one position per row (:mod:`crosspatch.output_positions`), and in
        a causal model also the last block's MLP, which only the head reads (each position on its own), and in a
        sequential pre-norm block the attention's output projection before it, which only that MLP and the head
        read (the attention itself runs whole: its keys and values are read at every position)."""
        if clip.is_clip(model) or model is model.base_model or "logits" in keys:
            return []
        if seq2seq.is_seq2seq(model):
            return []
        head = model.get_output_embeddings()
        if head is None:
            return []
        handles = restrict(head, positions)
        arch = mapping_for(model).arch
        if arch is None:
            return handles
        last = len(submodule(model.base_model, arch.layers, None)) - 1
        # What the restricted MLP computes or what is summed from it; mlp_in (the input of the norm in front
        # of the MLP, outside it in every layout that has one) stays whole and is read only by the MLP.
        after_mlp = {f"{f}.{last}" for f in ("mlp_act", "mlp_out", "resid_post")} | {"logits_in"}
        # An MLP handed the residual it adds (BLOOM) reads it whole: it cannot run at one position alone.
        if arch.causal and arch.mlp_residual is None and not arch.flat and not keys & after_mlp:
            handles += restrict(submodule(model.base_model, f"{arch.layers}.{last}.{arch.mlp}", None), positions)
            # What the restricted projection's output is summed into on the way to the MLP; any module site may be.
            after_attn = {f"{f}.{last}" for f in ("head_out", "attn_out", "resid_mid", "mlp_in")}
            plain = arch.resid_mid == "sum" and arch.attn_residual is None and arch.attn_scale is None and not arch.copied
            if plain and not keys & after_attn and not any(key.startswith("module") for key in keys):
                handles += restrict(submodule(model.base_model, f"{arch.layers}.{last}.{arch.o_proj}", None), positions)
        return handles

    def gradient_hooks(self, model: nn.Module) -> list:
        return gelu_tanh_hooks(model)

    def readout(self, model: nn.Module, tower: str = "vision"):
        """How a CLIP tower reads its embedding off its last residual stream (see :mod:`.clip`)."""
        if not clip.is_clip(model):
            raise NotImplementedError(f"{type(model).__name__} has no two-tower embedding readout")
        return clip.readout(model, tower)

    def decomposed_forward(self, model: nn.Module):
        """CD-T's forward over ``(rel, irrel)`` pairs (:mod:`.cdt_blocks`): GPT-2, the Llama family, BERT / RoBERTa."""
        from .cdt_blocks import decomposed_forward

        return decomposed_forward(model, self)


def _write(base: nn.Module, block: str, path: str, residual: str | None, scale: str | None, copied: bool = False):
    """A branch's write: its module's output, that minus the residual it was handed and added, or that
    times the block's layer scale; handed on as a copy where the block changes it in place."""
    if scale is not None:
        reach = ScaledWrite(base, block, path, scale)
    else:
        reach = ModuleOutput(base, f"{block}.{path}") if residual is None else BranchWrite(base, f"{block}.{path}", residual)
    return HandedCopy(reach) if copied else reach


_FORWARD_PARAMETERS: dict[type, frozenset[str]] = {}


def _forward_parameters(cls: type) -> frozenset[str]:
    if cls not in _FORWARD_PARAMETERS:
        _FORWARD_PARAMETERS[cls] = frozenset(inspect.signature(cls.forward).parameters)
    return _FORWARD_PARAMETERS[cls]
