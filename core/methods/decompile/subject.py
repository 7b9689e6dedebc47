"""What is decompiled: a wrapped model with its token vocabulary, input lengths and output reading.

:func:`compiled_subject` serves a tracr-compiled model (anything whose module carries tracr's
converter metadata in ``.meta``: ``input_encoding``, ``residual_labels``, ``output_values`` ...);
trained transformers get theirs from :mod:`.trained`. Either way the rest of the pipeline sees
only this record and the engine's sites.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .variables import Layout

__all__ = ["Subject", "compiled_subject", "model_nodes"]


@dataclass
class Subject:
    """A model to decompile. ``encode`` maps token sequences (no start token) to model inputs with the
    start token first; ``decode`` maps outputs ``[b, T, ...]`` to values per position (start included).
    ``target``/``loss``/``accuracy`` compare an output with the clean run's on the non-start positions.
    ``truth`` (optional) is the task's answer per token. ``layout``: named residual subspaces, if any."""

    name: str
    wrapped: Any
    vocab: list[Any]
    lengths: list[int]
    encode: Callable[[Sequence[Sequence[Any]]], Any]
    decode: Callable[[torch.Tensor], list[list[Any]]]
    numerical: bool
    layout: Layout | None = None
    causal: bool = False
    index_start: int = 0
    truth: Callable[[Sequence[Any]], list[Any]] | None = None
    output_var: str | None = None
    notes: list[str] = field(default_factory=list)
    crisp_outputs: bool = False
    n_out: int | None = None
    min_accuracy: float = 1.0
    readout_threshold: float = 0.99

    def scores(self, output: torch.Tensor) -> torch.Tensor:
        """The output-space part of the network's output (the first ``n_out`` logits, if set)."""
        return output if self.n_out is None else output[..., : self.n_out]

    def target(self, output: torch.Tensor) -> torch.Tensor:
        output = self.scores(output)
        return output[..., 0].detach() if self.numerical else output.argmax(dim=-1).detach()

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self.scores(output)[:, 1:]
        if self.numerical:
            return (out[..., 0].double() - target[:, 1:].double()).pow(2).mean()
        return F.cross_entropy(out.reshape(-1, out.shape[-1]).double(), target[:, 1:].reshape(-1))

    def defined(self, output: torch.Tensor) -> list[bool]:
        """Per sequence: whether the output names one value at every non-start position (categorical:
        top output above 0.75, the next below 0.25; a mixture or an empty output is not defined)."""
        if self.numerical or not self.crisp_outputs:
            return [True] * output.shape[0]
        top = output[:, 1:].float().topk(min(2, output.shape[-1]), dim=-1).values
        ok = top[..., 0] > 0.75
        if top.shape[-1] > 1:
            ok &= top[..., 1] < 0.25
        return ok.all(dim=-1).tolist()

    def accuracy(self, output: torch.Tensor, target: torch.Tensor) -> float:
        out = self.scores(output)[:, 1:]
        if self.numerical:
            return float(((out[..., 0] - target[:, 1:]).abs() <= 1e-2).double().mean())
        return float((out.argmax(dim=-1) == target[:, 1:]).double().mean())


def model_nodes(wrapped: Any) -> list[str]:
    """Every head output and MLP output of the model, in forward order."""
    cat = wrapped.catalog
    heads = cat.family("head_out")
    n_heads = next(a.size for a in heads.axes if a.name == "head")
    out = []
    for layer in range(int(heads.layers or 0)):
        out.extend(f"head_out.{layer}[head={h}]" for h in range(int(n_heads)))
        out.append(f"mlp_out.{layer}")
    return out


def compiled_subject(wrapped: Any) -> Subject:
    """The :class:`Subject` of a tracr-compiled model (metadata in ``wrapped.module.meta``)."""
    meta = wrapped.module.meta
    bos, pad = meta["bos"], meta["pad"]
    encoding = {value: i for value, i in meta["input_encoding"]}
    vocab = [v for v in encoding if v not in (bos, pad)]
    device = next(wrapped.module.parameters()).device
    values = meta["output_values"]
    numerical = not meta["categorical_output"]

    def encode(seqs: Sequence[Sequence[Any]]) -> torch.Tensor:
        try:
            rows = [[encoding[bos]] + [encoding[v] for v in s] for s in seqs]
        except KeyError as err:
            raise ValueError(f"{meta['program']}: token {err.args[0]!r} is not in the vocabulary {vocab}") from None
        return torch.tensor(rows, dtype=torch.long, device=device)

    def decode(output: torch.Tensor) -> list[list[Any]]:
        if numerical:
            return [[round(v, 6) for v in row] for row in output[..., 0].tolist()]
        return [[values[i] for i in row] for row in output.argmax(dim=-1).tolist()]

    layout = Layout.from_labels(meta["residual_labels"], bos=bos, pad=pad)
    output_var = meta["output_labels"][0].split(":", 1)[0]
    return Subject(name=str(meta["program"]), wrapped=wrapped, vocab=vocab, lengths=list(range(1, int(meta["max_seq_len"]) + 1)),
                   encode=encode, decode=decode, numerical=numerical, layout=layout, output_var=output_var,
                   crisp_outputs=True)
