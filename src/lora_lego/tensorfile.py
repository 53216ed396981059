"""Read a .safetensors file one tensor at a time: the header once, then each tensor by its byte offsets;
write one whose tensors arrive one at a time (`TensorWriter`, the one writer; `save_file` for a whole dict).

No memory map, so only the tensors asked for are ever resident (a mapped file's touched pages would
count in the process's memory until it is closed), and nothing but the header is read up front.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

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
        raise TensorFileError(
            f"{name}: tensor {key!r} has an unreadable or unsupported header entry {entry!r}") from None
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
Entries = Mapping[str, "tuple[torch.dtype, tuple[int, ...]]"]  # key -> (dtype, shape), in data order


def header_bytes(entries: Entries, metadata: Mapping[str, str] | None, *, library: bool = False) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file of `entries` (in this data order).

    Compact JSON padded with spaces so that the data starts 8-byte aligned; metadata keys sorted (the
    safetensors library uses hash-map order, so its files differ from run to run). `library=True` lays
    the header out as the library does ("__metadata__" first, UTF-8 unescaped); `library=False` as this
    writer always has for checkpoints, calibrations and diffusers files (metadata last, non-ASCII escaped).
    Both are valid safetensors files; each output keeps its layout so that its bytes never change.
    """
    header: dict[str, object] = {}
    if metadata and library:
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for key, (dtype, shape) in entries.items():
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata and not library:
        header["__metadata__"] = dict(sorted(metadata.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=not library).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (0-d included), as safetensors stores them."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


class TensorWriter:
    """Write a .safetensors file whose tensors arrive one at a time: the one safetensors writer of lora-lego.

    The header (every key's dtype and shape, and the string metadata; see `header_bytes` for `library`) is
    written first and the file is sized at once, so each `write` puts one tensor at its offset and nothing
    else is held in memory. `on_data(bytes)` sees each tensor's bytes; with it, tensors must come in data
    order (e.g. to hash the data as it streams). `set_metadata` rewrites the header before closing, for
    values known only at the end (kohya's hashes): it must keep the header's length. Raises OSError.
    """

    def __init__(self, path: str | Path, entries: Entries, metadata: Mapping[str, str] | None = None, *,
                 library: bool = False, on_data: Callable[[memoryview], None] | None = None):
        self._entries, self._library, self._on_data = dict(entries), library, on_data
        self._slots: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        offset = 0
        for key, (dtype, shape) in self._entries.items():
            self._slots[key] = (dtype, tuple(shape), offset)
            offset += math.prod(shape) * dtype.itemsize
        header = header_bytes(self._entries, metadata, library=library)
        self._base, self._next = len(header), 0
        self._stream = open(path, "wb")
        try:
            self._stream.write(header)
            self._stream.truncate(self._base + offset)
        except BaseException:
            self._stream.close()
            raise
        self._pending = set(self._entries)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write the tensor of `key` (its dtype and shape must be those declared)."""
        dtype, shape, offset = self._slots[key]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"tensor {key!r}: expected {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        data = tensor_bytes(tensor)
        if self._on_data is not None:
            if offset != self._next:
                raise ValueError(f"tensor {key!r} written out of data order (on_data sees the bytes in file order)")
            self._on_data(data)
            self._next = offset + data.nbytes
        self._stream.seek(self._base + offset)
        self._stream.write(data)
        self._pending.discard(key)

    def set_metadata(self, metadata: Mapping[str, str]) -> None:
        """Rewrite the header with `metadata`; raises ValueError unless the header keeps its length."""
        header = header_bytes(self._entries, metadata, library=self._library)
        if len(header) != self._base:
            raise ValueError(f"the new header is {len(header)} bytes, the written one {self._base}")
        self._stream.seek(0)
        self._stream.write(header)

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


def save_file(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors of one dtype as the safetensors library's `save_file` does (keys sorted, its header layout),
    with the metadata keys sorted, so that the same tensors give the same bytes. Raises OSError."""
    keys = sorted(tensors)
    if len({tensor.dtype for tensor in tensors.values()}) > 1:  # the library puts wider dtypes first
        dtypes = sorted({str(tensor.dtype) for tensor in tensors.values()})
        raise ValueError(f"save_file writes tensors of one dtype; got {dtypes}")
    entries = {key: (tensors[key].dtype, tuple(tensors[key].shape)) for key in keys}
    with TensorWriter(path, entries, metadata, library=True) as writer:
        for key in keys:
            writer.write(key, tensors[key])
