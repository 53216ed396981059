"""WUDI against a dense closed-form reference on small shapes; orthogonal input subspaces give task arithmetic;
the ridge shrinks toward zero; the reference's early-stopped Adam starts at task arithmetic and lowers the loss."""

from __future__ import annotations

import pytest
import torch

from lora_lego.errors import MethodError
from lora_lego.methods import get_method
from lora_lego.types import LoraFactors

WUDI = get_method("wudi")


def factors(seed: int, shapes=((3, 12, 10), (2, 12, 10), (4, 12, 10))) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return [LoraFactors(torch.randn(r, d_in, generator=g, dtype=torch.float64),
                        torch.randn(d_out, r, generator=g, dtype=torch.float64), "linear") for r, d_out, d_in in shapes]


def run(fs, weights=None, **params):
    weights = weights or [1.0] * len(fs)
    return WUDI(fs, weights, generator=torch.Generator(), **params)[0].delta()


def dense_wudi(deltas: list[torch.Tensor]) -> torch.Tensor:
    numerator = sum(t @ t.T @ t / t.square().sum() for t in deltas)
    gram = sum(t.T @ t / t.square().sum() for t in deltas)
    return numerator @ torch.linalg.pinv(gram, hermitian=True)


def objective(tau, deltas):
    return float(sum(((tau - t) @ t.T).square().sum() / t.square().sum() for t in deltas))


def test_matches_the_dense_closed_form():
    fs = factors(0)
    weights = [1.0, -0.5, 2.0]
    deltas = [w * f.delta() for f, w in zip(fs, weights)]
    expected = dense_wudi(deltas)
    result = run(fs, weights)
    torch.testing.assert_close(result, expected, rtol=1e-7, atol=1e-9)
    # it is the minimiser: any small change raises the objective
    g = torch.Generator().manual_seed(1)
    assert all(objective(result + 1e-3 * torch.randn(result.shape, generator=g, dtype=result.dtype), deltas)
               > objective(result, deltas) for _ in range(5))


def test_rank_k_is_the_exact_truncation():
    fs = factors(2)
    full = run(fs)
    u, s, vh = torch.linalg.svd(full)
    torch.testing.assert_close(run(fs, rank=3), (u[:, :3] * s[:3]) @ vh[:3], rtol=1e-7, atol=1e-9)


def test_orthogonal_input_subspaces_give_task_arithmetic():
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))[0].T  # orthonormal rows
    fs = [LoraFactors(basis[i * 3:(i + 1) * 3] * (i + 1), torch.randn(12, 3, generator=g, dtype=torch.float64),
                      "linear") for i in range(3)]
    torch.testing.assert_close(run(fs, [1.0, 0.5, -1.0]), fs[0].delta() + 0.5 * fs[1].delta() - fs[2].delta(),
                               rtol=1e-7, atol=1e-9)


def test_ridge_shrinks_and_scale_multiplies():
    fs = factors(4)
    exact = run(fs)
    assert float(run(fs, ridge=10.0).norm()) < float(exact.norm())
    torch.testing.assert_close(run(fs, scale=0.5), 0.5 * exact)
    with pytest.raises(MethodError, match="ridge"):
        run(fs, ridge=-1.0)


def test_adam_starts_at_task_arithmetic_and_lowers_the_objective():
    fs = factors(5)
    deltas = [f.delta() for f in fs]
    total = sum(deltas)
    start = run(fs, solver="adam", steps=0, rank=10)
    torch.testing.assert_close(start, total)
    later = run(fs, solver="adam", steps=200, lr=1e-2, rank=10)
    assert objective(later, deltas) < objective(total, deltas)
    assert objective(dense_wudi(deltas), deltas) <= objective(later, deltas) + 1e-9
