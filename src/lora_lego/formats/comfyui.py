"""ComfyUI's own LoRA files, as its LoraSave node writes them: "diffusion_model.<module>.lora_down.weight" and
".lora_up.weight" on the module paths of ComfyUI's diffusion model (LDM / BFL names, e.g.
"diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"), no ".alpha" (scale 1; one is honoured
when present), fp16. Module names keep their prefix and are a naming of their own, translated to kohya and
diffusers names for SD 1.x / 2.x, SDXL and Flux (names_comfyui.py). Full differences (".diff", ".diff_b", which
LoraSave stores for 1-D parameters) are refused: they are not low-rank updates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFormatError, some
from ..lowrank import scale_factors
from ..outputs import output_dtype
from ..tensorfile import TensorInfo
from ..types import Adapter, LazyModules, LoraFactors, ModuleInfo, check_factor_values, conv_kind
from . import names_comfyui, updown
from .family import BASE_MODEL_VERSIONS, family_from_metadata
from .files import module_producer, open_file, provenance_header, write_file
from .ranks import stored_dtype
from .record import apply_recorded

PREFIX = "diffusion_model."
FULL = ("diff", "diff_b", "set_weight")  # LoraSave's full-difference tensors


def _split(key: str) -> tuple[str, str | None]:
    """(module, suffix) of a key ending in a known suffix, else (key, None)."""
    suffix = next((s for s in (*updown.SUFFIXES, *FULL) if key.endswith("." + s)), None)
    return (key[: -len(suffix) - 1], suffix) if suffix else (key, None)


def owns(key: str) -> bool:
    """A ComfyUI key: "diffusion_model.<module>.<lora_down.weight | lora_up.weight | lora_mid.weight | alpha
    | diff | diff_b>"."""
    return key.startswith(PREFIX) and _split(key)[1] is not None


def _group(infos: dict[str, TensorInfo], name: str) -> dict[str, dict[str, TensorInfo]]:
    """Keys -> {module: {suffix: info}}; refuses foreign keys and full differences."""
    foreign = [key for key in infos if not owns(key)]
    if foreign:
        raise AdapterFormatError(f"adapter {name!r}: tensor keys that are not ComfyUI LoRA tensors "
                                 f"({PREFIX}<module>.lora_down.weight / .lora_up.weight / .alpha): {some(foreign)}")
    full = [key for key in infos if _split(key)[1] in FULL]
    if full:
        raise AdapterFormatError(f"adapter {name!r}: full weight differences ({some(full)}), not low-rank factors; "
                                 "lora-lego merges LoRA modules only")
    groups: dict[str, dict[str, TensorInfo]] = {}
    for key, info in infos.items():
        module, suffix = _split(key)
        groups.setdefault(module, {})[suffix] = info
    return groups


def _module(parts: dict[str, TensorInfo], fetch, where: str) -> tuple[ModuleInfo, float]:
    """A module's info (from its shapes) and scale (alpha / r, 1 without an alpha)."""
    odd = [suffix for suffix, info in parts.items() if suffix != updown.ALPHA and not info.dtype.is_floating_point]
    if odd:
        raise AdapterFormatError(f"{where}: {odd[0]} has dtype {parts[odd[0]].dtype}; expected a float tensor")
    try:
        layout = updown.layout({suffix: info.shape for suffix, info in parts.items()})
    except ValueError as error:
        raise AdapterFormatError(f"{where}: {error}") from None
    kind = conv_kind(layout.kernel) if layout.kernel is not None else "linear"
    return ModuleInfo(layout.shape, layout.rank, kind), updown.scale(updown.read_alpha(parts.get(updown.ALPHA),
                                                                                       fetch, where), layout.dim)


def read(path: Path, *, lazy: bool = False, **_options: Any) -> Adapter:
    """Read a ComfyUI LoRA file: float32 factors, A (r, d_in) = lora_down unfolded, B (d_out, r) = lora_up, with
    sqrt(|scale|) folded into each (the sign on A). Raises AdapterFormatError naming the file and module."""
    name = str(path)
    infos, header, fetch = open_file(path)
    groups = _group(infos, name)
    modules = {module: _module(parts, fetch, f"adapter {name!r}, module {module!r}")
               for module, parts in groups.items()}

    def read_module(module: str) -> LoraFactors:
        tensors = {suffix: fetch(info).to(torch.float32) for suffix, info in groups[module].items()
                   if suffix != updown.ALPHA}
        A, B = updown.plain_factors(tensors)
        info, scale = modules[module]
        factors = scale_factors(LoraFactors(A.contiguous(), B.contiguous(), info.kind), scale, in_place=True)
        check_factor_values(factors, f"adapter {name!r}, module {module!r} (scale {scale:g} folded in)")
        return factors

    family = family_from_metadata(header) or names_comfyui.family({m: info for m, (info, _) in modules.items()})
    metadata = {
        "format": "comfyui", "family": family, "base_model_name_or_path": None, "task_type": None,
        "fan_in_fan_out": False,
        "dtype": stored_dtype(i.dtype for parts in groups.values() for s, i in parts.items() if s != updown.ALPHA),
        "scaling": {module: scale for module, (_, scale) in modules.items()},
        "folder": str(path.resolve()),  # what writes must never overwrite (writing.source_folders)
    }
    apply_recorded(metadata, header, name)
    table = LazyModules({module: info for module, (info, _) in modules.items()}, read_module)
    return Adapter(table if lazy else {module: read_module(module) for module in modules}, metadata, name=name)


def write(adapter: Adapter, path: Path, *, dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write `adapter` ("diffusion_model."-named modules) as LoraSave does: lora_down (r, d_in) or (r, c_in, kh, kw),
    lora_up (d_out, r) or (d_out, r, 1, 1), no alpha, in `dtype` (default: the inputs'); keys sorted, the
    provenance as "lora_lego" JSON and a known family as sd-scripts' ss_base_model_version (which the reader
    takes back: the names of a few modules may not say it), one module in memory at a time, atomically, never
    over an input."""
    path = Path(path)
    foreign = [module for module in adapter if not module.startswith(PREFIX)]
    if foreign:
        raise AdapterFormatError(f"adapter {adapter.name!r}: modules {some(foreign)} are not ComfyUI module paths; "
                                 f"expected names starting with {PREFIX!r}")
    target = output_dtype(adapter, dtype)
    entries = updown.entries(adapter, target, "ComfyUI files", alpha=False)
    produce = module_producer(adapter, updown.SUFFIXES, lambda module, factors: updown.module_tensors(
        factors, target, None, f"output {str(path)!r}, module {module!r}"))
    shapes = {key: (stored, shape) for key, stored, shape in entries}
    header = provenance_header(adapter)
    if adapter.metadata.get("family") in BASE_MODEL_VERSIONS:
        header["ss_base_model_version"] = BASE_MODEL_VERSIONS[adapter.metadata["family"]][0]
    return write_file(adapter, path, {key: (lambda key=key: produce(key)) for key in shapes},
                      header, shapes=shapes, overwrite=overwrite, library=True)
