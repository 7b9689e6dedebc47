"""The proof an inferred mapping passes before its families are served (:mod:`.infer`).

On a short random input (token ids, or images for a vision encoder) it checks, through the engine and
against raw torch hooks:

- the residual arithmetic: ``resid_post = resid_pre + attn_out + mlp_out`` and ``resid_mid = resid_pre +
  attn_out`` at every layer (post-norm: ``resid_mid = norm(resid_pre + attn_out)`` and ``resid_post =
  norm(resid_mid + mlp_out)`` with the block's own norms), the MLP reading ``resid_mid`` where the block is sequential,
  ``embed = resid_pre.0``; a branch that adds the residual it is handed (BLOOM) writes what its
  projection gives;
- the per-head sites: the heads' writes plus the output bias sum to the output projection's output,
  one head zeroed equals a hook zeroing its slice of the projection's input, ``head_z`` is that
  projection's input, ``mlp_act`` times the down projection is its output;
- the receiver inputs: every ``head_in`` slot holds the block input, ``logits_in`` the last block's
  output, and a patch of one head's query or key input equals a hand-written hook that recomputes
  that head's columns of the projection;
- attention patterns: probabilities whose rows sum to at most one (attention sinks take the rest),
  nothing above the diagonal in a causal model, as many heads as the per-head families split into,
  and the model's output and every other site unchanged by the eager attention they need;
- every family reached: one whose reach never fires in a forward (a pattern computed inline, handed to
  no module) is not served;
- every capture shaped as its family declares;
- self-patching: every writable family patched at every layer from the same run changes nothing;
- a mixture of experts' sites (:func:`.experts.prove_experts`).

A family that fails is not served; the reason is kept in the catalog (``m.sites()`` lists it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from crosspatch.engine.adapter import Adapter
from crosspatch.engine.forward import Bound, execute
from crosspatch.engine.cache import Cache
from crosspatch.engine.interventions import Patch, Zero
from crosspatch.engine.reach import Changes, submodule, temporarily
from crosspatch.sites.catalog import Catalog
from crosspatch.sites.site import Site, SiteError

from .architectures import Architecture
from .examples import example_inputs
from .experts import prove_experts
from .fused_qkv import columns
from .inputs import InputLayout, _norm
from .qkv_oracle import handed_states

__all__ = ["Proof", "prove"]

ATOL = 1e-4


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, relative to ``b``'s scale when that exceeds 1; inf for a shape mismatch."""
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    return (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())


@dataclass
class Proof:
    """Per family: the largest difference any check measured, and the first failure (not served)."""

    errors: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    families: tuple[str, ...] = ()

    def check(self, family: str, a: torch.Tensor, b: torch.Tensor, what: str, atol: float = ATOL) -> None:
        if family not in self.families:
            return
        diff = _diff(a, b)
        self.errors[family] = max(self.errors.get(family, 0.0), diff)
        if diff > atol:
            self.fail(family, f"{what}: {'shape mismatch' if diff == float('inf') else f'max difference {diff:.2e}'}")

    def check_close(self, family: str, a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> None:
        """Elementwise within ``tol`` absolute plus ``tol`` relative (the conformance suite's bar for a
        capture against a raw hook), where :meth:`check` scales by the largest value."""
        if family not in self.families:
            return
        self.errors[family] = max(self.errors.get(family, 0.0), _diff(a, b))
        if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=tol, atol=tol):
            self.fail(family, f"{what}: max difference {(a.double() - b.double()).abs().max().item():.2e}"
                      if a.shape == b.shape else f"{what}: shape mismatch")

    def fail(self, family: str, why: str) -> None:
        if family in self.families and family not in self.failed:
            self.failed[family] = why


