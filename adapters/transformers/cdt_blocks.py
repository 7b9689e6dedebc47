"""CD-T's forward over ``(rel, irrel)`` pairs for transformers models (:class:`crosspatch.methods.cdt.DecomposedForward`).

GPT-2, the Llama family (Llama, Mistral, Qwen2: rotary position embeddings, RMSNorm, grouped-query
attention, gated MLP) and BERT / RoBERTa (post-LN), with the heads that turn the last residual into
logits: a causal LM's final norm and unembedding, BERT's and RoBERTa's masked-LM heads, BERT's pooler and
classifier. Each block is written with the rules of :mod:`crosspatch.methods.cdt_rules` over the block's
own modules, so the weights, biases, epsilons and activations are the model's.

What transformers computes outside the modules is taken from one forward of the model
(:meth:`TransformersDecomposition.prepare`): every block's input (the embedding, and the residual a run
that starts at a later block begins from), the additive attention mask each attention received (causal,
padding, sliding window: transformers' own, built for an eager attention), and the rotary cos / sin.

Nodes (the catalog's families, with its layouts): ``embed``, and per block ``resid_pre``, ``head_in`` (a
target: the residual each head reads, as the catalog lays it out), ``head_q`` / ``head_k`` / ``head_v``
(targets: each query head's query, key and value after rotary, ``[pos, head, d_head]``), ``attn_pattern``
(a target), ``head_z``, ``attn_out``, ``resid_mid``, ``mlp_in`` (a target, pre-LN), ``mlp_act``, ``mlp_out``,
``resid_post``; then ``logits_in`` (a target, causal LMs) and ``logits``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crosspatch.engine.adapter import Adapter, Inputs
from crosspatch.engine.reach import submodule, temporarily
from crosspatch.methods.cdt import NodeFamily, Visit
from crosspatch.methods.cdt_rules import Pair, activation, add, affine, attention, normalize

from .inputs import LAYOUTS
from .mapping import mapping_for
from .reaches import AttentionPattern

__all__ = ["TransformersDecomposition", "decomposed_forward", "KINDS"]

#: model type -> the block rules that serve it
KINDS = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "llama", "bert": "bert", "roberta": "bert"}


def decomposed_forward(model: nn.Module, adapter: Adapter) -> "TransformersDecomposition | None":
    """The decomposed forward of ``model``, or None for an architecture the rules do not cover."""
    kind = KINDS.get(getattr(getattr(model, "config", None), "model_type", None))
    if kind is None:
        return None
    mapping = mapping_for(model)
    if mapping.arch is None or mapping.inferred:
        return None
    return TransformersDecomposition(model, adapter, kind)


@dataclass
class _Prepared:
    rows: int
    residuals: list[torch.Tensor]  # each block's input [rows, pos, d]
    masks: list[torch.Tensor | None]  # each block's additive attention mask [rows or 1, 1, pos, key_pos]
    rotary: list[tuple[torch.Tensor, torch.Tensor] | None]  # each block's (cos, sin) [rows or 1, pos, d_head]


# -- one module's rule ----------------------------------------------------------------------------------


def _linear(module: nn.Module, pair: Pair) -> Pair:
    """``nn.Linear`` or GPT-2's ``Conv1D`` (weight ``[in, out]``)."""
    if type(module).__name__ == "Conv1D":
        return affine(pair, lambda x: torch.matmul(x, module.weight), module.bias)
    return affine(pair, lambda x: F.linear(x, module.weight), module.bias)


def _norm(module: nn.Module, pair: Pair) -> Pair:
    """LayerNorm (its own epsilon, weight, bias) or the Llama family's RMSNorm (scale in float32, as transformers)."""
    if isinstance(module, nn.LayerNorm):
        eps = module.eps
        return normalize(pair, module, lambda x: torch.rsqrt(x.var(dim=-1, unbiased=False, keepdim=True) + eps),
                         center=True, weight=module.weight, bias=module.bias)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise TypeError(f"CD-T has no rule for the norm {type(module).__name__}")
    return normalize(pair, module, lambda x: torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps),
                     center=False, weight=module.weight, bias=None)


