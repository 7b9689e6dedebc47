"""Find a small :class:`TaskRNN` that solves an algorithmic task, as MIPS does, then simplify it with L1.

    from crosspatch.zoo.algorithmic import get_algorithmic_task
    from crosspatch.zoo.algorithmic.search import search_rnn
    result = search_rnn(get_algorithmic_task("parity-last2"), seed=0)
    result.success, result.shape, result.accuracy_by_length     # True, RNNShape(...), {1: 1.0, ... 12: 1.0}
    result.model                                                # the TaskRNN, L1-simplified

**Search** (after MIPS's architecture search, Michaud et al. 2024): architectures are ordered by depth
first, then hidden size: *linear* ``f`` and ``g`` (``f_hidden=g_hidden=()``, the recurrence MIPS can
normalise in closed form) before one ReLU layer in each. Within a depth the hidden size grows
``1, 2, 4, 8 …`` until a network reaches 100 % on held-out sequences; then the size is bisected down
between the last failure and that success to the smallest that reaches it. With ReLU layers, their width
is ``max(min_width, width_factor * hidden)`` while growing; after the bisection it is halved while
networks still reach 100 %. Each architecture gets ``seeds`` training runs (seeds ``seed, seed+1 …``);
the first to reach 100 % counts.

**Training**: Adam on fresh batches from a seeded pool of sequences of ``train_length`` steps (10), loss
at every step (cross-entropy for classes; MIPS's ``log(1 + err^2)`` for integer values, rounded at
prediction), cosine-decayed learning rate, gradient clipping. Every ``eval_every`` steps the network is
checked on held-out sequences of ``test_length`` (12) steps; training stops at the first 100 %.

**Success** means 100 % of the steps right on held-out sequences of every length 1 … ``test_length``:
``test_sequences`` random test-split sequences of ``test_length`` steps (their step ``L`` outputs are
those of random length-``L`` sequences), and every sequence of the longest length with at most
``exhaustive_limit`` of them (so bit tasks are checked exhaustively to length 12). Accuracy at
``beyond_length`` (24) is reported, not required.

``max_runs`` (8) bounds a task's search by the number of training runs (deterministic, so a zoo build
is reproducible from its seed); ``max_seconds`` (unset) bounds it by wall time: no run starts after it and
a running one stops at its next check. Either way the best network so far is reported, as a failure.

**L1 simplification** (MIPS's ``train_l1``): the found network is fine-tuned with a penalty
``l1 * sum|θ|`` for ``l1_steps``; the last checkpoint that still reaches 100 % is kept. Then weights with
``|w| < prune_below`` are set to 0 if the network still reaches 100 %. Both stages only ever keep a
network that passes the same held-out check.

Decisions: inputs are the raw integer symbols (no one-hot), as in MIPS; hidden sizes stop at
``max_hidden`` (16) to keep the whole benchmark under an hour on two CPU cores; a task that never reaches
100 % returns ``success=False`` with the best network found and its accuracies, never a silent pass.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ...progress import progress_bar
from .rnn import RNNShape, TaskRNN
from .task import AlgorithmicTask

__all__ = [
    "Attempt", "SearchConfig", "SearchResult", "accuracy_by_length", "count_parameters", "heldout_check",
    "search_rnn", "simplify_l1", "train_rnn",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchConfig:
    """Knobs of the search, training, held-out check and L1 stage (defaults: the benchmark's)."""

    steps: int = 1500
    patience: int = 3
    polish_iters: int = 150
    polish_sequences: int = 1024
    batch: int = 256
    lr: float = 1e-2
    clip: float = 1.0
    train_length: int = 10
    pool: int = 8192
    eval_every: int = 100
    test_length: int = 12
    test_sequences: int = 2048
    exhaustive_limit: int = 4096
    beyond_length: int = 24
    seeds: int = 2
    linear_seeds: int = 1
    max_runs: int | None = 8
    max_seconds: float | None = None
    max_linear_hidden: int = 8
    max_hidden: int = 16
    min_width: int = 4
    width_factor: int = 2
    shrink_width: bool = True
    l1: float = 1e-3
    l1_steps: int = 400
    l1_lr: float = 3e-3
    prune_below: float = 1e-2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Attempt:
    """One training run of the search: its shape, seed, outcome and cost."""

    shape: RNNShape
    seed: int
    success: bool
    accuracy: float
    steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape.to_dict(), "seed": self.seed, "success": self.success,
                "accuracy": self.accuracy, "steps": self.steps, "seconds": round(self.seconds, 3)}


