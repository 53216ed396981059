"""PEFT's adapter_config.json as lora-lego reads it: validation of what we support, and PEFT's rules
for rank_pattern / alpha_pattern matching and per-module scaling (alpha / r, or alpha / sqrt(r))."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import AdapterFormatError
from .patterns import PatternError, compile_key, matches

CONFIG_NAME = "adapter_config.json"


def read_config(folder: Path) -> dict[str, Any]:
    """The adapter_config.json of a LoRA folder, checked for what lora-lego supports."""
    name = str(folder)
    if not folder.exists():
        raise AdapterFormatError(f"adapter {name!r}: no such folder")
    if not folder.is_dir():
        raise AdapterFormatError(f"adapter {name!r}: not a folder (expected a PEFT adapter folder)")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFormatError(f"adapter {name!r}: no {CONFIG_NAME} in the folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:  # ValueError: bad UTF-8, bad JSON, a too-long integer
        raise AdapterFormatError(f"adapter {name!r}: {CONFIG_NAME} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"adapter {name!r}: {CONFIG_NAME} must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterFormatError(f"adapter {name!r}: peft_type is {peft_type!r}; only LoRA adapters are supported")
    if config.get("use_dora"):
        raise AdapterFormatError(f"adapter {name!r}: DoRA adapters (use_dora) are not supported")
    if config.get("lora_bias"):
        raise AdapterFormatError(f"adapter {name!r}: adapters with lora_bias are not supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key, 8)
        if not is_number(value):
            raise AdapterFormatError(f"adapter {name!r}: {key} in {CONFIG_NAME} must be a number; got {value!r}")
    for key in ("use_rslora", "fan_in_fan_out"):
        if config.get(key) not in (None, True, False):
            raise AdapterFormatError(
                f"adapter {name!r}: {key} in {CONFIG_NAME} must be true or false; got {config[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        check_patterns(config.get(key) or {}, key, f"adapter {name!r}", f" in {CONFIG_NAME}")
    return config


def check_patterns(patterns: Any, key: str, where: str, location: str = "") -> None:
    """rank_pattern / alpha_pattern: an object of regular expressions -> numbers (integers for ranks), each
    one that lora-lego can match in bounded time (see `patterns`).

    Errors read "<where>: <key><location> must be ..."; `location` names the file the key sits in."""
    if not isinstance(patterns, dict):
        raise AdapterFormatError(f"{where}: {key}{location} must be an object")
    for pattern, value in patterns.items():
        if not isinstance(pattern, str):  # JSON keys are strings; a Python caller's may not be
            raise AdapterFormatError(f"{where}: {key} key {pattern!r} must be a string")
        try:
            compile_key(pattern)
        except PatternError as error:
            raise AdapterFormatError(f"{where}: {key} key {_short(pattern)} {error}") from None
        if not is_number(value) or (key == "rank_pattern" and value != int(value)):
            expected = "an integer" if key == "rank_pattern" else "a number"
            raise AdapterFormatError(f"{where}: {key}[{pattern!r}] must be {expected}; got {value!r}")


def is_number(value: Any) -> bool:
    """A finite JSON number: not a bool, not NaN / Infinity, not an integer too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _short(pattern: str) -> str:
    return repr(pattern) if len(pattern) <= 80 else f"{pattern[:60]!r}... ({len(pattern)} characters)"


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any, where: str = "adapter") -> Any:
    """PEFT's rank_pattern / alpha_pattern rule: the first key k with re.match(rf"(.*\\.)?({k})$", module),
    matched in bounded time (`patterns.matches`); `where` starts an error's message."""
    for key, value in (patterns or {}).items():
        try:
            if matches(key, module):
                return value
        except PatternError as error:
            raise AdapterFormatError(f"{where}: pattern key {_short(key)} {error}") from None
    return default


def module_scaling(config: dict[str, Any], module: str, rank: int, name: str = "<adapter>") -> float:
    """PEFT's scaling of one module: alpha / r, or alpha / sqrt(r) with use_rslora."""
    where = f"adapter {name!r}, module {module[:80]!r}"
    expected = pattern_value(config.get("rank_pattern"), module, config.get("r", 8), where)
    if expected != rank:
        raise AdapterFormatError(
            f"adapter {name!r}, module {module!r}: tensors have rank {rank} but the config says r={expected}"
        )
    alpha = pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8), where)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
