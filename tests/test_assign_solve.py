"""assign.solve gives exactly the reference's assignment (allenai/mmc4 compute_assignments.py).

``reference_assignment`` below is a plain re-statement of the reference: negate, pad to square
with 1000 (np.pad), lapjv with its defaults, sort by cost, drop padding pairs, argmax fill.
"""

from __future__ import annotations

import numpy as np
import pytest
from lapjv import lapjv
from numpy.typing import NDArray

from assign.solve import assign


def reference_assignment(sim: NDArray[np.float64]) -> list[int]:
    cost = -sim
    n_images, n_sentences = cost.shape
    if n_images > n_sentences:
        cost = np.pad(cost, [[0, 0], [0, n_images - n_sentences]], "constant", constant_values=1000)
    elif n_images < n_sentences:
        cost = np.pad(cost, [[0, n_sentences - n_images], [0, 0]], "constant", constant_values=1000)
    sol = lapjv(cost)[0]
    rows = np.arange(len(sol))
    cols = sol[rows]
    order = np.argsort(-cost[rows, cols])
    rows, cols = rows[order], cols[order]
    if n_images > n_sentences:
        keep = np.where(cols < n_sentences)[0]
        rows, cols = rows[keep], cols[keep]
    elif n_images < n_sentences:
        keep = np.where(rows < n_images)[0]
        rows, cols = rows[keep], cols[keep]
    chosen = {int(i): int(j) for i, j in zip(rows, cols, strict=True)}
    if n_images > n_sentences:
        for i in range(n_images):
            if i not in chosen:
                chosen[i] = int(np.argmax(sim[i]))
    return [chosen[i] for i in range(len(chosen))]


SHAPES = [(1, 1), (1, 2), (1, 7), (1, 40), (1, 120), (3, 1), (12, 1), (2, 2), (5, 5), (30, 30)]
SHAPES += [(3, 8), (5, 27), (6, 60), (8, 200), (12, 5), (40, 9), (70, 3), (20, 100), (2, 400)]


def random_similarities(rng: np.random.Generator, shape: tuple[int, int], kind: int) -> NDArray:
    n, m = shape
    if kind == 0:  # CLIP-like cosines, float32 values as MMC4 stores them
        sim = rng.normal(0.22, 0.04, shape).astype(np.float32).astype(np.float64)
    elif kind == 1:  # heavy ties: few distinct values
        sim = rng.choice([0.1, 0.2, 0.25, 0.3], size=shape)
    elif kind == 2:  # near-equal values, a few float32 ulps of 1000 apart
        sim = 0.2 + rng.integers(-4, 5, shape) * 6.1e-5 * rng.uniform(0.1, 3.0)
    elif kind == 3:  # negative similarities
        sim = rng.uniform(-1.0, 1.0, shape)
    elif kind == 4:  # values equal in float32 but not in float64
        sim = 0.25 + rng.integers(0, 3, shape) * 1e-9
    else:  # whole rows or columns repeated
        sim = np.repeat(rng.uniform(0, 0.4, (1, m)), n, axis=0)
    return sim


def test_matches_the_reference_on_thousands_of_random_matrices_ties_included() -> None:
    rng = np.random.default_rng(20240601)
    for trial in range(3000):
        shape = SHAPES[trial % len(SHAPES)]
        sim = random_similarities(rng, shape, kind=trial % 6)
        assert assign(sim) == reference_assignment(sim), (shape, trial)


def test_matches_the_reference_on_realistic_document_shapes() -> None:
    rng = np.random.default_rng(7)
    for trial in range(2000):
        n = min(int(rng.geometric(1 / 5.6)), 60)
        m = max(1, min(int(rng.lognormal(2.8, 0.9)), 300))
        sim = random_similarities(rng, (n, m), kind=trial % 6)
        assert assign(sim) == reference_assignment(sim), ((n, m), trial)


def test_reference_example_from_lapjv_tests() -> None:
    # From the reference's own unit test: images 1 and 2 take sentences 0 and 1.
    sim = np.array([[1.0, 1.0], [1.5, 1.0], [3.0, 2.6]])
    assert assign(sim) == reference_assignment(sim)
    assert assign(sim)[1:] == [0, 1]


def test_single_sentence_sends_every_image_to_it() -> None:
    assert assign(np.array([[0.1], [0.5], [-0.2]])) == [0, 0, 0]


def test_single_image_goes_to_its_most_similar_sentence() -> None:
    assert assign(np.array([[0.1, 0.4, 0.2]])) == [1]


def test_more_images_than_sentences_fills_the_rest_with_each_row_argmax() -> None:
    sim = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.6]])
    assert assign(sim) == reference_assignment(sim) == [0, 0, 1]


def test_float32_rounding_decides_like_lapjv_does() -> None:
    # 0.3 and 0.3 + 1e-9 are one value in float32: lapjv sees a tie; we must break it its way.
    sim = np.array([[0.3, 0.3 + 1e-9, 0.1]])
    assert assign(sim) == reference_assignment(sim)


def test_scipy_solver_finds_an_optimal_assignment() -> None:
    rng = np.random.default_rng(3)
    for trial in range(300):
        shape = SHAPES[trial % len(SHAPES)]
        sim = random_similarities(rng, shape, kind=0)
        ours, ref = assign(sim, "scipy"), reference_assignment(sim)
        solved = min(shape)  # images that got a sentence of their own
        if shape[0] <= shape[1]:
            assert len(set(ours)) == shape[0]
        total = sum(sim[i, j] for i, j in enumerate(ours))
        expected = sum(sim[i, j] for i, j in enumerate(ref))
        assert total == pytest.approx(expected, abs=1e-4 * solved), trial


def test_empty_matrix_is_refused() -> None:
    with pytest.raises(ValueError):
        assign(np.zeros((0, 3)))


def test_unknown_solver_is_refused() -> None:
    with pytest.raises(ValueError):
        assign(np.zeros((2, 3)), "hungarian")  # type: ignore[arg-type]