@dataclass
class SearchResult:
    """What :func:`search_rnn` found for one task."""

    task: str
    success: bool
    model: TaskRNN
    shape: RNNShape
    accuracy_by_length: dict[int, float]
    beyond_accuracy: float
    exhaustive_length: int
    parameters: int
    nonzero_parameters: int
    seconds: float
    attempts: list[Attempt] = field(default_factory=list)
    l1: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: float | None = None

    @property
    def test_accuracy(self) -> float:
        """The smallest per-length accuracy over lengths 1 … test_length."""
        return min(self.accuracy_by_length.values()) if self.accuracy_by_length else 0.0

    def metrics(self) -> dict[str, Any]:
        """JSON-able facts about the result (what the zoo records)."""
        return {
            "task": self.task, "success": self.success, "shape": self.shape.to_dict(),
            "accuracy": self.test_accuracy, "accuracy_by_length": {str(k): v for k, v in self.accuracy_by_length.items()},
            "beyond_accuracy": self.beyond_accuracy, "exhaustive_length": self.exhaustive_length,
            "parameters": self.parameters, "nonzero_parameters": self.nonzero_parameters,
            "seconds": round(self.seconds, 2), "cpu_seconds": None if self.cpu_seconds is None else round(self.cpu_seconds, 2),
            "attempts": [a.to_dict() for a in self.attempts], "l1": self.l1,
        }


# ---------------------------------------------------------------------------- held-out check


def count_parameters(model: torch.nn.Module, nonzero: bool = False) -> int:
    """Number of parameters (or of nonzero ones)."""
    return int(sum((p != 0).sum() if nonzero else p.numel() for p in model.parameters()))


def _exhaustive_length(task: AlgorithmicTask, length: int, limit: int) -> int:
    """The longest ``L <= length`` with at most ``limit`` sequences (0 if none)."""
    best = 0
    for L in range(1, length + 1):
        if task.n_sequences(L) <= limit:
            best = L
        else:
            break
    return best


@dataclass
class _HeldOut:
    x: torch.Tensor  # random test sequences of test_length steps
    y: torch.Tensor
    ex_x: torch.Tensor | None  # every sequence of exhaustive_length steps
    ex_y: torch.Tensor | None
    exhaustive_length: int


def _heldout(task: AlgorithmicTask, config: SearchConfig, seed: int) -> _HeldOut:
    x, y = task.sample(config.test_sequences, config.test_length, seed=seed, split="test")
    L = _exhaustive_length(task, config.test_length, config.exhaustive_limit)
    ex_x = ex_y = None
    if L:
        ex_x, ex_y = task.all_sequences(L, limit=config.exhaustive_limit)
    return _HeldOut(x, y, ex_x, ex_y, L)


@torch.no_grad()
def accuracy_by_length(model: TaskRNN, task: AlgorithmicTask, x: torch.Tensor, y: torch.Tensor) -> dict[int, float]:
    """Accuracy at every step ``L`` of ``x [n, T, d]`` (the prefix length ``L``), 1-based."""
    correct = (model.predict(x) == y).float().mean(dim=0)
    return {t + 1: float(v) for t, v in enumerate(correct.tolist())}


