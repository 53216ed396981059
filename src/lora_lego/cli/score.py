"""`lora-lego score`: what each adapter keeps in a merge, measured on its own unlabeled prompts (thin, over
`calibration.auto.score`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MethodError, OutputError
from .calibrate import calibration_options
from .generation import check_generation_args, generated_prompt_sets, generating, generation_record
from .lines import scores_table
from .options import add_calibration_options, add_evidence_options, add_generation_options, add_revision

if TYPE_CHECKING:
    from ..calibration.score import Scores


def add_parser(commands) -> None:
    cmd = commands.add_parser("score", help="what each adapter keeps in a merge, on its own unlabeled prompts")
    cmd.add_argument("merged", metavar="MERGED", help="the merged adapter (folder or file)")
    cmd.add_argument("--adapters", nargs="+", required=True, metavar="ADAPTER", help="the source adapters, in order")
    cmd.add_argument("--model", required=True, help="base model folder (transformers)")
    cmd.add_argument("--prompts", nargs="+", metavar="FILE",
                     help="one prompts file per adapter (or --generate-prompts)")
    cmd.add_argument("--calibration", nargs="+", metavar="CALIB",
                     help="saved calibrations, one per adapter: adds the Gram proxy's retention")
    cmd.add_argument("--report", metavar="FILE.json", help="write the scores here as JSON")
    cmd.add_argument("--plot", metavar="FILE.png", help="write a bar chart of retention per adapter here")
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing --report or --plot file")
    cmd.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")
    cmd.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_evidence_options(cmd)
    add_calibration_options(cmd)
    add_generation_options(cmd)
    add_revision(cmd)
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..calibration.auto import score
    from ..calibration.calibrate import load_model
    from ..calibration.grams import load_calibration
    from ..compute import check_device
    from ..formats import harmonise, load_adapter
    from ..outputs import check_report_path

    check_device(args.device)
    check_generation_args(args)
    if args.prompts is None and not generating(args):
        raise MethodError("score needs each adapter's prompts: --prompts P1 P2 ... or --generate-prompts N")
    if args.prompts is not None and len(args.prompts) != len(args.adapters):
        raise MethodError(f"got {len(args.prompts)} prompts files for {len(args.adapters)} adapters; give one per "
                          "adapter, in the same order")
    if args.calibration is not None and len(args.calibration) != len(args.adapters):
        raise MethodError(f"got {len(args.calibration)} calibrations for {len(args.adapters)} adapters; give one per "
                          "adapter, in the same order")
    inputs = [args.merged, *args.adapters, *(args.prompts or [])]
    for path, suffix in ((args.report, ".json"), (args.plot, ".png")):
        if path is not None:
            if not path.endswith(suffix):
                raise OutputError(f"{path!r}: expected a {suffix} file name")
            check_report_path(path, inputs, args.merged, overwrite=args.overwrite)
    started = time.perf_counter()
    adapters = harmonise([load_adapter(p, lazy=True) for p in [args.merged, *args.adapters]])
    merged, sources = adapters[0], adapters[1:]
    calibrations = [load_calibration(p) for p in args.calibration] if args.calibration else None
    options = calibration_options(args)
    model, tokenizer, prompts = args.model, None, args.prompts
    if generating(args):
        model, tokenizer = load_model(args.model, device=args.device, quiet=args.quiet)
        prompts = generated_prompt_sets(args, sources, model, tokenizer)
    result = score(merged, sources, model=model, tokenizer=tokenizer, prompts=prompts, calibration=calibrations,
                   positions=args.positions, max_prompts=options["max_prompts"], max_length=options["max_length"],
                   batch_size=options["batch_size"], prompts_format=options["prompts_format"], device=args.device,
                   progress=not args.quiet)
    if generating(args):
        result.extra["generated_prompts"] = generation_record(args)
    print(scores_table(result))
    write_scores(result, args.report, args.plot, overwrite=args.overwrite)
    print(f"score: {len(sources)} adapter(s) in {args.merged}, {time.perf_counter() - started:.1f} s")
    return 0


def write_scores(result: Scores, report: str | None, plot: str | None, *, overwrite: bool = False) -> None:
    from ..card import retention_png
    from ..outputs import write_json_atomic

    if report:
        write_json_atomic(report, result.to_dict(), overwrite=overwrite)
    if plot:
        image = retention_png(dict(zip(result.names, result.retention)))
        if image is None:
            raise OutputError(f"--plot {plot!r} needs matplotlib (pip install matplotlib)")
        partial = Path(plot).with_name(f".{Path(plot).name}.partial")
        partial.write_bytes(image)
        partial.replace(plot)
