"""Assign each image of one document to a sentence, as MMC4's ``compute_assignments.py`` does.

The reference pads the (images x sentences) cost matrix ``-similarity`` to a square with the
constant 1000, solves it with ``lapjv`` (which, by default, casts the matrix to float32), keeps
the pairs that fall inside the real matrix and, when there are more images than sentences,
sends every image left without a sentence to its most similar sentence (``argmax`` on the
original float64 row, first index on ties).

``solver="lapjv"`` reproduces that result exactly, ties included. ``assign.jv`` is a step-for-step
port of lapjv's own float32 solver compiled with numba: the same answer by construction,
without lapjv's per-call overheads, and several times faster on the padded matrices. Matrices
up to 63 x 63 (nearly every document) go straight to it; larger ones too (the padded problem
costs O(d^3), d = max(images, sentences), so a document with hundreds of sentences is slow),
or to lapjv itself on a machine whose lapjv kernel the port could not identify. No shortcut
that is not lapjv step for step is taken: a certificate of optimality with a safety margin
was tried, but the margin that makes lapjv's float32 rounding harmless was measured, not
proven.

``solver="scipy"`` solves the rectangular problem exactly in float64 with
``scipy.optimize.linear_sum_assignment``: same optimum, but ties (and near-ties below float32
resolution) may be broken differently from the reference.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from lapjv import lapjv
from numpy.typing import NDArray

from assign.jv import MAX_DIM as JV_MAX_DIM
from assign.jv import exact_assign, jv_assign

Solver = Literal["lapjv", "scipy"]
SOLVERS: tuple[Solver, ...] = ("lapjv", "scipy")

# The reference's padding cost (its `max_dummy_cost_value`).
DUMMY_COST = 1000.0


def assign(sim: NDArray[np.float64], solver: Solver = "lapjv") -> list[int]:
    """Sentence index for every image (row) of a finite, non-empty similarity matrix."""
    n_images, n_sentences = sim.shape
    if n_images == 0 or n_sentences == 0:
        raise ValueError(f"similarity matrix must not be empty, got shape {sim.shape}")
    if n_sentences == 1:
        # Every image can only go to sentence 0: the solved ones and the argmax-filled ones.
        return [0] * n_images
    if solver == "scipy":
        return _scipy_assign(sim)
    if solver != "lapjv":
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if max(n_images, n_sentences) <= JV_MAX_DIM:
        return jv_assign(sim)
    exact = exact_assign(sim)
    return exact if exact is not None else lapjv_assign(sim)


def lapjv_assign(sim: NDArray[np.float64]) -> list[int]:
    """The reference algorithm itself: lapjv on the float32 padded matrix, argmax fill."""
    n_images, n_sentences = sim.shape
    dim = max(n_images, n_sentences)
    cost = np.full((dim, dim), DUMMY_COST, dtype=np.float32)
    # Same float64 -> float32 rounding lapjv applies to the reference's float64 input.
    np.negative(sim, out=cost[:n_images, :n_sentences], casting="same_kind")
    rowsol = lapjv(cost)[0][:n_images].tolist()
    if n_images <= n_sentences:
        return [int(j) for j in rowsol]
    return _fill_unassigned(sim, rowsol)


def _fill_unassigned(sim: NDArray[np.float64], rowsol: list[int]) -> list[int]:
    """Images that landed on a padding column go to their best sentence, as in the reference."""
    n_sentences = sim.shape[1]
    out: list[int] = []
    for i, j in enumerate(rowsol):
        out.append(int(j) if j < n_sentences else int(np.argmax(sim[i])))
    return out


def _scipy_assign(sim: NDArray[np.float64]) -> list[int]:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(sim, maximize=True)
    n_images, n_sentences = sim.shape
    out = [n_sentences] * n_images  # n_sentences marks "no sentence yet"
    for i, j in zip(rows.tolist(), cols.tolist(), strict=True):
        out[i] = j
    if n_images > n_sentences:
        return _fill_unassigned(sim, out)
    return out
