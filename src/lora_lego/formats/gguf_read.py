"""Reading llama.cpp GGUF LoRA adapters (f32 / f16 / bf16) back to module paths with the scale folded
in, undoing the q/k row order of `gguf.py`'s writer (and of llama.cpp's converter)."""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import AdapterFormatError, IncompatibleAdaptersError, some
from ..lowrank import scale_factors
from ..types import Adapter, LazyModules, LoraFactors, ModuleInfo, check_factor_values
from .gguf import (
    CONFIG_KEY,
    HF_MODULES,
    PERMUTED,
    PROVENANCE_KEY,
    architecture,
    base_config,
    gguf_module,
    permute_rows,
    permuted_heads,
    tensor_name_map,
)
from .record import BASE_MODEL, TASK_TYPE, apply_recorded

_FLOAT_TYPES = ("F32", "F16", "BF16")
# the header values `read` uses
_FIELDS = ("general.type", "adapter.type", "general.architecture", "adapter.lora.alpha", CONFIG_KEY, PROVENANCE_KEY,
           BASE_MODEL, TASK_TYPE)
# the smallest entries a GGUF header can hold: a tensor info (name length, n_dims, type, offset) and a
# key-value (key length, value type, a one-byte value); counts that cannot fit in the file are refused
_MIN_TENSOR_INFO, _MIN_KV = 8 + 4 + 4 + 8, 8 + 4 + 1
# what the gguf package's reader raises on a damaged file, besides a clean ValueError
_READER_ERRORS = (OSError, ValueError, IndexError, KeyError, TypeError, OverflowError, MemoryError, struct.error,
                  AttributeError)


def read(path: Path, *, lazy: bool = False, expand: bool = False, expand_rank: int | None = None,
         base_config_path: str | Path | None = None) -> Adapter:
    """Read a llama.cpp LoRA adapter (f32 / f16 / bf16) back to module paths with the scale folded in.

    The q/k permutation is undone with the head counts our writer records, else those of
    `base_config_path` (needed for other producers' files of permuted architectures). Raises
    AdapterFormatError for a file that is not a LoRA adapter, quantized tensors, full (non-LoRA)
    tensors, an unsupported architecture or an unknown tensor name.
    """
    name = str(path)
    reader, fields = _open(path, name)
    alpha, arch = _check_header(fields, name)
    pairs = _read_pairs(reader, name)
    shape = _file_shape(fields[CONFIG_KEY], base_config_path, arch, pairs, name)
    paths = _module_paths(pairs, arch, shape["layers"], name)
    infos = {paths[base]: _module_info(base, a, b, name) for base, (a, b) in pairs.items()}
    parts = {paths[base]: (base, a, b) for base, (a, b) in pairs.items()}

    def read_module(module: str) -> LoraFactors:
        base, a, b = parts[module]
        return _factors(base, a, b, infos[module].kind, permuted_heads(base, arch, shape), alpha,
                        f"adapter {name!r}, module {module!r}")

    metadata = _metadata(path, fields, pairs, arch, alpha, name)
    modules = LazyModules(infos, read_module) if lazy else {module: read_module(module) for module in infos}
    return Adapter(modules, metadata, name=name)


def _open(path: Path, name: str) -> tuple[Any, dict[str, Any]]:
    """The gguf package's reader of a file whose header counts fit it, and the header values `read` uses."""
    gguf = gguf_module()
    check_counts(path, name)
    try:
        reader = gguf.GGUFReader(path)
        fields = {key: _field(reader, key) for key in _FIELDS}
    except _READER_ERRORS as error:
        raise AdapterFormatError(f"adapter {name!r}: not a readable GGUF file ({type(error).__name__}: "
                                 f"{str(error)[:200]})") from None
    return reader, fields


def _check_header(fields: dict[str, Any], name: str) -> tuple[float, str]:
    """(alpha, llama.cpp architecture) of a LoRA adapter's header; refuses other GGUF files and architectures."""
    alpha = check_fields(fields, name)
    if fields["general.type"] != "adapter" or fields["adapter.type"] != "lora":
        raise AdapterFormatError(f"adapter {name!r}: a GGUF file with general.type {fields['general.type']!r} and "
                                 f"adapter.type {fields['adapter.type']!r}; expected a LoRA adapter (adapter / lora)")
    arch = fields["general.architecture"]
    if arch not in PERMUTED:
        raise AdapterFormatError(f"adapter {name!r}: GGUF architecture {arch!r} is not supported; "
                                 f"supported: {', '.join(sorted(PERMUTED))}")
    return alpha, arch


def _read_pairs(reader, name: str) -> dict[str, tuple[Any, Any]]:
    """`_pairs`, with what the gguf package raises on damaged tensor infos reported as damage; `_pairs`' own
    refusals (a quantized tensor, a lone lora_a, ...) are already in the user's words and pass unchanged."""
    try:
        return _pairs(reader, name)
    except AdapterFormatError:
        raise
    except _READER_ERRORS as error:
        raise AdapterFormatError(f"adapter {name!r}: damaged GGUF tensor infos ({type(error).__name__}: "
                                 f"{str(error)[:200]})") from None


