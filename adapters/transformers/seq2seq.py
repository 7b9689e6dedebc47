"""Encoder-decoder models (T5, BART and their relatives) under ``encoder.`` and ``decoder.`` site names.

The transformers adapter hands models of the types in :data:`LAYOUTS` with an encoder and a decoder to
this module, as it hands CLIP to :mod:`.clip`. Each stack gets the language-model families under its
prefix (``encoder.resid_pre.3``, ``decoder.head_out.1``); the decoder also gets its cross-attention
(``decoder.cross_head_out``, ``decoder.cross_pattern`` ...), and a model with a language-model head
``logits``. ``docs/seq2seq.md`` lists the families, their axes and the decisions behind them.

Positions: the decoder's are ``pos`` (what the output and metrics index), the encoder's ``enc_pos``.
Prepared inputs are named the same way: the unprefixed keys run along ``pos`` (``input_ids`` are the
decoder's ids, ``attention_mask`` its mask), the ``encoder_`` keys along ``enc_pos``; users pass
transformers' names (``input_ids``, ``decoder_input_ids`` ...) and :func:`prepare` renames them.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from crosspatch.engine.adapter import Inputs, model_device
from crosspatch.engine.reach import ModuleInput, ModuleOutput, submodule
from crosspatch.sites.catalog import Axis, Catalog, LinearFrom, SiteFamily

from .reaches import AttentionPattern, HeadOut, HeadZ, ResidualAfterAttention
from .twotower import Tap

__all__ = [
    "LAYOUTS", "STACKS", "Stack", "RelativeBiasPattern", "is_seq2seq", "serves", "stack_layout", "catalog", "prepare",
    "is_prepared", "model_arguments", "forward", "sizes", "example_inputs", "describe",
]


@dataclass(frozen=True)
class Stack:
    """Where one stack keeps the modules behind each site; paths are relative to a block.

    A residual point (``mid``, ``cross_mid``) is a module whose output is the residual there, or a pair
    (module whose input is the residual before the branch, the branch): their sum.
    """

    blocks: str  # the block list, relative to the stack
    attn: str  # self-attention: output 0 is its write; the attention function is handed it (pattern owner)
    o_proj: str  # its output projection; the input holds the heads side by side
    mid: str | tuple[str, str]  # the residual after self-attention
    mlp: str  # output: the MLP's write
    mlp_down: str  # input: the MLP's neurons
    cross: str | None = None  # decoder: the cross-attention, as attn
    cross_o: str | None = None
    cross_mid: str | tuple[str, str] | None = None  # the residual after cross-attention
    post_norms: tuple[str, ...] | None = None  # post-norm: the norm after each residual sum, in block order
    final_norm: str | None = None  # the stack's norm after its last block, relative to the stack
    relative_bias: bool = False  # T5: the attention function takes a position bias beside the mask


def _t5(decoder: bool) -> Stack:
    # T5Block: layer[0] self-attention, layer[1] cross-attention (decoder), layer[-1] the MLP; each sublayer
    # normalises its input and returns input + write (pre-norm), and the stack normalises after its last block.
    ff = "layer.2" if decoder else "layer.1"
    return Stack(
        "block", "layer.0.SelfAttention", "layer.0.SelfAttention.o", "layer.0",
        f"{ff}.DenseReluDense", f"{ff}.DenseReluDense.wo",
        *(("layer.1.EncDecAttention", "layer.1.EncDecAttention.o", "layer.1") if decoder else ()),
        final_norm="final_layer_norm", relative_bias=True,
    )


def _bart(decoder: bool, pre_norm: bool) -> Stack:
    # BART-style layers: self_attn (+ self_attn_layer_norm), encoder_attn (+ encoder_attn_layer_norm), fc1 and
    # fc2 (+ final_layer_norm). Post-norm (BART, Marian) normalises after each sum; pre-norm (mBART,
    # Pegasus) normalises each branch's input and the stack's output (its layer_norm).
    cross = ("encoder_attn", "encoder_attn.out_proj") if decoder else (None, None)
    if pre_norm:
        mid: Any = ("", "self_attn")
        cross_mid: Any = ("encoder_attn_layer_norm", "encoder_attn") if decoder else None
        norms, final = None, "layer_norm"
    else:
        mid, cross_mid = "self_attn_layer_norm", "encoder_attn_layer_norm" if decoder else None
        norms = ("self_attn_layer_norm", *(("encoder_attn_layer_norm",) if decoder else ()), "final_layer_norm")
        final = None
    return Stack("layers", "self_attn", "self_attn.out_proj", mid, "fc2", "fc2", *cross, cross_mid, norms, final)


#: Per model type, its (encoder, decoder) layout.
LAYOUTS: dict[str, tuple[Stack, Stack]] = {
    **{t: (_t5(False), _t5(True)) for t in ("t5", "mt5", "umt5")},
    **{t: (_bart(False, False), _bart(True, False)) for t in ("bart", "marian", "plbart", "blenderbot-small")},
    **{t: (_bart(False, True), _bart(True, True)) for t in ("mbart", "pegasus", "blenderbot", "m2m_100")},
}
STACKS = ("encoder", "decoder")

# Transformers' argument for each prepared key: unprefixed keys run along the decoder's positions.
_ARGUMENTS = {
    "encoder_input_ids": "input_ids", "encoder_attention_mask": "attention_mask", "encoder_inputs_embeds": "inputs_embeds",
    "input_ids": "decoder_input_ids", "attention_mask": "decoder_attention_mask", "inputs_embeds": "decoder_inputs_embeds",
}
_PREPARED = {argument: key for key, argument in _ARGUMENTS.items()}


def serves(model_type: str) -> bool:
    """Whether this module serves encoder-decoder models of ``model_type``."""
    return model_type in LAYOUTS


def is_seq2seq(model: nn.Module) -> bool:
    """An encoder-decoder model of a type in :data:`LAYOUTS` that has both stacks."""
    config = getattr(model, "config", None)
    base = getattr(model, "base_model", None)
    return (
        serves(getattr(config, "model_type", None)) and bool(getattr(config, "is_encoder_decoder", False))
        and all(isinstance(getattr(base, s, None), nn.Module) for s in STACKS)
    )


def stack_layout(model: nn.Module, stack: str) -> Stack:
    """The layout of ``model``'s ``"encoder"`` or ``"decoder"``."""
    return LAYOUTS[model.config.model_type][STACKS.index(stack)]


