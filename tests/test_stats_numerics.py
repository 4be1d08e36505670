"""Shifted statistics: near-constant features (mean/std 1e5, as real models have) correlate as
a float64 two-pass computation does, whatever the batch size; sums about different shifts
combine exactly (`+`, and the all-reduce's re-centring, with idle ranks' zero sums); the raw
moments the orthogonal policies read are recovered from the shifted sums."""

import pytest
import torch

from mergekit_permute.core.match import match_plain
from mergekit_permute.calibration.stats import SUMS, CrossStats, ResidualSummary
from mergekit_permute.calibration.cache import _flatten, _unflatten

TOKENS, D = 3000, 48


def _pair(seed=0, mean=1e5, std=1.0, tokens=TOKENS, d=D):
    """float32 features like real activations: A's with mean/std = `mean`/`std`, B's a
    permutation of A's plus a little noise. Returns a, b, the permutation (B[:, perm] ~ A:
    what match_plain finds)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, d, generator=gen, dtype=torch.float64) * std
    perm = torch.randperm(d, generator=gen)
    a = (mean + base).float()
    b = torch.empty(tokens, d, dtype=torch.float64)
    b[:, perm] = mean + base + 0.3 * std * torch.randn(tokens, d, generator=gen,
                                                        dtype=torch.float64)
    return a, b.float(), perm


def _stats(a, b, batch):
    s = CrossStats.zeros(a.shape[1], b.shape[1])
    for i in range(0, a.shape[0], batch):
        s.update(a[i:i + batch], b[i:i + batch])
    return s


def _reference(a, b):
    """Two-pass float64 Pearson correlation of the same (float32) values."""
    x, y = a.double(), b.double()
    x, y = x - x.mean(0), y - y.mean(0)
    return (x.T @ y) / (x.norm(dim=0)[:, None] * y.norm(dim=0)[None, :])


@pytest.mark.parametrize("batch", [7, 64, TOKENS])
def test_near_constant_features_correlate_as_float64_two_pass(batch):
    a, b, perm = _pair()
    corr = _stats(a, b, batch).correlation()
    # measured: 6.0e-7 (batches of 7: float32 products of shifted values summed between
    # flushes), 2.7e-7 (64), 1.6e-7 (one batch); the raw sums gave errors of ~1
    torch.testing.assert_close(corr, _reference(a, b), rtol=0, atol=2e-6)
    assert torch.equal(match_plain(corr)[0], perm)


def test_the_matching_does_not_depend_on_the_batch_size():
    a, b, _ = _pair(seed=1, std=0.5)
    found = [match_plain(_stats(a, b, batch).correlation())[0] for batch in (7, 64, TOKENS)]
    assert all(torch.equal(found[0], f) for f in found[1:])


def _exact(a, b, shift_a, shift_b):
    """CrossStats of float64 sums about the given shifts, computed directly in float64."""
    x, y = a.double() - shift_a, b.double() - shift_b
    return CrossStats(torch.tensor(float(a.shape[0]), dtype=torch.float64), x.sum(0), y.sum(0),
                      x.square().sum(0), y.square().sum(0), x.T @ y, shift_a.clone(),
                      shift_b.clone())


def test_recentring_is_exact_algebra():
    a, b, _ = _pair(seed=2, tokens=1000)
    s1 = (a[:10].double().mean(0), b[:10].double().mean(0))
    s2 = (a[500:510].double().mean(0) + 2.0, b[500:510].double().mean(0) - 3.0)
    moved, direct = _exact(a, b, *s1).recenter_(*s2), _exact(a, b, *s2)
    for name in SUMS + ("shift_a", "shift_b"):
        torch.testing.assert_close(getattr(moved, name), getattr(direct, name), rtol=1e-11,
                                   atol=1e-9, msg=name)
    torch.testing.assert_close(moved.correlation(), _reference(a, b), rtol=0, atol=1e-12)


def test_sums_about_different_shifts_add_to_one_pass():
    a, b, _ = _pair(seed=2)
    a[1500:] += 3.0        # the halves' first batches, hence their shifts, differ
    whole = _stats(a, b, 100)
    first, second = _stats(a[:1500], b[:1500], 100), _stats(a[1500:], b[1500:], 100)
    assert not torch.equal(first.shift_a, second.shift_a)
    before = {k: v.clone() for k, v in second.tensors().items()}
    total = first + second
    assert all(torch.equal(v, second.tensors()[k]) for k, v in before.items())  # unchanged
    assert torch.equal(total.shift_a, first.shift_a) and torch.equal(total.shift_b, first.shift_b)
    # the same as one pass over all the tokens, to the float32 products' precision
    reference = _reference(a, b)
    for s in (total, whole):
        torch.testing.assert_close(s.correlation(), reference, rtol=0, atol=2e-6)
    torch.testing.assert_close(total.raw_sum_ab(), a.double().T @ b.double(), rtol=1e-12, atol=0)
    # sums computed exactly (float64) combine exactly: `+` is the one-pass sum
    x = _exact(a[:1500], b[:1500], first.shift_a, first.shift_b)
    y = _exact(a[1500:], b[1500:], second.shift_a, second.shift_b)
    one = _exact(a, b, first.shift_a, first.shift_b)
    for combined in (x + y, CrossStats.from_tensors({k: v.clone() for k, v in x.tensors().items()}
                                                    ).add_(y)):
        for name in SUMS:
            torch.testing.assert_close(getattr(combined, name), getattr(one, name),
                                       rtol=1e-11, atol=1e-8, msg=name)


def test_empty_statistics_add_as_nothing():
    a, b, _ = _pair(seed=3, tokens=500)
    s = _stats(a, b, 64)
    empty = CrossStats.zeros(D, D)
    for total in (s + empty, empty + s, CrossStats.zeros(D, D).add_(s)):
        assert torch.equal(total.shift_a, s.shift_a)
        for name in SUMS:
            assert torch.equal(getattr(total, name), s.tensors()[name]), name
    empty.update(a[:0], b[:0])         # a batch with no tokens fixes nothing
    assert not empty._fixed and float(empty.n) == 0


def test_recentred_rank_sums_all_reduce_to_one_pass():
    """What Distributed.reduce does: every rank re-centres onto one shift (the first rank's
    with tokens), then the sums add elementwise; an idle rank's zeros add nothing."""
    a, b, _ = _pair(seed=4)
    a[2000:] -= 5.0
    ranks = [_stats(a[:1000], b[:1000], 64), _stats(a[1000:], b[1000:], 64),
             CrossStats.zeros(D, D)]
    owner = ranks[0]
    for s in ranks[1:]:
        s.recenter_(owner.shift_a, owner.shift_b)
    assert not ranks[2]._fixed and all(not bool(ranks[2].tensors()[n].any()) for n in SUMS)
    summed = CrossStats.from_tensors({n: sum(s.tensors()[n] for s in ranks) if n in SUMS
                                      else owner.tensors()[n] for n in owner.tensors()})
    torch.testing.assert_close(summed.correlation(), _reference(a, b), rtol=0, atol=2e-6)
    torch.testing.assert_close(summed.raw_sum_ab(), a.double().T @ b.double(), rtol=1e-12,
                               atol=0)


