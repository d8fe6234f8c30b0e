"""A shortcut that returns lapjv's answer without running lapjv, when that answer is certain.

lapjv solves the padded problem in float32. Where the optimal assignment is unique by a clear
margin, lapjv finds it; only near-ties (alternatives within about one float32 ulp of 1000, the
padding cost, i.e. ~6e-5) can come out differently. So: compute the exact optimum of the
float32-rounded costs in float64, measure by how much every other assignment is worse, and
accept the optimum only when that margin is at least ``MARGIN``. Otherwise return ``None`` and
let the caller solve exactly (``assign.jv``, the port of lapjv, or lapjv itself).

The margin is the smallest cost increase of any alternative assignment. Relative to the optimum
sigma, an alternative is a set of disjoint moves, each either a cycle (rows exchanging their
columns) or a chain ending in a column sigma leaves unused. With edge weights
``w[i, l] = C[i, sigma(l)] - C[i, sigma(i)]`` (row i takes row l's column) and exit weights
``e[i] = min over unused columns u of C[i, u] - C[i, sigma(i)]``, a move costs the sum of its
weights, so the margin is min(shortest cycle, shortest chain ending in an exit): all-pairs
shortest paths on the rows. Scope: |similarity| <= 1 (CLIP cosines), where the float32 values
lapjv compares stay within [999, 1001].

Measured on ~150,000 random matrices (1..60 images x 2..700 sentences; CLIP-like, uniform,
tightly clustered, and values a few ulps apart): every disagreement with lapjv had a margin
below 1.1e-4 (under two float32 ulps at 1000). ``MARGIN`` is nine times that;
tests/test_assign_solve.py checks thousands more, including margins around ``MARGIN``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
from numba import njit
from numpy.typing import NDArray


# Imported once here: importing scipy takes ~0.3 s, far too long to pay inside a shard.
def _load_scipy_solver() -> Any:
    with contextlib.suppress(ImportError):  # optional dependency
        from scipy.optimize import linear_sum_assignment

        return linear_sum_assignment
    return None


_linear_sum_assignment: Any = _load_scipy_solver()

MARGIN = 1e-3
MAX_ABS_SIMILARITY = 1.0
# All-pairs shortest paths cost O(rows^3); above this, the exact solve is the cheaper check.
MAX_CERTIFIED_ROWS = 64

IntArray = NDArray[np.intp]
FloatArray = NDArray[np.float64]


def certified_assignment(sim: FloatArray) -> list[int] | None:
    """lapjv's assignment if the shortcut can vouch for it, else ``None``."""
    if sim.shape[0] <= sim.shape[1] and sim.dtype == np.float64 and sim.flags.c_contiguous:
        # The commonest case, decided in compiled code exactly as below.
        status, fast = rows_on_distinct_columns(sim)
        if status == CERTIFIED:
            result: list[int] = fast.tolist()
            return result
        if status == REFUSED:
            return None
    return certified_in_numpy(sim)


def certified_in_numpy(sim: FloatArray) -> list[int] | None:
    """``certified_assignment`` for every shape, in numpy (the reference for its fast case)."""
    if not float(np.abs(sim).max()) <= MAX_ABS_SIMILARITY:
        return None
    # The very costs lapjv compares: float32-rounded, negated; float64 keeps them exact here.
    cost = -(sim.astype(np.float32).astype(np.float64))
    n_images, n_sentences = sim.shape
    if n_images <= n_sentences:
        cols = _certified_optimum(cost)
        return None if cols is None else [int(j) for j in cols]
    # More images than sentences: every sentence gets one image; solve the transpose.
    images = _certified_optimum(np.ascontiguousarray(cost.T))
    if images is None:
        return None
    out = [-1] * n_images
    for sentence, image in enumerate(images.tolist()):
        out[image] = sentence
    # The reference sends images left over to their argmax on the float64 row.
    return [j if j >= 0 else int(np.argmax(sim[i])) for i, j in enumerate(out)]


CERTIFIED, REFUSED, UNDECIDED = 1, 0, -1


@njit("Tuple((int64, int64[::1]))(float64[:, ::1])", cache=True, nogil=True)
def rows_on_distinct_columns(sim: FloatArray) -> tuple[int, NDArray[np.int64]]:
    """``certified_assignment`` for images <= sentences when every image's cheapest sentence
    is its own (or there is one image): the same float64 operations as ``_certified_optimum``
    and ``_row_gap``. Otherwise ``UNDECIDED``: the general code decides."""
    rows, cols = sim.shape
    best = np.empty(rows, np.int64)
    taken = np.zeros(cols, np.bool_)
    distinct = True
    gap = np.inf
    for i in range(rows):
        lowest = np.inf  # smallest and second smallest cost of the row, duplicates counted
        second = np.inf
        at = -1
        for j in range(cols):
            value = sim[i, j]
            if not abs(value) <= MAX_ABS_SIMILARITY:
                return REFUSED, best
            c = -np.float64(np.float32(value))
            if c < lowest:
                second = lowest
                lowest = c
                at = j
            elif c < second:
                second = c
        best[i] = at
        if taken[at]:
            distinct = False
        taken[at] = True
        gap = min(gap, second - lowest)
    if cols == 1:
        return CERTIFIED, best
    if rows == 1 or distinct:
        return (CERTIFIED if gap >= MARGIN else REFUSED), best
    return UNDECIDED, best


def _certified_optimum(cost: FloatArray) -> IntArray | None:
    """Column of each row in the unique optimum (rows <= columns), if its margin is clear."""
    rows, cols = cost.shape
    best: IntArray = cost.argmin(axis=1)
    if cols == 1:
        return best  # one row, one column: nothing else is possible
    if rows == 1 or len(set(best.tolist())) == rows:
        # Every row already sits on its own cheapest column: any change costs at least the
        # smallest gap between a row's cheapest and second-cheapest column.
        return best if _row_gap(cost, best) >= MARGIN else None
    if rows > MAX_CERTIFIED_ROWS:
        return None
    optimum = _exact_optimum(cost)
    if optimum is None:
        return None
    return optimum if _margin(cost, optimum) >= MARGIN else None


def _row_gap(cost: FloatArray, best: IntArray) -> float:
    second = np.partition(cost, 1, axis=1)[:, 1]
    own = cost[np.arange(cost.shape[0]), best]
    return float((second - own).min())


def _exact_optimum(cost: FloatArray) -> IntArray | None:
    if _linear_sum_assignment is None:  # scipy is optional; lapjv then decides
        return None
    _, cols = _linear_sum_assignment(cost)
    result: IntArray = cols.astype(np.intp)
    return result


def _margin(cost: FloatArray, cols: IntArray) -> float:
    """Smallest cost increase of any assignment other than ``cols`` (negative: not optimal)."""
    rows, n_cols = cost.shape
    own = cost[np.arange(rows), cols]
    dist = cost[:, cols] - own[:, None]
    np.fill_diagonal(dist, np.inf)
    if n_cols > rows:
        unused = np.ones(n_cols, dtype=bool)
        unused[cols] = False
        exits = cost[:, unused].min(axis=1) - own
    else:
        exits = np.full(rows, np.inf)
    for k in range(rows):  # Floyd-Warshall; the diagonal ends up holding shortest cycles
        np.minimum(dist, dist[:, k : k + 1] + dist[k : k + 1, :], out=dist)
    shortest_cycle = float(np.diagonal(dist).min())
    shortest_chain = float((exits + np.minimum(0.0, dist.min(axis=0))).min())
    return min(shortest_cycle, shortest_chain)
