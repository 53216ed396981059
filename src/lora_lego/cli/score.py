"""The evidence side of the `lora-lego` command: `score`, `merge --method auto` / `-p scale=auto`, and the
retention table printed after a merge given --model/--prompts (thin, over `auto.merge_auto` and `auto.score`)."""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..defaults import POSITIONS
from ..errors import MethodError, OutputError
from .calibrate import (
    _calibration_options,
    add_calibration_options,
    calibrations_for_merge,
    check_calibration_args,
)
from .generation import (
    add_generation_options,
    check_generation_args,
    generated_prompt_sets,
    generating,
    generation_record,
)

if TYPE_CHECKING:
    from ..calibration.score import Scores

DATA_FREE_NOTE = ("note: data-free merges vary with the adapters (no rule without data suits every set); give "
                  "--model BASE_DIR --prompts P1 P2 ... to measure what each adapter keeps, and --method auto to "
                  "choose the method and scale on them")


def add_evidence_options(group) -> None:
    group.add_argument("--positions", choices=POSITIONS, default="last",
                       help="score the next token after each prompt (last, default) or every prompt position (all)")


def add_score_parser(commands) -> None:
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


def run_score(args: argparse.Namespace) -> int:
    from ..calibration.auto import score
    from ..calibration.calibrate import load_model
    from ..calibration.grams import load_calibration
    from ..formats import harmonise, load_adapter
    from ..merge import check_device
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
    options = _calibration_options(args)
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


def scores_table(result: Scores) -> str:
    """The per-adapter table: retention, the two divergences, and the Gram proxy when computed."""
    width = max(len("adapter"), *(len(n) for n in result.names))
    head = f"{'adapter':<{width}}  retention  KL(task||merged)  KL(task||base)" + ("  proxy" if result.proxy else "")
    lines = [head]
    for i, name in enumerate(result.names):
        line = f"{name:<{width}}  {result.retention[i]:>9.3f}  {result.kl_merged[i]:>16.4g}  {result.kl_base[i]:>14.4g}"
        lines.append(line + (f"  {result.proxy[i]:>5.3f}" if result.proxy else ""))
    worst = result.names[result.retention.index(result.worst)]
    lines.append(f"mean retention {result.mean:.3f}, worst {result.worst:.3f} ({worst}); {result.positions} "
                 "position(s) of each adapter's prompts; 1 = like the task model, 0 = like the base model")
    return "\n".join(lines)


def candidates_table(auto: dict[str, Any], names: list[str]) -> str:
    short = [n.rstrip("/").split("/")[-1][:12] for n in names]
    lines = [f"{'candidate':<34} {'mean':>6} {'worst':>6}  " + " ".join(f"{s:>12}" for s in short)]
    for c in auto["candidates"]:
        mark = "*" if c["label"] == auto["chosen"] else " "
        lines.append(f"{mark}{c['label']:<33} {c['mean_retention']:>6.3f} {c['worst_retention']:>6.3f}  "
                     + " ".join(f"{r:>12.3f}" for r in c["retention"]))
    return "\n".join(lines)


def merge_with_evidence(args: argparse.Namespace, adapters: list, method: str, params: dict[str, Any], *,
                        needs: bool, choose: bool):
    """The merge of the CLI: plain, scored on --prompts when given, or chosen by retention (auto, scale=auto).
    Returns (merged adapter, Scores or None)."""
    from ..calibration.calibrate import load_model

    model = tokenizer = None
    if args.command == "merge" and (args.prompts is not None or generating(args)):
        model, tokenizer = load_model(args.model, device=args.device, quiet=args.quiet)
    if generating(args):  # from here on, each adapter's generated prompts take --prompts' place
        args.prompts = generated_prompt_sets(args, adapters, model, tokenizer)
    merged, scores = _merge_with_evidence(args, adapters, method, params, model, tokenizer, needs=needs,
                                          choose=choose)
    if generating(args):
        merged.metadata["provenance"]["generated_prompts"] = generation_record(args)
    if model is not None:  # what the retention (or the choice) was measured with: a recipe can name them again
        files = None if generating(args) else [str(p) for p in args.prompts]
        merged.metadata["provenance"]["evidence"] = {"model": str(args.model), "prompts": files}
    return merged, scores


