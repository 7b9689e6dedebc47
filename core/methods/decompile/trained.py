"""Small GPT-2-style transformers trained here on algorithmic tasks, and their decompilation subject.

Input: a start token (id 0), then one token per step (id ``1 + step index``, steps in the order of
:meth:`AlgorithmicTask.all_sequences`); output at every step: the task's class, read from the
first ``n_classes`` logits (causal attention, so step ``t`` sees steps ``1..t``). Trained with
Adam on fresh seeded batches of ``length`` steps; held-out accuracy is measured on every sequence
of that length (or 4096 seeded ones where there are more). ``transformers`` is imported only inside
:func:`build_transformer` (loading goes through :func:`crosspatch.zoo.sources.load_local`).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ...progress import progress_bar
from ...zoo.algorithmic.tasks import get_algorithmic_task
from .subject import Subject

__all__ = ["DECOMPILE_TASKS", "Recipe", "build_transformer", "load_transformer", "step_values", "train_transformer",
           "trained_subject"]

# Tasks a causal transformer of two layers can express with select/aggregate/map (and one it cannot:
# parity of everything so far), named as in the algorithmic task registry.
DECOMPILE_TASKS = ("bit-shift-right", "bit-shift-right-2", "parity-last2", "parity-last3", "bitwise-xor",
                   "majority-0-1", "parity-all")
_INFO = "decompile_task.json"


@dataclass(frozen=True)
class Recipe:
    """Architecture and training of one task transformer."""

    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    length: int = 8
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3


def step_values(task: Any) -> list[Any]:
    """The task's possible steps in token order: ints for one input stream, tuples for several."""
    streams = [list(task.symbols(i)) for i in range(task.input_dim)]
    steps = list(itertools.product(*streams))
    return [s[0] for s in steps] if task.input_dim == 1 else steps


def _ids(task: Any, x: torch.Tensor) -> torch.Tensor:
    """``x [n, T, streams]`` (floats of ints) -> token ids ``[n, 1 + T]`` with the start token first."""
    idx = torch.zeros(x.shape[:2], dtype=torch.long)
    for i in range(task.input_dim):
        idx = idx * task.alphabet[i] + (x[..., i].round().long() - task.low[i])
    return torch.cat([torch.zeros(x.shape[0], 1, dtype=torch.long), idx + 1], dim=1)


def build_transformer(task: Any, recipe: Recipe, seed: int = 0):
    """A randomly initialised GPT-2 (``GPT2LMHeadModel``) for ``task`` (seeded)."""
    from ...zoo.sources import build_causal_lm

    n_tokens = 1 + len(step_values(task))
    torch.manual_seed(seed)
    return build_causal_lm(dict(
        model_type="gpt2", vocab_size=max(n_tokens, int(task.n_classes)), n_positions=recipe.length + 1,
        n_embd=recipe.n_embd, n_layer=recipe.n_layer, n_head=recipe.n_head, n_inner=4 * recipe.n_embd,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
    ))


def _logits(model: Any, ids: torch.Tensor, n_classes: int) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[:, 1:, :n_classes]


