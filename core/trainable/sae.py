"""Sparse autoencoders on any site's activations: train, save, load (also sae-lens folders).

An :class:`SAE` maps activations ``x`` (``[..., d_in]``) to sparse features and back::

    f = encode(x) = act((x - b_dec) @ W_enc + b_enc)     # act: ReLU, TopK or JumpReLU (ReLU, then 0 below θ)
    x_hat = decode(f) = f @ W_dec + b_dec

with ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]`` (the sae-lens layout, so its folders load
as they are: ``cfg.json`` + ``sae_weights.safetensors``; a TopK SAE with sae-lens's
``rescale_acts_by_decoder_norm`` scales the pre-activations by the decoder row norms and divides the
features by them before decoding, as sae-lens does; ``benchmarks/sae_lens_agreement.py`` checks the
two libraries agree). A loaded SAE knows its site: a sae-lens
``hook_name`` (``blocks.3.hook_resid_post``, ``blocks.3.attn.hook_z`` …; sae-lens 6 keeps it in
``metadata``) becomes the crosspatch site
(``resid_post.3``, ``head_z.3`` …) in ``sae.site``, so ``m.run(x, {sae.site: SAEFeatures(sae, [7])})``. ``train_sae`` fits a TopK SAE (MSE) or a
ReLU SAE (MSE + L1 on features weighted by decoder row norms), seeded, on a tensor of activations;
:func:`crosspatch.methods.erasure.site_activations` collects those from any site.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..progress import progress_bar
from ..results.formats import json_field
from ..results.tensor_folder import TensorFolder
from ..sites.site import Site, SiteError

__all__ = ["SAE", "train_sae", "load_sae", "site_of_hook", "SAE_CFG", "SAE_FOLDER", "SAE_WEIGHTS", "SAE_LENS_HOOKS"]

logger = logging.getLogger(__name__)

SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_FOLDER = TensorFolder(SAE_CFG, SAE_WEIGHTS, "an SAE")
Kind = Literal["relu", "topk", "jumprelu"]
_ARCHITECTURES = {"standard": "relu", "relu": "relu", "topk": "topk", "jumprelu": "jumprelu"}

#: sae-lens (TransformerLens) hook names inside ``blocks.<layer>.`` and the crosspatch family each is.
#: ``attn.hook_z`` SAEs read every head's z concatenated (``d_in = n_heads * d_head``), which
#: :class:`~crosspatch.trainable.sae_features.SAEFeatures` does on ``head_z``.
SAE_LENS_HOOKS: dict[str, str] = {
    "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid", "hook_resid_post": "resid_post",
    "hook_attn_out": "attn_out", "attn.hook_z": "head_z", "hook_z": "head_z",
    "hook_mlp_in": "mlp_in", "hook_mlp_out": "mlp_out",
    "mlp.hook_post": "mlp_act", "hook_mlp_post": "mlp_act", "hook_post": "mlp_act",
}
_BLOCK_HOOK = re.compile(r"blocks\.(\d+)\.(.+)")


def site_of_hook(hook_name: str) -> str:
    """The crosspatch site of a sae-lens ``hook_name`` (``blocks.3.hook_resid_post`` -> ``resid_post.3``);
    a ValueError naming the hook and the ones that map when it has none."""
    match = _BLOCK_HOOK.fullmatch(hook_name.strip())
    family = SAE_LENS_HOOKS.get(match.group(2)) if match else None
    if family is None:
        known = ", ".join(f"blocks.<L>.{h} -> {f}.<L>" for h, f in SAE_LENS_HOOKS.items())
        raise ValueError(
            f"hook_name {hook_name!r} has no crosspatch site: the hooks that map are {known}. Name the site yourself: "
            f"load_sae(path, site='resid_post.3')"
        )
    return f"{family}.{int(match.group(1))}"


class SAE(nn.Module):
    """A sparse autoencoder in the sae-lens parameter layout."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        kind: Kind = "topk",
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        metadata: dict | None = None,
        dtype: torch.dtype = torch.float32,
        rescale_by_decoder_norm: bool = False,
    ):
        super().__init__()
        if kind not in ("relu", "topk", "jumprelu"):
            raise ValueError(f"kind must be 'relu', 'topk' or 'jumprelu', got {kind!r}")
        if kind == "topk" and not (k and 0 < k <= d_sae):
            raise ValueError(f"a TopK SAE needs 0 < k <= d_sae={d_sae}, got k={k}")
        self.d_in, self.d_sae, self.kind, self.k = d_in, d_sae, kind, k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        # sae-lens TopK ``rescale_acts_by_decoder_norm``: pre-activations times the decoder row norms, features
        # divided by them before decoding
        self.rescale_by_decoder_norm = bool(rescale_by_decoder_norm)
        self.metadata: dict = dict(metadata or {})
        self.site: str | None = self.metadata.get("site")  # the crosspatch site it reads, when known
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        if kind == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype))

    # ------------------------------------------------------------------ forward

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        return pre * self.W_dec.norm(dim=-1) if self.rescale_by_decoder_norm else pre

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse features ``[..., d_sae]`` of activations ``[..., d_in]``."""
        pre = self.pre_activation(x)
        if self.kind == "relu":
            return torch.relu(pre)
        if self.kind == "jumprelu":  # ReLU, then zero below the threshold (as sae-lens and Gemma Scope)
            return torch.relu(pre) * (pre > self.threshold)
        values, index = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, torch.relu(values))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.write(f) + self.b_dec

    def write(self, f: torch.Tensor) -> torch.Tensor:
        """What features ``f`` add to the reconstruction: ``decode(f) - b_dec`` (``f @ W_dec``, the features
        first divided by the decoder row norms when the SAE rescales by them). Linear in ``f``."""
        f = f.to(self.W_dec.dtype)
        if self.rescale_by_decoder_norm:
            f = f * (1 / self.W_dec.norm(dim=-1))
        return f @ self.W_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor) -> dict[str, float]:
        """Reconstruction quality on ``x`` ``[n, d_in]``: MSE, fraction of variance unexplained, L0."""
        x = x.reshape(-1, self.d_in).to(self.W_enc)
        f = self.encode(x)
        err = (self.decode(f) - x).double()
        var = (x.double() - x.double().mean(0)).pow(2).sum()
        return {
            "mse": float(err.pow(2).mean()),
            "fvu": float(err.pow(2).sum() / var.clamp_min(1e-30)),
            "l0": float((f != 0).double().sum(-1).mean()),
            "dead_fraction": float(((f != 0).sum(0) == 0).double().mean()),
        }

    # ------------------------------------------------------------------ storage

    def config(self) -> dict[str, Any]:
        """An sae-lens style ``cfg.json``."""
        cfg: dict[str, Any] = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "architecture": {"relu": "standard"}.get(self.kind, self.kind),
            "activation_fn": "topk" if self.kind == "topk" else "relu",
            "activation_fn_kwargs": {"k": self.k} if self.kind == "topk" else {},
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
            "hook_name": self.site or self.metadata.get("site") or "",
            "metadata": self.metadata,
        }
        if self.kind == "topk":
            cfg["k"] = self.k
            cfg["rescale_acts_by_decoder_norm"] = self.rescale_by_decoder_norm
        return cfg

    def save(self, path: "str | Path") -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` (the sae-lens layout) into folder ``path``."""
        return SAE_FOLDER.write(path, self.config(), self.state_dict())

    @classmethod
    def load(cls, path: "str | Path", device: "str | torch.device" = "cpu") -> "SAE":
        return load_sae(path, device)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.kind == "topk" else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}, kind={self.kind!r}{k}"


