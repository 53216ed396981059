"""`lora-lego apply`: fold one adapter into a transformers base checkpoint and write a new model folder."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .options import add_revision


def add_parser(commands) -> None:
    command = commands.add_parser("apply", help="fold an adapter into a base model checkpoint (safetensors shards)")
    command.add_argument("adapter", metavar="ADAPTER",
                         help="a PEFT LoRA folder, a .gguf adapter, or a dotted-name .safetensors file")
    command.add_argument("--base", required=True, metavar="BASE_DIR",
                         help="transformers model folder: config.json and model.safetensors or its sharded index")
    command.add_argument("-o", "--output", required=True, metavar="OUT_DIR",
                         help="output model folder (must not exist unless --overwrite)")
    command.add_argument("--scale", type=float, default=1.0, help="multiply every delta by S (default 1)")
    command.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                         help="dtype of the floating tensors written (default: each base tensor's own)")
    command.add_argument("--untie", action="store_true",
                         help="when the base ties lm_head to the input embeddings and the adapter changes either, "
                              "write a separate lm_head and set tie_word_embeddings false")
    command.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    command.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_revision(command)
    command.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run `apply` and print one summary line (modules folded, shards written, seconds)."""
    from ..deploy.apply import apply_adapter
    from ..formats import load_adapter

    started = time.perf_counter()
    adapter = load_adapter(args.adapter, lazy=True, base_config=args.base)  # a .gguf adapter's head counts
    output = apply_adapter(adapter, args.base, args.output, scale=args.scale, dtype=args.dtype, untie=args.untie,
                           overwrite=args.overwrite, progress=not args.quiet)
    shards = len(list(Path(output).glob("*.safetensors")))
    print(f"apply: {args.adapter} ({len(adapter)} modules, scale {args.scale:g}) folded into {args.base} -> {output}: "
          f"{shards} shard(s) written, {time.perf_counter() - started:.1f} s")
    return 0