def train_transformer(task_name: str, recipe: Recipe = Recipe(), seed: int = 0, steps: int | None = None,
                      progress: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """Train a task transformer; returns the model (eval mode) and its metrics."""
    task = get_algorithmic_task(task_name)
    if task.output_kind != "classes":
        raise ValueError(f"task {task.name!r} outputs values, not classes; decompilation trains on class tasks "
                         f"such as {', '.join(DECOMPILE_TASKS)}")
    steps = recipe.steps if steps is None else int(steps)
    model = build_transformer(task, recipe, seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * max(0.05, 1 - s / max(steps, 1)))
    model.train()
    start = time.perf_counter()
    loss_value = float("nan")
    for step in progress_bar(range(steps), progress, desc=f"training {task.name} ({steps} steps)"):
        x, y = task.sample(recipe.batch, recipe.length, seed=seed * 1_000_003 + step)
        logits = _logits(model, _ids(task, x), int(task.n_classes))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
    seconds = time.perf_counter() - start
    model.eval()
    n_all = task.n_sequences(recipe.length)
    if n_all <= 4096:
        x, y = task.all_sequences(recipe.length)
        held_out = f"all {n_all} sequences of length {recipe.length}"
    else:
        x, y = task.sample(4096, recipe.length, seed=seed, split="test")
        held_out = f"4096 test sequences of length {recipe.length} (of {n_all})"
    with torch.no_grad():
        pred = _logits(model, _ids(task, x), int(task.n_classes)).argmax(-1)
    metrics = {"task": task.name, "accuracy": task.accuracy(pred, y), "sequence_accuracy": task.sequence_accuracy(pred, y),
               "held_out": held_out, "train_seconds": round(seconds, 2), "steps": steps, "final_loss": loss_value,
               "recipe": asdict(recipe), "n_classes": int(task.n_classes)}
    return model, metrics


def save_transformer(model: Any, metrics: dict[str, Any], folder: Path) -> None:
    model.save_pretrained(folder)
    (folder / _INFO).write_text(json.dumps(metrics, indent=2))


def load_transformer(folder: Path | None):
    """A saved task transformer -> ``(model, metrics)`` (loaded as any local checkpoint folder is)."""
    from ...zoo.sources import load_local

    if folder is None:
        raise ValueError("task transformers load from the folder their build wrote")
    model, _ = load_local(folder)
    return model.eval(), json.loads((Path(folder) / _INFO).read_text())


def trained_subject(source: Any, task: str | None = None) -> Subject:
    """The :class:`Subject` of a task transformer: a zoo name, a zoo model already loaded (reported under
    its zoo name), or a (wrapped) model with ``task`` given."""
    import crosspatch as cp
    from ...zoo import store

    info: dict[str, Any] = {}
    if isinstance(source, str):
        source = store.load(source)
    if isinstance(source, store.Loaded):
        info = dict(source.info)
        wrapped = cp.wrap(source.model)
        name = str(info.get("name") or type(source.model).__name__)
    else:
        wrapped = source if hasattr(source, "catalog") and hasattr(source, "module") else cp.wrap(source)
        name = type(wrapped.module).__name__
    task_name = task or info.get("task")
    if task_name is None:
        raise ValueError(f"{name}: say which algorithmic task it was trained on (task=...); decompiling a transformer "
                         "needs the task's token layout")
    t = get_algorithmic_task(task_name)
    values = step_values(t)
    position = {v: i + 1 for i, v in enumerate(values)}
    config = getattr(wrapped.module, "config", None)
    length = int(getattr(config, "n_positions", 9)) - 1
    n_classes = int(t.n_classes)
    device = next(wrapped.module.parameters()).device

    def encode(seqs: Sequence[Sequence[Any]]) -> torch.Tensor:
        try:
            rows = [[0] + [position[_as_step(v)] for v in s] for s in seqs]
        except KeyError as err:
            raise ValueError(f"{t.name}: step {err.args[0]!r} is not one of {values[:8]}...") from None
        return torch.tensor(rows, dtype=torch.long, device=device)

    def decode(output: torch.Tensor) -> list[list[Any]]:
        return output[..., :n_classes].argmax(dim=-1).tolist()

    return Subject(name=name if isinstance(source, str) else f"{t.name} transformer", wrapped=wrapped, vocab=values,
                   lengths=list(range(1, length + 1)), encode=encode, decode=decode, numerical=False, causal=True,
                   truth=t.truth, n_out=n_classes, min_accuracy=0.99, readout_threshold=0.99,
                   notes=[f"trained on {t.name}: {info.get('held_out', '?')}, accuracy {info.get('accuracy', '?')}"])


def _as_step(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v