class RelativeBiasPattern(AttentionPattern):
    """Attention patterns of T5's attention, which hands its relative position bias to the attention
    function beside the mask: crosspatch's eager attention gets the bias added to its mask."""

    def implementation(self) -> str:
        return _with_position_bias(super().implementation())


def _with_position_bias(name: str) -> str:
    """The name of attention function ``name`` with a ``position_bias`` folded into the mask (registered once)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    biased = f"{name}_position_bias"
    if biased not in AttentionInterface._global_mapping:
        attend = ALL_ATTENTION_FUNCTIONS[name]

        def attention(module, query, key, value, attention_mask, position_bias=None, **kwargs):
            if position_bias is not None:  # T5 adds both to the scores: the sum is the same mask
                attention_mask = position_bias if attention_mask is None else attention_mask + position_bias
            return attend(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(biased, attention)
        AttentionMaskInterface.register(biased, ALL_MASK_ATTENTION_FUNCTIONS[name])
    return biased


def _residual(root: nn.Module, block: str, point: str | tuple[str, str]):
    if isinstance(point, str):
        return ModuleOutput(root, f"{block}.{point}")
    before, branch = point
    return ResidualAfterAttention(root, f"{block}.{before}" if before else block, f"{block}.{branch}")


def _attention(root: nn.Module, block: str, stack: Stack, prefix: str, path: str, o_path: str,
               pos: Axis, keys: Axis, dim: Axis, n: int, what: str) -> list[SiteFamily]:
    """pattern, head_z, head_out and attn_out of one attention (``prefix``: ``""`` or ``"cross_"``)."""
    attn = submodule(root, f"{block}.{path}", 0)
    o = submodule(root, f"{block}.{o_path}", 0)
    heads = getattr(attn, "n_heads", None) or attn.num_heads
    head = Axis("head", heads)
    pattern_reach = RelativeBiasPattern if stack.relative_bias else AttentionPattern
    head_out = HeadOut(root, f"{block}.{o_path}", heads, False)
    pattern = f"{prefix[:-1]}_pattern" if prefix else "attn_pattern"
    return [
        SiteFamily(pattern, (head, pos, keys), pattern_reach(root, f"{block}.{path}", attn.config), n,
                   f"{what} probabilities (query pos, key pos), after the softmax"),
        SiteFamily(f"{prefix}head_z", (pos, head, Axis("d_head", o.in_features // heads)),
                   HeadZ(root, f"{block}.{o_path}", heads), n, f"each {what} head's weighted values, the output projection's input"),
        SiteFamily(f"{prefix}head_out", (pos, head, dim), head_out, n,
                   f"each {what} head's write into the residual (heads + output bias = {prefix}attn_out)",
                   linear_from=LinearFrom(f"{prefix}head_z", (pos.name, "head"), head_out.writes)),
        SiteFamily(f"{prefix}attn_out", (pos, dim), ModuleOutput(root, f"{block}.{path}"), n, f"{what} write"),
    ]


def _stack_families(model: nn.Module, name: str) -> list[SiteFamily]:
    base, stack = model.base_model, stack_layout(model, name)
    block = f"{name}.{stack.blocks}.{{layer}}"
    n = len(submodule(base, f"{name}.{stack.blocks}", None))
    d_model = submodule(base, f"{block}.{stack.o_proj}", 0).out_features
    decoder = name == "decoder"
    pos = Axis("pos") if decoder else Axis("enc_pos")
    dim = Axis("dim", d_model)
    families = [
        SiteFamily("embed", (pos, dim), ModuleInput(base, block.format(layer=0)), doc="embeddings entering the first block"),
        SiteFamily("resid_pre", (pos, dim), ModuleInput(base, block), n, "residual stream entering the block"),
        *_attention(base, block, stack, "", stack.attn, stack.o_proj, pos, Axis("key_pos" if decoder else "enc_key_pos"),
                    dim, n, "self-attention"),
        SiteFamily("resid_mid", (pos, dim), _residual(base, block, stack.mid), n, "residual after self-attention"),
    ]
    if decoder:
        families += _attention(base, block, stack, "cross_", stack.cross, stack.cross_o, pos, Axis("enc_pos"), dim, n,
                               "cross-attention")
        families.append(SiteFamily("resid_cross", (pos, dim), _residual(base, block, stack.cross_mid), n,
                                   "residual after cross-attention"))
    d_mlp = submodule(base, f"{block}.{stack.mlp_down}", 0).in_features
    families += [
        SiteFamily("mlp_act", (pos, Axis("neuron", d_mlp)), ModuleInput(base, f"{block}.{stack.mlp_down}", name=None), n,
                   "MLP neuron activations"),
        SiteFamily("mlp_out", (pos, dim), ModuleOutput(base, f"{block}.{stack.mlp}"), n, "MLP write"),
        SiteFamily("resid_post", (pos, dim), ModuleOutput(base, block), n, "residual stream leaving the block"),
    ]
    return [_prefixed(f, f"{name}.") for f in families]


def _prefixed(family: SiteFamily, prefix: str) -> SiteFamily:
    linear = family.linear_from
    if linear is not None:
        linear = LinearFrom(prefix + linear.source, linear.shared, linear.apply)
    return SiteFamily(prefix + family.name, family.axes, family.reach, family.layers, family.doc, family.writable, linear)


_CATALOGS: "weakref.WeakKeyDictionary[nn.Module, Catalog]" = weakref.WeakKeyDictionary()
_LOGITS: "weakref.WeakKeyDictionary[nn.Module, Tap]" = weakref.WeakKeyDictionary()


def catalog(model: nn.Module) -> Catalog:
    found = _CATALOGS.get(model)
    if found is None:
        families = _stack_families(model, "encoder") + _stack_families(model, "decoder")
        head = model.get_output_embeddings()
        if head is not None:
            logits = _LOGITS.setdefault(model, Tap())
            families.append(SiteFamily("logits", (Axis("pos"), Axis("vocab", head.weight.shape[0])), logits,
                                       doc="the language-model head's output at every decoder position"))
        found = _CATALOGS[model] = Catalog(families, type(model).__name__)
    return found


def is_prepared(inputs: Any) -> bool:
    """Inputs :func:`prepare` made (their encoder keys are ``encoder_`` prefixed)."""
    return isinstance(inputs, Mapping) and any(key.startswith("encoder_") for key in inputs)


def prepare(model: nn.Module, inputs: Any) -> Inputs:
    """``{"input_ids", "decoder_input_ids"}`` (with ``attention_mask``, ``decoder_attention_mask``, or
    ``inputs_embeds`` / ``decoder_inputs_embeds``) as batched tensors on the model's device, renamed by the
    positions they run along (see the module docstring); prepared inputs pass through."""
    if not isinstance(inputs, Mapping):
        raise ValueError(_NEEDS_DICT.format(type(model).__name__, _start_token(model)))
    if is_prepared(inputs):
        renamed = dict(inputs)
        unknown = set(renamed) - set(_ARGUMENTS)
    else:
        renamed = {_PREPARED[k]: v for k, v in inputs.items() if k in _PREPARED}
        unknown = set(inputs) - set(_PREPARED)
    if unknown:
        raise ValueError(f"unknown inputs {sorted(unknown)} for {type(model).__name__}; it takes {', '.join(_PREPARED)}")
    if not {"encoder_input_ids", "encoder_inputs_embeds"} & set(renamed) or not {"input_ids", "inputs_embeds"} & set(renamed):
        raise ValueError(_NEEDS_DICT.format(type(model).__name__, _start_token(model)))
    device, dtype = model_device(model), next(model.parameters()).dtype
    out = {}
    for key, value in renamed.items():
        value = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        embeds = key.endswith("inputs_embeds")
        if value.ndim == (2 if embeds else 1):
            value = value.unsqueeze(0)
        out[key] = value.to(device, dtype if embeds else torch.long)
    rows = {key: value.shape[0] for key, value in out.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"the inputs have different numbers of rows: {rows}")
    return out


_NEEDS_DICT = (
    "{0} is an encoder-decoder model: pass a dict {{'input_ids': source ids, 'decoder_input_ids': target ids}} "
    "(optionally 'attention_mask' and 'decoder_attention_mask'). The decoder's ids start with its start token "
    "(decoder_start_token_id={1}); model.prepare_decoder_input_ids_from_labels(labels) shifts a target sequence "
    "right as transformers does in training"
)


def model_arguments(inputs: Inputs) -> dict[str, torch.Tensor]:
    """Prepared inputs under transformers' argument names."""
    return {_ARGUMENTS[key]: value for key, value in inputs.items()}


