"""Architecture inference: where a transformers model keeps the modules behind every site, read off
one probe forward instead of a table entry.

The block list is the module list as long as the model is deep. Within the first block, one forward
(on token ids, or on images for a vision encoder) with a hook on every module says which module does
what, by the values that flow: the attention and the MLP are the modules whose writes (their outputs,
after a sandwich norm or a layer scale that takes them; or their outputs minus the residual they were
handed and add themselves, as in BLOOM: :mod:`.branches`) add to the block input to give the block
output; the block is sequential when a module reads ``input + attention``, parallel when the MLP reads
the same normed input as the attention; the output projection is the attention's linear layer whose
output is the attention's write, the down projection the MLP's linear layer whose output is the MLP's;
the input norm is what turns the block input into what the attention reads; the final norm is what
turns the last block's output into what the unembedding reads; the pattern is what transformers'
attention function computes, or else the input of an attention submodule that is one (BLOOM's
dropout). Names are only used to tell the query, key and value projections apart.

What cannot be established this way is left out and said (:attr:`Inferred.notes`); what is
established is then proved on the wrapped model (:mod:`.proof`) before it is served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .architectures import Architecture
from .branches import Branches, branches, is_norm, post_norms
from .examples import example_inputs, forward_kwargs, takes_images
from .inputs import InputLayout
from .slot_grad import rms_gamma
from .probe import Flow, first_tensor, probe, same

__all__ = ["InferenceError", "Inferred", "infer", "config_int", "has_submodule", "sizing_config"]

_Q = ("q_proj", "query", "q", "wq", "q_lin")
_K = ("k_proj", "key", "k", "wk", "k_lin")
_V = ("v_proj", "value", "v", "wv", "v_lin")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")
_MLP_WORDS = ("mlp", "feedforward", "moe", "experts")
_HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_WIDTH = ("hidden_size", "n_embd", "d_model", "dim")
_DEPTH = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class InferenceError(Exception):
    """The model's structure does not fit a residual transformer as inference reads it."""


@dataclass(frozen=True)
class Inferred:
    """An inferred :class:`Architecture`, the receiver-input layout when found, and what was left out."""

    arch: Architecture
    layout: InputLayout | None
    n_kv_heads: int
    notes: dict[str, str] = field(default_factory=dict)
    positions: int | None = None  # a vision encoder's positions (patches and class tokens) at the config's image size
    n_heads: int | None = None  # the heads the attention computes (its pattern's), where it could be read


