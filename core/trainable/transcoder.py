"""Transcoders: sparse features that read one site and write another (an MLP's input and output).

A :class:`Transcoder` covers ``n`` layers. Source layer ``i`` reads ``input_sites[i]`` (``mlp_in.L``)::

    pre_i = x_i @ W_enc[i] + b_enc[i]                      # [..., n_features]
    f_i = act(pre_i)                                       # JumpReLU (pre * (pre > threshold)), TopK or ReLU
    y_j = sum over sources i writing to j of f_i @ W_dec[i][:, j - i] + b_dec[j]

A transcoder with a skip connection (``skip=True``, circuit-tracer's skip transcoders) adds a linear
term of its own input to each output, ``y_j += x_j @ W_skip[j].T`` (``W_skip[j]`` is ``[d_out, d_in]``).

A per-layer transcoder (PLT) writes only its own layer (``W_dec[i]`` is ``[n_features, 1, d_out]``);
a cross-layer transcoder (CLT) writes its layer and every later one (``[n_features, n - i, d_out]``,
circuit-tracer's layout), so ``output_sites[j]`` (``mlp_out.L``) is the sum of the decoders of every
earlier source. :func:`train_transcoder` fits either on activations (:func:`collect_pairs` captures
them from any site pair in one forward), JumpReLU thresholds trained through an L0 penalty with
straight-through rectangle-kernel gradients (:mod:`crosspatch.trainable.jumprelu`), or TopK.

Saved folders hold ``transcoder.json`` (configuration, sites, training metrics) and
``transcoder.safetensors``; :mod:`crosspatch.trainable.transcoder_formats` reads the published
circuit-tracer and GemmaScope layouts.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from ..progress import progress_bar
from ..results.formats import FormatError, json_field
from ..results.tensor_folder import TensorFolder
from ..sites.site import Site
from .jumprelu import jumprelu, step

__all__ = ["Transcoder", "train_transcoder", "collect_pairs", "load_transcoder", "TRANSCODER_CFG",
           "TRANSCODER_FOLDER", "TRANSCODER_WEIGHTS"]

logger = logging.getLogger(__name__)

TRANSCODER_CFG = "transcoder.json"
TRANSCODER_WEIGHTS = "transcoder.safetensors"
TRANSCODER_FOLDER = TensorFolder(TRANSCODER_CFG, TRANSCODER_WEIGHTS, "a transcoder")
Kind = Literal["jumprelu", "topk", "relu"]
_KINDS = ("jumprelu", "topk", "relu")


class Transcoder(nn.Module):
    """Per-layer or cross-layer transcoder over ``n`` (input site, output site) pairs (see the module doc)."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        n_features: int,
        input_sites: Sequence[str],
        output_sites: Sequence[str],
        *,
        cross_layer: bool = False,
        kind: Kind = "jumprelu",
        k: int | None = None,
        normalized_input: bool = False,
        skip: bool = False,
        metadata: dict | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {', '.join(_KINDS)}, got {kind!r}")
        if kind == "topk" and not (k and 0 < k <= n_features):
            raise ValueError(f"a TopK transcoder needs 0 < k <= n_features={n_features}, got k={k}")
        if len(input_sites) != len(output_sites) or not input_sites:
            raise ValueError(
                f"one output site per input site: got {len(input_sites)} inputs {list(input_sites)} and "
                f"{len(output_sites)} outputs {list(output_sites)}"
            )
        self.input_sites = [str(Site.parse(s)) for s in input_sites]
        self.output_sites = [str(Site.parse(s)) for s in output_sites]
        n = len(self.input_sites)
        self.n, self.d_in, self.d_out, self.n_features = n, d_in, d_out, n_features
        self.cross_layer, self.kind, self.k = cross_layer, kind, k
        self.normalized_input = normalized_input  # reads the MLP's normed input (GemmaScope), not the site itself
        self.metadata: dict = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.zeros(n, d_in, n_features, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(n, n_features, dtype=dtype))
        self.threshold = nn.Parameter(torch.zeros(n, n_features, dtype=dtype), requires_grad=kind == "jumprelu")
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.zeros(n_features, (n - i) if cross_layer else 1, d_out, dtype=dtype)) for i in range(n)]
        )
        self.b_dec = nn.Parameter(torch.zeros(n, d_out, dtype=dtype))
        # Output j's linear skip term reads input j: [n, d_out, d_in] (circuit-tracer's orientation).
        self.W_skip = nn.Parameter(torch.zeros(n, d_out, d_in, dtype=dtype)) if skip else None
        self.bandwidth = 1e-3  # JumpReLU's straight-through kernel width (set by training)

    # ------------------------------------------------------------------ structure

    def layer_of(self, site: str) -> int:
        """The index ``i`` of input site ``site`` (a ValueError listing them when it is not one)."""
        site = str(Site.parse(site))
        if site not in self.input_sites:
            raise ValueError(f"{site} is not an input site of this transcoder; it reads {self.input_sites}")
        return self.input_sites.index(site)

    def outputs_of(self, i: int) -> range:
        """The output indices source ``i`` writes: ``i`` alone (PLT) or ``i .. n-1`` (CLT)."""
        return range(i, self.n) if self.cross_layer else range(i, i + 1)

    def decoder(self, i: int, j: int) -> torch.Tensor:
        """``[n_features, d_out]``: what source ``i``'s features write into output ``j``."""
        if j not in self.outputs_of(i):
            raise ValueError(f"source {i} does not write output {j}; it writes {list(self.outputs_of(i))}")
        return self.W_dec[i][:, j - i]

    # ------------------------------------------------------------------ forward

    def pre_activation(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.W_enc.dtype) @ self.W_enc[i] + self.b_enc[i]

    def activate(self, i: int, pre: torch.Tensor) -> torch.Tensor:
        """The nonlinearity of source ``i`` (JumpReLU with straight-through threshold gradients)."""
        if self.kind == "jumprelu":
            return jumprelu(pre, self.threshold[i], self.bandwidth)
        if self.kind == "relu":
            return torch.relu(pre)
        values, index = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, index, torch.relu(values))

    def encode(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Features ``[..., n_features]`` of source ``i`` for its input ``x`` ``[..., d_in]``."""
        return self.activate(i, self.pre_activation(i, x))

    def decode(self, features: Sequence["torch.Tensor | None"]) -> list[torch.Tensor]:
        """Every output ``[..., d_out]`` from each source's features (None: a source with none active)."""
        outs: list[torch.Tensor | None] = [None] * self.n
        for i, f in enumerate(features):
            if f is None:
                continue
            for j in self.outputs_of(i):
                part = f.to(self.W_dec[i].dtype) @ self.decoder(i, j)
                outs[j] = part if outs[j] is None else outs[j] + part
        shape = next(f.shape[:-1] for f in features if f is not None)
        return [(torch.zeros(*shape, self.d_out, dtype=self.b_dec.dtype, device=self.b_dec.device) if o is None else o)
                + self.b_dec[j] for j, o in enumerate(outs)]

    def skip(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Output ``j``'s skip term for its input ``x`` ``[..., d_in]`` (zero without a skip connection)."""
        if self.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.d_out, dtype=self.b_dec.dtype, device=x.device)
        return x.to(self.W_skip.dtype) @ self.W_skip[j].T

    def reconstruct(self, inputs: Sequence[torch.Tensor], features: Sequence["torch.Tensor | None"]) -> list[torch.Tensor]:
        """Every output: the decoding of ``features`` plus, with a skip connection, each output's skip term."""
        outs = self.decode(features)
        return outs if self.W_skip is None else [o + self.skip(j, x) for j, (o, x) in enumerate(zip(outs, inputs))]

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.reconstruct(inputs, [self.encode(i, x) for i, x in enumerate(inputs)])

    @torch.no_grad()
    def evaluate(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> dict[str, Any]:
        """Reconstruction quality: per output its fraction of variance unexplained (FVU), per source
        its mean number of active features (L0) and dead fraction; ``fvu`` the variance-weighted total."""
        inputs = [x.reshape(-1, self.d_in).to(self.W_enc) for x in inputs]
        outputs = [y.reshape(-1, self.d_out).to(self.W_enc) for y in outputs]
        feats = [self.encode(i, x) for i, x in enumerate(inputs)]
        recon = self.reconstruct(inputs, feats)
        err = [(r - y).double().pow(2).sum() for r, y in zip(recon, outputs)]
        var = [(y.double() - y.double().mean(0)).pow(2).sum().clamp_min(1e-30) for y in outputs]
        return {
            "fvu": float(sum(err) / sum(var)),
            "fvu_per_output": [float(e / v) for e, v in zip(err, var)],
            "l0_per_source": [float((f != 0).double().sum(-1).mean()) for f in feats],
            "dead_fraction": [float(((f != 0).sum(0) == 0).double().mean()) for f in feats],
        }

    # ------------------------------------------------------------------ storage

    def config(self) -> dict[str, Any]:
        return {
            "format": "crosspatch.transcoder", "version": 1,
            "d_in": self.d_in, "d_out": self.d_out, "n_features": self.n_features,
            "input_sites": self.input_sites, "output_sites": self.output_sites,
            "cross_layer": self.cross_layer, "kind": self.kind, "k": self.k,
            "normalized_input": self.normalized_input, "skip": self.W_skip is not None,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."), "metadata": self.metadata,
        }

    def save(self, path: "str | Path") -> Path:
        """Write ``transcoder.json`` and ``transcoder.safetensors`` into folder ``path``."""
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "threshold": self.threshold, "b_dec": self.b_dec}
        tensors.update({f"W_dec_{i}": w for i, w in enumerate(self.W_dec)})
        if self.W_skip is not None:
            tensors["W_skip"] = self.W_skip
        return TRANSCODER_FOLDER.write(path, self.config(), tensors)

    @classmethod
    def load(cls, path: "str | Path", device: "str | torch.device" = "cpu") -> "Transcoder":
        return load_transcoder(path, device)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.kind == "topk" else ""
        return (f"{'CLT' if self.cross_layer else 'PLT'} over {self.n} layers, d_in={self.d_in}, d_out={self.d_out}, "
                f"n_features={self.n_features}, kind={self.kind!r}{k}")


def load_transcoder(path: "str | Path", device: "str | torch.device" = "cpu") -> Transcoder:
    """Load a folder written by :meth:`Transcoder.save` (FormatError naming a malformed field)."""
    path = Path(path)
    cfg_path, weights_path = TRANSCODER_FOLDER.require(
        path, hint=" (published circuit-tracer / GemmaScope folders load with "
                   "crosspatch.trainable.transcoder_formats.load_published)")
    cfg = TRANSCODER_FOLDER.read_config(path)
    for name, kind in (("d_in", int), ("d_out", int), ("n_features", int), ("input_sites", list),
                       ("output_sites", list), ("cross_layer", bool), ("kind", str), ("k", (int, type(None)))):
        json_field(cfg, name, kind, cfg_path)
    weights = TRANSCODER_FOLDER.read_weights(path)
    dtype = weights["W_enc"].dtype if "W_enc" in weights else torch.float32
    tc = Transcoder(cfg["d_in"], cfg["d_out"], cfg["n_features"], cfg["input_sites"], cfg["output_sites"],
                    cross_layer=cfg["cross_layer"], kind=cfg["kind"], k=cfg["k"],
                    normalized_input=bool(cfg.get("normalized_input", False)), skip=bool(cfg.get("skip", False)),
                    metadata=cfg.get("metadata") or {}, dtype=dtype)
    expected = {k: tuple(v.shape) for k, v in tc.state_dict().items()}
    state = {("W_dec." + k.removeprefix("W_dec_")) if k.startswith("W_dec_") else k: v for k, v in weights.items()}
    bad = {k: (tuple(state[k].shape) if k in state else None, shape) for k, shape in expected.items()
           if k not in state or tuple(state[k].shape) != shape}
    if bad:
        raise FormatError(f"{weights_path}: tensors missing or misshapen (found, expected): {bad}")
    tc.load_state_dict(state)
    return tc.to(device)


# ---------------------------------------------------------------------- data


def collect_pairs(
    model: Any,
    inputs: Any,
    input_sites: Sequence[str],
    output_sites: Sequence[str],
    *,
    batch_size: int = 64,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Activations of each input and output site as rows ``[tokens, d]`` (padding dropped), from one
    capture forward per batch of ``inputs`` (token ids ``[batch, pos]`` or a dict with an attention mask)."""
    from ..engine.model import wrap

    m = wrap(model)
    prepared = m.prepare(inputs)
    ids = prepared["input_ids"]
    mask = prepared.get("attention_mask")
    sites = list(dict.fromkeys([*input_sites, *output_sites]))
    rows: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    for start in range(0, ids.shape[0], batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in prepared.items() if isinstance(v, torch.Tensor)}
        cache = m.run(chunk, capture=sites).cache
        keep = None if mask is None else chunk["attention_mask"].bool()
        for s in sites:
            acts = cache[s]  # [rows, pos, d]
            rows[s].append((acts[keep] if keep is not None else acts.reshape(-1, acts.shape[-1])).detach().float())
    cat = {s: torch.cat(v) for s, v in rows.items()}
    return [cat[s] for s in input_sites], [cat[s] for s in output_sites]


# ---------------------------------------------------------------------- training


def train_transcoder(
    inputs: Sequence[torch.Tensor],
    outputs: Sequence[torch.Tensor],
    n_features: int,
    input_sites: Sequence[str],
    output_sites: Sequence[str],
    *,
    cross_layer: bool = False,
    kind: Literal["jumprelu", "topk"] = "jumprelu",
    k: int = 8,
    l0: float = 1e-3,
    bandwidth: float = 0.05,
    steps: int = 2000,
    lr: float = 2e-3,
    batch_size: int = 512,
    seed: int = 0,
    progress: bool | None = None,
    metadata: dict | None = None,
) -> Transcoder:
    """Fit a transcoder on paired activations (``inputs[i]`` ``[rows, d_in]`` -> ``outputs[i]`` ``[rows, d_out]``).

    Inputs and outputs are scaled to unit mean squared norm per dimension for training, and the scales
    folded back into the weights, so thresholds and ``bandwidth`` are in units of a typical
    pre-activation. The loss is the summed squared error over the outputs' total variance, plus for
    JumpReLU ``l0`` times the mean number of active features per source (its thresholds learn through
    the rectangle-kernel straight-through gradient). Seeded; ``metadata["train"]`` holds the settings
    and the final :meth:`Transcoder.evaluate` metrics on the training rows.
    """
    if len(inputs) != len(input_sites) or len(outputs) != len(output_sites):
        raise ValueError(f"{len(inputs)} input and {len(outputs)} output tensors for {len(input_sites)} input and "
                         f"{len(output_sites)} output sites")
    xs = [x.detach().reshape(-1, x.shape[-1]).float() for x in inputs]
    ys = [y.detach().reshape(-1, y.shape[-1]).float() for y in outputs]
    n_rows = {x.shape[0] for x in xs + ys}
    if len(n_rows) != 1:
        raise ValueError(f"every site needs the same number of rows (tokens); got {sorted(n_rows)}")
    n, device = xs[0].shape[0], xs[0].device
    d_in, d_out = xs[0].shape[1], ys[0].shape[1]
    s_in = [float(x.pow(2).mean().sqrt().clamp_min(1e-12)) for x in xs]
    s_out = [float(y.pow(2).mean().sqrt().clamp_min(1e-12)) for y in ys]
    xs = [x / s for x, s in zip(xs, s_in)]
    ys = [y / s for y, s in zip(ys, s_out)]
    gen = torch.Generator().manual_seed(seed)
    tc = Transcoder(d_in, d_out, n_features, input_sites, output_sites, cross_layer=cross_layer, kind=kind,
                    k=k if kind == "topk" else None, metadata=metadata)
    tc.bandwidth = bandwidth
    L = tc.n
    with torch.no_grad():
        for i in range(L):
            w = torch.randn(d_in, n_features, generator=gen) / math.sqrt(d_in)
            tc.W_enc[i].copy_(w)
            dec = torch.randn(n_features, tc.W_dec[i].shape[1], d_out, generator=gen) * (0.1 / math.sqrt(n_features))
            tc.W_dec[i].copy_(dec)
            tc.b_dec[i].copy_(ys[i].mean(0))
        tc.threshold.fill_(0.5 if kind == "jumprelu" else 0.0)
    tc = tc.to(device)
    var = sum(float((y - y.mean(0)).pow(2).sum(-1).mean()) for y in ys)
    opt = torch.optim.Adam(tc.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in progress_bar(range(steps), progress, desc=f"training a {kind} {'CLT' if cross_layer else 'PLT'}"):
            rows = torch.randint(n, (min(batch_size, n),), generator=gen).to(device)
            pres = [tc.pre_activation(i, x[rows]) for i, x in enumerate(xs)]
            feats = [tc.activate(i, p) for i, p in enumerate(pres)]
            recon = tc.decode(feats)
            loss = sum((r - y[rows]).pow(2).sum(-1).mean() for r, y in zip(recon, ys)) / var
            if kind == "jumprelu":
                active = sum(step(p, tc.threshold[i], bandwidth).sum(-1).mean() for i, p in enumerate(pres))
                loss = loss + l0 * active / L
            opt.zero_grad()
            loss.backward()
            opt.step()
            if kind == "jumprelu":
                with torch.no_grad():
                    tc.threshold.clamp_(min=0.0)
    with torch.no_grad():  # fold the training scales back into the weights
        for i in range(L):
            tc.W_enc[i].div_(s_in[i])
            for j in tc.outputs_of(i):
                tc.W_dec[i][:, j - i].mul_(s_out[j])
        tc.b_dec.mul_(torch.tensor(s_out, device=device)[:, None])
    tc.eval()
    stats = tc.evaluate([x * s for x, s in zip(xs, s_in)], [y * s for y, s in zip(ys, s_out)])
    tc.metadata["train"] = {"kind": kind, "k": k if kind == "topk" else None, "l0": l0 if kind == "jumprelu" else None,
                            "bandwidth": bandwidth, "steps": steps, "lr": lr, "seed": seed, "rows": n, **stats}
    logger.info("trained %s transcoder over %d layers: fvu %.4f", kind, L, stats["fvu"])
    return tc
