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


@torch.no_grad()
def machine_from_data(rnn: TaskRNN, alphabet: Alphabet, seqs: np.ndarray, max_points: int = 3000,
                      max_clusters: int = 64) -> Machine | None:
    """The coarsest clustering of the hidden states seen on ``seqs`` that is a machine, or ``None``.

    For a trained network whose states never settle on exact points (breadth-first reading does not
    close), states are clustered by single linkage; cut heights are tried where the merge heights jump
    and at every height leaving at most ``max_clusters`` clusters (coarsest first), and the first cut where every cluster has one output and every (cluster, symbol)
    seen leads to one cluster is kept. A (cluster, symbol) pair never seen is stepped from the cluster's
    first member. ``None`` when there are more than ``max_points`` distinct states or no cut works."""
    from scipy.cluster.hierarchy import fcluster, linkage

    from .inputs import run_hidden, run_predict

    n_seq, length = seqs.shape[:2]
    h = run_hidden(rnn, seqs)
    h0 = rnn.h0.detach().double().numpy()
    states = np.concatenate([h0[None], h.reshape(-1, h.shape[-1])])
    scale = float(np.abs(states - states.mean(0)).max()) or 1.0
    grid = 1e-6 * scale  # states on one grid cell are one point; the grid coarsens until few remain
    while True:
        _, first, inverse = np.unique(np.round(states / grid), axis=0, return_index=True, return_inverse=True)
        if len(first) <= max_points or grid > 0.02 * scale:
            break
        grid *= 3
    if len(first) > max_points or len(first) < 2:
        return None
    points = states[first]
    outs_all = np.concatenate([[-1], run_predict(rnn, seqs).reshape(-1)])
    prev_idx = np.concatenate([np.zeros((n_seq, 1), np.int64), 1 + np.arange(n_seq * length).reshape(n_seq, length)[:, :-1]], axis=1)
    prev_pt, next_pt = inverse.reshape(-1)[prev_idx.reshape(-1)], inverse.reshape(-1)[1:]
    steps = np.asarray(alphabet.steps, dtype=np.int64)
    index = {tuple(s): i for i, s in enumerate(steps.tolist())}
    sym = np.array([index[tuple(x)] for x in seqs.reshape(-1, seqs.shape[-1]).tolist()])
    outs = outs_all[1:]
    tree = linkage(points, "single")
    heights = np.sort(tree[:, 2])
    jumps = [i for i, (a, b) in enumerate(zip(heights[:-1], heights[1:])) if b > 1.3 * max(a, 1e-12 * scale)]
    few = range(max(0, len(heights) - max_clusters), len(heights) - 1)  # every cut leaving at most max_clusters
    cuts = [float(np.sqrt(max(heights[i], 1e-12 * scale) * heights[i + 1])) for i in sorted(set(jumps) | set(few))]
    for cut in sorted(cuts, reverse=True):
        label = fcluster(tree, cut, criterion="distance") - 1
        k = int(label.max()) + 1
        out = np.full(k, -1)
        ok = True
        for c, y in zip(label[next_pt], outs):
            if out[c] == -1:
                out[c] = y
            elif out[c] != y:
                ok = False
                break
        if not ok:
            continue
        table: dict[tuple[int, int], int] = {}
        for a, b, s in zip(label[prev_pt], label[next_pt], sym):
            if table.setdefault((int(a), int(s)), int(b)) != b:
                ok = False
                break
        if not ok:
            continue
        start = int(label[inverse.reshape(-1)[0]])
        order = [start] + [c for c in range(k) if c != start]
        rename = {c: i for i, c in enumerate(order)}
        members = {c: int(np.argmax(label == c)) for c in range(k)}
        nxt = []
        for c in order:
            row = []
            for s in range(len(steps)):
                if (c, s) not in table:  # unseen: step the network from a member of the cluster
                    stepped = rnn.step(torch.as_tensor(points[members[c]][None]), torch.as_tensor(steps[s][None], dtype=torch.float64))
                    dist = np.linalg.norm(points - stepped.double().numpy()[0], axis=1)
                    table[(c, s)] = int(label[int(dist.argmin())])
                row.append(rename[table[(c, s)]])
            nxt.append(row)
        missing_out = [c for c in order if out[c] == -1]
        if missing_out:
            y = _outputs(rnn, points[[members[c] for c in missing_out]])
            for c, v in zip(missing_out, y):
                out[c] = v
        pts = np.array([points[members[c]] for c in order])
        return Machine(nxt, [int(out[c]) for c in order], pts, closed=True)
    return None