def _heads(pair: Pair, d_head: int) -> Pair:
    """``[rows, pos, heads * d]`` to ``[rows, heads, pos, d]``."""
    return tuple(t.unflatten(-1, (-1, d_head)).transpose(1, 2) for t in pair)  # type: ignore[return-value]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotary(pair: Pair, cos: torch.Tensor, sin: torch.Tensor) -> Pair:
    """Rotary position embedding (linear in the query or key): each part rotated on its own."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return affine(pair, lambda x: x * cos + _rotate_half(x) * sin, None)


class TransformersDecomposition:
    """The decomposed forward of one GPT-2, Llama-family or BERT / RoBERTa model."""

    def __init__(self, model: nn.Module, adapter: Adapter, kind: str):
        self.model, self.adapter, self.kind = model, adapter, kind
        self.arch = mapping_for(model).arch
        self.base = model.base_model
        self.blocks = submodule(self.base, self.arch.layers, None)
        self.layout = LAYOUTS.get(model.config.model_type)
        catalog = adapter.catalog(model)
        self.head = self._head_kind()
        n = len(self.blocks)
        pos_dim = ("pos", "dim")
        fams = [NodeFamily("embed", pos_dim)]
        block = [
            NodeFamily("resid_pre", pos_dim, n),
            NodeFamily("head_in", ("pos", "qkv", "head", "dim"), n, source=False),
            NodeFamily("head_q", ("pos", "head", "d_head"), n, source=False),
            NodeFamily("head_k", ("pos", "head", "d_head"), n, source=False),
            NodeFamily("head_v", ("pos", "head", "d_head"), n, source=False),
            NodeFamily("attn_pattern", ("head", "pos", "key_pos"), n, source=False),
            NodeFamily("head_z", ("pos", "head", "d_head"), n),
            NodeFamily("attn_out", pos_dim, n),
            NodeFamily("resid_mid", pos_dim, n),
            NodeFamily("mlp_in", pos_dim, n, source=False),
            NodeFamily("mlp_act", ("pos", "neuron"), n),
            NodeFamily("mlp_out", pos_dim, n),
            NodeFamily("resid_post", pos_dim, n),
        ]
        fams += [f for f in block if f.name not in ("head_in", "mlp_in") or f.name in catalog]
        if self.head == "causal" and "logits_in" in catalog:
            fams.append(NodeFamily("logits_in", pos_dim, source=False))
        if self.head is not None and "logits" in catalog:
            fams.append(NodeFamily("logits", catalog.family("logits").axis_names, source=False))
        else:
            self.head = None
        self.families = tuple(fams)
        self._names = {f.name for f in fams}

    def _head_kind(self) -> str | None:
        name = type(self.model).__name__
        if self.model is self.base:
            return None
        if self.kind != "bert" and (name.endswith("ForCausalLM") or name.endswith("LMHeadModel")):
            return "causal"
        if name == "BertForSequenceClassification":
            return "bert_cls" if self.model.bert.pooler is not None else None
        return {"BertForMaskedLM": "bert_mlm", "RobertaForMaskedLM": "roberta_mlm"}.get(name)

    # -- what transformers computes outside the modules ----------------------------------------------------

    def prepare(self, inputs: Inputs) -> _Prepared:
        """One forward of the model (eager attention masks) recording each block's input, mask and rotary."""
        n = len(self.blocks)
        residuals: list[Any] = [None] * n
        masks: list[Any] = [None] * n
        rotary: list[Any] = [None] * n

        def block_input(i: int):
            def hook(module, args, kwargs):
                residuals[i] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach()

            return hook

        def attention_inputs(i: int):
            def hook(module, args, kwargs):
                masks[i] = kwargs.get("attention_mask")
                rotary[i] = kwargs.get("position_embeddings")

            return hook

        core = f"{self.arch.layers}.{{layer}}.{self.arch.attn_core}"
        with temporarily() as changes:  # each undo registered before its change, all undone at the end
            changes.install(AttentionPattern(self.base, core, self.model.config), 0, lambda pattern: None)
            for i, blk in enumerate(self.blocks):
                changes.forward_pre_hook(blk, block_input(i), with_kwargs=True)
                changes.forward_pre_hook(blk.get_submodule(self.arch.attn_core), attention_inputs(i), with_kwargs=True)
            with torch.inference_mode():
                self.adapter.forward(self.model, inputs)
        rows = residuals[0].shape[0]
        return _Prepared(rows, residuals, masks, rotary)

    # -- the forward over pairs --------------------------------------------------------------------------

    def run(self, prepared: _Prepared, visit: Visit, *, repeat: int = 1, start: int = 0) -> None:
        def tile(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None or repeat == 1 or t.shape[0] != prepared.rows:
                return t
            return t.repeat(repeat, *([1] * (t.ndim - 1)))

        x = tile(prepared.residuals[start])
        pair: Pair = (torch.zeros_like(x), x)
        if start == 0:
            pair = visit("embed", pair)
        block = self._bert_block if self.kind == "bert" else self._pre_ln_block
        for layer in range(start, len(self.blocks)):
            rot = prepared.rotary[layer]
            rot = None if rot is None else (tile(rot[0]), tile(rot[1]))
            pair = block(layer, pair, tile(prepared.masks[layer]), rot, visit)
        if self.head is not None:
            visit("logits", self._logits(pair, visit))

    def _alias(self, visit: Visit, name: str, layer: int | None, pair: Pair) -> None:
        """A target that is another node's value (the residual a head or the MLP reads)."""
        if name not in self._names:
            return
        key = name if layer is None else f"{name}.{layer}"
        if name == "head_in":
            n_heads = self._n_heads(layer)
            pair = tuple(t[:, :, None, None, :].expand(*t.shape[:2], 3, n_heads, t.shape[-1]) for t in pair)
        visit(key, pair)

    def _n_heads(self, layer: int) -> int:
        attn = self.blocks[layer].get_submodule(self.arch.attn_core)
        for name in ("num_heads", "num_attention_heads"):
            if isinstance(getattr(attn, name, None), int):
                return getattr(attn, name)
        return self.model.config.num_attention_heads

    def _attend(self, layer: int, q: Pair, k: Pair, v: Pair, mask, scaling: float, visit: Visit) -> Pair:
        """Heads ``[rows, heads, pos, d]`` (keys and values may have fewer heads) to the heads' output
        ``[rows, pos, heads * d]``, visiting the queries, keys, values, pattern and ``head_z``."""
        groups = q[0].shape[1] // k[0].shape[1]
        if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
            k = tuple(t.repeat_interleave(groups, dim=1) for t in k)  # type: ignore[assignment]
            v = tuple(t.repeat_interleave(groups, dim=1) for t in v)  # type: ignore[assignment]
        for name, part in (("head_q", q), ("head_k", k), ("head_v", v)):
            visit(f"{name}.{layer}", tuple(t.transpose(1, 2) for t in part))  # type: ignore[arg-type]
        pattern, z = attention(q, k, v, mask, scaling)
        visit(f"attn_pattern.{layer}", pattern)
        z = visit(f"head_z.{layer}", tuple(t.transpose(1, 2) for t in z))  # type: ignore[arg-type]
        return tuple(t.flatten(-2) for t in z)  # type: ignore[return-value]

    def _pre_ln_block(self, layer: int, pair: Pair, mask, rot, visit: Visit) -> Pair:
        blk = self.blocks[layer]
        attn = blk.get_submodule(self.arch.attn_core)
        pair = visit(f"resid_pre.{layer}", pair)
        self._alias(visit, "head_in", layer, pair)
        h = _norm(blk.get_submodule(self.layout.ln_in), pair)
        if self.kind == "gpt2":
            qkv = _linear(attn.c_attn, h)
            parts = [t.split(attn.split_size, dim=-1) for t in qkv]
            q, k, v = (_heads((parts[0][j], parts[1][j]), attn.head_dim) for j in range(3))
        else:
            d_head = attn.head_dim
            q, k, v = (_heads(_linear(proj, h), d_head) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            cos, sin = rot
            q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        z = self._attend(layer, q, k, v, mask, attn.scaling, visit)
        out = visit(f"attn_out.{layer}", _linear(blk.get_submodule(self.arch.o_proj), z))
        mid = visit(f"resid_mid.{layer}", add(pair, out))
        self._alias(visit, "mlp_in", layer, mid)
        h = _norm(blk.get_submodule(self.layout.ln_mlp), mid)
        mlp = blk.get_submodule(self.arch.mlp)
        if self.kind == "gpt2":
            act = activation(mlp.act, _linear(mlp.c_fc, h))
        else:
            act_fn = mlp.act_fn
            act = activation(lambda gate, up: act_fn(gate) * up, _linear(mlp.gate_proj, h), _linear(mlp.up_proj, h))
        act = visit(f"mlp_act.{layer}", act)
        out = visit(f"mlp_out.{layer}", _linear(blk.get_submodule(self.arch.mlp_down), act))
        return visit(f"resid_post.{layer}", add(mid, out))

    def _bert_block(self, layer: int, pair: Pair, mask, rot, visit: Visit) -> Pair:
        blk = self.blocks[layer]
        attn = blk.attention.self
        pair = visit(f"resid_pre.{layer}", pair)
        self._alias(visit, "head_in", layer, pair)
        d_head = attn.attention_head_size
        q, k, v = (_heads(_linear(proj, pair), d_head) for proj in (attn.query, attn.key, attn.value))
        z = self._attend(layer, q, k, v, mask, attn.scaling, visit)
        out = visit(f"attn_out.{layer}", _linear(blk.attention.output.dense, z))
        mid = visit(f"resid_mid.{layer}", _norm(blk.attention.output.LayerNorm, add(out, pair)))
        act = visit(f"mlp_act.{layer}", activation(blk.intermediate.intermediate_act_fn, _linear(blk.intermediate.dense, mid)))
        out = visit(f"mlp_out.{layer}", _linear(blk.output.dense, act))
        return visit(f"resid_post.{layer}", _norm(blk.output.LayerNorm, add(out, mid)))

    def _logits(self, pair: Pair, visit: Visit) -> Pair:
        if self.head == "causal":
            self._alias(visit, "logits_in", None, pair)
            h = _norm(self.base.get_submodule(self.layout.ln_final), pair)
            return _linear(self.model.get_output_embeddings(), h)
        if self.head == "bert_mlm":
            head = self.model.cls.predictions
            h = activation(head.transform.transform_act_fn, _linear(head.transform.dense, pair))
            return _linear(head.decoder, _norm(head.transform.LayerNorm, h))
        if self.head == "roberta_mlm":
            from transformers.models.roberta import modeling_roberta

            head = self.model.lm_head
            h = activation(modeling_roberta.gelu, _linear(head.dense, pair))
            return _linear(head.decoder, _norm(head.layer_norm, h))
        # bert_cls: the pooler reads the first position
        first: Pair = (pair[0][:, 0], pair[1][:, 0])
        pooler = self.model.bert.pooler
        pooled = activation(pooler.activation, _linear(pooler.dense, first))
        return _linear(self.model.classifier, pooled)
