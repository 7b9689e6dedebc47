"""The torchvision adapter: ResNet (BasicBlock and Bottleneck) and ConvNeXt classifiers.

Sites, in forward order (``layer`` of ``block`` / ``block_in`` is the block's index counted across
all stages, so ``block.3`` of a ResNet-18 is ``layer2.1``):

=============  ==================  ==========================================================
family         axes                what
=============  ==================  ==========================================================
``stem``       channel, h, w       after the stem (ResNet: conv, norm, ReLU, max-pool; ConvNeXt:
                                   the 4x4 patchify conv and its LayerNorm)
``block_in``   channel, h, w       what block ``layer`` reads (ConvNeXt: after a downsampling
                                   layer at the start of a stage)
``block``      channel, h, w       what block ``layer`` returns (the residual stream after it)
``stage``      channel, h, w       what stage ``layer`` returns
``pool``       channel             the pooled features the final linear layer reads (ConvNeXt:
                                   after the classifier's LayerNorm)
``logits``     class               the output
=============  ==================  ==========================================================

The number of channels changes from stage to stage; an axis whose size differs between layers is
declared without a size (``channel=?`` in the catalog) and checked against the activation when a
run selects from it. ``h`` and ``w`` depend on the input size.

This module imports neither torchvision nor any model: :meth:`TorchvisionAdapter.matches` only
looks at ``torchvision.models`` if the user has imported it already.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from crosspatch.adapter import Adapter, AdapterError, Inputs, model_device
from crosspatch.catalog import Axis, Catalog, SiteFamily
from crosspatch.reach import Callback, Handle, ModuleInput, ModuleOutput, submodule

__all__ = ["TorchvisionAdapter", "IndexedModuleOutput", "IndexedModuleInput"]


class IndexedModuleOutput(ModuleOutput):
    """The output of module ``paths[layer]``: a family whose layers live at unrelated paths."""

    def __init__(self, root: nn.Module, paths: list[str], index: int = 0):
        super().__init__(root, "", index)
        self.paths = list(paths)

    def module(self, layer: int | None) -> nn.Module:
        """The module hooked for ``layer`` (the conformance suite hooks it too, to compare)."""
        return submodule(self.root, self.paths[0 if layer is None else layer], None)

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        def hook(module, args, output):
            new = callback(output)
            return new  # None keeps the output as it is

        return [self.module(layer).register_forward_hook(hook)]


class IndexedModuleInput(ModuleInput):
    """The first positional input of module ``paths[layer]``."""

    def __init__(self, root: nn.Module, paths: list[str]):
        super().__init__(root, "", name=None, position=0)
        self.paths = list(paths)

    def module(self, layer: int | None) -> nn.Module:
        return submodule(self.root, self.paths[0 if layer is None else layer], None)

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        def hook(module, args):
            if not args:
                raise RuntimeError(f"{type(module).__name__} was called without a positional input")
            new = callback(args[0])
            return None if new is None else (new, *args[1:])

        return [self.module(layer).register_forward_pre_hook(hook)]


@dataclass(frozen=True)
class _Layout:
    """Where the sites of one model live."""

    kind: str  # "resnet" | "convnext"
    stem: str
    stem_channels: int
    stages: list[str]
    blocks: list[str]
    block_in_channels: list[int]
    block_out_channels: list[int]
    stage_channels: list[int]
    head: str  # the final linear layer (pool = its input, logits = its output)
    head_in: int | None
    classes: int | None


def _channel_axis(channels: list[int]) -> Axis:
    return Axis("channel", channels[0] if len(set(channels)) == 1 else None)


def _spread(channels: list[int]) -> str:
    """Run-length form, one entry per layer: ``64x3, 128x2, 256x2, 512``."""
    runs: list[list[int]] = []
    for c in channels:
        if runs and runs[-1][0] == c:
            runs[-1][1] += 1
        else:
            runs.append([c, 1])
    return ", ".join(f"{c}x{n}" if n > 1 else str(c) for c, n in runs)


def _bn_features(block: nn.Module) -> int:
    for name in ("bn3", "bn2"):  # Bottleneck, then BasicBlock
        bn = getattr(block, name, None)
        if isinstance(bn, nn.modules.batchnorm._NormBase):
            return bn.num_features
    raise AdapterError(f"ResNet block {type(block).__name__} has neither bn3 nor bn2; cannot tell its channels")


def _resnet_layout(model: nn.Module) -> _Layout:
    stages = [
        name for name in ("layer1", "layer2", "layer3", "layer4") if isinstance(getattr(model, name, None), nn.Sequential)
    ]
    if not stages:
        raise AdapterError(f"{type(model).__name__} has no layer1..layer4 stages")
    blocks, ins, outs, stage_channels = [], [], [], []
    for stage in stages:
        for i, block in enumerate(getattr(model, stage)):
            blocks.append(f"{stage}.{i}")
            ins.append(block.conv1.in_channels)
            outs.append(_bn_features(block))
        stage_channels.append(outs[-1])
    fc = model.fc
    linear = isinstance(fc, nn.Linear)
    return _Layout(
        "resnet", "maxpool", model.conv1.out_channels, stages, blocks, ins, outs, stage_channels,
        "fc", fc.in_features if linear else outs[-1], fc.out_features if linear else None,
    )


def _convnext_layout(model: nn.Module, cnblock: type) -> _Layout:
    stages, blocks, channels, stage_channels = [], [], [], []
    for name, child in model.features.named_children():
        if isinstance(child, nn.Sequential) and len(child) and all(isinstance(b, cnblock) for b in child):
            stages.append(f"features.{name}")
            for i, block in enumerate(child):
                blocks.append(f"features.{name}.{i}")
                channels.append(block.block[0].in_channels)  # the depthwise conv keeps the width
            stage_channels.append(channels[-1])
    if not stages:
        raise AdapterError("this ConvNeXt has no stage of CNBlocks under .features")
    last = len(model.classifier) - 1
    head = model.classifier[last]
    linear = isinstance(head, nn.Linear)
    stem_conv = model.features[0][0]
    return _Layout(
        "convnext", "features.0", stem_conv.out_channels, stages, blocks, channels, channels, stage_channels,
        f"classifier.{last}", head.in_features if linear else channels[-1], head.out_features if linear else None,
    )


class TorchvisionAdapter(Adapter):
    """torchvision ResNet (resnet18 ... resnet152, wide_resnet, resnext; any ``ResNet``) and ConvNeXt."""

    name = "torchvision"

    def matches(self, model: nn.Module) -> bool:
        models = sys.modules.get("torchvision.models")  # a torchvision model exists only if it was imported
        return models is not None and isinstance(model, (models.ResNet, models.ConvNeXt))

    def layout(self, model: nn.Module) -> _Layout:
        import torchvision.models as models  # imported already: matches() said so, or the user named us

        if isinstance(model, models.ResNet):
            return _resnet_layout(model)
        if isinstance(model, models.ConvNeXt):
            return _convnext_layout(model, models.convnext.CNBlock)
        raise AdapterError(
            f"the torchvision adapter serves ResNet and ConvNeXt models, not {type(model).__name__}"
        )

    def catalog(self, model: nn.Module) -> Catalog:
        lay = self.layout(model)
        h, w = Axis("h"), Axis("w")
        n_blocks = len(lay.blocks)
        families = [
            SiteFamily("stem", (Axis("channel", lay.stem_channels), h, w), ModuleOutput(model, lay.stem),
                       doc="after the stem"),
            SiteFamily("block_in", (_channel_axis(lay.block_in_channels), h, w),
                       IndexedModuleInput(model, lay.blocks), n_blocks,
                       f"what the block reads (channels by block: {_spread(lay.block_in_channels)})"),
            SiteFamily("block", (_channel_axis(lay.block_out_channels), h, w),
                       IndexedModuleOutput(model, lay.blocks), n_blocks,
                       f"what the block returns (channels by block: {_spread(lay.block_out_channels)})"),
            SiteFamily("stage", (_channel_axis(lay.stage_channels), h, w),
                       IndexedModuleOutput(model, lay.stages), len(lay.stages),
                       f"what the stage returns (channels: {_spread(lay.stage_channels)})"),
            SiteFamily("pool", (Axis("channel", lay.head_in),), ModuleInput(model, lay.head, name=None),
                       doc="pooled features the final linear layer reads"),
            SiteFamily("logits", (Axis("class", lay.classes),), ModuleOutput(model, lay.head), doc="model output"),
        ]
        return Catalog(families, type(model).__name__)

    def prepare(self, model: nn.Module, inputs: Any) -> Inputs:
        if isinstance(inputs, Mapping):
            for key in ("x", "pixel_values", "images"):
                if key in inputs:
                    x = inputs[key]
                    break
            else:
                raise ValueError(f"inputs need images under 'x' (or 'pixel_values'); got keys {sorted(inputs)}")
        else:
            x = inputs
        x = torch.as_tensor(x)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4:
            raise ValueError(f"images must be [batch, channels, height, width], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(
                f"images must be floating point, normalised as the model expects; got {x.dtype} "
                f"(convert uint8 images with the weights' transforms first)"
            )
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
        return {"x": x.to(device=model_device(model), dtype=dtype)}

    def forward(self, model: nn.Module, inputs: Inputs) -> Any:
        return model(inputs["x"])

    def describe(self, model: nn.Module) -> dict[str, Any]:
        lay = self.layout(model)
        first = submodule(model, lay.blocks[0], None)
        return {
            "class": type(model).__name__,
            "family": lay.kind,
            "block": type(first).__name__,
            "blocks_per_stage": [len(submodule(model, s, None)) for s in lay.stages],
            "channels_per_stage": lay.stage_channels,
            "num_classes": lay.classes,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        }
