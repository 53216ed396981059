"""The checks of a recipe (see `recipe.py`): each key's type, then what the merge command would refuse before
any work (method, parameters, device, calibration, format, target, output, inputs), then the merges' order;
each problem is one line that names its key."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from ..errors import LoraLegoError

SCALAR = (str, int, float, bool)
CALIBRATION_KEYS = ("model", "prompts", "saved", "activations", "max_prompts", "max_length", "batch_size")


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else f"expected a non-empty string; got {brief(value)}"


def _integer(low: int) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= low else \
        f"expected an integer >= {low}; got {brief(v)}"


def _flag(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false; got {brief(value)}"


def _one_of(choices: Callable[[], list[str]]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices() else f"expected one of {', '.join(choices())}; got {brief(v)}"


def _params(value: Any) -> str | None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, SCALAR))
                                              for k, v in value.items()):
        return f"expected a mapping of parameter names to values (e.g. {{density: 0.5}}); got {brief(value)}"
    return None


def _formats() -> list[str]:
    from ..formats import available_formats

    return available_formats()


def _targets() -> list[str]:
    from ..deploy.targets import TARGETS

    return list(TARGETS)


CHECKS: dict[str, Callable[[Any], str | None]] = {
    "output": _text, "method": _text, "params": _params, "rank": _integer(1), "seed": _integer(0),
    "dtype": _one_of(lambda: ["bf16", "fp16", "fp32"]), "format": _one_of(_formats), "target": _one_of(_targets),
    "report": _text, "pico": _flag, "overwrite": _flag, "threads": _integer(1), "device": _text,
    "base_config": _text, "expand": _flag, "expand_rank": _integer(1), "revision": _text,
}
KEYS = ("inputs", *CHECKS, "calibration")


def check_types(entry: dict[str, Any], where: str, *, allow_output: bool = True) -> list[str]:
    problems = []
    for key, value in entry.items():
        if key not in KEYS or (key in ("inputs", "output") and not allow_output):
            problems.append(f"{where}.{key}: unknown key (expected {', '.join(KEYS if allow_output else KEYS[2:])})")
        elif key == "inputs":
            problems += _check_inputs(value, f"{where}.inputs")
        elif key == "calibration":
            problems += _check_calibration(value, f"{where}.calibration")
        elif (message := CHECKS[key](value)) is not None:
            problems.append(f"{where}.{key}: {message}")
    if allow_output:
        problems += [f"{where}: missing key {key!r}" for key in ("inputs", "output") if key not in entry]
    return problems


def _check_inputs(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value:
        return [f"{where}: expected a list of adapters (paths or Hub ids, or {{path, weight}}); got {brief(value)}"]
    problems = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            unknown = [k for k in item if k not in ("path", "weight", "revision")]
            weight = item.get("weight", 1.0)
            if unknown:
                problems.append(f"{where}[{i}].{unknown[0]}: unknown key (expected path, weight, revision)")
            elif _text(item.get("path")) is not None:
                problems.append(f"{where}[{i}].path: {_text(item.get('path'))}")
            elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                problems.append(f"{where}[{i}].weight: expected a finite number; got {brief(weight)}")
            elif "revision" in item and _text(item["revision"]) is not None:
                problems.append(f"{where}[{i}].revision: {_text(item['revision'])}")
        elif _text(item) is not None:
            problems.append(f"{where}[{i}]: {_text(item)} (a path or Hub id, or {{path, weight}})")
    return problems


def _check_calibration(value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: expected {{model, prompts}} or {{saved}}; got {brief(value)}"]
    problems = [f"{where}.{k}: unknown key (expected {', '.join(CALIBRATION_KEYS)})" for k in value
                if k not in CALIBRATION_KEYS]
    for key in ("prompts", "saved"):
        if key in value and (not isinstance(value[key], list) or any(_text(v) for v in value[key])):
            problems.append(f"{where}.{key}: expected a list of files, one per input; got {brief(value[key])}")
    if "model" in value and _text(value["model"]):
        problems.append(f"{where}.model: {_text(value['model'])}")
    if "activations" in value and value["activations"] not in ("base", "adapted"):
        problems.append(f"{where}.activations: expected base or adapted; got {brief(value['activations'])}")
    for key in ("max_prompts", "max_length", "batch_size"):
        if key in value and _integer(1)(value[key]):
            problems.append(f"{where}.{key}: {_integer(1)(value[key])}")
    return problems


def check_merge(entry: dict[str, Any], argv: list[str], where: str, earlier: dict[str, str],
                written: set[str]) -> list[str]:
    """What the merge command would refuse before any work, found now: method, parameters, calibration,
    output, format and target, inputs that exist (or are Hub ids, or an earlier merge's output)."""
    from ..hub import parse_hub_id
    from .merge import checks, merge_parser, parse_params, request

    problems = []
    if normal(entry["output"]) in earlier:
        problems.append(f"{where}.output: {entry['output']!r} is also the output of {earlier[normal(entry['output'])]}")
    for i, item in enumerate(entry["inputs"]):
        path = item["path"] if isinstance(item, dict) else item
        if normal(path) == normal(entry["output"]):
            problems.append(f"{where}.inputs[{i}]: {path!r} is this merge's own output")
        elif not (Path(path).exists() or normal(path) in written or parse_hub_id(path)):  # order: check_order
            problems.append(f"{where}.inputs[{i}]: local path {path!r} does not exist and is not a Hub id "
                            "(owner/name) or the output of an earlier merge")
        elif isinstance(item, dict) and "revision" in item and (Path(path).exists() or not parse_hub_id(path)):
            problems.append(f"{where}.inputs[{i}].revision: {path!r} is a local path; a revision applies to Hub ids")
    try:
        args = merge_parser().parse_args(argv)
        params: dict[str, Any] = parse_params(args.param)
    except Exception as error:  # (argparse, parse_params) the command line the merge stands for does not parse
        return problems + [f"{where}: {' '.join(str(error).split())}"]
    if args.rank is not None and "rank" in params:
        problems.append(f"{where}.params: the rank is given twice (rank: {args.rank} and params.rank); give it once")
    for key, check in checks(args, request(args, params)):  # the merge command's own checks, by key
        try:
            check()
        except LoraLegoError as error:
            problems.append(f"{where}.{key}: {' '.join(str(error).split())}")
            if key == "method":
                break  # the other checks need a method
    return problems


def check_order(merges: list, name: str) -> list[str]:
    """An input that a later merge writes cannot be read: the merges run in file order."""
    problems = []
    for i, merge in enumerate(merges):
        later = {normal(m.entry["output"]): m.key for m in merges[i + 1:]}
        for j, item in enumerate(merge.entry["inputs"]):
            path = normal(item["path"] if isinstance(item, dict) else item)
            if path in later:
                problems.append(f"{name}: {merge.key}.inputs[{j}]: written by {later[path]}, which runs later; "
                                "put that merge first")
    return problems


def normal(path: str) -> str:
    return str(Path(path).expanduser().resolve())


def brief(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
