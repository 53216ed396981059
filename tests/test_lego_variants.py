"""Beyond the paper (issue 7): `lego(canonical="svd")` and `lego_rank1` do not depend on how an adapter
splits its delta into ranks (signs, scales, order), while the paper's clustering on [a ; b] does."""

import pytest
import torch

import lora_lego as ll
from lora_lego.types import Adapter, LoraFactors
from synthetic import random_factors

MODULE = "model.layers.0.q_proj"


def adapters(flip: bool = False, permute: bool = False) -> list[Adapter]:
    """Three rank-4 one-module adapters; the third re-split: ranks negated / rescaled / permuted (same delta)."""
    g = torch.Generator().manual_seed(0)
    factors = [random_factors(24, 16, 4, g) for _ in range(3)]
    A, B = factors[2].A.clone(), factors[2].B.clone()
    if flip:
        sign_scale = torch.tensor([-1.0, 3.0, -0.25, 1.0])  # (c b, a / c) and (-b, -a)
        A, B = A / sign_scale[:, None], B * sign_scale[None, :]
    if permute:
        order = torch.tensor([2, 0, 3, 1])
        A, B = A[order], B[:, order]
    factors[2] = LoraFactors(A, B)
    return [Adapter({MODULE: f}, {"dtype": "float32"}, name=f"t{i}") for i, f in enumerate(factors)]


def merged_delta(method: str, inputs: list[Adapter], **params) -> torch.Tensor:
    return ll.merge(inputs, method, seed=5, **params)[MODULE].delta()


@pytest.mark.parametrize("method, params", [("lego", {"canonical": "svd"}), ("lego_rank1", {})])
def test_sign_and_scale_flips_of_units_leave_the_merge_unchanged(method, params):
    for k in (3, 6):
        plain = merged_delta(method, adapters(), rank=k, **params)
        flipped = merged_delta(method, adapters(flip=True), rank=k, **params)
        torch.testing.assert_close(flipped, plain, rtol=1e-4, atol=1e-5)


def test_canonical_units_also_ignore_the_order_of_ranks():
    plain = merged_delta("lego", adapters(), rank=5, canonical="svd")
    shuffled = merged_delta("lego", adapters(flip=True, permute=True), rank=5, canonical="svd")
    torch.testing.assert_close(shuffled, plain, rtol=1e-4, atol=1e-5)


def test_the_papers_clustering_is_not_invariant_to_flips():
    plain = merged_delta("lego", adapters(), rank=3)
    flipped = merged_delta("lego", adapters(flip=True), rank=3)
    assert float((flipped - plain).norm() / plain.norm()) > 0.05


def test_lego_rank1_with_k_at_least_units_and_no_reweighting_is_the_exact_sum():
    inputs = adapters()
    weights = [1.0, -0.5, 2.0]
    merged = ll.merge(inputs, "lego_rank1", weights=weights, rank=12, param_norm=False, output_reweight=False)
    expected = sum(w * a[MODULE].delta() for a, w in zip(inputs, weights))
    torch.testing.assert_close(merged[MODULE].delta(), expected, rtol=1e-4, atol=1e-4)


def test_lego_rank1_restores_member_frobenius_norms_and_reports_clusters():
    inputs = adapters()
    merged = ll.merge(inputs, "lego_rank1", rank=4, output_reweight=False)
    report = merged.metadata["report"][MODULE]
    units = torch.cat([a[MODULE].A for a in inputs]), torch.cat([a[MODULE].B for a in inputs], dim=1)
    norms = units[0].norm(dim=1) * units[1].norm(dim=0)
    labels = torch.tensor(report["labels"])
    result = merged[MODULE]
    for cluster in range(result.rank):
        expected = float(norms[labels == cluster].mean())
        assert abs(float(result.A[cluster].norm() * result.B[:, cluster].norm()) - expected) < 1e-4 * expected
    assert sum(report["cluster_sizes"]) == 12 and len(report["sources_per_rank"]) == result.rank


def test_canonical_factors_keep_the_delta():
    from lora_lego.methods.lego import canonical_factors

    factors = adapters(flip=True)[2][MODULE]
    canonical = canonical_factors(factors)
    torch.testing.assert_close(canonical.delta(), factors.delta(), rtol=1e-5, atol=1e-5)
    gram_a = canonical.A @ canonical.A.T
    torch.testing.assert_close(gram_a, torch.diag(gram_a.diagonal()), rtol=1e-4, atol=1e-4)  # orthogonal rows
