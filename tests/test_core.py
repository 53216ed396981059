"""Core space: exact reconstruction, linear rules equal to full space, and TIES / DARE / magnitude
pruning on the cores against a dense reference written here."""

from __future__ import annotations

import pytest
import torch

from lora_lego import merge
from lora_lego.core_space import core_space, from_core
from lora_lego.errors import MethodError
from lora_lego.methods import get_method
from lora_lego.types import Adapter, LoraFactors


def random_factors(seed: int, shapes=((40, 30, 3), (40, 30, 5), (40, 30, 2))) -> list[LoraFactors]:
    generator = torch.Generator().manual_seed(seed)
    return [LoraFactors(torch.randn(r, d_in, generator=generator), torch.randn(d_out, r, generator=generator))
            for d_out, d_in, r in shapes]


def run(method: str, factors, weights, **params):
    function = get_method(method).fn
    result = function(factors, weights, generator=torch.Generator().manual_seed(0), **params)
    return result[0] if isinstance(result, tuple) else result


def test_cores_reconstruct_every_delta_and_drop_null_directions():
    factors = random_factors(0)
    twice = factors + [factors[0]]  # a copy adds no direction
    space = core_space(twice)
    assert space.U.shape == (40, 10) and space.V.shape == (30, 10)
    for t, f in enumerate(twice):
        torch.testing.assert_close(space.U @ space.cores[t] @ space.V.T, f.B.double() @ f.A.double(),
                                   rtol=1e-10, atol=1e-10)
    assert torch.allclose(space.U.T @ space.U, torch.eye(10, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("method, params", [("magnitude_prune", {"density": 1.0}), ("dare_linear", {"density": 1.0})])
def test_linear_rules_are_the_same_in_core_and_full_space(method, params):
    factors, weights = random_factors(1), [1.0, -0.5, 2.0]
    exact = sum(w * f.delta() for f, w in zip(factors, weights))
    for space in ("full", "core"):
        result = run(method, factors, weights, rank=10, space=space, exact_svd=True, **params)
        torch.testing.assert_close(result.delta(), exact, rtol=1e-5, atol=1e-5)


def reference_ties(tensors: list[torch.Tensor], weights, density: float) -> torch.Tensor:
    """TIES from its definition: keep the top density fraction of |entries| per task, weight, elect the
    sign of the sum, average the entries that agree with it."""
    kept = []
    for t, w in zip(tensors, weights):
        keep = int(density * t.numel())
        threshold = t.abs().flatten().topk(keep).values[-1]
        kept.append(torch.where(t.abs() >= threshold, t, 0.0) * w)
    stack = torch.stack(kept)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    agree = (stack * sign) > 0
    return (stack * agree).sum(0) / agree.sum(0).clamp_min(1)


def test_core_ties_is_ties_on_the_core_matrices():
    factors, weights = random_factors(2), [1.0, 0.7, 1.3]
    stacked_B = torch.cat([f.B.double() for f in factors], 1)
    stacked_A = torch.cat([f.A.double() for f in factors], 0)
    U = torch.linalg.svd(stacked_B, full_matrices=False)[0]  # the paper's reference bases
    V = torch.linalg.svd(stacked_A, full_matrices=False)[2].T
    cores = [U.T @ f.delta().double() @ V for f in factors]
    expected = U @ reference_ties(cores, weights, 0.3) @ V.T
    result = run("ties", factors, weights, rank=10, density=0.3, space="core")
    # singular vectors are defined up to sign: compare the deltas, which are not
    torch.testing.assert_close(result.delta().double(), expected, rtol=1e-5, atol=1e-5)
    assert result.rank == 10
    assert not torch.allclose(result.delta(), run("ties", factors, weights, rank=10, density=0.3).delta(), atol=1e-3)


def test_core_results_stay_in_the_span_and_truncate_to_k():
    factors, weights = random_factors(3), [1.0, 1.0, 1.0]
    space = core_space(factors)
    P, Q = space.U @ space.U.T, space.V @ space.V.T
    for method in ("ties", "dare_ties", "dare_linear", "magnitude_prune"):
        result = run(method, factors, weights, rank=4, space="core")
        delta = result.delta().double()
        assert result.rank == 4
        torch.testing.assert_close(P @ delta @ Q, delta, rtol=1e-5, atol=1e-5)
    core = torch.randn(10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    best = from_core(core, space, 3, "linear", torch.float64).delta()
    s = torch.linalg.svdvals(core)
    assert float((best - space.U @ core @ space.V.T).norm()) == pytest.approx(float(s[3:].norm()), rel=1e-8)


def test_space_is_validated_and_deterministic_through_merge():
    factors = random_factors(4)
    adapters = [Adapter({"m": f}, name=f"a{i}") for i, f in enumerate(factors)]
    with pytest.raises(MethodError, match="space"):
        merge(adapters, "ties", space="diagonal")
    first = merge(adapters, "dare_ties", space="core", seed=3)["m"]
    again = merge(adapters, "dare_ties", space="core", seed=3)["m"]
    assert torch.equal(first.A, again.A) and torch.equal(first.B, again.B)