def forward(model: nn.Module, inputs: Inputs) -> Any:
    out = model(**model_arguments(inputs), use_cache=False, return_dict=True)
    tap = _LOGITS.get(model)
    if tap is not None and getattr(out, "logits", None) is not None:
        out["logits"] = tap(out.logits)
    return out


def sizes(inputs: Inputs) -> dict[str, int]:
    """Decoder positions are ``pos`` (and ``key_pos``), encoder positions ``enc_pos`` (and ``enc_key_pos``)."""
    decoder = inputs.get("input_ids", inputs.get("inputs_embeds"))
    encoder = inputs.get("encoder_input_ids", inputs.get("encoder_inputs_embeds"))
    out = {"enc_pos": encoder.shape[1], "enc_key_pos": encoder.shape[1]}
    if decoder is not None:
        out["pos"] = out["key_pos"] = decoder.shape[1]
    return out


def example_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Two rows: 9 source tokens, 6 target tokens starting with the decoder's start token."""
    vocab = min(model.config.vocab_size, 1000)
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(0, vocab, (2, 6), generator=generator)
    target[:, 0] = _start_token(model)
    return {"input_ids": torch.randint(0, vocab, (2, 9), generator=generator), "decoder_input_ids": target}


def _start_token(model: nn.Module) -> int:
    """The id the decoder's input starts with (T5 and mBART name none: their pad token)."""
    for config in (model.config, getattr(model, "generation_config", None)):
        start = getattr(config, "decoder_start_token_id", None)
        if isinstance(start, int):
            return start
    return model.config.pad_token_id or 0


def describe(model: nn.Module) -> dict[str, Any]:
    config, base = model.config, model.base_model
    out: dict[str, Any] = {"class": type(model).__name__, "model_type": config.model_type,
                           "name_or_path": getattr(config, "name_or_path", "") or ""}
    for name in STACKS:
        stack = stack_layout(model, name)
        attn = submodule(base, f"{name}.{stack.blocks}.0.{stack.attn}", None)
        out[name] = {
            "n_layers": len(submodule(base, f"{name}.{stack.blocks}", None)),
            "n_heads": getattr(attn, "n_heads", None) or attn.num_heads,
            "d_model": submodule(base, f"{name}.{stack.blocks}.0.{stack.o_proj}", None).out_features,
        }
    out["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return out
