"""What every writer records beside the tensors, and every reader gives back: lora-lego's provenance (how the
adapter was made) and the adapter's base model and task type, which only a PEFT config holds natively (so a
PEFT -> GGUF / diffusers -> PEFT round trip keeps them). Safetensors headers and GGUF key-values hold strings."""

from __future__ import annotations

import json
import warnings
from typing import Any, Mapping

from ..errors import LoraLegoWarning

PROVENANCE = "lora_lego"  # safetensors header key (GGUF: lora_lego.provenance)
BASE_MODEL = "lora_lego.base_model_name_or_path"
TASK_TYPE = "lora_lego.task_type"


def record(metadata: Mapping[str, Any], provenance_key: str = PROVENANCE) -> dict[str, str]:
    """The string entries an output records for an adapter with this metadata (only those it has)."""
    entries = {}
    if metadata.get("provenance"):
        entries[provenance_key] = json.dumps(metadata["provenance"], sort_keys=True, default=str)
    for key, field in ((BASE_MODEL, "base_model_name_or_path"), (TASK_TYPE, "task_type")):
        if metadata.get(field) is not None:
            entries[key] = str(metadata[field])
    return entries


def recorded(values: Mapping[str, Any], name: str, provenance_key: str = PROVENANCE) -> dict[str, Any]:
    """What a file's header (or GGUF key-values) records: {"provenance", "base_model_name_or_path",
    "task_type"}, each only when present and readable. A damaged provenance is left out with a warning:
    it describes the adapter, it is not needed to read it."""
    found: dict[str, Any] = {}
    raw = values.get(provenance_key)
    if isinstance(raw, str):
        try:
            provenance = json.loads(raw)
        except (ValueError, RecursionError):
            provenance = None
        if isinstance(provenance, dict):
            found["provenance"] = provenance
        else:
            warnings.warn(f"adapter {name!r}: its recorded lora-lego provenance ({provenance_key}) is not a JSON "
                          "object; ignored", LoraLegoWarning, stacklevel=3)
    for key, field in ((BASE_MODEL, "base_model_name_or_path"), (TASK_TYPE, "task_type")):
        if isinstance(values.get(key), str) and values[key]:
            found[field] = values[key]
    return found


def apply_recorded(metadata: dict[str, Any], values: Mapping[str, Any], name: str,
                   provenance_key: str = PROVENANCE) -> dict[str, Any]:
    """`metadata` with what the file records filled in where the format itself left a field empty."""
    for field, value in recorded(values, name, provenance_key).items():
        if metadata.get(field) is None:
            metadata[field] = value
    return metadata
