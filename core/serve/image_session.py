"""Image models on the page: a VAE's reconstruction and a CLIP model's image-text similarities,
under interventions sent as JSON, on images of the ``shapes`` task.

A request names a gallery image by index. An intervention whose ``source`` is ``{"image": k}``
(a :class:`~crosspatch.engine.interventions.Patch` from another gallery image) gets that image's
tensor as its source before it is rebuilt with
:func:`~crosspatch.engine.interventions.from_dict`; everything else is the intervention's
``to_dict`` JSON as for text models. The VAE's output travels as a PNG data URL (8-bit, what the
page draws); CLIP's as the similarity numbers, ``logit_scale * cos(image, caption)`` as the model
scores them, and their softmax over the captions. A sweep saves as a study file of two images
(:mod:`crosspatch.study.images`: each named by how the task draws it, the same metric code).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Sequence

import torch

from ..methods.activation_patching import activation_patching
from ..methods.steering import steering_vector
from ..results.metrics import Metric
from ..sites.site import Site, SiteError
from ..study.images import caption_ids, image_metric, model_kind
from ..study.spec import Analysis, Inputs, Study
from .images import Gallery, png_data_url, shapes_gallery
from .session import RequestError, cancellable, parse_interventions, stream_sweep

__all__ = ["ImageSession", "VAESession", "CLIPSession", "model_kind"]

#: Families a VAE panel offers to patch and steer (the ones the model has), in model order.
VAE_FAMILIES = ("encoder.block", "encoder.mid", "latent.mu", "latent.z", "decoder.mid", "decoder.block")
#: Vision-tower families a CLIP panel offers.
CLIP_FAMILIES = ("vision.resid_pre", "vision.attn_out", "vision.mlp_out", "vision.resid_post")
MAX_CAPTIONS = 32


class ImageSession:
    """What the VAE and CLIP panels share: the gallery, interventions with image sources, sites."""

    kind = "image"
    metric = ""  # the study metric of the model's sweeps (crosspatch.study.images)
    dtype: str | None = None  # the dtype the model was loaded in, when not its own (a study file names it)
    families: tuple[str, ...] = ()
    sweeps: tuple[str, ...] = ()

    def __init__(self, model: Any, name: str, gallery: Gallery | None = None, model_seed: int = 0):
        self.m = model
        self.name = name
        self.gallery = gallery if gallery is not None else shapes_gallery()
        self.model_seed = model_seed  # the zoo build the model is (a study file names it)

    def sites(self) -> list[str]:
        """Concrete family-and-layer sites the panels offer."""
        out = []
        for family in self.families:
            fam = self.m.catalog.families.get(family)
            if fam is None:
                continue
            out += [f"{family}.{layer}" for layer in range(fam.layers)] if fam.layers else [family]
        return out

    def patch_sites(self) -> list[str]:
        """Sites the patch field suggests: the offered sites, then finer ones (any other site may be typed)."""
        return self.sites()

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.name, "describe": self.m.describe(),
                "families": sorted(self.m.catalog.families), "sites": self.sites(),
                "patch_sites": self.patch_sites(), "sweeps": self.suggested_sweeps(), "gallery": self.gallery.describe(),
                "pairs": self.gallery.pairs}

    def tokens(self, text: str) -> list[str]:
        raise RequestError(f"model {self.name!r} takes images; it has no text prompt to split into tokens")

    def sweep(self, job: Any, request: Mapping[str, Any]) -> dict[str, Any]:
        """Patch each site of the pattern from image ``toward`` (B) into image ``image``'s (A's) run, one
        layer per step; the metric normalised so that 1 is the whole way from A's output to B's."""
        a, b = self._image(request.get("image")), self._image(request.get("toward"))
        pattern = str(request.get("sites") or "")
        clean, corrupt = self._sweep_inputs(b, request), self._sweep_inputs(a, request)
        self._check_pattern(pattern, corrupt)
        metric = cancellable(self._sweep_metric(request, b), job)
        return stream_sweep(job, self.m, pattern, lambda one: activation_patching(
            self.m, clean, corrupt, one, metric, normalize=True, progress=False))

    def study(self, request: Mapping[str, Any]) -> Study:
        """The sweep ``request`` asks for as a study file: the two images named by how the task draws
        them (a gallery pair as ``pair``), the pattern, and this model's image metric."""
        try:
            a, b = self.gallery.origin(request.get("image")), self.gallery.origin(request.get("toward"))
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        pattern = str(request.get("sites") or "")
        self._check_pattern(pattern, self._sweep_inputs(self._image(request.get("image")), request))
        if a.get("factor") is not None and a.get("side") == "a" and {**a, "side": "b"} == b:
            inputs = Inputs(task=self.gallery.task, pair={k: v for k, v in a.items() if k != "side"})
        else:
            inputs = Inputs(task=self.gallery.task, image=a, toward=b)
        if self.kind == "clip":
            inputs = dataclasses.replace(inputs, captions=self._sweep_captions(request))
        return Study(model=self.name, model_seed=self.model_seed, dtype=self.dtype, metric=self.metric,
                     title=str(request.get("title") or "Study saved from crosspatch serve"), inputs=inputs,
                     analyses=[Analysis(name="sweep", method="activation_patching", sites=pattern,
                                        options={"normalize": True})])

    def _check_pattern(self, pattern: str, inputs: Any) -> None:
        try:
            self.m.catalog.expand(pattern, self.m.adapter.sizes(self.m.prepare(inputs)))
        except SiteError as exc:
            raise RequestError(str(exc).splitlines()[0]) from None

    def suggested_sweeps(self) -> list[str]:
        return [p for p in self.sweeps if Site.parse(p).family in self.m.catalog.families]

    def _sweep_inputs(self, image: torch.Tensor, request: Mapping[str, Any]) -> Any:
        return self._inputs(image)

    def _sweep_metric(self, request: Mapping[str, Any], toward: torch.Tensor) -> Metric:
        """The study's image metric of this model (the same code, so a saved study computes the same bits)."""
        return image_metric(self.metric, self.m, self._sweep_inputs(toward, request))

    def predict(self, request: Mapping[str, Any]) -> dict[str, Any]:
        raise RequestError(f"{self.name!r} is a {self.kind} model: POST /api/image with an image index instead")

    def interventions(self, items: Any) -> dict[str, Any]:
        """``[{site, intervention}]`` with gallery sources resolved, rebuilt with from_dict."""
        if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
            raise RequestError("interventions must be a list of {site, intervention} objects")
        resolved = []
        for item in items:
            item = copy.deepcopy(item)
            spec = item.get("intervention") if isinstance(item, Mapping) else None
            source = spec.get("source") if isinstance(spec, Mapping) else None
            if isinstance(source, Mapping) and set(source) == {"image"}:
                spec["source"] = self._inputs(self._image(source["image"]))
            resolved.append(item)
        return parse_interventions(resolved)

    def steering(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``Add(mean activation of image "toward" - of image "image")`` at ``site``, as its JSON."""
        site = str(request.get("site") or "")
        toward, base = self._image(request.get("toward")), self._image(request.get("image"))
        try:
            vector = steering_vector(self.m, self._inputs(toward), self._inputs(base), site)
        except (SiteError, KeyError, ValueError) as exc:
            raise RequestError(str(exc).splitlines()[0]) from None
        return {"site": site, "intervention": {"kind": "add", "vector": vector.double().tolist(), "alpha": 1.0},
                "norm": float(vector.double().norm())}

    def _image(self, index: Any) -> torch.Tensor:
        try:
            return self.gallery.image(index)
        except ValueError as exc:
            raise RequestError(str(exc)) from None

    def _inputs(self, image: torch.Tensor) -> Any:
        return {"images": image}

    def _run(self, inputs: Any, interventions: Mapping[str, Any]):
        try:
            with torch.inference_mode():
                return self.m.run(inputs, dict(interventions))
        except SiteError as exc:
            raise RequestError(str(exc).splitlines()[0]) from None


class VAESession(ImageSession):
    """A VAE: the reconstruction of a gallery image, with and without interventions."""

    kind = "vae"
    metric = "closeness"  # minus the mean squared distance to image B's reconstruction
    families = VAE_FAMILIES
    sweeps = ("latent.z[dim=*]", "latent.mu[dim=*]", "encoder.block.*", "decoder.block.*")

    def patch_sites(self) -> list[str]:
        dim = self._latent_dim()
        return [*self.sites(), *(f"latent.z[dim={k}]" for k in range(dim or 0))]

    def _latent_dim(self) -> int | None:
        latent = self.m.catalog.family("latent.z")
        return next((a.size for a in latent.axes if a.name == "dim"), None)

    def info(self) -> dict[str, Any]:
        latent = self.m.catalog.family("latent.z")
        dim = self._latent_dim()
        # a spatial latent ([dim, h, w]) takes a latent axis as a [dim, 1, 1] vector, added at every h and w
        spatial = any(a.name in ("h", "w") for a in latent.axes)
        return {**super().info(), "latent_dim": dim, "latent_site": "latent.z", "latent_spatial": spatial}

    def image(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Image ``request["image"]``: the input, its reconstruction, and the one under the interventions."""
        index = request.get("image")
        x = self._image(index)
        interventions = self.interventions(request.get("interventions", []))
        base = self._run(self._inputs(x), {})
        out: dict[str, Any] = {"image": index, "caption": self.gallery.captions[index], "input": png_data_url(x[0]),
                               "base": png_data_url(base.output[0])}
        mu = getattr(base.raw, "mu", None)
        if mu is not None and mu.ndim == 2:
            out["mu"] = [float(v) for v in mu[0].double()]
        if interventions:
            changed = self._run(self._inputs(x), interventions)
            out["output"] = png_data_url(changed.output[0])
            out["mean_abs_change"] = float((changed.output[0] - base.output[0]).double().abs().mean())
        return out


class CLIPSession(ImageSession):
    """A CLIP-style model: a gallery image scored against captions, with and without interventions."""

    kind = "clip"
    metric = "caption_logit_diff"  # logit(image, B's caption) - logit(image, A's caption)
    families = CLIP_FAMILIES
    sweeps = ("vision.resid_pre.*[pos=*]", "vision.resid_post.*[pos=*]", "vision.attn_out.*", "vision.mlp_out.*",
              "vision.head_out.*[head=*]")

    def _sweep_inputs(self, image: torch.Tensor, request: Mapping[str, Any]) -> Any:
        return {"images": image, "texts": self.texts(self._sweep_captions(request))}

    def _sweep_captions(self, request: Mapping[str, Any]) -> list[str]:
        """Image A's caption and image B's (the two the metric compares), unless the request names two."""
        captions = request.get("sweep_captions") or [self.gallery.captions[request["image"]],
                                                     self.gallery.captions[request["toward"]]]
        if len(captions) != 2 or captions[0] == captions[1]:
            raise RequestError(f"a CLIP sweep compares two different captions (A's and B's); got {captions}: pick "
                               f"images whose captions differ")
        return list(captions)

    def __init__(self, model: Any, name: str, gallery: Gallery | None = None, model_seed: int = 0):
        if model.tokenizer is None:
            raise RequestError(f"model {name!r} has no tokenizer; the CLIP panel scores images against typed captions")
        super().__init__(model, name, gallery, model_seed)

    def sites(self) -> list[str]:
        return [*super().sites(), "image_embed"]

    def patch_sites(self) -> list[str]:
        """The offered sites, then each vision block's residual at the class token (what the embedding pools)."""
        fam = self.m.catalog.families.get("vision.resid_post")
        return [*self.sites(), *(f"vision.resid_post.{layer}[pos=0]" for layer in range(fam.layers if fam else 0))]

    def info(self) -> dict[str, Any]:
        info = super().info()
        for entry in info["gallery"]:
            entry["captions"] = self.captions_for(entry["index"])
        return info

    def captions_for(self, index: int) -> list[str]:
        """The image's own caption, then the same caption with each other colour and each other shape."""
        from ..zoo.tasks import get_task

        if not self.gallery.factors:
            return [self.gallery.captions[index]]
        task = get_task("shapes")
        factors = self.gallery.factors[index]
        out = [self.gallery.captions[index]]
        for name in ("colour", "shape"):
            for value in range(len(task.values[name])):
                if value != factors[name]:
                    varied = {k: torch.tensor([v]) for k, v in factors.items()}
                    varied[name] = torch.tensor([value])
                    out += task.caption(varied)
        return out

    def texts(self, captions: Any) -> torch.Tensor:
        """Token ids ``[n, context]`` of the captions with the model's tokenizer (open_clip or HuggingFace)."""
        if (not isinstance(captions, Sequence) or isinstance(captions, (str, bytes)) or not captions
                or not all(isinstance(c, str) and c.strip() for c in captions)):
            raise RequestError("captions must be a non-empty list of non-empty texts")
        if len(captions) > MAX_CAPTIONS:
            raise RequestError(f"at most {MAX_CAPTIONS} captions at a time, got {len(captions)}")
        return caption_ids(self.m, captions)

    def image(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Similarities of image ``request["image"]`` to ``request["captions"]``, with and without interventions."""
        index = request.get("image")
        x = self._image(index)
        captions = request.get("captions")
        if captions is None:
            captions = self.captions_for(index)
        texts = self.texts(captions)
        captions = list(captions)
        interventions = self.interventions(request.get("interventions", []))
        inputs = {"images": x, "texts": texts}
        base = self._run(inputs, {}).output[0].double()
        out: dict[str, Any] = {"image": index, "input": png_data_url(x[0]), "captions": captions,
                               "base": base.tolist(), "base_probs": torch.softmax(base, -1).tolist()}
        if interventions:
            changed = self._run(inputs, interventions).output[0].double()
            out["patched"] = changed.tolist()
            out["patched_probs"] = torch.softmax(changed, -1).tolist()
        return out
