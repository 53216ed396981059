"""diffusers / ai-toolkit / SimpleTuner single files: PEFT keys under pipeline-component prefixes
("unet.<module>.lora_A.weight", "transformer.<module>.lora_B.weight", "text_encoder.<module>...") with
the LoraConfig of each component in the `lora_adapter_metadata` header, or `.alpha` tensors, or neither."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import AdapterFormatError, some
from ..outputs import cast_finite, output_dtype
from ..tensorfile import TensorInfo
from ..types import Adapter, LazyModules, LoraFactors, ModuleInfo, kernel_size
from . import peft_keys
from .diffusers_config import METADATA_KEY, config_scaling, header_configs, read_configs, split_component
from .family import family_from_metadata, family_from_modules
from .files import module_producer, open_file, provenance_header, write_file
from .names import canonical_dotted, cross_attention_dim
from .peft_config import CONFIG_NAME, read_config
from .ranks import stored_dtype
from .record import apply_recorded


def owns(key: str) -> bool:
    """A diffusers / PEFT key: a LoRA factor, alpha, DoRA or lora-bias tensor of a dotted module path.

    Keys whose first dotted part starts with "lora_" are kohya's ("lora_unet_...", "lora_te1_..."), never ours.
    """
    if key.split(".", 1)[0].startswith("lora_"):
        return False
    return bool(peft_keys.is_key(key) or peft_keys.DORA.search(key) or peft_keys.BIAS.search(key))


def read(path: Path, *, lazy: bool = False, **_options: Any) -> Adapter:
    """Read a diffusers-style single file. Factors are float32 with sqrt(|scale|) folded into A and B
    (the sign on A); conv LoRAs (lora_A (r, c_in, kh, kw), lora_B (c_out, r, 1, 1)) become kind
    "conv{kh}x{kw}" with A flattened to (r, c_in * kh * kw).

    Scale per module: the component's LoraConfig in the `lora_adapter_metadata` header (r, lora_alpha,
    rank_pattern, alpha_pattern, use_rslora, matched against the path inside the component), else an
    `.alpha` tensor (alpha / r), else 1. A PEFT weights file (base_model.model. keys) beside its
    adapter_config.json takes the scale from that config. CLIP text-encoder paths are read in their
    "text_model." spelling (transformers 5 dropped that level; diffusers strips it again on load).
    `lazy=True` reads each module's factors when accessed. LyCORIS options do not apply. Raises
    AdapterFormatError naming the file and module.
    """
    name = str(path)
    infos, header, fetch = open_file(path)
    groups, peft_prefixed = peft_keys.group_keys(infos, name, known=owns, expected=(
        "diffusers LoRA tensors (<module>.lora_A.weight / .lora_B.weight / .alpha)"))
    configs = read_configs(header, name)
    if not configs and peft_prefixed and (path.parent / CONFIG_NAME).is_file():
        configs = {None: read_config(path.parent)}  # a PEFT folder's weights file named directly
    module_infos = {module: peft_keys.check_parts(module, parts, name, conv=True) for module, parts in groups.items()}
    scalings = {module: _scaling(module, info.rank, groups[module], configs, fetch, name)
                for module, info in module_infos.items()}
    renamed = _canonical_names(list(groups), name)

    def read_module(module: str) -> LoraFactors:
        source = renamed[module]
        return peft_keys.read_factors(groups[source], module_infos[source].kind, scalings[source], fetch,
                                      f"adapter {name!r}, module {source!r}")

    infos_out = {module: module_infos[source] for module, source in renamed.items()}
    metadata = {
        "format": "diffusers",
        "family": family_from_metadata(header) or family_from_modules(renamed, cross_attention_dim(infos_out)),
        "header": dict(header),
        "dtype": stored_dtype(parts[side].dtype for parts in groups.values() for side in ("A", "B")),
        "scaling": {module: scalings[source] for module, source in renamed.items()},
        "folder": str(path.resolve()),  # what writes must never overwrite (see writing.source_folders)
        "base_model_name_or_path": None,
        "task_type": None,
        "fan_in_fan_out": False,
    }
    apply_recorded(metadata, header, name)
    modules = LazyModules(infos_out, read_module) if lazy else {module: read_module(module) for module in renamed}
    return Adapter(modules, metadata, name=name)


def _scaling(module: str, rank: int, parts: dict[str, Any], configs: dict[str | None, dict[str, Any]],
             fetch: Callable[[TensorInfo], torch.Tensor], name: str) -> float:
    """The module's scale: its component's config, else its alpha tensor (alpha / r), else 1 (alpha = r)."""
    where = f"adapter {name!r}, module {module!r}"
    alpha = _alpha(parts, fetch, where) if "alpha" in parts else None
    component, relative = split_component(module)
    config = configs.get(None if None in configs else component)
    if config is None:
        return 1.0 if alpha is None else alpha / rank
    scaling = config_scaling(config, module if None in configs else relative, rank, where)
    if alpha is not None and abs(alpha / rank - scaling) > 1e-6 * abs(scaling):
        raise AdapterFormatError(f"{where}: its alpha tensor ({alpha:g}, scale {alpha / rank:g}) disagrees with "
                                 f"{METADATA_KEY} (scale {scaling:g}); expected one of them, or both equal")
    return scaling


def _alpha(parts: dict[str, Any], fetch: Callable[[TensorInfo], torch.Tensor], where: str) -> float:
    info = parts["alpha"]
    if len(info.shape) > 1 or (info.shape and info.shape[0] != 1) or info.dtype == torch.bool:
        raise AdapterFormatError(f"{where}: alpha has shape {list(info.shape)} and dtype {info.dtype}; "
                                 "expected one number")
    value = float(fetch(info).reshape(()).item())
    if not abs(value) < float("inf"):
        raise AdapterFormatError(f"{where}: alpha is {value}; expected a finite number")
    return value


def _canonical_names(modules: list[str], name: str) -> dict[str, str]:
    """Canonical module path -> path in the file; two file paths of one module are refused."""
    renamed: dict[str, str] = {}
    for module in modules:
        canonical = canonical_dotted(module)
        if canonical in renamed:
            raise AdapterFormatError(f"adapter {name!r}: modules {renamed[canonical]!r} and {module!r} are the same "
                                     f"module ({canonical!r}) spelled two ways; expected one")
        renamed[canonical] = module
    return renamed


def write(adapter: Adapter, path: Path, *, dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write `adapter` (dotted module paths, e.g. "unet.down_blocks.0...") as a diffusers single file.

    Keys "<module>.lora_A.weight" / ".lora_B.weight" (embeddings: lora_embedding_A / _B; conv kinds as
    4-D (r, c_in, kh, kw) and (c_out, r, 1, 1)); header `lora_adapter_metadata` as save_lora_weights
    writes it (per component: r = the most common rank, lora_alpha = r, rank_pattern / alpha_pattern
    for the others, target_modules), so diffusers applies exactly delta = B @ A; `format: pt`; the
    provenance as "lora_lego" JSON. The input's header is not carried over: its ss_* / sshs_* /
    modelspec.* / trainer keys describe one training run of one file (network dim and alpha, hashes
    of the tensor bytes, title), none of which holds for a rewritten, merged or renamed adapter, and a
    diffusers consumer reads only lora_adapter_metadata. `dtype` defaults to the adapter's
    (writing.output_dtype); written atomically, byte-identical for the same adapter, never over an input.
    """
    ranks = dict(adapter.ranks)
    if not ranks:
        raise AdapterFormatError(f"adapter {adapter.name!r}: nothing to save (no modules)")
    kohya = [module for module in ranks if module.startswith("lora_")]
    if kohya:
        raise AdapterFormatError(f"adapter {adapter.name!r}: modules with kohya names ({some(kohya)}); a diffusers "
                                 "file needs dotted module paths (save_adapter / convert_adapter translates them)")
    target = output_dtype(adapter, dtype)
    metadata = {"format": "pt", METADATA_KEY: json.dumps(header_configs(ranks, adapter.name), indent=2, sort_keys=True)}
    metadata.update(provenance_header(adapter))
    tensors, shapes = _tensor_plan(adapter, target, f"output {str(path)!r}")
    return write_file(adapter, path, tensors, metadata, shapes=shapes, overwrite=overwrite)


