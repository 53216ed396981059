"""`--generate-prompts N` of the `lora-lego` command (calibrate, merge, score): each adapter writes its own
prompts (`calibration.generate.generate_prompts`, with the base model given by --model), used where --prompts would
be. The options themselves are in `options.add_generation_options`."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import CalibrationError


def generating(args: argparse.Namespace) -> bool:
    return getattr(args, "generate_prompts", None) is not None


def check_generation_args(args: argparse.Namespace) -> None:
    """Refuse, before any work, --generate-prompts with --prompts or --calibration, without --model, or N < 1."""
    if not generating(args):
        return
    from ..calibration.generate import check_generation

    if args.prompts is not None:
        raise CalibrationError("give either --prompts FILE ... or --generate-prompts N, not both")
    if getattr(args, "calibration", None) is not None and args.command != "score":
        raise CalibrationError("give either --calibration or --generate-prompts N, not both")
    if not args.model:
        raise CalibrationError("--generate-prompts needs --model BASE_DIR (each adapter writes its prompts with it)")
    if args.generate_prompts < 1:
        raise CalibrationError(f"--generate-prompts must be >= 1; got {args.generate_prompts}")
    check_generation(args.generate_prompts, args.generate_length, args.temperature, args.top_p, args.batch_size,
                     args.generate_start)


def generation_record(args: argparse.Namespace) -> dict[str, Any]:
    """How the prompts were generated, for the provenance."""
    return {"n": args.generate_prompts, "seed": args.generate_seed, "start": args.generate_start,
            "temperature": args.temperature, "top_p": args.top_p, "max_length": args.generate_length}


def generated_prompt_sets(args: argparse.Namespace, adapters: list, model, tokenizer) -> list[list[str]]:
    """One generated prompt set per adapter, sampled from base + that adapter."""
    from ..calibration.generate import generate_prompts

    return [generate_prompts(model, tokenizer, adapter, args.generate_prompts, max_length=args.generate_length,
                             temperature=args.temperature, top_p=args.top_p, seed=args.generate_seed,
                             start=args.generate_start, batch_size=args.batch_size, progress=not args.quiet)
            for adapter in adapters]
