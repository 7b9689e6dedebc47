"""The open_clip adapter: both towers of an open_clip CLIP model on the shared site vocabulary.

Sites are prefixed by tower (``vision.``, ``text.``); outputs are ``image_embed``, ``text_embed`` and
``logits`` (see :mod:`crosspatch.adapters.transformers.twotower` for inputs, rows and candidates).

**Unfused attention during runs.** open_clip's default block computes attention inside
``nn.MultiheadAttention``, where no hook sees a head or a pattern. For the duration of each
crosspatch forward the adapter puts an :class:`~.attention.UnfusedAttention` twin in place of each
fused module and puts the original back in a ``finally`` clause. The twin holds the *same*
parameter objects (no copy, no extra memory; training, ``.to()`` or ``load_state_dict`` on the user's
model are seen at once), so the user's model is never changed outside a run, and open_clip's own
``encode_image`` / ``encode_text`` code runs, with every pooling and projection variant it has.
Every crosspatch run uses the twins, also when no head or pattern site is asked for, so all runs
share one numerical path (it agrees with the fused module to float rounding, ~1e-7 in float32).
Do not run the same model from another thread while a crosspatch run is under way.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import weakref
from typing import Any, Iterator

import torch
from torch import nn

from crosspatch.engine.adapter import Adapter, AdapterError, Inputs, model_device
from crosspatch.sites.catalog import Axis, Catalog, LinearFrom, SiteFamily
from crosspatch.engine.reach import ModuleInput, ModuleOutput, submodule, temporarily

from crosspatch.adapters.transformers.inputs import HeadIn, InputLayout
from crosspatch.adapters.transformers.reaches import HeadZ

from crosspatch.adapters.transformers import twotower
from crosspatch.adapters.transformers.twotower import HEAD_IN_DOC, HEAD_Z_DOC, LOGITS_IN_DOC, MLP_IN_DOC
from .attention import UnfusedAttention, is_fused
from .reaches import AttentionPattern, HeadWrite, ResidualMid, RunningModules

__all__ = ["OpenClipAdapter"]

logger = logging.getLogger(__name__)

TOWERS = ("vision", "text")

# head_in of a pre-LN residual attention block: ln_1, then the fused q/k/v projection of the unfused
# attention (its ``in_proj``, reached through RunningModules); mlp_in is ln_2's input.
_INPUTS = InputLayout("ln_1", "ln_2", None, ("attn.in_proj",))


class _Tower:
    """Where one tower keeps its transformer, and its sizes."""

    def __init__(self, model: nn.Module, name: str, transformer: str):
        self.name, self.transformer = name, transformer
        self.blocks = f"{transformer}.resblocks"
        self.block = f"{self.blocks}.{{layer}}"
        module = submodule(model, transformer, None)
        if not getattr(module, "batch_first", True):
            raise AdapterError(f"the {name} tower's transformer is not batch-first; crosspatch needs batch_first=True")
        resblocks = module.resblocks
        self.n_layers = len(resblocks)
        first = resblocks[0]
        self.width = first.ln_1.normalized_shape[0]
        attn = first.attn
        self.n_heads = attn.num_heads
        self.d_mlp = first.mlp.c_proj.in_features
        self.exact_heads = all(isinstance(getattr(b, "ln_attn", nn.Identity()), nn.Identity) for b in resblocks)


def _towers(model: nn.Module) -> dict[str, _Tower]:
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "transformer") or not hasattr(visual, "conv1"):
        raise AdapterError(
            f"the open_clip adapter serves vision-transformer towers; {type(model).__name__}.visual is "
            f"{type(visual).__name__} (ModifiedResNet and timm towers have no transformer blocks)"
        )
    if hasattr(model, "text"):  # CustomTextCLIP
        if not hasattr(model.text, "transformer"):
            raise AdapterError(
                f"the text tower of {type(model).__name__} is {type(model.text).__name__}; the open_clip adapter "
                f"serves open_clip's own TextTransformer (wrap a HuggingFace text tower with the transformers adapter)"
            )
        text = "text.transformer"
    else:
        text = "transformer"
    return {"vision": _Tower(model, "vision", "visual.transformer"), "text": _Tower(model, "text", text)}


class _Unfused:
    """The unfused twins of one tower's attention modules, and the swap that puts them in place."""

    def __init__(self, model: nn.Module, tower: _Tower):
        self.model_ref = weakref.ref(model)
        self.tower = tower
        self._twins: dict[int, tuple[nn.Module, UnfusedAttention]] = {}

    def _block(self, layer: int) -> nn.Module:
        model = self.model_ref()
        if model is None:  # pragma: no cover - the model is alive while it is being run
            raise RuntimeError("the model was garbage-collected")
        return submodule(model, self.tower.block, layer)

    def attention(self, layer: int) -> UnfusedAttention:
        """The unfused attention that runs in ``layer``: the block's own, or a twin sharing its weights."""
        attn = self._block(layer).attn
        if isinstance(attn, UnfusedAttention):
            return attn
        cached = self._twins.get(layer)
        if cached is None or cached[0] is not attn or not cached[1].shares(attn):
            twin = UnfusedAttention.from_module(attn, share=True)
            self._twins[layer] = cached = (attn, twin)
        twin = cached[1]
        twin.train(attn.training)
        return twin

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Unfused twins in place of fused attention modules; the originals are back afterwards, also on error."""
        with temporarily() as changes:
            for layer in range(self.tower.n_layers):
                block = self._block(layer)
                attn = block.attn
                if isinstance(attn, UnfusedAttention) or not is_fused(attn):
                    continue
                twin = self.attention(layer)
                changes.undo(functools.partial(setattr, block, "attn", attn))  # registered before the swap
                block.attn = twin
            yield


_UNFUSED: "weakref.WeakKeyDictionary[nn.Module, dict[str, _Unfused]]" = weakref.WeakKeyDictionary()


def _unfused(model: nn.Module) -> dict[str, _Unfused]:
    entry = _UNFUSED.get(model)
    if entry is None:
        entry = {name: _Unfused(model, tower) for name, tower in _towers(model).items()}
        _UNFUSED[model] = entry
    return entry


class OpenClipAdapter(Adapter):
    """open_clip ``CLIP`` and ``CustomTextCLIP`` with vision-transformer image towers."""

    name = "open_clip"

    def matches(self, model: nn.Module) -> bool:
        open_clip = sys.modules.get("open_clip")  # a model of it exists only if it was imported
        if open_clip is None:
            return False
        return isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP))

    # ------------------------------------------------------------------ catalog

    def catalog(self, model: nn.Module) -> Catalog:
        towers = _towers(model)
        unfused = _unfused(model)
        families: list[SiteFamily] = []
        for name, tower in towers.items():
            families += self._tower_families(model, name, tower, unfused[name])
        taps = twotower.taps_for(model)
        embed_dim = self._embed_dim(model)
        families += [
            SiteFamily("image_embed", (Axis("dim", embed_dim),), taps["image_embed"],
                       doc="image embedding (projected, before normalisation)"),
            SiteFamily("text_embed", (Axis("dim", embed_dim),), taps["text_embed"],
                       doc="text embedding (projected, before normalisation)"),
            SiteFamily("logits", (Axis("candidate"),), taps["logits"],
                       doc="logit_scale * cosine(row, candidate): image-text similarity"),
        ]
        return Catalog(families, type(model).__name__)

    @staticmethod
    def _tower_families(model: nn.Module, name: str, tower: _Tower, unfused: _Unfused) -> list[SiteFamily]:
        if name == "vision":
            n_pos = model.visual.positional_embedding.shape[0]
        else:
            text = getattr(model, "text", model)
            n_pos = text.positional_embedding.shape[0]
        pos, dim = Axis("pos", n_pos), Axis("dim", tower.width)
        block, n = tower.block, tower.n_layers
        what = "patch tokens (class token first)" if name == "vision" else "text tokens"
        p = f"{name}."
        families = [
            SiteFamily(p + "embed", (pos, dim), ModuleInput(model, tower.transformer, name=None),
                       doc=f"{what} entering the first block (after ln_pre)" if name == "vision"
                       else "token + position embeddings entering the first block"),
            SiteFamily(p + "resid_pre", (pos, dim), ModuleInput(model, block, name=None), n,
                       "residual stream entering the block"),
            SiteFamily(p + "head_in", (pos, Axis("qkv", 3), Axis("head", tower.n_heads), dim),
                       HeadIn(RunningModules(model, tower.blocks, unfused.attention), block, _INPUTS, tower.n_heads, False),
                       n, HEAD_IN_DOC),
            SiteFamily(p + "attn_pattern", (Axis("head", tower.n_heads), pos, Axis("key_pos", n_pos)),
                       AttentionPattern(unfused.attention), n, "attention probabilities (query pos, key pos)"),
        ]
        if tower.exact_heads:
            head_out = HeadWrite(model, f"{block}.attn.out_proj", f"{block}.ls_1", tower.n_heads)
            families += [
                SiteFamily(p + "head_z", (pos, Axis("head", tower.n_heads), Axis("d_head", tower.width // tower.n_heads)),
                           HeadZ(model, f"{block}.attn.out_proj", tower.n_heads), n, HEAD_Z_DOC),
                SiteFamily(
                    p + "head_out", (pos, Axis("head", tower.n_heads), dim), head_out, n,
                    "each head's write into the residual (heads + out_proj bias = attn_out)",
                    linear_from=LinearFrom(p + "head_z", ("pos", "head"), head_out.writes),
                ),
            ]
        else:
            logger.info("the %s tower normalises after attention (scale_attn): no exact per-head site", name)
        families += [
            SiteFamily(p + "attn_out", (pos, dim), ModuleOutput(model, f"{block}.ls_1"), n, "attention write"),
            SiteFamily(p + "resid_mid", (pos, dim), ResidualMid(model, block, f"{block}.ls_1"), n,
                       "residual after attention"),
            SiteFamily(p + "mlp_in", (pos, dim), ModuleInput(model, f"{block}.ln_2", name=None), n, MLP_IN_DOC),
            SiteFamily(p + "mlp_act", (pos, Axis("neuron", tower.d_mlp)),
                       ModuleInput(model, f"{block}.mlp.c_proj", name=None), n, "MLP neuron activations"),
            SiteFamily(p + "mlp_out", (pos, dim), ModuleOutput(model, f"{block}.ls_2"), n, "MLP write"),
            SiteFamily(p + "resid_post", (pos, dim), ModuleOutput(model, block), n, "residual stream leaving the block"),
            SiteFamily(p + "logits_in", (pos, dim), ModuleOutput(model, tower.transformer), doc=LOGITS_IN_DOC[name]),
        ]
        return families

    @staticmethod
    def _embed_dim(model: nn.Module) -> int:
        return int(getattr(model.visual, "output_dim", None) or model.visual.proj.shape[1])

    # ------------------------------------------------------------------ running

    def prepare(self, model: nn.Module, inputs: Any) -> Inputs:
        dtype = model.visual.conv1.weight.dtype
        prepared = twotower.prepare_inputs(inputs, model_device(model), dtype)
        _, texts, _ = twotower.split_inputs(prepared)
        text = getattr(model, "text", model)
        context = text.positional_embedding.shape[0] - (1 if getattr(text, "cls_emb", None) is not None else 0)
        if texts is not None and texts.shape[1] != context:
            raise ValueError(
                f"texts have {texts.shape[1]} tokens but this model's context length is {context}; "
                f"tokenize with its tokenizer (open_clip pads every caption to the context length)"
            )
        return prepared

    def forward(self, model: nn.Module, inputs: Inputs) -> twotower.TwoTowerOutput:
        with contextlib.ExitStack() as stack:
            for unfused in _unfused(model).values():
                stack.enter_context(unfused.swapped())
            return twotower.run_towers(
                model, inputs,
                encode_image=lambda images: model.encode_image(images),
                encode_text=lambda texts: model.encode_text(texts),
                logit_scale=model.logit_scale,
                logit_bias=getattr(model, "logit_bias", None),
            )

    def output(self, raw: Any) -> torch.Tensor:
        return raw.primary

    def sizes(self, inputs: Inputs) -> dict[str, int]:
        return twotower.sizes(inputs)

    def describe(self, model: nn.Module) -> dict[str, Any]:
        towers = _towers(model)
        out: dict[str, Any] = {"class": type(model).__name__, "library": "open_clip"}
        for name, tower in towers.items():
            out[name] = {"n_layers": tower.n_layers, "n_heads": tower.n_heads, "d_model": tower.width}
        out["vision"]["image_size"] = list(model.visual.image_size)
        out["vision"]["patch_size"] = list(model.visual.patch_size)
        text = getattr(model, "text", model)
        out["text"]["context_length"] = text.positional_embedding.shape[0]
        out["embed_dim"] = self._embed_dim(model)
        out["dtype"] = str(model.visual.conv1.weight.dtype).removeprefix("torch.")
        return out

    # ------------------------------------------------------------------ readout

    def readout(self, model: nn.Module, tower: str = "vision"):
        """How the image embedding is read off the last residual stream (for exact decompositions)."""
        from crosspatch.methods.cross_modal import LinearReadout

        if tower != "vision":
            raise NotImplementedError("the open_clip adapter describes the readout of the vision tower only")
        visual = model.visual
        if getattr(visual, "attn_pool", None) is not None:
            raise AdapterError("this vision tower pools with attention; its embedding is not a linear readout")
        pool = {"tok": "first", "avg": "mean"}.get(visual.pool_type)
        if pool is None:
            raise AdapterError(f"vision pool_type {visual.pool_type!r} has no single embedding to decompose")
        towers = _towers(model)
        norm = visual.ln_post
        proj = visual.proj
        return LinearReadout(
            residual=f"vision.resid_post.{towers['vision'].n_layers - 1}",
            pool=pool,
            norm_weight=getattr(norm, "weight", None),
            norm_bias=getattr(norm, "bias", None),
            eps=float(getattr(norm, "eps", 0.0)),
            normalize=isinstance(norm, nn.LayerNorm),
            norm_after_pool=bool(visual.final_ln_after_pool),
            proj=None if proj is None else proj.detach(),
        )
