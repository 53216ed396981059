"""`lora-lego methods` and `lora-lego formats`: what the tool offers, listed without importing torch (the
methods are read from their source, see `methods.source`)."""

from __future__ import annotations

import argparse
import textwrap

from ..methods.registry import DEFAULT_METHOD, PRUNE_METHOD, allowed_values, shown_value
from ..methods.source import builtin_specs, specs_in


def add_parser(commands) -> None:
    commands.add_parser("methods", help="list the merge methods and their parameters").set_defaults(run=run_methods)
    commands.add_parser("formats", help="list the adapter formats").set_defaults(run=run_formats)


def run_methods(args: argparse.Namespace) -> int:
    specs = method_specs()
    for name in sorted(specs):
        spec = specs[name]
        title = (name + (" (default)" if name == DEFAULT_METHOD else "")
                 + "".join(f", also {a!r}" for a in spec.method_aliases))
        title += " (default of prune)" if PRUNE_METHOD in (name, *spec.method_aliases) else ""
        title += " (needs calibration: --model/--prompts or --calibration)" if spec.needs_calibration else ""
        print(f"{title}\n  {spec.summary}\n  parameters:" + ("" if spec.parameters else " none"))
        for parameter in spec.parameters.values():
            print(_parameter_line(spec, parameter))
        if spec.paper:
            print(f"  paper: {spec.paper}")
    _print_model_methods()
    print("\nEvery method also takes -p scale=norm (each merged module rescaled to the inputs' mean norm) and, with\n"
          "--model and --prompts, -p scale=auto (the global scale chosen by each adapter's retention).")
    return 0


def method_specs() -> dict:
    """The built-in methods' specs by name, read from their source: the methods import torch, the list needs none."""
    return builtin_specs()


def _parameter_line(spec, parameter) -> str:
    """`    name = default (allowed values; --rank): meaning`, as `lora-lego methods` lists a parameter."""
    names = {parameter.name, *(alias for alias, target in spec.parameter_aliases.items() if target == parameter.name)}
    allowed = allowed_values(parameter.annotation) + ("; --rank" if "rank" in names else "")
    meaning = spec.docs.get(parameter.name)
    line = f"{parameter.name} = {shown_value(parameter.default)} ({allowed})" + (f": {meaning}" if meaning else "")
    return textwrap.fill(line, width=110, initial_indent="    ", subsequent_indent="        ", break_on_hyphens=False)


def _print_model_methods() -> None:
    """The methods that run the base model on the adapters' prompts while they merge (not per-module functions)."""
    SPEC = specs_in("calibration.regmean_pp")["regmean_pp"]  # regmean_pp.SPEC, read without importing torch
    print(f"{SPEC.name} (needs --model/--prompts)\n  {SPEC.summary}\n  parameters:")
    for parameter in SPEC.parameters.values():
        print(_parameter_line(SPEC, parameter))
    print(f"  paper: {SPEC.paper}")
    print("auto (needs --model/--prompts)\n  the candidate merge with the best retention of every adapter on its "
          "prompts (see the README's Merge with evidence)")


def run_formats(args: argparse.Namespace) -> int:
    from ..formats import available_formats, get_format

    for name in available_formats():
        fmt = get_format(name)
        print(f"{name}{f' (single {fmt.suffix} file)' if fmt.single_file else ' (folder)'}\n  {fmt.summary}")
    return 0
