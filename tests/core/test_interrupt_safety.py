"""A KeyboardInterrupt at any line of a run's setup leaves nothing behind.

For every reach of every built-in adapter (transformers: a causal LM, T5, BART and CLIP's two towers;
the generic fallback; the VAE adapter, diffusers' and a plain torch VAE; open_clip), a run that captures
every family is interrupted once at each line (and each return) of every ``install`` it calls, of
crosspatch code and torch's hook registration below it, and of the engine's setup and teardown; and a
run keeping a prefix and a resumed run at each line of ``forward_keeping_prefix`` and ``resume_forward``.
After each interrupt: the interrupt reached the caller, every module's hooks are the ones it had before,
crosspatch's own registries (pattern callbacks, switched attention implementations, taps, VAE points)
are empty, every config's attention implementation is back, the module tree is the same, and the
model's plain forward is bit-identical to a fresh copy's. After all of them an uninterrupted run returns
what it returned before.

The default run interrupts the installs and the engine's own lines (shallow); ``CROSSPATCH_SLOW=1``
also every line below the engine's setup and teardown in crosspatch (site parsing, planning, the
adapters' forward wrappers) and adds a Llama-family model (grouped-query attention).
"""

from __future__ import annotations

import copy
import logging
import importlib.util
import os
import pathlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

import crosspatch as cp
from conftest import randomize, tiny_gpt2, tiny_llama
from crosspatch.engine import forward as engine_forward
from crosspatch.engine import reach as engine_reach
from crosspatch.engine.forward import Bound, execute
from crosspatch.engine.interventions import Zero
from crosspatch.engine.resume import Resume
from crosspatch.sites.site import Site, site_key
from interrupts import Interrupter, first_of_each, hook_census, in_files, same

SLOW = bool(os.environ.get("CROSSPATCH_SLOW"))
TESTS = pathlib.Path(__file__).resolve().parents[1]
ROOT = TESTS.parent

# What deep tracing follows below a target: crosspatch's own code and the torch / transformers code that
# registers hooks and switches attention implementations.
CROSSPATCH = in_files(str(ROOT / "core"), str(ROOT / "adapters"))
REGISTRATION = in_files(
    str(ROOT / "core"), str(ROOT / "adapters"), os.path.join("torch", "nn", "modules", "module.py"),
    os.path.join("torch", "utils", "hooks.py"), os.path.join("transformers", "configuration_utils.py"),
)


def _helpers(folder: str, name: str):
    spec = importlib.util.spec_from_file_location(f"_interrupt_{name}", TESTS / "adapters" / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- subjects


@dataclass
class Subject:
    """A wrapped tiny model, its inputs, its own forward outside crosspatch, and a fresh copy."""

    name: str
    wrapped: Any
    inputs: Any
    plain: Callable[[nn.Module], Any]
    fresh: Any = field(init=False)  # the plain forward of a fresh copy, made before any run

    def __post_init__(self):
        with torch.no_grad():
            self.fresh = self.plain(copy.deepcopy(self.model))

    @property
    def model(self) -> nn.Module:
        return self.wrapped.module


def _lm_inputs() -> dict:
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _logits(inputs: dict) -> Callable:
    return lambda model: model(**inputs).logits


def _gpt2() -> Subject:
    inputs = _lm_inputs()
    return Subject("gpt2", cp.wrap(randomize(tiny_gpt2())), inputs, _logits(inputs))


def _llama() -> Subject:
    inputs = _lm_inputs()
    return Subject("llama", cp.wrap(randomize(tiny_llama())), inputs, _logits(inputs))


def _seq2seq(model_type: str) -> Subject:
    from crosspatch.adapters.transformers.tiny import tiny_model

    g = torch.Generator().manual_seed(1)
    inputs = {"input_ids": torch.randint(3, 100, (2, 6), generator=g), "decoder_input_ids": torch.randint(3, 100, (2, 4), generator=g)}
    larger = {} if model_type == "t5" else {"init_std": 0.2}
    return Subject(model_type, cp.wrap(randomize(tiny_model(model_type, "seq2seq-lm", **larger))), inputs, _logits(inputs))


def _hf_clip() -> Subject:
    clip = _helpers("open_clip", "clip_models")
    from crosspatch.adapters.open_clip import to_transformers

    model = to_transformers(clip.tiny_open_clip()).eval()
    images, texts = clip.images(2), clip.texts(3)
    plain = lambda m: m(input_ids=texts, pixel_values=images).logits_per_image  # noqa: E731
    return Subject("hf_clip", cp.wrap(model), {"images": images, "texts": texts}, plain)


def _open_clip() -> Subject:
    pytest.importorskip("open_clip")
    clip = _helpers("open_clip", "clip_models")
    images, texts = clip.images(2), clip.texts(3)
    plain = lambda m: (m.encode_image(images), m.encode_text(texts))  # noqa: E731
    return Subject("open_clip", cp.wrap(clip.tiny_open_clip()), {"images": images, "texts": texts}, plain)


def _generic() -> Subject:
    models = _helpers("generic", "generic_models")
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(2))
    return Subject("generic", cp.wrap(models.CNN().eval()), x, lambda m: m(x))


