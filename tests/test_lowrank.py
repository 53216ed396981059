import pytest
import torch

from lora_lego.lowrank import (
    concat_factors,
    factor_grams,
    frobenius_norm,
    from_units,
    inner,
    relative_error,
    relative_error_from_grams,
    scale_factors,
    to_units,
    truncated_svd,
)
from lora_lego.types import LoraFactors
from synthetic import random_factors


def factors(d_out=30, d_in=20, rank=5, seed=0):
    return random_factors(d_out, d_in, rank, torch.Generator().manual_seed(seed))


def test_concat_equals_weighted_sum_of_deltas():
    parts = [factors(rank=r, seed=s) for s, r in enumerate([2, 3, 5])]
    weights = [0.5, -2.0, 1.25]
    merged = concat_factors(parts, weights)
    expected = sum(w * f.delta() for f, w in zip(parts, weights))
    assert merged.rank == 10
    torch.testing.assert_close(merged.delta(), expected, rtol=1e-5, atol=1e-5)


def test_scale_factors_negative_weight_negates_delta():
    f = factors()
    torch.testing.assert_close(scale_factors(f, -3.0).delta(), -3.0 * f.delta(), rtol=1e-5, atol=1e-5)


def test_units_round_trip_and_layout():
    f = factors(d_out=7, d_in=4, rank=3)
    units = to_units(f)
    assert units.shape == (3, 11)
    torch.testing.assert_close(units[1, :4], f.A[1])
    torch.testing.assert_close(units[1, 4:], f.B[:, 1])
    back = from_units(units, 4)
    assert torch.equal(back.A, f.A) and torch.equal(back.B, f.B)


def test_inner_and_norm_match_dense():
    left, right = factors(seed=1), factors(seed=2)
    dense_l, dense_r = left.delta().double(), right.delta().double()
    assert inner(left, right) == pytest.approx(float((dense_l * dense_r).sum()), rel=1e-6)
    assert frobenius_norm(left) == pytest.approx(float(dense_l.norm()), rel=1e-6)


def test_relative_error_matches_dense_and_is_zero_for_exact():
    target = concat_factors([factors(seed=1), factors(seed=2)])
    approx = factors(seed=3)
    expected = float((approx.delta() - target.delta()).norm() / target.delta().norm())
    assert relative_error(approx, target) == pytest.approx(expected, rel=1e-5)
    # the same delta in a different factorisation: exactly zero up to float32 rounding
    reordered = LoraFactors(target.A.flip(0) * 2.0, target.B.flip(1) / 2.0)
    assert relative_error(reordered, target) < 1e-6


@pytest.mark.parametrize("k", [1, 3, 7, 10, 25])
def test_truncated_svd_equals_dense_svd(k):
    f = concat_factors([factors(seed=s, rank=5) for s in range(2)])  # rank 10, (30, 20)
    approx, singular = truncated_svd(f, k)
    dense = f.delta().double()
    u, s, vh = torch.linalg.svd(dense)
    torch.testing.assert_close(singular.double(), s[:10], rtol=1e-5, atol=1e-4)
    kk = min(k, 10)
    best = (u[:, :kk] * s[:kk]) @ vh[:kk]
    assert approx.rank == kk
    torch.testing.assert_close(approx.delta().double(), best, rtol=1e-4, atol=1e-4)
    # balanced: both sides carry sqrt(s)
    torch.testing.assert_close(approx.A.norm(dim=1), approx.B.norm(dim=0), rtol=1e-4, atol=1e-5)


def test_truncated_svd_of_wide_rank_exceeding_dimension():
    f = factors(d_out=6, d_in=5, rank=9)  # rank > both dimensions
    approx, singular = truncated_svd(f, 9)
    assert approx.rank == 5
    torch.testing.assert_close(approx.delta(), f.delta(), rtol=1e-4, atol=1e-4)


