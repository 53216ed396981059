"""Choosing k per module (issue 7, part 3): `max_error` makes `n_clusters` / `rank` a cap and keeps the
smallest k whose relative error meets the tolerance (lego, lego_rank1: K-means unit error by binary
search; task_arithmetic: exact, from the singular values)."""

import math

import pytest
import torch
from sklearn.cluster import KMeans

import lora_lego as ll
from conftest import assert_matches_peft, load_peft, lora_layers, peft_deltas
from lora_lego.errors import MethodError
from lora_lego.lowrank import from_units, to_units
from lora_lego.methods.arithmetic import task_arithmetic
from lora_lego.methods.lego import lego
from lora_lego.methods.lego_rank1 import lego_rank1
from lora_lego.types import Adapter, LoraFactors
from synthetic import random_factors

METHODS = {"lego": lego, "lego_rank1": lego_rank1}


def clustered(d_out: int, d_in: int, n_directions: int, *, n_adapters: int = 3, rank: int = 4, noise: float = 0.01,
              seed: int = 0) -> list[LoraFactors]:
    """`n_adapters` factors of rank `rank` whose units [a_i ; b_i] are noisy copies of `n_directions` fixed
    units (unit i of each adapter copies direction i mod n_directions): that many tight, distant clusters."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_directions, d_in + d_out, generator=g)
    return [from_units(centres[torch.arange(rank) % n_directions]
                       + noise * torch.randn(rank, d_in + d_out, generator=g), d_in) for _ in range(n_adapters)]


def random_inputs(seed: int = 0) -> list[LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    return [random_factors(12, 10, 4, g) for _ in range(3)]


def run(method: str, factors: list[LoraFactors], seed: int = 0, **params) -> tuple[LoraFactors, dict]:
    weights = [1.0] * len(factors)
    return METHODS[method](factors, weights, generator=torch.Generator().manual_seed(seed), **params)


def unit_error(method: str, factors: list[LoraFactors], labels: list[int]) -> float:
    """sqrt(inertia / energy) recomputed by hand from the labels: raw units [a ; b] for lego, the dense
    rank-one updates b_i a_i^T for lego_rank1; centroid = mean of the members."""
    pooled = torch.cat([to_units(f) for f in factors]).double()
    if method == "lego_rank1":
        d_in = factors[0].d_in
        pooled = torch.stack([torch.outer(unit[d_in:], unit[:d_in]).flatten() for unit in pooled])
    labels = torch.tensor(labels)
    inertia = sum(float(((pooled[labels == c] - pooled[labels == c].mean(0)) ** 2).sum()) for c in labels.unique())
    return math.sqrt(inertia / float((pooled ** 2).sum()))


@pytest.mark.parametrize("method, params", [("lego", {}), ("lego", {"canonical": "svd", "rank": 3}),
                                            ("lego", {"features": "normalized", "sample_weights": True}),
                                            ("lego_rank1", {"rank": 5}), ("task_arithmetic", {"rank": 2})])
def test_max_error_zero_is_the_fixed_k_merge_bitwise(method, params):
    inputs = [Adapter({"m": f}, {"dtype": "float32"}, name=f"t{i}") for i, f in enumerate(random_inputs())]
    plain = ll.merge(inputs, method, weights=[1.0, -0.5, 2.0], seed=3, **params)
    off = ll.merge(inputs, method, weights=[1.0, -0.5, 2.0], seed=3, max_error=0.0, **params)
    assert torch.equal(off["m"].A, plain["m"].A) and torch.equal(off["m"].B, plain["m"].B)
    report = off.metadata["report"]["m"]
    assert report["max_error"] == 0.0 and report["chosen_rank"] == params.get("rank", 4) == off["m"].rank
    assert "rank_probes" not in report


@pytest.mark.parametrize("method", ["lego", "lego_rank1"])
def test_three_tight_clusters_give_exactly_k_3(method):
    factors = clustered(12, 10, 3)
    result, info = run(method, factors, n_clusters=8, max_error=0.1)
    assert info["chosen_rank"] == result.rank == 3 and sorted(info["cluster_sizes"]) == [3, 3, 6]
    by_direction = [{info["labels"][4 * t + i] for t in range(3) for i in range(4) if i % 3 == d} for d in range(3)]
    assert all(len(labels) == 1 for labels in by_direction) and len(set.union(*by_direction)) == 3
    assert unit_error(method, factors, info["labels"]) <= 0.02
    # independent check that k = 2 cannot meet the tolerance: scikit-learn's best 2-clustering of the same points
    points = torch.cat([to_units(f) for f in factors]).double()
    if method == "lego_rank1":
        points = torch.stack([torch.outer(p[10:], p[:10]).flatten() for p in points])
    best = KMeans(n_clusters=2, n_init=20, random_state=0).fit(points.numpy()).inertia_
    assert math.sqrt(best / float((points ** 2).sum())) > 0.3
    assert info["output_scale"] == pytest.approx(math.sqrt(4 / 3))  # output reweighting uses the chosen k


@pytest.mark.parametrize("method", ["lego", "lego_rank1"])
def test_a_cap_below_the_needed_rank_is_kept(method):
    result, info = run(method, clustered(12, 10, 3), n_clusters=2, max_error=0.1)
    assert info["chosen_rank"] == result.rank == 2 and info["rank_probes"][0][0] == 2
    assert len(info["rank_probes"]) == 1  # the cap missed: no search below it


@pytest.mark.parametrize("method", ["lego", "lego_rank1"])
@pytest.mark.parametrize("max_error", [0.2, 0.4, 0.6, 0.8])
def test_chosen_k_is_the_smallest_meeting_the_tolerance(method, max_error):
    factors, cap = random_inputs(1), 10
    result, info = run(method, factors, n_clusters=cap, max_error=max_error, n_init=4)
    k = info["chosen_rank"]
    assert 1 <= k <= cap and result.rank == k
    # every probe restarts the generator: the result is exactly the fixed-k run
    fixed, fixed_info = run(method, factors, n_clusters=k, n_init=4)
    assert torch.equal(result.A, fixed.A) and torch.equal(result.B, fixed.B)
    assert fixed_info["inertia"] == info["inertia"]
    errors = {k: unit_error(method, factors, run(method, factors, n_clusters=k, n_init=4)[1]["labels"])
              for k in range(1, cap + 1)}
    assert all(errors[k] >= errors[k + 1] - 1e-12 for k in range(1, cap))  # this input: inertia falls with k
    assert (errors[k] <= max_error or k == cap) and (k == 1 or errors[k - 1] > max_error)
    assert k == min([j for j in errors if errors[j] <= max_error] or [cap])  # the cap when nothing meets it
    for probe, error in info["rank_probes"]:
        assert error == pytest.approx(errors[probe], rel=1e-6)


@pytest.mark.parametrize("method", ["lego", "lego_rank1"])
def test_larger_max_error_never_gives_larger_k(method):
    for seed in range(2):
        ranks = [run(method, random_inputs(seed), seed=seed, n_clusters=12, max_error=e, n_init=3)[1]["chosen_rank"]
                 for e in (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)]
        assert ranks == sorted(ranks, reverse=True) and ranks[0] > ranks[-1]


@pytest.mark.parametrize("method", ["lego", "lego_rank1"])
def test_same_inputs_and_seed_give_the_same_k_and_bitwise_output(method):
    first, info = run(method, random_inputs(2), seed=7, n_clusters=9, max_error=0.45)
    second, again = run(method, random_inputs(2), seed=7, n_clusters=9, max_error=0.45)
    assert info["chosen_rank"] == again["chosen_rank"] and info["rank_probes"] == again["rank_probes"]
    assert torch.equal(first.A, second.A) and torch.equal(first.B, second.B)


@pytest.mark.parametrize("method", ["lego", "lego_rank1", "task_arithmetic"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_invalid_max_error_is_a_method_error(method, value):
    inputs = [Adapter({"m": f}, {}, name=f"t{i}") for i, f in enumerate(random_inputs())]
    with pytest.raises(MethodError, match=rf"{method}: max_error .* must be a number in \[0, 1\); got {value}"):
        ll.merge(inputs, method, max_error=value)
    function = {**METHODS, "task_arithmetic": task_arithmetic}[method]
    for bad in (float("nan"), True, "0.1"):
        with pytest.raises(MethodError, match=f"{method}: max_error"):
            function(random_inputs(), [1.0] * 3, generator=torch.Generator(), max_error=bad)


def test_lego_rank1_chosen_k_ignores_sign_and_scale_flips_of_units():
    factors = clustered(12, 10, 3, noise=0.05)
    c = torch.tensor([-1.0, 3.0, -0.25, 0.5])  # (b, a) -> (-b / c, -c a): the same rank-one updates
    flipped = factors[:2] + [LoraFactors(-c[:, None] * factors[2].A, -factors[2].B / c[None, :])]
    for max_error in (0.04, 0.1, 0.3, 0.6, 0.9):
        plain, info = run("lego_rank1", factors, n_clusters=12, max_error=max_error)
        other, other_info = run("lego_rank1", flipped, n_clusters=12, max_error=max_error)
        assert other_info["chosen_rank"] == info["chosen_rank"]
        torch.testing.assert_close(other.delta(), plain.delta(), rtol=1e-4, atol=1e-5)
    # the paper's [a ; b] units see different points, and need more clusters for the same tolerance
    assert run("lego", flipped, n_clusters=12, max_error=0.1)[1]["chosen_rank"] > 3


def test_task_arithmetic_keeps_the_smallest_rank_of_the_exact_svd():
    factors = random_inputs(4)
    weights = [1.0, -0.5, 2.0]
    s = torch.linalg.svdvals(sum(w * f.delta().double() for f, w in zip(factors, weights, strict=True)))
    tails = [math.sqrt(float((s[k:] ** 2).sum() / (s ** 2).sum())) for k in range(len(s) + 1)]
    for max_error in (0.05, 0.2, 0.4, 0.6, 0.8):
        result, info = task_arithmetic(factors, weights, generator=torch.Generator(), rank=8, max_error=max_error)
        k = info["chosen_rank"]
        assert k == result.rank == min([j for j in range(1, 9) if tails[j] <= max_error] or [8])
        fixed, _ = task_arithmetic(factors, weights, generator=torch.Generator(), rank=k)
        assert torch.equal(result.A, fixed.A) and torch.equal(result.B, fixed.B)
        exact = sum(w * f.delta().double() for f, w in zip(factors, weights, strict=True))
        error = float((result.delta().double() - exact).norm() / exact.norm())
        assert error == pytest.approx(tails[k], rel=1e-4)
    # three directions and a little noise: rank 3
    result, info = task_arithmetic(clustered(12, 10, 3), [1.0] * 3, generator=torch.Generator(), rank=8,
                                   max_error=0.1)
    assert info["chosen_rank"] == 3


def module_inputs(tmp_path=None) -> list[Adapter]:
    """Three rank-4 adapters on the tiny Llama's q/v projections; module m holds DIRECTIONS[m] unit clusters."""
    per_adapter = {m: clustered(*shape, n, seed=i) for i, (m, (shape, n)) in enumerate(DIRECTIONS.items())}
    return [Adapter({m: per_adapter[m][t] for m in DIRECTIONS}, {"base_model_name_or_path": "tiny-llama",
                    "task_type": "CAUSAL_LM", "dtype": "float32"}, name=f"t{t}") for t in range(3)]