def _kl_vae() -> Subject:
    pytest.importorskip("diffusers")
    vae = _helpers("vae", "vae_helpers")
    x = vae.images(1, size=8)
    return Subject("kl_vae", cp.wrap(vae.tiny_kl()), x, lambda m: m(x, sample_posterior=False).sample)


def _torch_vae() -> Subject:
    vae = _helpers("vae", "vae_helpers")
    g = torch.Generator().manual_seed(4)
    model = vae.LinearVAE(torch.randn(6, 3, generator=g), torch.randn(6, generator=g), encoder=torch.randn(3, 6, generator=g))
    x = torch.randn(2, 6, generator=g)
    return Subject("torch_vae", cp.wrap(model), x, lambda m: m.decode(m.encode(x)[0]))


BUILDERS = {
    "gpt2": _gpt2, "t5": lambda: _seq2seq("t5"), "bart": lambda: _seq2seq("bart"), "hf_clip": _hf_clip,
    "open_clip": _open_clip, "generic": _generic, "kl_vae": _kl_vae, "torch_vae": _torch_vae,
    **({"llama": _llama} if SLOW else {}),
}


# ------------------------------------------------------------------------------------------ what is kept


def _configs(model: nn.Module) -> list:
    found: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        stack = [config]
        while stack:
            c = stack.pop()
            if c is None or id(c) in found or not hasattr(c, "_attn_implementation"):
                continue
            found[id(c)] = c
            stack.extend(getattr(c, key, None) for key in getattr(c, "sub_configs", None) or ())
    return list(found.values())


def state(subject: Subject) -> dict:
    """Everything an interrupted run must leave as it was, but the model's numbers."""
    from crosspatch.adapters.transformers import reaches as tf_reaches
    from crosspatch.adapters.transformers import twotower
    from crosspatch.adapters.vae import reaches as vae_reaches

    model = subject.model
    taps = twotower._TAPS.get(model, {})
    return {
        "hooks": hook_census(model),
        "modules": [(name, id(m)) for name, m in model.named_modules(remove_duplicate=False)],
        "implementations": [(id(c), c._attn_implementation) for c in _configs(model)],
        "pattern callbacks": dict(tf_reaches._ACTIVE),
        "switched configs": dict(tf_reaches._SWITCHED),
        "taps": {name: list(tap._callbacks) for name, tap in taps.items()},
        "vae points": dict(vae_reaches._POINTS.get(model, {})),
        "training": model.training,
    }


def _same_output(subject: Subject) -> bool:
    with torch.no_grad():
        return same(subject.plain(subject.model), subject.fresh)


# ----------------------------------------------------------------------------------------------- runs


def families_at_their_first_layer(subject: Subject) -> list[str]:
    """Every family (by default the first of each reach class) at its first layer."""
    chosen, classes = [], set()
    for f in subject.wrapped.catalog:
        if SLOW or type(f.reach) not in classes:
            classes.add(type(f.reach))
            chosen.append(site_key(f.name, 0 if f.layers is not None else None))
    return chosen


def install_codes(subject: Subject) -> set:
    """The ``install`` of every reach class in the catalog (and of the classes it inherits from)."""
    codes = set()
    for family in subject.wrapped.catalog:
        for cls in type(family.reach).__mro__:
            install = vars(cls).get("install")
            if install is not None:
                codes.add(install.__code__)
    return codes


@dataclass
class Trial:
    """One run to interrupt: what it does, the code interrupted at its own lines (``shallow``) and the code
    interrupted at every line below it too (``deep``, in crosspatch and torch's hook registration)."""

    label: str
    action: Callable[[], Any]
    shallow: set
    deep: set