class _Raw:
    """Raw hooks on one module per layer, made through ``changes`` (which removes them): its first input and
    its output, as torch hands them over."""

    def __init__(self, changes: Changes, root: nn.Module, path: str, layers: int):
        self.inputs: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        for layer in range(layers):
            module = submodule(root, path, layer)
            changes.forward_pre_hook(module, self._reads(layer))
            changes.forward_hook(module, self._writes(layer))

    def _reads(self, layer: int) -> Callable:
        def hook(module, args):
            self.inputs.setdefault(layer, args[0].detach())

        return hook

    def _writes(self, layer: int) -> Callable:
        def hook(module, args, output):
            self.outputs.setdefault(layer, (output[0] if isinstance(output, tuple) else output).detach())

        return hook


def prove(model: nn.Module, adapter: Adapter, catalog: Catalog, arch: Architecture, layout: InputLayout | None) -> Proof:
    """Every check of the module docstring on ``catalog``'s families."""
    base = model.base_model
    n = len(submodule(base, arch.layers, None))
    inputs = adapter.prepare(model, example_inputs(model, seed=1))
    proof = Proof(families=tuple(f.name for f in catalog))

    block = f"{arch.layers}.{{layer}}"
    with temporarily() as changes:  # the raw hooks, each undo registered before its hook, removed when the runs end
        o_proj = _Raw(changes, base, f"{block}.{arch.o_proj}", n)
        down = _Raw(changes, base, f"{block}.{arch.mlp_down}", n) if arch.mlp_down else None
        try:
            run = execute(model, adapter, catalog, inputs, capture=[key for f in catalog for key in _keys(f)])
        except SiteError:
            catalog = _reached(model, adapter, catalog, inputs, proof)
            run = execute(model, adapter, catalog, inputs, capture=[key for f in catalog for key in _keys(f)])
    keys = [key for f in catalog for key in _keys(f)]
    # The pattern's capture takes the eager attention; every other family is patched from, and compared
    # with, a run on the model's own attention.
    plain = execute(model, adapter, catalog, inputs, capture=[k for k in keys if not k.startswith("attn_pattern")])
    with torch.inference_mode():
        _check_shapes(catalog, run, proof)
        _check_values(model, catalog, arch, run, plain, o_proj, down, n, proof)

    for fam in catalog:
        if fam.name in proof.failed or not fam.writable:
            continue
        sites = [Site(fam.name, layer) for layer in (range(fam.layers) if fam.layers is not None else [None])]
        source = run if fam.name == "attn_pattern" else plain
        try:
            again = execute(model, adapter, catalog, inputs, [Bound(s, Patch(source.cache)) for s in sites])
        except Exception as exc:  # a reach that cannot write: the family is not served
            proof.fail(fam.name, f"self-patch raised {type(exc).__name__}: {exc}")
        else:
            proof.check(fam.name, again.output, source.output, "self-patch changes the output", atol=1e-6)

    if "head_out" in catalog and "head_out" not in proof.failed:
        _head_out_oracle(model, adapter, catalog, inputs, arch, proof)
    if "head_in" in catalog and "head_in" not in proof.failed and layout is not None:
        _head_in_oracle(model, adapter, catalog, inputs, arch, layout, run.cache["resid_pre.0"], proof)
    if "expert_out" in catalog and "expert_out" not in proof.failed:
        one, other = (adapter.prepare(model, example_inputs(model, seed=seed, rows=1)) for seed in (1, 3))
        prove_experts(model, adapter, catalog, one, other, arch.layers, proof)
    if "head_z" in proof.failed:
        proof.fail("head_out", "its values are computed from head_z, which failed")
    return proof


def _keys(fam) -> list[str]:
    return [f"{fam.name}.{layer}" for layer in range(fam.layers)] if fam.layers is not None else [fam.name]


def _reached(model, adapter, catalog: Catalog, inputs, proof: Proof) -> Catalog:
    """``catalog`` without the families whose reach never fires in a forward (a pattern computed inline,
    outside transformers' attention functions and any module), each failed with the reason."""
    for fam in catalog:
        try:
            execute(model, adapter, catalog, inputs, capture=_keys(fam))
        except SiteError:
            proof.fail(fam.name, "never reached in a forward: the model does not run the module this family reads")
    return Catalog([f for f in catalog if f.name not in proof.failed], catalog.model_name)


