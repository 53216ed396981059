"""Reading llama.cpp GGUF LoRA adapters (f32 / f16 / bf16) back to module paths with the scale folded
in, undoing the q/k row order of `gguf.py`'s writer (and of llama.cpp's converter)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFormatError
from ..types import Adapter, LazyModules, LoraFactors, ModuleInfo, check_factor_values
from .files import some
from .gguf import (CONFIG_KEY, HF_MODULES, PERMUTED, _name_map, _permuted_heads, architecture, base_config,
                   gguf_module, permute_rows)

_FLOAT_TYPES = ("F32", "F16", "BF16")


def read(path: Path, *, lazy: bool = False, expand: bool = False, expand_rank: int | None = None,
         base_config_path: str | Path | None = None) -> Adapter:
    """Read a llama.cpp LoRA adapter (f32 / f16 / bf16) back to module paths with the scale folded in.

    The q/k permutation is undone with the head counts our writer records, else those of
    `base_config_path` (needed for other producers' files of permuted architectures). Raises
    AdapterFormatError for a file that is not a LoRA adapter, quantized tensors, full (non-LoRA)
    tensors, an unsupported architecture or an unknown tensor name.
    """
    name = str(path)
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as error:
        raise AdapterFormatError(f"adapter {name!r}: not a readable GGUF file ({error})") from None
    fields = {key: _field(reader, key) for key in ("general.type", "adapter.type", "general.architecture",
                                                    "adapter.lora.alpha", CONFIG_KEY)}
    if fields["general.type"] != "adapter" or fields["adapter.type"] != "lora":
        raise AdapterFormatError(f"adapter {name!r}: a GGUF file with general.type {fields['general.type']!r} and "
                                 f"adapter.type {fields['adapter.type']!r}; expected a LoRA adapter (adapter / lora)")
    arch = fields["general.architecture"]
    if arch not in PERMUTED:
        raise AdapterFormatError(f"adapter {name!r}: GGUF architecture {arch!r} is not supported; "
                                 f"supported: {', '.join(sorted(PERMUTED))}")
    pairs = _pairs(reader, name)
    shape = _file_shape(fields[CONFIG_KEY], base_config_path, arch, pairs, name)
    inverse = _inverse_names(arch, shape["layers"])
    unknown = [base for base in pairs if base not in inverse]
    if unknown:
        raise AdapterFormatError(f"adapter {name!r}: GGUF tensor(s) {some(unknown)} name no module lora-lego knows "
                                 f"for {arch} (attention, MLP, token_embd, output)")
    alpha = float(fields["adapter.lora.alpha"] or 0.0)
    infos, parts = {}, {}
    for base, (a, b) in pairs.items():
        module, embedding = inverse[base], base == "token_embd"
        rank = int(_shape(b)[1])
        d_in = int(_shape(a)[0 if embedding else 1])
        if int(_shape(a)[1 if embedding else 0]) != rank:
            raise AdapterFormatError(f"adapter {name!r}, tensor {base!r}: lora_a {_shape(a)} and lora_b {_shape(b)} "
                                     f"do not share a rank")
        infos[module] = ModuleInfo((int(_shape(b)[0]), d_in), rank, "embedding" if embedding else "linear")
        parts[module] = (base, a, b)

    def read_module(module: str) -> LoraFactors:
        base, a, b = parts[module]
        A, B = _tensor(a), _tensor(b)
        if base == "token_embd":
            A = A.T.contiguous()
        heads = _permuted_heads(base, arch, shape)
        if heads is not None:
            B = permute_rows(B, heads, inverse=True)
        scale = (alpha / A.shape[0] if alpha else 1.0) ** 0.5
        factors = LoraFactors(A * scale, B * scale, infos[module].kind)
        check_factor_values(factors, f"adapter {name!r}, module {module!r}")
        return factors

    dtypes = Counter(t.tensor_type.name for pair in pairs.values() for t in pair)
    metadata = {"format": "gguf", "base_model_name_or_path": None, "folder": str(path.resolve()),
                "dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtypes.most_common(1)[0][0]],
                "gguf_architecture": arch, "gguf_alpha": alpha}
    if fields[CONFIG_KEY]:
        metadata["gguf_base_config"] = json.loads(fields[CONFIG_KEY])
    modules = LazyModules(infos, read_module) if lazy else {module: read_module(module) for module in infos}
    return Adapter(modules, metadata, name=name)


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
            raise AdapterFormatError(f"adapter {name!r}: the GGUF file is for {arch!r}, the base config for {file_arch!r}")
        return shape
    touched = any(base.endswith((".attn_q", ".attn_k")) for base in pairs)
    if PERMUTED[arch] and touched:
        raise AdapterFormatError(f"adapter {name!r}: a {arch} GGUF adapter stores attn_q / attn_k rows permuted per "
                                 f"head; pass --base-config DIR (base_config=...) with the base model's config.json "
                                 f"to read it")
    blocks = [int(base.split(".")[1]) for base in pairs if base.startswith("blk.")]
    return {"layers": max(blocks, default=-1) + 1, "heads": 0, "kv_heads": 0}


def _inverse_names(arch: str, layers: int) -> dict[str, str]:
    name_map = _name_map(arch, layers)
    modules = [t.format(i=i) for t in HF_MODULES for i in (range(layers) if "{i}" in t else [0])]
    return {name_map.get_name(module): module for module in modules if name_map.get_name(module)}