def capture_run(subject: Subject) -> Trial:
    m = subject.wrapped
    prepared = m.prepare(subject.inputs)
    keys = families_at_their_first_layer(subject)
    writable = next(f for f in m.catalog if f.writable)
    bounds = [Bound(Site(writable.name, 0 if writable.layers is not None else None), Zero())]

    def action():
        run = execute(m.module, m.adapter, m.catalog, prepared, bounds, capture=keys)
        return run.output, dict(run.cache)

    engine = {execute.__code__, engine_forward._installed_forward.__code__, engine_forward._teardown.__code__,
              engine_reach.remove_all.__code__}
    if SLOW:
        return Trial("capture every family", action, set(), install_codes(subject) | engine)
    return Trial("capture every family", action, engine, install_codes(subject))


# Installs whose interrupts only the engine's net (which warns) may clean up: none, every install registers
# each undo before its change.
NEEDS_NET: set = set()


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _interrupt_everywhere(subject: Subject, trial: Trial) -> int:
    """Interrupt ``trial`` at each of its points (by default the first pass of each line); return how many."""
    before = state(subject)
    assert _same_output(subject)
    reference = trial.action()
    assert state(subject) == before and _same_output(subject), f"{subject.name}: an uninterrupted run left state behind"
    interrupter = Interrupter(trial.shallow, trial.deep, REGISTRATION)
    points = interrupter.points(trial.action)
    assert points, f"{subject.name}: {trial.label} passed no traced line"
    if not SLOW:
        points = first_of_each(points)
    engine_log = logging.getLogger(engine_forward.__name__)
    netted = set()
    for point in points:
        warnings = _Warnings()
        engine_log.addHandler(warnings)
        try:
            fired = interrupter.interrupt(trial.action, point.index)
        finally:
            engine_log.removeHandler(warnings)
        if warnings.messages:
            netted.add(point.target)
        assert (fired.file, fired.line, fired.event) == (point.file, point.line, point.event), (fired, point)
        after = state(subject)
        for key in before:
            assert after[key] == before[key], f"{subject.name}, {trial.label}: {key} changed after an interrupt at {point}"
        assert _same_output(subject), f"{subject.name}, {trial.label}: the plain forward changed after an interrupt at {point}"
    assert same(trial.action(), reference), f"{subject.name}, {trial.label}: a run after the interrupts returned other values"
    assert netted <= NEEDS_NET, f"{subject.name}: interrupted installs the engine's net had to clean up: {sorted(netted - NEEDS_NET)}"
    return len(points)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_an_interrupt_at_any_line_of_a_runs_setup_leaves_nothing_behind(name):
    subject = BUILDERS[name]()
    _interrupt_everywhere(subject, capture_run(subject))


def test_an_interrupt_while_keeping_a_prefix_or_resuming_leaves_nothing_behind():
    from crosspatch.adapters.transformers import resume as tf_resume

    subject = _gpt2()
    m = subject.wrapped
    prepared = m.prepare(subject.inputs)
    keys = ["resid_post.0", "logits"]

    def keeping():
        run = execute(m.module, m.adapter, m.catalog, prepared, capture=keys, keep_prefix=True)
        return run.output, dict(run.cache), run.prefix.residuals, run.prefix.keys_values

    prefix = execute(m.module, m.adapter, m.catalog, prepared, keep_prefix=True).prefix
    def resuming(pos: int):
        bounds = [Bound(Site.parse(f"resid_pre.1[pos={pos}:]"), Zero())]

        def action():
            run = execute(m.module, m.adapter, m.catalog, prepared, bounds, capture=["logits"],
                          resume=Resume(prefix, layer=1, pos=pos))
            return run.output, dict(run.cache)
        return action

    engine = {execute.__code__, engine_forward._installed_forward.__code__, engine_forward._teardown.__code__}
    counted = [
        _interrupt_everywhere(subject, Trial("keeping a prefix", keeping, engine, {tf_resume.forward_keeping_prefix})),
        _interrupt_everywhere(subject, Trial("resuming at block 1, position 3", resuming(3), engine, {tf_resume.resume_forward})),
    ]
    if SLOW:
        counted.append(_interrupt_everywhere(subject, Trial("resuming at block 1", resuming(0), engine, {tf_resume.resume_forward})))
    assert min(counted) > 10


# ------------------------------------------------------------------------------ attention patterns


