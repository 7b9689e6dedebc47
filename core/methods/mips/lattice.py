"""The integer lattice finder: hidden states as integer coordinates ``h = o + z B``, ``z`` in ``Z^k``.

MIPS's description: a linear autoencoder (encode, round to integers, decode) whose basis vectors are
scaled by a real-valued greatest common divisor, choosing among candidate bases by minimal description
length. Ours: the states' span is found by SVD (its rank is ``k``); candidate bases of that span are
the principal axes, the shortest independent single-step displacements and the shortest independent
states; each candidate's axes are divided by the real GCD of the coordinates along them; a candidate
is a lattice when every state lies within ``tol`` (in lattice units) of an integer point, and the
lattice kept is the one whose integer codes are shortest (bits of ``log2(1 + |z|)`` summed, averaged
over states). Coordinates taking two adjacent values are shifted to ``{0, 1}`` (a Boolean lattice)
and signs are chosen so most coordinates are non-negative.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

__all__ = ["Lattice", "find_lattice", "real_gcd"]


@dataclass
class Lattice:
    """``h ≈ origin + coords @ basis``: ``basis [k, n]``, integer ``coords [N, k]``; ``residual`` is the
    largest distance of a state's coordinates from integers (lattice units), ``bits`` the mean code
    length per state, ``method`` which candidate basis won, ``boolean`` whether every coordinate is 0/1."""

    origin: np.ndarray
    basis: np.ndarray
    coords: np.ndarray
    residual: float
    bits: float
    method: str

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def boolean(self) -> bool:
        return bool(self.coords.size) and bool(np.isin(self.coords, (0, 1)).all())

    def encode(self, points: np.ndarray) -> np.ndarray:
        """Real-valued lattice coordinates of ``points [N, n]``."""
        return np.linalg.lstsq(self.basis.T, (points - self.origin).T, rcond=None)[0].T


def real_gcd(values: np.ndarray, tol: float = 0.05, max_divisor: int = 12) -> float | None:
    """The largest ``u`` such that every value is within ``tol * u / m`` of a multiple of ``u``, where
    ``u`` is one of the smallest non-negligible ``|values|`` divided by ``m`` = 1, 2, … ``max_divisor``
    (a finer unit must fit more tightly: with a loose tolerance any values fit a fine enough grid).
    The smallest values above several noise floors are tried as the base, so rounding noise around
    zero is not taken for the unit, and each candidate unit is refitted by least squares to all values; ``None`` if none fits."""
    v = np.abs(np.asarray(values, dtype=np.float64).ravel())
    top = float(v.max()) if v.size else 0.0
    if top == 0.0:
        return 1.0
    # the smallest value above each of several noise floors: noise near zero is not taken for the unit
    bases = {float(v[v > f * top].min()) for f in (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1) if (v > f * top).any()}
    for base in sorted(bases, reverse=True):  # larger bases give larger units: shorter codes first
        for m in range(1, max_divisor + 1):
            u = float(base) / m
            if top / u > 1e6:
                break
            n = np.round(v / u)
            if n.any():  # the unit refitted to every value: one small value is only a noisy estimate
                u = float(n @ v / (n @ n))
            if float(np.abs(v / u - np.round(v / u)).max()) < tol / m:
                return _largest_fitting(v, u, tol, max_divisor)
    return None


def _largest_fitting(v: np.ndarray, u: float, tol: float, max_divisor: int) -> float:
    """``u`` or a multiple ``q u`` that still fits every value (the base may have been a multiple)."""
    for q in range(max_divisor, 1, -1):
        if float(np.abs(v / (q * u) - np.round(v / (q * u))).max()) < tol:
            return q * u
    return u


def _independent_shortest(vectors: np.ndarray, k: int, ordered: bool = False) -> np.ndarray | None:
    """``k`` linearly independent rows of ``vectors``, shortest first (in the given order if
    ``ordered``); ``None`` if there are fewer."""
    norms = np.linalg.norm(vectors, axis=1)
    scale = float(norms.max()) if len(norms) else 0.0
    chosen: list[np.ndarray] = []
    for i in (range(len(norms)) if ordered else np.argsort(norms)):
        if norms[i] <= 1e-6 * scale:
            continue
        trial = np.array(chosen + [vectors[i]])
        if np.linalg.matrix_rank(trial, tol=1e-3 * scale) == len(trial):
            chosen.append(vectors[i])
            if len(chosen) == k:
                return np.array(chosen)
    return None


def _distinct(vectors: np.ndarray, grid: float) -> np.ndarray:
    """One original row per cell of a ``grid``-sized mesh (duplicates up to rounding dropped)."""
    _, first = np.unique(np.round(vectors / grid), axis=0, return_index=True)
    return vectors[np.sort(first)]


def _try_basis(y: np.ndarray, b: np.ndarray, tol: float, shift: bool = False
               ) -> tuple[np.ndarray, np.ndarray, float, np.ndarray] | None:
    """Integer coordinates of ``y`` in basis rows ``b`` (each axis divided by its real GCD), the basis
    and offset refitted to every state, the largest distance from integers; ``None`` if off-lattice.
    ``shift`` first moves each axis by the circular mean of its fractional parts (a lattice whose
    origin is not the first state)."""
    if abs(np.linalg.det(b)) < 1e-12 * max(float(np.abs(b).max()), 1e-300) ** b.shape[0]:
        return None
    z = y @ np.linalg.inv(b)
    if shift:
        angle = 2 * np.pi * z
        z = z - np.arctan2(np.sin(angle).mean(0), np.cos(angle).mean(0)) / (2 * np.pi)
    for i in range(z.shape[1]):
        u = real_gcd(z[:, i], tol)
        if u is None:
            return None
        z[:, i] /= u
    residual = float(np.abs(z - np.round(z)).max()) if z.size else 0.0
    if residual >= tol:
        return None
    zi = np.round(z).astype(np.int64)
    design = np.concatenate([zi.astype(np.float64), np.ones((len(zi), 1))], axis=1)
    if np.linalg.matrix_rank(design) < design.shape[1]:
        return None
    fit = np.linalg.lstsq(design, y, rcond=None)[0]  # the decoder and offset refitted to every state
    return zi, fit[:-1], residual, fit[-1]


def _tidy(z: np.ndarray, b: np.ndarray, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signs so most coordinates are non-negative; two-valued coordinates shifted to ``{0, 1}``."""
    z, b, origin = z.copy(), b.copy(), origin.copy()
    for i in range(z.shape[1]):
        if (z[:, i] < 0).sum() > (z[:, i] > 0).sum():
            z[:, i], b[i] = -z[:, i], -b[i]
        lo, hi = int(z[:, i].min()), int(z[:, i].max())
        if hi - lo == 1 and lo != 0:
            z[:, i] -= lo
            origin = origin + lo * b[i]
    return z, b, origin