@torch.no_grad()
def heldout_check(model: TaskRNN, task: AlgorithmicTask, config: SearchConfig | None = None, seed: int = 0,
                  heldout: _HeldOut | None = None) -> tuple[bool, dict[int, float]]:
    """Whether ``model`` is right at every step of the held-out sequences, and its accuracy per length.

    The per-length accuracy is the lower of the random and the exhaustive set where both have the length.
    """
    config = config or SearchConfig()
    h = heldout or _heldout(task, config, seed)
    was = model.training
    model.eval()
    acc = accuracy_by_length(model, task, h.x, h.y)
    if h.ex_x is not None:
        for L, v in accuracy_by_length(model, task, h.ex_x, h.ex_y).items():
            acc[L] = min(acc[L], v)
    model.train(was)
    return all(v == 1.0 for v in acc.values()), acc


# ---------------------------------------------------------------------------- training


def _loss_fn(task: AlgorithmicTask) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if task.output_kind == "classes":
        return lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return lambda out, y: ((out[..., 0] - y.float()) ** 2).mean()


def _l1(model: torch.nn.Module) -> torch.Tensor:
    return sum(p.abs().sum() for p in model.parameters())


@dataclass
class _Run:
    model: TaskRNN
    success: bool
    accuracy: float
    steps: int
    seconds: float


def train_rnn(task: AlgorithmicTask, shape: RNNShape, *, seed: int = 0, config: SearchConfig | None = None,
              model: TaskRNN | None = None, l1: float = 0.0, steps: int | None = None, lr: float | None = None,
              heldout: _HeldOut | None = None, stop_at_success: bool = True,
              on_check: Callable[[TaskRNN, bool], None] | None = None, deadline: float | None = None) -> _Run:
    """Train a :class:`TaskRNN` of ``shape`` (or fine-tune ``model``) on ``task``; stop at 100 % held-out.

    ``l1`` adds ``l1 * sum|θ|`` to the loss; ``on_check(model, success)`` is called at every held-out check;
    training also stops at a check past ``deadline`` (a ``time.perf_counter()`` value).
    """
    config = config or SearchConfig()
    steps = config.steps if steps is None else steps
    torch.manual_seed(seed)
    if model is None:
        model = TaskRNN(shape)
    h = heldout or _heldout(task, config, 0)
    px, py = task.sample(config.pool, config.train_length, seed=seed, split="train")
    loss_fn = _loss_fn(task)
    opt = torch.optim.Adam(model.parameters(), lr=lr or config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    success, acc, done, best_acc, stale = False, 0.0, 0, -1.0, 0
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, px.shape[0], (config.batch,), generator=gen)
        loss = loss_fn(model(px[idx]), py[idx])
        if l1:
            loss = loss + l1 * _l1(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        opt.step()
        sched.step()
        done = step
        if step % config.eval_every == 0 or step == steps:
            success, by_len = heldout_check(model, task, config, heldout=h)
            acc = min(by_len.values())
            if on_check is not None:
                on_check(model, success)
            if success and stop_at_success:
                break
            if not torch.isfinite(loss):
                break
            stale = 0 if acc > best_acc + 0.01 else stale + 1
            best_acc = max(best_acc, acc)
            if stop_at_success and config.patience and stale >= config.patience:
                break  # no progress on the held-out check for `patience` checks
            if deadline is not None and time.perf_counter() > deadline:
                break
    if not success and stop_at_success and not l1 and config.polish_iters and task.output_kind == "value":
        success, acc = _polish(model, task, config, seed, h, acc)
    model.eval()
    return _Run(model, success, acc, done, time.perf_counter() - start)


def _polish(model: TaskRNN, task: AlgorithmicTask, config: SearchConfig, seed: int, h: _HeldOut,
            acc: float) -> tuple[bool, float]:
    """Full-batch L-BFGS on the training loss after Adam, for integer values (they need an error below
    0.5 at hundreds, which Adam's steps rarely reach); kept only if the held-out accuracy does not drop."""
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    px, py = task.sample(config.polish_sequences, config.train_length, seed=seed + 7919, split="train")
    loss_fn = _loss_fn(task)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=config.polish_iters, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(px), py)
        loss.backward()
        return loss

    model.train()
    try:
        opt.step(closure)
    except RuntimeError as exc:  # pragma: no cover - a numerical failure inside the line search
        logger.info("%s: L-BFGS polish failed (%s); keeping the Adam result", task.name, exc)
    success, by_len = heldout_check(model, task, config, heldout=h)
    new = min(by_len.values())
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    if not finite or new < acc:
        model.load_state_dict(before)
        return False, acc
    return success, new


