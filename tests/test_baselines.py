"""The baselines (issue 4): hand-computed trim / elect / disjoint mean / DARE cases, and the identities
that tie the methods together (dare at density 1 = task arithmetic, KnOTS-TA at full rank = task
arithmetic, ensemble = concat with 1/n, average's cross terms)."""

import pytest
import torch

import lora_lego as ll
from lora_lego.errors import MethodError
from lora_lego.lowrank import dense_truncated_svd, relative_error
from lora_lego.merge import module_generator
from lora_lego.methods import get_method
from lora_lego.methods.arithmetic import combine, dare, disjoint_mean, elect_sign, trim
from lora_lego.methods.knots import aligned_coordinates
from lora_lego.types import Adapter, LoraFactors
from synthetic import dense_sum, random_adapter, random_factors

TAU = torch.tensor([[[1.0, -2.0, 3.0], [0.0, 1.0, -1.0]],
                    [[-3.0, -1.0, 1.0], [2.0, -1.0, 0.0]]])  # two 2x3 task tensors


def as_adapter(name: str, delta: torch.Tensor) -> Adapter:
    """A one-module adapter whose delta is exactly `delta` (B = identity, A = delta)."""
    return Adapter({"m": LoraFactors(delta.clone(), torch.eye(delta.shape[0]))}, name=name)


def test_trim_keeps_the_largest_magnitudes():
    assert torch.equal(trim(TAU[0], 0.5), torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]]))  # exact count on ties
    tensor = torch.tensor([[1.0, -3.0, 2.0], [0.5, -4.0, 0.0]])
    assert torch.equal(trim(tensor, 0.5), torch.tensor([[0.0, -3.0, 2.0], [0.0, -4.0, 0.0]]))
    assert torch.equal(trim(tensor, 1 / 6), torch.tensor([[0.0, 0.0, 0.0], [0.0, -4.0, 0.0]]))
    assert torch.equal(trim(tensor, 1.0), tensor)


def test_elect_sign_total_and_frequency():
    # sums [[-2, -3, 4], [2, 0, -1]]; sign sums [[0, -2, 2], [1, 0, -1]]; a tie elects +1
    assert torch.equal(elect_sign(TAU, "total"), torch.tensor([[-1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]))
    assert torch.equal(elect_sign(TAU, "frequency"), torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]))


def test_disjoint_mean_averages_only_agreeing_non_zero_entries():
    expected = torch.tensor([[-3.0, -1.5, 2.0], [2.0, 1.0, -1.0]])
    assert torch.equal(disjoint_mean(TAU, elect_sign(TAU, "total")), expected)


def test_dare_mask_from_the_generator():
    # torch.rand((2, 3)) from seed 0 is [[0.4963, 0.7682, 0.0885], [0.1320, 0.3074, 0.6341]]
    tensor = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    result = dare(tensor, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(result, torch.tensor([[2.0, 0.0, 6.0], [8.0, 10.0, 0.0]]))
    big = torch.ones(200, 500)
    kept = dare(big, 0.3, torch.Generator().manual_seed(1))
    assert abs(float((kept != 0).float().mean()) - 0.3) < 0.01 and abs(float(kept.mean()) - 1.0) < 0.03


def test_ties_merge_of_hand_computed_deltas():
    adapters = [as_adapter("one", TAU[0]), as_adapter("two", TAU[1])]
    merged = ll.merge(adapters, "ties", density=1.0, rank=2)
    assert torch.allclose(merged["m"].delta(), torch.tensor([[-3.0, -1.5, 2.0], [2.0, 1.0, -1.0]]), atol=1e-5)
    # trimmed to 3 entries (ties at |1| kept first in row-major order): [[1,-2,3],[0,0,0]] and [[-3,-1,0],[2,0,0]];
    # weights 1 and 2; elected signs [[-,-,+],[+,+,+]]
    merged = ll.merge(adapters, "ties", density=0.5, rank=2, weights=[1.0, 2.0])
    trimmed = torch.stack([trim(TAU[0], 0.5), 2 * trim(TAU[1], 0.5)])
    assert torch.allclose(merged["m"].delta(), disjoint_mean(trimmed, elect_sign(trimmed, "total")), atol=1e-5)
    assert torch.allclose(merged["m"].delta(), torch.tensor([[-6.0, -2.0, 3.0], [4.0, 0.0, 0.0]]), atol=1e-5)


def test_magnitude_prune_and_dare_of_one_adapter_at_full_rank():
    adapter = as_adapter("one", TAU[0])
    pruned = ll.merge([adapter], "magnitude_prune", density=0.5, rank=2)
    assert torch.allclose(pruned["m"].delta(), trim(TAU[0], 0.5), atol=1e-5)
    dared = ll.merge([adapter], "dare_linear", density=0.5, rank=2, seed=7)
    expected = combine(TAU[:1], [1.0], sparsify="dare", combine_by="sum", density=0.5,
                       generator=module_generator(7, "m"))
    assert torch.allclose(dared["m"].delta(), expected, atol=1e-5)


@pytest.fixture
def adapters():
    return [random_adapter("a", 4, seed=1), random_adapter("b", 4, seed=2), random_adapter("c", 4, seed=3)]


WEIGHTS = [1.0, -0.5, 2.0]


def deltas_close(left: Adapter, right: Adapter, tol: float) -> None:
    for module in left:
        error = relative_error(left[module], right[module])
        assert error < tol, (module, error)


@pytest.mark.parametrize("exact_svd", [True, False])
def test_dare_linear_with_density_one_is_task_arithmetic(adapters, exact_svd):
    reference = ll.merge(adapters, "task_arithmetic", weights=WEIGHTS, rank=4, scale=0.5)
    dare = ll.merge(adapters, "dare_linear", weights=WEIGHTS, rank=4, scale=0.5, density=1.0, exact_svd=exact_svd)
    deltas_close(dare, reference, 1e-4)


@pytest.mark.parametrize("rank", [12, 5])
def test_knots_ta_is_task_arithmetic(adapters, rank):
    reference = ll.merge(adapters, "task_arithmetic", weights=WEIGHTS, rank=rank)
    deltas_close(ll.merge(adapters, "knots_ta", weights=WEIGHTS, rank=rank), reference, 1e-5)
    if rank == 12:  # full rank: the exact weighted sum
        for module, factors in reference.items():
            expected = dense_sum(adapters, module, WEIGHTS)
            assert float((factors.delta().double() - expected).norm() / expected.norm()) < 1e-5


def test_task_arithmetic_is_the_best_rank_k_approximation(adapters):
    merged = ll.merge(adapters, "task_arithmetic", weights=WEIGHTS, rank=5)
    for module in merged:
        s = torch.linalg.svdvals(dense_sum(adapters, module, WEIGHTS))
        optimal = float(s[5:].norm() / s.norm())
        assert abs(merged.metadata["report"][module]["relative_error"] - optimal) < 1e-5


def test_knots_coordinates_rebuild_each_task():
    generator = torch.Generator().manual_seed(0)
    factors = [random_factors(24, 16, r, generator) for r in (2, 3, 5)]
    basis, coordinates = aligned_coordinates(factors)
    assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype), atol=1e-10)
    for f, x in zip(factors, coordinates):
        assert torch.allclose(basis @ x, f.delta().double(), atol=1e-4)


