"""The encoder-decoder families checked against transformers (what ``crosspatch verify`` reports for them).

On the adapter's example inputs, engine runs capture every site (the patterns in a run of their own, as
they need an eager attention) and are compared with:

- transformers' own hidden states (``output_hidden_states=True``): ``embed`` and ``resid_pre`` of both
  stacks, ``resid_post`` (the last through the stack's final norm, where it has one);
- transformers' own attention probabilities, from its eager attention (``output_attentions=True``):
  ``attn_pattern`` of both stacks and ``cross_pattern``; reading them must not change the output;
- the block's arithmetic: each residual point is the one before plus the branch's write (normalised
  after the sum in a post-norm model), heads plus the output bias sum to the attention's write, the
  output projection of ``head_z`` is that write, the down projection of ``mlp_act`` the MLP's write;
- the model's logits.

Self-patching and hand-written hooks on every module reach are the conformance suite's.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from crosspatch.engine.forward import execute
from crosspatch.engine.reach import submodule

from .proof import Proof
from .seq2seq import STACKS, catalog, example_inputs, model_arguments, stack_layout

__all__ = ["prove"]


@contextmanager
def _eager(model: nn.Module):
    """transformers' eager attention in every config of ``model`` (its stacks may hold copies), then back."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}
    before = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]


def prove(model: nn.Module, adapter) -> dict[str, tuple[float, str | None]]:
    """``{family: (largest difference, first failure or None)}`` for every family of the catalog."""
    cat = catalog(model)
    inputs = adapter.prepare(model, example_inputs(model))
    keys = [f"{f.name}.{layer}" if f.layers is not None else f.name for f in cat for layer in range(f.layers or 1)]
    # Patterns need the eager attention; every other family is read from a run on the model's own attention.
    patterns = [k for k in keys if "_pattern." in k]
    run = execute(model, adapter, cat, inputs, capture=patterns)
    plain = execute(model, adapter, cat, inputs, capture=[k for k in keys if k not in patterns])
    values = {**{k: plain.cache[k] for k in keys if k not in patterns}, **{k: run.cache[k] for k in patterns}}
    arguments = {**model_arguments(inputs), "use_cache": False, "return_dict": True}
    with torch.inference_mode():
        ref = model(**arguments, output_hidden_states=True)
        with _eager(model):
            attentions = model(**arguments, output_attentions=True)
    proof = Proof(families=tuple(f.name for f in cat))
    with torch.inference_mode():
        for name in STACKS:
            _check_stack(model, name, values, ref, attentions, proof)
        for name in ("encoder.attn_pattern", "decoder.attn_pattern", "decoder.cross_pattern"):
            proof.check(name, run.output, plain.output, "reading the patterns changes the output")
        if "logits" in cat:
            proof.check("logits", values["logits"], ref.logits, "not the model's logits")
    return {name: (proof.errors.get(name, 0.0), proof.failed.get(name)) for name in proof.families}


def _check_stack(model: nn.Module, name: str, c, ref, attentions, proof: Proof) -> None:
    stack, base = stack_layout(model, name), model.base_model
    block = f"{name}.{stack.blocks}.{{layer}}"
    n = len(submodule(base, f"{name}.{stack.blocks}", None))
    hidden = ref.encoder_hidden_states if name == "encoder" else ref.decoder_hidden_states
    patterns = attentions.encoder_attentions if name == "encoder" else attentions.decoder_attentions
    final = submodule(base, f"{name}.{stack.final_norm}", None) if stack.final_norm else nn.Identity()
    p = f"{name}."
    proof.check(p + "embed", c[p + "embed"], hidden[0], "not the first hidden state")
    for layer in range(n):
        at = lambda family: c[f"{p}{family}.{layer}"]  # noqa: E731
        norms = [None] * 3 if stack.post_norms is None else [submodule(base, f"{block}.{x}", layer) for x in stack.post_norms]
        add = lambda x, y, norm: x + y if norm is None else norm(x + y)  # noqa: E731
        proof.check(p + "resid_pre", at("resid_pre"), hidden[layer], f"layer {layer}: not transformers' hidden state")
        post = at("resid_post") if layer < n - 1 else final(at("resid_post"))
        proof.check(p + "resid_post", post, hidden[layer + 1], f"layer {layer}: not transformers' next hidden state")
        mid = add(at("resid_pre"), at("attn_out"), norms[0])
        for family in ("attn_out", "resid_mid"):
            proof.check(p + family, mid, at("resid_mid"), f"layer {layer}: resid_pre + attn_out != resid_mid")
        _check_heads(base, p, "", f"{block}.{stack.o_proj}", layer, at, proof)
        proof.check(p + "attn_pattern", at("attn_pattern"), patterns[layer], f"layer {layer}: not transformers' pattern")
        before_mlp = at("resid_mid")
        if stack.cross is not None:
            cross = add(at("resid_mid"), at("cross_attn_out"), norms[1])
            for family in ("cross_attn_out", "resid_cross"):
                proof.check(p + family, cross, at("resid_cross"), f"layer {layer}: resid_mid + cross_attn_out != resid_cross")
            _check_heads(base, p, "cross_", f"{block}.{stack.cross_o}", layer, at, proof)
            proof.check(p + "cross_pattern", at("cross_pattern"), attentions.cross_attentions[layer],
                        f"layer {layer}: not transformers' cross-attention pattern")
            before_mlp = at("resid_cross")
        proof.check(p + "mlp_out", add(before_mlp, at("mlp_out"), norms[-1]), at("resid_post"),
                    f"layer {layer}: the residual before the MLP + mlp_out != resid_post")
        down = submodule(base, f"{block}.{stack.mlp_down}", layer)
        # The down projection's output is the MLP's write in every layout (T5's wo ends DenseReluDense).
        proof.check(p + "mlp_act", down(at("mlp_act")), at("mlp_out"), f"layer {layer}: down projection of mlp_act != mlp_out")


def _check_heads(base: nn.Module, p: str, kind: str, o_path: str, layer: int, at, proof: Proof) -> None:
    """Heads + bias and the projection of ``head_z`` against the attention's write (``kind``: "" or "cross_")."""
    o = submodule(base, o_path, layer)
    bias = o.bias if o.bias is not None else 0
    write = at(f"{kind}attn_out")
    proof.check(f"{p}{kind}head_out", at(f"{kind}head_out").sum(dim=2) + bias, write, f"layer {layer}: heads + bias != {kind}attn_out")
    proof.check(f"{p}{kind}head_z", o(at(f"{kind}head_z").flatten(-2)), write, f"layer {layer}: projection of head_z != {kind}attn_out")
