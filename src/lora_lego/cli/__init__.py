"""The `lora-lego` command: a thin layer over the public API (merge, prune, methods, inspect)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
import warnings
from pathlib import Path
from typing import Sequence

# Building the parser imports no torch (nor transformers, safetensors, ...): each command imports what it needs
# when it runs, so that `lora-lego --help` and `lora-lego methods` answer in a fraction of a second.
from .._version import version
from ..deploy.targets import TARGETS
from ..errors import LoraLegoError
from ..hub import default_revision
from ..methods.registry import DEFAULT_METHOD, PRUNE_METHOD
from ..oserrors import os_errno, reason
from ..signals import BROKEN_PIPE, INTERRUPTED, TERMINATED, Terminated, command_signals, silence_stdout
from .apply import add_apply_parser
from .calibrate import add_calibration_options
from .convert import add_input_options, add_output_format, add_target_option
from .generation import add_generation_options
from .run import add_run_parser
from .score import add_evidence_options, add_score_parser


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other error
        raise _UsageError(f"{self.prog}: {message}")


class _UsageError(Exception):
    pass


class _Version(argparse.Action):
    """--version, read from the package metadata only when asked for (what argparse's "version" action does,
    without paying for importlib.metadata at every start)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="show program's version number and exit"):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"lora-lego {version()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-lego", description="Merge, prune and convert LoRA adapters (PEFT folders; kohya, "
                     "LyCORIS and diffusers .safetensors files; llama.cpp .gguf adapters), and fold them into a base.")
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    merge_cmd = commands.add_parser("merge", help="merge several adapters into one")
    merge_cmd.add_argument("adapters", nargs="+", metavar="ADAPTER",
                           help="PEFT LoRA folders or .safetensors files (kohya / LyCORIS / diffusers)")
    merge_cmd.add_argument("--method", default=DEFAULT_METHOD,
                           help=f"merge method (see `lora-lego methods`; default {DEFAULT_METHOD}), or auto: the "
                           "best candidate by each adapter's retention on --prompts")
    merge_cmd.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per adapter")
    _add_common(merge_cmd, rank_required=False)
    calibrated = merge_cmd.add_argument_group("prompts: calibration (regmean, lego_calibrated), scoring, auto")
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

    calibrate_cmd = commands.add_parser("calibrate",
                                        help="input Grams of a base model on prompts, for calibrated merges")
    calibrate_cmd.add_argument("--model", required=True, help="base model folder (transformers)")
    calibrate_cmd.add_argument("--prompts", metavar="FILE", help="prompts file (.jsonl or .txt)")
    calibrate_cmd.add_argument("-o", "--output", required=True, help="output folder")
    calibrate_cmd.add_argument("--modules", nargs="+", metavar="PATH",
                               help="module paths to calibrate (default: every linear layer)")
    calibrate_cmd.add_argument("--adapter", help="apply this adapter during the passes (its task's own activations)")
    calibrate_cmd.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda or cuda:N")
    calibrate_cmd.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    calibrate_cmd.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_calibration_options(calibrate_cmd)
    add_generation_options(calibrate_cmd)

    prune_cmd = commands.add_parser("prune",
                                    help="reduce one adapter to a lower rank (truncated SVD, or --method lego)")
    prune_cmd.add_argument("adapters", nargs=1, metavar="ADAPTER", help="a PEFT LoRA folder or a .safetensors file")
    prune_cmd.add_argument("--method", default=PRUNE_METHOD,
                           help=f"method used to prune (default {PRUNE_METHOD}: the truncated SVD of each delta, the "
                           "best measured; lego: LoRA-LEGO's clustering of the ranks)")
    _add_common(prune_cmd, rank_required=True)

    convert_cmd = commands.add_parser("convert", help="rewrite an adapter in another format, exactly (checked)")
    convert_cmd.add_argument("adapters", nargs=1, metavar="ADAPTER", help="a PEFT LoRA folder or a .safetensors file")
    convert_cmd.add_argument("-o", "--output", required=True,
                             help="output: a folder (PEFT) or a .safetensors file (kohya or diffusers)")
    convert_cmd.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: the input's)")
    convert_cmd.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_output_format(convert_cmd)
    add_input_options(convert_cmd)
    add_target_option(convert_cmd)
    add_apply_parser(commands)
    add_score_parser(commands)
    add_run_parser(commands)

    commands.add_parser("methods", help="list the merge methods and their parameters")
    commands.add_parser("formats", help="list the adapter formats")
    inspect_cmd = commands.add_parser("inspect", help="describe adapters, or summarise a merge report (.json)")
    inspect_cmd.add_argument("paths", nargs="+", metavar="ADAPTER_OR_REPORT",
                             help="adapter folders or files, calibrations, or merge reports (.json)")
    add_input_options(inspect_cmd)
    inspect_cmd.add_argument("--target", choices=list(TARGETS), help="say whether each adapter loads in this server, "
                             "and why not")
    inspect_cmd.add_argument("--recipe", action="store_true", help="print a recipe (for `lora-lego run`) that makes "
                             "each output again, from the provenance it records")

    bench_cmd = commands.add_parser("bench", help="offline benchmark on SmolLM2-135M and real tasks (extra [bench])")
    bench_cmd.add_argument("experiments", nargs="+", metavar="EXPERIMENT",
                           help="main, sweep, prune, hetero, seeds, heldout, autorank, calibrated, protocol, or all")
    bench_cmd.add_argument("--quick", action="store_true", help="2 tasks, 30 training steps, 100 test rows")
    bench_cmd.add_argument("--cache", help="cache folder (default $LORA_LEGO_CACHE or ~/.cache/lora-lego)")
    bench_cmd.add_argument("--out", help="results folder (default <cache>/runs/full or /quick)")
    bench_cmd.add_argument("--tasks", nargs="+", metavar="TASK", help="built-in task names or .jsonl files")
    bench_cmd.add_argument("--steps", type=int, help="training steps per task LoRA")
    bench_cmd.add_argument("--n-test", type=int, help="test rows per task")
    bench_cmd.add_argument("--training-seeds", type=int, nargs="+", default=[0, 1], metavar="SEED",
                           help="protocol: training seeds of the task LoRAs (default 0 1)")
    bench_cmd.add_argument("--model", help="a transformers causal-LM folder instead of SmolLM2 (e.g. for tests)")
    bench_cmd.add_argument("--device", default="cpu", help="where the model trains and evaluates: cpu (default), "
                           "cuda or cuda:N")
    bench_cmd.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                           help="bf16 autocast or fp32; auto (default): bf16 where the device computes it natively")
    for name in HUB_COMMANDS:  # adapters and base models may be Hub ids (owner/name[/file][@REV]) in these
        commands.choices[name].add_argument("--revision", metavar="REV", help="Hub revision (branch, tag or "
                                            "commit) of the Hub ids given without their own @REV (default main)")
    return parser


