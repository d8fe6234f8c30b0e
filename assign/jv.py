"""lapjv's own algorithm, compiled with numba: the reference's answer, faster.

The ``lapjv`` package (src-d/lapjv, ``lap.h``) solves the padded square problem in float32 with
the Jonker-Volgenant algorithm. ``_lap`` below performs the same sequence of float32
subtractions and comparisons step for step (same loops, same order of operations, same tie
rules, same aliasing of the free-row list onto ``matches``), so on the same float32 matrix it
returns the same row solution: the same answer by construction, not by a margin.

One part of lapjv depends on the machine: the search for a row's two smallest reduced costs.
Below 64 columns it is always the scalar loop (``find_umins_regular``); from 64 on, a lapjv built
for AVX2 running on a CPU that has it uses an eight-lane vector search (``find_umins_avx2``)
whose tie-breaking differs. Both are reproduced here; which one this machine's lapjv uses is
asked of lapjv itself at import (``_detect_kernel``), and if neither matches, matrices of 64 or
more are left to lapjv. The tests compare the port with lapjv on many thousands of matrices,
ties and near-ties included.

What it saves: building the padded matrix in numpy, lapjv's argument parsing and its four
output arrays, the Python loop that keeps the real pairs and fills the images left over with
their argmax; and, on the padding rows, two loops whose outcome is known (see the comments in
``_lap``) and most of their minimum searches (with either search: only what changed since the
last padding row is searched again). On a typical padded MMC4 matrix that is most of the cost.
"""

from __future__ import annotations

import numpy as np
from lapjv import lapjv
from numba import njit
from numpy.typing import NDArray

# Up to this size lapjv never uses its vector search: jv_assign needs no kernel detection.
MAX_DIM = 63

_FLT_MAX = np.float32(np.finfo(np.float32).max)
# lap.h's FLOAT_MIN_DIM: from this size on, lapjv built with AVX2 uses its vector kernel.
AVX2_MIN_DIM = 64
_DUMMY = np.float32(1000.0)


@njit(cache=True, nogil=True, inline="always")
def _offer(
    h: np.float32, j: int, umin: np.float32, usubmin: np.float32, j1: int, j2: int
) -> tuple[np.float32, np.float32, int, int]:
    """lap.h's update of (smallest, second smallest) and their columns with value h at j:
    a tie with the smallest goes to second place; the first of equal seconds stays."""
    if h < usubmin:
        if h >= umin:
            return umin, h, j1, j
        return h, umin, j, j1
    return umin, usubmin, j1, j2


@njit(cache=True, nogil=True, inline="always")
def _find_umins_regular(
    dim: int, row: NDArray[np.float32], v: NDArray[np.float32]
) -> tuple[np.float32, np.float32, int, int]:
    """lap.h ``find_umins_regular``: smallest and second smallest ``row - v``, first indices."""
    umin = row[0] - v[0]
    j1 = 0
    j2 = -1
    usubmin = _FLT_MAX
    for j in range(1, dim):
        umin, usubmin, j1, j2 = _offer(row[j] - v[j], j, umin, usubmin, j1, j2)
    return umin, usubmin, j1, j2


@njit(cache=True, nogil=True, inline="always")
def _find_umins_avx2(
    dim: int,
    row: NDArray[np.float32],
    v: NDArray[np.float32],
    lane_umin: NDArray[np.float32],
    lane_usubmin: NDArray[np.float32],
    lane_j1: NDArray[np.int64],
    lane_j2: NDArray[np.int64],
) -> tuple[np.float32, np.float32, int, int]:
    """lap.h ``find_umins_avx2`` (float): eight lanes of minima, merged, then the tail. (Each
    lane folds its own columns, j = lane mod 8, in order: lane by lane is the same result.)"""
    return _find_umins_avx2_kept(dim, row, v, lane_umin, lane_usubmin, lane_j1, lane_j2, 0xFF)