def _tensor_plan(adapter: Adapter, target: torch.dtype, where: str):
    """key -> a function making the tensor, and key -> (dtype, shape); each module is read once."""
    def tensors_of(module: str, factors: LoraFactors) -> dict[str, torch.Tensor]:
        a_shape, b_shape = _stored_shapes(adapter.info(module))
        a_key, b_key = peft_keys.factor_keys(factors.kind)
        return {key: cast_finite(getattr(factors, side).detach(), target, f"{where}, module {module!r}: lora_{side}")
                .reshape(shape) for key, side, shape in ((a_key, "A", a_shape), (b_key, "B", b_shape))}

    produce = module_producer(adapter, (*peft_keys.factor_keys("linear"), *peft_keys.factor_keys("embedding")),
                              tensors_of)
    shapes: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for module in adapter:
        info = adapter.info(module)
        for key, shape in zip(peft_keys.factor_keys(info.kind), _stored_shapes(info)):
            shapes[f"{module}.{key}"] = (target, shape)
    return {key: (lambda key=key: produce(key)) for key in shapes}, shapes


def _stored_shapes(info: ModuleInfo) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A shape, B shape) as stored: 2-D, or PEFT's 4-D conv layout for conv kinds."""
    (d_out, d_in), r = info.shape, info.rank
    kernel = kernel_size(info.kind)
    if kernel is None:
        return (r, d_in), (d_out, r)
    kh, kw = kernel
    return (r, d_in // (kh * kw), kh, kw), (d_out, r, 1, 1)
