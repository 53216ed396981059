"""What every single-file format shares: opening a .safetensors file with errors that name it, and
writing one atomically with sorted metadata (bitwise-identical files for the same adapter)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import torch

from ..errors import AdapterFormatError, OutputError
from ..outputs import atomic_output, check_output_path, source_folders
from ..tensorfile import TensorFileError, TensorInfo, TensorWriter, read_header, read_tensor
from ..types import Adapter, LoraFactors


def open_file(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], Callable[[TensorInfo], torch.Tensor]]:
    """A single adapter file's tensor infos by key, its string metadata, and how to read one tensor.

    Raises AdapterFormatError naming the file when it is missing, not a readable safetensors file or empty.
    """
    name = str(path)
    if not path.is_file():
        raise AdapterFormatError(f"adapter {name!r}: no such file")
    infos, header = header_of(path, f"adapter {name!r}: not a readable safetensors file")
    if not infos:
        raise AdapterFormatError(f"adapter {name!r}: the file holds no tensors")
    return infos, dict(header), tensor_reader(path, f"adapter {name!r}: cannot read a tensor")


def header_of(path: Path, failure: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """`tensorfile.read_header`, raising AdapterFormatError("<failure> (<why>)") for an unreadable file."""
    try:
        return read_header(path)
    except (OSError, TensorFileError) as error:
        raise AdapterFormatError(f"{failure} ({error})") from None


def tensor_reader(path: Path, failure: str) -> Callable[[TensorInfo], torch.Tensor]:
    """info -> the tensor read from `path`, raising AdapterFormatError("<failure> (<why>)") when it cannot be."""
    def fetch(info: TensorInfo) -> torch.Tensor:
        try:
            return read_tensor(path, info)
        except (OSError, TensorFileError) as error:
            raise AdapterFormatError(f"{failure} ({error})") from None
    return fetch


class Hasher(Protocol):
    """Hashes of a file's data written into its own header (kohya's sshs_* keys): `placeholder()` gives the keys
    with values of the final length, `update(data)` sees the data bytes in file order, `hashes()` the values."""

    def placeholder(self) -> dict[str, str]: ...

    def update(self, data: memoryview) -> None: ...

    def hashes(self) -> dict[str, str]: ...


def write_file(adapter: Adapter, path: Path, tensors: Mapping[str, Callable[[], torch.Tensor] | torch.Tensor],
               metadata: Mapping[str, str], *, shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]] | None = None,
               overwrite: bool = False, library: bool = False, hasher: Hasher | None = None) -> Path:
    """Write one .safetensors file atomically, refusing a path that is (or is inside) an input.

    `tensors` maps key -> tensor, or key -> a function making it (then `shapes` gives each key's dtype
    and shape, so only one tensor is in memory at a time). Keys are written in the given order,
    metadata keys sorted, so the same adapter gives the same bytes; `library` picks the header layout
    (`tensorfile.header_bytes`). A `hasher` hashes the data as it streams and its hashes are added to the
    metadata before the file is put in place.
    """
    if path.is_dir():
        raise OutputError(f"output {str(path)!r} is a folder; expected a .safetensors file path")
    check_output_path(path, source_folders(adapter), overwrite=overwrite)
    if shapes is None:
        shapes = {key: (t.dtype, tuple(t.shape)) for key, t in tensors.items()}  # type: ignore[union-attr]
    first = {**metadata, **hasher.placeholder()} if hasher is not None else dict(metadata)
    with atomic_output(path, overwrite=overwrite) as temporary:
        with TensorWriter(temporary, dict(shapes), first, library=library,
                          on_data=hasher.update if hasher is not None else None) as writer:
            for key, tensor in tensors.items():
                writer.write(key, (tensor() if callable(tensor) else tensor).contiguous())
            if hasher is not None:
                writer.set_metadata({**metadata, **hasher.hashes()})
    return path


def module_producer(adapter: Adapter, suffixes: Sequence[str], tensors_of: Callable[[str, LoraFactors],
                    Mapping[str, torch.Tensor]]) -> Callable[[str], torch.Tensor]:
    """key "<module>.<suffix>" -> its tensor, from `tensors_of(module, factors)` (suffix -> tensor), holding one
    module's tensors at a time: a writer asks for a module's keys one after the other."""
    held: dict[str, Mapping[str, torch.Tensor]] = {}

    def produce(key: str) -> torch.Tensor:
        suffix = next(suffix for suffix in suffixes if key.endswith("." + suffix))
        module = key[: -len(suffix) - 1]
        if module not in held:
            held.clear()
            held[module] = tensors_of(module, adapter[module])
        return held[module][suffix]
    return produce


def provenance_header(adapter: Adapter, *, config_holds_the_rest: bool = False) -> dict[str, str]:
    """What a file's header records of the adapter (`record.record`): the provenance as sorted JSON, the base
    model and the task type, each only when the adapter has it (only the provenance when a config file beside
    it already holds the base model and task type, as PEFT's does)."""
    from .record import PROVENANCE, record

    entries = record(adapter.metadata)
    if config_holds_the_rest:
        return {key: value for key, value in entries.items() if key == PROVENANCE}
    return entries


def tie_word_embeddings(config: Mapping) -> bool | None:
    """A base model config's tie_word_embeddings: at the top level, else in text_config (multimodal models keep
    the language model's there); None when neither sets it (transformers' default then depends on the model)."""
    flag = config.get("tie_word_embeddings")
    return flag if flag is not None else (config.get("text_config") or {}).get("tie_word_embeddings")
