"""lapjv's own algorithm, compiled with numba: the reference's answer without its overheads.

The ``lapjv`` package (src-d/lapjv, ``lap.h``) solves the padded square problem in float32 with
the Jonker-Volgenant algorithm. For matrices smaller than its ``FLOAT_MIN_DIM`` (64) it always
uses the scalar minimum search (``find_umins_regular``), never its AVX2 kernel, so the whole
solve is a fixed sequence of float32 subtractions and comparisons. ``_lap`` below performs
that sequence step for step (same loops, same order of operations, same tie rules, same
aliasing of the free-row list onto ``matches``), so on the same float32 matrix it returns the
same row solution: the same answer by construction, not by a margin. The tests compare it with
lapjv itself on hundreds of thousands of matrices, ties and near-ties included.

What it saves is everything around the solve: building the padded matrix in numpy, lapjv's
argument parsing and its four output arrays, and the Python loop that keeps the real pairs and
fills the images left over with their argmax. For a typical MMC4 document that overhead is most
of the cost.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

# lapjv switches to its AVX2 minimum search from this size on: beyond it, call lapjv itself.
MAX_DIM = 63

_FLT_MAX = np.float32(np.finfo(np.float32).max)
_DUMMY = np.float32(1000.0)


# Explicit signatures: compiled (or loaded from numba's cache) when this module is imported,
# not inside the first shard.
@njit("int64[::1](int64, float32[:, ::1], int64)", cache=True, nogil=True)
def _lap(dim: int, cost: NDArray[np.float32], real_rows: int) -> NDArray[np.int64]:
    """Row solution of lap.h ``lap<avx2=false>`` on a square float32 ``cost`` (dim < 64).

    Rows from ``real_rows`` on must be padding (all 1000) and every cost at most 1000; two loops
    then skip work whose outcome is known (see the comments), which changes no result.
    """
    collist = np.empty(dim, np.int64)
    matches = np.zeros(dim, np.int64)
    d = np.empty(dim, np.float32)
    pred = np.empty(dim, np.int64)
    rowsol = np.full(dim, -1, np.int64)
    colsol = np.full(dim, -1, np.int64)
    v = np.empty(dim, np.float32)

    # COLUMN REDUCTION, last column first.
    for j in range(dim - 1, -1, -1):
        low_cost = cost[0, j]
        imin = 0
        for i in range(1, real_rows):
            if cost[i, j] < low_cost:
                low_cost = cost[i, j]
                imin = i
        # Padding rows: lap.h takes the first of them only if it is strictly smaller.
        if real_rows < dim and low_cost > _DUMMY:
            low_cost = _DUMMY
            imin = real_rows
        v[j] = low_cost
        matches[imin] += 1
        if matches[imin] == 1:
            rowsol[imin] = j
            colsol[j] = imin
        else:
            colsol[j] = -1

    # REDUCTION TRANSFER. lap.h writes the free-row list into ``matches`` itself.
    free = matches
    numfree = 0
    for i in range(dim):
        if matches[i] == 0:
            free[numfree] = i
            numfree += 1
        elif matches[i] == 1:
            j1 = rowsol[i]
            low_cost = _FLT_MAX
            for j in range(dim):
                if j != j1 and cost[i, j] - v[j] < low_cost:
                    low_cost = cost[i, j] - v[j]
            v[j1] = v[j1] - low_cost

    # AUGMENTING ROW REDUCTION, twice.
    for _loop in range(2):
        k = 0
        prevnumfree = numfree
        numfree = 0
        while k < prevnumfree:
            i = free[k]
            k += 1
            # find_umins_regular
            umin = cost[i, 0] - v[0]
            j1 = 0
            j2 = -1
            usubmin = _FLT_MAX
            for j in range(1, dim):
                h = cost[i, j] - v[j]
                if h < usubmin:
                    if h >= umin:
                        usubmin = h
                        j2 = j
                    else:
                        usubmin = umin
                        umin = h
                        j2 = j1
                        j1 = j
            i0 = colsol[j1]
            vj1_new = v[j1] - (usubmin - umin)
            vj1_lowers = vj1_new < v[j1]
            if vj1_lowers:
                v[j1] = vj1_new
            elif i0 >= 0:
                j1 = j2
                i0 = colsol[j2]
            rowsol[i] = j1
            colsol[j1] = i
            if i0 >= 0:
                if vj1_lowers:
                    k -= 1
                    free[k] = i0
                else:
                    free[numfree] = i0
                    numfree += 1

    # AUGMENT SOLUTION for each free row (Dijkstra).
    for f in range(numfree):
        freerow = free[f]
        endofpath = -1
        for j in range(dim):
            d[j] = cost[freerow, j] - v[j]
            pred[j] = freerow
            collist[j] = j
        low = 0
        up = 0
        unassigned_found = False
        last = 0
        low_cost = np.float32(0.0)
        while True:
            if up == low:
                last = low - 1
                low_cost = d[collist[up]]
                up += 1
                for k in range(up, dim):
                    j = collist[k]
                    h = d[j]
                    if h <= low_cost:
                        if h < low_cost:
                            up = low
                            low_cost = h
                        collist[k] = collist[up]
                        collist[up] = j
                        up += 1
                for k in range(low, up):
                    if colsol[collist[k]] < 0:
                        endofpath = collist[k]
                        unassigned_found = True
                        break
            if not unassigned_found:
                j1 = collist[low]
                low += 1
                i = colsol[j1]
                h = cost[i, j1] - v[j1] - low_cost
                if i >= real_rows and h <= 0:
                    # A padding row with h <= 0 gives v2 = (1000 - v[j]) - h >= 1000 - v[j],
                    # and d[j] <= 1000 - v[j] always here (it starts at cost[freerow, j] - v[j]
                    # with every cost <= 1000, and only decreases): no ``v2 < d[j]``, so the
                    # loop below would change nothing.
                    continue
                for k in range(up, dim):
                    j = collist[k]
                    v2 = cost[i, j] - v[j] - h
                    if v2 < d[j]:
                        pred[j] = i
                        if v2 == low_cost:
                            if colsol[j] < 0:
                                endofpath = j
                                unassigned_found = True
                                break
                            collist[k] = collist[up]
                            collist[up] = j
                            up += 1
                        d[j] = v2
            if unassigned_found:
                break

        for k in range(last + 1):
            j1 = collist[k]
            v[j1] = v[j1] + d[j1] - low_cost

        while True:
            i = pred[endofpath]
            colsol[endofpath] = i
            j1 = endofpath
            endofpath = rowsol[i]
            rowsol[i] = j1
            if i == freerow:
                break
    return rowsol


@njit("int64[::1](float64[:, ::1])", cache=True, nogil=True)
def _assign(sim: NDArray[np.float64]) -> NDArray[np.int64]:
    n_images, n_sentences = sim.shape
    dim = max(n_images, n_sentences)
    cost = np.full((dim, dim), _DUMMY, np.float32)
    bounded = True
    for i in range(n_images):
        for j in range(n_sentences):
            cost[i, j] = np.float32(-sim[i, j])  # float64 -> float32, as lapjv casts it
            if not cost[i, j] <= _DUMMY:
                bounded = False
    rowsol = _lap(dim, cost, n_images if bounded else dim)
    out = np.empty(n_images, np.int64)
    for i in range(n_images):
        j = rowsol[i]
        if j < n_sentences:
            out[i] = j
        else:  # a padding column: the reference sends the image to its float64 argmax
            best = 0
            for k in range(1, n_sentences):
                if sim[i, k] > sim[i, best]:
                    best = k
            out[i] = best
    return out


def lapjv_rowsol(cost: NDArray[np.float32]) -> NDArray[np.int64]:
    """lapjv's row solution of a square float32 matrix smaller than 64 x 64 (for tests)."""
    dim = cost.shape[0]
    if cost.shape != (dim, dim) or not 0 < dim <= MAX_DIM:
        raise ValueError(f"need a square matrix of at most {MAX_DIM} rows, got {cost.shape}")
    result: NDArray[np.int64] = _lap(dim, np.ascontiguousarray(cost, dtype=np.float32), dim)
    return result


def jv_assign(sim: NDArray[np.float64]) -> list[int]:
    """The reference's assignment for a finite similarity matrix with max(shape) <= MAX_DIM."""
    if not 0 < max(sim.shape) <= MAX_DIM or min(sim.shape) < 1:
        raise ValueError(f"need a non-empty matrix of at most {MAX_DIM} rows/columns")
    result: list[int] = _assign(np.ascontiguousarray(sim, dtype=np.float64)).tolist()
    return result
