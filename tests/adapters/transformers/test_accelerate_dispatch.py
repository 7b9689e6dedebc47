"""Models dispatched by accelerate (device_map, disk and CPU offload) give what the same weights give
undispatched: every site family, every intervention, sweeps and gradients; accelerate's hooks stay,
ours go. A second "device" is simulated with ``meta`` (it holds shapes, not values), which catches
tensors that meet on the wrong device the way a multi-GPU map would, on a machine without GPUs."""

from __future__ import annotations

import pytest
import torch

import accelerate  # the `sharded` extra, part of `all`, which `make test` installs
import crosspatch as cp
from crosspatch.engine.adapter import model_device
from crosspatch.engine.interventions import ApplyContext
from crosspatch.engine.offload import is_offloaded, onloaded

from conftest import randomize, tiny_gpt2, tiny_llama, tiny_neox

TOL = dict(atol=1e-5, rtol=1e-5)


def _gpt2_from_pretrained(tmp):
    """GPT-2 saved and loaded back with a device_map: block 1 lives on disk (offload_folder)."""
    from transformers import AutoModelForCausalLM

    reference = randomize(tiny_gpt2())
    reference.save_pretrained(tmp / "gpt2")
    device_map = {
        "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
        "transformer.h.1": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(tmp / "gpt2", device_map=device_map, offload_folder=tmp / "gpt2-off")
    return reference, model.eval(), 1


def _llama_dispatched(tmp):
    """Llama (grouped-query attention) through accelerate.dispatch_model: block 0 on disk, buffers offloaded too."""
    reference = randomize(tiny_llama())
    model = randomize(tiny_llama())
    device_map = {
        "model.embed_tokens": "cpu", "model.layers.0": "disk", "model.layers.1": "cpu", "model.norm": "cpu",
        "model.rotary_emb": "cpu", "lm_head": "cpu",
    }
    model = accelerate.dispatch_model(model, device_map, offload_dir=str(tmp / "llama-off"), offload_buffers=True)
    return reference, model, 0


def _neox_cpu_offloaded(tmp):
    """GPT-NeoX with accelerate.cpu_offload: every weight waits in a CPU state dict, ``meta`` in the model."""
    reference = randomize(tiny_neox())
    model = randomize(tiny_neox())
    accelerate.cpu_offload(model, execution_device="cpu", offload_buffers=True)
    return reference, model, 1


BUILDERS = {"gpt2-disk": _gpt2_from_pretrained, "llama-disk": _llama_dispatched, "neox-cpu-offload": _neox_cpu_offloaded}


@pytest.fixture(scope="module", params=list(BUILDERS))
def dispatched(request, tmp_path_factory):
    reference, model, layer = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    return cp.wrap(reference), cp.wrap(model), layer


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(2, 100, (3, 6), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (clean[:, 2] + 11) % 98 + 2
    return clean, corrupt


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_backward_hooks")


def hook_state(module):
    return {name: {a: list(getattr(sub, a, {})) for a in HOOK_DICTS} for name, sub in module.named_modules()}


def _pattern(fam):
    return f"{fam.name}.*" if fam.layers else fam.name


# ---------------------------------------------------------------- accelerate really is in charge


def test_the_models_are_dispatched_with_accelerate_hooks_and_offloaded_weights(dispatched):
    reference, model, layer = dispatched
    modules = dict(model.module.named_modules())
    assert all(hasattr(m, "_hf_hook") for m in modules.values() if next(m.parameters(recurse=False), None) is not None)
    offloaded = [name for name, m in modules.items() if is_offloaded(m)]
    assert any(f".{layer}." in name for name in offloaded), offloaded
    assert any(p.device.type == "meta" for p in model.module.parameters())
    assert model.device == torch.device("cpu")  # the embedding's execution device, never meta
    assert model.prepare(torch.tensor([[3, 4]]))["input_ids"].device == torch.device("cpu")


# ---------------------------------------------------------------- captures


def test_every_site_family_captures_what_the_undispatched_model_gives(dispatched, prompts):
    reference, model, _ = dispatched
    clean, _ = prompts
    patterns = [_pattern(fam) for fam in model.catalog]
    got, want = model.capture(clean, patterns), reference.capture(clean, patterns)
    assert sorted(got) == sorted(want) and len(got) > 10
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=key)
    assert all(p.device.type == "meta" for m in model.module.modules() if is_offloaded(m) for p in m.parameters(recurse=False))


# ---------------------------------------------------------------- interventions


def _sites(catalog, layer):
    sites = [
        f"resid_pre.{layer}[pos=2]", f"head_out.{layer}[head=1]", f"attn_pattern.{layer}[head=0]",
        f"mlp_act.{layer}[neuron={{3,5}}]", f"attn_out.{layer}", f"mlp_out.{layer}[pos=1]",
        f"head_out.{layer}[pos={{1,3}},head={{0,2}}]",
    ]
    if "head_in" in catalog:
        sites.append(f"head_in.{layer}[qkv=1,head=2]")
    if "resid_mid" in catalog:  # GPT-NeoX's parallel residual has head_in but no resid_mid
        sites.append(f"resid_mid.{layer}[pos=4]")
    return sites


def _interventions(model, site, source_cache, source_inputs, reference_inputs):
    fam = model.catalog.family(site.split(".")[0])
    d = fam.axes[-1].size or 6  # attn_pattern's key_pos is sized by the input
    g = torch.Generator().manual_seed(9)
    vector = torch.randn(d, generator=g)
    out = [
        cp.Patch(source_cache), cp.Patch(source_inputs), cp.Zero(), cp.Mean(reference_inputs),
        cp.Resample(source_inputs, seed=4), cp.Noise(scale=0.5, seed=7), cp.Add(vector, alpha=0.5), cp.Scale(1.5),
        cp.Set(0.25),
    ]
    selection = site[site.index("[") :] if "[" in site else ""
    if fam.axis_names[-1] not in selection and "{" not in selection:  # it acts on the whole last axis
        out.append(cp.ProjectOut(torch.randn(2, d, generator=g)))
    return out


def test_every_intervention_gives_the_undispatched_output(dispatched, prompts):
    reference, model, layer = dispatched
    clean, corrupt = prompts
    keys = model.capture_keys(_sites(model.catalog, layer), model.prepare(clean))
    source_cache = reference.capture(clean, keys)
    checked = 0
    for site in _sites(model.catalog, layer):
        for intervention in _interventions(model, site, source_cache, clean, torch.cat([clean, corrupt])):
            want = reference.run(corrupt, {site: intervention}).output
            got = model.run(corrupt, {site: intervention}).output
            torch.testing.assert_close(got, want, **TOL, msg=f"{type(intervention).__name__} at {site}")
            checked += 1
    assert checked >= 7 * 9


def test_a_float64_source_cache_on_another_device_meets_the_activation_in_its_dtype(dispatched, prompts):
    reference, model, layer = dispatched
    clean, corrupt = prompts
    site = f"head_out.{layer}[head=1]"
    cache = model.capture(clean, [site])
    wide = cache.to(torch.float64)
    assert next(iter(wide.values())).dtype == torch.float64
    got = model.run(corrupt, {site: cp.Patch(wide)}).output
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference.run(corrupt, {site: cp.Patch(cache)}).output, **TOL)


