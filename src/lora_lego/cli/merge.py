"""`lora-lego merge` and `prune`: check everything before any work (the same named checks that validate a recipe),
load the adapters lazily, merge (scored or chosen on prompts when given, see `evidence`), check what the target
server loads, write, and say what was made."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import MethodError
from ..methods.registry import DEFAULT_METHOD, PRUNE_METHOD
from .options import (
    Parser,
    add_calibration_options,
    add_evidence_options,
    add_generation_options,
    add_merge_options,
    subcommands,
)


def add_parser(commands) -> None:
    merge = commands.add_parser("merge", help="merge several adapters into one")
    merge.add_argument("adapters", nargs="+", metavar="ADAPTER",
                       help="PEFT LoRA folders or .safetensors files (kohya / LyCORIS / diffusers)")
    merge.add_argument("--method", default=DEFAULT_METHOD,
                       help=f"merge method (see `lora-lego methods`; default {DEFAULT_METHOD}), or auto: the best "
                       "candidate by each adapter's retention on --prompts")
    merge.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per adapter")
    add_merge_options(merge, rank_required=False)
    calibrated = merge.add_argument_group("prompts: calibration (regmean, lego_calibrated), scoring, auto")
    calibrated.add_argument("--model", help="base model folder (transformers), with --prompts: calibrates the "
                            "calibrated methods, scores every merge (retention per adapter), and drives auto")
    calibrated.add_argument("--prompts", nargs="+", metavar="FILE", help="one prompts file per adapter, in order "
                            "(.jsonl with {\"text\": ...} per line, or .txt with one prompt per line)")
    calibrated.add_argument("--calibration", nargs="+", metavar="CALIB",
                            help="one saved calibration per adapter (from `lora-lego calibrate`), instead of --prompts")
    calibrated.add_argument("--activations", choices=["base", "adapted"], default="base",
                            help="take each task's inputs from the base model (default) or from the model with "
                                 "that task's adapter applied")
    add_calibration_options(calibrated)
    add_generation_options(calibrated)
    add_evidence_options(calibrated)
    merge.set_defaults(run=run)

    prune = commands.add_parser("prune", help="reduce one adapter to a lower rank (truncated SVD, or --method lego)")
    prune.add_argument("adapters", nargs=1, metavar="ADAPTER", help="a PEFT LoRA folder or a .safetensors file")
    prune.add_argument("--method", default=PRUNE_METHOD,
                       help=f"method used to prune (default {PRUNE_METHOD}: the truncated SVD of each delta, the best "
                       "measured; lego: LoRA-LEGO's clustering of the ranks)")
    add_merge_options(prune, rank_required=True)
    prune.set_defaults(run=run)


def merge_parser() -> argparse.ArgumentParser:
    """A parser of `merge` and `prune` alone: what a recipe's merge stands for."""
    parser = Parser(prog="lora-lego")
    add_parser(subcommands(parser))
    return parser


@dataclass
class Request:
    """A merge as asked for: the method's parameters (with --rank), and whether it is chosen on prompts."""

    method: str
    params: dict[str, Any]
    choose: bool  # --method auto or -p scale=auto: candidates scored on the adapters' prompts
    spec: Any = None  # the method's spec, found by the "method" check (auto: regmean's, for the candidates' rank)

    @property
    def needs(self) -> bool:
        """The method needs calibration data (not auto: it calibrates its calibrated candidates itself)."""
        return (self.spec.needs_calibration or self.spec.name == "regmean_pp") and self.method != "auto"


def request(args: argparse.Namespace, params: dict[str, Any]) -> Request:
    """The request of a parsed command line whose -p items are `params` (--rank not yet among them)."""
    params = dict(params)
    if args.rank is not None:
        params["rank"] = args.rank
    choose = args.method == "auto" or str(params.get("scale", "")).strip().lower() == "auto"
    if choose:
        params.pop("scale", None)
    return Request(args.method, params, choose)


def checks(args: argparse.Namespace, asked: Request) -> list[tuple[str, Callable[[], Any]]]:
    """What the command refuses before any work, in order, each under the recipe key it is reported by."""
    from ..allocate import allocation_rule
    from ..compute import check_device
    from ..formats import output_format
    from ..merge import scale_rule
    from ..outputs import check_output_path, check_report_path

    def method() -> None:  # auto: the candidates' rank parameter is regmean's
        asked.spec = _method_spec("regmean" if args.method == "auto" else args.method)

    inputs = [path for path in args.adapters if Path(path).exists()]  # the others: Hub ids, or a recipe's outputs
    return [
        ("pico", lambda: _check_pico(args, asked)),
        ("method", method),
        ("params", lambda: asked.spec.resolve(allocation_rule(scale_rule(asked.params)[1])[1])),
        ("device", lambda: check_device(args.device)),
        ("calibration", lambda: _check_calibration(args, asked)),
        ("format", lambda: output_format(args.output, format=args.format)),
        ("target", lambda: _check_target(args)),
        ("output", lambda: check_output_path(args.output, inputs, overwrite=args.overwrite)),
        # a report that cannot be written must not leave an output behind
        ("report", lambda: args.report and check_report_path(args.report, inputs, args.output,
                                                             overwrite=args.overwrite)),
    ]


def _method_spec(name: str):
    """A method's spec; regmean_pp is not a per-module method, its spec checks its -p values all the same."""
    from ..calibration.regmean_pp import SPEC as REGMEAN_PP
    from ..methods import get_method

    return REGMEAN_PP if name == "regmean_pp" else get_method(name)


