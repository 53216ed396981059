"""Calibrated merges: RegMean for LoRA (exact and low-rank) and LoRA-LEGO in the calibration metric.

Each adapter t comes with G_t (d_in, d_in), the mean outer product of its module's inputs on its prompts.
RegMean (Jin et al., ICLR 2023) minimises sum_t |w_t| ||(W - sign(w_t) delta_t) X_t^T||^2, the change of
the module's outputs on every task's inputs, with G~_t = s G_t + (1 - s) diag(G_t) (off-diagonals shrunk
by s = `shrink`). With G = sum_t |w_t| G~_t = L L^T (Cholesky), the objective is ||(W - W*) L||_F^2 up
to a constant, where W* = (sum_t w_t B_t A_t G~_t) G^-1 (`ridge` lambda > 0: G + lambda mean(diag G) I, which
bounds the directions that few calibration tokens excite; W* then shrinks towards 0 as lambda grows). So
everything happens in whitened coordinates W L, where the calibrated problems become plain Frobenius ones on
LoRA factors (`whiten`):
  - W* L = B_w C with B_w = [w_t B_t] (d_out, u) and C = [A_t G~_t] L^-T (u, d_in): rank <= u = sum r_t;
  - the best rank-k W in the calibration norm is SVD_k(W* L) L^-1 (exact low-rank SVD of B_w C);
  - LoRA-LEGO clusters the u whitened units (b_i, c_i), i.e. by their effect on the calibration inputs.
No (d_out, d_in) matrix is formed; the cost is one Cholesky of G (O(d_in^3)) per module.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from ..errors import MethodError
from ..lowrank import concat_factors, relative_error, truncated_svd
from ..types import LoraFactors
from .arithmetic import check_max_error, smallest_rank
from .lego import PAPER as LEGO_PAPER
from .lego import lego
from .lego_rank1 import lego_rank1
from .registry import register

REGMEAN = "https://arxiv.org/abs/2212.09849"
_BLOCK = 1024  # columns of a Gram converted to float64 at a time (bounds the temporary copy)
_PIVOT = 1e-10  # smallest squared Cholesky pivot, relative to the largest diagonal entry of G


def whiten(factors: list[LoraFactors], weights: list[float], grams: Sequence[torch.Tensor],
           shrink: float, ridge: float = 0.0) -> tuple[LoraFactors, torch.Tensor]:
    """RegMean's solution in whitened coordinates, T = W* L (A = C (u, d_in), B = B_w (d_out, u)), and
    L (d_in, d_in), the lower Cholesky factor of G = sum_t |w_t| G~_t (+ ridge * mean(diag) I); float64, on the
    factors' device."""
    if isinstance(shrink, bool) or not 0.0 <= shrink <= 1.0:
        raise MethodError(f"shrink (RegMean's scale of the Grams' off-diagonal entries) must be in [0, 1]; "
                          f"got {shrink}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not 0.0 <= ridge < math.inf:
        raise MethodError(f"ridge (relative to the mean diagonal of the Gram sum) must be a finite number >= 0; "
                          f"got {ridge!r}")
    d, device = factors[0].d_in, factors[0].A.device
    if factors[0].kind != "linear":
        raise MethodError(f"calibrated merging supports linear modules only, not {factors[0].kind} ones")
    total = torch.zeros(d, d, dtype=torch.float64, device=device)
    products, columns = [], []
    for f, w, gram in zip(factors, weights, grams, strict=True):  # `grams` may read each Gram on access: one at a time
        if tuple(gram.shape) != (d, d):
            raise MethodError(f"a calibration Gram of shape {tuple(gram.shape)} does not fit the module's d_in = {d} "
                              "(made for another model?)")
        gram = gram.to(device)
        diagonal = gram.diagonal().double()
        A = f.A.double()
        product = torch.empty(f.rank, d, dtype=torch.float64, device=device)  # A_t G_t
        for start in range(0, d, _BLOCK):  # float64 copies of a block of columns only
            block = gram[:, start:start + _BLOCK].double()
            product[:, start:start + _BLOCK] = A @ block
            total[:, start:start + _BLOCK].add_(block, alpha=shrink * abs(w))
        products.append(shrink * product + (1 - shrink) * A * diagonal)  # A_t G~_t
        total.diagonal().add_(diagonal, alpha=(1 - shrink) * abs(w))
        columns.append(f.B.double() * w)
        del gram, block
    if ridge > 0:  # relative: lambda times the mean eigenvalue of G, so that it does not depend on the inputs' scale
        total.diagonal().add_(ridge * float(total.diagonal().mean()))
    factor = _cholesky(total)  # in place: total becomes L
    whitened = torch.linalg.solve_triangular(factor, torch.cat(products).T, upper=False).T  # P L^-T
    return LoraFactors(whitened, torch.cat(columns, dim=1), factors[0].kind), factor


def _cholesky(gram: torch.Tensor) -> torch.Tensor:
    """L with L L^T = gram, computed in place (gram's storage becomes L: one d_in x d_in matrix, not two),
    or a MethodError saying why the calibration cannot be used."""
    diagonal = gram.diagonal().clone()
    largest = float(diagonal.max()) if diagonal.numel() else 0.0
    factor, info = torch.linalg.cholesky_ex(gram, out=(gram, torch.empty((), dtype=torch.int32, device=gram.device)))
    if int(info) != 0 or largest <= 0 or float(factor.diagonal().min()) ** 2 < _PIVOT * largest:
        zero = int((diagonal <= 0).sum())
        raise MethodError(f"the calibration Gram (d_in = {gram.shape[0]}) is singular: "
                          + (f"{zero} input dimension(s) are always 0" if zero else
                             f"the inputs span fewer than {gram.shape[0]} directions (too few tokens, or low-rank "
                             "activations such as attention heads that only attend to the first token)")
                          + "; use shrink < 1 (RegMean's default 0.9), ridge > 0, or more prompts")
    return factor


def unwhiten(factors: LoraFactors, factor: torch.Tensor, dtype: torch.dtype) -> LoraFactors:
    """Factors of W = (B A_w) L^-1 from whitened ones, each rank balanced (|a_i| = |b_i|), in `dtype`."""
    A = torch.linalg.solve_triangular(factor, factors.A.double(), upper=False, left=False)  # A_w L^-1
    result = _balanced(LoraFactors(A, factors.B.double(), factors.kind))
    return LoraFactors(result.A.to(dtype), result.B.to(dtype), result.kind)


@register("regmean", paper=REGMEAN)
def regmean(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator,
            calibration: Sequence[torch.Tensor], rank: int | None = None, shrink: float = 0.9,
            norm: Literal["calibration", "frobenius"] = "calibration", max_error: float = 0.0,
            ridge: float = 0.0) -> tuple[LoraFactors, dict]:
    """RegMean for LoRA (needs calibration): W = (sum_t w_t B_t A_t G~_t)(sum_t |w_t| G~_t)^-1, exact in low rank.

    Default rank: the sum of the input ranks (the exact solution). `rank` k below it gives the best rank-k
    W in the calibration norm ||(W - W*) L|| (`norm="frobenius"`: plain truncation of W*, for comparison).
    `max_error` > 0 picks the smallest k <= rank whose relative calibration-norm error is <= max_error.
    With identical Grams W is the |w|-weighted mean of the deltas; with one adapter, its delta. The
    report's `calibration_error` is ||(W - W*) L|| / ||W* L||, the error against W* in the calibration norm.

    Parameters:
        rank: output rank k, the best in the calibration norm (the cap when max_error > 0); none: the sum of the
            input ranks (the exact solution)
        shrink: scale of the Grams' off-diagonal entries, in [0, 1] (1: the plain Grams, often singular)
        norm: how rank k is reached: calibration (best in the calibration norm) or frobenius (plain truncation,
            for comparison)
        max_error: 0: k fixed; > 0 (below 1): per module the smallest k <= the cap whose relative error is at
            most this (in the calibration norm)
        ridge: relative ridge: lambda * mean(diag(G)) added to G's diagonal before the solve, >= 0 (0: RegMean
            exactly; > 0 bounds the input directions that few calibration tokens excite)
    """
    check_max_error("regmean", max_error)
    target, factor = whiten(factors, weights, calibration, shrink, ridge)
    cap = target.rank if rank is None else rank
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise MethodError(f"regmean: rank must be an integer >= 1; got {rank!r}")
    info: dict = {"shrink": shrink, "max_error": max_error}
    if cap >= target.rank and max_error == 0:
        result = target
    elif norm == "calibration":
        result, singular_values = truncated_svd(target, min(cap, target.rank))
        if max_error > 0:
            chosen = smallest_rank(singular_values, max_error, result.rank)
            result = LoraFactors(result.A[:chosen], result.B[:, :chosen], result.kind)
        info["singular_values"] = singular_values[:2 * cap].tolist()
    else:  # truncate W* itself (Frobenius), then measure it in the calibration norm
        plain = truncated_svd(unwhiten(target, factor, torch.float64), min(cap, target.rank))[0]
        result = LoraFactors(plain.A.double() @ factor, plain.B.double(), plain.kind)
    info["chosen_rank"] = result.rank
    info["calibration_error"] = 0.0 if result is target else relative_error(result, target)
    return unwhiten(result, factor, factors[0].A.dtype), info


@register("lego_calibrated", paper=LEGO_PAPER, parameter_aliases={"rank": "n_clusters"})
def lego_calibrated(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator,
                    calibration: Sequence[torch.Tensor], n_clusters: int | None = None, shrink: float = 0.9,
                    basis: Literal["regmean", "adapter"] = "regmean", clustering: Literal["rank1", "units"] = "rank1",
                    refit: bool = True, n_init: int = 10, max_iter: int = 300,
                    tol: float = 1e-4, ridge: float = 0.0) -> tuple[LoraFactors, dict]:
    """Beyond the paper (needs calibration): LoRA-LEGO with units clustered by their effect on the calibration inputs.

    The u rank-one units are taken in whitened coordinates (see the module docstring), where the
    Frobenius geometry is the calibration metric: (b_i, c_i) with c_i = (a_i G~_t G^-1) L, the units of
    RegMean's exact solution (`basis="regmean"`), or c_i = a_i L, each adapter's own units measured in
    the metric (`basis="adapter"`: what a first probe did; its rows cannot reach RegMean's solution even
    at k = u). They are clustered into k = `n_clusters` (default: the largest input rank) by `lego_rank1`
    (`clustering="rank1"`: K-means on the rank-one updates, Gram (C C^T) * (B^T B)) or by `lego` itself
    (`"units"`: K-means on the units [c_i; b_i], balanced first, with dual reweighting); the centroids
    give A'. `refit` then solves B' in closed form, B' = (W* L) A'^T (A' A'^T)^+, the least-squares B for
    that A' in the calibration norm. At k >= u with basis="regmean" the result is RegMean's exactly.
    The report's `calibration_error` is measured against RegMean's W* in the calibration norm.

    Parameters:
        n_clusters: number of clusters k, the output rank; none: the largest input rank
        shrink: scale of the Grams' off-diagonal entries, in [0, 1] (1: the plain Grams, often singular)
        basis: the units clustered: regmean (those of RegMean's solution) or adapter (each adapter's own)
        clustering: rank1 (K-means on the rank-one updates, as lego_rank1) or units (on the units, as lego)
        refit: solve B in closed form for the clustered A (least squares in the calibration norm)
        n_init: K-means restarts (the lowest inertia is kept), >= 1
        max_iter: K-means iterations per restart, at most, >= 1
        tol: K-means stops when the centroids move less than this (relative to the data's variance), >= 0
        ridge: relative ridge: lambda * mean(diag(G)) added to G's diagonal before the solve, >= 0 (as regmean's)
    """
    target, factor = whiten(factors, weights, calibration, shrink, ridge)
    k = max(f.rank for f in factors) if n_clusters is None else n_clusters
    if basis == "regmean":
        units = target
    else:
        units = LoraFactors(concat_factors(factors).A.double() @ factor, target.B, target.kind)
    units = _balanced(units)
    # without the refit, LEGO's output reweighting keeps its reference: the weighted mean input rank
    ref_rank = sum(abs(w) * f.rank for f, w in zip(factors, weights)) / sum(abs(w) for w in weights)
    cluster = lego_rank1 if clustering == "rank1" else lego
    result, info = cluster([units], [1.0], generator=generator, n_clusters=k, n_init=n_init, max_iter=max_iter,
                           tol=tol, output_reweight=not refit, ref_rank=ref_rank)
    if refit:
        A = result.A.double()
        B = target.B @ ((target.A @ A.T) @ torch.linalg.pinv(A @ A.T, hermitian=True))
        result = LoraFactors(A, B, result.kind)
    info = {key: value for key, value in info.items() if key != "relative_error"}  # that of the whitened units
    info.update(shrink=shrink, calibration_error=relative_error(result, target))
    return unwhiten(result, factor, factors[0].A.dtype), info


def _balanced(factors: LoraFactors) -> LoraFactors:
    """The same rank-one terms with |a_i| = |b_i| for each rank (LoRA-LEGO's units assume balanced halves)."""
    root = (factors.B.norm(dim=0) / factors.A.norm(dim=1).clamp_min(1e-300)).sqrt()
    root = torch.where(root > 0, root, torch.ones_like(root))
    return LoraFactors(factors.A * root[:, None], factors.B / root, factors.kind)
