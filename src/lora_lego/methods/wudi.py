"""WUDI-Merging (Cheng et al., ICML 2025, arXiv 2503.08099) for LoRA: data-free, in closed form on the core matrices.

WUDI minimises sum_t c_t ||(tau - tau_t) tau_t^T||_F^2, c_t = 1 / ||tau_t||_F^2, over the merged delta tau: the
rows of tau_t stand in for task t's inputs. That is RegMean with the Gram G_t = c_t tau_t^T tau_t, so the
minimiser is tau = (sum_t c_t tau_t tau_t^T tau_t)(sum_t c_t tau_t^T tau_t)^+. In core space (`core_space.py`,
tau_t = U M_t V^T) the same holds for the (R_b, R_a) cores: X = (sum_t c_t M_t M_t^T M_t)(sum_t c_t M_t^T M_t
+ lambda I)^+, with lambda = `ridge` times the mean eigenvalue of the Gram sum (0: the exact minimiser), and
rank k is the exact truncation of U X V^T. Task t's vector is w_t tau_t (its weight included).

The reference code does not solve the problem: it runs 300 Adam steps (lr 1e-5) on the dense tau from the
task-arithmetic sum and stops early (`solver="adam"`, dense (d_out, d_in) per module, for comparison).
"""

from __future__ import annotations

from typing import Literal

import torch

from ..core_space import core_space, from_core
from ..errors import MethodError
from ..lowrank import balanced_factors
from ..types import LoraFactors
from .registry import register

WUDI = "https://arxiv.org/abs/2503.08099"
MAX_STEPS = 100_000


@register("wudi", paper=WUDI, whole_rank=True)
def wudi(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator, rank: int | None = None,
         ridge: float = 0.0, solver: Literal["exact", "adam"] = "exact", steps: int = 300, lr: float = 1e-5,
         scale: float = 1.0) -> tuple[LoraFactors, dict]:
    """WUDI: RegMean with each task's own delta as its inputs, solved exactly on the cores (data-free).

    `ridge` >= 0 adds ridge * (mean eigenvalue) to the Gram sum. `solver="adam"`: the reference's early-stopped
    Adam (`steps`, `lr`) on the dense delta instead. `rank`: the exact rank-k truncation (default: the
    whole rank, <= the sum of ranks; for adam, the sum of ranks). `scale` multiplies the result.
    Tasks whose input subspaces (rows of A) are orthogonal give task arithmetic.

    Parameters:
        rank: output rank k; none: every direction of the merge (at most the sum of the input ranks)
        ridge: Tikhonov term added to the Gram sum, relative to its mean eigenvalue (0: the exact minimiser)
        solver: exact (closed form on the cores) or adam (the reference code's early-stopped Adam, dense)
        steps: Adam steps (solver=adam)
        lr: Adam's learning rate (solver=adam)
        scale: factor on the merged delta
    """
    if isinstance(ridge, bool) or not ridge >= 0:
        raise MethodError(f"wudi: ridge must be a number >= 0; got {ridge}")
    if rank is not None and rank < 1:
        raise MethodError(f"wudi: rank must be an integer >= 1, or none for the merge's whole rank; got {rank}")
    if solver == "adam":
        return _adam(factors, weights, rank, steps, lr, scale)
    space = core_space(factors)
    cores = [w * core for core, w in zip(space.cores, weights)]
    numerator = torch.zeros_like(cores[0])
    gram = cores[0].new_zeros(cores[0].shape[1], cores[0].shape[1])
    for core in cores:
        norm = float((core * core).sum())
        if norm > 0:
            numerator += core @ core.T @ core / norm
            gram += core.T @ core / norm
    if ridge > 0 and gram.numel():
        gram.diagonal().add_(ridge * float(gram.diagonal().mean()))
    merged = numerator @ torch.linalg.pinv(gram, hermitian=True)
    return from_core(scale * merged, space, rank, factors[0].kind, factors[0].A.dtype), {"ridge": ridge}


def _adam(factors: list[LoraFactors], weights: list[float], rank: int | None, steps: int, lr: float,
          scale: float) -> tuple[LoraFactors, dict]:
    """The reference's form: Adam on the dense tau (d_out, d_in) from sum_t w_t tau_t, gradients in low rank."""
    if isinstance(steps, bool) or not 0 <= steps <= MAX_STEPS or not lr > 0:
        raise MethodError(f"wudi (adam): need 0 <= steps <= {MAX_STEPS} and lr > 0; got steps={steps}, lr={lr}")
    tasks = []  # (B_t, A_t, c_t) of each task vector w_t B_t A_t with c_t = 1 / ||tau_t||^2
    for f, w in zip(factors, weights):
        B, A = f.B.double() * w, f.A.double()
        norm = float(((B.T @ B) * (A @ A.T)).sum())
        if norm > 0:
            tasks.append((B, A, 1 / norm))
    tau = sum((B @ A for B, A, _ in tasks), torch.zeros(factors[0].shape, dtype=torch.float64,
                                                       device=factors[0].A.device)).requires_grad_(True)

    def loss() -> float:
        return float(sum(c * ((tau - B @ A) @ A.T @ B.T).square().sum() for B, A, c in tasks))

    optimizer = torch.optim.Adam([tau], lr=lr)
    with torch.no_grad():
        start = loss()
        for _ in range(steps):  # gradient 2 sum_t c_t (tau - tau_t) tau_t^T tau_t, each in O(d_out d_in r_t)
            tau.grad = 2 * sum(c * (tau @ A.T - B @ (A @ A.T)) @ (B.T @ B @ A) for B, A, c in tasks)
            optimizer.step()
        end = loss()
    u, s, vh = torch.linalg.svd(scale * tau.detach(), full_matrices=False)
    k = min(sum(f.rank for f in factors) if rank is None else rank, s.shape[0])
    result = balanced_factors(u, s, vh, k, factors[0].kind, factors[0].A.dtype)
    return result, {"loss_start": start, "loss_end": end}
