"""`lora-lego run RECIPE`: the merges of a recipe file, validated as a whole first, then run by the merge
command's own code, in order or in --jobs N processes (a merge waits for those whose outputs it reads); each
output records the recipe in its provenance. (`inspect --recipe` prints a recipe back from any of our outputs.)"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shlex
import sys
import time
from pathlib import Path

from ..errors import LoraLegoError
from .recipe import Merge, RecipeError, read_recipe


def add_parser(commands) -> None:
    cmd = commands.add_parser("run", help="run the merges of a recipe file (YAML or JSON)")
    cmd.add_argument("recipe", metavar="RECIPE", help="a .yaml / .yml or .json file (see examples/recipe.yaml)")
    cmd.add_argument("--dry-run", action="store_true", help="validate the file and print the merge commands it "
                     "stands for; run nothing")
    cmd.add_argument("--jobs", type=int, default=1, metavar="N", help="merges run side by side in N processes (a "
                     "merge that reads another's output waits for it; default 1: in file order)")
    cmd.add_argument("--overwrite", action="store_true", help="replace existing outputs (overwrite: true in every "
                     "merge)")
    cmd.add_argument("-q", "--quiet", action="store_true", help="no progress")
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise LoraLegoError(f"--jobs must be at least 1; got {args.jobs}")
    try:
        merges = read_recipe(args.recipe, overwrite=args.overwrite)
    except RecipeError as error:  # every problem of the file, one line each
        for problem in error.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"{args.recipe}: {len(merges)} merge(s), valid; would run:")
        for merge in merges:
            print(f"{merge.key}: lora-lego {shlex.join(merge.argv)}")
        return 0
    started = time.perf_counter()
    if args.jobs == 1 or len(merges) == 1:
        for merge in merges:
            try:
                run_one(merge.argv, _record(args.recipe, merge), args.quiet)
            except LoraLegoError as error:
                raise LoraLegoError(f"{args.recipe}: {merge.key}: {error}") from error
    else:
        code = _run_in_processes(args, merges)
        if code:
            return code
    print(f"run: {len(merges)} merge(s) of {args.recipe} done, {time.perf_counter() - started:.1f} s")
    return 0


def run_one(argv: list[str], record: dict, quiet: bool) -> int:
    """One merge through the merge command's own code, its output recording the recipe."""
    from ..hub import default_revision
    from . import merge

    args = merge.merge_parser().parse_args(argv + (["-q"] if quiet else []))
    args.recipe = record
    with default_revision(args.revision):
        return merge.run(args)


def _record(path: str, merge: Merge) -> dict:
    return {"file": str(path), "key": merge.key, "merge": merge.entry}


def _waves(merges: list[Merge]) -> list[list[int]]:
    """The merges grouped so that each group reads only outputs of earlier groups."""
    outputs = {str(Path(m.entry["output"]).resolve()): i for i, m in enumerate(merges)}
    level: list[int] = []
    for merge in merges:
        paths = [item if isinstance(item, str) else item["path"] for item in merge.entry["inputs"]]
        reads = [outputs.get(str(Path(path).resolve())) for path in paths]
        level.append(1 + max((level[j] for j in reads if j is not None), default=-1))
    return [[i for i, lv in enumerate(level) if lv == wave] for wave in range(max(level) + 1)]


def _run_in_processes(args: argparse.Namespace, merges: list[Merge]) -> int:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    context = get_context("spawn")  # no fork of a process that holds torch's threads
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
        for wave in _waves(merges):
            futures = {pool.submit(_job, merges[i].argv, _record(args.recipe, merges[i]), threads): merges[i]
                       for i in wave}
            failed = []
            for future in as_completed(futures):
                merge = futures[future]
                error, output = future.result()
                for line in output.splitlines():
                    print(f"{merge.key}: {line}")
                if error is not None:
                    failed.append(f"{args.recipe}: {merge.key}: {error}")
            if failed:
                for line in failed:
                    print(f"error: {line}", file=sys.stderr)
                return 2
    return 0


def _job(argv: list[str], record: dict, threads: int) -> tuple[str | None, str]:
    """In a worker process: (the error in one line or None, what the merge printed)."""
    import torch

    torch.set_num_threads(threads)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            run_one(argv, record, quiet=True)
    except LoraLegoError as error:
        return " ".join(str(error).split()), output.getvalue()
    except Exception as error:  # a bug: still one line
        return f"internal error ({type(error).__name__}: {' '.join(str(error).split())})", output.getvalue()
    return None, output.getvalue()
