"""MIPS end to end: a trained :class:`TaskRNN` in, a verified standalone Python program out.

Pipeline (Michaud et al. 2024, arXiv 2402.05110, written from the paper's description):

1. normalise the hidden state by exact changes of basis, then quantise weights where predictions stay
   unchanged (:mod:`.normalise`);
2. if the reachable hidden states are finite, the finite-state machine they induce, minimised
   (:mod:`.fsm`); its states labelled by their output, breadth first, or by their lattice coordinates;
3. otherwise the integer lattice of the hidden states seen on sample inputs (:mod:`.lattice`);
4. symbolic regression of each state coordinate's update and of the output (:mod:`.regress`), with a
   lookup table for a finite machine whose update no formula fits;
5. emission of a standalone module (:mod:`.emit`) and verification against the network on every
   input up to length 12 and against the task's ground truth at held-out lengths (:mod:`.verify`).

Candidate programs (shortest first) are screened against the network on the sample inputs; those that
pass are verified in full in that order until one equals the network on every checked input. A task
counts as solved only when that program also equals the task's ground truth at held-out lengths.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...progress import progress_bar
from ...zoo.algorithmic.rnn import TaskRNN
from .basis import change_basis
from .emit import ProgramSpec, emit
from .fsm import Machine, explore, machine_from_data, minimise
from .inputs import Alphabet, all_sequences, random_sequences, run_hidden, run_predict
from .lattice import Lattice, find_lattice
from .normalise import normalise, quantise
from .regress import fit_expression
from .tasks import TaskInfo, task_info
from .verify import Verification, as_program_input, compile_program, verify_program

if TYPE_CHECKING:
    from ...zoo.store import Loaded

__all__ = ["Extraction", "extract_program"]

logger = logging.getLogger(__name__)


@dataclass
class Extraction:
    """The outcome of :func:`extract_program` (what ``verification.json`` holds, plus the program).

    ``solved`` only when the program equals the network on every checked input and the ground truth at
    the held-out lengths; ``reason`` says why not otherwise. ``route`` is ``"finite-state machine"``
    or ``"integer lattice"``; ``fits`` names the regression family of every emitted expression."""

    model: str
    task: str
    solved: bool
    reason: str
    route: str | None = None
    program: str | None = None
    verification: Verification | None = None
    normalisation: list[str] = field(default_factory=list)
    normalised_max_error: float = float("nan")
    normalised_equal: bool = False
    quantised: str = ""
    machine_states: int | None = None
    lattice: dict[str, Any] | None = None
    fits: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("verification", "program")}
        d["verification"] = None if self.verification is None else self.verification.to_dict()
        return d


@dataclass
class _Candidate:
    route: str
    spec: ProgramSpec
    fits: dict[str, str]
    complete: bool  # every part is a formula (no lookup table)

    @property
    def cost(self) -> int:
        """Characters of formulas, with a table counted as 40 per entry: the shorter program first."""
        spec = self.spec
        parts = (spec.update or []) + ([spec.output] if spec.output is not None else [])
        tables = len(spec.update_table or {}) + len(spec.output_table or {})
        return sum(len(p) for p in parts) + 40 * tables


def _names(k: int, d: int) -> tuple[list[str], list[str]]:
    return (["h"] if k == 1 else [f"h{i}" for i in range(k)]), (["x"] if d == 1 else [f"x{i}" for i in range(d)])


def _candidate(route: str, title: str, labels: np.ndarray, init: np.ndarray, rows_v: np.ndarray,
               rows_next: np.ndarray, states: np.ndarray, outs: np.ndarray, d: int,
               table: tuple[dict, dict] | None, notes: list[str]) -> _Candidate | None:
    """Regress the update of every state coordinate and the output; fall back to ``table`` parts."""
    k = labels.shape[1]
    state_names, input_names = _names(k, d)
    fits: dict[str, str] = {}
    update: list[str] | None = []
    for i, name in enumerate(state_names):
        fit = fit_expression(rows_v, rows_next[:, i], state_names + input_names)
        if fit is None:
            if table is None or k != 1:
                return None  # no formula and no table to fall back on
            update = None
            break
        update.append(fit.text)
        fits[f"{name} update"] = fit.family
    out_fit = fit_expression(states, outs, state_names)
    output = None if out_fit is None else out_fit.text
    if out_fit is not None:
        fits["output"] = out_fit.family
    if (update is None or output is None) and (table is None or k != 1):
        return None
    spec = ProgramSpec(title, state_names, [int(v) for v in init], input_names, update=update,
                       update_table=None if update is not None else table[0], output=output,
                       output_table=None if output is not None else table[1], notes=notes)
    return _Candidate(route, spec, fits, update is not None and output is not None)


def _machine_candidates(m: Machine, info: TaskInfo, title: str) -> list[_Candidate]:
    steps = np.asarray(info.alphabet.steps, dtype=np.int64)
    d, n = steps.shape[1], m.size
    labellings: list[tuple[str, np.ndarray]] = []
    if len(set(m.out)) == n:
        labellings.append(("its output", np.array(m.out, dtype=np.int64)[:, None]))
    else:
        rank = [sum(1 for t in range(s) if m.out[t] == m.out[s]) for s in range(n)]
        labellings.append(("its output and its rank among the states with that output",
                           np.array([m.out, rank], dtype=np.int64).T))
    labellings.append(("breadth-first order", np.arange(n, dtype=np.int64)[:, None]))
    if m.points is not None and n > 1:
        code = _axis_clusters(m.points)
        if code is not None:
            labellings.append(("which of a few values each normalised hidden coordinate takes", code))
        lat = find_lattice(m.points, m.points[0])
        if lat is not None and lat.dim and len(np.unique(lat.coords, axis=0)) == n:
            labellings.append((f"its {lat.dim}-d lattice coordinates", lat.coords))
    out: list[_Candidate] = []
    for how, labels in labellings:
        rows_v = np.array([[*labels[s], *steps[a]] for s in range(n) for a in range(len(steps))], dtype=np.int64)
        rows_next = np.array([labels[m.next[s][a]] for s in range(n) for a in range(len(steps))], dtype=np.int64)
        key = [int(v) for v in labels[:, 0]]
        step_keys = [int(s[0]) if d == 1 else tuple(int(v) for v in s) for s in steps]
        table = ({(key[s], step_keys[a]): key[m.next[s][a]] for s in range(n) for a in range(len(steps))},
                 {key[s]: int(m.out[s]) for s in range(n)})
        notes = [f"A {n}-state machine read from the network's hidden states; a state is labelled by {how}."]
        c = _candidate("finite-state machine", title, labels, labels[0], rows_v, rows_next, labels,
                       np.array(m.out, dtype=np.int64), d, table, notes)
        if c is not None:
            out.append(c)
    return sorted(out, key=lambda c: (not c.complete, c.cost))


def _machine_plot(net: TaskRNN, m: Machine) -> dict[str, Any]:
    return {"net": net, "points": m.points, "labels": [f"s{i}→{o}" for i, o in enumerate(m.out)]}


def _machines(net: TaskRNN, alphabet: Alphabet, tolerances: tuple[float, ...] = (0.45, 0.25, 0.1)) -> list[Machine]:
    """The minimised machines read at each merge tolerance (coarsest first), distinct sizes only; empty
    when the states keep growing at every tolerance. A coarse tolerance merges a trained network's
    spread-out copies of one state; a fine one separates states that lie close together."""
    found: dict[int, Machine] = {}
    for tol in tolerances:
        machine = explore(net, alphabet, rel_tol=tol)
        if machine.closed:
            m = minimise(machine)
            found.setdefault(m.size, m)
    return list(found.values())


def _axis_clusters(points: np.ndarray, gap: float = 0.25) -> np.ndarray | None:
    """Each state's code: per normalised hidden coordinate, the index of the cluster of values it
    falls in (values split where consecutive ones are more than ``gap`` of the range apart); only
    coordinates with more than one cluster; ``None`` if two states share a code."""
    columns = []
    for v in points.T:
        span = float(v.max() - v.min())
        if span <= 1e-9:
            continue
        order = np.sort(v)
        cuts = order[:-1][np.diff(order) > gap * span] if len(order) > 1 else order[:0]
        columns.append(np.searchsorted(cuts, v, side="left").astype(np.int64))
    if not columns:
        return None
    code = np.stack(columns, axis=1)
    return code if len(np.unique(code, axis=0)) == len(points) else None


def _lattice_candidates(net: TaskRNN, info: TaskInfo, seqs: np.ndarray, title: str) -> tuple[list[_Candidate], Lattice | None, str]:
    h = run_hidden(net, seqs)
    h0 = net.h0.detach().double().numpy()
    prev = np.concatenate([np.broadcast_to(h0, (len(seqs), 1, h.shape[2])), h[:, :-1]], axis=1)
    lat = find_lattice(h.reshape(-1, h.shape[2]), h0, steps=(h - prev).reshape(-1, h.shape[2]),
                       directions=_input_directions(net, info.alphabet, seqs))
    if lat is None:
        return [], None, "the hidden states lie on no integer lattice"
    z = np.round(lat.encode(h.reshape(-1, h.shape[2]))).astype(np.int64).reshape(len(seqs), seqs.shape[1], -1)
    z0 = np.round(lat.encode(h0[None])).astype(np.int64)[0]
    y = run_predict(net, seqs).reshape(-1)
    kind = "Boolean" if lat.boolean else "integer"
    notes = [f"The hidden state is a point of a {lat.dim}-d {kind} lattice; h holds its coordinates."]
    rows = np.unique(np.concatenate([np.concatenate([np.broadcast_to(z0, (len(seqs), 1, lat.dim)), z[:, :-1]], axis=1),
                                     seqs, z, y.reshape(len(seqs), -1, 1)], axis=2).reshape(-1, 2 * lat.dim + seqs.shape[2] + 1),
                     axis=0)
    k, d = lat.dim, seqs.shape[2]
    out: list[_Candidate] = []
    for u in _unimodular(k):  # the same lattice in other integer bases: keep the shortest program
        zp, x, zn, yy = rows[:, :k] @ u.T, rows[:, k:k + d], rows[:, k + d:2 * k + d] @ u.T, rows[:, -1]
        c = _candidate("integer lattice", title, zn, u @ z0, np.concatenate([zp, x], axis=1), zn, zn, yy, d, None, notes)
        if c is not None and c.complete:
            out.append(c)
    if not out:
        return [], lat, "no formula in the regression families fits the update or the output on the lattice coordinates"
    return sorted(out, key=lambda c: c.cost), lat, ""


def _input_directions(net: TaskRNN, alphabet: Alphabet, seqs: np.ndarray, back: int = 4, n: int = 200) -> np.ndarray:
    """Median change of the last state when one input ``j = 0 … back-1`` steps back moves up by one
    symbol (per input stream): the counterfactual directions along which inputs write the state."""
    steps = np.asarray(alphabet.steps, dtype=np.int64)
    base = seqs[:n].copy()
    h = run_hidden(net, base)[:, -1]
    rows = []
    for j in range(min(back, seqs.shape[1])):
        for i in range(steps.shape[1]):
            values = np.unique(steps[:, i])
            up = np.searchsorted(values, base[:, -1 - j, i]) + 1
            ok = up < len(values)
            if not ok.any():
                continue
            moved = base[ok].copy()
            moved[:, -1 - j, i] = values[up[ok]]
            if not {tuple(s) for s in moved[:, -1 - j]} <= {tuple(s) for s in steps.tolist()}:
                continue  # the moved step is not a step the task feeds
            rows.append(np.median(run_hidden(net, moved)[:, -1] - h[ok], axis=0))
    return np.array(rows)


def _unimodular(k: int) -> list[np.ndarray]:
    """Integer ``k x k`` matrices with entries in {-1, 0, 1} and determinant ±1 (the identity first);
    for ``k > 2`` only the identity and signed permutations."""
    eye = np.eye(k, dtype=np.int64)
    if k > 2:
        perms = [eye[list(p)] for p in itertools.permutations(range(k))]
        return [eye] + [np.diag(s) @ p for p in perms for s in itertools.product((1, -1), repeat=k)
                        if not (np.array_equal(p, eye) and all(v == 1 for v in s))]
    found = [eye]
    for entries in itertools.product((-1, 0, 1), repeat=k * k):
        u = np.array(entries, dtype=np.int64).reshape(k, k)
        if abs(round(np.linalg.det(u))) == 1 and not np.array_equal(u, eye):
            found.append(u)
    return found


def _sample_inputs(alphabet: Alphabet, seed: int, n: int = 2000, length: int = 12) -> np.ndarray:
    short = max(1, min(length, int(np.log(n) / np.log(max(len(alphabet), 2)))))
    exhaustive = all_sequences(alphabet, short)
    exhaustive = np.concatenate([exhaustive, random_sequences(alphabet, len(exhaustive), length - short, seed)], axis=1)
    return np.concatenate([exhaustive, random_sequences(alphabet, n, length, seed + 1)])


def _resolve(source: Any, task: Any) -> tuple[TaskRNN, str, Any]:
    """The network, its name for the report, and the task (a zoo model's own when ``task`` is None)."""
    from ...zoo import store

    if isinstance(source, TaskRNN):
        return source, type(source).__name__, task
    if isinstance(source, str):
        return _resolve(store.load(source), task)
    if isinstance(source, store.Loaded):
        name = source.info.get("name")
        if not isinstance(source.model, TaskRNN):
            raise TypeError(f"zoo model {name!r} is a {type(source.model).__name__}, not a TaskRNN: MIPS reads "
                            f"recurrent networks")
        if task is None and name is not None:
            task = store.get(name).task or name.removeprefix("rnn-")
        return source.model, str(name or type(source.model).__name__), task
    raise TypeError(f"source must be a zoo name, a loaded zoo model or a TaskRNN, not {type(source).__name__}")


def extract_program(
    source: "TaskRNN | str | Loaded",
    task: Any = None,
    out: str | Path | None = None,
    *,
    progress: bool | None = None,
    seed: int = 0,
    verify_length: int = 12,
    max_verified: int = 4,
) -> Extraction:
    """Extract a Python program from a recurrent network and verify it (see the module docstring).

    ``source``: a zoo name (``"rnn-parity-last2"``), a zoo model already loaded (``zoo.load(name)``, reported
    under its zoo name) or a :class:`TaskRNN`; ``task``: a task name, an
    algorithmic task or a :class:`TaskInfo` (default: the zoo entry's task). ``out``: a folder to
    write ``program.py``, ``verification.json`` and ``lattice.png`` into. Up to ``max_verified``
    candidates that pass the screening are verified in full, shortest first, until one equals the network."""
    start = time.perf_counter()
    stages = iter(progress_bar(range(5), enabled=progress, desc="MIPS", total=5))
    rnn, model_name, task = _resolve(source, task)
    rnn = change_basis(rnn, np.eye(rnn.shape.hidden_dim)).eval()  # a float64 copy
    info = task_info(task, rnn)
    title = f"{info.name}: the program MIPS extracted from {model_name}."
    result = Extraction(model_name, info.name, False, "")
    seqs = _sample_inputs(info.alphabet, seed)
    target = run_predict(rnn, seqs)

    next(stages, None)
    logger.info("normalising the hidden state of %s", model_name)
    norm = normalise(rnn, seqs)
    result.normalisation = list(norm.steps)
    import torch

    with torch.no_grad():
        x = torch.as_tensor(seqs, dtype=torch.float64)
        result.normalised_max_error = float((norm.rnn(x) - rnn(x)).abs().max())
    result.normalised_equal = bool(np.array_equal(run_predict(norm.rnn, seqs), target))
    quant = quantise(norm.rnn, seqs)
    result.quantised = f"{quant.snapped} of {quant.total} parameters snapped to integers or simple fractions"
    nets = [("quantised", quant.rnn)] if quant.snapped else []
    nets += [("normalised", norm.rnn), ("as trained", rnn)]  # whitening can blur clusters: the raw basis last

    next(stages, None)
    reasons: list[str] = []
    passing: list[tuple[_Candidate, Machine | None, dict[str, Any]]] = []
    plot_data: dict[str, Any] = {}
    for label, net in nets:
        machines = _machines(net, info.alphabet)
        closed = bool(machines)
        if not closed:
            read = machine_from_data(net, info.alphabet, seqs)
            if read is not None:
                machines.append(minimise(read))
            else:
                reasons.append(f"{label}: breadth-first reading did not close and no clustering of the states seen "
                               f"is a machine (one output per cluster, one successor per cluster and symbol)")
        cands: list[tuple[_Candidate, Machine | None]] = []
        if machines:
            cands = [(c, m) for m in machines for c in _machine_candidates(m, info, title)]
            plot_data = _machine_plot(net, machines[-1])
            if not cands:
                reasons.append(f"{label}: a {machines[-1].size}-state machine, but no labelling of its states gives "
                               f"formulas or a table")
        if not closed or max(m.size for m in machines) > 16:  # a large machine may be a lattice read coarsely
            found, lat, why = _lattice_candidates(net, info, seqs, title)
            cands += [(c, None) for c in found]
            if lat is not None:
                result.lattice = {"dim": lat.dim, "method": lat.method, "boolean": lat.boolean,
                                  "bits_per_state": round(lat.bits, 3), "residual": round(lat.residual, 4)}
                plot_data = {"net": net, "lattice": lat}
            elif not machines:
                plot_data = {"net": net}
            if why:
                reasons.append(f"{label}: {why}")
        cands.sort(key=lambda cm: (not cm[0].complete, cm[0].cost))
        screened = 0
        for cand, m in cands:
            program = compile_program(emit(cand.spec))
            outputs = [[int(v) for v in program(s)] for s in as_program_input(seqs)]
            if np.array_equal(np.array(outputs), target):
                screened += 1
                passing.append((cand, m, plot_data if m is None else _machine_plot(net, m)))
                if len(passing) >= max_verified:
                    break
        if cands and not screened:
            reasons.append(f"{label}: {len(cands)} candidate program(s), each differing from the network on the sample inputs")
        if len(passing) >= max_verified:
            break

    next(stages, None)
    if not passing:
        result.reason = "; ".join(reasons) or "no candidate program"
    best: tuple | None = None
    for cand, m, data in passing:  # shortest first; the first equal to the network and the truth wins
        text = emit(cand.spec)
        ver = verify_program(text, rnn, info.alphabet, info.truth, length=verify_length, seed=seed)
        if best is None or (ver.matches_network and not best[3].matches_network) or ver.solved:
            best = (cand, m, data, ver, text)
        if ver.solved:
            break
    if best is not None:
        cand, m, plot_data, ver, text = best
        result.route, result.fits, result.program, result.verification = cand.route, cand.fits, text, ver
        result.machine_states = None if m is None else m.size
        result.solved = ver.solved
        if not ver.matches_network:
            result.reason = (f"the {len(passing)} candidate program(s) equal to the network on the sample inputs differ "
                             f"from it on the full check (the shortest on {ver.network_mismatches} of "
                             f"{ver.network_checked})")
            if ver.network_wrong_program_right:
                result.reason += (f"; on {ver.network_wrong_program_right} of those the network is wrong and the "
                                  f"program equals the ground truth")
        elif info.truth is None:
            result.reason = "equal to the network, but no ground truth was given"
        elif not ver.matches_truth:
            result.reason = (f"equal to the network up to length {verify_length}, but differs from the ground "
                             f"truth on {ver.truth_mismatches} of {ver.truth_checked} longer inputs")

    next(stages, None)
    result.seconds = round(time.perf_counter() - start, 3)
    if out is not None:
        _write(result, Path(out), plot_data, seqs)
    next(stages, None)
    logger.info("%s: %s in %.1f s", info.name, "solved" if result.solved else f"not solved ({result.reason})", result.seconds)
    return result


def _write(result: Extraction, folder: Path, plot_data: dict[str, Any], seqs: np.ndarray) -> None:
    from .plot import plot_states

    folder.mkdir(parents=True, exist_ok=True)
    if result.program is not None:
        (folder / "program.py").write_text(result.program)
        result.files["program"] = str(folder / "program.py")
    net = plot_data.get("net")
    if net is not None:
        h = run_hidden(net, seqs[:1500]).reshape(-1, net.shape.hidden_dim)
        y = run_predict(net, seqs[:1500]).reshape(-1)
        lat = plot_data.get("lattice")
        if lat is not None and lat.dim:  # the states in lattice coordinates: they sit on the integer grid
            z = lat.encode(h)
            grid = np.unique(np.round(z), axis=0)
            grid = grid if len(grid) <= 150 else None  # a dense grid: the states alone show it
            title = f"{result.task}: hidden states in {lat.dim}-d lattice coordinates ({result.route or 'no program'})"
            plot_states(z, y, folder / "lattice.png", title, grid, None, axis="lattice coordinate")
        else:
            title = f"{result.task}: hidden states ({result.route or 'no program'})"
            plot_states(h, y, folder / "lattice.png", title, plot_data.get("points"), plot_data.get("labels"))
        result.files["lattice_plot"] = str(folder / "lattice.png")
    result.files["verification"] = str(folder / "verification.json")
    (folder / "verification.json").write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
