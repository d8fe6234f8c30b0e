"""assign.jv, the compiled port of lapjv's solver, returns what lapjv returns, step for step.

Two levels: the raw row solution of any square float32 matrix below 64 x 64 equals
``lapjv(cost)[0]``; and the whole assignment (padding, pairs kept, argmax fill) equals the plain
restatement of the reference in test_assign_solve.py. Matrices are drawn to provoke every tie
rule of the algorithm: few distinct values, values one float32 ulp of 1000 apart, constant
matrices, padding-heavy ones, costs above the padding cost.
"""

from __future__ import annotations

import numpy as np
import pytest
from lapjv import lapjv
from numpy.typing import NDArray
from test_assign_solve import random_similarities, reference_assignment

from assign import jv
from assign.jv import MAX_DIM, exact_assign, jv_assign, lapjv_rowsol

ULP_AT_1000 = 6.1e-5


def random_costs(rng: np.random.Generator, dim: int, kind: int) -> NDArray[np.float32]:
    if kind == 0:  # distinct values
        cost = rng.normal(0.0, 1.0, (dim, dim))
    elif kind == 1:  # a handful of values: ties everywhere
        cost = rng.integers(0, 4, (dim, dim)).astype(np.float64)
    elif kind == 2:  # a few float32 ulps around 1000, where lapjv's own rounding decides
        cost = 1000 + rng.integers(-3, 4, (dim, dim)) * ULP_AT_1000
    elif kind == 3:  # the reference's padding: a few real rows above rows of 1000
        cost = np.full((dim, dim), 1000.0)
        real = max(1, dim // 3)
        cost[:real] = -rng.normal(0.2, 0.04, (real, dim))
    else:  # one value everywhere
        cost = np.full((dim, dim), rng.choice([0.0, 1.0, 1000.0]))
    return cost.astype(np.float32)


def test_row_solution_equals_lapjv_on_thousands_of_square_matrices() -> None:
    rng = np.random.default_rng(11)
    for trial in range(6000):
        dim = int(rng.integers(1, MAX_DIM + 1))
        cost = random_costs(rng, dim, kind=trial % 5)
        assert lapjv_rowsol(cost).tolist() == lapjv(cost)[0].tolist(), (dim, trial)


def test_assignment_equals_the_reference_on_every_shape_up_to_the_limit() -> None:
    rng = np.random.default_rng(12)
    for trial in range(6000):
        if trial % 3 == 0:  # MMC4-like: a few images, tens of sentences
            n = min(int(rng.geometric(1 / 5.6)), MAX_DIM)
            m = max(1, min(int(rng.lognormal(2.6, 0.9)), MAX_DIM))
        else:
            n, m = (int(x) for x in rng.integers(1, MAX_DIM + 1, 2))
        sim = random_similarities(rng, (n, m), kind=trial % 6)
        assert jv_assign(sim) == reference_assignment(sim), ((n, m), trial)


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 9), (1, 63), (7, 1), (63, 1), (63, 63)])
def test_edge_shapes_equal_the_reference(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for kind in range(6):
        for _ in range(20):
            sim = random_similarities(rng, shape, kind)
            assert jv_assign(sim) == reference_assignment(sim), (shape, kind)


def test_costs_above_the_padding_cost_take_the_unshortened_path() -> None:
    # Similarities below -1000 make real costs exceed the padding: no shortcut applies.
    rng = np.random.default_rng(13)
    for trial in range(300):
        n, m = int(rng.integers(1, 6)), int(rng.integers(2, 40))
        sim = rng.choice([-2000.0, -1000.0, -999.99995, 0.2, 0.3], size=(n, m))
        assert jv_assign(sim) == reference_assignment(sim), trial


def test_one_image_is_not_simply_sent_to_its_best_sentence() -> None:
    # Sentence 1 is better by 4.9e-5, under one float32 ulp at 1000 (the padding cost):
    # lapjv's rounding on the padding rows makes it pick sentence 0. No argmax shortcut is
    # exact for 1 x N; the port follows lapjv.
    sim = np.array([[0.2000489, 0.2000977, 0.1999023]])
    assert reference_assignment(sim) == [0]
    assert jv_assign(sim) == [0]


def test_one_image_ties_break_as_lapjv_breaks_them() -> None:
    for sim in ([[0.3, 0.1, 0.3]], [[0.3, 0.3, 0.3, 0.3]], [[0.2, 0.2 + 1e-5, 0.2 - 1e-5]]):
        matrix = np.array(sim)
        assert jv_assign(matrix) == reference_assignment(matrix)


def test_matrices_beyond_the_scalar_limit_are_refused_by_jv_assign() -> None:
    with pytest.raises(ValueError):
        jv_assign(np.zeros((2, MAX_DIM + 1)))
    with pytest.raises(ValueError):
        exact_assign(np.zeros((0, 3)))


def test_this_machines_lapjv_kernel_is_identified() -> None:
    # The development and CI machines have AVX2; a machine without it would use the scalar one.
    assert jv.kernel_known()


def test_from_64_columns_the_row_solution_follows_this_machines_lapjv_kernel() -> None:
    rng = np.random.default_rng(14)
    avx2 = jv._KERNEL_AVX2
    assert avx2 is not None
    for trial in range(600):
        dim = int(rng.integers(64, 140))
        cost = random_costs(rng, dim, kind=trial % 5)
        assert lapjv_rowsol(cost, avx2).tolist() == lapjv(cost)[0].tolist(), (dim, trial)


def test_the_two_minimum_searches_really_differ_on_ties() -> None:
    # Otherwise the kernel test above would prove nothing.
    cost = jv._probe_costs(1)
    assert lapjv_rowsol(cost, True).tolist() != lapjv_rowsol(cost, False).tolist()


def test_large_matrices_equal_the_reference() -> None:
    rng = np.random.default_rng(15)
    for trial in range(300):
        n = int(rng.integers(1, 70))
        m = int(rng.integers(64, 260)) if trial % 2 else max(1, int(rng.integers(1, 40)))
        if trial % 3 == 0:
            n, m = m, n
        sim = random_similarities(rng, (n, m), kind=trial % 6)
        assert exact_assign(sim) == reference_assignment(sim), ((n, m), trial)


@pytest.mark.parametrize("avx2", [False, True])
def test_knowing_the_padding_rows_changes_no_row_solution(avx2: bool) -> None:
    # The port skips work on padding rows and keeps their minimum search sorted; told that
    # every row is real, it does all of lapjv's work. Both must agree on every padded matrix,
    # also from 64 columns on with either search (this machine's lapjv checks only one).
    rng = np.random.default_rng(16)
    for trial in range(1500):
        dim = int(rng.integers(2, 100))
        real = int(rng.integers(1, dim))
        cost = np.full((dim, dim), 1000.0, np.float32)
        similarities = random_similarities(rng, (real, dim), kind=trial % 6)
        cost[:real] = (-similarities).astype(np.float32)
        padded = jv._lap(dim, cost, real, avx2).tolist()
        assert padded == jv._lap(dim, cost, dim, avx2).tolist(), (dim, real, trial)
