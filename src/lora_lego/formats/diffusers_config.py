"""The `lora_adapter_metadata` header of diffusers single files: the LoraConfig of each pipeline
component, flattened as "<component>.<field>" by `save_lora_weights` (or unprefixed by a model's own
`save_lora_adapter`), read for per-module scaling and written so that diffusers applies delta = B @ A."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Mapping

from ..errors import AdapterFormatError
from .peft_config import check_patterns, is_number, pattern_value
from .ranks import common_rank

METADATA_KEY = "lora_adapter_metadata"
# pipeline attributes that hold a LoRA-able model; a file's module names start with one of them
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_FLAT_FIELDS = ("r", "lora_alpha", "peft_type", "target_modules")  # an unprefixed (single-model) config has these


def split_component(module: str) -> tuple[str | None, str]:
    """("unet", "down_blocks.0...") for "unet.down_blocks.0...", (None, module) without a component prefix."""
    first, _, rest = module.partition(".")
    return (first, rest) if first in COMPONENTS and rest else (None, module)


def read_configs(header: Mapping[str, str], name: str) -> dict[str | None, dict[str, Any]]:
    """Component -> its LoraConfig fields from the header (None: one unprefixed config), {} if absent.

    Raises AdapterFormatError for JSON that is not an object, a config that is not plain LoRA (DoRA,
    lora_bias, another peft_type) or one whose r / lora_alpha / patterns are not numbers.
    """
    raw = header.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (TypeError, ValueError, RecursionError) as error:
        raise AdapterFormatError(f"adapter {name!r}: header {METADATA_KEY} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"adapter {name!r}: header {METADATA_KEY} must hold a JSON object")
    if any(field in data for field in _FLAT_FIELDS):
        configs: dict[str | None, dict[str, Any]] = {None: data}
    else:
        configs = {}
        for key, value in data.items():
            component, _, field = key.rpartition(".")
            if not component:
                raise AdapterFormatError(f"adapter {name!r}: header {METADATA_KEY} key {key!r} is neither a LoraConfig "
                                         "field nor '<component>.<field>'")
            configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        _check_config(config, f"adapter {name!r}: header {METADATA_KEY}" + (f" of {component!r}" if component else ""))
    return configs


def _check_config(config: dict[str, Any], where: str) -> None:
    peft_type = config.get("peft_type") or "LORA"
    if str(peft_type).upper() != "LORA":
        raise AdapterFormatError(f"{where}: peft_type is {peft_type!r}; only LoRA adapters are supported")
    if config.get("use_dora"):
        raise AdapterFormatError(f"{where}: DoRA adapters (use_dora) are not supported")
    if config.get("lora_bias"):
        raise AdapterFormatError(f"{where}: adapters with lora_bias are not supported")
    for field in ("r", "lora_alpha"):
        if field in config and not is_number(config[field]):
            raise AdapterFormatError(f"{where}: {field} must be a number; got {config[field]!r}")
    if config.get("use_rslora") not in (None, True, False):
        raise AdapterFormatError(f"{where}: use_rslora must be true or false; got {config['use_rslora']!r}")
    for field in ("rank_pattern", "alpha_pattern"):
        check_patterns(config.get(field) or {}, field, where)


def config_scaling(config: dict[str, Any], relative: str, rank: int, where: str) -> float:
    """PEFT's scaling of one module under `config` (as diffusers builds LoraConfig(**config)): alpha / r,
    or alpha / sqrt(r) with use_rslora; `relative` is the module path inside its component. LoraConfig's
    defaults (r = lora_alpha = 8) apply to absent fields. Raises AdapterFormatError on a rank mismatch."""
    expected = pattern_value(config.get("rank_pattern"), relative, config.get("r", 8), where)
    if expected != rank:
        raise AdapterFormatError(f"{where}: tensors have rank {rank} but {METADATA_KEY} says r={expected}")
    alpha = pattern_value(config.get("alpha_pattern"), relative, config.get("lora_alpha", 8), where)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def component_config(ranks: Mapping[str, int]) -> dict[str, Any]:
    """The LoraConfig fields that make PEFT apply delta = B @ A to each module of one component.

    `ranks`: module path inside the component -> rank. r = the most common rank (ties: the larger),
    lora_alpha = r, and rank_pattern = alpha_pattern for the others. Names in target_modules and the
    pattern keys drop CLIP's "text_model." level: transformers loads a text encoder's LoRA by
    target_modules (suffix match), and transformers 5's CLIPTextModel has no such level while 4's
    has. Pattern keys are escaped regular expressions, which PEFT matches against any dotted suffix
    of a module path; a key that is a suffix of another module's path here (Flux's "proj_out" and
    "single_transformer_blocks.0.proj_out") is anchored with "^".
    """
    r = common_rank(ranks.values())
    short = {module: module.removeprefix("text_model.") for module in ranks}
    pattern = {}
    for module, rank in ranks.items():
        if rank != r:
            shadows = any(other != module and other.endswith("." + module) for other in ranks)
            pattern[("^" if shadows else "") + re.escape(short[module])] = rank
    return {"r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(set(short.values())), "use_rslora": False, "use_dora": False, "lora_bias": False}


def header_configs(ranks: Mapping[str, int], name: str) -> dict[str, Any]:
    """The flattened `lora_adapter_metadata` object for modules -> ranks: "<component>.<field>" for files of
    pipeline components (as save_lora_weights writes it), unprefixed fields for a bare model's modules.

    Raises AdapterFormatError when some modules have a component prefix and others do not.
    """
    by_component: dict[str | None, dict[str, int]] = {}
    for module, rank in ranks.items():
        component, relative = split_component(module)
        by_component.setdefault(component, {})[relative] = rank
    if None in by_component and len(by_component) > 1:
        bare = next(iter(by_component[None]))
        prefixed = next(f"{c}.{m}" for c, mods in by_component.items() if c is not None for m in mods)
        raise AdapterFormatError(f"adapter {name!r}: modules mix diffusers component prefixes "
                                 f"({', '.join(COMPONENTS)}) and bare names (e.g. {prefixed!r} and {bare!r}); "
                                 "a diffusers file holds one or the other")
    if None in by_component:
        return component_config(by_component[None])
    return {f"{component}.{field}": value for component in sorted(by_component)  # type: ignore[type-var]
            for field, value in component_config(by_component[component]).items()}
