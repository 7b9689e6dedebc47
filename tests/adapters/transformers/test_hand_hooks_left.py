"""CD-T's recording forward (``cdt_blocks``) and an inferred mapping's proof (``proof``) leave no hook behind.

Both hook the model by hand around forwards of their own. After a forward that raises midway (a module of
the model raising on its n-th call, for every n the call reaches), and after a KeyboardInterrupt at every
line of their own code and of the hook registration below it (torch's, the engine's, the attention
pattern's), every module's hooks are the ones it had before, a hook the user registered beforehand among
them and still firing, no attention pattern callback or switched attention implementation is left, and
the call itself, run again, gives what it gave before.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import pytest
import torch

import crosspatch as cp
from conftest import randomize, tiny_gpt2, tiny_llama
from crosspatch.adapters.transformers import proof as proof_module
from crosspatch.adapters.transformers import reaches
from crosspatch.adapters.transformers.cdt_blocks import TransformersDecomposition, decomposed_forward
from crosspatch.adapters.transformers.mapping import mapping_for
from crosspatch.engine.forward import execute
from crosspatch.engine.reach import submodule

TESTS = pathlib.Path(__file__).resolve().parents[2]
ROOT = TESTS.parent


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


interrupts = _load("_hand_hooks_interrupts", TESTS / "core" / "interrupts.py")

TORCH_MODULE = os.path.join("torch", "nn", "modules", "module.py")
TORCH_HOOKS = os.path.join("torch", "utils", "hooks.py")
# Traced below the interrupted code: crosspatch's own, and torch's hook registration.
REGISTRATION = interrupts.in_files(
    str(ROOT / "core"), str(ROOT / "adapters"), TORCH_MODULE,
    TORCH_HOOKS, os.path.join("transformers", "configuration_utils.py"),
)
BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}  # fused Conv1D projections; separate Linear ones


class Boom(RuntimeError):
    pass


class RaiseOnCall:
    """Makes ``module`` raise :class:`Boom` on its ``n``-th call (through its ``forward``: no hook of its own);
    ``calls`` counts them. ``n=None`` only counts."""

    def __init__(self, module: torch.nn.Module, n: int | None):
        self.module, self.calls = module, 0
        forward = module.forward

        def raising(*args, **kwargs):
            self.calls += 1
            if self.calls == n:
                raise Boom(f"call {n} of {type(module).__name__}")
            return forward(*args, **kwargs)

        module.forward = raising

    def remove(self) -> None:
        del self.module.forward


class Subject:
    """A tiny model with two hooks of the user's own (a pre-hook on the first block, a hook on the last
    attention), and what a call of CD-T's recording forward or of the proof needs."""

    def __init__(self, name: str):
        self.model = randomize(BUILDERS[name]())
        self.m = cp.wrap(self.model)
        self.arch = mapping_for(self.model).arch
        self.blocks = submodule(self.model.base_model, self.arch.layers, None)
        self.fired: list[str] = []
        self.blocks[0].register_forward_pre_hook(lambda module, args: self.fired.append("pre"))
        self.blocks[-1].get_submodule(self.arch.attn_core).register_forward_hook(
            lambda module, args, output: self.fired.append("post"))
        ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
        self.inputs = self.m.prepare({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def prepare(self):
        decomposition = decomposed_forward(self.model, self.m.adapter)
        return decomposition.prepare(self.inputs)

    def prove(self):
        return proof_module.prove(self.model, self.m.adapter, self.m.catalog, self.arch, mapping_for(self.model).layout)

    def state(self) -> dict:
        """What the call must leave as it found it."""
        configs = [self.model.config] + [getattr(self.model.config, k) for k in getattr(self.model.config, "sub_configs", {})]
        return {
            "hooks": interrupts.hook_census(self.model),
            "implementations": [c._attn_implementation for c in configs if c is not None],
            "pattern callbacks": dict(reaches._ACTIVE),
            "switched configs": dict(reaches._SWITCHED),
        }

    def user_hooks_fire(self) -> bool:
        self.fired.clear()
        with torch.no_grad():
            self.model(**self.inputs)
        return self.fired == ["pre", "post"]


def _prepared(p) -> list:
    return [p.rows, p.residuals, p.masks, p.rotary]


def _proved(p) -> list:
    return [p.errors, p.failed]


CALLS = {"cdt prepare": ("prepare", _prepared), "proof": ("prove", _proved)}


def _raising_runs(subject: Subject, call: str) -> list[tuple[torch.nn.Module, int]]:
    """(module, n) for every call of the last block and of the first block's attention the call makes."""
    modules = [subject.blocks[-1], subject.blocks[0].get_submodule(subject.arch.attn_core)]
    counters = [RaiseOnCall(module, None) for module in modules]
    try:
        getattr(subject, call)()
    finally:
        for counter in counters:
            counter.remove()
    return [(module, n) for module, counter in zip(modules, counters) for n in range(1, counter.calls + 1)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_forward_raising_midway_leaves_no_hook(name, call):
    subject = Subject(name)
    method, result = CALLS[call]
    before = subject.state()
    expected = result(getattr(subject, method)())
    assert subject.state() == before
    runs = _raising_runs(subject, method)
    assert len(runs) >= 2
    raised = 0
    for module, n in runs:
        raiser = RaiseOnCall(module, n)
        try:
            getattr(subject, method)()
        except Boom:
            raised += 1
        finally:
            raiser.remove()
        assert subject.state() == before, f"{type(module).__name__} raising on call {n}"
    assert raised >= 2  # the proof catches what a self-patch raises; every other forward's error reaches the caller
    assert subject.user_hooks_fire()
    assert interrupts.same(result(getattr(subject, method)()), expected)


def _points(interrupter, action) -> list:
    """The first point of each code point under each target (the same registration lines run under several),
    in torch's ``Module`` only those of its hook functions (not its iterators and lookups)."""
    seen, out = set(), []
    for point in interrupter.points(action):
        if point.file.endswith(TORCH_MODULE) and "hook" not in point.function:
            continue
        if (point.where, point.target) not in seen:
            seen.add((point.where, point.target))
            out.append(point)
    return out


# CD-T's recording forward: its lines and every line below them in crosspatch and the registration code.
# The proof: its own lines, and those of its functions that hook the model and every line of the engine's
# hook tools and torch's registration below them, but not the engine's runs (the engine's own tests
# interrupt those).
INTERRUPTED = {
    "cdt prepare": dict(deep=[TransformersDecomposition.prepare], admit=REGISTRATION),
    "proof": dict(
        shallow=[proof_module.prove],
        deep=[proof_module._Raw.__init__, proof_module._against_hook, proof_module._handed_by_other],
        admit=interrupts.in_files(str(ROOT / "core" / "engine" / "reach.py"), TORCH_MODULE, TORCH_HOOKS),
        opaque=[execute],
    ),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("call", sorted(CALLS))
def test_an_interrupt_at_any_line_leaves_no_hook(name, call):
    subject = Subject(name)
    method, result = CALLS[call]
    action = getattr(subject, method)
    before = subject.state()
    expected = result(action())
    interrupter = interrupts.Interrupter(**INTERRUPTED[call])
    points = _points(interrupter, action)
    assert len(points) > 20
    for point in points:
        fired = interrupter.interrupt(action, point.index)
        assert subject.state() == before, f"interrupted at {fired}"
    assert subject.user_hooks_fire()
    assert interrupts.same(result(action()), expected)