def _merge_with_evidence(args: argparse.Namespace, adapters: list, method: str, params: dict[str, Any], model,
                         tokenizer, *, needs: bool, choose: bool):
    from ..calibration.auto import merge_auto
    from ..calibration.score import Scores
    from ..merge import merge

    weights = getattr(args, "weights", None)
    options = {"max_prompts": args.max_prompts, "max_length": args.max_length, "batch_size": args.batch_size,
               "prompts_format": args.prompts_format} if args.command == "merge" else {}
    if method == "regmean_pp":
        from ..calibration.regmean_pp import SPEC, merge_regmean_pp

        resolved = SPEC.resolve(params)
        if args.activations == "adapted":
            resolved.setdefault("within", "adapter")
        calibration = _calibration_options(args)
        merged = merge_regmean_pp(adapters, model=model, tokenizer=tokenizer, prompts=args.prompts, weights=weights,
                                  seed=args.seed, progress=not args.quiet, threads=args.threads,
                                  gram_memory=calibration["gram_memory"], **options, **resolved)
        return _scored(args, merged, adapters, model, tokenizer, options)
    grams = calibrations_for_merge(args, adapters, model, tokenizer, union=choose) if needs or choose else \
        contextlib.nullcontext(None)  # a data-free merge given prompts is only scored: no Grams needed
    with grams as calibrations:
        if choose:
            rank = params.pop("rank", None)
            methods = None if method == "auto" else [" ".join([method, *(f"{k}={v}" for k, v in params.items())])]
            merged = merge_auto(adapters, model=model, tokenizer=tokenizer, prompts=args.prompts,
                                calibration=calibrations, rank=rank, methods=methods, weights=weights, seed=args.seed,
                                positions=args.positions, progress=not args.quiet, threads=args.threads,
                                device=args.device, **options)
            retention = merged.metadata["provenance"]["retention"]
            return merged, Scores(list(retention), list(retention.values()), [], [], args.positions, [])
        merged = merge(adapters, method, weights=weights, seed=args.seed, progress=not args.quiet,
                       threads=args.threads, device=args.device, calibration=calibrations if needs else None,
                       pico=args.pico, **params)
        return _scored(args, merged, adapters, model, tokenizer, options)


def _scored(args: argparse.Namespace, merged, adapters: list, model, tokenizer, options: dict):
    """(merged, its Scores on the adapters' prompts), or (merged, None) without a model."""
    if model is None:
        return merged, None
    from ..calibration.auto import score

    result = score(merged, adapters, model=model, tokenizer=tokenizer, prompts=args.prompts,
                   positions=args.positions, progress=not args.quiet, **options)
    merged.metadata["provenance"]["retention"] = dict(zip(result.names, result.retention))
    return merged, result


def distance_words(report, command: str) -> str:
    """What the per-module relative errors say, in words that nobody reads as a quality score."""
    errors = [entry["relative_error"] for entry in report]
    finite = [e for e in errors if math.isfinite(e)]
    shown = f"{sum(finite) / len(finite):.3g}" if finite else "n/a"
    shown += f" ({len(errors) - len(finite)} module(s) whose deltas cancel exactly left out)" if len(finite) < len(
        errors) else ""
    if command == "prune":
        return f"relative error of the pruned deltas {shown} (0 = unchanged)"
    return (f"distance from the exact sum {shown} (0 = the weighted sum of the deltas, which tsv, ties and iso_c "
            "do not aim for: not a quality score)")


__all__ = ["add_score_parser", "run_score", "merge_with_evidence", "check_calibration_args", "DATA_FREE_NOTE",
           "distance_words"]
