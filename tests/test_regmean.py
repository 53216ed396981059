"""RegMean and LEGO in the calibration metric against dense closed forms written here (small shapes), their
invariants, and merge's checks of the calibrations."""

from __future__ import annotations

import pytest
import torch

import lora_lego as ll
from lora_lego.methods.regmean import lego_calibrated, regmean
from synthetic import random_adapter, random_factors

D_OUT, D_IN = 12, 10


def random_gram(generator, n_tokens=40, d=D_IN):
    """A mean input Gram X^T X / n of anisotropic random inputs (full rank when n_tokens >= d)."""
    x = torch.randn(n_tokens, d, generator=generator, dtype=torch.float64)
    x = x * (0.2 + 3 * torch.rand(d, generator=generator, dtype=torch.float64))
    return (x.T @ x / n_tokens).float()


@pytest.fixture
def case():
    generator = torch.Generator().manual_seed(0)
    factors = [random_factors(D_OUT, D_IN, r, generator) for r in (2, 3, 2)]
    grams = [random_gram(generator) for _ in factors]
    return factors, [1.0, -0.5, 2.0], grams


def shrunk(gram, shrink):
    gram = gram.double()
    return shrink * gram + (1 - shrink) * torch.diag(gram.diagonal())


def dense_regmean(factors, weights, grams, shrink=0.9, ridge=0.0):
    """(W*, G): W* = (sum_t w_t delta_t G~_t)(G + ridge mean(diag G) I)^-1 with G = sum_t |w_t| G~_t, densely in
    float64 (G returned with the ridge added)."""
    numerator = sum(w * f.delta().double() @ shrunk(g, shrink) for f, w, g in zip(factors, weights, grams))
    total = sum(abs(w) * shrunk(g, shrink) for w, g in zip(weights, grams))
    total = total + ridge * total.diagonal().mean() * torch.eye(total.shape[0], dtype=total.dtype)
    return numerator @ torch.linalg.inv(total), total


def calibration_error(W, target, total):
    """||(W - target) L|| / ||target L|| with G = L L^T: the relative error in the calibration norm."""
    L = torch.linalg.cholesky(total)
    return float(((W.double() - target) @ L).norm() / (target @ L).norm())


def relative(actual, expected):
    return float((actual.double() - expected).norm() / expected.norm())


@pytest.mark.parametrize("shrink", [0.5, 0.9, 1.0])
def test_regmean_equals_the_dense_closed_form(case, shrink):
    factors, weights, grams = case
    merged, info = regmean(factors, weights, generator=torch.Generator(), calibration=grams, shrink=shrink)
    expected, _ = dense_regmean(factors, weights, grams, shrink)
    assert merged.rank == 7 and info["calibration_error"] == 0.0  # rank sum: exact
    assert relative(merged.delta(), expected) < 1e-6
    assert torch.allclose(merged.A.norm(dim=1), merged.B.norm(dim=0), rtol=1e-5)  # balanced ranks


def test_regmean_of_one_adapter_is_its_delta(case):
    factors, _, grams = case
    merged, _ = regmean(factors[:1], [1.0], generator=torch.Generator(), calibration=grams[:1])
    assert relative(merged.delta(), factors[0].delta().double()) < 1e-6


def test_regmean_with_identical_grams_is_the_weighted_mean(case):
    factors, weights, grams = case
    merged, _ = regmean(factors, weights, generator=torch.Generator(), calibration=[grams[0]] * 3)
    mean = sum(w * f.delta().double() for f, w in zip(factors, weights)) / sum(abs(w) for w in weights)
    assert relative(merged.delta(), mean) < 1e-6