# ---------------------------------------------------------------------------- L1 simplification


def simplify_l1(model: TaskRNN, task: AlgorithmicTask, *, config: SearchConfig | None = None, seed: int = 0,
                heldout: _HeldOut | None = None) -> tuple[TaskRNN, dict[str, Any]]:
    """Fine-tune ``model`` with an L1 penalty and prune tiny weights, keeping only networks at 100 % held-out.

    Returns the simplified network (``model`` itself if nothing passed) and a record of the stage:
    L1 norm and nonzero parameters before and after, whether the fine-tune and the pruning were kept.
    """
    config = config or SearchConfig()
    h = heldout or _heldout(task, config, 0)
    ok, _ = heldout_check(model, task, config, heldout=h)
    record: dict[str, Any] = {
        "l1": config.l1, "steps": config.l1_steps, "l1_norm_before": round(float(_l1(model).detach()), 4),
        "nonzero_before": count_parameters(model, nonzero=True), "finetune_kept": False, "pruned": 0,
    }
    if not ok:
        record["skipped"] = "the network does not reach 100 % before the L1 stage"
        return model, record
    best = _clone(model)
    if config.l1 > 0 and config.l1_steps > 0:
        work = _clone(model)

        def keep(m: TaskRNN, success: bool) -> None:
            nonlocal best
            if success:
                best = _clone(m)
                record["finetune_kept"] = True

        train_rnn(task, model.shape, seed=seed, config=config, model=work, l1=config.l1, steps=config.l1_steps,
                  lr=config.l1_lr, heldout=h, stop_at_success=False, on_check=keep)
    if config.prune_below > 0:
        pruned = _clone(best)
        with torch.no_grad():
            n = 0
            for p in pruned.parameters():
                small = (p.abs() < config.prune_below) & (p != 0)
                n += int(small.sum())
                p[small] = 0.0
        if n and heldout_check(pruned, task, config, heldout=h)[0]:
            best, record["pruned"] = pruned, n
    record["l1_norm_after"] = round(float(_l1(best).detach()), 4)
    record["nonzero_after"] = count_parameters(best, nonzero=True)
    best.eval()
    return best, record


def _clone(model: TaskRNN) -> TaskRNN:
    out = TaskRNN(model.shape)
    out.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


# ---------------------------------------------------------------------------- the search


def _width(hidden: int, config: SearchConfig) -> int:
    return max(config.min_width, config.width_factor * hidden)


def _candidates(task: AlgorithmicTask, depth: int, hidden: int, width: int) -> RNNShape:
    w = (width,) if depth else ()
    return task.rnn_shape(hidden, w, w)


