"""The conformance suite (crosspatch.testing): real adapters pass it, broken ones fail the right check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import crosspatch as cp
from conftest import ToyNet, tiny_bert, tiny_gpt2, tiny_llama, toy_adapter
from crosspatch.sites.catalog import Axis, Catalog, SiteFamily
from crosspatch.engine.reach import ModuleOutput, submodule
from crosspatch.testing import CHECKS, AdapterConformance, assert_conforms, check_adapter

POS, DIM = Axis("pos"), Axis("dim", 4)


def toy_inputs(rows: int = 3) -> torch.Tensor:
    return torch.randn(rows, 5, 4, generator=torch.Generator().manual_seed(0))


def toy_variant(families) -> cp.Adapter:
    """The toy adapter with its catalog replaced by ``families(model)``."""
    base = type(toy_adapter())

    class Variant(base):
        def catalog(self, model):
            return Catalog(families(model), "ToyNet")

    return Variant()


def failed_checks(report) -> set[str]:
    return {name for name, r in report.results.items() if r.failed}


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- adapters that conform -----------------------------------------------------------------------


def test_toy_adapter_conforms():
    model = ToyNet().eval()
    report = assert_conforms(model, toy_inputs(), toy_adapter())
    assert report.ok and report.failures == []
    assert list(report.results) == list(CHECKS)
    assert set(CHECKS) - set(report.passed) <= {"cuda"}
    assert no_hooks_left(model)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_bert], ids=["gpt2", "llama", "bert"])
def test_transformers_adapter_conforms(build):
    ids = torch.randint(2, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    report = assert_conforms(build(), ids)  # the adapter comes from the plugin registry
    assert report.adapter == "transformers"
    assert report["hand_hook"].passed and report["self_patch"].passed and report["writes"].passed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_check_is_skipped_with_a_reason_without_cuda():
    report = check_adapter(ToyNet().eval(), toy_inputs(), toy_adapter())
    assert report["cuda"].skipped and "CUDA is not available" in report["cuda"].messages[0]
    assert report.skipped == [f"cuda: {report['cuda'].messages[0]}"]
    assert "SKIPPED  cuda" in str(report)
    forced = check_adapter(ToyNet().eval(), toy_inputs(), toy_adapter(), cuda=True)
    assert forced["cuda"].failed


def test_skip_option():
    report = check_adapter(ToyNet().eval(), toy_inputs(), toy_adapter(), skip=["dtype", "writes:hidden"])
    assert report["dtype"].skipped and report.ok
    with pytest.raises(ValueError, match="unknown checks"):
        check_adapter(ToyNet().eval(), toy_inputs(), toy_adapter(), skip=["nope"])


def test_single_example_skips_the_batched_check():
    report = check_adapter(ToyNet().eval(), toy_inputs(rows=1), toy_adapter())
    assert report.ok and report["batched"].skipped and "at least 2" in report["batched"].messages[0]


class TestToyConformance(AdapterConformance):
    """Used exactly as a plugin author would."""

    adapter = toy_adapter()

    def make_model(self):
        return ToyNet().eval()

    def make_inputs(self):
        return toy_inputs()


# -- adapters that do not ------------------------------------------------------------------------


class LeakyOutput(ModuleOutput):
    """Installs its hook but does not hand back the handle, so the engine cannot remove it."""

    def install(self, layer, callback):
        super().install(layer, callback)
        return []


class IgnoresWrites:
    """Calls back with the activation, then drops what the callback returns."""

    def __init__(self, root, path):
        self.root, self.path = root, path

    def install(self, layer, callback):
        def hook(module, args, output):
            callback(output)

        return [submodule(self.root, self.path, layer).register_forward_hook(hook)]


class MixesRows:
    """Writes the batch mean back into every row."""

    def __init__(self, root, path):
        self.root, self.path = root, path

    def install(self, layer, callback):
        def hook(module, args, output):
            new = callback(output)
            return None if new is None else new.mean(0, keepdim=True).expand_as(new).clone()

        return [submodule(self.root, self.path, layer).register_forward_hook(hook)]


class ForcesFloat32:
    def __init__(self, root, path):
        self.root, self.path = root, path

    def install(self, layer, callback):
        def hook(module, args, output):
            new = callback(output.float())
            return None if new is None else new.to(output.dtype)

        return [submodule(self.root, self.path, layer).register_forward_hook(hook)]


class ClearsAllHooks(ModuleOutput):
    """Removes its hook by clearing every hook of the module (yours too), as some libraries do."""

    def install(self, layer, callback):
        super().install(layer, callback)
        module = submodule(self.root, self.path, layer)

        class Handle:
            def remove(self):
                module._forward_hooks.clear()

        return [Handle()]


BROKEN = {
    "wrong axis size": (lambda m: [SiteFamily("hidden", (POS, Axis("dim", 5)), ModuleOutput(m, "layers.{layer}"), 2)],
                        "shapes", "dim is 4, not 5"),
    "missing axis": (lambda m: [SiteFamily("hidden", (POS,), ModuleOutput(m, "layers.{layer}"), 2)],
                     "shapes", "has 3 axes"),
    "leaked hook handle": (lambda m: [SiteFamily("hidden", (POS, DIM), LeakyOutput(m, "layers.{layer}"), 2)],
                           "hooks", "forward hook(s) left on module 'layers.0'"),
    "ignored write": (lambda m: [SiteFamily("hidden", (POS, DIM), IgnoresWrites(m, "layers.{layer}"), 2)],
                      "writes", "left the output unchanged"),
    "write leaks into other rows": (lambda m: [SiteFamily("hidden", (POS, DIM), MixesRows(m, "layers.{layer}"), 2)],
                                    "writes", "writes must stay in their rows"),
    "hard-coded float32": (lambda m: [SiteFamily("hidden", (POS, DIM), ForcesFloat32(m, "layers.{layer}"), 2)],
                           "dtype", "captured as torch.float32 from a float64 model"),
    "clears the user's hooks": (lambda m: [SiteFamily("hidden", (POS, DIM), ClearsAllHooks(m, "layers.{layer}"), 2)],
                                "hooks", "it did not install removed from module 'layers.0'"),
    "unreachable module": (lambda m: [SiteFamily("hidden", (POS, DIM), ModuleOutput(m, "layerz.{layer}"), 2)],
                           "reach", "no submodule 'layerz.0'"),
    "repeated axis": (lambda m: [SiteFamily("hidden", (DIM, DIM), ModuleOutput(m, "layers.{layer}"), 2)],
                      "catalog", "axis names repeat"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_adapter_fails_the_named_check(case):
    families, check, text = BROKEN[case]
    model = ToyNet().eval()
    report = check_adapter(model, toy_inputs(), toy_variant(families))
    assert check in failed_checks(report), str(report)
    assert any(line.startswith(f"{check}: ") and text in line for line in report.failures), report.failures
    with pytest.raises(AssertionError) as err:
        assert_conforms(model, toy_inputs(), toy_variant(families))
    assert f"  - {check}: " in str(err.value) and text in str(err.value)
    assert no_hooks_left(model)  # the suite cleans up even after an adapter that does not


def test_exactly_the_expected_checks_fail():
    for case, check in [("wrong axis size", "shapes"), ("leaked hook handle", "hooks"), ("ignored write", "writes")]:
        report = check_adapter(ToyNet().eval(), toy_inputs(), toy_variant(BROKEN[case][0]))
        assert failed_checks(report) == {check}, (case, report.failures)


class InPlaceNet(nn.Module):
    """Its first activation is overwritten in place (``relu_``) after the module returns it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        h.relu_()
        return self.head(h)


