"""The `lora-lego` command: one thin file per command (`merge.py` has merge and prune, `listing.py` methods and
formats), each an `add_parser(commands)` that imports no torch and a `run(args)` over the public API. This file
builds the parser from them and turns every failure into one line and an exit code."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from typing import Sequence

from .._version import version
from ..errors import LoraLegoError
from ..hub import default_revision
from ..oserrors import os_errno, reason
from ..signals import BROKEN_PIPE, INTERRUPTED, TERMINATED, Terminated, command_signals, silence_stdout
from . import apply, bench, calibrate, convert, inspection, listing, merge, run, score
from .options import Parser, UsageError, subcommands

# in the order of `lora-lego --help`
COMMANDS = (merge, calibrate, convert, apply, score, run, listing, inspection, bench)


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
    parser = Parser(prog="lora-lego", description="Merge, prune and convert LoRA adapters (PEFT folders; kohya, "
                    "LyCORIS and diffusers .safetensors files; llama.cpp .gguf adapters), and fold them into a base.")
    parser.add_argument("--version", action=_Version)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = subcommands(parser)
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


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
                code = args.run(args)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
            return code
        except BrokenPipeError:  # `lora-lego methods | head -1`: the reader has all it wants
            silence_stdout()
            return BROKEN_PIPE
        except (LoraLegoError, UsageError) as error:
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


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {_one_line(message) if isinstance(message, Warning) else message}", file=sys.stderr)
