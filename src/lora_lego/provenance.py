"""What a merge records: the per-module report (rank, relative error against the exact weighted sum, the
method's own info) and the merged adapter's metadata (provenance, what the writers keep of the inputs)."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Sequence

from ._version import version
from .errors import LoraLegoWarning
from .lowrank import concat_factors, factor_grams, relative_error_from_grams
from .outputs import source_folders
from .types import LoraFactors, carried_metadata


def module_report(result: LoraFactors, factors: list[LoraFactors], weights: list[float], info: dict,
                   names: list[str]) -> dict[str, Any]:
    """Rank, relative error vs the exact weighted sum, and the method's info (labels -> per-source counts).

    A method that already holds the Grams of the pooled factors reports "relative_error" in its info.
    """
    info = dict(info)
    error = info.pop("relative_error", None)
    if error is None:
        target = concat_factors(factors, weights)
        error = relative_error_from_grams(result, target, *factor_grams(target, exact=False))
    entry: dict[str, Any] = {"rank": result.rank, "relative_error": error}
    labels = info.get("labels")
    if labels is not None:
        unit_sources = [name for name, f in zip(names, factors) for _ in range(f.rank)]
        entry["sources_per_rank"] = _sources_per_rank(labels, unit_sources)
    entry.update(info)
    return entry


def _sources_per_rank(labels: Sequence[int], unit_sources: Sequence[str]) -> list[dict[str, int]]:
    """For each merged rank, how many units of each source adapter it gathers."""
    counts: dict[int, Counter] = {}
    for label, source in zip(labels, unit_sources, strict=True):
        if label < 0:  # a unit the method left out (e.g. weight 0)
            continue
        counts.setdefault(int(label), Counter())[source] += 1
    return [dict(counts[label]) for label in sorted(counts)]


def _firsts(adapters, key: str) -> list[Any]:
    """The adapters' values of metadata `key`, in order, leaving out missing ones."""
    return [a.metadata[key] for a in adapters if a.metadata.get(key) is not None]


def merged_metadata(adapters, method, params, weights, seed, report) -> dict[str, Any]:
    """The merged adapter's metadata: what the writers keep of the inputs, and the provenance record."""
    first = adapters[0].metadata
    bases = {a.metadata.get("base_model_name_or_path") for a in adapters} - {None}
    if len(bases) > 1:
        warnings.warn(f"adapters name different base models: {sorted(bases)}", LoraLegoWarning, stacklevel=3)
    return {
        **carried_metadata(adapters),  # what the formats keep for their writers (the first's format, ...)
        "base_model_name_or_path": next(iter(_firsts(adapters, "base_model_name_or_path")), None),
        "task_type": first.get("task_type"),
        "fan_in_fan_out": first.get("fan_in_fan_out", False),
        "dtype": first.get("dtype", "float32"),
        "input_folders": sorted({folder for a in adapters for folder in source_folders(a)}),
        "provenance": {
            "tool": "lora-lego",
            "version": version(),
            "method": method,
            "params": params,
            "seed": seed,
            "weights": weights,
            "sources": [a.name for a in adapters],
        },
        "report": report,
    }
