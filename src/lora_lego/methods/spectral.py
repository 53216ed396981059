"""The 2025-26 spectral merges, all on the core matrices of `core_space.py` (rank <= R = sum of ranks, no dense
matrix, no null directions): TSV-M, Iso-C, Iso-CTS, STAR and CtM.

Each method sees the cores M_t (R_b, R_a) of one module and returns a merged core, mapped back to factors
exactly (`rank=None`) or truncated to rank k. Singular-value rules are basis-free, so these give the same
delta as the papers' full-space definitions restricted to the adapters' span: the difference from the
official code is only that directions no adapter has (numerical null space) never enter. The global
scale the papers tune on labelled validation data is `scale` here (default 1); `scale="norm"` (see
`merge`) sets it per module without data.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..core_space import CoreSpace, core_space, from_core, polar, top_triplets
from ..errors import MethodError
from ..types import LoraFactors
from .arithmetic import check_density, combine, default_rank
from .registry import register

TSV = "https://arxiv.org/abs/2412.00081"
ISO = "https://arxiv.org/abs/2502.04959"
STAR = "https://arxiv.org/abs/2502.10339"
CTM = "https://arxiv.org/abs/2606.03723"


def _check_rank(method: str, rank: int | None) -> None:
    if rank is not None and rank < 1:
        raise MethodError(f"{method}: rank must be an integer >= 1, or none for the merge's whole rank; got {rank}")


def _finish(core: torch.Tensor, space: CoreSpace, factors: list[LoraFactors], rank: int | None) -> LoraFactors:
    return from_core(core, space, rank, factors[0].kind, factors[0].A.dtype)


@register("tsv", paper=TSV, whole_rank=True)
def tsv(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator, rank: int | None = None,
        scale: float = 1.0) -> LoraFactors:
    """TSV-M: each task's top r_t singular triplets, left and right vectors whitened by polar factors.

    Per task the SVD of w_t M_t keeps k_t = r_t (its LoRA rank: every direction it has, none of the
    null ones the official k = min(m, n) / T would add); U* = [U_1 .. U_T] and V* likewise are replaced
    by their polar factors, and the merge is scale * polar(U*) diag(S*) polar(V*)^T. Tasks with mutually
    orthogonal subspaces are left as they are (TSV-M = task arithmetic). rank=None keeps every direction.

    Parameters:
        rank: output rank k; none: every direction of the merge (at most the sum of the input ranks)
        scale: factor on the merged delta
    """
    _check_rank("tsv", rank)
    space = core_space(factors)
    if space.cores.numel() == 0:
        return _finish(space.cores.sum(0), space, factors, rank)
    triplets = [top_triplets(w * core, f.rank) for core, f, w in zip(space.cores, factors, weights)]
    U = polar(torch.cat([u for u, _, _ in triplets], 1))
    V = polar(torch.cat([v for _, _, v in triplets], 1))
    S = torch.cat([s for _, s, _ in triplets])
    return _finish(scale * (U * S) @ V.T, space, factors, rank)


def _isotropic(U: torch.Tensor, V: torch.Tensor, s: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * mean(s) * U V^T: every kept direction gets the same singular value."""
    return scale * s.mean() * (U @ V.T) if s.numel() else U.new_zeros(U.shape[0], V.shape[0])


@register("iso_c", paper=ISO, whole_rank=True)
def iso_c(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator, rank: int | None = None,
          scale: float = 1.0) -> LoraFactors:
    """Iso-C: the task-arithmetic sum with its spectrum flattened to the mean of its singular values.

    sum_t w_t M_t = U diag(s) V^T (non-null s only), merge = scale * mean(s) * U V^T. The official code
    averages over all min(m, n) singular values and gives that value to arbitrary null directions; in
    core space only the sum's own directions exist.

    Parameters:
        rank: output rank k; none: every direction of the merge (at most the sum of the input ranks)
        scale: factor on the merged delta
    """
    _check_rank("iso_c", rank)
    space = core_space(factors)
    total = sum(w * core for core, w in zip(space.cores, weights))
    if total.numel() == 0:
        return _finish(total, space, factors, rank)
    U, s, V = top_triplets(total, min(total.shape))
    return _finish(_isotropic(U, V, s, scale), space, factors, rank)


