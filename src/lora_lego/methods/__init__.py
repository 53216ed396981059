"""Merge methods, one file per family; importing this package registers them all."""

from . import concat, lego  # noqa: F401
