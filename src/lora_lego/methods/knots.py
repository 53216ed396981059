"""KnOTS (Stoica et al., ICLR 2025): align the tasks' LoRA updates in one shared SVD basis, merge their
coordinates there (task arithmetic or TIES), and rebuild. All in low-rank form: no dense delta.

Per module, [delta_1 ... delta_n] (d_out, n * d_in) = U diag(s) [V_1^T ... V_n^T]; task t is represented
by its coordinates X_t = diag(s) V_t^T of shape (R, d_in), R = sum of ranks. The merged delta is
U combine(X_1..X_n), truncated to rank k by the exact low-rank SVD.

Differences from the reference implementation (gstoica27/KnOTS), all because we work one module at a
time without the base model: TIES trims each task's coordinates per module, not with one top-k over the
whole model; the adapters' alpha/r scaling is folded in (the reference ignores it, its configs use
alpha = r); components with s <= 1e-7 * s_max are dropped (the reference: s <= 1e-5 absolute).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..lowrank import truncated_svd
from ..types import LoraFactors
from .arithmetic import check_density, combine, default_rank
from .registry import register

KNOTS = "https://arxiv.org/abs/2410.19735"


def aligned_coordinates(factors: list[LoraFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared basis U (d_out, R') with orthonormal columns and coordinates X (n, R', d_in), float64,
    such that delta_t = U @ X[t] for every task t (R' <= sum of ranks: null components dropped)."""
    q_b, r_b = torch.linalg.qr(torch.cat([f.B.double() for f in factors], dim=1))
    q_as, r_as = zip(*(torch.linalg.qr(f.A.double().T) for f in factors))
    core = r_b @ torch.block_diag(*(r.T for r in r_as))  # (R, R): [delta_1 ... delta_n] = q_b core blockdiag(q_a^T)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    keep = s > 1e-7 * s[0] if s.numel() and s[0] > 0 else s > 0
    u, s, vh = u[:, keep], s[keep], vh[keep]
    blocks = torch.split(vh, [f.rank for f in factors], dim=1)
    coordinates = torch.stack([s[:, None] * (block @ q_a.T) for block, q_a in zip(blocks, q_as)])
    return q_b @ u, coordinates


def _knots(factors: list[LoraFactors], weights: list[float], *, combine_by: str, rank: int | None, density: float,
           sign: str, scale: float, method: str) -> tuple[LoraFactors, dict]:
    k = default_rank(factors, rank, method)
    basis, coordinates = aligned_coordinates(factors)
    merged = combine(coordinates, weights, sparsify="trim" if density < 1 else "none", combine_by=combine_by,
                     density=density, sign=sign) * scale
    result, _ = truncated_svd(LoraFactors(merged, basis, factors[0].kind), k)
    dtype = factors[0].A.dtype
    return LoraFactors(result.A.to(dtype), result.B.to(dtype), result.kind), {"shared_rank": int(basis.shape[1])}


@register("knots_ta", paper=KNOTS)
def knots_ta(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator,
             rank: int | None = None, scale: float = 1.0) -> tuple[LoraFactors, dict]:
    """KnOTS + task arithmetic: weighted sum of the tasks' coordinates in the shared SVD basis, rank k.

    Parameters:
        rank: output rank k; none: the largest input rank
        scale: factor on the merged delta
    """
    return _knots(factors, weights, combine_by="sum", rank=rank, density=1.0, sign="total", scale=scale,
                  method="knots_ta")


@register("knots_ties", paper=KNOTS)
def knots_ties(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator,
               rank: int | None = None, density: float = 0.5, sign: Literal["total", "frequency"] = "total",
               scale: float = 1.0) -> tuple[LoraFactors, dict]:
    """KnOTS + TIES: trim each task's coordinates to `density`, elect signs, disjoint mean, rebuild, rank k.

    Parameters:
        rank: output rank k; none: the largest input rank
        density: fraction of each task's coordinates kept, in (0, 1]
        sign: sign election: total (the sign of the sum of values) or frequency (the majority of signs)
        scale: factor on the merged delta
    """
    check_density("knots_ties", density)
    return _knots(factors, weights, combine_by="ties", rank=rank, density=density, sign=sign, scale=scale,
                  method="knots_ties")