@njit(cache=True, nogil=True, inline="always")
def _merge_lanes(
    dim: int,
    row: NDArray[np.float32],
    v: NDArray[np.float32],
    lane_umin: NDArray[np.float32],
    lane_usubmin: NDArray[np.float32],
    lane_j1: NDArray[np.int64],
    lane_j2: NDArray[np.int64],
) -> tuple[np.float32, np.float32, int, int]:
    """The end of lap.h ``find_umins_avx2``: the eight lanes merged, then the last columns."""
    j1 = -1
    j2 = -1
    umin = _FLT_MAX
    usubmin = _FLT_MAX
    for lane in range(8):
        umin, usubmin, j1, j2 = _offer(lane_umin[lane], lane_j1[lane], umin, usubmin, j1, j2)
    for lane in range(8):
        h = lane_usubmin[lane]
        if h < usubmin:
            usubmin = h
            j2 = lane_j2[lane]
    for j in range(dim & ~7, dim):
        umin, usubmin, j1, j2 = _offer(row[j] - v[j], j, umin, usubmin, j1, j2)
    return umin, usubmin, j1, j2


@njit(cache=True, nogil=True, inline="always")
def _find_umins_avx2_kept(
    dim: int,
    row: NDArray[np.float32],
    v: NDArray[np.float32],
    lane_umin: NDArray[np.float32],
    lane_usubmin: NDArray[np.float32],
    lane_j1: NDArray[np.int64],
    lane_j2: NDArray[np.int64],
    stale: int,
) -> tuple[np.float32, np.float32, int, int]:
    """``_find_umins_avx2`` for a row searched before, whose lanes' state was kept: only the
    lanes set in the bit mask ``stale`` (those with a column whose ``row - v`` changed since)
    are scanned again, each over all its columns in order as the full search does; the others
    would end as they are. The merge and the last columns are done in full."""
    for lane in range(8):
        if stale >> lane & 1:
            umin = _FLT_MAX
            usubmin = _FLT_MAX
            j1 = -1
            j2 = -1
            for j in range(lane, dim & ~7, 8):
                h = row[j] - v[j]
                if h <= umin:  # _CMP_LE_OQ
                    usubmin = umin
                    j2 = j1
                    umin = h
                    j1 = j
                elif h < usubmin:  # _CMP_LT_OQ
                    usubmin = h
                    j2 = j
            lane_umin[lane] = umin
            lane_usubmin[lane] = usubmin
            lane_j1[lane] = j1
            lane_j2[lane] = j2
    return _merge_lanes(dim, row, v, lane_umin, lane_usubmin, lane_j1, lane_j2)


# Padding rows in the augmenting row reduction. Every padding row costs 1000 everywhere, so
# its reduced costs are the same for all of them: h[j] = 1000 - v[j] (float32), and the scalar
# search's answer is the two smallest (h[j], j) in lexicographic order (its first minimum, then
# the next value or the next index of a tie). During that phase v only ever decreases, so h
# only increases. ``lowest`` keeps, sorted, the columns at or below a boundary (the K-th
# smallest when it was built): a column whose h rises above the boundary leaves it, one outside
# can never come back below it, so its first two are always the two smallest. When fewer than
# two remain it is built again by one scan.
_LOWEST = 16


@njit(cache=True, nogil=True, inline="always")
def _before(h_a: np.float32, a: int, h_b: np.float32, b: int) -> bool:
    return bool(h_a < h_b or (h_a == h_b and a < b))


@njit(cache=True, nogil=True)
def _build_lowest(
    dim: int, v: NDArray[np.float32], heights: NDArray[np.float32], order: NDArray[np.int64]
) -> int:
    """Fill ``order`` with the ``len(order)`` smallest (h, j), sorted; returns their number."""
    size = 0
    capacity = order.size
    for j in range(dim):
        h = _DUMMY - v[j]
        heights[j] = h
        if size == capacity and not _before(h, j, heights[order[size - 1]], order[size - 1]):
            continue
        at = size if size < capacity else capacity - 1
        while at > 0 and _before(h, j, heights[order[at - 1]], order[at - 1]):
            order[at] = order[at - 1]
            at -= 1
        order[at] = j
        size = min(size + 1, capacity)
    return size


