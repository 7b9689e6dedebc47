"""``crosspatch serve`` on image models, through the HTTP API of a running server: a VAE's
reconstruction and a CLIP model's image-text similarities under interventions sent as JSON.

Oracles computed without the engine: the VAE's PNG equals ``decode(mu + alpha * e_k)`` of the model
itself, quantised the same way and read back with Pillow; patching ``latent.z`` from image B gives
B's own reconstruction; CLIP's similarities equal ``logit_scale.exp() * cos(encode_image,
encode_text)``, steered through a forward hook on the residual block, and patching the last
block's residual from image B gives B's similarities."""

from __future__ import annotations

import base64
import io
import json
import urllib.request

import numpy as np
import pytest
import torch

pytest.importorskip("starlette", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")
pytest.importorskip("uvicorn", reason="crosspatch serve needs the serve extra (starlette, uvicorn)")

from test_serve import _events  # noqa: E402  (after the skips)
from test_serve import _post as post_text  # noqa: E402


def tiny_vae(seed: int = 0):
    """An untrained ConvVAE (4 latents) whose decoder weights are tripled, so a latent step shows in 8 bits."""
    from crosspatch.adapters.vae.models import ConvVAE

    torch.manual_seed(seed)
    vae = ConvVAE(4, (8, 8, 8), 32)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.startswith(("from_latent", "decoder")):
                p.mul_(3)
    return vae.eval()


def tiny_clip(seed: int = 0):
    """An untrained open_clip CLIP on 32x32 images (2 + 2 layers, width 32) with open_clip's own tokenizer
    (its vocabulary ships in the package) at context 12."""
    open_clip = pytest.importorskip("open_clip")

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=8, mlp_ratio=2),
        text_cfg=dict(context_length=12, vocab_size=49408, width=32, heads=4, layers=2, mlp_ratio=2),
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval(), open_clip.tokenizer.SimpleTokenizer(context_length=12)


def image_sessions():
    """``{"vae": VAESession, "clip": CLIPSession}`` over the tiny models."""
    import crosspatch as cp
    from crosspatch.serve.image_session import CLIPSession, VAESession, model_kind

    vae = cp.wrap(tiny_vae())
    clip_model, tokenizer = tiny_clip()
    clip = cp.wrap(clip_model, tokenizer=tokenizer)
    assert model_kind(vae) == "vae" and model_kind(clip) == "clip"
    return {"vae": VAESession(vae, "tiny-vae"), "clip": CLIPSession(clip, "tiny-clip")}


@pytest.fixture(scope="module")
def servers():
    from crosspatch.serve.server import start_in_thread

    sessions = image_sessions()
    running = {kind: start_in_thread(session) for kind, session in sessions.items()}
    yield {kind: (running[kind], sessions[kind]) for kind in sessions}
    for server in running.values():
        server.stop()


def _post(url, body):
    status, text = post_text(url, body)
    return status, json.loads(text)


def _get(url):
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read().decode()


