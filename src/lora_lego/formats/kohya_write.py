"""Writing a kohya file: its tensors (lora_down / lora_up / alpha per module), its header (sd-scripts' ss_* keys
and the SAI model spec, kept where they still hold, recomputed where they do not) and the file itself,
streamed with sd-scripts' sshs hashes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from ..errors import AdapterFormatError
from ..tensorfile import header_bytes
from ..types import Adapter, kernel_size
from . import updown
from .family import BASE_MODEL_VERSIONS
from .files import provenance_header, write_file
from .ranks import common_rank

Entry = updown.Entry

# recomputed for every file we write
NETWORK_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")
# hashes of the input's bytes: stale in any file we write (sshs_* are recomputed, see `write_hashed`)
STALE_KEYS = ("modelspec.hash_sha256",)
# What still holds for a merge of several inputs, when all agree: the base model and how to prompt it. The
# rest (learning rates, optimiser, steps, epochs, seed, datasets and tag counts, dates, output name,
# comment, session id) records one training run, and no training run made the merged file.
SHARED_KEYS = frozenset({
    "ss_v2", "ss_base_model_version", "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash",
    "ss_vae_name", "ss_vae_hash", "ss_new_vae_hash", "ss_clip_skip", "ss_resolution", "ss_max_token_length",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
    "modelspec.implementation_version", "modelspec.resolution", "modelspec.prediction_type",
    "modelspec.timestep_range", "modelspec.encoder_layer", "modelspec.preprocessor", "modelspec.license",
    "modelspec.usage_hint", "modelspec.trigger_phrase", "modelspec.tags",
})
LEGACY_WINDOW = (0x100000, 0x110000)  # the bytes sd-webui-additional-networks' legacy hash reads
LORA_NAME = re.compile(r"^lora_[A-Za-z0-9]+_[A-Za-z0-9_]+$")


def file_entries(adapter: Adapter, target: torch.dtype) -> list[Entry]:
    """The file's (key, dtype, shape) sorted by key (`updown.entries`). Raises AdapterFormatError for a name that is
    not a lora_name, an embedding or a rank-0 module."""
    for module in adapter:
        if not LORA_NAME.match(module):
            raise AdapterFormatError(f"adapter {adapter.name!r}, module {module!r}: not a kohya lora_name; "
                                     "expected 'lora_<component>_<path with _>' (formats.convert_adapter "
                                     "translates dotted names)")
    return updown.entries(adapter, target, "kohya files")


def file_alpha(ranks: Mapping[str, int]) -> int:
    """The one alpha every module of the file gets: the most common rank (`ranks.common_rank`).

    One alpha for all modules, not alpha = r per module: diffusers' kohya loader turns per-module alphas into
    PEFT alpha_pattern keys that miss its attention modules, which then get the most common alpha instead
    (measured: a rank-2 to_k at half strength in a mixed-rank file). A module of another rank carries
    r / alpha in B, so every reader's alpha / r * up @ down is still the delta.
    """
    return common_rank(ranks.values())


def output_metadata(adapter: Adapter, path: Path, ranks: Mapping[str, int], kinds: Mapping[str, str]) -> dict[str, str]:
    """The header of the file we write for `adapter` (module -> rank and kind as written), without sshs_* hashes.

    Inputs' headers: adapter.metadata["header"] (read or converted) or ["source_headers"] (merged, one per
    input). One input: its ss_* / modelspec.* keys are kept (a conversion or a resize of that training run, as
    sd-scripts' resize_lora.py keeps them); several: only `SHARED_KEYS` on which all agree, plus
    modelspec.merged_from and a title (the output's name, as sd-scripts' merge scripts).
    """
    meta = adapter.metadata
    sources = list(meta["source_headers"]) if "source_headers" in meta else [meta.get("header") or {}]
    merged = len(sources) > 1
    first = sources[0] if sources else {}
    header = {key: str(value) for key, value in first.items()
              if key.startswith(("ss_", "modelspec.")) and key not in NETWORK_KEYS and key not in STALE_KEYS
              and (not merged or key in SHARED_KEYS) and all(s.get(key) == value for s in sources[1:])}
    version = BASE_MODEL_VERSIONS.get(meta.get("family") or "")
    if version is not None and "ss_base_model_version" not in header:
        header["ss_base_model_version"] = version[0]
        header.setdefault("ss_v2", version[1])
    header.update(network_metadata(ranks, kinds, meta.get("family")))
    if merged:
        header["modelspec.merged_from"] = ", ".join(_titles(sources, meta.get("provenance", {}).get("sources", [])))
        header["modelspec.title"] = path.stem
    header.update(provenance_header(adapter))
    return header


def _titles(headers: Sequence[Mapping[str, str]], names: Sequence[str]) -> list[str]:
    """Each input's modelspec.title, else its file name without extension (sd-scripts' build_merged_from)."""
    titles = []
    for i, header in enumerate(headers):
        title = header.get("modelspec.title")
        titles.append(str(title) if title else Path(names[i]).stem if i < len(names) else f"input {i + 1}")
    return titles


def network_metadata(ranks: Mapping[str, int], kinds: Mapping[str, str], family: str | None) -> dict[str, str]:
    """ss_network_module / _dim / _alpha / _args of a plain kohya LoRA with one alpha (`file_alpha`).

    As sd-scripts (networks/lora.py): dim and alpha describe the linear and 1x1-convolution modules (all modules
    when there are none), "Dynamic" when their ranks differ; conv_dim / conv_alpha in ss_network_args describe
    the larger kernels. Training-time arguments (dropouts, LyCORIS' algo, preset, factor...) do not describe
    the file we write.
    """
    def value(values: set[int]) -> str:
        return str(next(iter(values))) if len(values) == 1 else "Dynamic"

    conv = {ranks[m] for m in ranks if kernel_size(kinds[m]) not in (None, (1, 1))}
    linear = {ranks[m] for m in ranks if kernel_size(kinds[m]) in (None, (1, 1))} or conv
    alpha = str(file_alpha(ranks))
    metadata = {"ss_network_module": "networks.lora_flux" if family == "flux" else "networks.lora",
                "ss_network_dim": value(linear), "ss_network_alpha": alpha}
    if conv:
        metadata["ss_network_args"] = json.dumps({"conv_dim": value(conv), "conv_alpha": alpha})
    return metadata


class SshsHasher:
    """sd-scripts' `precalculate_safetensors_hashes`, streamed: fed the header, then the data bytes in order.

    sshs_model_hash = sha256 (hex) of the bytes after the header (`addnet_hash_safetensors`);
    sshs_legacy_hash = the first 8 hex digits of the sha256 of bytes 0x100000 .. 0x110000 of the whole
    serialisation (`addnet_hash_legacy`; of no bytes for a smaller file).
    """

    def __init__(self, header: bytes):
        self._model, self._legacy, self._position = hashlib.sha256(), hashlib.sha256(), 0
        self._window(memoryview(header))

    def update(self, data: memoryview) -> None:
        self._model.update(data)
        self._window(data)

    def _window(self, data: memoryview) -> None:
        start, end = self._position, self._position + data.nbytes
        low, high = max(start, LEGACY_WINDOW[0]), min(end, LEGACY_WINDOW[1])
        if low < high:
            self._legacy.update(data[low - start:high - start])
        self._position = end

    def placeholder(self) -> dict[str, str]:
        return {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}

    def hashes(self) -> dict[str, str]:
        return {"sshs_model_hash": self._model.hexdigest(), "sshs_legacy_hash": self._legacy.hexdigest()[:8]}


def write_hashed(adapter: Adapter, path: Path, entries: Sequence[Entry], produce: Callable[[str], torch.Tensor],
                 metadata: Mapping[str, str], *, overwrite: bool = False) -> Path:
    """Write a safetensors file atomically, tensors made one at a time by `produce(key)` in `entries` order, with
    sshs_model_hash / sshs_legacy_hash over its re-serialisation with only the ss_* metadata (as sd-scripts).

    One pass (`files.write_file` with this hasher): the header is written with placeholder hashes of the final
    length, then rewritten in place before the file is renamed into place. Refuses (OutputError) a folder, an
    input, or an existing path unless `overwrite`.
    """
    shapes = {key: (dtype, tuple(shape)) for key, dtype, shape in entries}
    hasher = SshsHasher(header_bytes(shapes, {k: v for k, v in metadata.items() if k.startswith("ss_")}, library=True))
    tensors = {key: (lambda key=key: produce(key)) for key in shapes}
    return write_file(adapter, path, tensors, metadata, shapes=shapes, overwrite=overwrite, library=True, hasher=hasher)