def test_weighted_truncation_is_the_generalized_svd_and_beats_plain_truncation(case):
    factors, weights, grams = case
    expected, total = dense_regmean(factors, weights, grams)
    L = torch.linalg.cholesky(total)
    u, s, vh = torch.linalg.svd(expected @ L)
    for k in (1, 3, 5):
        reference = (u[:, :k] * s[:k]) @ vh[:k] @ torch.linalg.inv(L)  # best rank k in the calibration norm
        weighted, info = regmean(factors, weights, generator=torch.Generator(), calibration=grams, rank=k)
        plain, plain_info = regmean(factors, weights, generator=torch.Generator(), calibration=grams, rank=k,
                                    norm="frobenius")
        assert weighted.rank == plain.rank == k
        assert relative(weighted.delta(), reference) < 1e-5
        tail = float((s[k:].pow(2).sum() / s.pow(2).sum()).sqrt())
        assert info["calibration_error"] == pytest.approx(tail, rel=1e-6)
        assert calibration_error(weighted.delta(), expected, total) == pytest.approx(tail, rel=1e-5)
        plain_error = calibration_error(plain.delta(), expected, total)
        assert plain_info["calibration_error"] == pytest.approx(plain_error, rel=1e-5)
        assert plain_info["calibration_error"] > info["calibration_error"] * 1.01  # strictly worse on these inputs


def test_max_error_picks_the_smallest_rank_meeting_the_tolerance(case):
    factors, weights, grams = case
    errors = [regmean(factors, weights, generator=torch.Generator(), calibration=grams, rank=k)[1]["calibration_error"]
              for k in range(1, 8)]
    merged, info = regmean(factors, weights, generator=torch.Generator(), calibration=grams, max_error=0.3)
    expected = next(k for k, e in enumerate(errors, 1) if e <= 0.3)
    assert merged.rank == info["chosen_rank"] == expected < 7


def test_singular_grams_are_a_clear_error():
    generator = torch.Generator().manual_seed(1)
    factors = [random_factors(D_OUT, D_IN, 2, generator) for _ in range(2)]
    few = [random_gram(generator, n_tokens=3) for _ in range(2)]  # rank 3 of 10 each
    with pytest.raises(ll.MethodError, match="singular.*shrink < 1"):
        regmean(factors, [1.0, 1.0], generator=generator, calibration=few, shrink=1.0)
    regmean(factors, [1.0, 1.0], generator=generator, calibration=few, shrink=0.9)  # shrinkage makes it definite
    dead = [g.clone() for g in few]
    for g in dead:
        g[:, 4] = g[4, :] = 0.0
    with pytest.raises(ll.MethodError, match="1 input dimension"):
        regmean(factors, [1.0, 1.0], generator=generator, calibration=dead, shrink=0.5)
    with pytest.raises(ll.MethodError, match="shrink"):
        regmean(factors, [1.0, 1.0], generator=generator, calibration=few, shrink=1.5)


def test_ridge_zero_is_regmean_bit_for_bit(case):
    factors, weights, grams = case
    for method, options in ((regmean, {"rank": 3}), (lego_calibrated, {"n_clusters": 3})):
        plain = method(factors, weights, generator=torch.Generator().manual_seed(0), calibration=grams, **options)[0]
        zero = method(factors, weights, generator=torch.Generator().manual_seed(0), calibration=grams, ridge=0.0,
                      **options)[0]
        assert torch.equal(plain.A, zero.A) and torch.equal(plain.B, zero.B)


@pytest.mark.parametrize("shrink", [0.5, 1.0])
@pytest.mark.parametrize("ridge", [1e-3, 0.1, 10.0])
def test_ridge_equals_the_dense_ridged_solve(case, shrink, ridge):
    factors, weights, grams = case
    expected, total = dense_regmean(factors, weights, grams, shrink, ridge)
    merged, _ = regmean(factors, weights, generator=torch.Generator(), calibration=grams, shrink=shrink, ridge=ridge)
    assert relative(merged.delta(), expected) < 1e-6
    # rank k: the best in the ridged calibration norm; lego_calibrated with every unit its own cluster: the same W*
    low, info = regmean(factors, weights, generator=torch.Generator(), calibration=grams, shrink=shrink, ridge=ridge,
                        rank=3)
    assert info["calibration_error"] == pytest.approx(calibration_error(low.delta(), expected, total), rel=1e-4)
    every, _ = lego_calibrated(factors, weights, generator=torch.Generator().manual_seed(0), calibration=grams,
                               shrink=shrink, ridge=ridge, n_clusters=7)
    assert relative(every.delta(), expected) < 1e-5


