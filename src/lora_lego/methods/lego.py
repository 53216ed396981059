"""LoRA-LEGO (Zhao et al., ICLR 2025): pool the rank-one units of all adapters, cluster them with
K-means, make each centroid one merged rank, then apply dual reweighting (centroid norms, output scale)."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Literal

import torch

from ..errors import ClusteringWarning, MethodError
from ..kmeans import KMeansResult, kmeans, kmeans_gram
from ..lowrank import concat_factors, from_units, scale_factors, to_units, truncated_svd
from ..registry import register
from ..types import LoraFactors
from .arithmetic import check_max_error

PAPER = "https://arxiv.org/abs/2409.16167"
_EPS = 1e-12


@register("lego", paper=PAPER, aliases={"rank": "n_clusters"})
def lego(
    factors: list[LoraFactors],
    weights: list[float],
    *,
    generator: torch.Generator,
    n_clusters: int | None = None,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    param_norm: Literal["inf", "l2", "off"] = "inf",
    output_reweight: bool = True,
    ref_rank: float | None = None,
    features: Literal["raw", "normalized"] = "raw",
    sample_weights: bool = False,
    canonical: Literal["none", "svd"] = "none",
    max_error: float = 0.0,
) -> tuple[LoraFactors, dict]:
    """Rank-wise clustering: K-means on the pooled units [a_i ; b_i], centroids as merged ranks, dual reweighting.

    Per module: units of shape (u, d_in + d_out) (scale and per-adapter weight folded in as for
    `concat`, so k >= u reproduces the exact weighted sum), K-means (squared Euclidean, k-means++,
    `n_init` restarts) into k = `n_clusters` clusters (default: the largest input rank), centroid =
    mean of raw members, then
      - parameter reweighting (`param_norm`): each centroid rescaled to the mean norm of its
        members; "inf" (max-abs of the whole unit, as both known re-implementations) is the
        default, "l2" the alternative, "off" disables it. Norm choice not confirmed by the paper.
      - output reweighting (`output_reweight`): delta times sqrt(ref_rank / k) with ref_rank
        (default) the weighted mean source rank. Reference rank for mixed ranks not confirmed by
        the paper. Applied as sqrt of the factor on each side, which leaves units balanced.
    `features="normalized"` clusters per-half unit-normalised units (re-implementation #1) but
    still averages raw members; not confirmed by the paper. `sample_weights=True` also uses |w|
    as K-means sample weights and in the centroid and norm means (re-implementation #2).
    `canonical="svd"` (beyond the paper) first re-expresses each adapter's factors through the exact
    SVD of its delta (units sqrt(s_i) u_i, sqrt(s_i) v_i with a fixed sign rule), so that the units
    no longer depend on how the adapter happened to split B A into ranks (order, signs, scales).
    `max_error` > 0 (beyond the paper) picks k per module, `n_clusters` becoming the cap: the smallest
    k whose clustering leaves sqrt(inertia / sum_i w_i ||x_i||^2) <= max_error (see `_search_rank`).
    """
    if canonical == "svd":
        factors = [canonical_factors(f) for f in factors]
    units, unit_weights, kept = _pool_units(factors, weights, sample_weights)
    d_in, kind = factors[0].d_in, factors[0].kind
    points = _features(units, d_in, features)
    energy = float(unit_weights.double() @ points.double().pow(2).sum(dim=1))
    labels, sizes, inertia, search = _clusters(
        "lego", factors, units.shape[0], n_clusters, n_init, max_iter, tol,
        lambda k: kmeans(points, k, generator=generator, sample_weight=unit_weights,
                         n_init=n_init, max_iter=max_iter, tol=tol),
        max_error=max_error, energy=energy, generator=generator)
    centroids = weighted_centroids(units, labels, unit_weights, len(sizes))
    if param_norm != "off":
        centroids = restore_member_norms(centroids, units, labels, unit_weights, param_norm)
    scale = 1.0
    if output_reweight:
        scale = output_scale(factors, weights, len(sizes), ref_rank)
        centroids = centroids * math.sqrt(scale)
    return from_units(centroids, d_in, kind), _info(labels, kept, sizes, inertia, scale, search)


def _clusters(method: str, factors: list[LoraFactors], u: int, n_clusters: int | None, n_init: int, max_iter: int,
              tol: float, run_kmeans: Callable[[int], KMeansResult], *, max_error: float, energy: float,
              generator: torch.Generator) -> tuple[torch.Tensor, list[int], float, dict]:
    """Labels (u,) over k' non-empty clusters, their sizes, the inertia, and how k was chosen.

    k = `n_clusters` (default: the largest input rank), validated with the K-means parameters;
    `run_kmeans(k)` clusters the u units unless k >= u, where every unit is its own cluster.
    `max_error` > 0 makes k the cap of `_search_rank` (`energy`: the weighted squared norm of the points).
    """
    k = max(f.rank for f in factors) if n_clusters is None else n_clusters
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise MethodError(f"{method}: n_clusters (rank) must be an integer >= 1; got {n_clusters!r}")
    if n_init < 1 or max_iter < 1 or tol < 0:
        raise MethodError(f"{method}: need n_init >= 1, max_iter >= 1, tol >= 0; got {n_init}, {max_iter}, {tol}")
    check_max_error(method, max_error)

    def cluster(k: int) -> tuple[torch.Tensor, float]:
        if k >= u:
            return torch.arange(u), 0.0
        result = run_kmeans(k)
        return result.labels, result.inertia

    k = min(k, u)
    search: dict = {"max_error": max_error}
    if max_error > 0:
        k, (labels, inertia), search["rank_probes"] = _search_rank(cluster, k, energy, max_error, generator)
    else:
        labels, inertia = cluster(k)
    labels, sizes = _drop_empty(labels, k)
    return labels, sizes, inertia, {"chosen_rank": k, **search}


def _search_rank(cluster: Callable[[int], tuple[torch.Tensor, float]], cap: int, energy: float, max_error: float,
                 generator: torch.Generator) -> tuple[int, tuple[torch.Tensor, float], list[list]]:
    """The smallest k in [1, cap] with sqrt(inertia_k / energy) <= max_error, or the cap if none meets it.

    Binary search (inertia falls with k), the cap probed first. Every probe restarts `generator` from
    its state on entry, so the clustering at k is exactly that of a run with n_clusters = k, and the
    result depends only on the inputs and seed. Returns k, `cluster(k)` and the probes [[k, error], ...].
    """
    state = generator.get_state()
    results: dict[int, tuple[torch.Tensor, float]] = {}
    probes: list[list] = []

    def meets(k: int) -> bool:
        generator.set_state(state)
        results[k] = cluster(k)
        error = math.sqrt(max(results[k][1], 0.0) / energy) if energy > 0 else 0.0
        probes.append([k, error])
        return error <= max_error

    low, high = 1, cap
    if meets(cap):
        while low < high:  # invariant: high meets the tolerance; every k < low was probed and misses it
            middle = (low + high) // 2
            if meets(middle):
                high = middle
            else:
                low = middle + 1
    return high, results[high], probes


def _info(labels: torch.Tensor, kept: torch.Tensor, sizes: list[int], inertia: float, scale: float,
          search: dict) -> dict:
    """The report entry: a label per input unit (-1 for units left out), cluster sizes, inertia, output scale,
    and the rank search (`chosen_rank`, `max_error`, and the `rank_probes` when the search ran)."""
    all_labels = torch.full((len(kept),), -1, dtype=torch.long)
    all_labels[kept] = labels
    return {"labels": all_labels.tolist(), "cluster_sizes": sizes, "inertia": inertia, "output_scale": scale,
            **search}


def canonical_factors(factors: LoraFactors) -> LoraFactors:
    """The same delta B A with balanced SVD factors (rank kept; sign rule of `truncated_svd`)."""
    return truncated_svd(factors, factors.rank)[0]


def _pool_units(factors: list[LoraFactors], weights: list[float], sample_weights: bool):
    """Units of all adapters with their weights folded in, (u,) K-means weights, and which units were kept.

    Units of adapters with weight 0 contribute nothing and are left out of the pool.
    """
    parts, unit_weights, kept = [], [], []
    for f, w in zip(factors, weights, strict=True):
        kept += [w != 0] * f.rank
        if w != 0:
            parts.append(to_units(scale_factors(f, w)))
            unit_weights += [abs(w) if sample_weights else 1.0] * f.rank
    return torch.cat(parts), torch.tensor(unit_weights, dtype=parts[0].dtype), torch.tensor(kept)


def _features(units: torch.Tensor, d_in: int, features: str) -> torch.Tensor:
    """Units as clustered: raw, or each half divided by its L2 norm (+1e-8)."""
    if features == "raw":
        return units
    a, b = units[:, :d_in], units[:, d_in:]
    return torch.cat([a / (a.norm(dim=1, keepdim=True) + 1e-8), b / (b.norm(dim=1, keepdim=True) + 1e-8)], dim=1)


def _drop_empty(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int]]:
    """Relabel to 0..k'-1 over non-empty clusters (warning if any is empty); also the cluster sizes."""
    counts = torch.bincount(labels, minlength=k)
    if bool((counts == 0).any()):
        warnings.warn(f"lego: {int((counts == 0).sum())} of {k} clusters are empty (fewer distinct units than k); "
                      "they are dropped, so the merged rank is lower", ClusteringWarning, stacklevel=4)
    present = counts > 0
    remap = torch.cumsum(present.long(), 0) - 1
    return remap[labels], counts[present].tolist()


def weighted_centroids(units: torch.Tensor, labels: torch.Tensor, unit_weights: torch.Tensor, k: int) -> torch.Tensor:
    """(Weighted) mean of the members of each cluster: (u, d), (u,) labels, (u,) weights -> (k, d)."""
    membership = torch.zeros(k, units.shape[0], dtype=units.dtype)
    membership[labels, torch.arange(units.shape[0])] = unit_weights
    return (membership / membership.sum(dim=1, keepdim=True)) @ units


def unit_norms(units: torch.Tensor, norm: str) -> torch.Tensor:
    """Norm of each unit (row): max-abs entry for "inf", Euclidean for "l2"; (u, d) -> (u,)."""
    return units.abs().amax(dim=1) if norm == "inf" else units.norm(dim=1)


def restore_member_norms(centroids: torch.Tensor, units: torch.Tensor, labels: torch.Tensor,
                         unit_weights: torch.Tensor, norm: str) -> torch.Tensor:
    """Parameter reweighting: scale each centroid so its norm equals the (weighted) mean norm of its members."""
    k = centroids.shape[0]
    member_norms = unit_norms(units, norm) * unit_weights
    totals = torch.zeros(k, dtype=units.dtype).index_add_(0, labels, unit_weights)
    mean_norms = torch.zeros(k, dtype=units.dtype).index_add_(0, labels, member_norms) / totals
    return centroids * (mean_norms / unit_norms(centroids, norm).clamp_min(_EPS))[:, None]


def output_scale(factors: list[LoraFactors], weights: list[float], k: int, ref_rank: float | None) -> float:
    """Output reweighting factor sqrt(ref_rank / k); ref_rank defaults to the |weight|-weighted mean source rank."""
    if ref_rank is None:
        total = sum(abs(w) for w in weights)
        ref_rank = sum(abs(w) * f.rank for f, w in zip(factors, weights, strict=True)) / total
    elif ref_rank <= 0:
        raise MethodError(f"lego: ref_rank must be > 0; got {ref_rank}")
    return math.sqrt(ref_rank / k)


@register("lego_rank1", paper=PAPER, aliases={"rank": "n_clusters"})
def lego_rank1(
    factors: list[LoraFactors],
    weights: list[float],
    *,
    generator: torch.Generator,
    n_clusters: int | None = None,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    param_norm: bool = True,
    output_reweight: bool = True,
    ref_rank: float | None = None,
    max_error: float = 0.0,
) -> tuple[LoraFactors, dict]:
    """Beyond the paper: K-means on the rank-one updates b_i a_i^T themselves, centroids back to rank one.

    The Frobenius inner product of two units is (a_i . a_j)(b_i . b_j), so Lloyd runs on the Gram
    matrix (A A^T) * (B^T B) (element-wise, u x u) without forming any matrix; (b, a), (-b, -a) and
    (c b, a / c) are the same point, so sign and scale flips of the inputs cannot split a cluster.
    Each cluster's mean update (1/|C|) sum b_i a_i^T becomes its best rank-one approximation (exact
    low-rank SVD); `param_norm` rescales it to the mean Frobenius norm |a_i| |b_i| of the members;
    `output_reweight` multiplies by sqrt(ref_rank / k) as in `lego`. `max_error` > 0 picks k as in
    `lego`, the energy being sum_i ||b_i a_i^T||_F^2 (the trace of the Gram matrix).
    """
    pooled = concat_factors([f for f, w in zip(factors, weights, strict=True) if w != 0], [w for w in weights if w != 0])
    kept = torch.tensor([w != 0 for f, w in zip(factors, weights, strict=True) for _ in range(f.rank)])
    A, B = pooled.A.double(), pooled.B.double()
    gram = (A @ A.T) * (B.T @ B)
    labels, sizes, inertia, search = _clusters(
        "lego_rank1", factors, pooled.rank, n_clusters, n_init, max_iter, tol,
        lambda k: kmeans_gram(gram, k, generator=generator, n_init=n_init, max_iter=max_iter, tol=tol),
        max_error=max_error, energy=float(gram.diagonal().clamp_min(0).sum()), generator=generator)
    member_norms = gram.diagonal().clamp_min(0).sqrt()  # |a_i| |b_i| = ||b_i a_i^T||_F
    units = []
    for cluster in range(len(sizes)):
        members = (labels == cluster).nonzero().flatten()
        mean = LoraFactors(pooled.A[members] / len(members), pooled.B[:, members], pooled.kind)
        unit = truncated_svd(mean, 1)[0]
        if param_norm:
            norm = float(unit.A.norm() * unit.B.norm())
            target = float(member_norms[members].mean())
            unit = scale_factors(unit, target / norm if norm > _EPS else 0.0)
        units.append(to_units(unit))
    centroids = torch.cat(units)
    scale = output_scale(factors, weights, len(sizes), ref_rank) if output_reweight else 1.0
    centroids = centroids * math.sqrt(scale)
    return from_units(centroids, pooled.d_in, pooled.kind), _info(labels, kept, sizes, inertia, scale, search)
