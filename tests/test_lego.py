import math

import pytest
import torch

import lora_lego as ll
from lora_lego.errors import ClusteringWarning, MethodError
from lora_lego.lowrank import to_units
from lora_lego.methods import get_method
from lora_lego.types import Adapter, LoraFactors
from synthetic import dense_sum, random_adapter, random_factors

MODULE = "model.layers.0.q_proj"


def one_module(name: str, factors: LoraFactors) -> Adapter:
    return Adapter({MODULE: factors}, {"dtype": "float32"}, name=name)


def sorted_units(factors: LoraFactors) -> torch.Tensor:
    units = to_units(factors)
    return units[torch.argsort(units[:, 0])]


def test_k_at_least_units_without_reweighting_equals_concat():
    adapters = [random_adapter(n, r, seed=s) for s, (n, r) in enumerate([("a", 2), ("b", 3)])]
    weights = [1.5, -0.5]
    lego = ll.merge(adapters, "lego", weights=weights, rank=99, param_norm="off", output_reweight=False)
    concat = ll.merge(adapters, "concat", weights=weights)
    for module in concat:
        assert torch.equal(lego[module].A, concat[module].A) and torch.equal(lego[module].B, concat[module].B)


def test_one_adapter_with_k_equal_r_reproduces_its_delta():
    adapter = random_adapter("a", 6, seed=3)
    merged = ll.merge([adapter], "lego", rank=6)  # default reweighting on: both factors are 1 here
    for module in adapter:
        torch.testing.assert_close(merged[module].delta(), adapter[module].delta(), rtol=1e-5, atol=1e-5)
        assert merged.metadata["report"][module]["relative_error"] < 1e-6


def test_permutation_invariance_of_input_ranks():
    g = torch.Generator().manual_seed(0)
    first, second = random_factors(24, 16, 4, g), random_factors(24, 16, 5, g)
    perm = torch.randperm(5, generator=g)
    shuffled = LoraFactors(second.A[perm], second.B[:, perm])
    kwargs = dict(rank=9, seed=11)
    plain = ll.merge([one_module("a", first), one_module("b", second)], "lego", **kwargs)[MODULE]
    permuted = ll.merge([one_module("a", first), one_module("b", shuffled)], "lego", **kwargs)[MODULE]
    torch.testing.assert_close(sorted_units(plain), sorted_units(permuted))
    torch.testing.assert_close(plain.delta(), permuted.delta(), rtol=1e-5, atol=1e-5)


def test_hand_computed_two_clusters():
    # units [a ; b] with d_in = d_out = 1: two tight groups around (1, 1) and (-3, 2)
    A = torch.tensor([[1.0], [1.2], [-3.0], [-3.2]])
    B = torch.tensor([[1.0, 0.8, 2.0, 2.2]])
    merged = ll.merge([one_module("a", LoraFactors(A, B))], "lego", rank=2, param_norm="off", output_reweight=False)
    units = sorted_units(merged[MODULE])
    torch.testing.assert_close(units, torch.tensor([[-3.1, 2.1], [1.1, 0.9]]))
    # with L-inf parameter reweighting each centroid gets its members' mean max-abs: 3.1 and 1.1 -> unchanged here
    # with L2: member norms are mean(|(1,1)|, |(1.2,0.8)|) and mean(|(-3,2)|, |(-3.2,2.2)|)
    l2 = ll.merge([one_module("a", LoraFactors(A, B))], "lego", rank=2, param_norm="l2", output_reweight=False)
    got = sorted_units(l2[MODULE]).norm(dim=1)
    expected = torch.tensor([(math.hypot(3, 2) + math.hypot(3.2, 2.2)) / 2,
                             (math.hypot(1, 1) + math.hypot(1.2, 0.8)) / 2])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("norm", ["inf", "l2"])
def test_parameter_reweighting_restores_member_mean_norm(norm):
    adapters = [random_adapter(n, 8, seed=s) for s, n in enumerate("abc")]
    merged = ll.merge(adapters, "lego", rank=5, param_norm=norm, output_reweight=False, seed=1)
    for module in adapters[0]:
        pool = torch.cat([to_units(a[module]) for a in adapters])
        labels = torch.tensor(merged.metadata["report"][module]["labels"])
        centroids = to_units(merged[module])
        measure = (lambda x: x.abs().amax(dim=1)) if norm == "inf" else (lambda x: x.norm(dim=1))
        for c in range(centroids.shape[0]):
            members = pool[labels == c]
            assert measure(centroids[c:c + 1]).item() == pytest.approx(measure(members).mean().item(), rel=1e-5)


def test_output_reweighting_is_exactly_sqrt_ref_over_k():
    adapters = [random_adapter("a", 4, seed=1), random_adapter("b", 8, seed=2)]
    weights = [1.0, 3.0]
    on = ll.merge(adapters, "lego", weights=weights, rank=5, seed=2)
    off = ll.merge(adapters, "lego", weights=weights, rank=5, seed=2, output_reweight=False)
    ref = (1.0 * 4 + 3.0 * 8) / 4.0
    for module in adapters[0]:
        scale = on.metadata["report"][module]["output_scale"]
        assert scale == pytest.approx(math.sqrt(ref / 5))
        torch.testing.assert_close(on[module].delta(), scale * off[module].delta(), rtol=1e-5, atol=1e-6)
    explicit = ll.merge(adapters, "lego", weights=weights, rank=5, seed=2, ref_rank=20.0)
    assert explicit.metadata["report"][MODULE]["output_scale"] == pytest.approx(2.0)


