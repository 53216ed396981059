"""Tests of lora_lego.kmeans: quality against scikit-learn, determinism, special cases and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from lora_lego.kmeans import KMeansResult, _lloyd, _relocate_empty, kmeans, kmeans_gram


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blobs(rng: np.random.Generator, u: int, d: int, n_blobs: int) -> np.ndarray:
    centres = rng.normal(size=(n_blobs, d)) * 4 + 10  # offset: distances must not depend on it
    spreads = rng.uniform(0.5, 2.0, n_blobs)
    members = rng.integers(0, n_blobs, u)
    return centres[members] + rng.normal(size=(u, d)) * spreads[members, None]


def _noise(rng: np.random.Generator, u: int, d: int) -> np.ndarray:
    return rng.normal(size=(u, d)) * rng.gamma(1.0, 1.0, size=d)


def _lora_units(rng: np.random.Generator, n_adapters: int, rank: int, d_out: int, d_in: int) -> np.ndarray:
    """Units [b_j; a_j] of adapters sharing some directions, with a decaying spectrum; some units negated."""
    n_shared = max(2, rank // 2)
    shared_b, shared_a = rng.normal(size=(n_shared, d_out)), rng.normal(size=(n_shared, d_in))
    units = []
    for _ in range(n_adapters):
        mix = rng.normal(size=(rank, n_shared)) * (rng.random((rank, n_shared)) < 0.5)
        b = mix @ shared_b + rng.normal(size=(rank, d_out)) * 0.7
        a = mix @ shared_a + rng.normal(size=(rank, d_in)) * 0.7
        scale = np.sqrt(np.exp(-np.arange(rank) / 3.0))[:, None]
        units.append(np.concatenate([b * scale, a * scale], axis=1))
    x = np.concatenate(units) / np.sqrt(d_out + d_in)
    x[rng.random(len(x)) < 0.15] *= -1
    return x


# (kind, u, d or (adapters, rank, d_out, d_in), k, weighted)
_POOLS = [
    ("blobs", 60, 8, 4, False),
    ("blobs", 150, 20, 8, True),
    ("blobs", 300, 50, 12, False),
    ("blobs", 200, 300, 20, True),
    ("blobs", 40, 2000, 3, False),
    ("blobs", 120, 12, 6, True),
    ("noise", 20, 8, 2, False),
    ("noise", 80, 30, 5, True),
    ("noise", 250, 64, 16, False),
    ("noise", 300, 10, 32, True),
    ("noise", 100, 1000, 10, False),
    ("noise", 64, 200, 30, True),
    ("lora", 128, (8, 16, 256, 512), 16, False),
    ("lora", 128, (8, 16, 512, 1024), 16, True),
    ("lora", 64, (4, 16, 256, 256), 8, False),
    ("lora", 96, (12, 8, 300, 700), 12, True),
    ("lora", 256, (16, 16, 256, 256), 16, False),
    ("lora", 32, (4, 8, 128, 512), 4, True),
    ("lora", 192, (6, 32, 128, 256), 24, False),
    ("lora", 48, (3, 16, 64, 64), 2, True),
]


def _make_pool(index: int) -> tuple[np.ndarray, int, np.ndarray | None]:
    kind, u, dims, k, weighted = _POOLS[index]
    rng = np.random.default_rng(1000 + index)  # local generator: the global numpy state is not used
    if kind == "blobs":
        x = _blobs(rng, u, dims, max(2, k + int(rng.integers(-2, 3))))
    elif kind == "noise":
        x = _noise(rng, u, dims)
    else:
        x = _lora_units(rng, *dims)
    assert x.shape[0] == u
    weights = None
    if weighted:
        weights = rng.gamma(2.0, 1.0, size=u)
        weights[rng.random(u) < 0.05] = 0.0
    return x, k, weights


@pytest.fixture(scope="module")
def inertia_ratios() -> list[float]:
    ratios = []
    for index in range(len(_POOLS)):
        x, k, weights = _make_pool(index)
        torch_weights = None if weights is None else torch.from_numpy(weights)
        ours = kmeans(torch.from_numpy(x), k, generator=_gen(index), sample_weight=torch_weights)
        reference = KMeans(n_clusters=k, n_init=10, random_state=index).fit(x, sample_weight=weights)
        ratios.append(ours.inertia / reference.inertia_)
    return ratios


def test_inertia_matches_sklearn_on_average(inertia_ratios: list[float]) -> None:
    assert float(np.mean(inertia_ratios)) <= 1.01, inertia_ratios


def test_inertia_matches_sklearn_on_every_pool(inertia_ratios: list[float]) -> None:
    assert max(inertia_ratios) <= 1.03, inertia_ratios


def _explicit_inertia(x: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    total = 0.0
    for c in np.unique(labels):
        members = labels == c
        if weights[members].sum() > 0:
            centre = np.average(x[members], axis=0, weights=weights[members])
            total += float(weights[members] @ ((x[members] - centre) ** 2).sum(1))
    return total


@pytest.mark.parametrize("index", [1, 9, 13])
def test_reported_inertia_is_that_of_the_labels(index: int) -> None:
    x, k, weights = _make_pool(index)
    result = kmeans(torch.from_numpy(x), k, generator=_gen(0), sample_weight=torch.from_numpy(weights))
    assert result.labels.dtype == torch.int64 and result.labels.shape == (x.shape[0],)
    assert int(result.labels.min()) >= 0 and int(result.labels.max()) < k
    assert result.inertia == pytest.approx(_explicit_inertia(x, result.labels.numpy(), weights), rel=1e-6)


def test_converged_labels_are_nearest_to_their_centroids() -> None:
    rng = np.random.default_rng(3)
    x, weights = _noise(rng, 150, 6), rng.gamma(2.0, 1.0, size=150)
    result = kmeans(torch.from_numpy(x), 7, generator=_gen(1), sample_weight=torch.from_numpy(weights), tol=0.0)
    assert result.n_iter < 300
    labels = result.labels.numpy()
    centres = np.stack([np.average(x[labels == c], axis=0, weights=weights[labels == c]) for c in range(7)])
    distances = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    assert np.array_equal(distances.argmin(1), labels)


def test_same_seed_is_bitwise_identical_and_seeds_differ() -> None:
    x = torch.from_numpy(_noise(np.random.default_rng(5), 200, 40)).float()
    weights = torch.rand(200, generator=_gen(9))
    first = kmeans(x, 8, generator=_gen(42), sample_weight=weights)
    again = kmeans(x, 8, generator=_gen(42), sample_weight=weights)
    assert torch.equal(first.labels, again.labels)
    assert first.inertia == again.inertia and first.n_iter == again.n_iter
    others = [kmeans(x, 8, generator=_gen(seed), sample_weight=weights, n_init=1).labels for seed in range(5)]
    assert any(not torch.equal(others[0], other) for other in others[1:])


def test_global_rng_states_untouched() -> None:
    x = torch.from_numpy(_noise(np.random.default_rng(6), 50, 10))
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    kmeans(x, 5, generator=_gen(0))
    kmeans_gram(x @ x.T, 5, generator=_gen(1), sample_weight=torch.rand(50, generator=_gen(2)))
    assert torch.equal(torch_state, torch.get_rng_state())
    after = np.random.get_state()
    assert numpy_state[0] == after[0] and np.array_equal(numpy_state[1], after[1]) and numpy_state[2:] == after[2:]


def test_k_equal_u_gives_each_point_its_own_cluster() -> None:
    x = torch.randn(7, 3, generator=_gen(0))
    result = kmeans(x, 7, generator=_gen(0))
    assert result == KMeansResult(labels=result.labels, inertia=0.0, n_iter=0)
    assert torch.equal(result.labels, torch.arange(7))


def test_two_obvious_clusters_in_one_dimension() -> None:
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    result = kmeans(x, 2, generator=_gen(0))
    labels = result.labels.tolist()
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert result.inertia == pytest.approx(1.0, abs=1e-9)  # 4 points at distance 0.5 from their centre
    weighted = kmeans(x, 2, generator=_gen(0), sample_weight=torch.tensor([1.0, 3.0, 1.0, 1.0]))
    # centres 0.75 and 10.5: 1 * 0.75^2 + 3 * 0.25^2 + 2 * 0.5^2
    assert weighted.inertia == pytest.approx(0.5625 + 0.1875 + 0.5, abs=1e-9)


def test_more_clusters_than_distinct_points_leaves_empty_clusters() -> None:
    x = torch.tensor([[0.0, 1.0], [5.0, 5.0], [-3.0, 2.0]]).repeat(4, 1)
    result = kmeans(x, 5, generator=_gen(0))
    assert result.labels.shape == (12,) and int(result.labels.max()) < 5
    assert result.inertia == pytest.approx(0.0, abs=1e-9)
    assert len(set(result.labels.tolist())) == 3
    identical = kmeans(torch.ones(6, 4), 3, generator=_gen(0))
    assert identical.inertia == pytest.approx(0.0, abs=1e-9)


def test_empty_clusters_take_the_farthest_weighted_points() -> None:
    labels = torch.zeros(1, 4, dtype=torch.int64)
    dist = torch.zeros(1, 3, 4, dtype=torch.float64)
    dist[0, 0] = torch.tensor([1.0, 9.0, 4.0, 16.0])
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)  # the farthest point weighs nothing
    _relocate_empty(labels, dist, weights, torch.tensor([[False, True, True]]))
    assert labels.tolist() == [[0, 1, 2, 0]]


def test_lloyd_recovers_from_a_cluster_that_empties() -> None:
    # Seeds (5, 1), (4, 2), (0, 1): the second cluster loses its points during Lloyd and is re-seeded.
    x = torch.tensor([[1, 6], [0, 1], [1, 2], [0, 6], [0, 7], [4, 2], [5, 1]], dtype=torch.float64)
    gram, weights = x @ x.T, torch.ones(7, dtype=torch.float64)
    labels, n_iter = _lloyd(gram, gram.diagonal().clone(), weights, torch.tensor([[6, 5, 1]]), 300, 0.0)
    assert int(n_iter[0]) < 300
    assert sorted(set(labels[0].tolist())) == [0, 1, 2]


@pytest.mark.parametrize("max_iter", [1, 2, 300])
def test_restarts_run_together_as_each_alone(max_iter: int) -> None:
    # Lloyd carries only the restarts still iterating; each must end exactly as if it had run alone,
    # whether it converges first, last, or is stopped by max_iter.
    rng = np.random.default_rng(5)
    x = torch.from_numpy(_blobs(rng, 90, 7, 5))
    gram, weights = x @ x.T, torch.from_numpy(rng.gamma(2.0, 1.0, size=90))
    seeds = torch.stack([torch.randperm(90, generator=_gen(i))[:6] for i in range(8)])
    labels, n_iter = _lloyd(gram, gram.diagonal().clone(), weights, seeds, max_iter, 0.0)
    assert len(set(n_iter.tolist())) > 1 or max_iter < 300  # the restarts do stop at different iterations
    for r in range(8):
        alone, alone_iter = _lloyd(gram, gram.diagonal().clone(), weights, seeds[r:r + 1], max_iter, 0.0)
        assert torch.equal(labels[r], alone[0]) and int(n_iter[r]) == int(alone_iter[0])


def test_heavy_point_becomes_its_own_centroid() -> None:
    x = torch.randn(60, 5, generator=_gen(3), dtype=torch.float64)
    weights = torch.ones(60, dtype=torch.float64)
    weights[17] = 1e6
    labels = kmeans(x, 4, generator=_gen(0), sample_weight=weights).labels
    members = labels == labels[17]
    centre = (weights[members, None] * x[members]).sum(0) / weights[members].sum()
    assert float((centre - x[17]).norm()) < 1e-4


def test_zero_weight_points_do_not_move_centroids() -> None:
    rng = np.random.default_rng(8)
    x = torch.from_numpy(_blobs(rng, 80, 6, 4))
    far = torch.from_numpy(rng.normal(size=(10, 6)) * 100)
    weights = torch.from_numpy(rng.gamma(2.0, 1.0, size=80))
    base = kmeans(x, 4, generator=_gen(4), sample_weight=weights)
    padded = kmeans(torch.cat([x, far]), 4, generator=_gen(4), sample_weight=torch.cat([weights, torch.zeros(10)]))
    assert torch.equal(base.labels, padded.labels[:80])
    assert padded.inertia == pytest.approx(base.inertia, rel=1e-6)
    assert int(padded.labels.max()) < 4


def test_kmeans_gram_matches_kmeans() -> None:
    rng = np.random.default_rng(11)
    x = torch.from_numpy(_blobs(rng, 120, 15, 6))
    weights = torch.from_numpy(rng.gamma(2.0, 1.0, size=120))
    unweighted = kmeans(x, 6, generator=_gen(7))
    for w in (None, weights):
        direct = kmeans(x, 6, generator=_gen(7), sample_weight=w)
        p = torch.ones(120, dtype=torch.float64) / 120 if w is None else w / w.sum()
        scale = float((p[:, None] * (x - p @ x) ** 2).sum(0).mean())  # mean per-feature weighted variance
        via_gram = kmeans_gram(x @ x.T, 6, generator=_gen(7), sample_weight=w, tol_scale=scale)
        assert torch.equal(direct.labels, via_gram.labels)
        assert direct.n_iter == via_gram.n_iter
        assert via_gram.inertia == pytest.approx(direct.inertia, rel=1e-9)
    fallback = kmeans_gram(x @ x.T, 6, generator=_gen(7))  # tol_scale=None: trace-based scale
    assert fallback.inertia == pytest.approx(unweighted.inertia, rel=0.05)


def test_kmeans_gram_of_a_product_kernel() -> None:
    a, b = torch.randn(40, 6, generator=_gen(1)), torch.randn(40, 9, generator=_gen(2))
    gram = (a @ a.T) * (b @ b.T)  # element-wise product of Gram matrices: still PSD
    result = kmeans_gram(gram, 5, generator=_gen(0))
    features = (a[:, :, None] * b[:, None, :]).reshape(40, -1).double().numpy()  # its explicit feature map
    assert result.inertia == pytest.approx(_explicit_inertia(features, result.labels.numpy(), np.ones(40)), rel=1e-5)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_bad_k_is_refused(k: int) -> None:
    with pytest.raises(ValueError):
        kmeans(torch.randn(10, 3, generator=_gen(0)), k, generator=_gen(0))


@pytest.mark.parametrize(
    "weights",
    [torch.zeros(10), -torch.ones(10), torch.tensor([1.0] * 9 + [float("nan")]), torch.ones(9)],
    ids=["all-zero", "negative", "nan", "wrong-shape"],
)
def test_bad_weights_are_refused(weights: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        kmeans(torch.randn(10, 3, generator=_gen(0)), 2, generator=_gen(0), sample_weight=weights)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError):
        kmeans(torch.empty(0, 3), 1, generator=_gen(0))
    with pytest.raises(ValueError):
        kmeans_gram(torch.ones(3, 4), 1, generator=_gen(0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gram_is_refused(bad: float) -> None:
    x = torch.randn(12, 4, generator=_gen(0), dtype=torch.float64)
    gram = x @ x.T
    gram[3, 7] = gram[7, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        kmeans_gram(gram, 3, generator=_gen(0))
    huge = torch.full((12, 12), 1e307, dtype=torch.float64) + torch.eye(12, dtype=torch.float64) * 1e307
    assert not torch.isfinite(huge.sum())  # every entry finite, their sum not
    assert kmeans_gram(huge, 3, generator=_gen(0)).labels.shape == (12,)