def test_ridge_shrinks_the_merge_monotonically_towards_the_gram_weighted_sum_over_lambda():
    """W(l) = N (G + l m I)^-1 with N = sum_t w_t delta_t G~_t, m = mean(diag G): in G's eigenbasis column j is
    scaled by 1 / (e_j + l m), so ||W(l)|| decreases in l, and l m W(l) -> N as l grows (W itself -> 0)."""
    generator = torch.Generator().manual_seed(2)
    factors = [random_factors(D_OUT, D_IN, 2, generator) for _ in range(3)]
    few = [random_gram(generator, n_tokens=3) for _ in factors]  # rank 3 of 10 each: ill-conditioned after shrink
    weights = [1.0, 0.5, 2.0]

    def merged(ridge):
        return regmean(factors, weights, generator=torch.Generator(), calibration=few, ridge=ridge)[0].delta().double()

    norms = [float(merged(ridge).norm()) for ridge in (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)]
    assert all(a > b for a, b in zip(norms, norms[1:]))
    average = sum(w * f.delta().double() for f, w in zip(factors, weights)) / sum(weights)  # RegMean's, equal Grams
    assert norms[0] > 1.5 * float(average.norm())  # the blow-up the ridge is for (3 tokens per task)
    numerator = sum(w * f.delta().double() @ shrunk(g, 0.9) for f, w, g in zip(factors, weights, few))
    mean = float(sum(abs(w) * shrunk(g, 0.9) for w, g in zip(weights, few)).diagonal().mean())
    assert relative(1e6 * mean * merged(1e6), numerator) < 1e-4


@pytest.mark.parametrize("ridge", [-1e-3, float("nan"), float("inf"), True, "0.1"])
def test_bad_ridge_is_a_method_error(case, ridge):
    factors, weights, grams = case
    with pytest.raises(ll.MethodError, match="ridge"):
        regmean(factors, weights, generator=torch.Generator(), calibration=grams, ridge=ridge)
    with pytest.raises(ll.MethodError, match="ridge"):
        lego_calibrated(factors, weights, generator=torch.Generator(), calibration=grams, ridge=ridge)


def test_lego_calibrated_with_every_unit_its_own_cluster_is_regmean(case):
    factors, weights, grams = case
    merged, info = lego_calibrated(factors, weights, generator=torch.Generator().manual_seed(0), calibration=grams,
                                   n_clusters=7)
    expected, _ = dense_regmean(factors, weights, grams)
    assert relative(merged.delta(), expected) < 1e-5 and info["calibration_error"] < 1e-6


@pytest.mark.parametrize("basis", ["regmean", "adapter"])
@pytest.mark.parametrize("clustering", ["rank1", "units"])
def test_lego_calibrated_refit_is_the_least_squares_b_for_its_a(case, basis, clustering):
    factors, weights, grams = case
    merged, info = lego_calibrated(factors, weights, generator=torch.Generator().manual_seed(0), calibration=grams,
                                   n_clusters=3, basis=basis, clustering=clustering)
    expected, total = dense_regmean(factors, weights, grams)
    A = merged.A.double()
    best_b = expected @ total @ A.T @ torch.linalg.inv(A @ total @ A.T)  # argmin_B ||(B A - W*) L||
    assert relative(merged.delta(), best_b @ A) < 1e-5
    assert info["calibration_error"] == pytest.approx(calibration_error(merged.delta(), expected, total), rel=1e-4)
    weighted = regmean(factors, weights, generator=torch.Generator(), calibration=grams, rank=3)[1]["calibration_error"]
    assert info["calibration_error"] >= weighted - 1e-9  # nothing of rank 3 beats the weighted truncation


def test_adapter_basis_cannot_reach_regmean_even_with_every_unit(case):
    """The rows of B A' for A' in the span of the adapters' A rows: RegMean's rows are A_t G~_t G^-1, elsewhere."""
    factors, weights, grams = case
    merged, info = lego_calibrated(factors, weights, generator=torch.Generator().manual_seed(0), calibration=grams,
                                   n_clusters=7, basis="adapter")
    expected, total = dense_regmean(factors, weights, grams)
    A = torch.cat([f.A for f in factors]).double()
    projection = expected @ total @ A.T @ torch.linalg.inv(A @ total @ A.T) @ A
    assert relative(merged.delta(), projection) < 1e-5
    assert info["calibration_error"] > 0.05


