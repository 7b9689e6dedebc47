"""A study file's contents as dataclasses, read with :mod:`tomllib` and written back as TOML.

Every key is checked when read: an unknown key, a wrong type or a missing value is a
:class:`StudyError` naming the file, the key and what it takes. The written form is normalised
(defaults filled in, paths absolute), so a report folder's ``study.toml`` runs the same study again.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["Analysis", "Inputs", "Study", "StudyError", "load_study", "parse_study", "METRICS", "TEXT_METRICS",
           "IMAGE_METRICS", "SPLITS"]

TEXT_METRICS = ("logit_diff", "probability", "kl")
#: Metrics of image studies (:mod:`crosspatch.study.images`): a VAE's closeness to image B's
#: reconstruction, a CLIP model's logit of B's caption minus A's.
IMAGE_METRICS = ("closeness", "caption_logit_diff")
METRICS = TEXT_METRICS + IMAGE_METRICS
SPLITS = ("train", "test")
SIDES = ("a", "b")


class StudyError(ValueError):
    """A study file that cannot be run as written (the message names the key and the right form)."""


@dataclass(frozen=True)
class Analysis:
    """One result of the study: a method, the sites it sweeps and its keyword options."""

    name: str
    method: str
    sites: str | list[str] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Inputs:
    """A task's counterfactual pairs (``task``, ``n``, ``split``) or prompts given in the file; or two
    images of an image task: ``image`` (A, the run patched into) and ``toward`` (B, the source), or a
    counterfactual ``pair`` (A its clean image, B its corrupt one), each a table naming a draw (see
    :mod:`crosspatch.study.images`), with ``captions`` (A's, B's) for a CLIP model."""

    task: str | None = None
    n: int = 16
    split: str = "test"
    clean: list[str] | None = None
    corrupt: list[str] | None = None
    answer: str | list[str] | None = None
    distractor: str | list[str] | None = None
    image: dict[str, Any] | None = None
    toward: dict[str, Any] | None = None
    pair: dict[str, Any] | None = None
    captions: list[str] | None = None

    @property
    def has_images(self) -> bool:
        return self.image is not None or self.pair is not None

    def images(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The draws of image A and image B."""
        if self.pair is not None:
            return {**self.pair, "side": "a"}, {**self.pair, "side": "b"}
        if self.image is None or self.toward is None:
            raise StudyError("[inputs] names no images: give image and toward, or pair")
        return self.image, self.toward