# ---------------------------------------------------------------- methods


def test_activation_patching_and_attribution_patching_agree_with_the_undispatched_model(dispatched, prompts):
    reference, model, layer = dispatched
    clean, corrupt = prompts
    metric = cp.metrics.logit_diff(7, 8)
    sites = ["resid_pre.*[pos=*]", "head_out.*[head=*]"]
    for pattern in sites:
        want = cp.activation_patching(reference, clean, corrupt, pattern, metric, progress=False)
        got = cp.activation_patching(model, clean, corrupt, pattern, metric, progress=False)
        assert got.dims == want.dims
        torch.testing.assert_close(torch.as_tensor(got.values), torch.as_tensor(want.values), atol=1e-7, rtol=1e-5)
        assert abs(want.values).max() > 1e-5  # the sweep measures something
    for grad_drop in (False, True):
        want = cp.attribution_patching(reference, clean, corrupt, "head_out.*[head=*]", metric, grad_drop=grad_drop)
        got = cp.attribution_patching(model, clean, corrupt, "head_out.*[head=*]", metric, grad_drop=grad_drop)
        torch.testing.assert_close(torch.as_tensor(got.values), torch.as_tensor(want.values), atol=1e-7, rtol=1e-5)
        assert abs(want.values).max() > 1e-5