def _check_shapes(catalog: Catalog, run, proof: Proof) -> None:
    """Every capture shaped ``[batch, *axes]`` with the sizes its family declares, and the pattern's heads
    those the per-head families split the projections into (a config can name other heads)."""
    for fam in catalog:
        sizes = [a.size for a in fam.axes]
        for layer in range(fam.layers) if fam.layers is not None else [None]:
            got = run.cache[fam.name if layer is None else f"{fam.name}.{layer}"].shape[1:]
            if len(got) != len(sizes) or any(s is not None and s != g for s, g in zip(sizes, got)):
                declared = ", ".join(f"{a.name}={a.size or '*'}" for a in fam.axes)
                proof.fail(fam.name, f"captured {tuple(got)} per row, declared [{declared}]")
    if "attn_pattern" in catalog:
        pattern = catalog.family("attn_pattern")
        named = pattern.axis("head").size
        for layer in range(pattern.layers):
            heads = run.cache[f"attn_pattern.{layer}"].shape[1]
            if heads != named:
                for family in ("attn_pattern", "head_z", "head_out", "head_in"):
                    proof.fail(family, f"the attention of layer {layer} computes {heads} heads, not {named}")


def _check_values(model, catalog: Catalog, arch: Architecture, run, plain, o_proj: _Raw, down: "_Raw | None", n: int,
                  proof: Proof) -> None:
    """The value checks of the module docstring, on one capture run of every family."""
    base, c, block = model.base_model, run.cache, f"{arch.layers}.{{layer}}"
    has = lambda name: name in catalog  # noqa: E731

    for layer in range(n):
        at = lambda name: c[f"{name}.{layer}"]  # noqa: E731
        if has("attn_out") and has("mlp_out") and arch.residual_sum:  # not post-norm (BERT)
            total = at("resid_pre") + at("attn_out") + at("mlp_out")
            for family in ("attn_out", "mlp_out"):
                proof.check(family, total, at("resid_post"), "resid_pre + attn_out + mlp_out != resid_post")
            if has("resid_mid"):
                proof.check("resid_mid", at("resid_pre") + at("attn_out"), at("resid_mid"), "resid_pre + attn_out != resid_mid")
        if has("attn_out") and has("mlp_out") and arch.resid_norm and has("resid_mid"):  # post-norm, as inferred
            mid_norm = submodule(base, f"{block}.{arch.resid_mid}", layer)
            end_norm = submodule(base, f"{block}.{arch.resid_norm}", layer)
            for family in ("attn_out", "resid_mid"):
                proof.check(family, mid_norm(at("resid_pre") + at("attn_out")), at("resid_mid"), "norm(resid_pre + attn_out) != resid_mid")
            proof.check("mlp_out", end_norm(at("resid_mid") + at("mlp_out")), at("resid_post"), "norm(resid_mid + mlp_out) != resid_post")
        # A write read as output - residual is what the branch's last projection gave (BLOOM: no bias after it).
        if has("attn_out") and arch.attn_residual:
            proof.check("attn_out", at("attn_out"), o_proj.outputs[layer], "output - residual != the output projection's")
        if has("mlp_out") and arch.mlp_residual and down is not None:
            proof.check("mlp_out", at("mlp_out"), down.outputs[layer], "output - residual != the down projection's")
        if has("resid_mid") and has("mlp_in"):
            proof.check("resid_mid", at("resid_mid"), at("mlp_in"), "the MLP reads another value")
        if has("head_out"):
            o = submodule(base, f"{block}.{arch.o_proj}", layer)
            bias = o.bias if getattr(o, "bias", None) is not None else 0
            proof.check("head_out", at("head_out").sum(dim=2) + bias, o_proj.outputs[layer], "heads + bias != projection")
        if has("head_z"):
            proof.check("head_z", at("head_z").flatten(-2), o_proj.inputs[layer], "not the projection's input", atol=0)
        if has("mlp_act") and down is not None:
            d = submodule(base, f"{block}.{arch.mlp_down}", layer)
            written = d(at("mlp_act"))
            proof.check("mlp_act", written, down.outputs[layer].reshape(written.shape), "down projection of mlp_act != its output")
        if has("head_in"):
            x = at("resid_pre")
            proof.check("head_in", at("head_in"), x[:, :, None, None, :].expand_as(at("head_in")), "a slot != resid_pre", atol=0)
        if has("attn_pattern"):
            p = at("attn_pattern")
            # Rows sum to 1, or less where attention sinks take a share (the output check below is the oracle).
            proof.check("attn_pattern", p.sum(-1).clamp(min=1), torch.ones_like(p.sum(-1)), "rows sum above 1")
            proof.check("attn_pattern", p.clamp(max=0), torch.zeros_like(p), "negative probabilities", atol=0)
            if arch.causal:
                proof.check("attn_pattern", p.triu(1), torch.zeros_like(p), "attends to later positions", atol=0)
    if has("embed"):
        proof.check("embed", c["embed"], c["resid_pre.0"], "not resid_pre.0", atol=0)
    if has("logits_in"):
        proof.check("logits_in", c["logits_in"], c[f"resid_post.{n - 1}"], "not the last resid_post")
    if has("attn_pattern"):
        proof.check("attn_pattern", run.output, plain.output, "the eager attention changes the output")
        for key, value in plain.cache.items():
            proof.check_close("attn_pattern", run.cache[key], value, f"the eager attention changes {key}")