@register("iso_cts", paper=ISO, whole_rank=True)
def iso_cts(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator,
            rank: int | None = None, common: float = 0.8, scale: float = 1.0) -> LoraFactors:
    """Iso-CTS: common top directions of the sum plus each task's own, whitened, one isotropic value.

    The kept singular values are replaced by their mean.
    With D = min(R_b, R_a) the core space's dimension, the common subspace is the top floor(common * D)
    singular directions of sum_t w_t M_t; each task keeps floor((D - common part) / T) triplets of
    (I - U_c U_c^T) w_t M_t. The official code takes D = min(m, n) of the dense matrix, which on a LoRA
    makes every task-specific slot a null direction; D is the adapters' span here.

    Parameters:
        rank: output rank k; none: every direction of the merge (at most the sum of the input ranks)
        common: fraction of the directions shared by all tasks (the rest: each task's own), in (0, 1]
        scale: factor on the merged delta
    """
    _check_rank("iso_cts", rank)
    if not 0.0 < common <= 1.0:
        raise MethodError(f"iso_cts: common (the fraction of directions shared by all tasks) must be in (0, 1]; "
                          f"got {common}")
    space = core_space(factors)
    total = sum(w * core for core, w in zip(space.cores, weights))
    if total.numel() == 0:
        return _finish(total, space, factors, rank)
    D = min(total.shape)
    Uc, sc, Vc = top_triplets(total, max(1, int(common * D + 1e-9)))
    per_task = (D - sc.numel()) // len(factors)  # the official round() can exceed D: the whitening is then ill-posed
    us, ss, vs = [Uc], [sc], [Vc]
    if per_task > 0:
        for core, w in zip(space.cores, weights):
            u, s, v = top_triplets(w * core - Uc @ (Uc.T @ (w * core)), per_task)
            us.append(u)
            ss.append(s)
            vs.append(v)
    U, V = polar(torch.cat(us, 1)), polar(torch.cat(vs, 1))
    return _finish(_isotropic(U, V, torch.cat(ss), scale), space, factors, rank)


@register("star", paper=STAR, whole_rank=True)
def star(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator, rank: int | None = None,
         eta: float = 0.4, scale: float = 1.0) -> LoraFactors:
    """STAR: each task truncated to `eta` of its nuclear norm, rescaled to the whole, then averaged.

    Per task the fewest top singular values holding `eta` of the nuclear norm are kept and rescaled
    to the whole nuclear norm; the merge is the average (1/T) sum_t w_t of the truncated tasks.

    Parameters:
        rank: output rank k; none: every direction of the merge (at most the sum of the input ranks)
        eta: fraction of each task's nuclear norm its truncation keeps, in (0, 1]
        scale: factor on the merged delta
    """
    _check_rank("star", rank)
    if not 0.0 < eta <= 1.0:
        raise MethodError(f"star: eta (the fraction of each task's nuclear norm kept) must be in (0, 1]; got {eta}")
    space = core_space(factors)
    merged = space.cores.new_zeros(space.cores.shape[1:])
    for core, w in zip(space.cores, weights):
        u, s, v = top_triplets(core, min(core.shape))
        if s.numel() == 0:
            continue
        cumulative = s.cumsum(0)
        k = int(torch.searchsorted(cumulative, eta * cumulative[-1] * (1 - 1e-12))) + 1
        kept = s[:k] * (cumulative[-1] / cumulative[k - 1])
        merged += w * (u[:, :k] * kept) @ v[:, :k].T
    return _finish(scale * merged / len(factors), space, factors, rank)


