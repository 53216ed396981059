"""The one registry of adapter formats. Each format is a reader and a writer to and from the same
`Adapter`; a single file's format is detected from its tensor names, a folder is PEFT.

Module names stay those of the format read ("model.layers.0.self_attn.q_proj" for PEFT,
"unet.down_blocks.0...." for diffusers files, "lora_unet_down_blocks_0_..." for kohya files), and
`convert_adapter` translates them (see `names.py`) when adapters of two namings meet or a writer
needs the other one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import AdapterFormatError, IncompatibleAdaptersError, OutputError
from ..tensorfile import TensorFileError, read_header
from ..types import Adapter, register_origins

SINGLE_FILE = ".safetensors"
GGUF_FILE = ".gguf"
# Endings of weight, archive and text files that no format here writes: an output named so would be a
# folder in disguise (a PEFT folder called "m.bin").
TRANSLATED = ("dotted", "kohya")  # the namings names.translate converts between (others: Format.to_kohya)
NOT_WRITTEN = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npy", ".npz", ".h5", ".onnx", ".ggml",
               ".safetensor", ".json", ".yaml", ".yml", ".txt", ".zip", ".tar", ".gz")


@dataclass(frozen=True)
class Format:
    """A registered format.

    read(path, *, lazy, expand, expand_rank) -> Adapter; write(adapter, path, *, dtype, overwrite) -> Path.
    `suffix` is the file name ending of a single-file format (None for folders); `owns(key)` says
    whether a tensor key of a .safetensors file belongs to this format; `naming` is "dotted" (module
    paths), "kohya" (lora_<component>_<path with "_">) or a format's own naming, which `to_kohya(adapter)` and
    `from_kohya(adapter)` translate exactly where they can (without them it is not translated; see
    `convert_adapter`); `options` are the extra keyword arguments its
    reader and writer take (e.g. "base_config_path"); `consumers` names the tools that load what it writes.

    Hooks, so that nothing above this package reads a format's metadata keys: `check_compatible(adapters)`
    raises IncompatibleAdaptersError for adapters that its metadata says no merge can combine (another base
    model); `carry(adapters)` returns the metadata a merge of adapters keeps for its writer. Every merge runs
    every registered format's hooks (a merge of diffusers files may be written as kohya).
    """

    name: str
    summary: str
    read: Callable[..., Adapter]
    write: Callable[..., Path]
    naming: str = "dotted"
    owns: Callable[[str], bool] | None = None
    suffix: str | None = None
    options: tuple[str, ...] = ()
    consumers: str = ""
    check_compatible: Callable[[Sequence[Adapter]], None] | None = None
    carry: Callable[[Sequence[Adapter]], dict[str, Any]] | None = None
    to_kohya: Callable[[Adapter], Adapter] | None = None
    from_kohya: Callable[[Adapter], Adapter] | None = None

    @property
    def single_file(self) -> bool:
        return self.suffix is not None


_FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    if fmt.name in _FORMATS:
        raise ValueError(f"format {fmt.name!r} is already registered")
    _FORMATS[fmt.name] = fmt
    return fmt


def available_formats() -> list[str]:
    return list(_FORMATS)


def get_format(name: str) -> Format:
    try:
        return _FORMATS[name]
    except KeyError:
        raise AdapterFormatError(f"unknown format {name!r}; choose from {', '.join(_FORMATS)}") from None


def detect_format(path: str | Path) -> str:
    """The format of an adapter on disk: "peft" for a folder, else from a single file's tensor names.

    The file's format is the first registered one that owns every key (a key may be several formats':
    the alpha of a dotted module path may belong to more than one). Raises AdapterFormatError for a missing path, an
    unreadable file, a key no format knows, or a file whose keys mix formats (naming both, with an example
    key of each).
    """
    path = Path(path)
    if path.suffix == GGUF_FILE and not path.exists():
        return "gguf"  # the GGUF reader explains a missing file
    if path.is_dir() or not path.exists():
        return "peft"  # the PEFT reader explains a missing folder
    from .gguf import is_gguf

    if is_gguf(path):
        return "gguf"
    try:
        infos, _ = read_header(path)
    except (OSError, TensorFileError) as error:
        raise AdapterFormatError(f"adapter {str(path)!r}: not a readable safetensors file ({error})") from None
    if not infos:
        raise AdapterFormatError(f"adapter {str(path)!r}: the file holds no tensors")
    owners = {key: [name for name, fmt in _FORMATS.items() if fmt.owns is not None and fmt.owns(key)] for key in infos}
    orphan = next((key for key, names in owners.items() if not names), None)
    if orphan is not None:
        raise AdapterFormatError(f"adapter {str(path)!r}: tensor {orphan!r} is not a LoRA key of any known format "
                                 f"({', '.join(n for n, f in _FORMATS.items() if f.single_file)})")
    common = [name for name in _FORMATS if all(name in names for names in owners.values())]
    if common:
        return common[0]
    claimed: dict[str, list[str]] = {}  # each key under its first owner
    for key, names in owners.items():
        claimed.setdefault(names[0], []).append(key)
    shown = "; ".join(f"{name} ({len(keys)} keys, e.g. {keys[0]!r})" for name, keys in claimed.items())
    raise AdapterFormatError(f"adapter {str(path)!r}: its keys mix formats: {shown}")


def load_adapter(path: str | Path, *, lazy: bool = False, format: str | None = None, expand: bool = False,
                 expand_rank: int | None = None, base_config: str | Path | None = None,
                 revision: str | None = None) -> Adapter:
    """Read an adapter: a PEFT folder, a single .safetensors file (kohya / LyCORIS, diffusers) or a
    llama.cpp .gguf adapter, on disk or, for a string that is no local path, on the Hugging Face Hub
    ("owner/name", "owner/name/subfolder", "owner/name/file.safetensors", "owner/name@revision"; `revision`
    for ids without one; see `hub.resolve`, extra [hub]). A Hub adapter is named by its id.

    Factors are float32 with each module's scale folded in. `lazy=True` reads headers now and each
    module's factors on access. `format` overrides detection. LyCORIS LoHa / LoKr modules are refused
    unless `expand` (an exact plain LoRA of rank r^2 / rank(w1) * rank(w2)) or `expand_rank=K` (their
    best rank-K approximation, by a truncated SVD). `base_config` (the base model's folder or
    config.json) is what a GGUF file of another producer needs to undo llama.cpp's q/k row order.
    """
    from ..hub import resolve

    source = resolve(path, revision=revision)
    fmt = get_format(format) if format is not None else get_format(detect_format(source.path))
    extra = {"base_config_path": base_config} if "base_config_path" in fmt.options else {}
    adapter = fmt.read(source.path, lazy=lazy, expand=expand, expand_rank=expand_rank, **extra)
    if source.hub is not None:  # reports, provenance and recipes name it as the user did, not by its cache path
        adapter.name, adapter.metadata["hub"] = source.name, source.hub
    return adapter


def output_format(path: str | Path, adapter: Adapter | None = None, format: str | None = None) -> str:
    """The format `save_adapter` writes: `format` if given; gguf for a .gguf path; for a .safetensors
    path the adapter's own single-file format, else kohya for diffusion-model adapters and diffusers
    for others; else PEFT. OutputError for a name whose ending that format does not write (see
    `check_output_ending`)."""
    if format is not None:
        fmt = get_format(format)
        check_output_ending(str(path), fmt)
        return fmt.name
    if str(path).endswith(GGUF_FILE):
        return "gguf"
    if not str(path).endswith(SINGLE_FILE):
        check_output_ending(str(path), _FORMATS["peft"])
        return "peft"
    meta = adapter.metadata if adapter is not None else {}
    own = meta.get("format")
    if own in _FORMATS and _FORMATS[own].suffix == SINGLE_FILE:
        return own
    return "kohya" if meta.get("family") else "diffusers"


def check_output_ending(path: str, fmt: Format) -> None:
    """Refuse an output name that `fmt` would write under a misleading name: a single-file format needs its
    own ending (.safetensors, .gguf); a folder takes neither, nor one no format writes (.bin, .pt, ...)."""
    ending = next((e for e in (SINGLE_FILE, GGUF_FILE, *NOT_WRITTEN) if path.endswith(e)), "")
    if fmt.single_file and ending != fmt.suffix:
        renamed = (path[: -len(ending)] if ending else path.rstrip("/")) + fmt.suffix
        found = f"not {ending}" if ending else "not a folder"
        raise OutputError(f"output {path!r}: format {fmt.name} writes a single {fmt.suffix} file, {found}; "
                          f"name it {renamed!r}")
    if not fmt.single_file and ending in (SINGLE_FILE, GGUF_FILE):
        raise OutputError(f"output {path!r}: format {fmt.name} writes a folder, not a {ending} file; name it "
                          f"{path[: -len(ending)]!r}")
    if not fmt.single_file and ending:
        raise OutputError(f"output {path!r}: no format writes {ending} files; name a folder (peft), a "
                          f"{SINGLE_FILE} file (kohya, diffusers) or a {GGUF_FILE} file (gguf)")


def save_adapter(adapter: Adapter, path: str | Path, *, format: str | None = None,
                 dtype: str | torch.dtype | None = None, overwrite: bool = False,
                 base_config: str | Path | None = None) -> Path:
    """Write `adapter` atomically in `format` (default: see `output_format`), translating its module
    names first when the format names modules another way. `base_config` (the base model's folder
    or config.json) gives a GGUF file its architecture and head counts (default: the adapter's
    base_model_name_or_path, when a local folder). Returns the path written."""
    fmt = get_format(output_format(path, adapter, format))
    if fmt.single_file and Path(path).is_dir():
        raise AdapterFormatError(f"output {str(path)!r} is a folder; format {fmt.name} writes a single file")
    extra = {"base_config_path": base_config} if "base_config_path" in fmt.options else {}
    return fmt.write(convert_adapter(adapter, fmt.name), Path(path), dtype=dtype, overwrite=overwrite, **extra)


def naming(adapter: Adapter) -> str:
    """How the adapter's modules are named: "kohya", "dotted" (PEFT, diffusers, in memory) or a format's own."""
    own = adapter.metadata.get("format")
    return _FORMATS[own].naming if own in _FORMATS else "dotted"


def convert_adapter(adapter: Adapter, format: str) -> Adapter:
    """The same deltas with the module names (and, for Flux, the module split) of `format`.

    Exact: renaming, or splitting a fused qkv LoRA into q / k / v (same A, row blocks of B) and fusing
    them back (rank 3r, block-diagonal B). A format's own naming goes through kohya names (its `to_kohya`
    / `from_kohya`). Raises AdapterFormatError for a name that has no translation, and for an own naming
    without those hooks.
    """
    target = get_format(format)
    own = naming(adapter)
    if own == target.naming:
        return adapter
    source = _FORMATS.get(adapter.metadata.get("format", ""))
    for fmt, hook in ((source, "to_kohya"), (target, "from_kohya")):
        if fmt is not None and fmt.naming not in TRANSLATED and getattr(fmt, hook) is None:
            raise AdapterFormatError(f"adapter {adapter.name!r}: its {own} module names have no translation to "
                                     f"{target.name}'s ({target.naming}): merge and write it in its own format")
    if own not in TRANSLATED:
        adapter = source.to_kohya(adapter)  # type: ignore[union-attr, misc]
    if target.naming not in TRANSLATED:
        return target.from_kohya(convert_adapter(adapter, "kohya"))  # type: ignore[misc]
    from .names import translate

    return adapter if naming(adapter) == target.naming else translate(adapter, target.naming)


def check_compatible(adapters: Sequence[Adapter]) -> None:
    """Refuse adapters that no merge can combine: each format's rule (its `check_compatible` hook: the
    base-model family, the GGUF architecture), then module names of two namings (`convert_adapter`)."""
    hooks = [fmt.check_compatible for fmt in _FORMATS.values() if fmt.check_compatible is not None]
    for hook in dict.fromkeys(hooks):  # each rule once, in registration order
        hook(adapters)
    if len({naming(a) for a in adapters}) > 1:
        shown = ", ".join(f"{a.name!r}: {a.metadata.get('format', 'in memory')}" for a in adapters)
        raise IncompatibleAdaptersError(f"adapters name their modules differently ({shown}); convert them to one "
                                        "format first (lora_lego.formats.convert_adapter; the CLI does it itself)")


def carry(adapters: Sequence[Adapter]) -> dict[str, Any]:
    """What a merge of `adapters` keeps for the writers: the first adapter's format (`output_format`) and what
    each format's `carry` hook asks for."""
    carried: dict[str, Any] = {"format": adapters[0].metadata.get("format")}
    for fmt in _FORMATS.values():
        if fmt.carry is not None:
            carried.update(fmt.carry(adapters))
    return carried


