"""Tests of the torchvision adapter: the conformance suite, hand-computed oracles, patching, selection.

Models are built with ``weights=None`` (nothing is downloaded) and run on small images.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import crosspatch_torchvision  # noqa: F401  (installed: the way CI runs these tests)
except ImportError:  # a source checkout that was not installed: test the code next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchvision.models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

import crosspatch as cp
from crosspatch.plugins import reset_registry
from crosspatch.testing import AdapterConformance, check_adapter
from crosspatch_torchvision import TorchvisionAdapter

ADAPTER = TorchvisionAdapter()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def images(seed: int, n: int = 2, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def resnet18():
    torch.manual_seed(0)
    return tvm.resnet18(weights=None, num_classes=10).eval()


def convnext_tiny():
    torch.manual_seed(0)
    return tvm.convnext_tiny(weights=None, num_classes=10).eval()


def small_bottleneck_resnet():
    torch.manual_seed(0)
    return tvm.ResNet(Bottleneck, [1, 2, 1, 1], num_classes=7).eval()


# -- the conformance suite -------------------------------------------------------------------------


class TestResNet18Conformance(AdapterConformance):
    adapter = ADAPTER

    def make_model(self):
        return resnet18()

    def make_inputs(self):
        return images(0)


class TestConvNeXtTinyConformance(AdapterConformance):
    adapter = ADAPTER

    def make_model(self):
        return convnext_tiny()

    def make_inputs(self):
        return images(0, size=32)  # 32 px still leaves 1x1 maps in the last stage; keeps the suite fast


class TestBottleneckConformance(AdapterConformance):
    adapter = ADAPTER

    def make_model(self):
        return small_bottleneck_resnet()

    def make_inputs(self):
        return images(0, n=3, size=32)


# -- the catalog -----------------------------------------------------------------------------------


def test_resnet18_catalog():
    m = cp.wrap(resnet18(), ADAPTER)
    cat = m.sites()
    assert list(cat.families) == ["stem", "block_in", "block", "stage", "pool", "logits"]
    assert cat.family("block").layers == 8 and cat.family("block_in").layers == 8
    assert cat.family("stage").layers == 4
    assert cat.family("stem").axis("channel").size == 64
    assert cat.family("block").axis("channel").size is None  # 64, 128, 256, 512 by stage
    assert "64x2, 128x2, 256x2, 512x2" in cat.family("block").doc
    assert "64x3, 128x2, 256x2, 512)" in cat.family("block_in").doc
    assert cat.family("pool").axes == (cp.Axis("channel", 512),)
    assert cat.family("logits").axes == (cp.Axis("class", 10),)
    info = m.describe()
    assert info["family"] == "resnet" and info["block"] == "BasicBlock"
    assert info["blocks_per_stage"] == [2, 2, 2, 2] and info["adapter"] == "torchvision"


def test_resnet50_and_convnext_catalogs():
    cat = ADAPTER.catalog(tvm.resnet50(weights=None))
    assert cat.family("block").layers == 16 and cat.family("pool").axis("channel").size == 2048
    assert cat.family("logits").axis("class").size == 1000
    cat = ADAPTER.catalog(convnext_tiny())
    assert cat.family("block").layers == 18 and cat.family("stage").layers == 4
    assert cat.family("stem").axis("channel").size == 96
    assert cat.family("pool").axis("channel").size == 768


def test_other_models_are_refused():
    assert not ADAPTER.matches(torch.nn.Linear(2, 2))
    assert not ADAPTER.matches(tvm.mobilenet_v3_small(weights=None))
    with pytest.raises(cp.AdapterError, match="ResNet and ConvNeXt"):
        cp.wrap(tvm.squeezenet1_0(weights=None), ADAPTER)


def test_prepare_refuses_integer_images_and_adds_a_batch_axis():
    model = small_bottleneck_resnet()
    with pytest.raises(ValueError, match="floating point"):
        ADAPTER.prepare(model, torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    assert ADAPTER.prepare(model, torch.zeros(3, 32, 32))["x"].shape == (1, 3, 32, 32)
    assert ADAPTER.prepare(model, {"pixel_values": torch.zeros(2, 3, 32, 32)})["x"].shape == (2, 3, 32, 32)


# -- oracles ---------------------------------------------------------------------------------------


def test_resnet_block_output_is_the_block_module_on_the_previous_output():
    model = resnet18()
    m = cp.wrap(model, ADAPTER)
    x = images(1)
    cache = m.capture(x, ["stem", "block_in.*", "block.*", "stage.*", "pool", "logits"])
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3, model.layer4) for b in stage]
    assert isinstance(blocks[2], BasicBlock) and blocks[2].downsample is not None  # block 2 = layer2.0 downsamples
    with torch.inference_mode():
        previous = cache["stem"]
        for layer, block in enumerate(blocks):
            torch.testing.assert_close(cache[f"block_in.{layer}"], previous, atol=0, rtol=0)
            expected = block(previous.clone())
            torch.testing.assert_close(cache[f"block.{layer}"], expected, atol=1e-6, rtol=1e-6)
            previous = cache[f"block.{layer}"]
        for stage, last in enumerate((1, 3, 5, 7)):
            torch.testing.assert_close(cache[f"stage.{stage}"], cache[f"block.{last}"], atol=0, rtol=0)
        pooled = torch.flatten(model.avgpool(cache["block.7"]), 1)
        torch.testing.assert_close(cache["pool"], pooled, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache["logits"], model.fc(cache["pool"]), atol=1e-6, rtol=1e-6)
    assert cache["block.3"].shape == (2, 128, 8, 8)


def test_convnext_block_and_downsample_oracle():
    model = convnext_tiny()
    m = cp.wrap(model, ADAPTER)
    cache = m.capture(images(1, size=32), ["block_in.*", "block.*"])
    with torch.inference_mode():
        # block 3 is the first of stage 1: it reads block 2's output through the downsampling layer
        torch.testing.assert_close(cache["block_in.3"], model.features[2](cache["block.2"]), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache["block.3"], model.features[3][0](cache["block_in.3"]), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(cache["block_in.4"], cache["block.3"], atol=0, rtol=0)
    assert cache["block.3"].shape[1] == 192


# -- interventions ---------------------------------------------------------------------------------


def test_one_channel_patch_changes_logits_and_self_patch_does_not():
    m = cp.wrap(resnet18(), ADAPTER)
    clean, other = images(1), images(2)
    base = m.run(clean).output
    patched = m.run(clean, {"block.3[channel=5]": cp.Patch(other)}).output
    assert patched.shape == (2, 10)
    assert (patched - base).abs().max() > 1e-4
    own = m.capture(clean, "block.3")
    assert torch.equal(m.run(clean, {"block.3[channel=5]": cp.Patch(own)}).output, base)


def test_channel_selection():
    m = cp.wrap(resnet18(), ADAPTER)
    x = images(3)
    clean = m.capture(x, ["block.3", "block_in.4"])
    assert clean["block.3[channel=5]"].shape == (2, 1, 8, 8)
    run = m.run(x, {"block.3[channel=5]": cp.Zero()}, capture=["block.3", "block_in.4"])
    assert torch.count_nonzero(run.cache["block.3[channel=5]"]) == 0
    keep = [c for c in range(128) if c != 5]
    assert torch.equal(run.cache["block.3"][:, keep], clean["block.3"][:, keep])
    assert torch.count_nonzero(run.cache["block_in.4[channel=5]"]) == 0  # the next block reads the write
    with pytest.raises(cp.SiteError, match="out of range"):
        m.run(x, {"block.3[channel=200]": cp.Zero()})  # block 3 has 128 channels


def test_channel_sweep_on_the_pool():
    m = cp.wrap(resnet18(), ADAPTER)
    clean, corrupt = images(4), images(5)
    sweep = m.sites().expand("pool[channel=*]")
    assert len(sweep) == 512
    res = cp.activation_patching(
        m, clean, corrupt, "pool[channel={0,1,2}]", metric=lambda out: out[:, 0], batch_size=8, progress=False,
    )
    assert torch.isfinite(torch.as_tensor(res.values)).all()


def test_float64_model():
    model = resnet18().double()
    cache = cp.wrap(model, ADAPTER).capture(images(1), ["block.2", "logits"])  # float32 images are cast
    assert cache["block.2"].dtype == torch.float64 and cache["logits"].dtype == torch.float64


def test_conformance_report_is_clean_for_resnet34_blocks_with_other_depths():
    torch.manual_seed(0)
    model = tvm.ResNet(BasicBlock, [3, 1, 1, 1], num_classes=5).eval()
    report = check_adapter(model, images(2, size=32), ADAPTER)
    assert report.ok, str(report)


# -- the installed plugin --------------------------------------------------------------------------


def _installed() -> importlib.metadata.Distribution | None:
    try:
        return importlib.metadata.distribution("crosspatch-torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None


def test_crosspatch_plugins_lists_it_without_importing_torchvision():
    """`crosspatch plugins` in a fresh interpreter: the plugin is listed, and loading it imported no torchvision."""
    dist = _installed()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSPATCH_")}
    env["CROSSPATCH_PLUGINS"] = "torchvision"  # other plugins may import what they like
    code = "import sys\nfrom crosspatch.cli import main\n"
    if dist is None:  # not installed: load the sources next to this file the way the entry point would
        source = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
        code += "from crosspatch.plugins import get_registry\nimport crosspatch_torchvision.plugin as p\n"
        code += "get_registry().register(p, 'torchvision')\n"
    code += "code = main(['plugins', '--json'])\nprint('TORCHVISION', 'torchvision' in sys.modules)\nsys.exit(code)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listing, _, flag = proc.stdout.rpartition("TORCHVISION")
    assert flag.split() == ["False"], "loading the plugin imported torchvision"
    info = {d["name"]: d for d in json.loads(listing)}["torchvision"]
    assert info["registered"] == {"adapters": ["torchvision"]} and info["errors"] == []
    if dist is None:
        pytest.skip("crosspatch-torchvision is not installed (pip install ./plugins/crosspatch-torchvision): "
                    "its entry point was not tested")
    assert info["distribution"] == "crosspatch-torchvision" and info["version"] == dist.version
    assert info["module"] == "crosspatch_torchvision.plugin"


def test_wrap_finds_the_adapter_through_the_entry_point(monkeypatch):
    if _installed() is None:
        pytest.skip("crosspatch-torchvision is not installed (pip install ./plugins/crosspatch-torchvision)")
    monkeypatch.delenv("CROSSPATCH_PLUGINS", raising=False)
    monkeypatch.delenv("CROSSPATCH_DISABLE_PLUGINS", raising=False)
    reset_registry()
    try:
        assert cp.wrap(resnet18()).adapter.name == "torchvision"
        assert cp.wrap(convnext_tiny()).adapter.name == "torchvision"
    finally:
        reset_registry()
