"""Mixture-of-experts sites: each expert's write and the router's logits, for transformers' fused expert
blocks (Mixtral, Qwen-MoE, OLMoE, GPT-OSS and others whose experts module takes the routing).

transformers 5 keeps a block's experts as one module holding every expert's weights stacked
(``experts.gate_up_proj [expert, 2 * d_ff, d]``) and calls it as ``experts(hidden_states [tokens, d],
top_k_index [tokens, k], top_k_weights [tokens, k])`` on the block's tokens flattened, so no module per
expert exists to hook. The sites are therefore read at that module:

``expert_out.l``     ``[batch, pos, expert, dim]``  expert ``e``'s routed write at each position: its output
    times its routing weight where the router chose it, 0 elsewhere. Computed by the experts module's
    own forward with every routing slot sent to ``e`` and only the weights of the slots that chose ``e``
    kept, so whichever experts implementation the model uses (eager loop, grouped matmul) computes it.
    The experts' writes sum to the module's output (the MLP's write when the block has no shared
    expert). Written back as ``output + sum_e (new_e - old_e)``: an expert left as it was changes
    nothing, and an expert patched where it was routed in neither run changes nothing.
``router_logits.l``  ``[batch, pos, expert]``  the router's logits. Capture only: each family computes
    its routing from them inside the router or the block in its own way (top-k of a softmax, of a
    sigmoid with a bias, by groups), so no write of them could stand for all.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from crosspatch.engine.reach import Callback, Changes, Handle, installing, submodule, temporarily
from crosspatch.sites.catalog import Axis, SiteFamily

__all__ = ["Experts", "find_experts", "expert_families", "ExpertOut", "RouterLogits"]


@dataclass(frozen=True)
class Experts:
    """Where one block keeps its fused experts and its router (paths relative to the block)."""

    experts: str
    router: str | None
    n_experts: int


def _stacked(module: nn.Module) -> int | None:
    """The number of experts of a fused experts module (its 3-d weights' first size), else None."""
    sizes = {p.shape[0] for p in module.parameters(recurse=False) if p.ndim == 3}
    if len(sizes) != 1 or len(inspect.signature(module.forward).parameters) < 3:
        return None
    return sizes.pop()


def find_experts(block: nn.Module) -> Experts | None:
    """The fused experts module of ``block`` and the router beside it (a module with an ``[expert, d]``
    weight in the same parent), or None when the block has none."""
    for name, module in block.named_modules():
        n = _stacked(module) if name else None
        if not n or n < 2:
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        owner = block.get_submodule(parent) if parent else block
        router = next((f"{parent}.{child}" if parent else child for child, m in owner.named_children()
                       if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2 and m.weight.shape[0] == n), None)
        return Experts(name, router, n)
    return None


def _routing(module: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The experts module's (hidden_states, top-k expert indices, top-k weights), however they were passed."""
    names = list(inspect.signature(module.forward).parameters)[:3]
    values = list(args[:3]) + [kwargs[n] for n in names[len(args):3]]
    x, index, weights = values
    if index.is_floating_point():  # (hidden, weights, index) orders exist too
        index, weights = weights, index
    return x, index, weights


def per_expert(module: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """Every expert's routed write ``[tokens, expert, d]``, by the module's own forward (hooks not run)."""
    writes = []
    for e in range(n):
        chosen = index == e
        writes.append(module.forward(x, torch.full_like(index, e), torch.where(chosen, weights, torch.zeros_like(weights))))
    return torch.stack(writes, dim=1)


class _Shape:
    """The ``[batch, pos]`` of the block's input, kept by a pre-hook on the block for reaches that see its
    tokens flattened."""

    def __init__(self) -> None:
        self.rows: tuple[int, int] | None = None

    def hook(self, module, args, kwargs):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        self.rows = tuple(x.shape[:2])

    def unflatten(self, value: torch.Tensor) -> torch.Tensor:
        if self.rows is None or value.shape[0] != self.rows[0] * self.rows[1]:
            raise RuntimeError(f"the experts saw {value.shape[0]} tokens, not the block's {self.rows} (batch, pos)")
        return value.unflatten(0, self.rows)


class ExpertOut:
    """``[batch, pos, expert, dim]``: each expert's routed write (see the module docstring)."""

    def __init__(self, root: nn.Module, block: str, experts: Experts):
        self.root, self.block, self.experts = root, block, experts

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        shape, n = _Shape(), self.experts.n_experts

        def hook(module, args, kwargs, output):
            x, index, weights = _routing(module, args, kwargs)
            writes = per_expert(module, x, index, weights, n)
            new = callback(shape.unflatten(writes))
            if new is None:
                return None
            return output + (new.flatten(0, 1).to(writes.dtype) - writes).sum(dim=1).to(output.dtype)

        block = submodule(self.root, self.block, layer)
        with installing() as changes:
            changes.forward_pre_hook(block, shape.hook, with_kwargs=True)
            changes.forward_hook(block.get_submodule(self.experts.experts), hook, with_kwargs=True)
            return changes.handles


class RouterLogits:
    """``[batch, pos, expert]``: the router's logits (its output, or the first element of it)."""

    def __init__(self, root: nn.Module, block: str, experts: Experts):
        self.root, self.block, self.experts = root, block, experts

    def install(self, layer: int | None, callback: Callback) -> list[Handle]:
        shape = _Shape()

        def hook(module, args, output):
            logits = output if isinstance(output, torch.Tensor) else output[0]
            callback(shape.unflatten(logits.reshape(-1, logits.shape[-1])))
            return None

        block = submodule(self.root, self.block, layer)
        with installing() as changes:
            changes.forward_pre_hook(block, shape.hook, with_kwargs=True)
            changes.forward_hook(block.get_submodule(self.experts.router), hook)
            return changes.handles


def expert_families(base: nn.Module, layers: str, pos: Axis, dim: Axis) -> tuple[list[SiteFamily], dict[str, str]]:
    """``expert_out`` and ``router_logits`` when every block keeps its experts at the same place, and why
    not otherwise (families that are not served, by name)."""
    blocks = submodule(base, layers, None)
    found = [find_experts(block) for block in blocks]
    if all(f is None for f in found):
        return [], {}
    if any(f != found[0] for f in found):
        why = "the blocks differ (dense and mixture-of-experts layers, or experts kept at other places)"
        return [], {"expert_out": why, "router_logits": why}
    experts, block, n = found[0], f"{layers}.{{layer}}", len(blocks)
    expert = Axis("expert", experts.n_experts)
    families = [SiteFamily("expert_out", (pos, expert, dim), ExpertOut(base, block, experts), n,
                           "each expert's routed, weighted write (0 where it was not routed)")]
    notes = {}
    if experts.router is not None:
        families.insert(0, SiteFamily("router_logits", (pos, expert), RouterLogits(base, block, experts), n,
                                      "the router's logits (capture only)", writable=False))
    else:
        notes["router_logits"] = f"no router beside {experts.experts} (a module with an [expert, d] weight)"
    return families, notes


class _Routed:
    """Raw hooks on one layer's experts module and router, registered through ``changes``: the top-k indices,
    the module's output and the router's logits, as torch hands them over."""

    def __init__(self, block: nn.Module, experts: Experts, changes: Changes):
        self.index: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None
        module = block.get_submodule(experts.experts)

        def routed(module, args, kwargs, output):
            self.index = _routing(module, args, kwargs)[1].detach()
            self.output = output.detach()

        def logits(module, args, output):
            value = output if isinstance(output, torch.Tensor) else output[0]
            self.logits = value.detach()

        changes.forward_hook(module, routed, with_kwargs=True)
        if experts.router is not None:
            changes.forward_hook(block.get_submodule(experts.router), logits)


def prove_experts(model: nn.Module, adapter, catalog, inputs, source_inputs, layers: str, proof) -> None:
    """The oracles of the expert families, on the last layer: the experts' writes sum to the experts
    module's output and are 0 where an expert was not routed; the router's logits are its output; an
    expert patched where it is routed in neither run changes nothing, bit for bit; an expert patched
    from a run that did not route it at one position (its write there 0) equals a hand hook that drops
    its weight at that token. ``inputs`` and ``source_inputs`` hold one row each."""
    from crosspatch.engine.forward import Bound, execute
    from crosspatch.engine.interventions import Patch
    from crosspatch.sites.site import Site

    blocks = submodule(model.base_model, layers, None)
    layer = len(blocks) - 1
    block = blocks[layer]
    experts = find_experts(block)
    keys = [f"{name}.{layer}" for name in ("expert_out", "router_logits") if name in catalog]
    with temporarily() as changes:
        raw = _Routed(block, experts, changes)
        run = execute(model, adapter, catalog, inputs, capture=keys)
        index, output, logits = raw.index, raw.output, raw.logits
        source = execute(model, adapter, catalog, source_inputs, capture=keys)
        source_index = raw.index
    writes = run.cache[f"expert_out.{layer}"]  # [batch, pos, expert, d]
    rows = writes.shape[:2]
    proof.check("expert_out", writes.sum(dim=2), output.unflatten(0, rows), "the experts' writes do not sum to the experts' output")
    routed = torch.zeros(*rows, experts.n_experts, dtype=torch.bool)
    routed.view(-1, experts.n_experts).scatter_(1, index.long(), True)
    proof.check("expert_out", writes.masked_fill(routed[..., None], 0), torch.zeros_like(writes), "an expert not routed writes", atol=0)
    if "router_logits" in catalog and logits is not None:
        proof.check("router_logits", run.cache[f"router_logits.{layer}"], logits.reshape(*rows, -1), "not the router's output", atol=0)

    source_routed = torch.zeros_like(routed)
    source_routed.view(-1, experts.n_experts).scatter_(1, source_index.long(), True)
    neither = ~routed[0] & ~source_routed[0]  # [pos, expert], row 0
    only_here = routed[0] & ~source_routed[0]
    if neither.any():
        pos, k = (int(i) for i in neither.nonzero()[0])
        site = Site.make("expert_out", layer, pos=pos, expert=k)
        patched = execute(model, adapter, catalog, inputs, [Bound(site, Patch(source.cache))]).output
        proof.check("expert_out", patched, run.output, "patching an expert routed in neither run changed the output", atol=0)
    if only_here.any():
        pos, k = (int(i) for i in only_here.nonzero()[0])
        site = Site.make("expert_out", layer, pos=pos, expert=k)
        patched = execute(model, adapter, catalog, inputs, [Bound(site, Patch(source.cache))]).output
        module = block.get_submodule(experts.experts)

        def drop(module, args, kwargs, out):
            x, idx, weights = _routing(module, args, kwargs)
            weights = weights.clone()
            weights[pos][idx[pos] == k] = 0  # token pos of row 0
            return module.forward(x, idx, weights)

        with temporarily() as changes, torch.no_grad():
            changes.forward_hook(module, drop, with_kwargs=True)
            expected = adapter.output(adapter.forward(model, inputs))
        proof.check("expert_out", patched, expected, "an expert patched out at one token differs from dropping its routing weight")
