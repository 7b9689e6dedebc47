"""Row-normalised absolute adjacency and influence by the Neumann series, on sparse matrices.

``normalize(A)`` is ``|A|`` with each row divided by its sum; ``influence(N, w)`` is
``w N + w N^2 + ...`` (``w [(I - N)^-1 - I]`` for the nilpotent ``N`` of an acyclic graph).
"""

from __future__ import annotations

import torch

__all__ = ["normalize", "influence"]


def _sparse(A: torch.Tensor) -> torch.Tensor:
    return (A if A.is_sparse else A.to_sparse()).coalesce()


def normalize(A: torch.Tensor) -> torch.Tensor:
    """``|A|`` with each row divided by its sum (rows summing to zero stay zero); sparse in, sparse out."""
    A = _sparse(A)
    index, values = A.indices(), A.values().abs()
    sums = torch.zeros(A.shape[0], dtype=values.dtype).index_add_(0, index[0], values)
    normed = values / sums[index[0]].clamp_min(1e-10)
    return torch.sparse_coo_tensor(index, normed, A.shape, check_invariants=False).coalesce()


def influence(N: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """``w N + w N^2 + ...`` for a nilpotent ``N`` (an acyclic graph), by the Neumann series."""
    Nt = _sparse(N).t().coalesce()
    current = torch.sparse.mm(Nt, weights.to(Nt.dtype)[:, None])[:, 0]
    total = current.clone()
    for _ in range(max_iter):
        if not bool(current.any()):
            return total
        current = torch.sparse.mm(Nt, current[:, None])[:, 0]
        total += current
    raise RuntimeError(f"influence did not vanish after {max_iter} terms: the graph has a cycle")


