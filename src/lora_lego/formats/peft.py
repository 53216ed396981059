"""The PEFT LoRA folder format: `read` reads adapter_config.json with adapter_model.safetensors
(or .bin) into float32 factors with the scale folded in; `write` writes a folder PEFT loads unchanged."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..card import write_card
from ..errors import AdapterFormatError, LoraLegoWarning, some
from ..outputs import atomic_folder, cast_finite, check_output_path, output_dtype, source_folders
from ..tensorfile import save_file
from ..types import Adapter, LazyModules, LoraFactors
from . import peft_keys
from .files import header_of, provenance_header, tensor_reader
from .peft_config import CONFIG_NAME, module_scaling, pattern_value, read_config  # noqa: F401  (re-exported)
from .ranks import common_rank, stored_dtype
from .record import PROVENANCE, apply_recorded

WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = peft_keys.PREFIX


def read(path: str | Path, *, lazy: bool = False, **_options) -> Adapter:
    """Read a PEFT LoRA folder. Factors are float32 with sqrt(scaling) folded into A and B.

    Honours r, lora_alpha, use_rslora, rank_pattern / alpha_pattern (PEFT's matching rule),
    fan_in_fan_out (kept as metadata: LoRA factors are stored (r, in) and (out, r) either way)
    and embedding LoRAs. Raises AdapterFormatError naming the adapter (and module or keys).
    `lazy=True` reads the config and the safetensors header now and each module's factors when it
    is accessed (never cached), so a merge holds one module per adapter at a time; values (NaN, Inf,
    huge entries) are then checked on access. A .bin weights file is always read whole. The LyCORIS
    `_options` of the format registry (expand, expand_rank) do not apply to PEFT folders.
    """
    folder = Path(path)
    name = str(path)
    config = read_config(folder)
    entries, fetch, header = _open_weights(folder, name)
    pairs = _group_keys(entries, name)
    infos = {module: peft_keys.check_parts(module, parts, name, conv=False) for module, parts in pairs.items()}
    if not infos:
        raise AdapterFormatError(f"adapter {name!r}: no LoRA tensors in its weights file")
    scalings = {module: module_scaling(config, module, info.rank, name) for module, info in infos.items()}

    def read_module(module: str) -> LoraFactors:
        return peft_keys.read_factors(pairs[module], infos[module].kind, scalings[module], fetch,
                                      f"adapter {name!r}, module {module!r}")

    metadata = {
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "task_type": config.get("task_type"),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out", False)),
        "dtype": stored_dtype(parts[side].dtype for parts in pairs.values() for side in ("A", "B")),  # not base layers
        "scaling": scalings,
        "peft_config": config,
        "folder": str(folder.resolve()),  # what save_adapter must never write into (see writing.source_folders)
        "format": "peft",
    }
    apply_recorded(metadata, {k: v for k, v in header.items() if k == PROVENANCE}, name)  # lora-lego's outputs
    modules = LazyModules(infos, read_module) if lazy else {module: read_module(module) for module in infos}
    return Adapter(modules, metadata, name=name)


def _open_weights(folder: Path, name: str) -> tuple[dict[str, Any], Callable[[Any], torch.Tensor], dict[str, str]]:
    """The weights file's entries by key (safetensors: header infos; .bin: the tensors), how to read one, and
    the safetensors header's string metadata."""
    for weights_name in WEIGHTS_NAMES:
        weights_path = folder / weights_name
        if not weights_path.is_file():
            continue
        if weights_name.endswith(".safetensors"):
            failure = f"adapter {name!r}: cannot read {weights_name}"
            infos, header = header_of(weights_path, failure)
            return infos, tensor_reader(weights_path, failure), dict(header)
        try:
            tensors = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises many types for damaged files
            raise AdapterFormatError(f"adapter {name!r}: cannot read {weights_name} ({_load_reason(error)})") from None
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise AdapterFormatError(f"adapter {name!r}: {weights_name} does not hold a dict of tensors")
        return tensors, lambda tensor: tensor.clone(), {}  # a copy: factors are scaled in place after reading
    raise AdapterFormatError(f"adapter {name!r}: no {' or '.join(WEIGHTS_NAMES)} in the folder")


def _load_reason(error: Exception) -> str:
    """Why torch.load refused a file, without torch's advice to retry with weights_only=False (which runs
    whatever code an untrusted pickle holds)."""
    text = str(error)
    if "weights_only" not in text:
        return " ".join(text.split())[:300]
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)
    detail = f": {found[1].strip().rstrip('.')}" if found else ""
    return (f"it holds pickled objects other than tensors{detail}; lora-lego loads tensors only and never runs "
            "a pickle's code (save the adapter as safetensors with a trusted tool)")