def test_heterogeneous_ranks_and_report():
    adapters = [random_adapter(n, r, seed=s) for s, (n, r) in enumerate([("r4", 4), ("r8", 8), ("r16", 16)])]
    merged = ll.merge(adapters, "lego", rank=8, seed=0)
    for module in adapters[0]:
        entry = merged.metadata["report"][module]
        assert merged[module].rank == 8 and merged[module].shape == adapters[0][module].shape
        assert sum(entry["cluster_sizes"]) == 28 and len(entry["cluster_sizes"]) == 8
        per_rank = entry["sources_per_rank"]
        assert [sum(p.values()) for p in per_rank] == entry["cluster_sizes"]
        totals = {n: sum(p.get(n, 0) for p in per_rank) for n in ("r4", "r8", "r16")}
        assert totals == {"r4": 4, "r8": 8, "r16": 16}
        assert 0 < entry["relative_error"] < 1.5


def test_default_k_is_largest_input_rank():
    adapters = [random_adapter("a", 3, seed=1), random_adapter("b", 6, seed=2)]
    merged = ll.merge(adapters, "lego")
    assert {f.rank for f in merged.modules.values()} == {6}


def test_duplicate_units_leave_empty_clusters_dropped_with_warning():
    f = random_factors(24, 16, 1, torch.Generator().manual_seed(0))
    same = LoraFactors(f.A.repeat(4, 1), f.B.repeat(1, 4))  # four identical units
    with pytest.warns(ClusteringWarning, match="empty"):
        merged = ll.merge([one_module("a", same)], "lego", rank=3, output_reweight=False)
    assert merged[MODULE].rank == 1
    torch.testing.assert_close(merged[MODULE].delta(), f.delta(), rtol=1e-5, atol=1e-6)


def test_zero_weight_adapter_is_left_out_and_negative_weight_negates():
    a, b = random_adapter("a", 4, seed=1), random_adapter("b", 4, seed=2)
    only_a = ll.merge([a, b], "lego", weights=[1.0, 0.0], rank=8, output_reweight=False)
    assert all(sources == {"a": 1} for sources in only_a.metadata["report"][MODULE]["sources_per_rank"])
    torch.testing.assert_close(only_a[MODULE].delta(), a[MODULE].delta(), rtol=1e-5, atol=1e-5)
    # called directly, the method itself leaves zero-weight units out (label -1)
    _, info = get_method("lego")([a[MODULE], b[MODULE]], [1.0, 0.0], generator=torch.Generator(), n_clusters=8)
    assert info["labels"][4:] == [-1] * 4
    negated = ll.merge([a], "lego", weights=[-1.0], rank=4)
    torch.testing.assert_close(negated[MODULE].delta(), -a[MODULE].delta(), rtol=1e-5, atol=1e-5)


def test_normalized_features_average_raw_members():
    A = torch.tensor([[1.0, 0.0], [10.0, 0.0], [0.0, 1.0]])
    B = torch.tensor([[1.0, 10.0, 0.0], [0.0, 0.0, 1.0]])  # units 0 and 1 share a direction, unit 2 is orthogonal
    merged = ll.merge([one_module("a", LoraFactors(A, B))], "lego", rank=2, features="normalized",
                      param_norm="off", output_reweight=False)
    units = sorted_units(merged[MODULE])
    torch.testing.assert_close(units, torch.tensor([[0.0, 1.0, 0.0, 1.0], [5.5, 0.0, 5.5, 0.0]]))


@pytest.mark.parametrize("params", [{"rank": 0}, {"rank": -2}, {"n_init": 0}, {"max_iter": 0}, {"tol": -1.0},
                                    {"ref_rank": 0.0}])
def test_bad_lego_parameters(params):
    with pytest.raises(MethodError, match=r"module 'model\.layers\.0\.q_proj'"):
        ll.merge([random_adapter("a")], "lego", **params)


def test_prune_reduces_rank_and_keeps_small_modules():
    adapter = random_adapter("a", 8, seed=4)
    adapter.modules["model.layers.0.v_proj"] = random_factors(8, 16, 2, torch.Generator().manual_seed(9))
    pruned = ll.prune(adapter, rank=4, method="lego")
    assert pruned["model.layers.0.q_proj"].rank == 4
    assert pruned["model.layers.0.v_proj"].rank == 2
    exact = ll.prune(adapter, rank=8, method="lego", output_reweight=False)
    for module in adapter:
        torch.testing.assert_close(exact[module].delta().double(), dense_sum([adapter], module), rtol=1e-5, atol=1e-5)


def test_lego_is_bitwise_deterministic_per_seed():
    adapters = [random_adapter(n, 8, seed=s) for s, n in enumerate("abc")]
    first = ll.merge(adapters, "lego", rank=6, seed=3)
    second = ll.merge(adapters, "lego", rank=6, seed=3)
    for module in first:
        assert torch.equal(first[module].A, second[module].A) and torch.equal(first[module].B, second[module].B)
