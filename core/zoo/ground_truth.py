"""Ground truth by construction: a residual model whose output under any set of patched edges is known in closed form.

:class:`ResidualToy` is a 2-layer, 2-head, attention-free residual model with hand-set weights and
the six site families of an edge graph (``embed``, ``head_in``, ``head_out``, ``mlp_in``,
``mlp_out``, ``logits_in``), so :func:`~crosspatch.methods.edges.edge_graph`, ``patch_edges``,
EAP, EAP-IG, ACDC and learned edge masks run on it unchanged. The residual has 5 dimensions and
every component writes exactly one::

    embed          x0 = val(token)                      (val(t) = 1 + t / vocab)
    head 0.0       reads its value slot's x0, writes x1 = ALPHA * x0
    head 1.1       reads its value slot's x1, writes x2 = BETA * x1
    mlp 0          reads x0, writes x3 = x0 ** 2
    head 0.1       reads x4, writes x4               (dead end: nothing writes x4 before it)
    head 1.0       reads x0, writes x4 = GAMMA * x0   (dead end: nothing reads x4 downstream)
    mlp 1          reads x4, writes x4               (dead end)
    logits         [C0 * x0 + x2 + x3 + BIAS, 0]  per position (two classes)

Heads are attention-free: a head's output at a position is a linear map of its *value* input at
that position; query and key inputs are read and ignored. So the true circuit (edges whose
patching can change the output) is exactly :data:`TRUE_EDGES`, and :func:`closed_form` gives the
output for any patched edge set, ablation and inputs by the formulas above (no hooks, no model).
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

import torch
from torch import nn

from ..engine.adapter import Adapter, model_device
from ..sites.catalog import Axis, Catalog, SiteFamily
from ..engine.reach import ModuleOutput

__all__ = [
    "ResidualToy", "ResidualToyAdapter", "residual_toy", "TRUE_EDGES", "TRUE_NODES", "true_edges", "true_nodes",
    "closed_form", "closed_form_metric", "token_values", "ALPHA", "BETA", "GAMMA", "C0", "BIAS",
]

D_MODEL, N_HEADS, N_LAYERS = 5, 2, 2
ALPHA, BETA, GAMMA, C0, BIAS = 1.5, -2.0, 0.7, 0.5, 0.25

TRUE_EDGES = frozenset({
    "embed->head_in.0[qkv=2,head=0]",
    "embed->mlp_in.0",
    "embed->logits_in",
    "head_out.0[head=0]->head_in.1[qkv=2,head=1]",
    "head_out.1[head=1]->logits_in",
    "mlp_out.0->logits_in",
})
TRUE_NODES = frozenset(node for edge in TRUE_EDGES for node in edge.split("->"))


def true_edges() -> set[str]:
    """The edges whose patching can change the output (by construction)."""
    return set(TRUE_EDGES)


def true_nodes() -> set[str]:
    """Both ends of every true edge."""
    return set(TRUE_NODES)


def token_values(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """``val(t) = 1 + t / vocab``: positive and distinct for every token."""
    return 1 + ids.double() / vocab


class _Fan(nn.Module):
    """The residual each (role, head) reads: ``[b, p, d] -> [b, p, 3, heads, d]``."""

    def forward(self, x):
        return x[:, :, None, None, :].expand(-1, -1, 3, N_HEADS, -1).clone()


class _Heads(nn.Module):
    """Attention-free heads: ``head_out[h] = value_in[h] @ maps[h]``."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.register_buffer("maps", maps)  # [heads, d, d]

    def forward(self, head_in):
        return torch.einsum("bphd,hde->bphe", head_in[:, :, 2], self.maps.to(head_in.dtype))


class _Mlp(nn.Module):
    def __init__(self, square: bool):
        super().__init__()
        self.square = square

    def forward(self, x):
        out = torch.zeros_like(x)
        if self.square:
            out[..., 3] = x[..., 0] ** 2
        else:
            out[..., 4] = x[..., 4]
        return out


class _Block(nn.Module):
    def __init__(self, layer: int):
        super().__init__()
        maps = torch.zeros(N_HEADS, D_MODEL, D_MODEL, dtype=torch.float64)
        if layer == 0:
            maps[0, 0, 1] = ALPHA
            maps[1, 4, 4] = 1.0
        else:
            maps[0, 0, 4] = GAMMA
            maps[1, 1, 2] = BETA
        self.fan, self.heads, self.mlp_in, self.mlp = _Fan(), _Heads(maps), nn.Identity(), _Mlp(square=layer == 0)

    def forward(self, resid):
        resid = resid + self.heads(self.fan(resid)).sum(dim=2)
        return resid + self.mlp(self.mlp_in(resid))


