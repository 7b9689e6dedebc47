"""A torch re-implementation of tracr's assembled transformer, loaded from converted weights.

Same forward as ``tracr.transformer.model.CompiledTransformerModel`` (no layer norm, non-causal,
no padding): ``x = token_embed[ids] + pos_embed[arange(T)]``; per layer ``x += attn(x)``,
``x += mlp(x)``; attention ``softmax(q k^T / sqrt(key_size))`` (tracr's softmax coldness is already
in the compiled query weights), MLP ``relu(x W1 + b1) W2 + b2``; the output is the residual
projected onto the program's output space (categorical: argmax decodes it; numerical: one value).

Every site the adapter offers is the output (or input) of a module here, so plain module hooks
reach it: the attention reads its residual through ``inputs`` (``[b, p, 3, head, d]``: the residual
each head's query, key and value projection reads) and writes per head through ``heads``
(``[b, p, head, d]``, summed with the output bias into the attention output).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["TracrTransformer", "load", "bos_default_edges"]


class _Identity(nn.Module):
    """A named point of the forward pass: hooks on it read and replace the tensor passing through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Embed(nn.Module):
    def __init__(self, token: torch.Tensor, pos: torch.Tensor):
        super().__init__()
        self.token = nn.Parameter(token, requires_grad=False)
        self.pos = nn.Parameter(pos, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token[ids] + self.pos[: ids.shape[1]]


class _HeadInputs(nn.Module):
    """``[b, p, d] -> [b, p, 3, head, d]``: one copy of the residual per head and role (q, k, v)."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, None, None, :].expand(x.shape[0], x.shape[1], 3, self.n_heads, x.shape[2])


class _Attention(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], n_heads: int, key_size: int):
        super().__init__()
        d = w["query.w"].shape[0]
        self.n_heads, self.key_size = n_heads, key_size
        split = lambda m: m.reshape(d, n_heads, key_size).permute(1, 0, 2).contiguous()  # [head, d, k]
        self.w_qkv = nn.Parameter(torch.stack([split(w[f"{r}.w"]) for r in ("query", "key", "value")]), requires_grad=False)
        self.b_qkv = nn.Parameter(torch.stack([w[f"{r}.b"].reshape(n_heads, key_size) for r in ("query", "key", "value")]), requires_grad=False)
        self.w_o = nn.Parameter(w["linear.w"].reshape(n_heads, key_size, d), requires_grad=False)  # [head, k, d]
        self.b_o = nn.Parameter(w["linear.b"], requires_grad=False)
        self.inputs = _HeadInputs(n_heads)
        self.pattern = _Identity()
        self.heads = _Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xin = self.inputs(x)  # [b, p, 3, h, d]
        qkv = torch.einsum("bprhd,rhde->bprhe", xin, self.w_qkv) + self.b_qkv
        q, k, v = qkv.unbind(dim=2)  # [b, p, h, e]
        logits = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(self.key_size)
        pattern = self.pattern(torch.softmax(logits, dim=-1))
        z = torch.einsum("bhqk,bkhe->bqhe", pattern, v)
        heads = self.heads(torch.einsum("bqhe,hed->bqhd", z, self.w_o))
        return heads.sum(dim=2) + self.b_o


class _MLP(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor]):
        super().__init__()
        self.w1 = nn.Parameter(w["linear_1.w"], requires_grad=False)
        self.b1 = nn.Parameter(w["linear_1.b"], requires_grad=False)
        self.w2 = nn.Parameter(w["linear_2.w"], requires_grad=False)
        self.b2 = nn.Parameter(w["linear_2.b"], requires_grad=False)
        self.act = _Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(torch.relu(x @ self.w1 + self.b1)) @ self.w2 + self.b2


class _Block(nn.Module):
    def __init__(self, w: dict[str, torch.Tensor], n_heads: int, key_size: int):
        super().__init__()
        self.attn = _Attention(w, n_heads, key_size)
        self.mid = _Identity()
        self.mlp = _MLP(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(x + self.attn(x))
        return x + self.mlp(x)


class _Unembed(nn.Module):
    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.matrix = nn.Parameter(matrix, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


class TracrTransformer(nn.Module):
    """A tracr-compiled program as a torch module: ``forward(ids [b, T]) -> [b, T, n_out]``.

    ``ids`` are tracr's input encodings, BOS (``self.bos_id``) first; :meth:`encode` makes them from
    token values, :meth:`decode` turns outputs back into values. ``meta`` holds the converter's JSON
    (config, encodings, ground-truth ``circuit``, ``reference`` input/output pairs).
    """

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]):
        super().__init__()
        cfg = meta["config"]
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32))
        self.meta = meta
        self.program = meta["program"]
        self.n_layers, self.n_heads, self.key_size, self.d_model = cfg["n_layers"], cfg["n_heads"], cfg["key_size"], cfg["d_model"]
        self.d_mlp = cfg["mlp_hidden"]
        self.categorical = bool(meta["categorical_output"])
        self.encoding = {value: i for value, i in meta["input_encoding"]}
        self.bos_id = self.encoding[meta["bos"]]
        self.output_values = meta["output_values"]
        self.embed = _Embed(t(arrays["token_embed"]), t(arrays["pos_embed"]))
        self.blocks = nn.ModuleList(
            _Block({k.split(".", 1)[1]: t(v) for k, v in arrays.items() if k.startswith(f"{l}.")}, self.n_heads, self.key_size)
            for l in range(self.n_layers)
        )
        self.unembed = _Unembed(t(arrays["unembed"]))

    @property
    def max_len(self) -> int:
        return self.embed.pos.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[1] > self.max_len:
            raise ValueError(f"{self.program}: inputs of {ids.shape[1]} positions, at most {self.max_len} (BOS included)")
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.unembed(x)

    def encode(self, sequences: Sequence[Sequence[Any]]) -> torch.Tensor:
        """Token values (without BOS) -> ``[b, 1 + T]`` ids with BOS first."""
        try:
            rows = [[self.bos_id] + [self.encoding[v] for v in seq] for seq in sequences]
        except KeyError as err:
            raise ValueError(f"{self.program}: token {err.args[0]!r} is not in the vocabulary {sorted(map(str, self.encoding))}") from None
        return torch.tensor(rows, dtype=torch.long)

    def decode(self, output: torch.Tensor) -> list[list[Any]]:
        """Outputs -> values per position (argmax for categorical programs); position 0 (BOS) included."""
        if self.categorical:
            return [[self.output_values[i] for i in row] for row in output.argmax(dim=-1).tolist()]
        return output[..., 0].tolist()

    @property
    def circuit_edges(self) -> list[str]:
        """The ground-truth edges (names as in :func:`crosspatch.methods.edges.edge_graph`)."""
        return list(self.meta["circuit"]["edges"])


def load(path: "str | Path", program: str | None = None) -> TracrTransformer:
    """Load ``<program>.npz`` + ``<program>.json`` written by ``tools/tracr_convert.py``.

    ``path`` is the ``.npz`` / ``.json`` file or its stem, or a folder with ``program`` given.
    """
    path = Path(path)
    if program is not None:
        path = path / program
    stem = path.with_suffix("") if path.suffix in (".npz", ".json") else path
    with np.load(stem.with_suffix(".npz")) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(stem.with_suffix(".json").read_text())
    return TracrTransformer(arrays, meta).eval()


def bos_default_edges(meta: dict[str, Any]) -> list[str]:
    """Ground-truth edges that carry only tracr's "attend to BOS by default" mechanism: a query reading
    only the ``one`` direction, a key reading only the BOS token direction. They matter only for a
    query position with no matching key, so on inputs where every query matches they have no effect."""
    out = []
    for edge, dirs in meta["circuit"]["edge_directions"].items():
        if ("[qkv=0," in edge and dirs == ["one"]) or ("[qkv=1," in edge and dirs == [f"tokens:{meta['bos']}"]):
            out.append(edge)
    return out
