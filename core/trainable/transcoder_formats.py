"""Published transcoder folders: circuit-tracer's layouts and GemmaScope's ``params.npz``, read from disk.

circuit-tracer describes a folder with ``config.yaml``:

- ``model_kind: transcoder_set`` (per-layer): ``transcoders:`` lists one file per layer (``layer_<i>.safetensors``
  with ``W_enc [d_transcoder, d_model]``, ``W_dec [d_transcoder, d_model]``, ``b_enc``, ``b_dec``,
  ``activation_function.threshold`` for JumpReLU and a ``k`` scalar for TopK; or GemmaScope's
  ``params.npz`` with ``W_enc [d_model, d_sae]``, ``W_dec``, ``b_enc``, ``b_dec``, ``threshold``). Without
  the list, ``layer_<i>.safetensors`` in the folder.
- ``model_kind: cross_layer_transcoder``: ``W_enc_<i>.safetensors`` (``W_enc_<i> [d_transcoder, d_model]``,
  ``b_enc_<i>``, ``b_dec_<i>``, ``threshold_<i>``) and ``W_dec_<i>.safetensors`` (``W_dec_<i>
  [d_transcoder, n_layers - i, d_model]``).

``feature_input_hook`` / ``feature_output_hook`` (TransformerLens names, with or without ``blocks.{layer}.``)
become sites: ``hook_resid_mid`` reads ``mlp_in.L`` (the residual the MLP's norm reads), ``hook_mlp_out`` /
``mlp.hook_out`` writes ``mlp_out.L``; ``mlp.hook_in`` / ``ln2.hook_normalized`` read the *normed* input,
loaded with ``normalized_input=True``. ``hf://`` entries are read from the folder by their file name:
nothing is downloaded. A per-layer file's skip connection (``W_skip [d_model, d_model]``, applied as
``x @ W_skip.T``) loads into ``Transcoder(skip=True)``; a cross-layer folder with one is refused rather
than dropped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..results.formats import FormatError
from ..results.tensor_folder import read_tensors
from .transcoder import Transcoder

__all__ = ["load_published", "load_gemma_scope", "hook_site"]

_WEIGHTS = "transcoder weights"  # what a published weights file holds, for the error when it is not one

_INPUT_HOOKS = {"hook_resid_mid": ("mlp_in", False), "mlp.hook_in": ("mlp_in", True),
                "ln2.hook_normalized": ("mlp_in", True), "hook_mlp_in": ("mlp_in", True)}
_OUTPUT_HOOKS = {"hook_mlp_out": "mlp_out", "mlp.hook_out": "mlp_out"}


def hook_site(hook: str, layer: int, *, output: bool) -> tuple[str, bool]:
    """``(site, reads the normed input)`` of a circuit-tracer hook name at ``layer``; a ValueError listing
    the hooks that map when it has none."""
    name = hook.split("}.", 1)[-1] if hook.startswith("blocks.{") else hook
    if name.startswith("blocks."):
        name = name.split(".", 2)[-1]
    if output:
        family = _OUTPUT_HOOKS.get(name)
        if family is None:
            raise ValueError(f"feature_output_hook {hook!r} has no crosspatch site; known: {sorted(_OUTPUT_HOOKS)}")
        return f"{family}.{layer}", False
    if name not in _INPUT_HOOKS:
        raise ValueError(f"feature_input_hook {hook!r} has no crosspatch site; known: {sorted(_INPUT_HOOKS)}")
    family, normed = _INPUT_HOOKS[name]
    return f"{family}.{layer}", normed


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise ImportError("reading a circuit-tracer config.yaml needs PyYAML: pip install pyyaml") from None

    path = folder / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.yaml (a circuit-tracer transcoder folder has one)")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise FormatError(f"{path} is not YAML: {exc}") from None
    if not isinstance(cfg, dict) or cfg.get("model_kind") not in ("transcoder_set", "cross_layer_transcoder"):
        raise FormatError(f"{path}: model_kind should be 'transcoder_set' or 'cross_layer_transcoder', got "
                          f"{cfg.get('model_kind') if isinstance(cfg, dict) else cfg!r}")
    return cfg


def _local(folder: Path, entry: str) -> Path:
    """A ``transcoders:`` entry as a file of ``folder`` (an ``hf://`` URI by its path inside the repository)."""
    if entry.startswith("hf://"):
        inner = entry[len("hf://"):].split("?", 1)[0].split("/", 2)[-1]  # drop org/repo
        for candidate in (folder / inner, folder / Path(inner).name):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{entry} is not in {folder} (looked for {inner} and {Path(inner).name}); "
                                f"nothing is downloaded: put the file there")
    path = Path(entry)
    return path if path.is_absolute() else folder / path