def decode_png(url: str) -> np.ndarray:
    """A PNG data URL -> ``[H, W, 3]`` uint8, read by Pillow (not by the code that wrote it)."""
    from PIL import Image

    assert url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def quantised(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` floats -> ``[H, W, 3]`` uint8, rounded as 8-bit images are."""
    return (image.detach().double().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_png_round_trip():
    pytest.importorskip("PIL")
    from crosspatch.serve.images import png_data_url

    image = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(decode_png(png_data_url(image)), quantised(image))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        png_data_url(torch.rand(2, 4, 4))


def test_vae_reconstruction_under_steering_and_patching(servers):
    pytest.importorskip("PIL")
    server, session = servers["vae"]
    page = _get(server.url + "/")
    assert "the page of an image model" in page and "serve_features" not in page  # the image page's script, inlined
    info = json.loads(_get(server.url + "/api/info"))
    assert info["kind"] == "vae" and info["latent_dim"] == 4 and "latent.z" in info["sites"]
    assert len(info["gallery"]) == len(session.gallery) and {g["split"] for g in info["gallery"]} == {"train", "test"}
    assert [p["factor"] for p in info["pairs"]] == ["colour", "shape", "x", "scale"]
    for pair in info["pairs"]:  # each pair differs in its factor alone
        a, b = session.gallery.factors[pair["a"]], session.gallery.factors[pair["b"]]
        assert [k for k in a if a[k] != b[k]] == [pair["factor"]]

    vae = session.m.module
    a, b = session.gallery.image(0), session.gallery.image(3)
    with torch.no_grad():
        mu_a, mu_b = vae.encode(a)[0], vae.encode(b)[0]
        base = vae.decode(mu_a)[0]
    np.testing.assert_array_equal(decode_png(info["gallery"][0]["png"]), quantised(a[0]))

    axis = [0.0, 1.0, 0.0, 0.0]
    shown = {}
    for alpha in (0.5, 2.0):
        status, out = _post(server.url + "/api/image", {"image": 0, "interventions": [
            {"site": "latent.z", "intervention": {"kind": "add", "vector": axis, "alpha": alpha}}]})
        assert status == 200, out
        with torch.no_grad():
            expected = vae.decode(mu_a + alpha * torch.tensor(axis))[0]
        shown[alpha] = decode_png(out["output"])
        np.testing.assert_array_equal(shown[alpha], quantised(expected))
        np.testing.assert_array_equal(decode_png(out["base"]), quantised(base))
        np.testing.assert_array_equal(decode_png(out["input"]), quantised(a[0]))
        assert out["mean_abs_change"] == pytest.approx(float((expected - base).abs().mean()), rel=1e-5)
    assert (shown[0.5] != shown[2.0]).any()
    np.testing.assert_allclose(out["mu"], mu_a[0].tolist(), rtol=1e-6)

    # Patching the latent from image B decodes image B's latent: B's own reconstruction.
    status, out = _post(server.url + "/api/image", {"image": 0, "interventions": [
        {"site": "latent.z", "intervention": {"kind": "patch", "source": {"image": 3}}}]})
    with torch.no_grad():
        np.testing.assert_array_equal(decode_png(out["output"]), quantised(vae.decode(mu_b)[0]))

    # One latent from image B: decode A's latent with that coordinate replaced by B's.
    status, out = _post(server.url + "/api/image", {"image": 0, "interventions": [
        {"site": "latent.z[dim=2]", "intervention": {"kind": "patch", "source": {"image": 3}}}]})
    assert "latent.z[dim=2]" in info["patch_sites"]
    mixed = mu_a.clone()
    mixed[0, 2] = mu_b[0, 2]
    with torch.no_grad():
        np.testing.assert_array_equal(decode_png(out["output"]), quantised(vae.decode(mixed)[0]))

    # The contrast direction B - A at the latent, at alpha 1, lands on B's latent (to float rounding).
    status, job = _post(server.url + "/api/jobs", {"kind": "steering", "site": "latent.z", "image": 0, "toward": 3})
    assert status == 202
    vector = _wait(server, job["id"])
    np.testing.assert_allclose(vector["intervention"]["vector"], (mu_b - mu_a)[0].tolist(), rtol=1e-6, atol=1e-7)
    status, out = _post(server.url + "/api/image", {"image": 0, "interventions": [
        {"site": "latent.z", "intervention": vector["intervention"]}]})
    with torch.no_grad():
        b_recon = quantised(vae.decode(mu_b)[0]).astype(int)
    assert np.abs(decode_png(out["output"]).astype(int) - b_recon).max() <= 1


def _wait(server, job_id):
    jobs = server.server.config.app.state.jobs
    last = jobs.get(job_id).wait(60)
    assert last["event"] == "result", last
    return last["data"]


def test_clip_similarities_under_steering_and_patching(servers):
    server, session = servers["clip"]
    info = json.loads(_get(server.url + "/api/info"))
    assert info["kind"] == "clip" and "vision.resid_post.1" in info["sites"]
    captions = info["gallery"][2]["captions"]
    assert captions[0] == session.gallery.captions[2] and len(captions) == 1 + 5 + 3  # own, other colours, shapes

    model, tokenizer = session.m.module, session.m.tokenizer
    ids = tokenizer(captions)

    def similarities(image, hook=None):
        handle = model.visual.transformer.resblocks[1].register_forward_hook(hook) if hook else None
        try:
            with torch.no_grad():
                img = torch.nn.functional.normalize(model.encode_image(image), dim=-1)
                txt = torch.nn.functional.normalize(model.encode_text(ids), dim=-1)
                return (model.logit_scale.exp() * img @ txt.T)[0].double()
        finally:
            if handle is not None:
                handle.remove()

    a, b = session.gallery.image(2), session.gallery.image(5)
    status, out = _post(server.url + "/api/image", {"image": 2, "captions": captions})
    assert status == 200 and "patched" not in out
    np.testing.assert_allclose(out["base"], similarities(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["base_probs"], torch.softmax(similarities(a), -1), rtol=1e-5, atol=1e-6)

    # Steering the last block's residual toward image B: the same Add through a plain forward hook.
    status, job = _post(server.url + "/api/jobs", {"kind": "steering", "site": "vision.resid_post.1", "image": 2,
                                                   "toward": 5})
    vector = _wait(server, job["id"])
    v = torch.tensor(vector["intervention"]["vector"], dtype=torch.float32)
    assert v.shape == (32,)
    seen = {}
    for alpha in (1.5, -3.0):
        status, out = _post(server.url + "/api/image", {"image": 2, "captions": captions, "interventions": [
            {"site": "vision.resid_post.1", "intervention": {**vector["intervention"], "alpha": alpha}}]})
        expected = similarities(a, lambda module, args, output: output + alpha * v)
        np.testing.assert_allclose(out["patched"], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["base"], similarities(a), rtol=1e-5, atol=1e-5)
        seen[alpha] = out["patched"]
    assert np.abs(np.subtract(seen[1.5], seen[-3.0])).max() > 1e-3

    # Patching the last block's whole residual from image B: B's similarities.
    status, out = _post(server.url + "/api/image", {"image": 2, "captions": captions, "interventions": [
        {"site": "vision.resid_post.1", "intervention": {"kind": "patch", "source": {"image": 5}}}]})
    np.testing.assert_allclose(out["patched"], similarities(b), rtol=1e-5, atol=1e-5)
    assert float((similarities(a) - similarities(b)).abs().max()) > 1e-3  # so the patch did something
    # The class token alone is what the embedding pools: patching it there gives B's similarities too.
    assert "vision.resid_post.1[pos=0]" in info["patch_sites"]
    status, out = _post(server.url + "/api/image", {"image": 2, "captions": captions, "interventions": [
        {"site": "vision.resid_post.1[pos=0]", "intervention": {"kind": "patch", "source": {"image": 5}}}]})
    np.testing.assert_allclose(out["patched"], similarities(b), rtol=1e-5, atol=1e-5)
    status, out = _post(server.url + "/api/image", {"image": 2, "captions": captions, "interventions": [
        {"site": "vision.resid_post.1[pos=3]", "intervention": {"kind": "patch", "source": {"image": 5}}}]})
    np.testing.assert_allclose(out["patched"], similarities(a), rtol=1e-5, atol=1e-5)  # a patch token is not read


def _sweep(server, body):
    status, job = _post(server.url + "/api/jobs", {"kind": "sweep", **body})
    assert status == 202, job
    return _events(server.url + job["events"])


def test_image_sweeps_stream_and_measure_the_way_from_a_to_b(servers):
    # VAE, one latent at a time from B into A: 1 - |decode(z_A with z_k from B) - decode(z_B)|^2 / |decode(z_A) - decode(z_B)|^2
    server, session = servers["vae"]
    events = _sweep(server, {"image": 12, "toward": 13, "sites": "latent.z[dim=*]"})
    assert [e for e, _ in events] == ["queued", "started", "progress", "result"]
    shown = events[-1][1]["data"]["view"]["values"]
    vae = session.m.module
    with torch.no_grad():
        mu_a, mu_b = vae.encode(session.gallery.image(12))[0], vae.encode(session.gallery.image(13))[0]
        target = vae.decode(mu_b)
        gap = (vae.decode(mu_a) - target).double().pow(2).mean()
        expected = []
        for k in range(4):
            mixed = mu_a.clone()
            mixed[0, k] = mu_b[0, k]
            expected.append(float(1 - (vae.decode(mixed) - target).double().pow(2).mean() / gap))
    np.testing.assert_allclose(shown, expected, rtol=1e-5, atol=1e-7)
    assert "latent.z[dim=*]" in json.loads(_get(server.url + "/api/info"))["sweeps"]

    # CLIP, the residual after each block at each position, streamed one layer at a time: after the last
    # block only the class token is read, so patching it there is the whole way (1) and any other token none (0).
    server, session = servers["clip"]
    events = _sweep(server, {"image": 2, "toward": 5, "sites": "vision.resid_post.*[pos=*]"})
    assert [e for e, _ in events] == ["queued", "started", "progress", "progress", "result"]
    partial = events[2][1]["view"]["values"]
    assert all(v is not None for v in partial[0]) and all(v is None for v in partial[1])
    last = events[-1][1]["data"]["view"]["values"][1]
    np.testing.assert_allclose(last, [1.0] + [0.0] * 16, atol=1e-5)
    events = _sweep(server, {"image": 12, "toward": 13, "sites": "vision.attn_out.*",
                             "sweep_captions": ["a red square", "a red square"]})
    assert events[-1][0] == "error" and "compares two different captions" in events[-1][1]["message"]


def test_image_requests_say_what_is_wrong(servers):
    server, _ = servers["vae"]
    status, out = _post(server.url + "/api/image", {"image": 99})
    assert status == 400 and "image must be an index 0 .. 19" in out["error"]
    status, out = _post(server.url + "/api/image", {"image": 0, "interventions": [
        {"site": "latent.z", "intervention": {"kind": "fn", "fn": "print"}}]})
    assert status == 400 and "unknown intervention kind 'fn'" in out["error"]
    status, out = _post(server.url + "/api/predict", {"prompt": "a"})
    assert status == 400 and "/api/image" in out["error"]
    status, out = _post(server.url + "/api/study", {"sites": "latent.z"})
    assert status == 400 and "image must be an index 0 .. 19" in out["error"]
    status, out = _post(server.url + "/api/study", {"image": 0, "toward": 1, "sites": "latent.q[dim=*]"})
    assert status == 400 and "latent.q" in out["error"]
    server, _ = servers["clip"]
    status, out = _post(server.url + "/api/image", {"image": 0, "captions": []})
    assert status == 400 and "captions must be a non-empty list" in out["error"]


def test_spatial_latent_and_huggingface_clip():
    """A diffusers AutoencoderKL (latent [dim, h, w]) takes a latent axis as a [dim, 1, 1] vector, and its
    served reconstruction is decode(mu + alpha * e_k); a HuggingFace CLIPModel with open_clip's weights
    scores like the open_clip model (float rounding)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers import AutoencoderKL

    import crosspatch as cp
    from crosspatch.adapters.open_clip.convert import to_transformers
    from crosspatch.adapters.vae.zoo import KLRecipe, kl_config
    from crosspatch.serve.image_session import CLIPSession, VAESession
    from crosspatch.serve.images import png_data_url

    torch.manual_seed(0)
    vae = AutoencoderKL(**kl_config(KLRecipe(block_out_channels=(8, 16), latent_channels=4))).eval()
    session = VAESession(cp.wrap(vae), "kl")
    info = session.info()
    assert info["latent_dim"] == 4 and info["latent_spatial"] and "decoder.mid" in info["sites"]
    axis = [[[0.0]], [[1.0]], [[0.0]], [[0.0]]]
    out = session.image({"image": 0, "interventions": [
        {"site": "latent.z", "intervention": {"kind": "add", "vector": axis, "alpha": 2.0}}]})
    with torch.no_grad():
        mu = vae.encode(session.gallery.image(0)).latent_dist.mean
        expected = vae.decode(mu + 2.0 * torch.tensor(axis)).sample[0]
    assert out["output"] == png_data_url(expected) != out["base"]

    model, tokenizer = tiny_clip()
    ours = CLIPSession(cp.wrap(model, tokenizer=tokenizer), "open_clip")
    hf = CLIPSession(cp.wrap(to_transformers(model), tokenizer=tokenizer), "transformers")
    assert hf.sites() == ours.sites()
    vector = ours.steering({"site": "vision.resid_post.1", "image": 2, "toward": 5})["intervention"]
    request = {"image": 2, "interventions": [{"site": "vision.resid_post.1", "intervention": {**vector, "alpha": 2.0}}]}
    a, b = hf.image(request), ours.image(request)
    np.testing.assert_allclose(a["base"], b["base"], atol=1e-5)
    np.testing.assert_allclose(a["patched"], b["patched"], atol=1e-5)
    assert np.abs(np.subtract(b["patched"], b["base"])).max() > 1e-3
