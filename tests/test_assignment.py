"""The assignment solver: lapx's Jonker-Volgenant, scipy, or Jonker-Volgenant from auction
prices, whichever `solver_for` picks, gives scipy's assignment exactly (ties aside), on random
costs, on correlation matrices like trained FF layers', and on flat ones whose rows mostly
prefer the same few columns (random-init models')."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

import mergekit_permute.core.match as match
from mergekit_permute.core.match import JV_FROM_MUTUAL, assign, mutual_best, solver_for


def _correlation(n: int, seed: int) -> np.ndarray:
    """Pearson correlation of A's features with B's, B a hidden permutation of A plus noise,
    both sharing a low-rank structure (as trained FF features do)."""
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((4 * n, 8)) @ rng.standard_normal((8, n))
    a = shared + rng.standard_normal((4 * n, n))
    b = (a + 1.5 * rng.standard_normal(a.shape))[:, rng.permutation(n)]
    a, b = (a - a.mean(0)) / a.std(0), (b - b.mean(0)) / b.std(0)
    return a.T @ b / a.shape[0]


def _hubs(n: int, seed: int) -> np.ndarray:
    """Scores dominated by a rank-1 term: most rows' best column is one of a few hubs."""
    rng = np.random.default_rng(seed)
    return np.outer(rng.random(n), rng.random(n)) + 0.05 * rng.standard_normal((n, n))


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("kind", ["random", "correlation", "hubs"])
def test_the_assignment_is_scipys(n, kind):
    score = {"random": lambda: np.random.default_rng(n).standard_normal((n, n)),
             "correlation": lambda: _correlation(n, n), "hubs": lambda: _hubs(n, n)}[kind]()
    if n >= 64:   # both solvers are exercised
        expected = "scipy" if kind == "hubs" else "lapjvh"
        assert solver_for(-score) == expected, mutual_best(-score)
        assert (mutual_best(-score) >= JV_FROM_MUTUAL) == (expected == "lapjvh")
    before = score.copy()
    perm, total = assign(score)
    rows, cols = linear_sum_assignment(score, maximize=True)
    assert np.array_equal(perm[rows], cols)
    assert total == pytest.approx(float(score[rows, cols].sum()), rel=1e-12)
    assert np.array_equal(score, before)   # negated in place and back, exactly


def test_non_finite_and_rectangular_scores_go_to_scipy():
    with pytest.raises(ValueError):
        assign(np.array([[1.0, np.nan], [0.0, 1.0]]))
    perm, _ = assign(np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 0.2]]))
    assert perm.tolist() == [1, 0]
    perm, _ = assign(np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32))
    assert perm.tolist() == [1, 0]


def _flat(n: int, seed: int) -> np.ndarray:
    """The correlation of two unrelated feature sets from few tokens (random-init models'):
    near-Gaussian scores whose best entries lie only a few hundredths above the rest."""
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((2 * n, n)), rng.standard_normal((2 * n, n))
    return a.T @ b / (2 * n)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 300])
@pytest.mark.parametrize("kind", ["random", "correlation", "hubs", "flat", "ties", "constant"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_auction_prices_leave_the_assignment_scipys(n, kind, overwrite, monkeypatch):
    """The priced path at every size (its threshold lowered): the same assignment as scipy's
    on the raw scores, the same total, and `score` untouched unless it may be overwritten."""
    monkeypatch.setattr(match, "PRICED_FROM", 1)
    rng = np.random.default_rng(n)
    score = {"random": lambda: rng.standard_normal((n, n)),
             "correlation": lambda: _correlation(n, n), "hubs": lambda: _hubs(n, n),
             "flat": lambda: _flat(n, n), "ties": lambda: rng.integers(0, 3, (n, n)) * 1.0,
             "constant": lambda: np.ones((n, n))}[kind]()
    assert solver_for(-score) == "priced"
    before = score.copy()
    perm, total = assign(score, overwrite=overwrite)
    rows, cols = linear_sum_assignment(before, maximize=True)
    best = float(before[rows, cols].sum())
    assert sorted(perm.tolist()) == list(range(n))
    assert float(before[np.arange(n), perm].sum()) == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert total == pytest.approx(best, rel=1e-12, abs=1e-12)
    if kind not in ("ties", "constant"):   # (ties: any optimal assignment will do)
        assert np.array_equal(perm[rows], cols)
    if not overwrite:
        assert np.array_equal(score, before)


def test_a_real_width_flat_matrix_is_priced_and_exact():
    """At the default threshold, on a 2048-wide flat correlation: the priced solver runs and
    returns scipy's assignment."""
    score = _flat(match.PRICED_FROM, 0)
    assert solver_for(-score) == "priced"
    perm, _ = assign(score.copy(), overwrite=True)
    rows, cols = linear_sum_assignment(score, maximize=True)
    assert np.array_equal(perm[rows], cols)
