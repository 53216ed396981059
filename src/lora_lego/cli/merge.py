"""`lora-lego merge` and `prune`: check everything before any work, load the adapters lazily, merge (scored or
chosen on prompts when given, see `cli_score`), check what the target server loads, write, and say what was made."""

from __future__ import annotations

import argparse
import time
from typing import Sequence

from ..allocate import allocation_rule
from ..calibration.regmean_pp import SPEC as REGMEAN_PP
from ..deploy.targets import check_loads, fit_rank, get_target, serve_line
from ..errors import MethodError, TargetError
from ..formats import harmonise, load_adapter, output_format, save_adapter
from ..merge import check_device, scale_rule
from ..methods import get_method
from ..outputs import check_output_path, check_report_path, dtype_from_name, write_json_atomic
from .calibrate import check_calibration_args
from .convert import folder_note, written_words
from .score import DATA_FREE_NOTE, candidates_table, distance_words, merge_with_evidence, scores_table


def run_merge(args: argparse.Namespace) -> int:
    params = parse_params(args.param)
    if args.rank is not None:
        if "rank" in params:
            raise MethodError(
                f"the rank is given twice (--rank {args.rank} and -p rank={params['rank']}); give it once")
        params["rank"] = args.rank
    if args.dtype:
        dtype_from_name(args.dtype)
    choose = args.method == "auto" or str(params.get("scale", "")).strip().lower() == "auto"
    if choose:
        params.pop("scale", None)
        if args.pico:
            raise MethodError("--pico is not a candidate of --method auto / -p scale=auto; leave one of them out")
    if args.method == "regmean_pp":
        spec = REGMEAN_PP
        if args.calibration is not None or (args.prompts is None and not args.generate_prompts):
            raise MethodError("regmean_pp takes its Grams on the model as it merges it: give --model BASE_DIR "
                              "--prompts P1 P2 ... (or --generate-prompts N)"
                              + (", not --calibration" if args.calibration is not None else ""))
    else:
        spec = get_method("regmean" if args.method == "auto" else args.method)  # auto: the candidates' rank
    spec.resolve(allocation_rule(scale_rule(params)[1])[1])  # fail fast on a bad method, parameter or device
    check_device(args.device)
    needs = (spec.needs_calibration or spec is REGMEAN_PP) and args.method != "auto"
    check_calibration_args(args, needs, choose=choose)
    target = get_target(args.target) if args.target else None
    written = output_format(args.output, format=args.format)  # an unknown --format fails before any work
    if target is not None and written not in target.formats:
        raise TargetError(f"{target.name} loads {' / '.join(target.formats)} adapters; write a folder, not "
                          f"{args.output!r} ({written})")
    if target is not None and args.rank is not None:
        fit_rank(target, args.rank)  # a rank above what it serves fails before any work; the rank itself is kept
    check_output_path(args.output, args.adapters, overwrite=args.overwrite)
    if args.report:  # checked before any work: a report that cannot be written must not leave an output behind
        check_report_path(args.report, args.adapters, args.output, overwrite=args.overwrite)
    started = time.perf_counter()
    adapters = harmonise([load_adapter(path, lazy=True, expand=args.expand, expand_rank=args.expand_rank,
                                       base_config=args.base_config)
                          for path in args.adapters])  # read module by module while merging; one naming
    merged, scores = merge_with_evidence(args, adapters, args.method, params, needs=needs, choose=choose)
    if getattr(args, "recipe", None):  # `lora-lego run`: the output records the recipe merge it came from
        merged.metadata["provenance"]["recipe"] = args.recipe
    flag = check_loads(merged, target, written) if target is not None else None  # before anything is written
    save_adapter(merged, args.output, format=args.format, dtype=args.dtype, overwrite=args.overwrite,
                 base_config=args.base_config)
    if args.report:
        write_json_atomic(args.report, {"provenance": merged.metadata["provenance"],
                                        "modules": merged.metadata["report"]}, overwrite=args.overwrite)
    provenance = merged.metadata["provenance"]
    if choose:
        print(candidates_table(provenance["auto"], [a.name for a in adapters]))
    elif scores is not None:
        print(scores_table(scores))
    report = merged.metadata["report"].values()
    ranks = sorted({entry["rank"] for entry in report})
    written = output_format(args.output, merged, args.format)
    method = provenance["method"] + (f" (auto: {provenance['auto']['chosen']})" if choose else "")
    print(f"{args.command}: {len(adapters)} adapter(s) -> {args.output} ({written_words(written)}) with {method}: "
          f"{len(merged)} modules, rank {'/'.join(map(str, ranks))}, {merged.num_parameters():,} parameters, "
          f"{distance_words(report, args.command)}"
          + (f", mean retention {scores.mean:.3f} (worst {scores.worst:.3f})" if scores is not None else "")
          + f", {time.perf_counter() - started:.1f} s")
    note = folder_note(merged, written, args.output)
    if note is not None:
        print(note)
    if flag is not None:
        print(serve_line(target, flag, merged.max_rank))
    if scores is None and args.command == "merge" and len(adapters) > 1 and not spec.needs_calibration:
        print(DATA_FREE_NOTE)
    return 0


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