@njit(cache=True, nogil=True)
def _raise_column(
    j: int,
    h: np.float32,
    heights: NDArray[np.float32],
    order: NDArray[np.int64],
    size: int,
    bound_h: np.float32,
    bound_j: int,
) -> int:
    """Column ``j``'s h has risen to ``h``: move it right in ``order`` or drop it past the
    boundary. Returns the new size."""
    at = 0
    while at < size and order[at] != j:
        at += 1
    if at == size:
        return size  # outside: it stays outside
    heights[j] = h
    if not _before(h, j, bound_h, bound_j) and not (h == bound_h and j == bound_j):
        for k in range(at, size - 1):
            order[k] = order[k + 1]
        return size - 1
    while at + 1 < size and _before(heights[order[at + 1]], order[at + 1], h, j):
        order[at] = order[at + 1]
        at += 1
    order[at] = j
    return size


# Explicit signatures: compiled (or loaded from numba's cache) when this module is imported,
# not inside the first shard.
@njit("int64[::1](int64, float32[:, ::1], int64, boolean)", cache=True, nogil=True)
def _lap(dim: int, cost: NDArray[np.float32], real_rows: int, avx2: bool) -> NDArray[np.int64]:
    """Row solution of lap.h ``lap<avx2>`` on a square float32 ``cost``.

    Rows from ``real_rows`` on must be padding (all 1000) and every cost at most 1000; two loops
    then skip work whose outcome is known (see the comments), and the padding rows' minimum
    search in the augmenting row reduction is kept instead of redone: sorted with the scalar
    search (see ``_build_lowest``), as the eight lanes' state with the AVX2 search (see
    ``_find_umins_avx2_kept``). None of this changes a result.
    """
    # Two allocations instead of eleven: on small matrices they cost more than the solve.
    ints = np.empty(5 * dim + 32 + _LOWEST, np.int64)
    floats = np.empty(3 * dim + 32, np.float32)
    collist = ints[:dim]
    matches = ints[dim : 2 * dim]
    matches[:] = 0
    pred = ints[2 * dim : 3 * dim]
    rowsol = ints[3 * dim : 4 * dim]
    rowsol[:] = -1
    colsol = ints[4 * dim : 5 * dim]
    colsol[:] = -1
    lane_j1 = ints[5 * dim : 5 * dim + 8]  # the AVX2 search's registers
    lane_j2 = ints[5 * dim + 8 : 5 * dim + 16]
    kept_j1 = ints[5 * dim + 16 : 5 * dim + 24]  # the padding rows' search, kept
    kept_j2 = ints[5 * dim + 24 : 5 * dim + 32]
    lowest = ints[5 * dim + 32 : 5 * dim + 32 + min(dim, _LOWEST)]
    d = floats[:dim]
    v = floats[dim : 2 * dim]
    lane_umin = floats[2 * dim : 2 * dim + 8]
    lane_usubmin = floats[2 * dim + 8 : 2 * dim + 16]
    kept_umin = floats[2 * dim + 16 : 2 * dim + 24]
    kept_usubmin = floats[2 * dim + 24 : 2 * dim + 32]
    heights = floats[2 * dim + 32 :]

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
    vector = avx2 and dim >= AVX2_MIN_DIM
    padding_known = real_rows < dim and not vector  # the padding rows' search, kept (above)
    # With the AVX2 search, the padding rows' lanes are kept instead: all padding rows have the
    # same row, and between two of their searches only the columns whose v changed can change
    # a lane (bit ``lane`` of ``stale``, all of them before the first search).
    padding_lanes = real_rows < dim and vector
    stale = 0xFF
    lane_columns = dim & ~7
    in_lowest = 0
    bound_h = _FLT_MAX
    bound_j = dim
    for _loop in range(2):
        k = 0
        prevnumfree = numfree
        numfree = 0
        while k < prevnumfree:
            i = free[k]
            k += 1
            if padding_known and i >= real_rows:
                if in_lowest < 2:
                    in_lowest = _build_lowest(dim, v, heights, lowest)
                    bound_j = lowest[in_lowest - 1]
                    bound_h = heights[bound_j]
                j1 = lowest[0]
                j2 = lowest[1]
                umin = heights[j1]
                usubmin = heights[j2]
            elif padding_lanes and i >= real_rows:
                umin, usubmin, j1, j2 = _find_umins_avx2_kept(
                    dim, cost[i], v, kept_umin, kept_usubmin, kept_j1, kept_j2, stale
                )
                stale = 0
            elif vector:
                umin, usubmin, j1, j2 = _find_umins_avx2(
                    dim, cost[i], v, lane_umin, lane_usubmin, lane_j1, lane_j2
                )
            else:
                umin, usubmin, j1, j2 = _find_umins_regular(dim, cost[i], v)
            i0 = colsol[j1]
            vj1_new = v[j1] - (usubmin - umin)
            vj1_lowers = vj1_new < v[j1]
            if vj1_lowers:
                v[j1] = vj1_new
                if j1 < lane_columns:
                    stale |= 1 << (j1 & 7)
                if in_lowest:
                    in_lowest = _raise_column(
                        j1, _DUMMY - vj1_new, heights, lowest, in_lowest, bound_h, bound_j
                    )
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
        # lap.h sets d, pred and collist (to 0, 1, 2, ...), then its first pass below (up ==
        # low == 0) scans collist from position 1: done here in the same loop. Each position
        # is scanned before any swap reaches it, so it still holds its own column then.
        low_cost = cost[freerow, 0] - v[0]
        d[0] = low_cost
        pred[0] = freerow
        collist[0] = 0
        up = 1
        for j in range(1, dim):
            h = cost[freerow, j] - v[j]
            d[j] = h
            pred[j] = freerow
            collist[j] = j
            if h <= low_cost:
                if h < low_cost:
                    up = 0
                    low_cost = h
                collist[j] = collist[up]
                collist[up] = j
                up += 1
        low = 0
        last = -1
        unassigned_found = False
        for k in range(up):
            if colsol[collist[k]] < 0:
                endofpath = collist[k]
                unassigned_found = True
                break
        while not unassigned_found:
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