def base_family(adapter: Adapter) -> str | None:
    """The base-model family ("sd1", "sdxl", "flux", ...) the adapter's reader found, None for others."""
    return adapter.metadata.get("family")


def harmonise(adapters: Sequence[Adapter]) -> list[Adapter]:
    """The adapters with one naming, that of the first (for merging files of different formats)."""
    if len({naming(a) for a in adapters}) <= 1:
        return list(adapters)
    first = adapters[0].metadata.get("format", "peft")
    return [convert_adapter(a, first) for a in adapters]


def _register_builtins() -> None:
    from . import comfyui, diffusers, gguf, gguf_read, kohya, names_comfyui, peft
    from .family import carry_family, check_families

    register_format(Format("peft", "PEFT folder (adapter_config.json + adapter_model.safetensors or .bin)",
                           peft.read, peft.write,
                           consumers="PEFT's PeftModel.from_pretrained, vLLM, lora-lego apply"))
    register_format(Format("kohya", "kohya / LyCORIS single file (lora_down / lora_up / alpha; LoCon, Tucker)",
                           kohya.read, kohya.write, naming="kohya", owns=kohya.owns, suffix=SINGLE_FILE,
                           consumers="sd-scripts, ComfyUI, A1111 / Forge, diffusers' load_lora_weights",
                           check_compatible=check_families, carry=kohya.carry))
    register_format(Format("diffusers", "diffusers / ai-toolkit / SimpleTuner single file (lora_A / lora_B, "
                           "component prefixes, lora_adapter_metadata)", diffusers.read, diffusers.write,
                           owns=diffusers.owns, suffix=SINGLE_FILE, consumers="diffusers' load_lora_weights",
                           check_compatible=check_families, carry=carry_family))
    register_format(Format("gguf", "llama.cpp / ollama GGUF LoRA adapter (blk.N.<name>.weight.lora_a / lora_b, "
                           "adapter.lora.alpha; needs the gguf package)", gguf_read.read, gguf.write, suffix=GGUF_FILE,
                           options=("base_config_path",), consumers="llama.cpp --lora, ollama's ADAPTER",
                           check_compatible=gguf_read.check_architectures, carry=gguf_read.carry_base_config))
    register_format(Format("comfyui", "ComfyUI single file (diffusion_model.<module>.lora_down / lora_up, as its "
                           "LoraSave node writes)", comfyui.read, comfyui.write, naming="comfyui", owns=comfyui.owns,
                           suffix=SINGLE_FILE, consumers="ComfyUI's LoraLoader", to_kohya=names_comfyui.to_kohya,
                           from_kohya=names_comfyui.from_kohya))


_register_builtins()
register_origins(check_compatible, carry)  # what merge and provenance ask (types.check_origins, carried_metadata)
