"""Hand-set TaskRNNs whose algorithm is known in closed form (oracles for the MIPS tests)."""

from __future__ import annotations

import numpy as np
import torch

from crosspatch.methods.mips import Alphabet, TaskInfo
from crosspatch.zoo.algorithmic.rnn import RNNShape, TaskRNN


def running_sum_rnn(hidden_dim: int = 1, seed: int = 0) -> TaskRNN:
    """``h_t = h_{t-1} + u x_t`` read out as ``u·h / |u|^2``: the running sum, in a random basis when
    ``hidden_dim > 1`` (a random direction ``u`` and a random offset of the start)."""
    rng = np.random.default_rng(seed)
    net = TaskRNN(RNNShape(1, hidden_dim, 1, output_kind="value"))
    u = rng.normal(size=hidden_dim) if hidden_dim > 1 else np.ones(1)
    h0 = rng.normal(size=hidden_dim) if hidden_dim > 1 else np.zeros(1)
    with torch.no_grad():
        net.f[0].weight[:] = torch.tensor(np.concatenate([np.eye(hidden_dim), u[:, None]], axis=1))
        net.f[0].bias.zero_()
        net.g[0].weight[:] = torch.tensor(u[None] / (u @ u))
        net.g[0].bias[:] = torch.tensor([-(u @ h0) / (u @ u)])
        net.h0[:] = torch.tensor(h0)
    return net


def parity_rnn() -> TaskRNN:
    """The 2-state parity machine: ``h' = relu(h + x) - 2 relu(h + x - 1)`` (XOR on {0, 1}), and
    logits ``(0.5 - h, h - 0.5)``."""
    net = TaskRNN(RNNShape(1, 1, 2, f_hidden=(2,)))
    with torch.no_grad():
        net.f[0].weight[:] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
        net.f[0].bias[:] = torch.tensor([0.0, -1.0])
        net.f[2].weight[:] = torch.tensor([[1.0, -2.0]])
        net.f[2].bias.zero_()
        net.g[0].weight[:] = torch.tensor([[-1.0], [1.0]])
        net.g[0].bias[:] = torch.tensor([0.5, -0.5])
    return net


def running_sum_truth(xs: list) -> list[int]:
    total, out = 0, []
    for x in xs:
        total += x
        out.append(total)
    return out


def parity_truth(xs: list) -> list[int]:
    bit, out = 0, []
    for x in xs:
        bit ^= x
        out.append(bit)
    return out


SUM_TASK = TaskInfo("running-sum", Alphabet.product((0, 1), 1), running_sum_truth)
PARITY_TASK = TaskInfo("parity", Alphabet.product((0, 1), 1), parity_truth)