def _npz(path: Path) -> dict[str, torch.Tensor]:
    import numpy as np

    with np.load(path) as data:
        params = {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(params)
    if missing:
        raise FormatError(f"{path}: a GemmaScope params.npz needs {sorted(missing)}; it holds {sorted(params)}")
    # GemmaScope stores W_enc [d_model, d_sae]; circuit-tracer's layout is [d_sae, d_model]
    return {"W_enc": params["W_enc"].T, "W_dec": params["W_dec"], "b_enc": params["b_enc"], "b_dec": params["b_dec"],
            "activation_function.threshold": params["threshold"]}


def _need(weights: dict, keys: list[str], path: Path, *, skip_allowed: bool = False) -> None:
    missing = [k for k in keys if k not in weights]
    if missing:
        raise FormatError(f"{path} lacks {missing}; it holds {sorted(weights)}")
    if not skip_allowed and any(k.startswith("W_skip") for k in weights):
        raise NotImplementedError(f"{path} has a skip connection (W_skip), which cross-layer transcoders here do not "
                                  f"model (per-layer transcoder sets with W_skip load)")


def load_published(folder: "str | Path", *, dtype: torch.dtype = torch.float32,
                   activation: str | None = None, k: int | None = None) -> Transcoder:
    """Load a circuit-tracer transcoder folder (``config.yaml`` and its weight files; see the module doc)."""
    folder = Path(folder)
    cfg = _read_config(folder)
    activation = activation or cfg.get("activation")
    k = k or cfg.get("k")
    in_hook, out_hook = str(cfg.get("feature_input_hook", "")), str(cfg.get("feature_output_hook", ""))
    hook_site(in_hook, 0, output=False), hook_site(out_hook, 0, output=True)  # refuse unknown hooks before reading
    if cfg["model_kind"] == "cross_layer_transcoder":
        return _load_clt(folder, cfg, in_hook, out_hook, dtype)
    entries = cfg.get("transcoders")
    if entries:
        paths = [_local(folder, str(e)) for e in entries]
    else:
        paths = sorted(folder.glob("layer_*.safetensors"), key=lambda p: int(p.stem.split("_")[-1]))
    if not paths:
        raise FileNotFoundError(f"{folder}: config.yaml lists no transcoders and there is no layer_<i>.safetensors")
    layers = []
    for path in paths:
        weights = _npz(path) if path.suffix == ".npz" else read_tensors(path, _WEIGHTS)
        _need(weights, ["W_enc", "W_dec", "b_enc", "b_dec"], path, skip_allowed=True)
        layers.append(weights)
    first = layers[0]
    n_features, d_in = first["W_enc"].shape
    d_out = first["W_dec"].shape[1]
    if activation == "topk" or "k" in first:
        kind, k = "topk", int(k if k is not None else first["k"])
    elif "activation_function.threshold" in first:
        kind = "jumprelu"
    else:
        kind = "relu"
    normed = hook_site(in_hook, 0, output=False)[1]
    skips = ["W_skip" in w for w in layers]
    if any(skips) and not all(skips):
        raise FormatError(f"{folder}: layers {[i for i, s in enumerate(skips) if s]} have a skip connection (W_skip) "
                          f"and layers {[i for i, s in enumerate(skips) if not s]} do not; a set has it everywhere or nowhere")
    tc = Transcoder(d_in, d_out, n_features, [hook_site(in_hook, i, output=False)[0] for i in range(len(layers))],
                    [hook_site(out_hook, i, output=True)[0] for i in range(len(layers))], kind=kind,
                    k=k if kind == "topk" else None, normalized_input=normed, skip=all(skips),
                    metadata={"loaded_from": str(folder), "format": "circuit-tracer transcoder_set",
                              "scan": cfg.get("scan"), "model_name": cfg.get("model_name")}, dtype=dtype)
    with torch.no_grad():
        for i, (w, path) in enumerate(zip(layers, paths)):
            if tuple(w["W_enc"].shape) != (n_features, d_in) or tuple(w["W_dec"].shape) != (n_features, d_out):
                raise FormatError(f"{path}: W_enc {tuple(w['W_enc'].shape)} / W_dec {tuple(w['W_dec'].shape)} differ "
                                  f"from layer 0's [{n_features}, {d_in}] / [{n_features}, {d_out}]")
            tc.W_enc[i].copy_(w["W_enc"].T)
            tc.b_enc[i].copy_(w["b_enc"])
            tc.W_dec[i][:, 0].copy_(w["W_dec"])
            tc.b_dec[i].copy_(w["b_dec"])
            if tc.W_skip is not None:
                if tuple(w["W_skip"].shape) != (d_out, d_in):
                    raise FormatError(f"{path}: W_skip is {tuple(w['W_skip'].shape)}, expected [d_out, d_in] = "
                                      f"[{d_out}, {d_in}]")
                tc.W_skip[i].copy_(w["W_skip"])
            if kind == "jumprelu":
                tc.threshold[i].copy_(w["activation_function.threshold"].reshape(-1))
    return tc


def _load_clt(folder: Path, cfg: dict, in_hook: str, out_hook: str, dtype: torch.dtype) -> Transcoder:
    enc_files = sorted(folder.glob("W_enc_*.safetensors"), key=lambda p: int(p.stem.split("_")[-1]))
    n = len(enc_files)
    if n == 0:
        raise FileNotFoundError(f"{folder}: a cross-layer transcoder folder holds W_enc_<i>.safetensors files")
    encs = [read_tensors(p, _WEIGHTS) for p in enc_files]
    decs = []
    for i, p in enumerate(enc_files):
        _need(encs[i], [f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"], p)
        dec_path = folder / f"W_dec_{i}.safetensors"
        if not dec_path.is_file():
            raise FileNotFoundError(f"{folder}: {dec_path.name} is missing")
        dec = read_tensors(dec_path, _WEIGHTS)
        _need(dec, [f"W_dec_{i}"], dec_path)
        if tuple(dec[f"W_dec_{i}"].shape[1:2]) != (n - i,):
            raise FormatError(f"{dec_path}: W_dec_{i} {tuple(dec[f'W_dec_{i}'].shape)} should write {n - i} layers")
        decs.append(dec[f"W_dec_{i}"])
    n_features, d_in = encs[0]["W_enc_0"].shape
    d_out = decs[0].shape[-1]
    jump = "threshold_0" in encs[0]
    normed = hook_site(in_hook, 0, output=False)[1]
    tc = Transcoder(d_in, d_out, n_features, [hook_site(in_hook, i, output=False)[0] for i in range(n)],
                    [hook_site(out_hook, i, output=True)[0] for i in range(n)], cross_layer=True,
                    kind="jumprelu" if jump else "relu", normalized_input=normed,
                    metadata={"loaded_from": str(folder), "format": "circuit-tracer cross_layer_transcoder",
                              "scan": cfg.get("scan"), "model_name": cfg.get("model_name")}, dtype=dtype)
    with torch.no_grad():
        for i in range(n):
            tc.W_enc[i].copy_(encs[i][f"W_enc_{i}"].T)
            tc.b_enc[i].copy_(encs[i][f"b_enc_{i}"])
            tc.b_dec[i].copy_(encs[i][f"b_dec_{i}"])
            tc.W_dec[i].copy_(decs[i])
            if jump:
                tc.threshold[i].copy_(encs[i][f"threshold_{i}"].reshape(-1))
    return tc


def load_gemma_scope(paths: "list[str | Path]", *, input_hook: str = "ln2.hook_normalized",
                     output_hook: str = "hook_mlp_out", dtype: torch.dtype = torch.float32) -> Transcoder:
    """A per-layer JumpReLU transcoder from GemmaScope ``params.npz`` files, one per layer from 0."""
    layers = [_npz(Path(p)) for p in paths]
    n_features, d_in = layers[0]["W_enc"].shape
    d_out = layers[0]["W_dec"].shape[1]
    normed = hook_site(input_hook, 0, output=False)[1]
    tc = Transcoder(d_in, d_out, n_features, [hook_site(input_hook, i, output=False)[0] for i in range(len(paths))],
                    [hook_site(output_hook, i, output=True)[0] for i in range(len(paths))], kind="jumprelu",
                    normalized_input=normed, metadata={"format": "GemmaScope params.npz"}, dtype=dtype)
    with torch.no_grad():
        for i, w in enumerate(layers):
            tc.W_enc[i].copy_(w["W_enc"].T)
            tc.b_enc[i].copy_(w["b_enc"])
            tc.W_dec[i][:, 0].copy_(w["W_dec"])
            tc.b_dec[i].copy_(w["b_dec"])
            tc.threshold[i].copy_(w["activation_function.threshold"])
    return tc