class _Embed(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        out = torch.zeros(*ids.shape, D_MODEL, dtype=torch.float64, device=ids.device)
        out[..., 0] = token_values(ids, self.vocab)
        return out


class ResidualToy(nn.Module):
    """Token ids ``[batch, pos]`` -> two logits per position, float64 (see the module docstring)."""

    d_model = D_MODEL

    def __init__(self, vocab: int = 50):
        super().__init__()
        self.vocab = vocab
        self.embed = _Embed(vocab)
        self.blocks = nn.ModuleList([_Block(layer) for layer in range(N_LAYERS)])
        self.logits_in = nn.Identity()

    def forward(self, ids):
        resid = self.embed(ids)
        for block in self.blocks:
            resid = block(resid)
        x = self.logits_in(resid)
        return torch.stack([C0 * x[..., 0] + x[..., 2] + x[..., 3] + BIAS, torch.zeros_like(x[..., 0])], dim=-1)


class ResidualToyAdapter(Adapter):
    name = "residual_toy"

    def matches(self, model):
        return isinstance(model, ResidualToy)

    def catalog(self, model):
        """The edge-graph families of a :class:`ResidualToy` (or a subclass of another width)."""
        pos, dim, head = Axis("pos"), Axis("dim", model.d_model), Axis("head", N_HEADS)
        layers = len(model.blocks)
        return Catalog([
            SiteFamily("embed", (pos, dim), ModuleOutput(model, "embed")),
            SiteFamily("head_in", (pos, Axis("qkv", 3), head, dim), ModuleOutput(model, "blocks.{layer}.fan"), layers),
            SiteFamily("head_out", (pos, head, dim), ModuleOutput(model, "blocks.{layer}.heads"), layers),
            SiteFamily("mlp_in", (pos, dim), ModuleOutput(model, "blocks.{layer}.mlp_in"), layers),
            SiteFamily("mlp_out", (pos, dim), ModuleOutput(model, "blocks.{layer}.mlp"), layers),
            SiteFamily("logits_in", (pos, dim), ModuleOutput(model, "logits_in")),
        ], type(model).__name__)

    def prepare(self, model, inputs):
        ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
        return {"input_ids": torch.as_tensor(ids).long().to(model_device(model))}

    def forward(self, model, inputs):
        return model(inputs["input_ids"])

    def sizes(self, inputs):
        return {"pos": inputs["input_ids"].shape[1]}


def residual_toy(vocab: int = 50):
    """The wrapped ground-truth model."""
    from ..engine.model import WrappedModel

    return WrappedModel(ResidualToy(vocab).eval(), ResidualToyAdapter())


def closed_form(
    clean: torch.Tensor, corrupt: torch.Tensor | None, patched: Iterable[str], *,
    ablation: Literal["resample", "zero", "mean"] = "resample", reference: Any = None, vocab: int = 50,
) -> torch.Tensor:
    """The output ``[batch, pos, 2]`` of the clean run with the ``patched`` edges carrying the ablated
    sender value (``patch_edges``' convention), by the formulas of the module docstring."""
    patched = set(patched)
    e = token_values(torch.as_tensor(clean), vocab)
    if ablation == "resample":
        if corrupt is None:
            raise ValueError("ablation='resample' needs the corrupt inputs")
        a = token_values(torch.as_tensor(corrupt), vocab)
        abl = {"embed": a, "h00": ALPHA * a, "mlp0": a ** 2, "h11": BETA * ALPHA * a}
    elif ablation == "mean":
        r = token_values(torch.as_tensor(reference if reference is not None else clean), vocab)
        mean = r.mean(dim=0, keepdim=True)
        abl = {"embed": mean, "h00": ALPHA * mean, "mlp0": (r ** 2).mean(dim=0, keepdim=True), "h11": BETA * ALPHA * mean}
    elif ablation == "zero":
        abl = {k: torch.zeros((), dtype=torch.float64) for k in ("embed", "h00", "mlp0", "h11")}
    else:
        raise ValueError(f"ablation must be 'resample', 'zero' or 'mean', got {ablation!r}")

    def pick(edge: str, ablated: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return ablated.expand_as(value) if edge in patched else value

    v00 = pick("embed->head_in.0[qkv=2,head=0]", abl["embed"], e)
    h00 = ALPHA * v00
    mlp0 = pick("embed->mlp_in.0", abl["embed"], e) ** 2
    v11 = pick("head_out.0[head=0]->head_in.1[qkv=2,head=1]", abl["h00"], h00)
    h11 = BETA * v11
    x0 = pick("embed->logits_in", abl["embed"], e)
    x2 = pick("head_out.1[head=1]->logits_in", abl["h11"], h11)
    x3 = pick("mlp_out.0->logits_in", abl["mlp0"], mlp0)
    logit = C0 * x0 + x2 + x3 + BIAS
    return torch.stack([logit, torch.zeros_like(logit)], dim=-1)


def closed_form_metric(clean, corrupt, patched, *, ablation="resample", reference=None, vocab: int = 50, pos: int = -1):
    """The logit difference (class 0 minus class 1) at ``pos``, per prompt, in closed form."""
    out = closed_form(clean, corrupt, patched, ablation=ablation, reference=reference, vocab=vocab)
    return out[:, pos, 0] - out[:, pos, 1]
