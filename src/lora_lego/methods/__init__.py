"""Merge methods, one file per family; importing this package registers them all."""

from . import arithmetic, concat, knots, lego  # noqa: F401
