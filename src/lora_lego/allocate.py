"""A rank budget (`-p allocate=greedy`): `--rank r` becomes an average. The parameters that uniform rank r would
use, sum_m r (d_in_m + d_out_m), are spent over the modules where the merge loses most without them.

Each module's merge at its whole rank has singular values s_1 >= s_2 >= ... (for `regmean`, those of W* L, i.e.
in the calibration norm; for the spectral methods, Frobenius). Giving the module a (k+1)-th rank keeps a share
s_{k+1}^2 / sum_i s_i^2 of its delta and costs d_in + d_out parameters. Every module starts at rank 1, then the
rank with the largest share per parameter is added while it fits the budget (the shares of a module decrease,
so this is water-filling on the discrete ranks). The budget is never exceeded; at the sum of the input ranks
every non-zero singular value fits, and the merge is exact.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import MethodError
from .lowrank import truncated_svd
from .types import LoraFactors

ALLOCATIONS = ("uniform", "greedy")


def allocation_rule(params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the allocation asked for, "uniform" by default; the other parameters)."""
    params = dict(params)
    allocation = str(params.pop("allocate", "uniform")).strip().lower()
    if allocation not in ALLOCATIONS:
        raise MethodError(f"allocate must be one of {', '.join(ALLOCATIONS)}; got {allocation!r}")
    return allocation, params


def check_allocatable(method: str, whole_rank: bool, params: Mapping[str, Any]) -> int:
    """The average rank r of an allocated merge; MethodError when the method or the parameters do not allow one."""
    if method != "regmean" and not whole_rank:
        raise MethodError(f"allocate=greedy spends a rank budget by the merge's singular values: it works with "
                          f"regmean and the spectral methods (tsv, iso_c, wudi, ...), not {method!r}")
    rank = params.get("rank")
    if rank is None:
        raise MethodError("allocate=greedy needs --rank r: the budget is the parameter count of rank r everywhere")
    return int(rank)


def greedy_ranks(spectra: Mapping[str, torch.Tensor], costs: Mapping[str, int], budget: int) -> dict[str, int]:
    """Per module a rank in 1..len(spectrum) with sum_m rank_m * costs[m] <= budget, greedily by the next
    singular value's share of its module's energy per parameter. MethodError if rank 1 everywhere does not fit."""
    ranks = {module: 1 for module in spectra}
    spent = sum(costs.values())
    if spent > budget:
        raise MethodError(f"a rank budget of {budget:,} parameters does not give every module rank 1 ({spent:,})")
    energy = {m: float(s.double().square().sum()) for m, s in spectra.items()}
    heap = [(-_share(spectra[m], 1, energy[m]) / costs[m], m) for m in spectra]
    heapq.heapify(heap)
    while heap:
        priority, module = heapq.heappop(heap)
        if priority >= 0 or spent + costs[module] > budget:  # nothing left to gain, or too dear: the module stops
            continue
        ranks[module] += 1
        spent += costs[module]
        if ranks[module] < len(spectra[module]):
            heapq.heappush(heap, (-_share(spectra[module], ranks[module], energy[module]) / costs[module], module))
    return ranks


def _share(spectrum: torch.Tensor, index: int, energy: float) -> float:
    """The share of the module's energy that singular value `index` (0-based) carries (0 past the end)."""
    return float(spectrum[index]) ** 2 / energy if index < len(spectrum) and energy > 0 else 0.0


def spectrum(method: str, run: Callable[..., tuple[LoraFactors, dict]], factors: Sequence[LoraFactors],
             weights: Sequence[float], grams, params: Mapping[str, Any]) -> torch.Tensor:
    """The singular values of the module's merge at its whole rank: for regmean, in the calibration norm."""
    if method == "regmean":
        from .methods.regmean import whiten

        target, _ = whiten(list(factors), list(weights), grams, params.get("shrink", 0.9), params.get("ridge", 0.0))
        return truncated_svd(target, target.rank)[1]
    whole, _ = run(rank=None)
    return truncated_svd(whole, whole.rank)[1]