def search_rnn(task: AlgorithmicTask, *, seed: int = 0, config: SearchConfig | None = None,
               progress: bool | None = None, simplify: bool = True) -> SearchResult:
    """The smallest :class:`TaskRNN` found to reach 100 % held-out on ``task`` (module docstring), L1-simplified.

    ``progress`` shows a bar over the training runs (``None``: ``CROSSPATCH_PROGRESS`` decides).
    """
    config = config or SearchConfig()
    start, cpu_start = time.perf_counter(), time.process_time()
    deadline = None if config.max_seconds is None else start + config.max_seconds
    h = _heldout(task, config, seed)
    attempts: list[Attempt] = []
    tried: dict[RNNShape, _Run | None] = {}
    best: _Run | None = None
    bar = progress_bar(itertools.count(), enabled=progress, desc=f"rnn search {task.name}", unit="run")
    bar_iter = iter(bar)

    def attempt(shape: RNNShape, seeds: int | None = None) -> _Run | None:
        """Train ``shape`` with up to ``config.seeds`` seeds (linear: ``linear_seeds``); the first success."""
        nonlocal best
        if shape in tried:
            return tried[shape]
        if deadline is not None and time.perf_counter() > deadline:
            return None
        if config.max_runs is not None and len(attempts) >= config.max_runs:
            return None
        tried[shape] = None
        if seeds is None:
            seeds = config.linear_seeds if not shape.f_hidden and not shape.g_hidden else config.seeds
        for s in range(seed, seed + seeds):
            if config.max_runs is not None and len(attempts) >= config.max_runs:
                break
            next(bar_iter, None)
            run = train_rnn(task, shape, seed=s, config=config, heldout=h, deadline=deadline)
            attempts.append(Attempt(shape, s, run.success, run.accuracy, run.steps, run.seconds))
            logger.info("%s: %s seed %d -> %.4f (%s, %.1fs)", task.name, _describe(shape), s, run.accuracy,
                        "solved" if run.success else "not solved", run.seconds)
            if best is None or (run.success, run.accuracy) > (best.success, best.accuracy):
                best = run
            if run.success:
                tried[shape] = run
                return run
        return None

    found: _Run | None = None
    for depth in (0, 1):
        sizes = _powers(config.max_hidden)
        if depth == 0:  # a linear network of size n is one of size m > n: try the largest first
            sizes = [n for n in _powers(config.max_linear_hidden)]
            if not config.max_linear_hidden or attempt(_candidates(task, 0, sizes[-1], 0)) is None:
                continue
        failed = 0
        for n in sizes:
            run = attempt(_candidates(task, depth, n, _width(n, config)))
            if run is None:
                failed = n
                continue
            found = run
            lo, hi = failed, n  # lo fails (or is 0), hi succeeds
            while hi - lo > 1:
                mid = (lo + hi) // 2
                r = attempt(_candidates(task, depth, mid, _width(mid, config)))
                if r is None:
                    lo = mid
                else:
                    hi, found = mid, r
            if depth and config.shrink_width:
                width = _width(hi, config)
                while width > 1:
                    r = attempt(_candidates(task, depth, hi, width // 2), seeds=1)
                    if r is None:
                        break
                    width, found = width // 2, r
            break
        if found is not None:
            break
    if hasattr(bar, "close"):
        bar.close()
    model = (found or best).model if (found or best) is not None else TaskRNN(_candidates(task, 0, 1, 1))
    l1_record: dict[str, Any] = {}
    if found is not None and simplify:
        model, l1_record = simplify_l1(model, task, config=config, seed=seed, heldout=h)
    success, by_len = heldout_check(model, task, config, heldout=h)
    bx, by = task.sample(min(config.test_sequences, 1024), config.beyond_length, seed=seed, split="test")
    with torch.no_grad():
        beyond = task.accuracy(model.predict(bx), by)
    return SearchResult(
        task=task.name, success=success, model=model, shape=model.shape, accuracy_by_length=by_len,
        beyond_accuracy=beyond, exhaustive_length=h.exhaustive_length, parameters=count_parameters(model),
        nonzero_parameters=count_parameters(model, nonzero=True), seconds=time.perf_counter() - start,
        attempts=attempts, l1=l1_record, cpu_seconds=time.process_time() - cpu_start,
    )


def _powers(limit: int) -> list[int]:
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    return out


def _describe(shape: RNNShape) -> str:
    return f"hidden {shape.hidden_dim}, f {list(shape.f_hidden)}, g {list(shape.g_hidden)}"
