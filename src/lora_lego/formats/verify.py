"""The check after a conversion: the written adapter, read back, has every delta of the original within the
written dtype's rounding (`lora-lego convert` leaves nothing behind when it has not)."""

from __future__ import annotations

import torch

from ..errors import OutputError
from ..lowrank import relative_error
from ..outputs import dtype_from_name
from ..types import Adapter
from . import convert_adapter


def check_same_deltas(original: Adapter, converted: Adapter, dtype: str) -> float:
    """The largest relative Frobenius difference between the two adapters' deltas, module by module
    (in the original's module names); raises OutputError when a module is missing or differs by more
    than the written dtype's rounding allows."""
    converted = convert_adapter(converted, original.metadata.get("format", "peft"))
    eps = torch.finfo(dtype_from_name(dtype) if dtype in ("bf16", "fp16", "fp32") else _torch_dtype(dtype)).eps
    tolerance = max(2 * eps, 1e-5)
    worst = 0.0
    for module in original:
        if module not in converted:
            raise OutputError(f"convert check failed: module {module!r} is missing from the output")
        difference = relative_error(converted[module], original[module])
        if not difference <= tolerance:
            raise OutputError(f"convert check failed: module {module!r} differs by {difference:.3g} (relative) "
                              f"after conversion; expected <= {tolerance:.1g}")
        worst = max(worst, difference)
    extra = [m for m in converted if m not in original]
    if extra:
        raise OutputError(f"convert check failed: the output has modules the input lacks ({extra[:3]})")
    return worst


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32