def calibrations_for(adapters, seed=0, fingerprint="model-a"):
    """One in-memory Calibration per adapter: a random Gram per module, shared by nothing."""
    generator = torch.Generator().manual_seed(seed)
    result = []
    for index, adapter in enumerate(adapters):
        grams = {m: random_gram(generator, d=adapter.info(m).shape[1]) * 50 for m in adapter}
        result.append(ll.Calibration(grams, {m: m for m in grams}, tokens=50,
                                     metadata={"model_fingerprint": fingerprint}, name=f"calib-{index}"))
    return result


def test_merge_hands_each_module_its_adapters_mean_grams():
    adapters = [random_adapter(f"a{i}", rank=r, seed=i) for i, r in enumerate((2, 3))]
    calibrations = calibrations_for(adapters)
    merged = ll.merge(adapters, "regmean", calibration=calibrations, weights=[1.0, 0.5], rank=3)
    for module in adapters[0]:
        factors = [a[module] for a in adapters]
        expected = regmean(factors, [1.0, 0.5], generator=torch.Generator(), rank=3,
                           calibration=[c.moment(module) for c in calibrations])[0]
        assert torch.equal(merged[module].A, expected.A) and torch.equal(merged[module].B, expected.B)
    summaries = merged.metadata["provenance"]["calibration"]
    assert [s["tokens"] for s in summaries] == [50, 50] and summaries[0]["model_fingerprint"] == "model-a"


def test_merge_passes_ridge_from_the_command_line_and_records_it():
    adapters = [random_adapter(f"a{i}", rank=r, seed=i) for i, r in enumerate((2, 3))]
    calibrations = calibrations_for(adapters)
    merged = ll.merge(adapters, "regmean", calibration=calibrations, rank=3, ridge="0.01")  # as -p ridge=0.01
    module = next(iter(adapters[0]))
    expected = regmean([a[module] for a in adapters], [1.0, 1.0], generator=torch.Generator(), rank=3, ridge=0.01,
                       calibration=[c.moment(module) for c in calibrations])[0]
    assert torch.equal(merged[module].A, expected.A) and torch.equal(merged[module].B, expected.B)
    assert merged.metadata["provenance"]["params"]["ridge"] == 0.01
    plain = ll.merge(adapters, "regmean", calibration=calibrations, rank=3)
    assert "ridge" not in plain.metadata["provenance"]["params"]


def test_merge_refuses_calibrations_that_do_not_fit():
    adapters = [random_adapter(f"a{i}", seed=i) for i in range(2)]
    good = calibrations_for(adapters)
    with pytest.raises(ll.MethodError, match="needs calibration data"):
        ll.merge(adapters, "regmean")
    with pytest.raises(ll.MethodError, match="does not use calibration"):
        ll.merge(adapters, "lego", calibration=good)
    with pytest.raises(ll.CalibrationError, match="got 1 calibration"):
        ll.merge(adapters, "regmean", calibration=good[:1])
    other = calibrations_for(adapters[1:], fingerprint="model-b")
    with pytest.raises(ll.CalibrationError, match="different base models"):
        ll.merge(adapters, "regmean", calibration=[good[0], other[0]])
    partial = calibrations_for(adapters)
    del partial[1].modules["model.layers.1.down_proj"]
    message = "calib-1.*for adapter 'a1'.*no Gram for module 'model.layers.1.down_proj'"
    with pytest.raises(ll.CalibrationError, match=message):
        ll.merge(adapters, "regmean", calibration=partial)
    narrow = calibrations_for([random_adapter("x", seed=5, types=("q_proj",))])[0]  # Grams 16 x 16
    narrow.modules = {m: "model.layers.0.q_proj" for m in adapters[0]}
    with pytest.raises(ll.CalibrationError, match="16 x 16 Gram but the adapter's module has d_in = 40"):
        ll.merge(adapters, "regmean", calibration=[good[0], narrow])