@njit("int64[::1](float64[:, ::1], boolean)", cache=True, nogil=True)
def compiled_assign(sim: NDArray[np.float64], avx2: bool) -> NDArray[np.int64]:
    n_images, n_sentences = sim.shape
    dim = max(n_images, n_sentences)
    cost = np.full((dim, dim), _DUMMY, np.float32)
    bounded = True
    for i in range(n_images):
        for j in range(n_sentences):
            cost[i, j] = np.float32(-sim[i, j])  # float64 -> float32, as lapjv casts it
            if not cost[i, j] <= _DUMMY:
                bounded = False
    rowsol = _lap(dim, cost, n_images if bounded else dim, avx2)
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


@njit("int64[::1](float64[:, ::1], float64)", cache=True, nogil=True)
def _assign_within(sim: NDArray[np.float64], limit: float) -> NDArray[np.int64]:
    for value in sim.ravel():
        if not abs(value) < limit:
            return np.empty(0, np.int64)
    return compiled_assign(sim, False)


@njit("float64(float64[:, ::1])", cache=True, nogil=True)
def _max_abs(sim: NDArray[np.float64]) -> float:
    largest = 0.0
    for value in sim.ravel():
        magnitude = abs(value)
        if magnitude != magnitude:
            return magnitude  # NaN
        largest = max(largest, magnitude)
    return largest


def small_assign_within(sim: NDArray[np.float64], limit: float) -> list[int] | None:
    """``jv_assign`` for a C-contiguous float64 matrix of 1..MAX_DIM rows and columns, or
    ``None`` if some similarity is not below ``limit`` in magnitude (NaN included)."""
    result: list[int] = _assign_within(sim, limit).tolist()
    return result or None