def find_lattice(
    points: np.ndarray, origin: np.ndarray, steps: np.ndarray | None = None, tol: float = 0.1,
    directions: np.ndarray | None = None,
) -> Lattice | None:
    """The shortest-code integer lattice through ``origin`` holding ``points [N, n]``, or ``None``.

    ``steps`` are single-step displacements ``h_t - h_{t-1}``; ``directions`` are what changing one
    earlier input by one symbol does to the state (``j`` steps back, one row each): both give candidate
    basis vectors."""
    points = np.asarray(points, dtype=np.float64)
    d = points - origin
    scale = float(np.abs(d).max()) if d.size else 0.0
    if scale == 0.0:
        return Lattice(origin, np.zeros((0, points.shape[1])), np.zeros((len(points), 0), np.int64), 0.0, 0.0, "point")
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    k = int((s > 1e-5 * s[0]).sum())
    span = vt[:k]
    y = d @ span.T
    candidates: list[tuple[str, np.ndarray]] = [("principal axes", np.eye(k))]
    if directions is not None and len(directions):
        b = _independent_shortest(np.asarray(directions) @ span.T, k, ordered=True)
        if b is not None:
            candidates.append(("input differences", b))
    if steps is not None and len(steps):
        b = _independent_shortest(_distinct(steps @ span.T, 1e-4 * scale), k)
        if b is not None:
            candidates.append(("shortest steps", b))
    b = _independent_shortest(_distinct(y, 1e-4 * scale), k)
    if b is not None:
        candidates.append(("shortest states", b))
    best: Lattice | None = None
    for (name, basis), shift in itertools.product(candidates, (False, True)):
        found = _try_basis(y, basis, tol, shift)
        if found is None:
            continue
        z, b, residual, offset = found
        at = np.linalg.lstsq(b.T, -offset, rcond=None)[0]  # where ``origin`` (the first state) falls
        if np.abs(at - np.round(at)).max() < tol:  # on the lattice: make it the zero of the coordinates
            offset, z = offset + np.round(at) @ b, z - np.round(at).astype(np.int64)
        z, b, o = _tidy(z, b @ span, origin + offset @ span)
        bits = float(np.log2(1 + np.abs(z)).sum(1).mean())
        if best is None or bits < best.bits - 1e-9:
            best = Lattice(o, b, z, residual, bits, name)
    return best
