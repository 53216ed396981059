"""LoRA-LEGO (Zhao et al., ICLR 2025): pool the rank-one units of all adapters, cluster them with
K-means, make each centroid one merged rank, then apply dual reweighting (centroid norms, output scale)."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Literal

import torch

from ..errors import ClusteringWarning, MethodError
from ..kmeans import KMeansResult, kmeans_gram
from ..lowrank import concat_factors, factor_grams, relative_error_from_grams, truncated_svd
from ..types import LoraFactors
from .arithmetic import check_max_error
from .registry import register

PAPER = "https://arxiv.org/abs/2409.16167"
EPS = 1e-12


@register("lego", paper=PAPER, parameter_aliases={"rank": "n_clusters"})
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

    Parameters:
        n_clusters: number of clusters k, the output rank (the cap when max_error > 0); none: the largest input rank
        n_init: K-means restarts (the lowest inertia is kept), >= 1
        max_iter: K-means iterations per restart, at most, >= 1
        tol: K-means stops when the centroids move less than this (relative to the data's variance), >= 0
        param_norm: rescale each centroid to its members' mean norm: inf (max-abs of the whole unit), l2, or off
        output_reweight: multiply the delta by sqrt(ref_rank / k)
        ref_rank: reference rank of the output reweighting, > 0; none: the weighted mean input rank
        features: what K-means clusters: the raw units, or normalized ones (each half of a unit of norm 1)
        sample_weights: use |w| as K-means sample weights and in the centroid and norm means
        canonical: svd: re-express each adapter through the SVD of its delta before pooling; none: as given
        max_error: 0: k fixed; > 0 (below 1): per module the smallest k <= the cap whose relative error is at
            most this
    """
    if canonical == "svd":
        factors = [canonical_factors(f) for f in factors]
    pooled, unit_weights, kept = pool_units(factors, weights, sample_weights)
    # the one O(u^2 d) step, on the factors' device; the rest works on (u, u) matrices, on the CPU
    gram_a, gram_b = (g.cpu() for g in factor_grams(pooled, exact=False))
    gram = _feature_gram(gram_a, gram_b, features)
    tol_scale = _tol_scale(gram, unit_weights, pooled.d_in + pooled.d_out)
    labels, sizes, inertia, search = unit_clusters(
        "lego", factors, pooled.rank, n_clusters, n_init, max_iter, tol,
        lambda k: kmeans_gram(gram, k, generator=generator, sample_weight=unit_weights, n_init=n_init,
                              max_iter=max_iter, tol=tol, tol_scale=tol_scale),
        max_error=max_error, energy=float(unit_weights.double() @ gram.diagonal()), generator=generator)
    membership = cluster_means(labels, unit_weights, len(sizes))  # centroid j = membership[j] @ units
    centroids = _centroids(pooled, membership)
    gain, scale = _dual_reweighting(centroids, pooled, labels, unit_weights, factors, weights, param_norm=param_norm,
                                    output_reweight=output_reweight, ref_rank=ref_rank)
    centroids = _scaled_units(centroids, gain)
    info = cluster_info(labels, kept, sizes, inertia, scale, search)
    # the merged units are combinations of the pooled ones, so the report's error needs only the Grams
    info["relative_error"] = relative_error_from_grams(centroids, pooled, gram_a, gram_b,
                                                       coefficients=gain[:, None] * membership)
    return centroids, info


def _tol_scale(gram: torch.Tensor, unit_weights: torch.Tensor, dim: int) -> float:
    """scikit-learn's tolerance scale: the mean per-feature (weighted) variance of the points of dimension `dim`
    whose (u, u) Gram is `gram`, weighted by the (u,) `unit_weights`."""
    p = unit_weights.double() / unit_weights.double().sum()
    return max(float(p @ gram.diagonal() - p @ gram @ p), 0.0) / dim


def _centroids(pooled: LoraFactors, membership: torch.Tensor) -> LoraFactors:
    """The k centroid units membership @ units of the u pooled units, for a (k, u) `membership` on the CPU."""
    on_device = membership.to(pooled.A.device)
    return LoraFactors(on_device @ pooled.A, pooled.B @ on_device.T, pooled.kind)


def _dual_reweighting(centroids: LoraFactors, pooled: LoraFactors, labels: torch.Tensor, unit_weights: torch.Tensor,
                      factors: list[LoraFactors], weights: list[float], *, param_norm: str, output_reweight: bool,
                      ref_rank: float | None) -> tuple[torch.Tensor, float]:
    """The (k,) factor of each centroid unit, applied to both halves (parameter reweighting times the square root
    of the output scale), and the output scale (1 without output reweighting)."""
    gain = torch.ones(centroids.rank, dtype=pooled.A.dtype, device="cpu")
    if param_norm != "off":
        gain = member_norm_gain(centroids, pooled, labels, unit_weights, param_norm)
    scale = 1.0
    if output_reweight:
        scale = output_scale(factors, weights, centroids.rank, ref_rank)
        gain = gain * math.sqrt(scale)  # sqrt(scale) on each half: the delta times scale, units balanced
    return gain, scale


def _scaled_units(factors: LoraFactors, gain: torch.Tensor) -> LoraFactors:
    """Unit i (row i of A, column i of B) times gain[i] on both halves, for a (r,) `gain` on the CPU."""
    on_device = gain.to(factors.A.device)
    return LoraFactors(factors.A * on_device[:, None], factors.B * on_device, factors.kind)


