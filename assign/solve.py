"""Assign each image of one document to a sentence, as MMC4's ``compute_assignments.py`` does.

The reference negates the (images x sentences) similarity matrix, pads it to a square with the
constant 1000, solves it with ``lapjv`` (which works on the matrix rounded to float32), keeps
the pairs that fall inside the real matrix and, when there are more images than sentences,
sends every image left without a sentence to its most similar sentence (``argmax`` on the
original float64 row, first index on ties).

``solver="lapjv"`` calls ``lapjv`` on the very matrix the reference builds, so ties and float32
near-ties are broken as the reference breaks them. ``solver="scipy"`` solves the rectangular
problem in float64 with ``scipy.optimize.linear_sum_assignment``: the same optimum, but ties
(and near-ties below float32 resolution) may be broken differently from the reference.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from lapjv import lapjv
from numpy.typing import NDArray

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
    if solver == "lapjv":
        return _lapjv_assign(sim)
    if solver == "scipy":
        return _scipy_assign(sim)
    raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")


def _lapjv_assign(sim: NDArray[np.float64]) -> list[int]:
    n_images, n_sentences = sim.shape
    dim = max(n_images, n_sentences)
    # The reference's padded matrix, rounded to float32 here as lapjv would round it (a numpy
    # cast either way); handing lapjv float32 spares it a conversion per call.
    cost = np.full((dim, dim), DUMMY_COST, dtype=np.float32)
    np.negative(sim, out=cost[:n_images, :n_sentences], casting="same_kind")
    chosen = lapjv(cost)[0][:n_images]
    return _fill_unassigned(sim, chosen)


def _scipy_assign(sim: NDArray[np.float64]) -> list[int]:
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(sim, maximize=True)
    # n_sentences marks "no sentence yet" for the images the rectangular problem leaves out.
    chosen = np.full(sim.shape[0], sim.shape[1], dtype=np.int64)
    chosen[rows] = cols
    return _fill_unassigned(sim, chosen)


def _fill_unassigned(sim: NDArray[np.float64], chosen: NDArray[np.int64]) -> list[int]:
    """Images without a sentence of their own (``chosen`` beyond the last sentence: possible
    only with more images than sentences) go to their most similar one, as in the reference.
    ``chosen`` is the caller's own array and is changed in place."""
    n_images, n_sentences = sim.shape
    if n_images > n_sentences:
        unassigned = chosen >= n_sentences
        chosen[unassigned] = sim[unassigned].argmax(axis=1)
    out: list[int] = chosen.tolist()
    return out
