"""The merge of the `lora-lego merge` command with its evidence: plain, scored on the adapters' prompts when given
(--model/--prompts or --generate-prompts), chosen by retention (--method auto, -p scale=auto), or regmean_pp (which
runs the model while it merges). Thin, over `merge`, `calibration.auto` and `calibration.regmean_pp`."""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

from .calibrate import calibration_options, calibrations_for_merge
from .generation import generated_prompt_sets, generating, generation_record


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
        return _scored(args, _regmean_pp(args, adapters, params, model, tokenizer, weights, options), adapters, model,
                       tokenizer, options)
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


def _regmean_pp(args: argparse.Namespace, adapters: list, params: dict[str, Any], model, tokenizer, weights,
                options: dict):
    """regmean_pp's merge: its Grams are taken on the model as it merges it (--activations adapted: `within`)."""
    from ..calibration.regmean_pp import SPEC, merge_regmean_pp

    resolved = SPEC.resolve(params)
    if args.activations == "adapted":
        resolved.setdefault("within", "adapter")
    calibration = calibration_options(args)
    return merge_regmean_pp(adapters, model=model, tokenizer=tokenizer, prompts=args.prompts, weights=weights,
                            seed=args.seed, progress=not args.quiet, threads=args.threads,
                            gram_memory=calibration["gram_memory"], **options, **resolved)


def _scored(args: argparse.Namespace, merged, adapters: list, model, tokenizer, options: dict):
    """(merged, its Scores on the adapters' prompts), or (merged, None) without a model."""
    if model is None:
        return merged, None
    from ..calibration.auto import score

    result = score(merged, adapters, model=model, tokenizer=tokenizer, prompts=args.prompts,
                   positions=args.positions, progress=not args.quiet, **options)
    merged.metadata["provenance"]["retention"] = dict(zip(result.names, result.retention))
    return merged, result
