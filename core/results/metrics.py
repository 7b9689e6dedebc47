"""Metrics: one number per batch row from a model output.

A metric is called as ``metric(output, ctx)`` and returns a tensor of shape ``[rows]``. In a
batched sweep the rows of many interventions share one forward; ``ctx.example`` says which
prompt each row belongs to, so per-prompt targets (answer tokens, the clean output) line up.
Any callable works: one taking only ``output`` is wrapped by :func:`as_metric`.

Answers may be token ids or text (``logit_diff(" Mary", " John")``): a metric with text answers
turns them into ids with a model's tokenizer (:meth:`Metric.resolve`), which the methods do with
the model they run; called before that, it says so.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..sites.selection import row_ends

__all__ = [
    "MetricContext", "Metric", "as_metric", "answer_ids", "logit_diff", "probability", "logprob", "kl_to_clean",
]


@dataclass
class MetricContext:
    """Per-row facts a metric may need."""

    example: torch.Tensor  # [rows] prompt index of every row
    clean: torch.Tensor | None = None  # clean output, one row per prompt
    attention_mask: torch.Tensor | None = None  # [rows, pos] when the inputs are padded

    @classmethod
    def plain(cls, rows: int, device: torch.device | str = "cpu") -> "MetricContext":
        return cls(torch.arange(rows, device=device))


@dataclass
class Metric:
    """A named metric; ``fn(output, ctx) -> [rows]``.

    ``position``: the one output position the metric reads (``-1``: each row's last real token), or
    None when it may read any. With it, a run may compute the output at that position only.
    """

    name: str
    fn: Callable[[torch.Tensor, MetricContext], torch.Tensor]
    position: int | None = None
    # Text answers awaiting a tokenizer ({"answer": " Mary", ...}) and the factory that takes their ids.
    texts: dict[str, Any] = field(default_factory=dict, repr=False)
    rebuild: Callable[..., "Metric"] | None = field(default=None, repr=False)

    @property
    def needs_tokens(self) -> bool:
        """True while the metric holds text answers that no tokenizer has turned into ids yet."""
        return bool(self.texts)

    def resolve(self, token_id: Callable[[str, str], int]) -> "Metric":
        """This metric with its text answers as token ids; ``token_id(text, argument)`` gives the one id of
        a text (``WrappedModel.token_id`` does, with the model's tokenizer, and refuses several tokens)."""
        if not self.texts or self.rebuild is None:
            return self
        return self.rebuild(**{name: answer_ids(value, token_id, name) for name, value in self.texts.items()})

    def positions(self, ctx: MetricContext, sizes: dict[str, int]) -> torch.Tensor | None:
        """Per row, the output position the metric reads (``[rows]``), or None when it may read any (or
        the inputs have no ``pos`` axis: ``sizes`` as :meth:`Adapter.sizes` gives them)."""
        if self.position is None or "pos" not in sizes:
            return None
        return _position_index(self.position, ctx, sizes["pos"], ctx.example.device)

    def __call__(self, output: torch.Tensor, ctx: MetricContext | None = None) -> torch.Tensor:
        if self.texts:
            given = ", ".join(f"{k}={v!r}" for k, v in self.texts.items())
            raise ValueError(
                f"metric {self.name!r} has text answers ({given}) that no tokenizer has turned into token ids yet: "
                f"pass it to a method with a model that has a tokenizer (cp.wrap(model, tokenizer=tok)), or "
                f"resolve it yourself: metric.resolve(m.token_id)"
            )
        ctx = ctx or MetricContext.plain(output.shape[0], output.device)
        value = self.fn(output, ctx)
        if not isinstance(value, torch.Tensor) or value.shape != (output.shape[0],):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"metric {self.name!r} returned {shape}; a metric returns one value per batch row, "
                f"shape ({output.shape[0]},)"
            )
        return value


def answer_ids(value: Any, token_id: Callable[[str, str], int], what: str) -> Any:
    """``value`` with its text turned into token ids: a string becomes its one id, a list or tuple holding
    strings the list of their ids (ids in it are kept); anything else (ids, a tensor) is returned as it is.
    ``token_id(text, what)`` gives a text's one id (``WrappedModel.token_id``), ``what`` names the argument in
    its errors. The one way text answers become ids: metrics' answers and trained interventions' labels."""
    if isinstance(value, str):
        return token_id(value, what)
    if isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
        return [token_id(v, what) if isinstance(v, str) else v for v in value]
    return value


def as_metric(fn: "Metric | Callable") -> Metric:
    """Wrap a callable ``fn(output)`` or ``fn(output, ctx)`` as a :class:`Metric`."""
    if isinstance(fn, Metric):
        return fn
    name = getattr(fn, "__name__", type(fn).__name__)
    try:
        n_params = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_params = 2
    if n_params == 1:
        return Metric(name, lambda output, ctx: fn(output))
    return Metric(name, fn)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least float32 for softmax-style reductions (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _per_prompt(
    values: "int | Sequence[int] | torch.Tensor", ctx: MetricContext, device, what: str = "token", vocab: int | None = None
) -> torch.Tensor:
    """Token ids per row: one shared id, or one per prompt looked up by ``ctx.example``; ``what`` names the
    argument in errors, ``vocab`` is the size of the axis the ids index."""
    t = torch.as_tensor(values, device=device)
    if t.is_floating_point() or t.dtype == torch.bool or t.ndim > 1:
        raise ValueError(
            f"{what} must be token ids: one int, or one per prompt (shape [prompts]); got {t.dtype} of shape {tuple(t.shape)}"
        )
    prompts = int(ctx.example.max()) + 1 if ctx.example.numel() else 0
    if t.ndim == 1 and t.shape[0] < prompts:
        raise ValueError(
            f"{what} has {t.shape[0]} ids but the run has {prompts} prompts; give one id per prompt ({prompts}) "
            f"or a single id shared by all"
        )
    if vocab is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        bad = int(t.max()) if int(t.max()) >= vocab else int(t.min())
        raise ValueError(f"{what} holds token id {bad}, outside the output's vocabulary of {vocab} (ids 0..{vocab - 1})")
    return t.expand(ctx.example.shape[0]) if t.ndim == 0 else t.to(device)[ctx.example.to(device)]


def _texts(**arguments: Any) -> dict[str, Any]:
    """The arguments given as text (a string, or a list holding strings)."""
    return {
        name: value for name, value in arguments.items()
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value))
    }