def test_capturing_a_pattern_switches_attention_to_eager_for_the_run_only():
    subject = _gpt2()
    m, config = subject.wrapped, subject.model.config
    assert config._attn_implementation == "sdpa"
    seen: list[str] = []
    own = subject.model.transformer.h[0].register_forward_pre_hook(lambda *a: seen.append(config._attn_implementation))
    try:
        plain_run = m.run(subject.inputs, {})
        pattern_run = m.run(subject.inputs, {}, capture=["attn_pattern.1", "logits"])
        zeroed = m.run(subject.inputs, {"attn_pattern.0[head=1]": cp.Zero()})
    finally:
        own.remove()
    assert seen == ["sdpa", "crosspatch_eager", "crosspatch_eager"]
    assert config._attn_implementation == "sdpa" and not tf_reaches()._SWITCHED and not tf_reaches()._ACTIVE
    with torch.no_grad():
        assert same(subject.plain(subject.model), subject.fresh)  # the intervention is not applied any more
    assert same(plain_run.output, subject.fresh)
    # The eager kernel computes the same attention to float rounding (measured: 1.2e-7 here).
    assert 0 < (pattern_run.output - subject.fresh).abs().max() <= 1e-5
    assert (zeroed.output - subject.fresh).abs().max() > 1e-3
    # The pattern is a softmax over the keys each query attends to.
    pattern = pattern_run.cache["attn_pattern.1"]
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-6) and bool((pattern.triu(1) == 0).all())


def test_a_pattern_run_puts_back_each_config_and_sub_config_its_own_implementation():
    """transformers' setter switches a config's sub-configs too; each gets back what it held."""
    subject = _hf_clip()
    configs = _configs(subject.model)
    assert len(configs) >= 3  # CLIPConfig, its text and vision configs
    subject.model.config.text_config._attn_implementation_internal = "eager"  # sub-configs may differ
    before = [(c, c._attn_implementation) for c in configs]
    m = subject.wrapped
    run = m.run(subject.inputs, {}, capture=["text.attn_pattern.0", "vision.attn_pattern.1"])
    assert run.cache["text.attn_pattern.0"].shape[1] == subject.model.config.text_config.num_attention_heads
    assert [(c, c._attn_implementation) for c in configs] == before


def tf_reaches():
    from crosspatch.adapters.transformers import reaches

    return reaches


# ------------------------------------------------------------------------------ the undo helpers


def test_a_hook_undo_registered_first_removes_the_hook_wherever_registration_stopped():
    from crosspatch.engine.reach import Unhook, installing

    layer = nn.Linear(2, 2)

    def hook(module, args, output):
        return output * 2

    undo = Unhook(layer, hook, "forward")
    undo.remove()  # before the hook exists: nothing to do
    layer.register_forward_hook(hook, with_kwargs=True, prepend=True)  # the handle is dropped, as an interrupt would
    assert len(layer._forward_hooks) == 1 and len(layer._forward_hooks_with_kwargs) == 1
    undo.remove()
    undo.remove()
    assert not layer._forward_hooks and not layer._forward_hooks_with_kwargs

    with pytest.raises(KeyboardInterrupt):
        with installing() as changes:
            changes.forward_pre_hook(layer, lambda m, a: None)
            changes.undo(lambda: None)
            raise KeyboardInterrupt
    assert not layer._forward_pre_hooks


def test_remove_all_tries_every_handle_when_one_fails():
    from crosspatch.engine.reach import Undo, remove_all

    removed: list[int] = []

    def fail():
        raise RuntimeError("broken handle")

    handles = [Undo(lambda: removed.append(0)), Undo(fail), Undo(lambda: removed.append(2))]
    with pytest.raises(RuntimeError, match="broken handle"):
        remove_all(handles)
    assert sorted(set(removed)) == [0, 2]


def test_an_interrupt_while_restricting_the_output_or_adding_gradient_hooks_leaves_nothing_behind():
    subject = _gpt2()
    m = subject.wrapped
    prepared = m.prepare(subject.inputs)
    bounds = [Bound(Site("resid_pre", 1), Zero())]
    at = torch.tensor([6, 4])

    def action():
        run = execute(m.module, m.adapter, m.catalog, prepared, bounds, capture=["resid_post.0"], grad=True, output_at=at)
        return run.output.detach(), {k: v.detach() for k, v in run.cache.items()}

    adapter = type(m.adapter)
    engine = {execute.__code__, engine_forward._installed_forward.__code__, engine_forward._teardown.__code__}
    assert _interrupt_everywhere(subject, Trial("output at one position, gradients", action, engine,
                                                {adapter.output_at, adapter.gradient_hooks})) > 10
