"""Read a .safetensors file one tensor at a time: the header once, then each tensor by its byte offsets.

No memory map, so only the tensors asked for are ever resident (a mapped file's touched pages would
count in the process's memory until it is closed), and nothing but the header is read up front.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the header size


class TensorFileError(ValueError):
    """The file is not a readable safetensors file (the caller names the adapter)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file and what it is."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos by key (in file order) and the string metadata; checks offsets against the file size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as stream:
        prefix = stream.read(8)
        if len(prefix) < 8:
            raise TensorFileError(f"{path.name} is too short ({size} bytes) to be a safetensors file")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER, size - 8):
            raise TensorFileError(f"{path.name}: header length {length} does not fit a file of {size} bytes")
        try:
            header = json.loads(stream.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise TensorFileError(f"{path.name}: header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path.name}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    infos = {}
    for key, entry in header.items():
        infos[key] = _info(path.name, key, entry, 8 + length, size)
    return infos, metadata


def _info(name: str, key: str, entry: object, base: int, size: int) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(n) for n in entry["shape"])
        start, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise TensorFileError(f"{name}: tensor {key!r} has an unreadable or unsupported header entry {entry!r}") from None
    nbytes = math.prod(shape) * dtype.itemsize
    if min(shape, default=0) < 0 or not 0 <= start <= end or end - start != nbytes or base + end > size:
        raise TensorFileError(f"{name}: tensor {key!r} (shape {list(shape)}, {entry['dtype']}) has byte offsets "
                              f"{[start, end]} that do not match its size or lie past the end of the file")
    return TensorInfo(dtype, shape, base + start, base + end)


def read_tensor(path: str | Path, info: TensorInfo) -> torch.Tensor:
    """The tensor described by `info`, read from `path` into fresh memory."""
    buffer = bytearray(info.end - info.start)
    with open(path, "rb") as stream:
        stream.seek(info.start)
        if stream.readinto(buffer) != len(buffer):
            raise TensorFileError(f"{Path(path).name} ended early (changed while being read?)")
    if not buffer:
        return torch.empty(info.shape, dtype=info.dtype)
    return torch.frombuffer(buffer, dtype=info.dtype).reshape(info.shape)
