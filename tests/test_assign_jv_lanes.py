"""The AVX2 search kept for the padding rows (``jv._find_umins_avx2_kept``) changes nothing.

From 64 columns on, with lapjv's eight-lane search, the port keeps the padding rows' lane minima
between their searches and scans again only the lanes whose columns changed. On padded matrices
of 64 to 200 columns, ties and negative values included, the row solution must be the one of the
port told that every row is real (the full search for every row, as before) and the one of this
machine's lapjv when it uses its AVX2 search.
"""

from __future__ import annotations

import numpy as np
import pytest
from lapjv import lapjv
from numpy.typing import NDArray

from assign import jv

ULP_AT_1000 = 6.1e-5


def padded_costs(rng: np.random.Generator, kind: int) -> tuple[NDArray[np.float32], int]:
    """A square float32 matrix of 64..200 columns: a few real rows over rows of 1000."""
    dim = int(rng.integers(64, 201))
    real = int(rng.integers(1, dim)) if kind % 2 else int(rng.integers(1, 12))
    shape = (real, dim)
    if kind == 0:  # CLIP-like similarities, negated
        real_costs = -rng.normal(0.22, 0.04, shape)
    elif kind == 1:  # integers: ties everywhere, negative costs included
        real_costs = rng.integers(-3, 3, shape).astype(np.float64)
    elif kind == 2:  # a few distinct similarities
        real_costs = -rng.choice([0.1, 0.2, 0.25, 0.3], size=shape)
    elif kind == 3:  # negative and positive similarities
        real_costs = rng.uniform(-1.0, 1.0, shape)
    elif kind == 4:  # a few float32 ulps around 1000: ties with the padding rows
        real_costs = 1000 - rng.integers(0, 4, shape) * ULP_AT_1000
    elif kind == 5:  # one value repeated down the columns
        real_costs = np.repeat(-rng.uniform(0, 0.4, (1, dim)), real, axis=0)
    else:  # large integers, two values
        real_costs = rng.choice([-500.0, 0.0], size=shape)
    cost = np.full((dim, dim), 1000.0, np.float32)
    cost[:real] = real_costs.astype(np.float32)
    return cost, real


KINDS = 7


def test_kept_lanes_give_the_full_searchs_row_solution() -> None:
    rng = np.random.default_rng(31)
    for trial in range(4000):
        cost, real = padded_costs(rng, kind=trial % KINDS)
        dim = cost.shape[0]
        kept = jv._lap(dim, cost, real, True)
        assert kept.tolist() == jv._lap(dim, cost, dim, True).tolist(), (dim, real, trial)


def test_kept_lanes_give_lapjvs_row_solution_with_its_avx2_search() -> None:
    if jv._KERNEL_AVX2 is not True:
        pytest.skip("this machine's lapjv does not use its AVX2 search")
    rng = np.random.default_rng(32)
    for trial in range(3000):
        cost, real = padded_costs(rng, kind=trial % KINDS)
        dim = cost.shape[0]
        assert jv._lap(dim, cost, real, True).tolist() == lapjv(cost)[0].tolist(), (dim, real)


def test_the_kept_search_equals_the_full_one_for_any_stale_lanes() -> None:
    # The kept state of the lanes not marked stale must be what a full scan would give them:
    # refresh a random subset after changing only columns in that subset's lanes.
    rng = np.random.default_rng(33)
    for trial in range(2000):
        dim = int(rng.integers(64, 201))
        row = np.full(dim, 1000.0, np.float32)
        v = rng.integers(-3, 3, dim).astype(np.float32)
        if trial % 2:
            v = (v * rng.uniform(0.5, 2.0)).astype(np.float32)
        lanes = [np.empty(8, np.float32), np.empty(8, np.float32)]
        kept = [np.empty(8, np.float32), np.empty(8, np.float32)]
        indices = [np.empty(8, np.int64), np.empty(8, np.int64)]
        kept_indices = [np.empty(8, np.int64), np.empty(8, np.int64)]
        first = jv._find_umins_avx2_kept(dim, row, v, *kept, *kept_indices, 0xFF)
        assert first == jv._find_umins_avx2(dim, row, v, *lanes, *indices), trial
        stale = 0
        for j in rng.choice(dim, size=int(rng.integers(1, 5)), replace=False):
            v[j] -= np.float32(rng.integers(0, 3))
            if j < dim & ~7:
                stale |= 1 << (int(j) & 7)
        again = jv._find_umins_avx2_kept(dim, row, v, *kept, *kept_indices, stale)
        assert again == jv._find_umins_avx2(dim, row, v, *lanes, *indices), trial