def _module_paths(pairs: dict[str, tuple[Any, Any]], arch: str, layers: int, name: str) -> dict[str, str]:
    """GGUF base name -> module path for every pair; refuses a name no known module has."""
    inverse = _inverse_names(arch, layers)
    unknown = [base for base in pairs if base not in inverse]
    if unknown:
        raise AdapterFormatError(f"adapter {name!r}: GGUF tensor(s) {some(unknown)} name no module lora-lego knows "
                                 f"for {arch} (attention, MLP, token_embd, output)")
    return {base: inverse[base] for base in pairs}


def _module_info(base: str, a, b, name: str) -> ModuleInfo:
    """The module's (d_out, d_in), rank and kind from its tensors' shapes: lora_a (r, d_in), or (d_in, r) for
    token_embd, and lora_b (d_out, r)."""
    embedding = base == "token_embd"
    rank = int(_shape(b)[1])
    d_in = int(_shape(a)[0 if embedding else 1])
    if int(_shape(a)[1 if embedding else 0]) != rank:
        raise AdapterFormatError(f"adapter {name!r}, tensor {base!r}: lora_a {_shape(a)} and lora_b {_shape(b)} "
                                 f"do not share a rank")
    return ModuleInfo((int(_shape(b)[0]), d_in), rank, "embedding" if embedding else "linear")


def _factors(base: str, a, b, kind: str, heads: int | None, alpha: float, where: str) -> LoraFactors:
    """One module's factors as lora-lego holds them: A (r, d_in) (token_embd's transposed back), B (d_out, r)
    with its q/k rows in transformers' order, and llama.cpp's scale alpha / r (1 for alpha 0) folded in."""
    A, B = _tensor(a), _tensor(b)
    if base == "token_embd":
        A = A.T.contiguous()
    if heads is not None:
        B = permute_rows(B, heads, inverse=True)
    factors = scale_factors(LoraFactors(A, B, kind), alpha / A.shape[0] if alpha else 1.0, in_place=True)
    check_factor_values(factors, where)
    return factors


def _metadata(path: Path, fields: dict[str, Any], pairs: dict[str, tuple[Any, Any]], arch: str, alpha: float,
              name: str) -> dict[str, Any]:
    """The adapter's metadata: the stored dtype (the most common), architecture, alpha and recorded base config."""
    dtypes = Counter(t.tensor_type.name for pair in pairs.values() for t in pair)
    metadata = {"format": "gguf", "base_model_name_or_path": None, "folder": str(path.resolve()),
                "dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtypes.most_common(1)[0][0]],
                "gguf_architecture": arch, "gguf_alpha": alpha}
    if fields[CONFIG_KEY]:
        metadata["gguf_base_config"] = json.loads(fields[CONFIG_KEY])
    metadata["task_type"] = None
    apply_recorded(metadata, fields, name, PROVENANCE_KEY)  # what our writer records: provenance, base model, task
    return metadata


def check_architectures(adapters: Sequence[Adapter]) -> None:
    """Refuse GGUF adapters of different llama.cpp architectures: a format hook."""
    archs = {a.metadata.get("gguf_architecture") for a in adapters} - {None}
    if len(archs) > 1:
        shown = ", ".join(f"{a.name!r}: {a.metadata['gguf_architecture']}" for a in adapters
                          if a.metadata.get("gguf_architecture"))
        raise IncompatibleAdaptersError(f"GGUF adapters are for different architectures ({shown}); merge adapters "
                                        "of one base model")


def carry_base_config(adapters: Sequence[Adapter]) -> dict[str, Any]:
    """The first recorded base config, which the GGUF writer needs (architecture, head counts): a format hook."""
    return {"gguf_base_config": next((a.metadata["gguf_base_config"] for a in adapters
                                      if a.metadata.get("gguf_base_config") is not None), None)}