@dataclass(frozen=True)
class Study:
    model: str
    analyses: list[Analysis]
    inputs: Inputs = field(default_factory=Inputs)
    metric: str = "logit_diff"
    seed: int = 0
    model_seed: int = 0
    dtype: str | None = None
    title: str | None = None
    output: str | None = None
    pictures: bool = True  # PNGs in the report folder (the interactive page needs none)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_toml(self) -> str:
        """The study as TOML that :func:`parse_study` reads back to an equal Study."""
        lines = []
        for key in ("title", "model", "model_seed", "dtype", "metric", "seed", "output", "pictures"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{key} = {_toml(value)}")
        lines.append("")
        lines.append("[inputs]")
        for key, value in asdict(self.inputs).items():
            if value is not None and not (self.inputs.has_images and key in ("n", "split")):
                lines.append(f"{key} = {_toml(value)}")
        for analysis in self.analyses:
            lines += ["", "[[analysis]]", f"name = {_toml(analysis.name)}", f"method = {_toml(analysis.method)}"]
            if analysis.sites is not None:
                lines.append(f"sites = {_toml(analysis.sites)}")
            if analysis.options:
                lines.append("[analysis.options]")
                lines += [f"{_key(k)} = {_toml(v)}" for k, v in analysis.options.items()]
        return "\n".join(lines) + "\n"


def load_study(path: str | Path) -> Study:
    """Read a study file; a relative checkpoint folder or output is taken relative to the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "study.toml"
    if not path.is_file():
        raise StudyError(f"no study file {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{path}: not valid TOML: {exc}") from None
    return parse_study(data, path)


def parse_study(data: Mapping[str, Any], path: Path | None = None) -> Study:
    """A Study from TOML data (``path`` resolves relative model folders and outputs, and names errors)."""
    where = f"{path}: " if path else ""
    top = _Checked(data, where, "the study")
    model = top.get("model", str, required=True)
    base = path.parent if path else Path.cwd()
    if not Path(model).is_absolute() and (base / model).is_dir():
        model = str((base / model).resolve())
    output = top.get("output", str)
    if output is not None and not Path(output).is_absolute():
        output = str((base / output).resolve())
    seed = top.get("seed", int, 0)
    inputs = _inputs(top.get("inputs", dict, {}), where, seed)
    metric = top.get("metric", str, None if inputs.has_images else "logit_diff")
    allowed = IMAGE_METRICS if inputs.has_images else TEXT_METRICS
    if metric is None:
        raise StudyError(f"{where}a study of images needs a metric: {' or '.join(map(repr, IMAGE_METRICS))} "
                         f"(closeness to B's reconstruction for a VAE, B's caption minus A's for CLIP)")
    if metric not in allowed:
        if metric in METRICS:
            kind = "images" if inputs.has_images else "prompts"
            raise StudyError(f"{where}metric = {metric!r} is not for a study of {kind}; metrics: {', '.join(allowed)}")
        raise StudyError(f"{where}metric = {metric!r}; metrics: {', '.join(allowed)}")
    analyses = top.get("analysis", list, required=True)
    if not analyses:
        raise StudyError(f"{where}no [[analysis]] table: a study runs at least one method")
    parsed = [_analysis(a, i, where) for i, a in enumerate(analyses)]
    names = [a.name for a in parsed]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise StudyError(f"{where}two analyses are named {duplicate!r}; names become file names, make them unique")
    study = Study(
        model=model, analyses=parsed, inputs=inputs, metric=metric, seed=seed,
        model_seed=top.get("model_seed", int, 0), dtype=top.get("dtype", str), title=top.get("title", str),
        output=output, pictures=top.get("pictures", bool, True),
    )
    top.done()
    return study


def _inputs(data: Mapping[str, Any], where: str, seed: int) -> Inputs:
    t = _Checked(data, where, "[inputs]")
    texts = (str, list)
    inputs = Inputs(
        task=t.get("task", str), n=t.get("n", int, 16), split=t.get("split", str, "test"),
        clean=t.get("clean", list), corrupt=t.get("corrupt", list), answer=t.get("answer", texts),
        distractor=t.get("distractor", texts), image=t.get("image", dict), toward=t.get("toward", dict),
        pair=t.get("pair", dict), captions=t.get("captions", list),
    )
    given = {k for k in data}
    t.done()
    if inputs.image is not None or inputs.toward is not None or inputs.pair is not None:
        return _image_inputs(inputs, given, where, seed)
    if inputs.captions is not None:
        raise StudyError(f"{where}[inputs] captions go with images (image and toward, or pair)")
    if inputs.split not in SPLITS:
        raise StudyError(f"{where}[inputs] split = {inputs.split!r}; splits: {', '.join(SPLITS)}")
    if inputs.n < 1:
        raise StudyError(f"{where}[inputs] n = {inputs.n}; it counts prompt pairs, at least 1")
    if (inputs.clean is None) != (inputs.corrupt is None):
        raise StudyError(f"{where}[inputs] clean and corrupt come together (paired one by one)")
    if inputs.clean is not None:
        if inputs.task is not None:
            raise StudyError(f"{where}[inputs] gives both a task and prompts; give one")
        if len(inputs.clean) != len(inputs.corrupt) or not inputs.clean:
            raise StudyError(f"{where}[inputs] has {len(inputs.clean)} clean and {len(inputs.corrupt)} corrupt "
                             f"prompts; give the same number, at least one")
    return inputs


def _image_inputs(inputs: Inputs, given: set[str], where: str, seed: int) -> Inputs:
    """Check the image tables and fill in their defaults (split "train", the study's seed, n 1, index 0)."""
    text_keys = sorted(given & {"n", "split", "clean", "corrupt", "answer", "distractor"})
    if text_keys:
        raise StudyError(f"{where}[inputs] names images, and {text_keys} belong to text studies; an image's split, "
                         f"seed, n and index go in its table: image = {{ split = \"train\", n = 6, index = 2 }}")
    if inputs.pair is not None and (inputs.image is not None or inputs.toward is not None):
        raise StudyError(f"{where}[inputs] gives a pair and image/toward; give a pair (A and B its two images) or "
                         f"image (A) and toward (B)")
    if inputs.pair is None and (inputs.image is None or inputs.toward is None):
        raise StudyError(f"{where}[inputs] image (A, the run patched into) and toward (B, the source) come together")
    tables = {"pair": inputs.pair} if inputs.pair is not None else {"image": inputs.image, "toward": inputs.toward}
    checked = {name: _image(table, f"[inputs] {name}", where, seed, pair=name == "pair") for name, table in
               tables.items()}
    captions = inputs.captions
    if captions is not None and (len(captions) != 2 or not all(isinstance(c, str) and c.strip() for c in captions)
                                 or captions[0] == captions[1]):
        raise StudyError(f"{where}[inputs] captions = {captions!r}; give two different captions, A's then B's")
    return Inputs(task=inputs.task or "shapes", captions=captions, **checked)


def _image(data: Mapping[str, Any], table: str, where: str, seed: int, pair: bool) -> dict[str, Any]:
    t = _Checked(data, where, table)
    factor = t.get("factor", str)
    side = None if pair else t.get("side", str)
    out = {"factor": factor, "side": side, "split": t.get("split", str, "train"), "seed": t.get("seed", int, seed),
           "n": t.get("n", int, 1), "index": t.get("index", int, 0)}
    t.done()
    if out["split"] not in SPLITS:
        raise StudyError(f"{where}{table}: split = {out['split']!r}; splits: {', '.join(SPLITS)}")
    if out["n"] < 1 or not 0 <= out["index"] < out["n"]:
        raise StudyError(f"{where}{table}: index = {out['index']} of n = {out['n']} drawn; give 0 <= index < n")
    if pair and factor is None:
        raise StudyError(f"{where}{table} needs a factor: the one its two images differ in (\"colour\", \"shape\", ...)")
    if not pair and (factor is None) != (side is None):
        raise StudyError(f"{where}{table}: factor and side come together (side \"a\" or \"b\" of a pair that "
                         f"differs in factor)")
    if side is not None and side not in SIDES:
        raise StudyError(f"{where}{table}: side = {side!r}; a pair's sides are \"a\" (clean) and \"b\" (corrupt)")
    return {k: v for k, v in out.items() if v is not None}


def _analysis(data: Any, index: int, where: str) -> Analysis:
    if not isinstance(data, Mapping):
        raise StudyError(f"{where}[[analysis]] number {index + 1} is not a table")
    a = _Checked(data, where, f"[[analysis]] number {index + 1}")
    method = a.get("method", str, required=True)
    analysis = Analysis(name=a.get("name", str, method), method=method, sites=a.get("sites", (str, list)),
                        options=dict(a.get("options", dict, {})))
    a.done()
    return analysis


class _Checked:
    """Reads keys of one table with their types and refuses the keys nobody read."""

    def __init__(self, data: Mapping[str, Any], where: str, table: str):
        self.data, self.where, self.table, self.read = data, where, table, set()

    def get(self, key: str, kind: Any, default: Any = None, required: bool = False) -> Any:
        self.read.add(key)
        if key not in self.data:
            if required:
                raise StudyError(f"{self.where}{self.table} needs a key {key!r}")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise StudyError(f"{self.where}{self.table}: {key} = {value!r} should be a {names}")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise StudyError(f"{self.where}{self.table} has unknown keys {unknown}; it takes {sorted(self.read)}")


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml(value: Any) -> str:
    """A TOML value: strings as JSON strings (a subset of TOML's basic strings), lists, inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(str(k))} = {_toml(v)}" for k, v in value.items()) + " }"
    raise StudyError(f"{value!r} ({type(value).__name__}) cannot be written to a study file")