def _check_pico(args: argparse.Namespace, asked: Request) -> None:
    if asked.choose and args.pico:
        raise MethodError("--pico is not a candidate of --method auto / -p scale=auto; leave one of them out")


def _check_calibration(args: argparse.Namespace, asked: Request) -> None:
    """The calibration data the method needs, and only that."""
    from .calibrate import check_calibration_args
    from .generation import generating

    if args.method == "regmean_pp" and args.calibration is not None:
        raise MethodError("regmean_pp takes its Grams on the model as it merges it: give --model BASE_DIR --prompts "
                          "P1 P2 ... (or --generate-prompts N), not --calibration")
    if args.method == "regmean_pp" and args.prompts is None and not generating(args):
        raise MethodError("method 'regmean_pp' needs calibration data taken on the model as it merges it: give "
                          "--model BASE_DIR --prompts P1 P2 ... (or --generate-prompts N)")
    check_calibration_args(args, asked.needs, choose=asked.choose)


def _check_target(args: argparse.Namespace) -> None:
    """The target loads the format written and serves the rank asked for (the rank itself is kept)."""
    from ..deploy.targets import fit_rank, get_target
    from ..errors import TargetError
    from ..formats import output_format

    if args.target is None:
        return
    target, written = get_target(args.target), output_format(args.output, format=args.format)
    if written not in target.formats:
        raise TargetError(f"{target.name} loads {' / '.join(target.formats)} adapters; write a folder, not "
                          f"{args.output!r} ({written})")
    if args.rank is not None:
        fit_rank(target, args.rank)


def run(args: argparse.Namespace) -> int:
    params = parse_params(args.param)
    if args.rank is not None and "rank" in params:
        raise MethodError(f"the rank is given twice (--rank {args.rank} and -p rank={params['rank']}); give it once")
    asked = request(args, params)
    for _, check in checks(args, asked):
        check()
    started = time.perf_counter()
    merged, scores, adapters = _merge(args, asked)
    flag = _write(args, merged)
    _say(args, merged, scores, adapters, asked, flag, time.perf_counter() - started)
    return 0


def _merge(args: argparse.Namespace, asked: Request):
    """(merged adapter, its Scores or None, the adapters): read module by module while merging, in one naming."""
    from ..formats import harmonise, load_adapter
    from .evidence import merge_with_evidence

    adapters = harmonise([load_adapter(path, lazy=True, expand=args.expand, expand_rank=args.expand_rank,
                                       base_config=args.base_config) for path in args.adapters])
    merged, scores = merge_with_evidence(args, adapters, args.method, asked.params,
                                         needs=asked.needs, choose=asked.choose)
    if getattr(args, "recipe", None):  # `lora-lego run`: the output records the recipe merge it came from
        merged.metadata["provenance"]["recipe"] = args.recipe
    return merged, scores, adapters


def _write(args: argparse.Namespace, merged) -> str | None:
    """Check what the target loads (before anything is written), then write the adapter and the report. Returns
    the target's rank flag to serve it with, if any."""
    from ..deploy.targets import check_loads, get_target
    from ..formats import output_format, save_adapter
    from ..outputs import write_json_atomic

    flag = None
    if args.target is not None:
        flag = check_loads(merged, get_target(args.target), output_format(args.output, format=args.format))
    save_adapter(merged, args.output, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
                 base_config=args.base_config)
    if args.report:
        write_json_atomic(args.report, {"provenance": merged.metadata["provenance"],
                                        "modules": merged.metadata["report"]}, overwrite=args.overwrite)
    return flag


def _say(args: argparse.Namespace, merged, scores, adapters: list, asked: Request, flag: str | None,
         seconds: float) -> None:
    """The tables (candidates, or retention), the summary line, and the notes a user may want."""
    from ..deploy.targets import get_target, serve_line
    from ..formats import output_format
    from .lines import DATA_FREE_NOTE, candidates_table, distance_words, folder_note, scores_table, written_words

    provenance = merged.metadata["provenance"]
    if asked.choose:
        print(candidates_table(provenance["auto"], [a.name for a in adapters]))
    elif scores is not None:
        print(scores_table(scores))
    report = merged.metadata["report"].values()
    ranks = sorted({entry["rank"] for entry in report})
    written = output_format(args.output, merged, args.format)
    method = provenance["method"] + (f" (auto: {provenance['auto']['chosen']})" if asked.choose else "")
    print(f"{args.command}: {len(adapters)} adapter(s) -> {args.output} ({written_words(written)}) with {method}: "
          f"{len(merged)} modules, rank {'/'.join(map(str, ranks))}, {merged.num_parameters():,} parameters, "
          f"{distance_words(report, args.command)}"
          + (f", mean retention {scores.mean:.3f} (worst {scores.worst:.3f})" if scores is not None else "")
          + f", {seconds:.1f} s")
    note = folder_note(merged, written, args.output)
    if note is not None:
        print(note)
    if flag is not None:
        print(serve_line(get_target(args.target), flag, merged.max_rank))
    if scores is None and args.command == "merge" and len(adapters) > 1 and not asked.spec.needs_calibration:
        print(DATA_FREE_NOTE)


def parse_params(items: Sequence[str]) -> dict[str, str]:
    """The -p KEY=VALUE items as a dict; MethodError for an item without "=" or a key given twice."""
    params: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MethodError(f"method parameter {item!r} must look like key=value")
        if key in params:
            raise MethodError(f"method parameter {key!r} is given twice "
                              f"(-p {key}={params[key]} and -p {item.strip()}); give it once")
        params[key] = value.strip()
    return params