def test_truncated_svd_sign_rule_is_deterministic_under_factor_sign_flips():
    f = factors(rank=4)
    flipped = LoraFactors(-f.A, -f.B)
    first, _ = truncated_svd(f, 3)
    second, _ = truncated_svd(flipped, 3)
    torch.testing.assert_close(first.A, second.A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.B, second.B, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("noise", [1.0, 1e-4])  # far from the target, and close to it (exact fallback)
def test_relative_error_of_combined_units_from_grams_alone(noise):
    generator = torch.Generator().manual_seed(5)
    target = random_factors(30, 20, 6, generator)
    coefficients = torch.eye(6) + noise * torch.randn(6, 6, generator=generator, dtype=torch.float64)
    coefficients = coefficients[:4] if noise == 1.0 else coefficients  # fewer ranks than the target
    c = coefficients.float()
    approx = LoraFactors(c @ target.A, target.B @ c.T)
    grams = factor_grams(target, exact=False)
    expected = relative_error(approx, target)
    assert relative_error_from_grams(approx, target, *grams, coefficients=c) == pytest.approx(expected, rel=1e-4)
    assert relative_error_from_grams(approx, target, *grams) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("u", [1, 5, 63, 64, 100, 128, 1000])
def test_gram_by_blocks_matches_the_full_product(u):
    from lora_lego.lowrank import gram
    rows = torch.randn(u, 50, generator=torch.Generator().manual_seed(u), dtype=torch.float64)
    torch.testing.assert_close(gram(rows), rows @ rows.T)
    columns = rows.T.contiguous()  # B^T B for B (d, u): a transposed view
    torch.testing.assert_close(gram(columns.T), rows @ rows.T)


@pytest.mark.parametrize("eps", [1e-1, 1e-5])  # the Gram route, and a near-cancelling sum (the QR route)
def test_truncated_svd_is_accurate_when_ranks_nearly_cancel(eps):
    generator = torch.Generator().manual_seed(0)
    base = LoraFactors(torch.randn(8, 300, generator=generator), torch.randn(200, 8, generator=generator))
    near = LoraFactors(base.A + eps * torch.randn(8, 300, generator=generator), base.B)
    summed = concat_factors([base, near], [1.0, -1.0])
    dense = summed.B.double() @ summed.A.double()
    u, s, vh = torch.linalg.svd(dense)
    approx, singular = truncated_svd(summed, 4)
    best = (u[:, :4] * s[:4]) @ vh[:4]
    assert float((singular.double()[:8] - s[:8]).abs().max() / s[0]) < 1e-6
    assert float((approx.B.double() @ approx.A.double() - best).norm() / best.norm()) < 1e-6


@pytest.mark.parametrize("dependent", [False, True])  # the Cholesky route; B's columns repeated (the eigh route)
def test_truncated_svd_routes_match_the_dense_svd(dependent):
    from lora_lego.lowrank import _top_svd_cholesky, gram
    generator = torch.Generator().manual_seed(3)
    decay = torch.logspace(0, -3, 6, dtype=torch.float64)  # singular values over three decades
    f = LoraFactors(torch.randn(6, 40, generator=generator, dtype=torch.float64),
                    torch.randn(30, 6, generator=generator, dtype=torch.float64) * decay)
    if dependent:  # a second adapter with the same B: B^T B is singular, its Cholesky factor useless
        f = concat_factors([f, LoraFactors(torch.randn(6, 40, generator=generator, dtype=torch.float64), f.B)])
    assert (_top_svd_cholesky(f.A, f.B, gram(f.A), gram(f.B.T), 4) is None) == dependent
    approx, singular = truncated_svd(f, 4)
    u, s, vh = torch.linalg.svd(f.delta())
    n = min(f.rank, 30, 40)
    torch.testing.assert_close(singular, s[:n], rtol=0, atol=1e-12 * float(s[0]))
    torch.testing.assert_close(approx.delta(), (u[:, :4] * s[:4]) @ vh[:4], rtol=0, atol=1e-12 * float(s[0]))


def test_truncated_svd_of_rank_zero_factors():
    approx, singular = truncated_svd(LoraFactors(torch.zeros(0, 5), torch.zeros(4, 0)), 3)
    assert approx.rank == 0 and singular.numel() == 0