@pytest.mark.parametrize("batch", [5, 1000])
def test_a_zero_variance_feature_correlates_zero(batch):
    a, b, _ = _pair(seed=5, tokens=1000)
    a[:, 3] = 1e5            # constant, at the features' scale
    a[:, 7] = 3.7
    b[:, 0] = -2.5e5
    corr = _stats(a, b, batch).correlation()
    assert bool(torch.isfinite(corr).all())
    assert not bool(corr[3].any()) and not bool(corr[7].any()) and not bool(corr[:, 0].any())


def test_raw_moments_are_the_uncentred_ones():
    a, b, _ = _pair(seed=6, tokens=2000)
    s = _stats(a, b, 128)
    x, y = a.double(), b.double()
    torch.testing.assert_close(s.raw_sum_ab(), x.T @ y, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.raw_sq_a(), x.square().sum(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(s.raw_sq_b(), y.square().sum(0), rtol=1e-12, atol=0)
    # below FLUSH_TOKENS (only the float32 products so far) too, and nothing is changed
    small = _stats(a[:300], b[:300], 100)
    assert small.sum_ab.stride() == (0, 0)
    torch.testing.assert_close(small.raw_sum_ab(), x[:300].T @ y[:300], rtol=1e-12, atol=0)
    assert small.sum_ab.stride() == (0, 0)


def test_the_residual_summary_reads_raw_moments_and_pools_across_shifts():
    gen = torch.Generator().manual_seed(7)
    points = []
    for offset in (0.0, 50.0, -1e4):      # residual points of different depths and scales
        a, b, _ = _pair(seed=int(offset) % 97, mean=offset + 1.0, tokens=400, d=16)
        points.append((a + torch.randn(400, 16, generator=gen), b))
    summary = ResidualSummary()
    for a, b in points:
        summary.add(_stats(a, b, 64))
    unit = sum((a.double().T @ b.double()) / (a.double().T @ b.double()).norm() for a, b in points)
    torch.testing.assert_close(summary.unit_moments, unit, rtol=1e-6, atol=1e-9)
    a_all = torch.cat([a for a, _ in points])
    b_all = torch.cat([b for _, b in points])
    torch.testing.assert_close(summary.pooled.correlation(), _reference(a_all, b_all),
                               rtol=0, atol=2e-6)
    torch.testing.assert_close(summary.pooled.raw_sum_ab(), a_all.double().T @ b_all.double(),
                               rtol=1e-6, atol=1e-3)


def test_the_shifts_are_kept_with_the_sums():
    """A cache file holds the shifts beside the sums; statistics read back are the same."""
    a, b, _ = _pair(seed=8, tokens=500)
    s = _stats(a, b, 64)
    assert {"shift_a", "shift_b"} <= set(s.tensors())
    back = _unflatten({k: v.double().clone() for k, v in _flatten({"ffn.0@0": s}).items()})
    t = back["ffn.0@0"]
    assert torch.equal(t.shift_a, s.shift_a) and torch.equal(t.shift_b, s.shift_b)
    assert torch.equal(t.correlation(), s.correlation())
    assert torch.equal(t.raw_sum_ab(), s.raw_sum_ab())
    with pytest.raises(ValueError, match="shift_a has shape"):
        CrossStats.from_tensors({**s.tensors(), "shift_a": torch.zeros(D + 1, dtype=torch.float64)})


def test_a_spent_correlation_is_the_same_and_cannot_be_read_again():
    """correlation(consume=True) computes in the sums' own buffer: bit for bit the ordinary
    correlation, and the statistics refuse to be read afterwards."""
    import pytest
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(20000, 30, generator=gen) + 4, torch.randn(20000, 30, generator=gen)
    s = CrossStats.zeros(30, 30)
    for i in range(0, 20000, 1000):
        s.update(a[i:i + 1000], b[i:i + 1000])
    want = s.correlation()
    buffer = s.flush().sum_ab
    got = s.correlation(consume=True)
    assert torch.equal(got, want) and got.data_ptr() == buffer.data_ptr()
    for read in (s.correlation, s.totals, s.tensors):
        with pytest.raises(RuntimeError, match="spent"):
            read()


def test_bfloat16_products_correlate_within_their_rounding_and_rerun_identically():
    # Each batch's cross products rounded to 8 bits (stats_products=bfloat16): the correlation
    # moves by far less than its sampling error over these tokens (1/sqrt(3000) = 0.018), the
    # matching is the float32 one, and a rerun is bit-identical.
    a, b, perm = _pair(seed=2, std=0.5)
    runs = []
    for _ in range(2):
        s = CrossStats.zeros(D, D, products=torch.bfloat16)
        for i in range(0, TOKENS, 64):
            s.update(a[i:i + 64], b[i:i + 64])
        runs.append(s.correlation())
    assert torch.equal(runs[0], runs[1])
    reference = _reference(a, b)
    # measured: 5e-4 (shifted values and each batch's products rounded to bfloat16)
    torch.testing.assert_close(runs[0], reference, rtol=0, atol=2e-3)
    assert not torch.equal(runs[0], _stats(a, b, 64).correlation())   # (the products differ)
    assert torch.equal(match_plain(runs[0])[0], perm)


def test_auto_products_are_bfloat16_only_for_half_checkpoints_on_cuda(monkeypatch):
    from mergekit_permute.calibration import collect
    assert collect.product_dtype("auto", "cuda", torch.bfloat16) == torch.bfloat16
    assert collect.product_dtype("auto", "cuda:1", torch.float16) == torch.bfloat16
    assert collect.product_dtype("auto", "cuda", torch.float32) == torch.float32
    assert collect.product_dtype("float32", "cuda", torch.bfloat16) == torch.float32
    monkeypatch.setattr(collect, "native_bf16_cpu", lambda: True)   # even native: float32
    assert collect.product_dtype("auto", "cpu", torch.bfloat16) == torch.float32
    assert collect.product_dtype("bfloat16", "cpu", torch.float32) == torch.bfloat16