# ---------------------------------------------------------------- hooks live alongside accelerate's


def test_accelerate_hooks_stay_ours_go_and_user_hooks_keep_firing(dispatched, prompts):
    reference, model, layer = dispatched
    clean, corrupt = prompts
    net = model.module
    fired = []
    block = net.base_model.get_submodule(model.catalog.family("resid_post").reach.path.format(layer=layer))  # type: ignore[attr-defined]
    user = block.register_forward_hook(lambda m, a, o: fired.append(1))
    hf_hooks = {name: m._hf_hook for name, m in net.named_modules() if hasattr(m, "_hf_hook")}
    forwards = {name: m.forward for name, m in net.named_modules() if hasattr(m, "_hf_hook")}
    before = hook_state(net)
    sites = [_pattern(fam) for fam in model.catalog]
    model.capture(clean, sites, grad=True)
    model.run(corrupt, {f"head_out.{layer}[head=1]": cp.Patch(clean), f"attn_pattern.{layer}": cp.Scale(1.0)})
    cp.attribution_patching(model, clean, corrupt, "head_out.*[head=*]", cp.metrics.logit_diff(7, 8))
    with pytest.raises(RuntimeError, match="boom"):

        class Boom(cp.Intervention):
            kind = "_boom"

            def apply(self, x, ctx):
                raise RuntimeError("boom")

        model.run(corrupt, {f"mlp_out.{layer}": Boom()})
    assert hook_state(net) == before
    assert {name: m._hf_hook for name, m in net.named_modules() if hasattr(m, "_hf_hook")} == hf_hooks
    assert {name: m.forward for name, m in net.named_modules() if hasattr(m, "_hf_hook")} == forwards
    assert len(fired) >= 5
    n = len(fired)
    net(clean)
    assert len(fired) == n + 1
    user.remove()


# ---------------------------------------------------------------- a second device (meta) in the map


@pytest.fixture(scope="module")
def two_devices():
    """GPT-2 whose block 1, final norm and unembedding run on ``meta`` (accelerate's own hooks move
    everything there), block 0 on the CPU: the code path of a map over two GPUs."""
    reference = randomize(tiny_gpt2())
    model = randomize(tiny_gpt2())
    device_map = {
        "transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu", "transformer.h.0": "cpu",
        "transformer.h.1": "meta", "transformer.ln_f": "meta", "lm_head": "meta",
    }
    model = accelerate.dispatch_model(model, device_map, main_device="cpu")
    model._hf_hook.io_same_device = False  # meta holds no values to bring the logits back with
    return cp.wrap(reference), cp.wrap(model)


def test_two_device_map_captures_each_site_on_the_device_that_computes_it(two_devices, prompts):
    reference, model = two_devices
    clean, _ = prompts
    cache = model.capture(clean, [_pattern(fam) for fam in model.catalog])
    devices = {key: t.device.type for key, t in cache.items()}
    # A block's input arrives from the block before (accelerate moves it inside the block's forward).
    assert {devices[k] for k in ("embed", "resid_pre.0", "resid_pre.1", "head_out.0", "resid_mid.0")} == {"cpu"}
    assert {devices[k] for k in ("head_out.1", "head_in.1", "resid_mid.1", "attn_pattern.1", "logits")} == {"meta"}


