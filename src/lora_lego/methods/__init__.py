"""Merge methods, one file per family; importing this package registers them all."""

from . import concat  # noqa: F401
