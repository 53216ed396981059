"""`lora-lego convert`: rewrite an adapter in another format, then read the output back and check every delta."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from ..errors import OutputError
from .lines import folder_note, written_words
from .options import add_input_options, add_output_format, add_revision, add_target_option


def add_parser(commands) -> None:
    cmd = commands.add_parser("convert", help="rewrite an adapter in another format, exactly (checked)")
    cmd.add_argument("adapters", nargs=1, metavar="ADAPTER", help="a PEFT LoRA folder or a .safetensors file")
    cmd.add_argument("-o", "--output", required=True,
                     help="output: a folder (PEFT) or a .safetensors file (kohya or diffusers)")
    cmd.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: the input's)")
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_output_format(cmd)
    add_input_options(cmd)
    add_target_option(cmd)
    add_revision(cmd)
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Read one adapter, write it in another format, then read the output back and check every delta."""
    from ..deploy.targets import check_loads, get_target, serve_line
    from ..formats import load_adapter, output_format, save_adapter
    from ..formats.verify import check_same_deltas
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


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
