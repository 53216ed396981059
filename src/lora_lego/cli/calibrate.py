"""The calibration side of the `lora-lego` command: `calibrate`, and `merge --model/--prompts` or
`--calibration` for the methods that need calibration data (thin, over `calibrate` and `load_calibration`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import CalibrationError, MethodError
from .generation import check_generation_args, generated_prompt_sets, generating, generation_record
from .options import add_calibration_options, add_generation_options, add_revision


def add_parser(commands) -> None:
    cmd = commands.add_parser("calibrate", help="input Grams of a base model on prompts, for calibrated merges")
    cmd.add_argument("--model", required=True, help="base model folder (transformers)")
    cmd.add_argument("--prompts", metavar="FILE", help="prompts file (.jsonl or .txt)")
    cmd.add_argument("-o", "--output", required=True, help="output folder")
    cmd.add_argument("--modules", nargs="+", metavar="PATH", help="module paths to calibrate (default: every linear "
                     "layer)")
    cmd.add_argument("--adapter", help="apply this adapter during the passes (its task's own activations)")
    cmd.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    cmd.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_calibration_options(cmd)
    add_generation_options(cmd)
    add_revision(cmd)
    cmd.set_defaults(run=run)


def check_calibration_args(args: argparse.Namespace, needs: bool, *, choose: bool = False) -> None:
    """Refuse, before any work, calibration options that do not fit the method or each other.

    `needs`: the method needs calibration data; `choose`: `--method auto` or `-p scale=auto`, which score
    candidates on the prompts. Any other method takes --model/--prompts too: the merge is then scored."""
    if args.command != "merge":
        if needs or choose:
            raise MethodError(f"method {args.method!r} needs calibration data; prune with it through `merge` with one "
                              "adapter and --model/--prompts or --calibration")
        return
    check_generation_args(args)  # --generate-prompts N stands for --prompts: one generated set per adapter
    prompted = args.prompts is not None or generating(args)
    given = prompted or args.calibration is not None
    if args.prompts is not None and args.calibration is not None:
        raise CalibrationError("give either --prompts (with --model) or --calibration, not both")
    if choose and not prompted:
        raise MethodError(f"{'--method auto' if args.method == 'auto' else '-p scale=auto'} scores merges on the "
                          "adapters' prompts: give --model BASE_DIR --prompts P1 P2 ... "
                          "(one prompts file per adapter), or --model BASE_DIR --generate-prompts N")
    if not needs and not choose and args.calibration is not None:
        raise MethodError(f"method {args.method!r} does not use calibration data (--calibration); to measure what "
                          "each adapter keeps, give --model BASE_DIR --prompts P1 P2 ...")
    if needs and not given:
        raise MethodError(f"method {args.method!r} needs calibration data: --model BASE_DIR --prompts P1 P2 ... (one "
                          "prompts file per adapter), --model BASE_DIR --generate-prompts N, "
                          "or --calibration C1 C2 ...")
    if args.model and not prompted:
        raise CalibrationError("--model is used with --prompts (one prompts file per adapter) or --generate-prompts N; "
                               "a saved --calibration already holds its model")
    files = args.prompts if args.prompts is not None else args.calibration or []
    if files and len(files) != len(args.adapters):
        raise CalibrationError(f"got {len(files)} {'prompts files' if args.prompts else 'calibrations'} for "
                               f"{len(args.adapters)} adapters; give one per adapter, in the same order")
    if args.prompts is not None and not args.model:
        raise CalibrationError("--prompts needs --model BASE_DIR (the base model the adapters were trained on)")
    from ..calibration.calibrate import read_prompts

    for path in args.prompts or []:  # every file checked before the model is loaded
        read_prompts(path, max_prompts=args.max_prompts, format=getattr(args, "prompts_format", None))


@contextlib.contextmanager
def calibrations_for_merge(args: argparse.Namespace, adapters: list, model=None, tokenizer=None, *,
                           union: bool = False):
    """The merge's calibrations: loaded (--calibration), or computed now (--model/--prompts, with the loaded
    `model`) into a temporary folder beside the output (removed afterwards), so that even a large model's
    Grams are never all in memory. `union`: every adapter's prompts calibrate the modules of all adapters
    (what scoring candidates needs), not only its own adapter's."""
    from ..calibration.calibrate import calibrate
    from ..calibration.grams import load_calibration

    if getattr(args, "calibration", None):
        yield [load_calibration(path) for path in args.calibration]
        return
    if not getattr(args, "prompts", None) or model is None:
        yield None
        return
    output = Path(args.output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-calibration", dir=output.parent))
    everything = list(dict.fromkeys(m for a in adapters for m in a))
    try:
        calibrations = []
        for index, (adapter, prompts) in enumerate(zip(adapters, args.prompts)):
            calibrations.append(calibrate(
                model, prompts, tokenizer=tokenizer, modules=everything if union else list(adapter),
                adapter=adapter if args.activations == "adapted" else None, output=work / str(index),
                progress=not args.quiet, generated=generation_record(args) if generating(args) else None,
                **calibration_options(args)))
            calibrations[-1].metadata["model"] = args.model
        yield calibrations
    finally:
        shutil.rmtree(work, ignore_errors=True)


def calibration_options(args: argparse.Namespace) -> dict:
    if not args.gram_memory > 0:
        raise CalibrationError(f"--gram-memory must be a positive number of GiB; got {args.gram_memory}")
    return {"max_prompts": args.max_prompts, "max_length": args.max_length, "batch_size": args.batch_size,
            "gram_memory": max(int(args.gram_memory * 2**30), 1),
            "prompts_format": getattr(args, "prompts_format", None)}


def run(args: argparse.Namespace) -> int:
    from ..calibration.calibrate import calibrate, load_model, read_prompts
    from ..compute import check_device
    from ..formats import load_adapter
    from ..outputs import check_output_path

    check_device(args.device)
    check_generation_args(args)
    if args.prompts is None and not generating(args):
        raise CalibrationError("give --prompts FILE, or --generate-prompts N with --adapter")
    if generating(args) and not args.adapter:
        raise CalibrationError("--generate-prompts samples from the model with --adapter applied: give --adapter")
    check_output_path(args.output, [args.model] + [p for p in (args.prompts, args.adapter) if p],
                      overwrite=args.overwrite)
    started = time.perf_counter()
    adapter = load_adapter(args.adapter, lazy=True) if args.adapter else None
    if args.prompts is not None:
        read_prompts(args.prompts, max_prompts=args.max_prompts, format=args.prompts_format)
    model, tokenizer = load_model(args.model, device=args.device, quiet=args.quiet)
    modules = args.modules or (list(adapter) if adapter is not None else None)
    prompts = generated_prompt_sets(args, [adapter], model, tokenizer)[0] if generating(args) else args.prompts
    result = calibrate(model, prompts, tokenizer=tokenizer, modules=modules, adapter=adapter, output=args.output,
                       overwrite=args.overwrite, progress=not args.quiet,
                       generated=generation_record(args) if generating(args) else None, **calibration_options(args))
    summary = result.summary()
    print(f"calibrate: {summary['n_prompts']} prompts ({summary['tokens']:,} tokens) through {args.model} -> "
          f"{args.output}: {summary['modules']} modules, {summary['grams']} Grams, "
          f"{time.perf_counter() - started:.1f} s")
    return 0
