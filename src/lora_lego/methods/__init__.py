"""The merge methods, one file per family, each registering per-module pure functions by name in `registry`.

`get_method` and `available_methods` import the families on first use (importing one registers its methods), so
that reading the registry's defaults (`lora-lego --help`) costs no torch."""

from __future__ import annotations

from .registry import MethodSpec, lookup, registered


def load_builtin() -> None:
    """Register the built-in methods (idempotent: Python imports each family once)."""
    from . import arithmetic, concat, knots, lego, lego_rank1, regmean, spectral, wudi  # noqa: F401


def get_method(name: str) -> MethodSpec:
    """The spec of a method by its name or a method alias; `MethodError` listing the known ones otherwise."""
    load_builtin()
    return lookup(name)


def available_methods() -> list[str]:
    """Names of all registered methods (the built-in ones and any a user registered), sorted."""
    load_builtin()
    return registered()