def _position_index(pos: int, ctx: MetricContext, length: int, device) -> torch.Tensor:
    """``[rows]``: ``pos`` in every row; with padding, a negative ``pos`` counts back from each row's last
    real token (``-1`` is that token), as ``pos=last`` does for sites."""
    if pos < 0 and ctx.attention_mask is not None:
        return (row_ends(ctx.attention_mask.to(device)) + pos).clamp(min=0)  # left or right padding
    return torch.full((ctx.example.shape[0],), pos % length, dtype=torch.long, device=device)


def _at(output: torch.Tensor, pos: int, ctx: MetricContext) -> torch.Tensor:
    """``output[:, pos]``; with padding, a negative ``pos`` counts back from each row's last real token."""
    if output.ndim == 2:  # no position axis (sequence classification)
        return output
    if pos < 0 and ctx.attention_mask is not None:
        last = _position_index(pos, ctx, output.shape[1], output.device)
        return output[torch.arange(output.shape[0], device=output.device), last]
    return output[:, pos]


def logit_diff(answer, distractor, pos: int = -1) -> Metric:
    """Logit of the answer token minus the distractor's, at ``pos``. Each is a token id shared by every
    prompt, one id per prompt, or text (``" Mary"``, or one string per prompt) of exactly one token."""
    texts = _texts(answer=answer, distractor=distractor)
    if texts:
        rebuild = lambda **ids: logit_diff(ids.get("answer", answer), ids.get("distractor", distractor), pos)  # noqa: E731
        return Metric("logit_diff", _unresolved, pos, texts, rebuild)

    def fn(output, ctx):
        logits = _at(output, pos, ctx)
        a = _per_prompt(answer, ctx, logits.device, "logit_diff answer", logits.shape[-1])
        d = _per_prompt(distractor, ctx, logits.device, "logit_diff distractor", logits.shape[-1])
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, a] - logits[rows, d]

    return Metric("logit_diff", fn, pos)


def _unresolved(output: torch.Tensor, ctx: MetricContext) -> torch.Tensor:  # pragma: no cover - Metric refuses first
    raise ValueError("a metric with text answers needs a tokenizer")


def _token_score(name: str, token, pos: int, log: bool) -> Metric:
    if _texts(token=token):
        rebuild = lambda token: _token_score(name, token, pos, log)  # noqa: E731
        return Metric(name, _unresolved, pos, {"token": token}, rebuild)

    def fn(output, ctx):
        logits = _wide(_at(output, pos, ctx))
        scores = logits.log_softmax(dim=-1) if log else logits.softmax(dim=-1)
        t = _per_prompt(token, ctx, scores.device, f"{name} token", scores.shape[-1])
        return scores[torch.arange(scores.shape[0], device=scores.device), t]

    return Metric(name, fn, pos)


def probability(token, pos: int = -1) -> Metric:
    """Softmax probability of ``token`` at ``pos``."""
    return _token_score("probability", token, pos, log=False)


def logprob(token, pos: int = -1) -> Metric:
    """Log-probability of ``token`` at ``pos``."""
    return _token_score("logprob", token, pos, log=True)


def kl_to_clean(pos: int = -1) -> Metric:
    """KL(clean ‖ patched) of the next-token distribution at ``pos``; 0 when the run matches clean."""

    def fn(output, ctx):
        if ctx.clean is None:
            raise ValueError("kl_to_clean needs the clean output in the metric context (ctx.clean)")
        patched = _wide(_at(output, pos, ctx)).log_softmax(dim=-1)
        clean_rows = ctx.clean.to(output.device)[ctx.example.to(output.device)]
        mask = None if ctx.attention_mask is None else ctx.attention_mask
        clean = _wide(_at(clean_rows, pos, MetricContext(ctx.example, None, mask))).log_softmax(dim=-1)
        return F.kl_div(patched, clean, log_target=True, reduction="none").sum(dim=-1)

    return Metric("kl_to_clean", fn, pos)