def test_knots_ties_of_one_adapter_at_density_one_reproduces_it():
    adapter = random_adapter("a", 4, seed=5)
    deltas_close(ll.merge([adapter], "knots_ties", density=1.0, rank=4), adapter, 1e-5)


def test_ensemble_is_concat_with_weights_over_n(adapters):
    deltas_close(ll.merge(adapters, "ensemble", weights=WEIGHTS),
                 ll.merge(adapters, "concat", weights=[w / 3 for w in WEIGHTS]), 1e-6)


def test_average_has_cross_terms(adapters):
    merged = ll.merge(adapters, "average", weights=WEIGHTS)
    for module, factors in merged.items():
        scaled = [(abs(w) ** 0.5 * (1 if w > 0 else -1) * a[module].A, abs(w) ** 0.5 * a[module].B)
                  for a, w in zip(adapters, WEIGHTS)]
        expected = sum(B @ A for _, B in scaled for A, _ in scaled) / 9
        assert torch.allclose(factors.delta(), expected, atol=1e-4)


def test_average_refuses_mixed_ranks_naming_module_and_adapters():
    with pytest.raises(MethodError, match=r"module 'model.layers.0.q_proj' \(adapters 'a', 'b'\).*ranks \[4, 2\]"):
        ll.merge([random_adapter("a", 4, types=("q_proj",)), random_adapter("b", 2, types=("q_proj",))], "average")


def test_randomized_dense_svd_is_near_optimal_and_uses_only_its_generator():
    generator = torch.Generator().manual_seed(0)
    matrix = torch.randn(300, 40, generator=generator) @ torch.randn(40, 200, generator=generator)
    matrix += 0.5 * torch.randn(300, 200, generator=generator)
    state = torch.get_rng_state()
    exact = dense_truncated_svd(matrix, 8, exact=True)
    fast = dense_truncated_svd(matrix, 8, generator=torch.Generator().manual_seed(1))
    again = dense_truncated_svd(matrix, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(fast.A, again.A)
    errors = [float((matrix - f.delta()).norm() / matrix.norm()) for f in (exact, fast)]
    assert errors[1] < errors[0] * 1.001, errors


def test_svd_is_an_alias_of_task_arithmetic(adapters):
    assert get_method("svd").name == "task_arithmetic"
    merged = ll.merge(adapters, "svd", rank=3)
    assert merged.metadata["provenance"]["method"] == "task_arithmetic"


@pytest.mark.parametrize("method, params, message", [
    ("ties", {"density": 0.0}, "density"),
    ("dare_ties", {"density": 1.5}, "density"),
    ("knots_ties", {"density": -1}, "density"),
    ("task_arithmetic", {"rank": 0}, "rank"),
    ("magnitude_prune", {"rank": -2}, "rank"),
])
def test_bad_parameters(adapters, method, params, message):
    with pytest.raises(MethodError, match=message):
        ll.merge(adapters, method, **params)


@pytest.mark.parametrize("kind", ["continuous", "few values", "sorted"])
def test_kth_largest_matches_kthvalue_on_large_inputs(kind):
    from lora_lego.methods.arithmetic import kth_largest
    values = torch.randn(600_000, generator=torch.Generator().manual_seed(3)).abs()
    if kind == "few values":  # many ties at every threshold
        values = (values * 3).round()
    elif kind == "sorted":
        values = values.sort().values
    n = values.numel()
    for k in (1, 7, n // 10, n // 2, n - 1, n):
        assert torch.equal(kth_largest(values, k), values.kthvalue(n - k + 1).values), k
    assert torch.equal(kth_largest(values, n // 2, sample=16), values.kthvalue(n - n // 2 + 1).values)  # a poor bracket
