"""Merge methods, one file per family; importing this package registers them all."""

from . import arithmetic, concat, knots, lego, lego_rank1, regmean, spectral, wudi  # noqa: F401
