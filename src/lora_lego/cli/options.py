"""The parser pieces that several commands share: the one-line-error parser, and the option groups (output and
method options of merge / prune, input reading, output format, serving target, Hub revision, prompts and
calibration, generated prompts, scoring). Stdlib only, like every command's `add_parser`: building the whole
parser imports no torch, so that `lora-lego --help` answers in a fraction of a second."""

from __future__ import annotations

import argparse

from ..defaults import DEFAULT_START, FORMATS, GRAM_MEMORY, POSITIONS, PROMPT_FORMATS, STARTS
from ..deploy.targets import TARGETS


class UsageError(Exception):
    """A command line that does not parse (printed in one line, exit 2, like every other error)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}")


def subcommands(parser: argparse.ArgumentParser):
    """The subparsers object that each command's `add_parser(commands)` adds itself to."""
    return parser.add_subparsers(dest="command", required=True, parser_class=Parser)


RANK_HELP = ("output rank k (the method's rank parameter); its default depends on the method: the largest input rank "
             "(lego, ties, task_arithmetic, auto, ...); every direction of the merge, at most the sum of the input "
             "ranks, for tsv, iso_c, iso_cts, star and wudi; the sum of the input ranks for regmean and regmean_pp "
             "(the exact solution); with -p allocate=greedy, an average (a parameter budget spread over the modules). "
             "concat and ensemble always give the sum, average the common input rank (they take no --rank)")
RANK_HELP_PRUNE = "output rank k (required); modules of a lower rank keep theirs"


def add_merge_options(command: argparse.ArgumentParser, *, rank_required: bool) -> None:
    """The options of `merge` and `prune`: output, rank, seed, method parameters, dtype, report, threads, device."""
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
    add_revision(command)


def add_output_format(command: argparse.ArgumentParser) -> None:
    command.add_argument("--format", choices=FORMATS,
                         help="output format (default: PEFT for a folder; for a .safetensors path the input's "
                              "file format, else kohya for diffusion-model adapters and diffusers for others)")


def add_target_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--target", choices=list(TARGETS),
                         help="serving target: refuse what it cannot load, before any work, and print the rank "
                              "flag to serve the output with (the rank itself is kept: vLLM pads it)")


def add_input_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--base-config", metavar="DIR",
                         help="base model folder (its config.json): architecture and head counts for GGUF adapters "
                              "(default: the adapter's base_model_name_or_path when a local folder)")
    command.add_argument("--expand", action="store_true",
                         help="read LyCORIS LoHa / LoKr modules as an exact plain LoRA (LoHa rank r^2, LoKr "
                              "rank(w1) x rank(w2))")
    command.add_argument("--expand-rank", type=int, metavar="K",
                         help="read LyCORIS LoHa / LoKr modules as their best rank-K LoRA (truncated SVD)")


def add_revision(command: argparse.ArgumentParser) -> None:
    """--revision, for the commands whose adapters and base models may be Hub ids (owner/name[/file][@REV])."""
    command.add_argument("--revision", metavar="REV", help="Hub revision (branch, tag or commit) of the Hub ids "
                         "given without their own @REV (default main)")


def add_calibration_options(group) -> None:
    """How the prompts are read and run: --max-prompts, --prompts-format, --max-length, --batch-size, --gram-memory."""
    group.add_argument("--max-prompts", type=int, metavar="N", help="use the first N prompts of each file")
    group.add_argument("--prompts-format", choices=PROMPT_FORMATS, help="read the prompts files as JSONL "
                       "({\"text\": ...} per line) or text (a prompt per line); default: from their content")
    group.add_argument("--max-length", type=int, default=512, metavar="L", help="tokens per prompt (default 512)")
    group.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per forward pass (default 8)")
    group.add_argument("--gram-memory", type=float, default=GRAM_MEMORY / 2**30, metavar="GIB",
                       help=f"float64 Grams accumulated per pass over the prompts (default {GRAM_MEMORY / 2**30:g} "
                            "GiB, one Llama-2-7B layer; a model whose Grams exceed it takes several passes)")


def add_generation_options(group) -> None:
    """--generate-prompts N and its sampling options (see `generation`)."""
    group.add_argument("--generate-prompts", type=int, metavar="N", help="instead of --prompts: sample N prompts "
                       "from the base model (--model) with each adapter applied, one set per adapter (measured "
                       "below data-free tsv on our benchmark: see docs/results.md (k))")
    group.add_argument("--generate-length", type=int, default=64, metavar="L",
                       help="new tokens per generated prompt, at most (default 64)")
    group.add_argument("--generate-start", choices=STARTS, default=DEFAULT_START,
                       help=f"what each sample starts from: the BOS token, an empty chat turn (the model's chat "
                            f"template), or a few neutral seed words (default {DEFAULT_START})")
    group.add_argument("--generate-seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    group.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    group.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling's top-p (default 0.95)")


def add_evidence_options(group) -> None:
    group.add_argument("--positions", choices=POSITIONS, default="last",
                       help="score the next token after each prompt (last, default) or every prompt position (all)")
