"""Read a .safetensors file one tensor at a time: the header once, then each tensor by its byte offsets;
write one whose tensors arrive one at a time (`TensorWriter`).

No memory map, so only the tensors asked for are ever resident (a mapped file's touched pages would
count in the process's memory until it is closed), and nothing but the header is read up front.
"""

from __future__ import annotations

import json
import math
import os
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
            header = json.loads(stream.read(length), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise TensorFileError(f"{path.name}: header is not JSON ({error})") from None
        except _DuplicateKey as error:  # safetensors' own parser silently keeps one of them
            raise TensorFileError(f"{path.name}: the header names {error.args[0]!r} twice; expected each tensor "
                                  "(and each entry) once") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path.name}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    infos = {}
    for key, entry in header.items():
        infos[key] = _info(path.name, key, entry, 8 + length, size)
    return infos, metadata


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    found: dict[str, object] = {}
    for key, value in pairs:
        if key in found:
            raise _DuplicateKey(key)
        found[key] = value
    return found


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


NAMES = {dtype: name for name, dtype in DTYPES.items()}


class TensorWriter:
    """Write a .safetensors file whose tensors arrive one at a time, in any order.

    The header (every key's dtype and shape, and the string metadata) is written first and the file is
    sized at once, so each `write` puts one tensor at its offset and nothing else is held in memory.
    The result is an ordinary safetensors file (readable by `safetensors.safe_open`). Raises OSError.
    """

    def __init__(self, path: str | Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict[str, object] = {}
        self._slots: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for key, (dtype, shape) in entries.items():
            size = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._slots[key] = (dtype, tuple(shape), offset)
            offset += size
        if metadata:
            header["__metadata__"] = dict(sorted(metadata.items()))
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self._base = 8 + len(text)
        self._stream = open(path, "wb")
        try:
            self._stream.write(len(text).to_bytes(8, "little") + text)
            self._stream.truncate(self._base + offset)
        except BaseException:
            self._stream.close()
            raise
        self._pending = set(entries)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write the tensor of `key` (its dtype and shape must be those declared)."""
        dtype, shape, offset = self._slots[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {key!r}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        self._stream.seek(self._base + offset)
        self._stream.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        self._pending.discard(key)

    def close(self) -> None:
        """Flush and close; raises ValueError if a declared tensor was never written."""
        try:
            if self._pending:
                raise ValueError(f"tensors never written: {sorted(self._pending)[:3]}")
            self._stream.flush()
            os.fsync(self._stream.fileno())
        finally:
            self._stream.close()

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self._stream.close()
