"""Cross-modal studies of two-tower (CLIP-style) models, built only on the engine and site names.

They run on every adapter that serves the two-tower vocabulary (``vision.*``, ``text.*``,
``image_embed``, ``text_embed``, ``logits``): open_clip models and HuggingFace ``CLIPModel`` alike.

* :func:`image_pair_patching`: activation patching in the vision tower between two images that
  differ in one factor, read on the image-caption logit difference between the two captions.
* :func:`text_pair_patching`: the same in the text tower, between two captions that differ in one
  word, read on the caption's logit difference between the two images.
* :func:`decompose_image_embedding`: the image embedding as an exact sum of direct contributions
  (the embeddings, each attention layer, each head, each MLP) with the final LayerNorm's statistics
  frozen; :func:`mean_ablation_curves` mean-ablates them layer by layer.
* :func:`textspan`: label each head with the text directions that explain most of the variance of
  its direct contributions (TextSpan, Gandelsman et al. 2024), and :func:`factor_alignment` to score
  heads against the known generative factors of the images.

The decomposition needs how the tower turns its last residual stream into the embedding (pooling,
LayerNorm, projection). Adapters describe it with ``adapter.readout(model, "vision")``, which
returns a :class:`LinearReadout`; everything else comes from sites.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..engine.adapter import repeat_rows
from ..engine.forward import Bound, execute
from ..engine.interventions import Mean
from ..results.metrics import logit_diff
from ..engine.model import WrappedModel, wrap
from ..progress import progress_bar
from ..results.result import Result, collect_versions
from ..sites.site import Site
from .activation_patching import activation_patching

__all__ = [
    "LinearReadout", "EmbeddingDecomposition", "image_pair_patching", "text_pair_patching",
    "decompose_image_embedding", "mean_ablation_curves", "zero_shot_accuracy", "encode_texts",
    "word_directions", "textspan", "factor_alignment",
]


# --------------------------------------------------------------------------------------------------
# readout


@dataclass
class LinearReadout:
    """How a tower reads its embedding off its last residual stream ``x`` ``[n, pos, d]``:
    pool (``"first"``: the class token; ``"mean"``: the mean over positions ``1:``), LayerNorm
    (before or after pooling), then ``@ proj (+ proj_bias)``.

    With the LayerNorm's statistics frozen at their values for ``x``, the readout is linear, so any
    parts that sum to ``x`` have contributions that sum to the embedding minus :meth:`constant`.
    """

    residual: str  # site key of the last residual stream, e.g. "vision.resid_post.11"
    pool: str = "first"
    norm_weight: torch.Tensor | None = None
    norm_bias: torch.Tensor | None = None
    eps: float = 1e-5
    normalize: bool = True  # False when the tower has no final LayerNorm
    norm_after_pool: bool = False
    proj: torch.Tensor | None = None  # [d_model, d_embed]
    proj_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.pool not in ("first", "mean"):
            raise ValueError(f"pool must be 'first' or 'mean', got {self.pool!r}")

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """The positions the readout reads, ``[..., pos', d]`` (one for ``first``)."""
        return x[..., :1, :] if self.pool == "first" else x[..., 1:, :]

    def contributions(self, parts: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Direct contributions ``[n, k, e]`` (float64) of ``parts`` ``[n, k, pos', d]`` whose sum over
        ``k`` is ``residual`` ``[n, pos', d]`` (both at :meth:`positions`)."""
        parts, residual = parts.double(), residual.double()
        if self.pool == "first" or self.norm_after_pool:  # one vector per image, normalised once
            parts, residual = parts.mean(dim=2), residual.mean(dim=1)  # [n, k, d], [n, d]
            y = self._frozen_norm(parts, residual.unsqueeze(1))
        else:  # every token normalised with its own statistics, then averaged
            y = self._frozen_norm(parts, residual.unsqueeze(1)).mean(dim=2)
        return self._project(y)

    def constant(self, device=None) -> torch.Tensor:
        """The part of the embedding that no residual part writes: norm bias and projection bias."""
        d = self.proj.shape[0] if self.proj is not None else self.norm_weight.shape[0]
        out = torch.zeros(d, dtype=torch.float64, device=device)
        if self.normalize and self.norm_bias is not None:
            out = out + self.norm_bias.detach().to(device=device, dtype=torch.float64)
        out = self._project(out)
        if self.proj_bias is not None:
            out = out + self.proj_bias.detach().to(device=device, dtype=torch.float64)
        return out

    def _frozen_norm(self, parts: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if not self.normalize:
            return parts
        sigma = torch.sqrt(residual.var(dim=-1, unbiased=False, keepdim=True) + self.eps)
        y = (parts - parts.mean(dim=-1, keepdim=True)) / sigma
        if self.norm_weight is not None:
            y = y * self.norm_weight.detach().to(device=y.device, dtype=torch.float64)
        return y

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            return y
        return y @ self.proj.detach().to(device=y.device, dtype=torch.float64)


def _readout(m: WrappedModel, tower: str = "vision") -> LinearReadout:
    fn = getattr(m.adapter, "readout", None)
    if fn is None:
        raise TypeError(
            f"adapter {m.adapter.name!r} does not describe how its {tower} embedding is read out "
            f"(adapter.readout(model, {tower!r}) -> LinearReadout); the decomposition needs it"
        )
    return fn(m.module, tower)


# --------------------------------------------------------------------------------------------------
# patching across modalities


def _rows_tower_only(m: WrappedModel, sites, tower: str) -> None:
    """Sweeps bind each site to its own block of rows; only the rows tower has one activation per row."""
    patterns = [sites] if isinstance(sites, (str, Site)) else list(sites)
    other = "text" if tower == "vision" else "vision"
    for pattern in patterns:
        family = m.catalog.resolve(pattern).family
        if family.startswith(other + ".") or family == ("text_embed" if tower == "vision" else "image_embed"):
            raise ValueError(
                f"site {pattern}: this study sweeps the {tower} tower; {other} sites hold the shared candidates "
                f"(one activation per candidate, not per row), which are the same in both runs"
            )


def _stamp(res: Result, method: str, **extra: Any) -> Result:
    res.metadata["method"] = method
    res.metadata.update(extra)
    return res


def image_pair_patching(
    model: "WrappedModel | nn.Module",
    clean_images: torch.Tensor,
    corrupt_images: torch.Tensor,
    clean_texts: torch.Tensor,
    corrupt_texts: torch.Tensor,
    sites: "str | Site | Sequence[str | Site]",
    *,
    direction: str = "denoising",
    normalize: bool = True,
    batch_size: int = 64,
    progress: bool | None = None,
) -> Result:
    """Patch vision sites between image pairs; read the logit difference between their captions.

    Row ``i`` pairs ``clean_images[i]`` (described by ``clean_texts[i]``) with ``corrupt_images[i]``
    (described by ``corrupt_texts[i]``); the two images differ in one factor, the two captions in
    the word for it. Every image is scored against all ``2n`` captions; the metric is
    ``logit(image, clean caption) - logit(image, corrupt caption)``. Denoising (default) runs the
    corrupt image with one clean activation patched in; with ``normalize`` 1 means the site alone
    restores the whole clean-corrupt gap.
    """
    m = wrap(model)
    _rows_tower_only(m, sites, "vision")
    n = clean_images.shape[0]
    captions = torch.cat([torch.as_tensor(clean_texts), torch.as_tensor(corrupt_texts)])
    rows = torch.arange(n)
    metric = logit_diff(rows, rows + n)
    res = activation_patching(
        m, {"images": clean_images, "texts": captions}, {"images": corrupt_images, "texts": captions},
        sites, metric, direction=direction, normalize=normalize, batch_size=batch_size, progress=progress,
    )
    return _stamp(res, "image_pair_patching", metric="logit diff (clean caption − corrupt caption)", rows="images")


def text_pair_patching(
    model: "WrappedModel | nn.Module",
    clean_texts: torch.Tensor,
    corrupt_texts: torch.Tensor,
    clean_images: torch.Tensor,
    corrupt_images: torch.Tensor,
    sites: "str | Site | Sequence[str | Site]",
    *,
    direction: str = "denoising",
    normalize: bool = True,
    batch_size: int = 64,
    progress: bool | None = None,
) -> Result:
    """Patch text sites between caption pairs; read each caption's logit difference between images.

    Row ``i`` pairs ``clean_texts[i]`` (describing ``clean_images[i]``) with ``corrupt_texts[i]``
    (describing ``corrupt_images[i]``); the captions differ in one word and must tokenize to aligned
    positions (same length, the word at the same place). Captions are the rows, every caption is
    scored against all ``2n`` images; the metric is ``logit(caption, clean image) - logit(caption,
    corrupt image)``.
    """
    m = wrap(model)
    _rows_tower_only(m, sites, "text")
    clean_texts, corrupt_texts = torch.as_tensor(clean_texts), torch.as_tensor(corrupt_texts)
    n = clean_texts.shape[0]
    images = torch.cat([clean_images, corrupt_images])
    rows = torch.arange(n)
    metric = logit_diff(rows, rows + n)
    res = activation_patching(
        m,
        {"texts": clean_texts, "images": images, "rows": "texts"},
        {"texts": corrupt_texts, "images": images, "rows": "texts"},
        sites, metric, direction=direction, normalize=normalize, batch_size=batch_size, progress=progress,
    )
    return _stamp(res, "text_pair_patching", metric="logit diff (clean image − corrupt image)", rows="texts")


# --------------------------------------------------------------------------------------------------
# embeddings and zero-shot accuracy


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def encode_texts(model: "WrappedModel | nn.Module", texts: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """``text_embed`` of token ids ``[m, ctx]`` (unnormalised), through the engine."""
    m = wrap(model)
    texts = torch.as_tensor(texts)
    return torch.cat([m.run({"texts": texts[s]}).output for s in _batches(texts.shape[0], batch_size)])


def _cos_argmax(embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    a = torch.nn.functional.normalize(embeds.double(), dim=-1)
    b = torch.nn.functional.normalize(text_embeds.to(a.device).double(), dim=-1)
    return (a @ b.T).argmax(dim=-1)


def zero_shot_accuracy(
    model: "WrappedModel | nn.Module",
    images: torch.Tensor,
    texts: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int = 256,
) -> float:
    """Share of images whose highest-scoring candidate caption (of ``texts``) is ``labels[i]``."""
    m = wrap(model)
    text_embeds = encode_texts(m, texts)
    correct = 0
    for s in _batches(images.shape[0], batch_size):
        embeds = m.run({"images": images[s]}).output
        correct += int((_cos_argmax(embeds, text_embeds).cpu() == torch.as_tensor(labels)[s].cpu()).sum())
    return correct / images.shape[0]


# --------------------------------------------------------------------------------------------------
# decomposition


@dataclass
class EmbeddingDecomposition:
    """The image embedding as a sum of direct contributions, with the final norm's statistics frozen.

    ``layers[:, k]`` is component ``components[k]``'s contribution (``embed``, ``attn.<l>``,
    ``mlp.<l>``); ``heads[:, l, h]`` is head ``h`` of layer ``l``'s and ``attn_bias[:, l]`` the output
    bias of layer ``l``'s attention, so ``heads[:, l].sum(1) + attn_bias[:, l] == layers[:, attn.<l>]``.
    ``layers.sum(1) + constant == embedding``. All float64, on the model's device.
    """

    embedding: torch.Tensor  # [n, e]  the captured image_embed
    components: list[str]
    layers: torch.Tensor  # [n, 1 + 2L, e]
    heads: torch.Tensor | None  # [n, L, H, e]
    attn_bias: torch.Tensor | None  # [n, L, e]
    constant: torch.Tensor  # [e]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return (len(self.components) - 1) // 2

    def component(self, name: str) -> torch.Tensor:
        return self.layers[:, self.components.index(name)]

    def reconstruction(self) -> torch.Tensor:
        return self.layers.sum(dim=1) + self.constant

    def error(self) -> float:
        """Largest absolute difference between the sum of contributions and the embedding."""
        return float((self.reconstruction() - self.embedding.double()).abs().max())

    def head_error(self) -> float:
        if self.heads is None:
            return 0.0
        attn = torch.stack([self.component(f"attn.{l}") for l in range(self.n_layers)], dim=1)
        return float((self.heads.sum(dim=2) + self.attn_bias - attn).abs().max())

    def along(self, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Direct effects on ``embedding · d / |embedding|`` for per-image directions ``d`` ``[n, e]``
        (or one ``[e]``): with unit text embeddings, ``d = t_right - t_wrong`` turns this into the
        cosine (logit / logit_scale) difference between two captions.

        Returns ``(layers [n, 1 + 2L], heads [n, L, H] or None, constant [n])``; ``layers.sum(1) +
        constant`` is the whole difference (the embedding norm is frozen like the final norm).
        """
        d = torch.as_tensor(directions).to(self.layers.device, torch.float64)
        d = d.expand(self.embedding.shape[0], -1) if d.ndim == 1 else d
        norm = self.embedding.double().norm(dim=-1)  # [n]
        layers = torch.einsum("nke,ne->nk", self.layers, d) / norm[:, None]
        heads = None if self.heads is None else torch.einsum("nlhe,ne->nlh", self.heads, d) / norm[:, None, None]
        constant = (d @ self.constant) / norm
        return layers, heads, constant

    def norms(self) -> Result:
        """Mean norm of each component's direct contribution, relative to the mean embedding norm."""
        scale = self.embedding.double().norm(dim=-1).mean()
        values = (self.layers.norm(dim=-1).mean(dim=0) / scale).cpu()
        return Result(values, ("component",), {"component": list(self.components)},
                      {**self.metadata, "metric": "mean ‖direct contribution‖ / mean ‖embedding‖"})

    def head_norms(self) -> Result:
        if self.heads is None:
            raise ValueError("this decomposition was made without heads (heads=False)")
        scale = self.embedding.double().norm(dim=-1).mean()
        values = (self.heads.norm(dim=-1).mean(dim=0) / scale).cpu()
        return Result(values, ("layer", "head"), {}, {**self.metadata,
                      "metric": "mean ‖head's direct contribution‖ / mean ‖embedding‖"})


def decompose_image_embedding(
    model: "WrappedModel | nn.Module",
    images: torch.Tensor,
    *,
    heads: bool = True,
    batch_size: int = 128,
    progress: bool | None = None,
) -> EmbeddingDecomposition:
    """Exact direct contributions of every layer (and head) to the image embedding.

    The last residual stream is ``embed + sum_l (attn_out.l + mlp_out.l)``; with the final
    LayerNorm's mean and variance frozen at their values for each image, the readout is linear, so
    each part's contribution is the readout of that part alone. Contributions sum to the captured
    ``image_embed`` up to float rounding (:meth:`EmbeddingDecomposition.error`).
    """
    m = wrap(model)
    readout = _readout(m, "vision")
    n_layers = m.catalog.family("vision.resid_post").layers
    fam = ["vision.embed", "vision.attn_out.*", "vision.mlp_out.*", readout.residual, "image_embed"]
    if heads and "vision.head_out" in m.catalog:
        fam.append("vision.head_out.*")
    else:
        heads = False
    components = ["embed"] + [f"{kind}.{l}" for l in range(n_layers) for kind in ("attn", "mlp")]
    out_layers, out_heads, out_bias, out_embed = [], [], [], []
    images = torch.as_tensor(images)
    for s in progress_bar(list(_batches(images.shape[0], batch_size)), progress, desc="decomposing"):
        cache = m.capture({"images": images[s]}, fam)
        pick = readout.positions
        parts = [pick(cache["vision.embed"])]
        for l in range(n_layers):
            parts += [pick(cache[f"vision.attn_out.{l}"]), pick(cache[f"vision.mlp_out.{l}"])]
        residual = pick(cache[readout.residual])
        out_layers.append(readout.contributions(torch.stack(parts, dim=1), residual))
        out_embed.append(cache["image_embed"])
        if heads:
            # head_out [n, pos, head, d] -> [n, head, pos', d]; one more part: the attention's bias
            per_layer, bias = [], []
            for l in range(n_layers):
                h = pick(cache[f"vision.head_out.{l}"].transpose(1, 2))  # [n, head, pos', d]
                rest = pick(cache[f"vision.attn_out.{l}"]).unsqueeze(1) - h.sum(dim=1, keepdim=True)
                c = readout.contributions(torch.cat([h, rest], dim=1), residual)  # [n, head + 1, e]
                per_layer.append(c[:, :-1])
                bias.append(c[:, -1])
            out_heads.append(torch.stack(per_layer, dim=1))
            out_bias.append(torch.stack(bias, dim=1))
    layers = torch.cat(out_layers)
    metadata = {
        "method": "decompose_image_embedding", "model": m.describe(), "adapter": m.adapter.name,
        "readout": {"residual": readout.residual, "pool": readout.pool, "norm_after_pool": readout.norm_after_pool},
        "n_images": int(images.shape[0]), "versions": collect_versions(),
    }
    return EmbeddingDecomposition(
        embedding=torch.cat(out_embed).double(),
        components=components,
        layers=layers,
        heads=torch.cat(out_heads) if heads else None,
        attn_bias=torch.cat(out_bias) if heads else None,
        constant=readout.constant(layers.device),
        metadata=metadata,
    )


def mean_ablation_curves(
    model: "WrappedModel | nn.Module",
    images: torch.Tensor,
    texts: torch.Tensor,
    labels: torch.Tensor,
    *,
    decomposition: EmbeddingDecomposition | None = None,
    batch_size: int = 128,
    progress: bool | None = None,
) -> Result:
    """Zero-shot accuracy when each layer's attention or MLP is mean-ablated, directly or in total.

    ``images`` are classified among the captions ``texts`` (``labels[i]``: the right one). Curves
    (dim ``ablation``), each a function of ``layer``:

    * ``attn direct`` / ``mlp direct``: only layer ``l``'s direct contribution to the embedding is
      replaced by its mean over the images (from the decomposition; later layers see no change);
    * ``attn direct ≤ l`` / ``mlp direct ≤ l``: the same for every layer up to ``l`` together;
    * ``attn total`` / ``mlp total``: ``vision.attn_out.l`` / ``vision.mlp_out.l`` is mean-ablated in
      the forward pass (``Mean`` over the images, every position), so later layers see the change.
    """
    m = wrap(model)
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels).cpu()
    dec = decomposition or decompose_image_embedding(m, images, heads=False, batch_size=batch_size, progress=progress)
    text_embeds = encode_texts(m, texts)
    L = dec.n_layers

    def accuracy(embeds: torch.Tensor) -> float:
        return float((_cos_argmax(embeds, text_embeds).cpu() == labels).double().mean())

    embedding = dec.embedding
    base = accuracy(embedding)
    curves: dict[str, list[float]] = {}
    for kind in ("attn", "mlp"):
        single, cumulative = [], []
        shift = torch.zeros_like(embedding)
        for l in range(L):
            c = dec.component(f"{kind}.{l}")
            delta = c.mean(dim=0, keepdim=True) - c
            single.append(accuracy(embedding + delta))
            shift = shift + delta
            cumulative.append(accuracy(embedding + shift))
        curves[f"{kind} direct"] = single
        curves[f"{kind} direct ≤ l"] = cumulative

    # total effects: one batched forward per chunk of sites, each site on its own block of rows
    reference = m.capture({"images": images}, ["vision.attn_out.*", "vision.mlp_out.*"])
    sites = [f"vision.{kind}_out.{l}" for kind in ("attn", "mlp") for l in range(L)]
    mean = Mean(reference)
    totals: dict[str, float] = {}
    n = images.shape[0]
    prepared = m.prepare({"images": images})
    per_forward = max(1, batch_size // n)
    for start in progress_bar(range(0, len(sites), per_forward), progress, desc="mean ablation"):
        chunk = sites[start : start + per_forward]
        inputs = repeat_rows(prepared, len(chunk))
        bounds = [Bound(Site.parse(site), mean, slice(j * n, (j + 1) * n)) for j, site in enumerate(chunk)]
        run = execute(m.module, m.adapter, m.catalog, inputs, bounds)
        for j, site in enumerate(chunk):
            totals[site] = accuracy(run.output[j * n : (j + 1) * n])
    curves["attn total"] = [totals[f"vision.attn_out.{l}"] for l in range(L)]
    curves["mlp total"] = [totals[f"vision.mlp_out.{l}"] for l in range(L)]

    names = ["attn direct", "attn direct ≤ l", "attn total", "mlp direct", "mlp direct ≤ l", "mlp total"]
    metadata = {
        "method": "mean_ablation_curves", "metric": "zero-shot accuracy", "baseline": base,
        "chance": 1.0 / int(torch.as_tensor(texts).shape[0]), "n_images": int(n),
        "n_candidates": int(torch.as_tensor(texts).shape[0]), "model": m.describe(), "adapter": m.adapter.name,
        "versions": collect_versions(),
    }
    return Result([curves[k] for k in names], ("ablation", "layer"), {"ablation": names}, metadata)


# --------------------------------------------------------------------------------------------------
# TextSpan and factors


def word_directions(text_embeds: torch.Tensor, captions: Sequence[str], words: Sequence[str]) -> torch.Tensor:
    """A direction per word: the mean normalised embedding of the captions that contain the word,
    minus the mean over all captions. ``[len(words), e]``, float64."""
    t = torch.nn.functional.normalize(torch.as_tensor(text_embeds).double(), dim=-1)
    grand = t.mean(dim=0)
    rows = []
    for word in words:
        has = torch.tensor([word in caption.split() for caption in captions], device=t.device)
        if not bool(has.any()):
            raise ValueError(f"no caption contains the word {word!r}")
        rows.append(t[has].mean(dim=0) - grand)
    return torch.stack(rows)


def textspan(
    heads: torch.Tensor,
    directions: torch.Tensor,
    words: Sequence[str],
    *,
    k: int = 3,
    metadata: Mapping[str, Any] | None = None,
) -> Result:
    """TextSpan: for each head, greedily pick ``k`` text directions that explain its variance.

    ``heads`` ``[n, L, H, e]`` are per-head direct contributions (from
    :func:`decompose_image_embedding`), ``directions`` ``[V, e]`` one direction per entry of ``words``
    (e.g. :func:`word_directions`). Each step picks the direction along which the head's centred
    contributions vary most, then removes it from the contributions and from every direction.
    Returns the share of the head's variance each pick explains, dims ``(layer, head, rank)``;
    ``metadata["words"][l][h]`` lists the picked words.
    """
    heads = heads.double()
    n, L, H, e = heads.shape
    values = torch.zeros(L, H, k, dtype=torch.float64)
    picked: list[list[list[str]]] = []
    for l in range(L):
        row = []
        for h in range(H):
            c = heads[:, l, h] - heads[:, l, h].mean(dim=0)
            total = (c * c).sum().clamp_min(1e-30)
            t = directions.to(c.device).double().clone()
            chosen = []
            for r in range(min(k, t.shape[0])):
                unit = torch.nn.functional.normalize(t, dim=-1)
                var = ((c @ unit.T) ** 2).sum(dim=0)  # [V]
                if chosen:
                    var[[words.index(w) for w in chosen]] = -1.0
                j = int(var.argmax())
                chosen.append(words[j])
                values[l, h, r] = var[j] / total
                u = unit[j]
                c = c - (c @ u)[:, None] * u
                t = t - (t @ u)[:, None] * u
            row.append(chosen)
        picked.append(row)
    meta = {"method": "textspan", "metric": "share of the head's variance explained", "words": picked, "k": k}
    meta.update(metadata or {})
    return Result(values, ("layer", "head", "rank"), {"rank": list(range(1, k + 1))}, meta)


def factor_alignment(
    heads: torch.Tensor,
    factors: Mapping[str, torch.Tensor],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> Result:
    """How much of each head's direct-contribution variance each known factor explains (eta²).

    ``factors`` maps a factor name to the value index of every image ``[n]``. For each head, eta² is
    the between-group sum of squares over the total (summed over embedding dims): 1 when the head's
    contribution is a function of that factor alone, 0 when it does not depend on it on average.
    Dims ``(layer, head, factor)``.
    """
    heads = heads.double()
    n, L, H, e = heads.shape
    c = heads - heads.mean(dim=0, keepdim=True)
    total = (c * c).sum(dim=(0, 3)).clamp_min(1e-30)  # [L, H]
    names = list(factors)
    values = torch.zeros(L, H, len(names), dtype=torch.float64)
    for j, name in enumerate(names):
        index = torch.as_tensor(factors[name]).to(c.device).long()
        k = int(index.max()) + 1
        sums = torch.zeros(k, L, H, e, dtype=torch.float64, device=c.device).index_add_(0, index, c)
        counts = torch.bincount(index, minlength=k).double().clamp_min(1)
        between = (sums * sums).sum(dim=-1) / counts[:, None, None]  # n_g * |mean_g|^2 = |sum_g|^2 / n_g
        values[:, :, j] = (between.sum(dim=0) / total).cpu()
    meta = {"method": "factor_alignment", "metric": "eta² (share of variance explained)"}
    meta.update(metadata or {})
    return Result(values, ("layer", "head", "factor"), {"factor": names}, meta)