def _head_out_oracle(model, adapter, catalog, inputs, arch: Architecture, proof: Proof) -> None:
    """Head 1 of the last layer zeroed, against a hook that zeroes its slice of the output projection's input."""
    fam = catalog.family("head_out")
    n_heads, layer = fam.axis("head").size, fam.layers - 1
    head = min(1, n_heads - 1)
    o_proj = submodule(model.base_model, f"{arch.layers}.{{layer}}.{arch.o_proj}", layer)

    def zero(module, args):
        z = args[0].clone()
        d_head = z.shape[-1] // n_heads
        z[..., head * d_head:(head + 1) * d_head] = 0
        return (z, *args[1:])

    bound = Bound(Site.make("head_out", layer, head=head), Zero())
    install = lambda changes: changes.forward_pre_hook(o_proj, zero)  # noqa: E731
    patched, expected = _against_hook(model, adapter, catalog, inputs, bound, install)
    proof.check("head_out", patched, expected, f"head {head} zeroed differs from a hook on the output projection's input")


def _against_hook(model, adapter, catalog, inputs, bound: Bound,
                  hook: Callable[[Changes], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """The output with ``bound`` applied by the engine, and the output with the hand-written hook that
    ``hook(changes)`` installs through ``changes`` instead (removed when that forward ends)."""
    patched = execute(model, adapter, catalog, inputs, [bound]).output
    with temporarily() as changes, torch.no_grad():
        hook(changes)
        expected = adapter.output(adapter.forward(model, inputs))
    return patched, expected


def _head_in_oracle(model, adapter, catalog, inputs, arch: Architecture, layout: InputLayout, x: torch.Tensor,
                    proof: Proof) -> None:
    """Query head 1 and key/value head 0 (and, of a fused projection, the last key/value head's value) of layer
    0 given another input, against a hook that recomputes those columns of the projection from the normed input;
    for a fused projection whose attention hands its states to transformers' attention function, against
    those states of that head replaced there by the ones the other input gives (which knows nothing of the
    projection's columns, so a wrong column order fails)."""
    block0 = submodule(model.base_model, f"{arch.layers}.0", None)
    ln = block0.get_submodule(layout.ln_in) if layout.ln_in else None
    projections = [block0.get_submodule(p) for p in layout.qkv]
    n_heads = catalog.family("head_in").axis("head").size
    other = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x)
    if len(projections) == 1:  # fused: each (role, head)'s columns where the layout's order puts them
        proj = projections[0]
        conv1d = type(proj).__name__ == "Conv1D"
        kv = layout.kv_heads or n_heads
        d_head = (proj.weight.shape[1] if conv1d else proj.weight.shape[0]) // (n_heads + 2 * kv)
        group = n_heads // kv
        heads = ((0, min(1, n_heads - 1)), (1, 0), (2, kv - 1))
        cases = [(proj, role, head, group if role else 1, columns(role, head, n_heads, d_head, layout.head_major, kv))
                 for role, head in heads]
        handed = _handed_by_other(model, block0.get_submodule(arch.attn_core), proj, _norm(ln, other), adapter, inputs)
    elif all(isinstance(p, nn.Linear) for p in projections):
        d_head = projections[0].out_features // n_heads
        group = n_heads // (projections[1].out_features // d_head)
        cases = [(projections[role], role, head, group if role else 1, slice(head * d_head, (head + 1) * d_head))
                 for role, head in ((0, 1), (1, 0))]
        handed = None
    else:
        return
    names = ("query", "key", "value")
    for proj, role, head, group, cols in cases:
        value = x[:, :, None, None, :].expand(*x.shape[:2], 3, n_heads, x.shape[-1]).clone()
        # A key/value head's input: every slot of its group of query heads (the slots a group shares).
        value[:, :, role, slice(head * group, (head + 1) * group)] = other[:, :, None, :]
        source = Cache({"head_in.0": value}, {"head_in.0": catalog.family("head_in").axis_names})
        bound = Bound(Site("head_in", 0), Patch(source))
        if handed is not None:
            patched, expected = _against_states(model, adapter, catalog, inputs, bound, block0.get_submodule(arch.attn_core),
                                                handed, role, head, group)
            what = f"{names[role]} head {head}: the patch differs from that head's {names[role]} replaced in the attention"
        else:
            def hook(module, args, output, cols=cols):
                out = output.clone()
                with torch.no_grad():
                    h = _norm(ln, other)
                    full = h @ module.weight + module.bias if type(module).__name__ == "Conv1D" else torch.nn.functional.linear(
                        h, module.weight, module.bias)
                    out[..., cols] = full[..., cols]
                return out

            install = lambda changes, hook=hook: changes.forward_hook(proj, hook)  # noqa: E731
            patched, expected = _against_hook(model, adapter, catalog, inputs, bound, install)
            what = f"{names[role]} head {head}: the patch differs from a hook on its projection"
        proof.check("head_in", patched, expected, what)


def _handed_by_other(model, attention: nn.Module, proj: nn.Module, normed: torch.Tensor, adapter, inputs):
    """The query, key and value ``attention`` hands transformers' attention function when ``proj`` reads
    ``normed``; None when it hands none (it computes attention itself)."""
    seen: list = []

    def read(query, key, value):
        seen.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))

    with temporarily() as changes:
        changes.forward_pre_hook(proj, lambda module, args: (normed.to(args[0]), *args[1:]))
        with handed_states(model, attention, read), torch.no_grad():
            adapter.forward(model, inputs)
    return seen[0] if seen else None


def _against_states(model, adapter, catalog, inputs, bound: Bound, attention: nn.Module, handed, role: int, head: int,
                    group: int):
    """The output with ``bound`` applied by the engine, and the output with query head ``head`` (role 0) or
    key/value head ``head`` (roles 1, 2) replaced by ``handed``'s in what ``attention`` hands the attention
    function."""
    patched = execute(model, adapter, catalog, inputs, [bound]).output

    def replace(query, key, value):
        states = [query, key, value]
        new = states[role].clone()
        # A key/value head repeated for each of its query heads before the call (some models do) is all its copies.
        rep = new.shape[1] // (query.shape[1] // group) if role else 1
        new[:, head * rep:(head + 1) * rep] = handed[role][:, head * rep:(head + 1) * rep].to(new)
        states[role] = new
        return tuple(states)

    with handed_states(model, attention, replace), torch.no_grad():
        expected = adapter.output(adapter.forward(model, inputs))
    return patched, expected