def unit_clusters(method: str, factors: list[LoraFactors], u: int, n_clusters: int | None, n_init: int, max_iter: int,
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
            return torch.arange(u, device="cpu"), 0.0
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


def cluster_info(labels: torch.Tensor, kept: torch.Tensor, sizes: list[int], inertia: float, scale: float,
          search: dict) -> dict:
    """The report entry: a label per input unit (-1 for units left out), cluster sizes, inertia, output scale,
    and the rank search (`chosen_rank`, `max_error`, and the `rank_probes` when the search ran)."""
    all_labels = torch.full((len(kept),), -1, dtype=torch.long, device="cpu")
    all_labels[kept] = labels
    return {"labels": all_labels.tolist(), "cluster_sizes": sizes, "inertia": inertia, "output_scale": scale,
            **search}


def canonical_factors(factors: LoraFactors) -> LoraFactors:
    """The same delta B A with balanced SVD factors (rank kept; sign rule of `truncated_svd`)."""
    return truncated_svd(factors, factors.rank)[0]


def pool_units(factors: list[LoraFactors], weights: list[float], sample_weights: bool):
    """Pooled factors of all adapters with their weights folded in (unit i = row i of A with column i of B,
    u units in all), the (u,) K-means weights, and which input units were kept (weight-0 adapters are left out)."""
    used = [(f, w) for f, w in zip(factors, weights, strict=True) if w != 0]
    pooled = concat_factors([f for f, _ in used], [w for _, w in used])
    unit_weights = torch.tensor([abs(w) if sample_weights else 1.0 for f, w in used for _ in range(f.rank)],
                                dtype=pooled.A.dtype, device="cpu")  # (u,) on the CPU, with the K-means
    kept = torch.tensor([w != 0 for f, w in zip(factors, weights) for _ in range(f.rank)], device="cpu")
    return pooled, unit_weights, kept


def _feature_gram(gram_a: torch.Tensor, gram_b: torch.Tensor, features: str) -> torch.Tensor:
    """(u, u) Gram of the points clustered: raw units [a_i ; b_i] give G_A + G_B; "normalized" divides each
    half of a unit by its L2 norm (+1e-8) first, i.e. each Gram by the outer product of those norms."""
    if features == "raw":
        return gram_a + gram_b
    norm_a = gram_a.diagonal().clamp_min(0).sqrt() + 1e-8
    norm_b = gram_b.diagonal().clamp_min(0).sqrt() + 1e-8
    return gram_a / torch.outer(norm_a, norm_a) + gram_b / torch.outer(norm_b, norm_b)


def _drop_empty(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, list[int]]:
    """Relabel to 0..k'-1 over non-empty clusters (warning if any is empty); also the cluster sizes."""
    counts = torch.bincount(labels, minlength=k)
    if bool((counts == 0).any()):
        warnings.warn(f"lego: {int((counts == 0).sum())} of {k} clusters are empty (fewer distinct units than k); "
                      "they are dropped, so the merged rank is lower", ClusteringWarning, stacklevel=4)
    present = counts > 0
    remap = torch.cumsum(present.long(), 0) - 1
    return remap[labels], counts[present].tolist()


def cluster_means(labels: torch.Tensor, unit_weights: torch.Tensor, k: int) -> torch.Tensor:
    """(k, u) membership matrix whose row j averages cluster j's units, weighted by the (u,) `unit_weights`
    (rows sum to 1), so that centroid A = M @ A and B = B @ M^T for u pooled units with (u,) `labels`."""
    u = labels.shape[0]
    membership = torch.zeros(k, u, dtype=unit_weights.dtype, device=unit_weights.device)
    membership[labels, torch.arange(u, device=labels.device)] = unit_weights
    return membership / membership.sum(dim=1, keepdim=True)


def unit_norms(factors: LoraFactors, norm: str) -> torch.Tensor:
    """Norm of each unit [a_i ; b_i]: max-abs entry for "inf", Euclidean for "l2"; r units -> (r,)."""
    if norm == "inf":  # max(max, -min) reads each factor twice but allocates no |x| copy: ~1.4x faster
        return torch.stack([factors.A.amax(dim=1), factors.A.amin(dim=1).neg(),
                            factors.B.amax(dim=0), factors.B.amin(dim=0).neg()]).amax(dim=0)
    return (factors.A.pow(2).sum(dim=1) + factors.B.pow(2).sum(dim=0)).sqrt()


def member_norm_gain(centroids: LoraFactors, pooled: LoraFactors, labels: torch.Tensor,
                     unit_weights: torch.Tensor, norm: str) -> torch.Tensor:
    """Parameter reweighting: the (k,) factor that gives each centroid unit the (weighted) mean norm of its members."""
    k = centroids.rank
    weights = unit_weights.to(pooled.A.dtype)  # (u,) on the CPU, like the labels
    totals = torch.zeros(k, dtype=weights.dtype, device=weights.device).index_add_(0, labels, weights)
    means = torch.zeros_like(totals).index_add_(0, labels, unit_norms(pooled, norm).cpu() * weights) / totals
    return means / unit_norms(centroids, norm).cpu().clamp_min(EPS)


def output_scale(factors: list[LoraFactors], weights: list[float], k: int, ref_rank: float | None) -> float:
    """Output reweighting factor sqrt(ref_rank / k); ref_rank defaults to the |weight|-weighted mean source rank."""
    if ref_rank is None:
        total = sum(abs(w) for w in weights)
        ref_rank = sum(abs(w) * f.rank for f, w in zip(factors, weights, strict=True)) / total
    elif ref_rank <= 0:
        raise MethodError(f"lego: ref_rank must be > 0; got {ref_rank}")
    return math.sqrt(ref_rank / k)
