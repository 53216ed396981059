"""Ranks, scales and dtypes as files store them: the one rank a config or file names for all modules, the
B that carries a module's rank / alpha under that one alpha, and the dtype the factors were stored in.
(Reading folds each module's scale into its factors with `lowrank.scale_factors`.)"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch


def common_rank(ranks: Iterable[int]) -> int:
    """The most common rank (ties: the larger): PEFT's r, a diffusers component's r, a kohya file's alpha."""
    counts = Counter(ranks)
    return max(counts, key=lambda rank: (counts[rank], rank))


def alpha_folded(B: torch.Tensor, rank: int, alpha: float) -> torch.Tensor:
    """B (d_out, r) times rank / alpha: what a file with one alpha for all modules stores, so that a reader's
    alpha / rank * B @ A is again the delta (kohya, GGUF)."""
    return B * (rank / alpha)


def stored_dtype(dtypes: Iterable[torch.dtype]) -> str:
    """The most common dtype of a file's factors, e.g. "float16"; ties go to the widest, then by name."""
    counts = Counter(dtypes)
    stored = max(sorted(counts, key=str), key=lambda dtype: (counts[dtype], dtype.itemsize))
    return str(stored).removeprefix("torch.")
