"""The loaded model and what the page may ask of it: a sweep streamed layer by layer, the
next-token distribution under interventions given as JSON, a steering vector from two prompts.

Every request is plain data: prompts, site strings, method and metric names, and interventions as
``{"site": ..., "intervention": Intervention.to_dict()}``, rebuilt with
:func:`~crosspatch.engine.interventions.from_dict` (built-in kinds and those plugins register; a
Python function cannot arrive this way).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..engine.interventions import Intervention, from_dict
from ..methods.activation_patching import activation_patching
from ..methods.attribution import attribution_patching
from ..methods.steering import steering_vector
from ..results import metrics as _metrics
from ..results.html.views import view
from ..results.metrics import Metric
from ..results.result import Result
from ..sites.site import ANY, Site, SiteError
from ..study.spec import Analysis, Inputs, Study
from .features import Dictionary, feature_request, load_dictionary
from .jobs import Job

__all__ = ["Session", "RequestError", "METHODS", "METRICS", "stream_sweep", "cancellable"]

METHODS = ("activation_patching", "attribution_patching")
METRICS = ("logit_diff", "probability", "kl")
TOP_K = 10
#: Sweeps offered on the page for the families a model has (a person may type any other pattern).
SUGGESTED = ("resid_pre.*[pos=*]", "head_out.*[head=*]", "attn_out.*[pos=*]", "mlp_out.*[pos=*]",
             "resid_post.*[pos=*]", "head_out.*[pos=*,head=*]")


class RequestError(ValueError):
    """A request the page sent that cannot be run (the message says what to change)."""


@dataclass
class Prompts:
    clean: str
    corrupt: str
    answer: str | None
    distractor: str | None


class Session:
    """One wrapped model with a tokenizer, shared by every tab; only the job worker runs it."""

    kind = "text"
    dtype: str | None = None  # the dtype the model was loaded in, when not its own (a study file names it)

    def __init__(self, model: Any, name: str, examples: "Sequence[Mapping[str, str]] | Mapping[str, str] | None" = None,
                 features: "Sequence[Dictionary]" = (), model_seed: int = 0):
        if model.tokenizer is None:
            raise RequestError(f"model {name!r} has no tokenizer; the explorer takes text prompts")
        if "logits" not in model.catalog.families:
            raise RequestError(f"model {name!r} ({type(model.module).__name__}) has no 'logits' output; the explorer "
                               f"shows next-token distributions, so it serves models with a language-model head")
        self.m = model
        self.name = name
        if isinstance(examples, Mapping):
            examples = [examples]
        # Prompt pairs the page offers (clean, corrupt, answer, distractor); it starts with the first.
        self.examples = [dict(e) for e in (examples or [])]
        self.example = self.examples[0] if self.examples else {}
        # SAEs and transcoders the feature picker offers, by name
        self.dictionaries: dict[str, Dictionary] = {d.name: d for d in features}
        self.model_seed = model_seed  # the zoo build the model is (a study file names it)

    # ---------------------------------------------------------------- describing

    def info(self) -> dict[str, Any]:
        families = self.m.catalog.families
        suggested = [s for s in SUGGESTED if Site.parse(s).family in families]
        steer = [f for f in ("resid_pre", "resid_post", "resid_mid", "attn_out", "mlp_out") if f in families]
        layers = max((fam.layers or 0 for fam in families.values()), default=0)
        return {"kind": self.kind, "model": self.name, "describe": self.m.describe(), "families": sorted(families),
                "sweeps": suggested, "steer_families": steer, "layers": layers, "methods": list(METHODS),
                "metrics": list(METRICS), "example": self.example, "examples": self.examples,
                "features": [d.describe() for d in self.dictionaries.values()]}

    def tokens(self, text: str) -> list[str]:
        return self.m.to_str_tokens(text)

    # ---------------------------------------------------------------- sweeps

    def sweep(self, job: Job, request: Mapping[str, Any]) -> dict[str, Any]:
        """Patch every site of the pattern, one layer per step, emitting the partial result each step."""
        prompts = self._prompts(request, need_pair=True)
        method = _choice(request.get("method", "activation_patching"), METHODS, "method")
        pattern = str(request.get("sites") or "")
        try:
            sizes = self.m.adapter.sizes(self.m.prepare(prompts.clean))
            self.m.catalog.expand(pattern, sizes)
        except SiteError as exc:
            raise RequestError(str(exc).splitlines()[0]) from None
        metric = cancellable(self._metric(request, prompts), job)
        options = {"normalize": bool(request.get("normalize", True))}
        if method == "activation_patching":
            options["direction"] = _choice(request.get("direction", "denoising"), ("denoising", "noising"), "direction")
        run = activation_patching if method == "activation_patching" else attribution_patching
        if method == "activation_patching":
            options["progress"] = False

        return stream_sweep(job, self.m, pattern, lambda one: run(self.m, prompts.clean, prompts.corrupt, one, metric,
                                                               **options))

    def study(self, request: Mapping[str, Any]) -> Study:
        """The sweep ``request`` asks for as a study file: prompts, answers, metric, method, sites and a
        noising sweep's direction."""
        method = _choice(request.get("method", "activation_patching"), METHODS, "method")
        options: dict[str, Any] = {"normalize": bool(request.get("normalize", True))}
        if method == "activation_patching" and request.get("direction"):
            options["direction"] = str(request["direction"])
        return Study(
            model=self.name, model_seed=self.model_seed, dtype=self.dtype, metric=_choice(request.get("metric", "logit_diff"), METRICS,
                                                                        "metric"),
            title=str(request.get("title") or "Study saved from crosspatch serve"),
            inputs=Inputs(clean=[str(request.get("clean", ""))], corrupt=[str(request.get("corrupt", ""))],
                          answer=request.get("answer") or None, distractor=request.get("distractor") or None),
            analyses=[Analysis(name="sweep", method=method, sites=str(request.get("sites", "")), options=options)],
        )

    # ---------------------------------------------------------------- next token

    def predict(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """The next-token distribution of ``prompt`` with and without ``interventions``."""
        prompt = _text(request, "prompt")
        interventions = parse_interventions(request.get("interventions", []))
        k = int(request.get("k", TOP_K))
        base = self._distribution(prompt, {})
        out = {"prompt": prompt, "tokens": self.tokens(prompt), "base": _top(base, self.m, k)}
        if interventions:
            changed = self._distribution(prompt, interventions)
            out["patched"] = _top(changed, self.m, k)
            watch = [t for t in (request.get("answer"), request.get("distractor")) if t]
            out["watch"] = [{"token": t, "base": float(base[self.m.token_id(t)]),
                             "patched": float(changed[self.m.token_id(t)])} for t in watch]
        return out

    def _distribution(self, prompt: str, interventions: Mapping[str, Intervention]) -> torch.Tensor:
        with torch.inference_mode():
            run = self.m.run(prompt, dict(interventions))
            return torch.softmax(run.output[0, -1].double(), dim=-1)

    # ---------------------------------------------------------------- steering

    def steering(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``Add(clean mean - corrupt mean at site)`` as its JSON, ready for the strength slider."""
        prompts = self._prompts(request, need_pair=True)
        site = str(request.get("site") or "")
        try:
            vector = steering_vector(self.m, prompts.clean, prompts.corrupt, site)
        except (SiteError, KeyError) as exc:
            raise RequestError(str(exc).splitlines()[0]) from None
        return {"site": site, "intervention": {"kind": "add", "vector": vector.double().tolist(), "alpha": 1.0},
                "norm": float(vector.double().norm())}

    # ---------------------------------------------------------------- SAE and transcoder features

    def feature(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Feature ``feature`` of ``source`` in ``dictionary``: its steering interventions (``Add`` of its
        decoder row at each site it writes, ``alpha`` 1) and its activation at each token of ``prompt``."""
        name = request.get("dictionary")
        dictionary = self.dictionaries.get(name)  # type: ignore[arg-type]
        if dictionary is None:
            known = ", ".join(self.dictionaries) or "none loaded: load an SAE or transcoder folder first"
            raise RequestError(f"dictionary {name!r} is not one of {known}")
        prompt = request.get("prompt") or None
        if prompt is not None and not isinstance(prompt, str):
            raise RequestError("prompt must be a text")
        try:
            return feature_request(dictionary, self.m, request.get("source", 0), request.get("feature"), prompt,
                                   self.tokens(prompt) if prompt else None)
        except (SiteError, KeyError, ValueError) as exc:
            raise RequestError(" ".join(str(exc).split())) from None

    def load_dictionary(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Load an SAE or transcoder folder named by ``path``; the page's picker then offers it."""
        path = _text(request, "path")
        try:
            dictionary = load_dictionary(path)
        except (OSError, ValueError) as exc:
            raise RequestError(" ".join(str(exc).split())) from None
        self.dictionaries[dictionary.name] = dictionary
        return dictionary.describe()

    # ---------------------------------------------------------------- pieces

    def _prompts(self, request: Mapping[str, Any], need_pair: bool) -> Prompts:
        clean = _text(request, "clean")
        corrupt = _text(request, "corrupt") if need_pair else str(request.get("corrupt") or "")
        if need_pair:
            a, b = self.tokens(clean), self.tokens(corrupt)
            if len(a) != len(b):
                raise RequestError(f"the clean and corrupt prompts are {len(a)} and {len(b)} tokens ({a} vs {b}); "
                                   f"patching pairs positions, so make them the same length")
        return Prompts(clean, corrupt, request.get("answer") or None, request.get("distractor") or None)

    def _metric(self, request: Mapping[str, Any], prompts: Prompts) -> Metric:
        name = _choice(request.get("metric", "logit_diff"), METRICS, "metric")
        if name == "kl":
            return _metrics.kl_to_clean()
        if prompts.answer is None:
            raise RequestError(f"metric {name} needs an answer token (e.g. ' Mary')")
        if name == "probability":
            return _metrics.probability(prompts.answer).resolve(self.m.token_id)
        if prompts.distractor is None:
            raise RequestError("metric logit_diff needs a distractor token (e.g. ' John')")
        return _metrics.logit_diff(prompts.answer, prompts.distractor).resolve(self.m.token_id)


def stream_sweep(job: Job, m: Any, pattern: str, run: "Callable[[str], Result]") -> dict[str, Any]:
    """``run(pattern)`` over the sites of ``pattern``, one layer per step when it spans the family's
    layers, emitting the partial result after each step; the final view and the Result's JSON document."""
    site = Site.parse(pattern)
    family = m.catalog.family(site.family)
    if site.layer != ANY or not family.layers:  # one step
        job.emit("progress", done=0, total=1)
        result = run(pattern)
        return {"view": view(result, pattern), "result": _document(result)}
    layers = list(range(family.layers))
    parts: list[Result] = []
    for layer in layers:
        job.check()
        parts.append(run(str(Site(site.family, layer, site.sel))))
        partial = _stack(parts, layers, pattern)
        job.emit("progress", done=layer + 1, total=len(layers), view=view(partial, pattern))
    result = _stack(parts, layers, pattern)
    return {"view": view(result, pattern), "result": _document(result)}


def parse_interventions(items: Any) -> dict[str, Intervention]:
    """``[{"site": "...", "intervention": {...}}]`` -> ``{site: Intervention}``, each rebuilt with from_dict."""
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise RequestError("interventions must be a list of {site, intervention} objects")
    out: dict[str, Intervention] = {}
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("site"), str) or not isinstance(
                item.get("intervention"), Mapping):
            raise RequestError(f"an intervention must be {{\"site\": str, \"intervention\": {{\"kind\": ...}}}}, got "
                               f"{str(item)[:120]}")
        try:
            out[item["site"]] = from_dict(item["intervention"])
        except (TypeError, ValueError) as exc:
            raise RequestError(f"intervention at {item['site']}: {exc}") from None
    return out


def cancellable(metric: Metric, job: Job) -> Metric:
    """The metric, checking for cancellation each time a forward's output reaches it."""
    fn = metric.fn

    def checked(output, ctx):
        job.check()
        return fn(output, ctx)

    return dataclasses.replace(metric, fn=checked)


def _stack(parts: list[Result], layers: list[int], name: str) -> Result:
    """Per-layer Results stacked on a ``layer`` dim; layers not run yet are NaN."""
    first = parts[0]
    values = np.full((len(layers), *first.values.shape), np.nan)
    for i, part in enumerate(parts):
        values[i] = part.values
    skipped = None
    if first.skipped is not None:
        skipped = np.zeros(values.shape, dtype=bool)
        for i, part in enumerate(parts):
            skipped[i] = part.skipped
    meta = {**first.metadata, "sites": name, "layers_done": len(parts)}
    return Result(values, ("layer", *first.dims), {"layer": layers, **first.coords}, meta, skipped)


def _document(result: Result) -> dict[str, Any]:
    """The Result as its saved JSON document, for the page's download button."""
    import json
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = result.save(Path(tmp) / "result.json")
        return json.loads(path.read_text(encoding="utf-8"))


def _top(probs: torch.Tensor, m: Any, k: int) -> list[dict[str, Any]]:
    values, ids = probs.topk(min(k, probs.numel()))
    tokenizer = m.tokenizer
    return [{"token": tokenizer.decode([int(i)]), "id": int(i), "p": float(v)} for v, i in zip(values, ids)]


def _text(request: Mapping[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{key} must be a non-empty text")
    return value


def _choice(value: Any, allowed: Sequence[str], what: str) -> str:
    if value not in allowed:
        raise RequestError(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return str(value)