RANK_HELP = ("output rank k (the method's rank parameter); its default depends on the method: the largest input rank "
             "(lego, ties, task_arithmetic, auto, ...); every direction of the merge, at most the sum of the input "
             "ranks, for tsv, iso_c, iso_cts, star and wudi; the sum of the input ranks for regmean and regmean_pp "
             "(the exact solution); with -p allocate=greedy, an average (a parameter budget spread over the modules). "
             "concat and ensemble always give the sum, average the common input rank (they take no --rank)")
RANK_HELP_PRUNE = "output rank k (required); modules of a lower rank keep theirs"


def _add_common(command: argparse.ArgumentParser, *, rank_required: bool) -> None:
    command.add_argument("-o", "--output", required=True,
                         help="output folder (PEFT), .safetensors file (kohya / diffusers) or .gguf file (llama.cpp); "
                         "must not exist unless --overwrite")
    command.add_argument("--rank", type=int, required=rank_required,
                         help=RANK_HELP_PRUNE if rank_required else RANK_HELP)
    command.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    command.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                         help="method parameter, repeatable (e.g. -p n_init=20); -p scale=norm works with every "
                         "method (each module rescaled to the inputs' mean norm); -p scale=auto (with "
                         "--model/--prompts) "
                         "chooses the global scale by each adapter's retention on its prompts")
    command.add_argument("--pico", action="store_true", help="before the method, shrink the output directions the "
                         "adapters share (Pico, arXiv 2604.16826); implies -p scale=norm")
    command.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="output dtype (default: the inputs')")
    command.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    command.add_argument("--report", metavar="FILE.json", help="write the per-module merge report here")
    command.add_argument("--threads", type=int, metavar="N",
                         help="modules merged side by side, one torch thread each (default: torch's thread count)")
    command.add_argument("--device", default="cpu", help="where the math runs: cpu (default), cuda or cuda:N")
    command.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_output_format(command)
    add_input_options(command)
    add_target_option(command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 1 internal error, 130 / 143 interrupted /
    terminated, 141 stdout closed early)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    with warnings.catch_warnings(), command_signals():
        warnings.showwarning = _show_warning
        try:
            args = build_parser().parse_args(argv)
            with default_revision(getattr(args, "revision", None)):
                code = _COMMANDS[args.command](args)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
            return code
        except BrokenPipeError:  # `lora-lego methods | head -1`: the reader has all it wants
            silence_stdout()
            return BROKEN_PIPE
        except (LoraLegoError, _UsageError) as error:
            if debug:
                traceback.print_exc()
            print(f"error: {_one_line(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return INTERRUPTED
        except Terminated:
            print("error: terminated", file=sys.stderr)
            return TERMINATED
        except Exception as error:  # a bug: still one line unless --debug
            if debug:
                traceback.print_exc()
            if os_errno(error) is not None:  # an OS-level failure outside the writers (which raise OutputError)
                where = f" ({error.filename!r})" if getattr(error, "filename", None) else ""
                print(f"error: {reason(error)}{where}", file=sys.stderr)
                return 2
            print(f"error: internal error ({type(error).__name__}: {_one_line(error)}); "
                  "run with --debug for the traceback", file=sys.stderr)
            return 1


def _run_inspect(args: argparse.Namespace) -> int:
    from ..calibration.grams import FILE_NAME as CALIBRATION_FILE
    from ..calibration.grams import load_calibration
    from ..formats import harmonise, load_adapter
    from .convert import inspect_target
    from .describe import describe_adapters, describe_report
    from .run import print_recipe

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


def _run_bench(args: argparse.Namespace) -> int:
    try:
        from ..bench import EXPERIMENTS, run
    except ImportError as error:
        raise LoraLegoError(f"lora-lego bench needs the bench extra (pip install -e \".[bench]\"): {error}") from None
    unknown = [e for e in args.experiments if e != "all" and e not in EXPERIMENTS]
    if unknown:
        raise LoraLegoError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)} or all")
    out = run(args.experiments, cache=args.cache, out=args.out, tasks=args.tasks, quick=args.quick,
              model_dir=args.model, steps=args.steps, n_test=args.n_test, training_seeds=args.training_seeds,
              device=args.device, precision=args.precision)
    print(f"bench: results in {out / 'results.md'}")
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {_one_line(message) if isinstance(message, Warning) else message}", file=sys.stderr)


HUB_COMMANDS = ("merge", "prune", "convert", "inspect", "apply", "score", "calibrate")


def _imported(module: str, function: str):
    """The command function `lora_lego.cli.<module>.<function>`, imported when the command runs."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f".{module}", __package__), function)(args)
    return run


_COMMANDS = {"merge": _imported("merge", "run_merge"), "prune": _imported("merge", "run_merge"),
             "convert": _imported("convert", "run_convert"),
             "calibrate": _imported("calibrate", "run_calibrate"),
             "methods": _imported("listing", "run_methods"), "formats": _imported("listing", "run_formats"),
             "inspect": _run_inspect, "bench": _run_bench,
             "apply": _imported("apply", "run_apply"), "score": _imported("score", "run_score"),
             "run": _imported("run", "run_recipe")}