def config_int(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def sizing_config(model: nn.Module) -> Any:
    """The config that names the blocks' sizes: the model's own, else the sub-config of what the model
    reads, ``vision_config`` for images (SigLIP's image classifier), ``text_config`` for token ids."""
    config = model.config
    order = ("vision_config", "text_config") if takes_images(model) else ("text_config",)
    for sub in (config, *(getattr(config, name, None) for name in order)):
        if sub is not None and config_int(sub, _HEADS) is not None and config_int(sub, _WIDTH) is not None:
            return sub
    return config


def _block_list(base: nn.Module, depth: int | None) -> str:
    found = [
        (name, len(module)) for name, module in base.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    ]
    if depth is not None:
        found = [f for f in found if f[1] == depth]
    if not found:
        raise InferenceError(f"no list of {depth} identical blocks in {type(base).__name__}")
    return min(found, key=lambda f: (f[0].count("."), -f[1]))[0]


def has_submodule(block: nn.Module, path: str) -> bool:
    """Whether ``block`` has a submodule at ``path``."""
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _linears(module: nn.Module, prefix: str) -> dict[str, nn.Module]:
    return {f"{prefix}.{name}": sub for name, sub in module.named_modules() if name and _is_linear(sub)}


def _out_features(linear: nn.Module) -> int:
    return linear.weight.shape[1] if type(linear).__name__ == "Conv1D" else linear.weight.shape[0]


def infer(model: nn.Module) -> Inferred:
    """The Architecture of ``model`` read off one probe forward; InferenceError names what did not fit."""
    config, base = sizing_config(model), model.base_model
    if getattr(model.config, "is_encoder_decoder", False) and all(
            isinstance(getattr(base, stack, None), nn.Module) for stack in ("encoder", "decoder")):
        raise InferenceError("an encoder-decoder model of a type the encoder-decoder table does not list: inference "
                             "reads one stack, whose positions are not the output's")
    n_heads, width = config_int(config, _HEADS), config_int(config, _WIDTH)
    if n_heads is None or width is None:
        raise InferenceError("the config names no number of attention heads or hidden size")
    layers = _block_list(base, config_int(config, _DEPTH))
    blocks = base.get_submodule(layers)
    first, last = f"{layers}.0", f"{layers}.{len(blocks) - 1}"
    outside = _beside_blocks(base, layers)
    modules = {first: blocks[0], last: blocks[-1]}
    modules.update({f"{first}.{n}": m for n, m in blocks[0].named_modules() if n})
    modules.update(outside)
    head = model.get_output_embeddings() if model is not base else None
    if head is not None:
        modules["<unembed>"] = head
    images = takes_images(model)
    inputs = forward_kwargs(model, example_inputs(model))
    try:
        flow = probe(model, modules, inputs, width)
    except Exception as exc:  # a model that does not run on its example inputs alone (encoder-decoder)
        what = "images" if images else "token ids"
        raise InferenceError(f"a probe forward on {what} failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    x, y = flow.inputs.get(first), flow.outputs.get(first)
    if x is None or y is None or x.shape != y.shape or x.shape[-1] != width:
        raise InferenceError(f"block {first} does not map a [batch, pos, {width}] residual to one of the same shape")
    flat = _unflatten(flow, first, x.shape[:2])
    children = {n: m for n, m in blocks[0].named_children()}
    out = lambda name: flow.outputs.get(f"{first}.{name}")  # noqa: E731
    inp = lambda name: flow.inputs.get(f"{first}.{name}")  # noqa: E731

    attn = next((n for n, m in children.items() if "attention" in type(m).__name__.lower() or "attn" in type(m).__name__.lower()), None)
    if attn is None:
        raise InferenceError(f"no attention module among the children of {first} ({', '.join(children)})")
    # The MLP: a module with weights (a linear layer itself in OPT) writing a residual-shaped output.
    mlps = [n for n, m in children.items() if n != attn and out(n) is not None and out(n).shape == x.shape
            and not is_norm(m) and any(True for _ in m.parameters())]
    if len(mlps) > 1:  # gates and residual scales have weights too: prefer what is named or typed as an MLP
        named = [n for n in mlps if n in _MLP_NAMES or any(w in type(children[n]).__name__.lower() for w in _MLP_WORDS)]
        mlps = named if len(named) == 1 else mlps
    if len(mlps) != 1:
        raise InferenceError(f"expected one MLP beside the attention in {first}, found {mlps or 'none'}")
    mlp = mlps[0]

    scales = {n: p.detach() for n, p in blocks[0].named_parameters(recurse=False) if p.shape == (width,)}
    notes: dict[str, str] = {}
    found = branches(flow, first, children, attn, mlp, scales)
    post = post_norms(flow, first, children, attn, mlp) if found is None else None
    if found is None and post is None:
        raise InferenceError(
            f"the block output is not its input + the writes of {attn} and {mlp}, nor a norm of the residual plus "
            f"each in turn (another residual layout)"
        )
    if post is not None:  # post-norm: the MLP reads the normed sum, and no norm reads the block input
        found = Branches(attn, mlp, None, None, out(attn), out(mlp), out(post.mid_norm))
    attn_w, mlp_w, mid = found.attn, found.mlp, found.mid
    mid_readers = [n for n in children if n not in (attn, attn_w, mlp_w) and same(inp(n), mid)]
    x_norms = [n for n, m in children.items() if is_norm(m) and same(inp(n), x, atol=0)]
    # The attention's input norm: of the norms reading the block input, the one whose output it reads (Falcon's new
    # architecture normalises the input twice, once for the attention and once for the MLP).
    in_norm = next((n for n in x_norms if same(out(n), inp(attn))), x_norms[0] if x_norms else None)
    if post is not None:
        if not any(same(inp(n), mid) for n in children if n not in (attn, post.mid_norm, post.out_norm)):
            raise InferenceError(f"no module reads the norm {post.mid_norm} of input + attention (the MLP should)")
        resid_mid, ln_mlp = post.mid_norm, None
    elif found.attn_scale or found.mlp_scale:
        resid_mid, ln_mlp = None, None  # no module holds the stream after a write scaled inline
        notes["resid_mid"] = "the block scales the attention's output inline (a layer scale parameter): no module holds the stream after it"
    elif mid_readers:
        # The stream after attention: input + write, or the output of an attention that adds the residual itself.
        resid_mid: str | None = "sum" if found.attn_residual is None else attn
        ln_mlp = next((n for n in mid_readers if is_norm(children[n])), None)
    elif same(inp(mlp), x) or any(same(inp(mlp), out(n)) for n in x_norms):
        resid_mid, ln_mlp = None, None  # parallel: the MLP reads the block input (normed, by the attention's norm or its own)
    else:
        raise InferenceError(f"the MLP {mlp} reads neither input + attention nor the block input")

    for name in (attn, attn_w, mlp, mlp_w, in_norm, ln_mlp, *((post.mid_norm, post.out_norm) if post else ())):
        if name is not None and flow.calls.get(f"{first}.{name}", 0) != 1:
            raise InferenceError(f"module {first}.{name} runs {flow.calls.get(f'{first}.{name}', 0)} times in one forward")
    # The pattern: what transformers' attention function is handed, else an attention submodule's input.
    owner = _pattern_owner(model, blocks[0], inputs)
    reads = None if owner else _pattern_input(flow, first, attn, x.shape[1])
    if reads is not None and not all(has_submodule(block, reads[0]) for block in blocks):
        reads = None
    if owner or reads:
        n_heads = (owner or reads)[1]  # the heads the attention computes, whichever the config names
    else:
        notes["attn_pattern"] = "the attention does not compute its pattern through transformers' attention functions"
    # A write computed as output - residual matches its projection up to rounding; a module's own output exactly.
    attn_out, attn_tol = (found.attn_write, 1e-5) if found.attn_residual else (out(attn), 0)
    o_proj = next((n for n, m in _linears(children[attn], attn).items()
                   if _out_features(m) == width and same(out(n), attn_out, atol=attn_tol)), None)
    if o_proj is None:
        raise InferenceError(f"no linear layer of {attn} produces its output (the per-head writes need one)")
    conv1d = type(blocks[0].get_submodule(o_proj)).__name__ == "Conv1D"
    o_in = blocks[0].get_submodule(o_proj).weight.shape[0 if conv1d else 1]
    if o_in % n_heads:
        raise InferenceError(f"{o_proj} reads {o_in} features, not a multiple of {n_heads} heads")
    mlp_out, mlp_tol = (found.mlp_write, 1e-5) if found.mlp_residual else (out(mlp), 0)
    down = mlp if _is_linear(children[mlp]) else next(
        (n for n, m in _linears(children[mlp], mlp).items() if _out_features(m) == width and same(out(n), mlp_out, atol=mlp_tol)), None
    )
    if down is None:
        notes["mlp_act"] = f"no single linear layer of {mlp} produces its output (mixture of experts or another layout)"

    embed = _embedding(flow, x, outside)
    if embed is None:
        notes["embed"] = "the model adds its embeddings outside any module (resid_pre.0 holds them)"
    missing = [
        (path, i) for path in (attn, attn_w, o_proj, mlp, mlp_w, in_norm, ln_mlp, *((post.mid_norm, post.out_norm) if post else ()))
        if path
        for i, block in enumerate(blocks) if not has_submodule(block, path)
    ]
    if missing:
        raise InferenceError(f"the blocks differ: block {missing[0][1]} has no {missing[0][0]} (a hybrid stack)")
    if down is not None and not all(has_submodule(block, down) for block in blocks):
        notes["mlp_act"] = "the MLP differs between blocks (dense and mixture of experts)"
        down = None
    arch = Architecture(
        layers=layers, embed=embed, attn=attn_w, attn_core=owner[0] if owner else attn, o_proj=o_proj, mlp=mlp_w, mlp_down=down,
        resid_mid=resid_mid, conv1d=conv1d, causal=not images and _causal(model, inputs),
        attn_residual=found.attn_residual, mlp_residual=found.mlp_residual, pattern_input=reads[0] if reads else None,
        attn_scale=found.attn_scale, mlp_scale=found.mlp_scale,
        flat=tuple(sorted(p for p in {mlp, mlp_w, down, ln_mlp} if p and p in flat)),
        resid_norm=post.out_norm if post else None,
        copied=tuple(sorted(p for p in {attn_w, mlp_w} if f"{first}.{p}" in flow.mutated)),
    )
    layout, n_kv = _layout(children[attn], attn, flow, first, in_norm, children.get(in_norm), ln_mlp, _final_norm(flow, last, outside),
                           n_heads, o_in // n_heads, notes)
    if layout is None and notes.get("head_in", "").startswith("no separate"):
        layout = _fused_layout(model, inputs, children[attn], attn, flow, first, blocks[0], o_proj, in_norm, ln_mlp,
                               _final_norm(flow, last, outside), n_heads, o_in // n_heads, arch.causal, notes)
    if layout is not None and not all(has_submodule(block, p) for block in blocks for p in layout.qkv):
        notes["head_in"] = "the query, key and value projections differ between blocks"
        layout = None
    return Inferred(arch, layout, n_kv, notes, x.shape[1] if images else None, n_heads)


def _unflatten(flow: Flow, first: str, rows: torch.Size) -> set[str]:
    """The modules of block ``first`` that saw its ``batch * pos`` tokens flattened into one axis (OPT's MLP
    and the norm before it), their probed values unflattened in place to ``[batch, pos, ...]``; by path
    relative to the block."""
    tokens, found = rows[0] * rows[1], set()
    for values in (flow.inputs, flow.outputs):
        for name, t in list(values.items()):
            if name.startswith(f"{first}.") and t.ndim == 2 and t.shape[0] == tokens and tokens > rows[1]:
                values[name] = t.unflatten(0, tuple(rows))
                found.add(name[len(first) + 1:])
    return found


def _beside_blocks(base: nn.Module, layers: str) -> dict[str, nn.Module]:
    """The modules beside the block list: children of the base model and of every module on the way to
    the list (SigLIP's ``vision_model.embeddings`` beside ``vision_model.encoder.layers``)."""
    parts, found = layers.split("."), {}
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        parent = base.get_submodule(prefix) if prefix else base
        for name, child in parent.named_children():
            if name != part:
                found[f"{prefix}.{name}" if prefix else name] = child
    return found


def _pattern_owner(model: nn.Module, block: nn.Module, inputs: dict[str, Any]) -> tuple[str, int] | None:
    """The module of ``block`` that transformers' attention function is handed (the pattern's owner), and
    the pattern's heads."""
    from .reaches import AttentionPattern

    seen: list[tuple[str, int]] = []
    handles = []
    try:
        for name, module in block.named_modules():
            if name:
                reach = AttentionPattern(block, name, model.config)
                handles += reach.install(None, lambda pattern, name=name: seen.append((name, pattern.shape[1])))
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen[0] if seen else None


def _pattern_input(flow: Flow, first: str, attn: str, positions: int) -> tuple[str, int] | None:
    """A module of the attention, run once, whose input is the pattern ``[batch, head, pos, key_pos]``:
    rows of non-negative numbers that sum to one (BLOOM computes it inline and hands it to a dropout),
    and the pattern's heads."""
    prefix = f"{first}.{attn}."
    for name, p in flow.inputs.items():
        if not name.startswith(prefix) or flow.calls.get(name) != 1 or p.ndim != 4 or p.shape[2:] != (positions, positions):
            continue
        if p.is_floating_point() and bool((p >= 0).all()) and same(p.sum(-1), torch.ones_like(p[..., 0])):
            return name[len(first) + 1:], p.shape[1]
    return None


def _causal(model: nn.Module, inputs: dict[str, Any]) -> bool:
    """Whether a change at the last position leaves every earlier position's output alone."""
    ids = inputs["input_ids"]
    other = ids.clone()
    other[:, -1] = (other[:, -1] + 1) % max(int(ids.max()) + 1, 2)
    with torch.no_grad():
        a, b = (first_tensor(model(**{**inputs, "input_ids": i})) for i in (ids, other))
    return bool(torch.equal(a[:, :-1], b[:, :-1]))


def _embedding(flow: Flow, x: torch.Tensor, outside: dict[str, nn.Module]) -> str | None:
    """The last module beside the blocks whose output is the first block's input; None when the model
    computes it outside any module (then the first block's input is the embedding)."""
    found = [n for n, y in flow.outputs.items() if n in outside and y is x]
    found = found or [n for n, y in flow.outputs.items() if n in outside and same(y, x, atol=0)]
    return found[-1] if found else None


def _final_norm(flow: Flow, last: str, outside: dict[str, nn.Module]) -> str | None:
    y, unembed = flow.outputs.get(last), flow.inputs.get("<unembed>")
    for name, module in outside.items():
        if is_norm(module) and same(flow.inputs.get(name), y, atol=0) and same(flow.outputs.get(name), unembed, atol=0):
            return name
    return None


def _plain_norm(module: nn.Module, x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    """A LayerNorm, or a norm that computes ``gamma * x / rms(x)`` with ``gamma`` its weight or ``1 + weight``
    (what head_in recomputes and differentiates)."""
    if isinstance(module, nn.LayerNorm):
        return True
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    gamma = rms_gamma(module)
    if gamma is None or x is None:
        return False
    h = x.float()
    return same(gamma * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype), y)


def _layout(attention: nn.Module, attn: str, flow: Flow, first: str, in_norm: str | None, in_norm_module: nn.Module | None,
            ln_mlp: str | None,
            ln_final: str | None, n_heads: int, d_head: int, notes: dict[str, str]) -> tuple[InputLayout | None, int]:
    """Where the query, key and value projections read: separate projections by name, each reading what
    the attention reads. Fused projections are left to the table (their column order differs by family)."""
    reads = flow.inputs.get(f"{first}.{attn}")
    linears = {n[len(attn) + 1:]: m for n, m in _linears(attention, attn).items()
               if same(flow.inputs.get(f"{first}.{n}"), reads, atol=0)}
    if in_norm_module is not None and not _plain_norm(
        in_norm_module, flow.inputs.get(f"{first}.{in_norm}"), flow.outputs.get(f"{first}.{in_norm}")
    ):
        notes["head_in"] = f"the input norm {in_norm} is neither a LayerNorm nor an RMSNorm scaled by its weight or 1 + weight (head_in recomputes it per slot)"
        return None, n_heads
    by_role = []
    for names in (_Q, _K, _V):
        match = [n for n in linears if n.rsplit(".", 1)[-1] in names]
        by_role.append(match[0] if len(match) == 1 else None)
    if None in by_role:
        found = ", ".join(linears) or "none"
        notes["head_in"] = f"no separate query, key and value projections found (linear layers reading the attention input: {found})"
        return None, n_heads
    q, k, v = (linears[n] for n in by_role)
    if _out_features(q) != n_heads * d_head or _out_features(k) != _out_features(v) or _out_features(k) % d_head:
        notes["head_in"] = f"projection sizes {_out_features(q)}/{_out_features(k)}/{_out_features(v)} do not split into {d_head}-wide heads"
        return None, n_heads
    n_kv = _out_features(k) // d_head
    qkv = tuple(f"{attn}.{n}" for n in by_role)
    return InputLayout(in_norm, ln_mlp, ln_final, qkv, reader=None if in_norm else attn), n_kv


def _fused_layout(model: nn.Module, inputs: dict[str, Any], attention: nn.Module, attn: str, flow: Flow, first: str,
                  block: nn.Module, o_proj: str, in_norm: str | None, ln_mlp: str | None, ln_final: str | None,
                  n_heads: int, d_head: int, causal: bool, notes: dict[str, str]) -> InputLayout | None:
    """One projection reading what the attention reads, ``(heads + 2 * kv_heads) * d_head`` wide for a number of
    key/value heads that divides the query heads (all of them, fewer under grouped-query attention, one under
    multi-query), with its column order found by experiment (:mod:`.fused_qkv`); None (and the note says why)
    otherwise."""
    from .fused_qkv import column_order

    reads = flow.inputs.get(f"{first}.{attn}")
    fused = [(n, m, _kv_heads(_out_features(m), n_heads, d_head)) for n, m in _linears(attention, attn).items()
             if same(flow.inputs.get(f"{first}.{n}"), reads, atol=0)]
    fused = [f for f in fused if f[2] is not None]
    if len(fused) != 1:
        return None
    name, proj, n_kv = fused[0]
    try:
        order = column_order(model, inputs, proj, block.get_submodule(o_proj), n_heads, d_head, causal, n_kv)
    except Exception as exc:  # an attention the nudges break (a shape check, a kernel): no head_in, and why
        notes["head_in"] = f"the experiment on the fused projection {name} raised {type(exc).__name__}: {exc}"[:300]
        return None
    if order is None:
        kinds = "[q | k | v] nor [head, q/k/v]" if n_kv == n_heads else f"[q | k | v] nor grouped per key/value head ({n_kv} of them)"
        notes["head_in"] = f"the columns of the fused projection {name} are neither {kinds} by experiment"
        return None
    notes.pop("head_in", None)
    return InputLayout(in_norm, ln_mlp, ln_final, (name,), head_major=order, reader=None if in_norm else attn,
                       kv_heads=None if n_kv == n_heads else n_kv)


def _kv_heads(width: int, n_heads: int, d_head: int) -> int | None:
    """The key/value heads of a fused projection ``width`` wide: ``K`` dividing ``n_heads`` with
    ``width = (n_heads + 2 K) d_head``; None when there is no such ``K``."""
    rest = width - n_heads * d_head
    if rest <= 0 or rest % (2 * d_head):
        return None
    kv = rest // (2 * d_head)
    return kv if n_heads % kv == 0 else None