def test_capture_clobbered_in_place_fails_hand_hook():
    base = type(toy_adapter())

    class InPlace(base):
        def matches(self, model):
            return isinstance(model, InPlaceNet)

        def catalog(self, model):
            return Catalog([SiteFamily("pre", (POS, DIM), ModuleOutput(model, "lin"))], "InPlaceNet")

    report = check_adapter(InPlaceNet().eval(), toy_inputs(), InPlace())
    assert failed_checks(report) == {"hand_hook"}
    assert "in place" in report["hand_hook"].messages[0] and "'lin'" in report["hand_hook"].messages[0]


def test_swallowed_errors_fail_hooks():
    base = type(toy_adapter())

    class Swallows(base):
        def forward(self, model, inputs):
            try:
                return model(inputs["x"])
            except Exception:
                return torch.zeros(inputs["x"].shape[:-1] + (3,))

    report = check_adapter(ToyNet().eval(), toy_inputs(), Swallows())
    assert "hooks" in failed_checks(report)
    assert any("swallowed" in m for m in report["hooks"].messages)


def test_training_mode_stops_the_suite():
    report = check_adapter(ToyNet().train(), toy_inputs(), toy_adapter())
    assert failed_checks(report) == {"setup"} and "model.eval()" in report["setup"].messages[0]
    assert all(r.skipped for name, r in report.results.items() if name != "setup")


def test_adapter_that_does_not_match_fails_setup():
    base = type(toy_adapter())

    class Shy(base):
        def matches(self, model):
            return False

    report = check_adapter(ToyNet().eval(), toy_inputs(), Shy())
    assert failed_checks(report) == {"setup"} and "matches(model) is False" in report["setup"].messages[0]


def test_conformance_class_turns_checks_into_tests():
    cls = type("TestBroken", (AdapterConformance,), {
        "adapter": toy_variant(BROKEN["wrong axis size"][0]),
        "make_model": lambda self: ToyNet().eval(),
        "make_inputs": lambda self: toy_inputs(),
    })
    case = cls()
    case.test_setup()
    case.test_hooks()
    with pytest.raises(AssertionError, match="(?s)conformance check 'shapes' failed .*dim is 4, not 5"):
        case.test_shapes()
    if not torch.cuda.is_available():
        with pytest.raises(pytest.skip.Exception, match="CUDA is not available"):
            case.test_cuda()
    assert cls().conformance_report() is case.conformance_report()  # the suite runs once per class
    assert {name.removeprefix("test_") for name in dir(AdapterConformance) if name.startswith("test_")} == set(CHECKS)