def max_abs(sim: NDArray[np.float64]) -> float:
    """Largest magnitude in a C-contiguous float64 matrix (NaN if there is one)."""
    return float(_max_abs(sim))


def _probe_costs(seed: int) -> NDArray[np.float32]:
    """A 64 x 64 matrix full of ties, on which the two minimum searches disagree."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4, (AVX2_MIN_DIM, AVX2_MIN_DIM)).astype(np.float32)


def _detect_kernel() -> bool | None:
    """Whether this machine's lapjv uses its AVX2 search from 64 columns on (None: neither fits).

    lapjv picks its kernel from the CPU at run time, so ask it: on matrices where the scalar and
    the AVX2 search lead to different solutions, see which one lapjv returns.
    """
    answers = set()
    for seed in _PROBE_SEEDS:
        cost = _probe_costs(seed)
        expected = lapjv(cost)[0].tolist()
        scalar = _lap(AVX2_MIN_DIM, cost, AVX2_MIN_DIM, False).tolist()
        vector = _lap(AVX2_MIN_DIM, cost, AVX2_MIN_DIM, True).tolist()
        if scalar == vector:
            return None  # not a probe after all: make no claim
        if expected == vector:
            answers.add(True)
        elif expected == scalar:
            answers.add(False)
        else:
            return None
    return answers.pop() if len(answers) == 1 else None


_PROBE_SEEDS = (1, 2, 3)
_KERNEL_AVX2 = _detect_kernel()
# The same for compiled callers: 1 AVX2, 0 scalar, -1 unknown (lapjv itself must decide).
KERNEL_CODE = -1 if _KERNEL_AVX2 is None else int(_KERNEL_AVX2)


def kernel_known() -> bool:
    """Whether ``exact_assign`` can reproduce lapjv on this machine for every size."""
    return _KERNEL_AVX2 is not None


def exact_assign(sim: NDArray[np.float64]) -> list[int] | None:
    """The reference's assignment for a finite, non-empty similarity matrix of any size.

    ``None`` when the matrix has 64 or more rows or columns and this machine's lapjv kernel
    could not be identified (see ``_detect_kernel``): the caller then runs lapjv.
    """
    n_images, n_sentences = sim.shape
    if n_images < 1 or n_sentences < 1:
        raise ValueError(f"similarity matrix must not be empty, got shape {sim.shape}")
    avx2 = False
    if max(n_images, n_sentences) >= AVX2_MIN_DIM:
        if _KERNEL_AVX2 is None:
            return None
        avx2 = _KERNEL_AVX2
    if not (sim.flags.c_contiguous and sim.dtype == np.float64):
        sim = np.ascontiguousarray(sim, dtype=np.float64)
    result: list[int] = compiled_assign(sim, avx2).tolist()
    return result


def lapjv_rowsol(cost: NDArray[np.float32], avx2: bool = False) -> NDArray[np.int64]:
    """lapjv's row solution of a square float32 matrix, with the scalar or the AVX2 search."""
    dim = cost.shape[0]
    if cost.shape != (dim, dim) or dim < 1:
        raise ValueError(f"need a non-empty square matrix, got {cost.shape}")
    result: NDArray[np.int64] = _lap(dim, np.ascontiguousarray(cost, dtype=np.float32), dim, avx2)
    return result


def jv_assign(sim: NDArray[np.float64]) -> list[int]:
    """The reference's assignment for a finite similarity matrix with max(shape) <= MAX_DIM."""
    n_images, n_sentences = sim.shape
    if not (0 < n_images <= MAX_DIM and 0 < n_sentences <= MAX_DIM):
        raise ValueError(f"need a non-empty matrix of at most {MAX_DIM} rows/columns")
    if not (sim.flags.c_contiguous and sim.dtype == np.float64):
        sim = np.ascontiguousarray(sim, dtype=np.float64)
    result: list[int] = compiled_assign(sim, False).tolist()
    return result