@pytest.mark.parametrize(
    "site",
    ["resid_pre.1[pos=2]", "resid_mid.1", "head_out.1[head=2]", "head_out.1[pos={1,3},head={0,2}]",
     "attn_pattern.1[head=1]", "mlp_act.1[neuron=3]", "logits_in[pos={0,2},dim={1,4}]"],
)
def test_two_device_map_moves_sources_and_parameters_to_the_activation(two_devices, prompts, site):
    # head_in is left out: its write checks on the host whether any slot changed, which meta cannot answer.
    reference, model = two_devices
    clean, corrupt = prompts
    source = reference.capture(clean, model.capture_keys(site)).to(torch.float64)  # CPU, float64
    fam = model.catalog.family(site.split(".")[0].split("[")[0])
    d = fam.axes[-1].size or clean.shape[1]
    vector = torch.ones(d, dtype=torch.float64)
    # Noise and Resample draw random numbers on the activation's device, which meta cannot do.
    interventions = [cp.Patch(source), cp.Mean(source), cp.Add(vector), cp.Set(vector), cp.Zero(), cp.Scale(2.0)]
    if fam.axis_names[-1] not in site and "{" not in site:  # it acts on the whole last axis
        interventions.append(cp.ProjectOut(vector))
    for intervention in interventions:
        run = model.run(corrupt, {site: intervention}, capture=[site])
        assert run.output.device.type == "meta", type(intervention).__name__
        assert next(iter(run.cache.values())).dtype == torch.float32


# ---------------------------------------------------------------- unit: a stored tensor meets the live one


def _context(target, source=None):
    from crosspatch.sites.catalog import Axis, SiteFamily
    from crosspatch.sites.site import Site

    fam = SiteFamily("resid_pre", (Axis("pos"), Axis("dim", target.shape[-1])), reach=None, layers=1)
    site = Site.parse("resid_pre.0[pos={0,2}]")
    index = (torch.tensor([0, 2], device=target.device), slice(None))
    return ApplyContext(site, fam, index, target, source)


@pytest.mark.parametrize(
    "intervention",
    [cp.Patch(None), cp.Mean(None), cp.Add(torch.ones(4, dtype=torch.float64)),
     cp.Set(torch.ones(4, dtype=torch.float64)), cp.ProjectOut(torch.ones(1, 4, dtype=torch.float64)), cp.Zero(),
     cp.Scale(3.0)],
    ids=lambda i: type(i).__name__,
)
def test_each_intervention_returns_the_activations_device_and_dtype(intervention):
    target = torch.empty(2, 3, 4, device="meta")  # float32 on the "other" device
    source = torch.randn(2, 3, 4, dtype=torch.float64)  # float64 on the CPU
    ctx = _context(target, source)
    assert ctx.require_source("Patch").device.type == "meta" and ctx.require_source("Patch").dtype == torch.float32
    x = ctx.select(target)
    if isinstance(intervention, cp.ProjectOut):  # acts on the whole last axis: select rows of pos only
        x = target
        ctx.index = (slice(None), slice(None))
    out = intervention.apply(x, ctx)
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == x.shape


def test_resample_takes_source_rows_in_the_activations_dtype():
    source = torch.arange(5.0, dtype=torch.float64).view(5, 1, 1).expand(5, 3, 4).contiguous()
    target = torch.zeros(4, 3, 4)
    ctx = _context(target, source)
    out = cp.Resample(None, seed=3).apply(ctx.select(target), ctx)
    assert out.dtype == torch.float32 and out.shape == (4, 2, 4)
    assert set(out[:, 0, 0].tolist()) <= set(range(5)) and len(set(out[:, 0, 0].tolist())) > 1


# ---------------------------------------------------------------- unit: model_device and offloaded weights


def test_model_device_is_the_input_embeddings_not_the_first_parameter():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 4, device="meta")  # registered first, on another device
            self.embed = nn.Embedding(10, 4)

        def get_input_embeddings(self):
            return self.embed

    assert model_device(Net()) == torch.device("cpu")
    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("cpu")  # never meta


def test_weights_on_meta_without_a_hook_to_load_them_are_named():
    from torch import nn

    layer = nn.Linear(3, 3)
    layer.to("meta")
    layer.register_buffer("anchor", torch.zeros(1))  # the module computes on the CPU
    with pytest.raises(RuntimeError, match=r"\['weight', 'bias'\] are on the meta device"):
        with onloaded(layer):
            pass
