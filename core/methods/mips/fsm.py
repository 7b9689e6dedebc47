"""The finite-state machine a network induces, when its reachable hidden states form a finite set.

:func:`explore` runs the network's step from ``h0`` on every input symbol, breadth first, merging a new
state into an earlier one when it lies within ``tol`` of that state's representative (transitions are
always computed from representatives, so rounding drift does not accumulate). It stops when no new
state appears (the machine is closed) or after ``max_states`` states or ``max_depth`` steps.
:func:`minimise` merges states with the same future outputs (Moore partition refinement) and renumbers
them breadth first from the start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...zoo.algorithmic.rnn import TaskRNN
from .inputs import Alphabet

__all__ = ["Machine", "explore", "minimise"]


@dataclass
class Machine:
    """A Moore machine: ``next[s][a]`` the state after symbol index ``a``, ``out[s]`` the output in
    state ``s``, state 0 the start; ``points[s]`` a representative hidden state (or ``None``)."""

    next: list[list[int]]
    out: list[int]
    points: np.ndarray | None = None
    closed: bool = True

    @property
    def size(self) -> int:
        return len(self.out)


@torch.no_grad()
def _step_all(rnn: TaskRNN, h: np.ndarray, alphabet: Alphabet) -> np.ndarray:
    dtype = next(rnn.parameters()).dtype
    m, k = len(h), len(alphabet)
    hh = torch.as_tensor(np.repeat(h, k, axis=0), dtype=dtype)
    xx = torch.as_tensor(np.tile(np.asarray(alphabet.steps, dtype=np.float64), (m, 1)), dtype=dtype)
    return rnn.step(hh, xx).double().numpy().reshape(m, k, -1)


@torch.no_grad()
def _outputs(rnn: TaskRNN, h: np.ndarray) -> list[int]:
    dtype = next(rnn.parameters()).dtype
    y = rnn.g(torch.as_tensor(h, dtype=dtype))
    pred = y.argmax(-1) if rnn.shape.output_kind == "classes" else torch.round(y[..., 0]).long()
    return [int(v) for v in pred]


def explore(rnn: TaskRNN, alphabet: Alphabet, max_states: int = 512, max_depth: int = 64, rel_tol: float = 0.1) -> Machine:
    """Breadth-first states and transitions of ``rnn`` (``closed=False`` if new states still appear
    after ``max_states`` states or ``max_depth`` steps)."""
    h0 = rnn.h0.detach().double().numpy()[None]
    first = _step_all(rnn, h0, alphabet)[0]
    cloud = np.concatenate([h0, first])
    gaps = np.linalg.norm(cloud[:, None] - cloud[None], axis=-1)
    nonzero = gaps[gaps > 1e-9 * max(float(gaps.max()), 1e-300)]
    tol = rel_tol * float(nonzero.min()) if nonzero.size else 1e-6
    points = np.empty((max_states + len(alphabet) + 1, h0.shape[1]))
    points[0], count = h0[0], 1
    nxt: list[list[int]] = []
    frontier, depth = [0], 0
    while frontier:
        depth += 1
        if count > max_states or depth > max_depth:
            return Machine(nxt, [], points[:count].copy(), closed=False)
        stepped = _step_all(rnn, points[frontier], alphabet)
        new_frontier = []
        for row in stepped:
            known = count
            dist = np.linalg.norm(row[:, None, :] - points[None, :known], axis=-1)  # [symbols, known]
            nearest = dist.argmin(1)
            targets = []
            for a, h in enumerate(row):
                j = int(nearest[a])
                if dist[a, j] >= tol:
                    fresh = np.linalg.norm(points[known:count] - h, axis=1) if count > known else np.empty(0)
                    if fresh.size and fresh.min() < tol:
                        j = known + int(fresh.argmin())
                    else:
                        if count == len(points):
                            return Machine(nxt, [], points[:count].copy(), closed=False)
                        points[count], j = h, count
                        count += 1
                        new_frontier.append(j)
                targets.append(j)
            nxt.append(targets)
        frontier = new_frontier
    pts = points[:count].copy()
    return Machine(nxt, _outputs(rnn, pts), pts, closed=True)


def minimise(machine: Machine) -> Machine:
    """The smallest Moore machine with the same outputs from the start state, states numbered breadth
    first (symbol order); ``points`` keeps one representative per merged class."""
    if not machine.closed:
        raise ValueError("cannot minimise a machine that was not closed (its states kept growing)")
    n, k = machine.size, len(machine.next[0]) if machine.next else 0
    block = list(machine.out)
    while True:
        sig = [(block[s], tuple(block[machine.next[s][a]] for a in range(k))) for s in range(n)]
        ids: dict[tuple, int] = {}
        refined = [ids.setdefault(x, len(ids)) for x in sig]
        if len(ids) == len(set(block)):
            block = refined
            break
        block = refined
    order, seen = [], {block[0]: 0}
    queue = [0]
    while queue:
        s = queue.pop(0)
        order.append(s)
        for a in range(k):
            t = machine.next[s][a]
            if block[t] not in seen:
                seen[block[t]] = len(seen)
                queue.append(t)
    reps = {seen[block[s]]: s for s in reversed(order)}
    m = len(seen)
    nxt = [[seen[block[machine.next[reps[i]][a]]] for a in range(k)] for i in range(m)]
    out = [machine.out[reps[i]] for i in range(m)]
    pts = None if machine.points is None else machine.points[[reps[i] for i in range(m)]]
    return Machine(nxt, out, pts, closed=True)