def tucker2(tensors: torch.Tensor, k: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared orthonormal bases (U (m, k), V (n, k)) of the slices X_t (T, m, n) maximising
    sum_t ||U^T X_t V||_F^2: HOSVD start, then `iterations` HOOI sweeps (each an eigh of an m x m and an
    n x n matrix). Deterministic: eigenvectors are fixed in sign by their largest entry."""
    def top(matrix: torch.Tensor) -> torch.Tensor:
        vectors = torch.linalg.eigh(matrix)[1].flip(1)[:, :k]  # the top k, descending
        pivots = vectors[vectors.abs().argmax(0), torch.arange(vectors.shape[1], device=vectors.device)]
        return vectors * torch.where(pivots < 0, -1.0, 1.0).to(vectors.dtype)

    def scatter(slices: torch.Tensor) -> torch.Tensor:  # sum_t S_t S_t^T
        return (slices @ slices.transpose(1, 2)).sum(0)

    transposed = tensors.transpose(1, 2)
    U, V = top(scatter(tensors)), top(scatter(transposed))
    for _ in range(iterations):
        U = top(scatter(tensors @ V))  # (T, m, k) slices
        V = top(scatter(transposed @ U))  # (T, n, k)
    return U, V


@register("ctm", paper=CTM)
def ctm(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator, rank: int | None = None,
        beta: float = 0.25, rule: Literal["ties", "dare_ties", "sum"] = "ties", density: float = 0.5,
        iterations: int = 10, scale: float = 1.0) -> LoraFactors:
    """CtM: a shared rank-k basis (Tucker-2 of norm-equalised cores), then TIES on the k x k projections.

    TIES, DARE-TIES or a sum (`rule`) on the k x k projections of the original tasks: rank k by construction.
    Each w_t M_t is rescaled to norm beta ||w_t M_t|| + (1 - beta) * (their mean) for the basis only;
    U, V = tucker2 of those (k = rank, default the largest input rank); O_t = U^T M_t V are merged by
    `rule` (weights applied, `density` for the trim / drop) and the result is scale * U O V^T.

    Parameters:
        rank: size k of the shared basis, the output rank; none: the largest input rank
        beta: norm equalisation for the basis, in [0, 1]: 0 = equal norms, 1 = the tasks' own
        rule: how the k x k projections are merged
        density: fraction kept by the trim (ties) or the drop (dare_ties), in (0, 1]
        iterations: HOOI sweeps of the Tucker-2 basis, >= 0
        scale: factor on the merged delta
    """
    k = default_rank(factors, rank, "ctm")
    check_density("ctm", density)
    if not 0.0 <= beta <= 1.0:
        raise MethodError(
            f"ctm: beta (0 = equal norms for the basis, 1 = the tasks' own) must be in [0, 1]; got {beta}")
    if iterations < 0:
        raise MethodError(f"ctm: iterations (HOOI sweeps) must be >= 0; got {iterations}")
    space = core_space(factors)
    cores = space.cores
    if cores.numel() == 0:
        return _finish(cores.sum(0), space, factors, k)
    weighted = cores * torch.tensor(weights, dtype=cores.dtype, device=cores.device)[:, None, None]
    norms = weighted.flatten(1).norm(dim=1)
    wanted = beta * norms + (1 - beta) * norms.mean()
    equalised = weighted * (wanted / norms.clamp_min(1e-300))[:, None, None]
    k = min(k, *cores.shape[1:])
    U, V = tucker2(equalised, k, iterations)
    projected = U.T @ cores @ V  # (T, k, k)
    sparsify, combine_by = {"ties": ("trim", "ties"), "dare_ties": ("dare", "ties"), "sum": ("none", "sum")}[rule]
    merged = combine(projected, weights, sparsify=sparsify, combine_by=combine_by, density=density,
                     generator=generator)
    return _finish(scale * U @ merged @ V.T, space, factors, k)
