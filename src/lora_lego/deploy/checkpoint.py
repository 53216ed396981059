"""A transformers safetensors checkpoint on disk: its config and shard headers read without the
weights, and the files around the shards (config, index, tokenizer) written for a new folder."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BaseModelError, OutputError, some
from ..hub import resolve
from ..tensorfile import TensorFileError, TensorInfo, read_header

if TYPE_CHECKING:
    import torch

CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz")


@dataclass(frozen=True)
class Checkpoint:
    """A base folder's config and the header of each shard (file name -> key -> info); index None for one file."""

    folder: Path
    config: dict
    shards: dict[str, dict[str, TensorInfo]]
    metadata: dict[str, dict[str, str]]  # shard file name -> its header's string metadata
    index: dict | None = None
    where: dict[str, str] = field(default_factory=dict)  # key -> shard file name

    def info(self, key: str) -> TensorInfo:
        return self.shards[self.where[key]][key]


def read_checkpoint(base: str | Path) -> Checkpoint:
    """The config and shard headers of a transformers folder; refuses one with only pickled (.bin) weights."""
    folder = resolve(base, kind="model", error=BaseModelError).path  # a local folder, or a Hub id
    if not (folder / CONFIG).is_file():
        raise BaseModelError(f"base {str(base)!r}: no {CONFIG} (expected a transformers model folder)")
    config = _read_json(folder / CONFIG, base)
    if (folder / INDEX).is_file():
        index = _read_json(folder / INDEX, base)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise BaseModelError(f"base {str(base)!r}: {INDEX} has no weight_map")
        names = sorted(set(map(str, weight_map.values())))
    elif (folder / WEIGHTS).is_file():
        index, weight_map, names = None, {}, [WEIGHTS]
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        found = f"only pickled weights ({some(pickled)}), which lora-lego does not read" if pickled else "no weights"
        raise BaseModelError(f"base {str(base)!r} has {found}; expected {WEIGHTS} or {INDEX} with safetensors shards "
                             "(re-save it with transformers' save_pretrained)")
    headers = {name: _read_shard(folder, name, base) for name in names}
    shards = {name: infos for name, (infos, _) in headers.items()}
    for key, name in weight_map.items():
        if key not in shards[name]:
            raise BaseModelError(f"base {str(base)!r}: {INDEX} puts {key!r} in {name}, whose header lacks it")
    where: dict[str, str] = {}
    for name, infos in shards.items():
        for key in infos:
            if where.setdefault(key, name) != name:
                raise BaseModelError(f"base {str(base)!r}: tensor {key!r} is in both {where[key]} and {name}")
    return Checkpoint(folder, config, shards, {name: meta for name, (_, meta) in headers.items()}, index, where)


def _read_json(path: Path, base: str | Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BaseModelError(f"base {str(base)!r}: cannot read {path.name} ({error})") from None
    if not isinstance(data, dict):
        raise BaseModelError(f"base {str(base)!r}: {path.name} is not a JSON object")
    return data


def _read_shard(folder: Path, name: str, base: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    if Path(name).name != name or not name.endswith(".safetensors") or not (folder / name).is_file():
        raise BaseModelError(
            f"base {str(base)!r}: shard {name!r} named in {INDEX} is missing or not a .safetensors file")
    try:
        return read_header(folder / name)
    except (OSError, TensorFileError) as error:
        raise BaseModelError(f"base {str(base)!r}: cannot read {name} ({error})") from None


def check_space(output: str | Path, nbytes: int) -> None:
    """Refuse to start when the output's file system has less free space than the shards need."""
    existing = Path(output).resolve().parent
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < nbytes:
        raise OutputError(f"output {str(output)!r}: the shards need {nbytes / 2**30:.2f} GiB, but {str(existing)!r} "
                          f"has {free / 2**30:.2f} GiB free")


def copy_other_files(checkpoint: Checkpoint, folder: Path) -> list[str]:
    """Copy every file except the shards, the index and other weight files (those are returned);
    hidden entries (.git, .cache) are left out."""
    skipped = []
    for path in sorted(checkpoint.folder.rglob("*")):
        relative = path.relative_to(checkpoint.folder)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if str(relative) in checkpoint.shards or str(relative) in (INDEX, CONFIG):
            continue
        if path.name.endswith(WEIGHT_SUFFIXES):
            skipped.append(str(relative))
            continue
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / relative)
    return skipped


def write_config(checkpoint: Checkpoint, untied: bool, folder: Path, dtype: torch.dtype | None = None) -> None:
    """config.json unchanged, or with tie_word_embeddings false (top level and text_config) when `untied`,
    and with "torch_dtype" / "dtype" naming `dtype` when the weights are written in it (so that
    `from_pretrained(dtype="auto")` loads what was written)."""
    if not untied and dtype is None:
        shutil.copyfile(checkpoint.folder / CONFIG, folder / CONFIG)
        return
    config = json.loads(json.dumps(checkpoint.config))
    if untied:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        for key in [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]:
            config[key] = name
        text = config.get("text_config")
        for key in [k for k in ("torch_dtype", "dtype") if isinstance(text, dict) and k in text]:
            text[key] = name
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def write_index(checkpoint: Checkpoint, added: dict[str, str], entries: dict, folder: Path) -> None:
    """The index with total_size of the written shards (`entries`: shard -> key -> (dtype, shape)) and
    the `added` keys (key -> shard) in its weight_map."""
    if checkpoint.index is None:
        return
    index = json.loads(json.dumps(checkpoint.index))
    index.setdefault("metadata", {})["total_size"] = sum(
        math.prod(shape) * dtype.itemsize for shard in entries.values() for dtype, shape in shard.values())
    for key, shard in added.items():
        index["weight_map"][key] = shard
        if "total_parameters" in index["metadata"]:
            index["metadata"]["total_parameters"] += math.prod(entries[shard][key][1])
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
