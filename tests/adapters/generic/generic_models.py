"""Small plain-torch models for the generic adapter's tests, and a raw-hook helper the oracles use."""

from __future__ import annotations

from collections import namedtuple
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn


def seeded(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Block(nn.Module):
    """A residual MLP block: ``x + act(fc(x))``."""

    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.Tanh()

    def forward(self, x):
        return x + self.act(self.fc(x))


class MLP(nn.Module):
    """embed -> three residual blocks in a ModuleList -> head: a stack with named parts around it."""

    def __init__(self, d_in: int = 4, d: int = 8, d_out: int = 3, depth: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(d_in, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def sequential_mlp() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


class CNN(nn.Module):
    """A convnet whose ``features`` steps differ in rank (so they are not layers), with an in-place ReLU."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.features(x))


Pair = namedtuple("Pair", ["main", "aux"])


@dataclass
class Parts:
    main: torch.Tensor
    aux: torch.Tensor
    note: str = "not a tensor"


class Fields(nn.Module):
    """Returns a tuple (with a string third), a dict, a namedtuple or a dataclass of two tensors."""

    def __init__(self, d: int, kind: str):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.kind = kind

    def forward(self, x):
        main, aux = self.a(x), self.b(x)
        if self.kind == "dict":
            return {"main": main, "aux": aux, "count": 2}
        if self.kind == "namedtuple":
            return Pair(main, aux)
        if self.kind == "dataclass":
            return Parts(main, aux)
        return main, aux, "a note"


def _unpack(out):
    if isinstance(out, dict):
        return out["main"], out["aux"]
    if isinstance(out, Parts):
        return out.main, out.aux
    return out[0], out[1]


class FieldNet(nn.Module):
    """Uses both tensor fields of its ``split`` module."""

    def __init__(self, kind: str = "tuple", d: int = 6):
        super().__init__()
        torch.manual_seed(3)
        self.split = Fields(d, kind)
        self.head = nn.Linear(2 * d, 3)

    def forward(self, x):
        out = self.split(x)
        self.seen = (type(out), out[2], out[1]) if type(out) is tuple else None  # what the tests check
        main, aux = _unpack(out)
        return self.head(torch.cat([main, torch.relu(aux)], dim=-1))


class SharedAct(nn.Module):
    """One activation module applied after two layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))


class Repeats(nn.Module):
    """Applies ``block`` ``repeat`` times: once when wrapped, more when the attribute is changed later."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.block = nn.Linear(4, 4)
        self.repeat = 1

    def forward(self, x):
        for _ in range(self.repeat):
            x = self.block(x)
        return x


@contextmanager
def raw_hook(module: nn.Module, fn: Callable) -> Iterator[None]:
    """A plain torch forward hook, the way a user writes one, removed afterwards."""
    handle = module.register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def record_output(module: nn.Module, store: dict, key: str = "out", field=None):
    """A forward hook that stores a copy of the module's output (or one of its fields)."""

    def hook(mod, args, output):
        value = output if field is None else (output[field] if not isinstance(output, Parts) else getattr(output, field))
        store[key] = value.detach().clone()

    return raw_hook(module, hook)


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