def check_counts(path: Path, name: str) -> None:
    """Refuse a GGUF header whose tensor or key-value counts could not fit in the file (before the reader
    loops over them): `adapter 'x': the GGUF header claims 2**60 tensors ...`."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(24)
            size = stream.seek(0, 2)
    except OSError as error:
        raise AdapterFormatError(f"adapter {name!r}: cannot read the GGUF file ({error.strerror or error})") from None
    if len(head) < 24 or head[:4] != b"GGUF":
        raise AdapterFormatError(f"adapter {name!r}: not a GGUF file (no GGUF magic and 24-byte header)")
    order = "<" if int.from_bytes(head[4:8], "little") & 0xFFFF else ">"  # as gguf's reader: a swapped file
    tensors, kvs = struct.unpack(order + "QQ", head[8:24])
    if tensors * _MIN_TENSOR_INFO + kvs * _MIN_KV > size - 24:
        raise AdapterFormatError(f"adapter {name!r}: the GGUF header claims {tensors} tensors and {kvs} key-values, "
                                 f"more than a file of {size} bytes can hold")


def check_fields(fields: dict[str, Any], name: str) -> float:
    """Check the header values read before use (their types, a finite alpha >= 0); returns alpha."""
    for key in ("general.type", "adapter.type", "general.architecture", CONFIG_KEY):
        if fields[key] is not None and not isinstance(fields[key], str):
            raise AdapterFormatError(f"adapter {name!r}: GGUF key {key} must be a string; got {_brief(fields[key])}")
    alpha = fields["adapter.lora.alpha"]
    if alpha is None:
        alpha = 0.0
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise AdapterFormatError(f"adapter {name!r}: GGUF key adapter.lora.alpha must be a finite number >= 0; "
                                 f"got {_brief(alpha)}")
    if fields[CONFIG_KEY] is not None:
        try:
            config = json.loads(fields[CONFIG_KEY])
        except (ValueError, RecursionError) as error:
            raise AdapterFormatError(f"adapter {name!r}: GGUF key {CONFIG_KEY} is not valid JSON ({error})") from None
        if not isinstance(config, dict):
            raise AdapterFormatError(f"adapter {name!r}: GGUF key {CONFIG_KEY} must hold a JSON object")
    return float(alpha)


def _brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _shape(tensor) -> tuple[int, ...]:
    """The torch shape (reversed GGUF ne) of a reader tensor."""
    return tuple(int(n) for n in reversed(tensor.shape))


def _tensor(tensor) -> torch.Tensor:
    import numpy as np

    data = np.asarray(tensor.data)
    if tensor.tensor_type.name == "BF16":
        out = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16)
    else:
        out = torch.from_numpy(data.copy())
    return out.reshape(_shape(tensor)).float()


def _pairs(reader, name: str) -> dict[str, tuple[Any, Any]]:
    """GGUF base name (e.g. "blk.0.attn_q") -> (lora_a, lora_b) reader tensors."""
    found: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        base, _, side = tensor.name.rpartition(".weight.lora_")
        if side not in ("a", "b"):
            raise AdapterFormatError(f"adapter {name!r}: GGUF tensor {tensor.name!r} is not a lora_a / lora_b "
                                     f"tensor (full tensors, e.g. mergekit's norms, cannot be merged as LoRA)")
        if tensor.tensor_type.name not in _FLOAT_TYPES:
            raise AdapterFormatError(f"adapter {name!r}: GGUF tensor {tensor.name!r} is quantized "
                                     f"({tensor.tensor_type.name}); lora-lego reads f32, f16 and bf16 adapters "
                                     f"(convert_lora_to_gguf.py --outtype f16)")
        found.setdefault(base, {})[side] = tensor
    broken = [base for base, sides in found.items() if len(sides) != 2]
    if broken:
        raise AdapterFormatError(f"adapter {name!r}: {some(broken)} lack lora_a or lora_b")
    if not found:
        raise AdapterFormatError(f"adapter {name!r}: the GGUF file holds no LoRA tensors")
    return {base: (sides["a"], sides["b"]) for base, sides in found.items()}


def _file_shape(recorded: str | None, base: str | Path | None, arch: str, pairs: dict, name: str) -> dict[str, int]:
    """Layer and head counts: recorded by our writer, else from the base config, else (for architectures
    whose q/k rows are not permuted) layers from the tensor names alone."""
    if recorded:
        return architecture(json.loads(recorded), f"adapter {name!r}")[1]
    if base is not None:
        file_arch, shape = architecture(base_config(None, base, f"adapter {name!r}"), f"adapter {name!r}")
        if file_arch != arch:
            raise AdapterFormatError(
                f"adapter {name!r}: the GGUF file is for {arch!r}, the base config for {file_arch!r}")
        return shape
    touched = any(base.endswith((".attn_q", ".attn_k")) for base in pairs)
    if PERMUTED[arch] and touched:
        raise AdapterFormatError(f"adapter {name!r}: a {arch} GGUF adapter stores attn_q / attn_k rows permuted per "
                                 f"head; pass --base-config DIR (base_config=...) with the base model's config.json "
                                 f"to read it")
    blocks = [int(base.split(".")[1]) for base in pairs if base.startswith("blk.")]
    return {"layers": max(blocks, default=-1) + 1, "heads": 0, "kv_heads": 0}


def _inverse_names(arch: str, layers: int) -> dict[str, str]:
    name_map = tensor_name_map(arch, layers)
    modules = [t.format(i=i) for t in HF_MODULES for i in (range(layers) if "{i}" in t else [0])]
    return {name_map.get_name(module): module for module in modules if name_map.get_name(module)}
