"""The installed version of lora-lego, from the package metadata (pyproject.toml's `version`); stdlib only."""

from __future__ import annotations

import functools

UNKNOWN = "0+unknown"  # a source tree run without being installed (PYTHONPATH=src) has no metadata


@functools.cache
def version() -> str:
    """lora-lego's version as installed ("0.1.0"), or "0+unknown" when the distribution is not installed. Read
    on first use, not at import: importlib.metadata costs ~30 ms, which `lora-lego --help` need not pay."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("lora-lego")
    except PackageNotFoundError:
        return UNKNOWN
