"""`lora-lego convert`, `inspect --target`, and the options every adapter command shares (--format, --expand,
--expand-rank, --base-config, --target)."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..defaults import FORMATS
from ..deploy.targets import TARGETS, check_loads, config_refusals, get_target, serve_line
from ..deploy.targets import describe as describe_target
from ..errors import LoraLegoError, OutputError

if TYPE_CHECKING:
    import torch

    from ..types import Adapter


def add_output_format(command: argparse.ArgumentParser) -> None:
    command.add_argument("--format", choices=FORMATS,
                         help="output format (default: PEFT for a folder; for a .safetensors path the input's "
                              "file format, else kohya for diffusion-model adapters and diffusers for others)")


def add_target_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--target", choices=list(TARGETS),
                         help="serving target: refuse what it cannot load, before any work, and print the rank "
                              "flag to serve the output with (the rank itself is kept: vLLM pads it)")


def add_input_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--base-config", metavar="DIR",
                         help="base model folder (its config.json): architecture and head counts for GGUF adapters "
                              "(default: the adapter's base_model_name_or_path when a local folder)")
    command.add_argument("--expand", action="store_true",
                         help="read LyCORIS LoHa / LoKr modules as an exact plain LoRA (LoHa rank r^2, LoKr "
                              "rank(w1) x rank(w2))")
    command.add_argument("--expand-rank", type=int, metavar="K",
                         help="read LyCORIS LoHa / LoKr modules as their best rank-K LoRA (truncated SVD)")


def written_words(written: str) -> str:
    """The format written and the tools that load it, for the line a merge or a conversion ends with."""
    from ..formats import get_format

    consumers = get_format(written).consumers
    return f"{written}; loads in {consumers}" if consumers else written


def folder_note(adapter: Adapter, written: str, output: str) -> str | None:
    """For an LLM adapter (no diffusion-model family) written as one diffusers file: what loads the folder form."""
    if written != "diffusers" or adapter.metadata.get("family"):
        return None
    from ..formats import SINGLE_FILE

    folder = output.removesuffix(SINGLE_FILE)
    return (f"note: this is an LLM adapter in a single diffusers file; PEFT (PeftModel.from_pretrained) and vLLM "
            f"load LLM adapters as a folder: write -o {folder} instead")


def run_convert(args: argparse.Namespace) -> int:
    """Read one adapter, write it in another format, then read the output back and check every delta."""
    from ..formats import load_adapter, output_format, save_adapter
    from ..outputs import check_output_path, dtype_from_name

    started = time.perf_counter()
    source = args.adapters[0]
    if args.dtype:
        dtype_from_name(args.dtype)
    output_format(args.output, format=args.format)  # a name the format does not write fails before any work
    check_output_path(args.output, [source], overwrite=args.overwrite)
    adapter = load_adapter(source, lazy=True, expand=args.expand, expand_rank=args.expand_rank,
                           base_config=args.base_config)
    written = output_format(args.output, adapter, args.format)
    flag = check_loads(adapter, get_target(args.target), written) if args.target else None
    save_adapter(adapter, args.output, format=written, dtype=args.dtype, overwrite=args.overwrite,
                 base_config=args.base_config)
    try:
        worst = check_same_deltas(adapter, load_adapter(args.output, lazy=True, format=written,
                                                        base_config=args.base_config),
                                  args.dtype or adapter.metadata.get("dtype", "float32"))
    except OutputError:
        _remove(Path(args.output))  # a conversion that changed a delta is a bug: leave nothing behind
        raise
    meta = adapter.metadata
    print(f"convert: {source} ({meta.get('format')}{', ' + meta['family'] if meta.get('family') else ''}, "
          f"{len(adapter)} modules) -> {args.output} ({written_words(written)}): every delta checked, largest "
          f"relative difference {worst:.2g}, {time.perf_counter() - started:.1f} s")
    note = folder_note(adapter, written, args.output)
    if note is not None:
        print(note)
    if flag is not None:
        print(serve_line(get_target(args.target), flag, adapter.max_rank))
    return 0


def inspect_target(args: argparse.Namespace, paths: list[str]) -> int:
    """Whether each adapter loads in the target, and why not (from its config when lora-lego cannot read it)."""
    from ..formats import load_adapter

    target = get_target(args.target)
    for path in paths:
        try:
            adapter = load_adapter(path, lazy=True, expand=args.expand, expand_rank=args.expand_rank,
                                   base_config=args.base_config)
        except LoraLegoError as error:
            config = Path(path) / "adapter_config.json"
            try:
                reasons = config_refusals(json.loads(config.read_text()), target) if config.is_file() else []
            except (OSError, ValueError):
                reasons = []  # an unreadable config: lora-lego's own error says what is wrong
            if not reasons:
                raise
            print(f"{path}: {target.name}: does not load: " + "; ".join(reasons)
                  + f" (lora-lego: {' '.join(str(error).split())})")
            continue
        print(f"{path}: {describe_target(adapter, target)}")
    return 0


def check_same_deltas(original, converted, dtype: str) -> float:
    """The largest relative Frobenius difference between the two adapters' deltas, module by module
    (in the original's module names); raises OutputError when a module is missing or differs by more
    than the written dtype's rounding allows."""
    import torch

    from ..formats import convert_adapter
    from ..lowrank import relative_error
    from ..outputs import dtype_from_name

    converted = convert_adapter(converted, original.metadata.get("format", "peft"))
    eps = torch.finfo(dtype_from_name(dtype) if dtype in ("bf16", "fp16", "fp32") else _torch_dtype(dtype)).eps
    tolerance = max(2 * eps, 1e-5)
    worst = 0.0
    for module in original:
        if module not in converted:
            raise OutputError(f"convert check failed: module {module!r} is missing from the output")
        difference = relative_error(converted[module], original[module])
        if not difference <= tolerance:
            raise OutputError(f"convert check failed: module {module!r} differs by {difference:.3g} (relative) "
                              f"after conversion; expected <= {tolerance:.1g}")
        worst = max(worst, difference)
    extra = [m for m in converted if m not in original]
    if extra:
        raise OutputError(f"convert check failed: the output has modules the input lacks ({extra[:3]})")
    return worst


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    dtype = getattr(torch, str(name), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
