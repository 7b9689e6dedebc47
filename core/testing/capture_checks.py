"""The checks of reading: capturing is passive, a capture equals a raw torch hook, and a batched run
equals the per-example runs.

They reuse the cache of every reached site that the reach check filled, and compare with the caller's
``atol``, since a raw hook or a one-row batch need not be bit-identical to the engine's batched run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..engine.reach import ModuleInput, ModuleOutput, submodule
from .hooks import module_names, where
from .runner import Skip, SuiteBase, family_keys, family_layers
from .tensors import close, max_diff


class CaptureChecks(SuiteBase):
    """The checks passive, hand_hook and batched."""

    def check_passive(self) -> list[str]:
        if self.out_all is None:
            raise Skip("needs every site captured in one run (see reach)")
        if close(self.out_all, self.plain, self.atol):
            return []
        return [f"capturing every site changed the output ({max_diff(self.out_all, self.plain)})"]

    def check_hand_hook(self) -> list[str]:
        self._need_cache()
        names = module_names(self.model)
        seen: dict[str, torch.Tensor] = {}
        targets: list[tuple[str, str, str]] = []  # (key, module name, "output" | "input")
        handles = []
        try:
            for fam in self.families:
                reach = fam.reach
                if type(reach) not in (ModuleOutput, ModuleInput) and not (
                    isinstance(reach, (ModuleOutput, ModuleInput)) and callable(getattr(reach, "module", None))
                ):
                    continue
                for layer, key in zip(family_layers(fam), family_keys(fam)):
                    if key not in self.cache:
                        continue
                    if callable(getattr(reach, "module", None)):
                        module = reach.module(layer)
                    else:
                        module = submodule(reach.root, reach.path, layer)
                    kind = "output" if isinstance(reach, ModuleOutput) else "input"
                    targets.append((key, names.get(id(module), type(module).__name__), kind))
                    handles.append(raw_hook(module, reach, key, seen))
            if not targets:
                raise Skip("no family is reached through ModuleOutput or ModuleInput")
            with torch.inference_mode():
                self.adapter.forward(self.model, self.prepared)
        finally:
            for h in handles:
                h.remove()
        problems = []
        for key, name, kind in targets:
            if key not in seen:
                problems.append(self.about(key, f"{key}: a raw hook on the {kind} of {where(name)} never fired"))
            elif not close(self.cache[key], seen[key], self.atol):
                problems.append(self.about(key,
                    f"{key}: the engine's capture differs from a raw hook on the {kind} of {where(name)} "
                    f"({max_diff(self.cache[key], seen[key])}); is the activation modified in place later?"
                ))
        return problems

    def check_batched(self) -> list[str]:
        self._need_cache()
        if self.n < 2:
            raise Skip(f"needs inputs with at least 2 examples, got {self.n}")
        if self.out_all is None:
            raise Skip("needs every site captured in one run (see reach)")
        keys = list(self.cache)
        problems = []
        batch_first = self.out_all.ndim > 0 and self.out_all.shape[0] == self.n
        for i in range(self.n):
            one = {
                k: v[i : i + 1] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == self.n else v
                for k, v in self.prepared.items()
            }
            run = self._execute(f"example {i} alone", one, capture=keys)
            if batch_first and not close(run.output, self.out_all[i : i + 1], self.atol):
                problems.append(
                    f"output: example {i} alone differs from row {i} of the batched run "
                    f"({max_diff(run.output, self.out_all[i : i + 1])})"
                )
            for key in keys:
                if not close(run.cache[key], self.cache[key][i : i + 1], self.atol):
                    problems.append(self.about(key,
                        f"{key}: example {i} alone differs from row {i} of the batched run "
                        f"({max_diff(run.cache[key], self.cache[key][i : i + 1])})"
                    ))
        return problems


def raw_hook(module: nn.Module, reach: Any, key: str, seen: dict[str, torch.Tensor]):
    """A hook of our own, the way a user would write it, recording a copy of the activation."""
    if isinstance(reach, ModuleOutput):
        index = reach.index

        def out_hook(mod, args, output):
            value = output if isinstance(output, torch.Tensor) else output[index]
            seen[key] = value.detach().clone()

        return module.register_forward_hook(out_hook)
    name, position = reach.name, reach.position

    def in_hook(mod, args, kwargs):
        value = kwargs[name] if name is not None and name in kwargs else args[position]
        seen[key] = value.detach().clone()

    return module.register_forward_pre_hook(in_hook, with_kwargs=True)
