"""One module as "<name>.lora_down.weight", ".lora_up.weight" and ".alpha" (kohya, LyCORIS' LoRA / LoCon,
ComfyUI): what its shapes say, its alpha and scale, its plain factors when read, and its tensors when written.

A (r, d_in) is lora_down (conv: (r, c_in, kh, kw) unfolded to (r, c_in * kh * kw); Tucker: a lora_mid
(r, r', kh, kw) folded into it), B (d_out, r) is lora_up (conv: (c_out, r, 1, 1)); delta = alpha / r * B @ A.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..errors import AdapterFormatError
from ..outputs import cast_finite
from ..tensorfile import TensorInfo
from ..types import Adapter, LoraFactors, kernel_size
from . import lycoris
from .ranks import alpha_folded

DOWN, UP, MID, ALPHA = "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"
SUFFIXES = (DOWN, UP, MID, ALPHA)
Entry = tuple[str, torch.dtype, tuple[int, ...]]  # key, dtype, shape


def layout(shapes: Mapping[str, tuple[int, ...]]) -> lycoris.Layout:
    """A LoRA / LoCon module: linear down (r, in), up (out, r); conv down (r, c_in, kh, kw), up (c_out, r, 1, 1);
    Tucker down (r', c_in, 1, 1), mid (r, r', kh, kw), up (c_out, r, 1, 1). Raises ValueError."""
    for side, other in ((DOWN, UP), (UP, DOWN)):
        if side not in shapes:
            raise ValueError(f"has {other} but no {side}; expected both")
    down, up, mid = shapes[DOWN], shapes[UP], shapes.get(MID)
    expected = ("expected (r, d_in) and (d_out, r) (linear), (r, c_in, kh, kw) and (c_out, r, 1, 1) (conv) "
                "or, with lora_mid (r, r', kh, kw), (r', c_in, 1, 1) and (c_out, r, 1, 1) (Tucker)")
    if mid is not None:
        if len(mid) != 4 or len(down) != 4 or len(up) != 4 or down[2:] != (1, 1) or up[2:] != (1, 1) \
                or mid[1] != down[0] or mid[0] != up[1]:
            raise ValueError(f"lora_down.weight has shape {down}, lora_mid.weight {mid} and lora_up.weight {up}; "
                             f"{expected}")
        return lycoris.Layout((up[0], down[1] * mid[2] * mid[3]), (mid[2], mid[3]), mid[0], down[0])
    linear = len(down) == 2 and len(up) == 2
    conv = len(down) == 4 and len(up) == 4 and up[2:] == (1, 1)
    if not (linear or conv) or down[0] != up[1] or 0 in down or 0 in up:
        problem = "rank mismatch: " if (linear or conv) and down[0] != up[1] else ""
        raise ValueError(f"{problem}lora_down.weight has shape {down} and lora_up.weight {up}; {expected}, same r >= 1")
    kernel = (down[2], down[3]) if conv else None
    return lycoris.Layout((up[0], down[1] * (down[2] * down[3] if conv else 1)), kernel, down[0], down[0])


def read_alpha(info: TensorInfo | None, fetch: Callable[[TensorInfo], torch.Tensor], where: str) -> float | None:
    """The module's alpha (a 0-d real tensor), None without one."""
    if info is None:
        return None
    if info.shape != ():
        raise AdapterFormatError(f"{where}: alpha has shape {tuple(info.shape)}; expected a 0-d tensor")
    if info.dtype == torch.bool or info.dtype.is_complex:
        raise AdapterFormatError(f"{where}: alpha has dtype {info.dtype}; expected a real number")
    alpha = float(fetch(info))
    if alpha != alpha or alpha in (float("inf"), float("-inf")):
        raise AdapterFormatError(f"{where}: alpha is {alpha}; expected a finite number")
    return alpha


def scale(alpha: float | None, dim: int | None) -> float:
    """alpha / dim; 1 without an alpha, with alpha 0 (sd-scripts / LyCORIS: alpha = dim) or without a dim."""
    return 1.0 if alpha is None or alpha == 0 or dim is None else alpha / dim


def plain_factors(tensors: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) of float32 lora_down / lora_up (/ lora_mid) tensors, scale not folded in."""
    down, up, mid = tensors[DOWN], tensors[UP], tensors.get(MID)
    A = lycoris.fold_tucker(mid, down.flatten(1)) if mid is not None else down.flatten(1)
    return A, up.flatten(1)


def entries(adapter: Adapter, target: torch.dtype, what: str, *, alpha: bool = True) -> list[Entry]:
    """The (key, dtype, shape) of every module's lora_down / lora_up (and alpha), sorted by key (safetensors'
    data order for one dtype). Raises AdapterFormatError for an embedding or a rank-0 module, naming `what`
    files ("kohya files") in the message, and for an adapter without modules."""
    found: list[Entry] = []
    for module in adapter:
        info, where = adapter.info(module), f"adapter {adapter.name!r}, module {module!r}"
        if info.kind == "embedding":
            raise AdapterFormatError(f"{where}: an embedding LoRA; {what} hold linear and convolution LoRA only")
        if info.rank < 1:
            raise AdapterFormatError(f"{where}: rank 0 cannot be saved; expected r >= 1")
        (d_out, d_in), r, kernel = info.shape, info.rank, kernel_size(info.kind)
        down = (r, d_in // (kernel[0] * kernel[1]), *kernel) if kernel else (r, d_in)
        found += [(f"{module}.{ALPHA}", target, ())] if alpha else []
        up = (d_out, r, 1, 1) if kernel else (d_out, r)
        found += [(f"{module}.{DOWN}", target, down), (f"{module}.{UP}", target, up)]
    if not found:
        raise AdapterFormatError(f"adapter {adapter.name!r}: nothing to save (no modules)")
    return sorted(found, key=lambda entry: entry[0])


def module_tensors(factors: LoraFactors, target: torch.dtype, alpha: int | None,
                   what: str = "module") -> dict[str, torch.Tensor]:
    """lora_down.weight = A, lora_up.weight = B (conv: 4-D) in `target`, and `alpha` unless None. B carries
    r / alpha (alpha as stored in `target`: bf16 is not exact above 256), so that a reader's alpha / r * B A is
    still the delta; without an alpha B is written as it is (scale 1)."""
    r, kernel = factors.rank, kernel_size(factors.kind)
    B = factors.B.detach().float()
    tensors = {}
    if alpha is not None:
        tensors[ALPHA] = torch.tensor(float(alpha), dtype=target)
        B = alpha_folded(B, r, float(tensors[ALPHA]))
    down = factors.A.detach().reshape(r, -1, *kernel) if kernel else factors.A.detach()
    up = B.reshape(*B.shape, 1, 1) if kernel else B
    tensors[DOWN] = cast_finite(down, target, f"{what}: lora_down").contiguous()
    tensors[UP] = cast_finite(up, target, f"{what}: lora_up").contiguous()
    return tensors
