"""lora-lego: merge LoRA adapters by clustering their rank-one units (LoRA-LEGO, ICLR 2025), and more.

The public API is imported on first use (PEP 562): `import lora_lego` costs no torch, so that the command
line starts fast; `lora_lego.merge`, `from lora_lego import merge` and `dir(lora_lego)` work as before."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType as _ModuleType  # not `import types`: the submodule lora_lego.types rebinds that name

from .signals import startup_guard  # stdlib only: set before any heavy import

startup_guard()

from .errors import (  # noqa: E402  (stdlib only)
    AdapterFormatError,
    BaseModelError,
    CalibrationError,
    ClusteringWarning,
    IncompatibleAdaptersError,
    LoraLegoError,
    LoraLegoWarning,
    MethodError,
    OutputError,
    TargetError,
)

# public name -> the submodule that defines it, imported when the name is first used
_LAZY = {
    "calibrate": "calibration.calibrate", "Calibration": "calibration.grams", "load_calibration": "calibration.grams",
    "merge": "merge", "prune": "merge", "load_adapter": "formats", "save_adapter": "formats",
    "available_methods": "methods", "get_method": "methods", "register": "methods.registry", "Adapter": "types",
    "LoraFactors": "types", "apply_adapter": "deploy.apply", "merge_auto": "calibration.auto",
    "score": "calibration.auto", "merge_regmean_pp": "calibration.regmean_pp",
}

__all__ = [
    "Adapter", "LoraFactors", "load_adapter", "save_adapter", "merge", "prune", "register", "get_method",
    "available_methods", "apply_adapter", "merge_auto", "merge_regmean_pp", "score", "calibrate", "Calibration",
    "load_calibration",
    "LoraLegoError", "AdapterFormatError", "BaseModelError", "CalibrationError", "TargetError",
    "IncompatibleAdaptersError", "MethodError", "OutputError", "LoraLegoWarning", "ClusteringWarning", "__version__",
]


def __getattr__(name: str):
    if name == "__version__":
        from ._version import version

        return version()
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(_ModuleType):
    """Keeps the API's names when a submodule of the same name is imported: `lora_lego.merge` stays the function,
    as it was when this package imported it eagerly, although the import system binds each submodule it loads to
    its name in the package."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, _ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