def load_sae(path: "str | Path", device: "str | torch.device" = "cpu", *, site: "str | None" = None) -> SAE:
    """Load an SAE from a folder with ``cfg.json`` + ``sae_weights.safetensors`` (sae-lens or ours).

    Reads ``d_in``, ``d_sae``, the architecture (``architecture``: standard / topk / jumprelu, or an
    older ``activation_fn``: relu / topk with ``activation_fn_kwargs.k``), ``apply_b_dec_to_input``,
    and the site: a sae-lens ``hook_name`` is mapped to the crosspatch site (:func:`site_of_hook`; one
    without a crosspatch family is an error naming it), a crosspatch site string is kept; ``site``
    names it yourself. Folders that need activation normalisation or a scaling factor are refused
    rather than loaded wrong; a malformed ``cfg.json`` is a FormatError naming the field.
    """
    path = Path(path)
    cfg_path, weights_path = SAE_FOLDER.require(path)
    cfg = SAE_FOLDER.read_config(path)
    for name, kind in (("d_in", int), ("d_sae", int), ("hook_name", (str, type(None))),
                       ("architecture", (str, type(None))), ("activation_fn_kwargs", (dict, type(None))),
                       ("metadata", (dict, type(None))), ("apply_b_dec_to_input", bool),
                       ("normalize_activations", (str, type(None))), ("k", (int, type(None))),
                       ("rescale_acts_by_decoder_norm", (bool, type(None)))):
        json_field(cfg, name, kind, cfg_path, None)
    weights = SAE_FOLDER.read_weights(path)
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in weights]
    if missing:
        raise ValueError(f"{weights_path} lacks {missing}; it holds {sorted(weights)}")
    arch = cfg.get("architecture")
    if arch is None:
        arch = "topk" if str(cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))) == "topk" else "standard"
    kind = _ARCHITECTURES.get(str(arch))
    if kind is None:
        raise ValueError(f"{cfg_path}: architecture {arch!r} is not supported (supported: {sorted(_ARCHITECTURES)})")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none" or "scaling_factor" in weights and not torch.all(weights["scaling_factor"] == 1):
        raise ValueError(
            f"{cfg_path}: normalize_activations={norm!r} or a scaling_factor needs the training-time statistics; "
            f"fold them into the weights first"
        )
    d_in, d_sae = int(cfg.get("d_in", weights["W_enc"].shape[0])), int(cfg.get("d_sae", weights["W_enc"].shape[1]))
    if tuple(weights["W_enc"].shape) != (d_in, d_sae) or tuple(weights["W_dec"].shape) != (d_sae, d_in):
        raise ValueError(
            f"{path}: W_enc {tuple(weights['W_enc'].shape)} / W_dec {tuple(weights['W_dec'].shape)} do not match "
            f"d_in={d_in}, d_sae={d_sae} (expected W_enc [d_in, d_sae], W_dec [d_sae, d_in])"
        )
    dtype = weights["W_enc"].dtype
    # sae-lens 6 keeps the hook in the metadata; older folders (and ours) at the top level
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    site = _site(hook if isinstance(hook, str) else None, site, cfg_path)
    meta = {**(cfg.get("metadata") or {}), "hook_name": hook, "loaded_from": str(path)}
    if site is not None:
        meta["site"] = site
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm"))
    if rescale and kind != "topk":
        raise ValueError(f"{cfg_path}: rescale_acts_by_decoder_norm is known for TopK SAEs only, this one is {arch!r}")
    sae = SAE(d_in, d_sae, kind, int(k) if k else None, bool(cfg.get("apply_b_dec_to_input", True)), meta, dtype,
              rescale_by_decoder_norm=rescale)
    state = {name: weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if kind == "jumprelu":
        if "threshold" not in weights:
            raise ValueError(f"{weights_path}: a jumprelu SAE needs a 'threshold' tensor")
        state["threshold"] = weights["threshold"]
    sae.load_state_dict(state)
    return sae.to(device)


def _site(hook: str | None, given: str | None, cfg_path: Path) -> str | None:
    """The crosspatch site of an SAE folder: ``given``, else its ``hook_name`` as a crosspatch site or mapped
    from sae-lens; None when the folder names none."""
    if given is not None:
        return str(Site.parse(given))
    if not hook:
        return None
    if not _BLOCK_HOOK.fullmatch(hook):
        try:
            return str(Site.parse(hook))  # our own SAEs write the crosspatch site
        except SiteError:
            pass
    try:
        return site_of_hook(hook)
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: {exc}") from None


def train_sae(
    activations: torch.Tensor,
    n_features: int,
    *,
    kind: Literal["topk", "relu"] = "topk",
    k: int = 8,
    l1: float = 0.1,
    steps: int = 1000,
    lr: float = 3e-3,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool | None = None,
    metadata: dict | None = None,
) -> SAE:
    """Train an SAE on ``activations`` (``[..., d_in]``, flattened to rows), seeded.

    ``topk`` keeps the ``k`` largest pre-activations and minimises the MSE; ``relu`` minimises
    MSE + ``l1`` * sum of feature activations times their decoder row norms (MSE over the
    activations' variance, L1 over their standard deviation, so ``l1`` is unit-free). The decoder starts as
    the encoder's transpose with unit rows, ``b_dec`` at the data mean; TopK decoder rows are
    renormalised after every step. The result's ``metadata["train"]`` holds the final metrics.
    """
    x = activations.detach().reshape(-1, activations.shape[-1]).float()
    n, d_in = x.shape
    gen = torch.Generator().manual_seed(seed)
    sae = SAE(d_in, n_features, kind, k if kind == "topk" else None, metadata=metadata)
    with torch.no_grad():
        w = torch.randn(n_features, d_in, generator=gen)
        w = w / w.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.T)
        sae.b_dec.copy_(x.mean(0))
    sae = sae.to(activations.device)
    x = x.to(activations.device)
    # MSE relative to the total variance and L1 relative to the activations' scale, so l1 does not depend on units
    scale = float((x - x.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    with torch.enable_grad():
        for step in progress_bar(range(steps), progress, desc=f"training a {kind} SAE"):
            rows = torch.randint(n, (min(batch_size, n),), generator=gen).to(x.device)
            batch = x[rows]
            f = sae.encode(batch)
            loss = (sae.decode(f) - batch).pow(2).sum(-1).mean() / scale
            if kind == "relu":
                loss = loss + l1 * (f * sae.W_dec.norm(dim=1)).sum(-1).mean() / scale**0.5
            opt.zero_grad()
            loss.backward()
            opt.step()
            if kind == "topk":
                with torch.no_grad():
                    sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
    sae.eval()
    stats = sae.evaluate(x)
    sae.metadata["train"] = {"kind": kind, "k": k if kind == "topk" else None, "l1": l1 if kind == "relu" else None,
                             "steps": steps, "seed": seed, "rows": n, **stats}
    logger.info("trained %s SAE %d -> %d: %s", kind, d_in, n_features, stats)
    return sae
