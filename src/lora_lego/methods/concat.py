"""Exact merges by concatenating ranks: the merged delta is the weighted sum of the deltas."""

from __future__ import annotations

import torch

from ..lowrank import concat_factors
from ..registry import register
from ..types import LoraFactors


@register("concat")
def concat(factors: list[LoraFactors], weights: list[float], *, generator: torch.Generator) -> LoraFactors:
    """Exact weighted sum of the deltas; output rank = sum of input ranks (PEFT's "cat")."""
    return concat_factors(factors, weights)