def _group_keys(tensors: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """Tensor keys -> {module: {"A"/"B": entry, "kind": ...}} (`peft_keys`); saved base-layer weights are skipped."""
    base_layers = [k for k in tensors if k.endswith(".base_layer.weight")]
    if base_layers and not any(peft_keys.DORA.search(k) or peft_keys.BIAS.search(k) for k in tensors):
        # PEFT's save_embedding_layers: copies of base weights, not part of the LoRA update
        warnings.warn(f"adapter {name!r}: ignoring {len(base_layers)} saved base-layer weight(s) "
                      f"(copies of the base model, not LoRA factors): {some(base_layers)}", LoraLegoWarning,
                      stacklevel=3)
    return peft_keys.group_keys(tensors, name, known=lambda key: peft_keys.is_key(key, alpha=False),
                                expected="LoRA factors", ignore=frozenset(base_layers))[0]


def write(adapter: Adapter, path: str | Path, *, dtype: str | torch.dtype | None = None,
          overwrite: bool = False) -> Path:
    """Write `adapter` as a PEFT LoRA folder, atomically (temporary folder, then rename).

    Config: r = the most common module rank, lora_alpha = r (scaling 1), rank_pattern / alpha_pattern
    for modules of other ranks, target_modules = exactly the written module paths. The provenance
    goes to the safetensors metadata ("lora_lego"). `dtype` defaults to the adapter's metadata
    dtype (the inputs'); an existing `path` is refused unless `overwrite`, and so is a `path` that
    equals, lies inside or contains a folder the adapter (or its merge inputs) was read from.
    """
    check_output_path(path, source_folders(adapter), overwrite=overwrite)  # never into (or over) an input
    target = output_dtype(adapter, dtype)
    config = peft_config(adapter)
    tensors: dict[str, torch.Tensor] = {}
    for module, factors in adapter.items():
        a_key, b_key = peft_keys.factor_keys(factors.kind)
        where = f"output {str(path)!r}, module {module!r}"
        tensors[f"{_PREFIX}{module}.{a_key}"] = cast_finite(factors.A.detach(), target, f"{where}: lora_A").contiguous()
        tensors[f"{_PREFIX}{module}.{b_key}"] = cast_finite(factors.B.detach(), target, f"{where}: lora_B").contiguous()
    metadata = {"format": "pt", **provenance_header(adapter, config_holds_the_rest=True)}
    with atomic_folder(path, overwrite=overwrite) as folder:
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(tensors, folder / WEIGHTS_NAMES[0], metadata=metadata)
        write_card(adapter.metadata, folder)
    return Path(path)


def peft_config(adapter: Adapter) -> dict[str, Any]:
    """The adapter_config.json that makes PEFT apply exactly delta = B @ A to every written module."""
    module_ranks = adapter.ranks
    ranks = list(module_ranks.values())
    if not ranks:
        raise AdapterFormatError(f"adapter {adapter.name!r}: nothing to save (no modules)")
    if min(ranks) < 1:
        empty = [m for m, rank in module_ranks.items() if rank < 1]
        raise AdapterFormatError(f"adapter {adapter.name!r}: modules of rank 0 cannot be saved ({some(empty)})")
    r = common_rank(ranks)
    pattern = {module: rank for module, rank in module_ranks.items() if rank != r}
    meta = adapter.metadata
    return {
        "peft_type": "LORA",
        "task_type": meta.get("task_type"),
        "base_model_name_or_path": meta.get("base_model_name_or_path"),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(adapter.modules),
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": bool(meta.get("fan_in_fan_out", False)),
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
