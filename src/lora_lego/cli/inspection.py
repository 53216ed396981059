"""`lora-lego inspect`: describe adapters, calibrations and merge reports; whether each adapter loads in a
serving target (--target); the recipe that makes each of our outputs again (--recipe)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..deploy.targets import TARGETS
from ..errors import LoraLegoError
from .options import add_input_options, add_revision


def add_parser(commands) -> None:
    cmd = commands.add_parser("inspect", help="describe adapters, or summarise a merge report (.json)")
    cmd.add_argument("paths", nargs="+", metavar="ADAPTER_OR_REPORT",
                     help="adapter folders or files, calibrations, or merge reports (.json)")
    add_input_options(cmd)
    cmd.add_argument("--target", choices=list(TARGETS), help="say whether each adapter loads in this server, and why "
                     "not")
    cmd.add_argument("--recipe", action="store_true", help="print a recipe (for `lora-lego run`) that makes each "
                     "output again, from the provenance it records")
    add_revision(cmd)
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Describe each path by what it is: calibrations, merge reports (.json), adapters (or whether they load in
    --target); with --recipe, the recipe that makes each output again."""
    from ..calibration.grams import FILE_NAME as CALIBRATION_FILE
    from ..calibration.grams import load_calibration
    from ..formats import harmonise, load_adapter
    from .describe import describe_adapters, describe_report

    calibrations = [p for p in args.paths if (Path(p) / CALIBRATION_FILE).is_file() or p.endswith(CALIBRATION_FILE)]
    reports = [Path(p) for p in args.paths if p.endswith(".json") and p not in calibrations]
    folders = [p for p in args.paths if not p.endswith(".json") and p not in calibrations]
    for path in calibrations:
        summary = load_calibration(path).summary()
        print(f"{path}: calibration\n" + "\n".join(f"  {key}: {value}" for key, value in summary.items()))
    if args.recipe:
        return print_recipe(args.paths, args)
    for report in reports:
        print(describe_report(report))
    if folders and args.target:
        return inspect_target(args, folders)
    if folders:
        adapters = [load_adapter(path, lazy=True, expand=args.expand, expand_rank=args.expand_rank,
                                 base_config=args.base_config) for path in folders]
        print(describe_adapters(harmonise(adapters)))
    return 0


def inspect_target(args: argparse.Namespace, paths: list[str]) -> int:
    """Whether each adapter loads in the target, and why not (from its config when lora-lego cannot read it)."""
    from ..deploy.targets import config_refusals, get_target
    from ..deploy.targets import describe as describe_target
    from ..formats import load_adapter

    target = get_target(args.target)
    for path in paths:
        try:
            adapter = load_adapter(path, lazy=True, expand=args.expand, expand_rank=args.expand_rank,
                                   base_config=args.base_config)
        except LoraLegoError as error:
            config = Path(path) / "adapter_config.json"
            try:
                reasons = config_refusals(json.loads(config.read_text()), target) if config.is_file() else []
            except (OSError, ValueError):
                reasons = []  # an unreadable config: lora-lego's own error says what is wrong
            if not reasons:
                raise
            print(f"{path}: {target.name}: does not load: " + "; ".join(reasons)
                  + f" (lora-lego: {' '.join(str(error).split())})")
            continue
        print(f"{path}: {describe_target(adapter, target)}")
    return 0


def print_recipe(paths: list[str], args: argparse.Namespace) -> int:
    """`inspect --recipe`: a recipe that makes each output again, from the provenance it records."""
    from ..formats import load_adapter
    from .recipe import dump, from_provenance

    entries, notes = [], []
    for path in paths:
        adapter = load_adapter(path, lazy=True, expand=args.expand, expand_rank=args.expand_rank,
                               base_config=args.base_config)
        provenance = adapter.metadata.get("provenance")
        if not provenance:
            raise LoraLegoError(f"{path}: records no lora-lego provenance (not written by lora-lego), so no recipe")
        entry, said = from_provenance(provenance, path)
        entries.append(entry)
        notes += said
    print(dump(entries, notes), end="")
    return 0