DIRECTIONS = {"model.layers.0.self_attn.q_proj": ((32, 32), 1), "model.layers.0.self_attn.v_proj": ((16, 32), 2),
              "model.layers.1.self_attn.q_proj": ((32, 32), 3), "model.layers.1.self_attn.v_proj": ((16, 32), 4)}


@pytest.mark.parametrize("method", ["lego", "lego_rank1", "task_arithmetic"])
def test_merge_picks_a_rank_per_module_that_saves_loads_and_runs_in_peft(tmp_path, method):
    merged = ll.merge(module_inputs(), method, rank=6, max_error=0.1, seed=1)
    expected = {m: n for m, (_, n) in DIRECTIONS.items()}
    assert {m: f.rank for m, f in merged.items()} == expected
    assert {m: r["chosen_rank"] for m, r in merged.metadata["report"].items()} == expected
    folder = ll.save_adapter(merged, tmp_path / "merged")
    loaded = ll.load_adapter(folder)
    assert {m: f.rank for m, f in loaded.items()} == expected
    for module, factors in loaded.items():
        torch.testing.assert_close(factors.delta(), merged[module].delta(), rtol=1e-5, atol=1e-6)
    peft_model = load_peft(folder)
    assert {m: layer.r["default"] for m, layer in lora_layers(peft_model).items()} == expected
    assert_matches_peft(loaded, peft_deltas(peft_model), tol=1e-5)
