"""Merges that combine the factors directly: exact concatenation of ranks (`concat`, `ensemble`) and the
element-wise average of the factors (`average`), the paper's "weight averaging" baseline."""

from __future__ import annotations

import torch

from ..errors import MethodError
from ..lowrank import concat_factors, scale_factors
from ..types import LoraFactors
from .registry import register


@register("concat")
def concat(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator) -> LoraFactors:
    """Exact weighted sum of the deltas; output rank = sum of input ranks (PEFT's "cat")."""
    return concat_factors(factors, weights)


@register("ensemble", paper="https://arxiv.org/abs/2409.16167")
def ensemble(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator) -> LoraFactors:
    """Output averaging: exact (1/n) sum_t w_t delta_t over the n adapters that have the module; rank = sum of ranks.

    The paper's "ensemble" baseline: the average of the adapters' outputs, which for linear layers is
    the average of their deltas. Equals `concat` with weights w_t / n.
    """
    return concat_factors(factors, [w / len(factors) for w in weights])


@register("average", paper="https://arxiv.org/abs/2409.16167")
def average(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator) -> LoraFactors:
    """Element-wise mean of the A's and of the B's (equal ranks only); not the mean of the deltas.

    The paper's "weight averaging" baseline. Each factor pair is first scaled by sqrt(|w_t|) (sign on
    A), then A' = mean_t A_t and B' = mean_t B_t, so delta' = (1/n^2) sum_s sum_t B_s A_t: the cross
    terms B_s A_t (s != t) mix unrelated ranks, which is why this merge is usually poor. PEFT's
    "linear" is the same up to the 1/n^2 factor (it sums instead of averaging).
    """
    ranks = [f.rank for f in factors]
    if len(set(ranks)) > 1:
        raise MethodError(f"average: needs the same rank in every adapter, got ranks {ranks}; "
                          "use concat, ensemble, task_arithmetic or lego for mixed ranks")
    scaled = [scale_factors(f, w) for f, w in zip(factors, weights, strict=True)]
    A = torch.stack([f.A for f in scaled]).mean(dim=0)
    B = torch.stack([f.B for f in scaled]).mean(dim=0)
    return LoraFactors(A, B, factors[0].kind)
