"""Beyond the paper: LoRA-LEGO's clustering done on the rank-one updates b_i a_i^T themselves (their Frobenius
geometry), so that sign and scale flips of a unit, which leave its update unchanged, cannot split a cluster."""

from __future__ import annotations

import math

import torch

from ..kmeans import kmeans_gram
from ..lowrank import from_units, scale_factors, to_units, truncated_svd
from ..types import LoraFactors
from .lego import EPS, PAPER, cluster_info, output_scale, pool_units, unit_clusters
from .registry import register


@register("lego_rank1", paper=PAPER, parameter_aliases={"rank": "n_clusters"})
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

    Parameters:
        n_clusters: number of clusters k, the output rank (the cap when max_error > 0); none: the largest input rank
        n_init: K-means restarts (the lowest inertia is kept), >= 1
        max_iter: K-means iterations per restart, at most, >= 1
        tol: K-means stops when the centroids move less than this (relative to the data's variance), >= 0
        param_norm: rescale each rank-one centroid to its members' mean Frobenius norm
        output_reweight: multiply the delta by sqrt(ref_rank / k)
        ref_rank: reference rank of the output reweighting, > 0; none: the weighted mean input rank
        max_error: 0: k fixed; > 0 (below 1): per module the smallest k <= the cap whose relative error is at
            most this
    """
    pooled, _, kept = pool_units(factors, weights, sample_weights=False)
    gram = update_gram(pooled)
    labels, sizes, inertia, search = unit_clusters(
        "lego_rank1", factors, pooled.rank, n_clusters, n_init, max_iter, tol,
        lambda k: kmeans_gram(gram, k, generator=generator, n_init=n_init, max_iter=max_iter, tol=tol),
        max_error=max_error, energy=float(gram.diagonal().clamp_min(0).sum()), generator=generator)
    member_norms = gram.diagonal().clamp_min(0).sqrt()  # |a_i| |b_i| = ||b_i a_i^T||_F
    centroids = _rank_one_centroids(pooled, labels, len(sizes), member_norms if param_norm else None)
    scale = output_scale(factors, weights, len(sizes), ref_rank) if output_reweight else 1.0
    centroids = centroids * math.sqrt(scale)
    return from_units(centroids, pooled.d_in, pooled.kind), cluster_info(labels, kept, sizes, inertia, scale, search)


def update_gram(pooled: LoraFactors) -> torch.Tensor:
    """(u, u) Frobenius Gram of the u rank-one updates b_i a_i^T, (A A^T) * (B^T B) element-wise, float64 on the CPU."""
    A, B = pooled.A.double(), pooled.B.double()
    return ((A @ A.T) * (B.T @ B)).cpu()  # K-means runs on the CPU whatever the factors' device


def _rank_one_centroids(pooled: LoraFactors, labels: torch.Tensor, k: int,
                        member_norms: torch.Tensor | None) -> torch.Tensor:
    """(k, d_in + d_out) units: each cluster's mean update (1/|C|) sum b_i a_i^T as its best rank-one approximation,
    rescaled to its members' mean Frobenius norm when the (u,) `member_norms` are given."""
    units = []
    for cluster in range(k):
        members = (labels == cluster).nonzero().flatten()
        mean = LoraFactors(pooled.A[members] / len(members), pooled.B[:, members], pooled.kind)
        unit = truncated_svd(mean, 1)[0]
        if member_norms is not None:
            norm = float(unit.A.norm() * unit.B.norm())
            target = float(member_norms[members].mean())
            unit = scale_factors(unit, target / norm if norm > EPS else 0.0)
        units.append(to_units(unit))
    return torch.cat(units)
