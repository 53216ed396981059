"""Recipes: merges kept in a YAML (or JSON) file. `read_recipe` validates the whole file before anything runs
(one line per problem, naming the key: `recipe.yaml: merges[1].method: unknown method 'foo'`) and turns each
merge into the `lora-lego merge` command line it stands for, which the CLI's own merge path runs;
`from_provenance` writes a recipe back from what any of our outputs records."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraLegoError
from .recipe_checks import KEYS, brief, check_merge, check_order, check_types, normal


class RecipeError(LoraLegoError, ValueError):
    """A recipe file that cannot run; `problems` holds one line per problem found (all of them)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


@dataclass
class Merge:
    """One merge of a recipe: its key ("merges[0]"), its entry (defaults applied) and its `merge` arguments."""

    key: str
    entry: dict[str, Any]  # as the file says it (defaults applied): what the output records
    argv: list[str]


def load_file(path: str | Path) -> Any:
    """The recipe's data: JSON for a .json file, else YAML (pyyaml, extra [recipes]); one-line errors."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError([f"{name}: cannot read the recipe ({getattr(error, 'strerror', None) or error})"]) from None
    if name.endswith(".json"):
        try:
            return json.loads(text)
        except ValueError as error:
            raise RecipeError([f"{name}: not valid JSON ({error})"]) from None
    try:
        import yaml
    except ImportError:
        raise RecipeError([f"{name}: YAML recipes need pyyaml: pip install \"lora-lego[recipes]\" (or write the "
                           "recipe as .json)"]) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise RecipeError([f"{name}: not valid YAML ({where}{getattr(error, 'problem', None) or error})"]) from None


def read_recipe(path: str | Path, *, overwrite: bool = False) -> list[Merge]:
    """Every merge of the recipe at `path`, validated as a whole first; raises RecipeError listing each problem.

    The file holds `merges:` (a list of merges; `defaults:` applies to each) or one merge. A merge: `inputs`
    (paths or Hub ids, or {path, weight, revision}), `output`, and optionally method, params, rank, seed,
    dtype, format, target, calibration ({model, prompts} or {saved}, activations, max_prompts, max_length,
    batch_size), report, pico, overwrite, threads, device, base_config, expand, expand_rank, revision."""
    name = str(path)
    data = load_file(path)
    problems: list[str] = []
    if isinstance(data, dict) and "merges" not in data and "inputs" in data:
        data = {"merges": [data]}  # a file of one merge
    if not isinstance(data, dict) or not isinstance(data.get("merges"), list) or not data["merges"]:
        raise RecipeError([f"{name}: expected `merges:` with a list of merges (or one merge with `inputs:` and "
                           f"`output:`); got {brief(data)}"])
    problems += [f"{name}: {key}: unknown key (expected merges, defaults)" for key in data if key not in
                 ("merges", "defaults")]
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        problems.append(f"{name}: defaults: expected a mapping of merge keys; got {brief(defaults)}")
        defaults = {}
    problems += check_types(defaults, f"{name}: defaults", allow_output=False)
    merges: list[Merge] = []
    outputs: dict[str, str] = {}
    written = {normal(e["output"]) for e in data["merges"] if isinstance(e, dict) and isinstance(e.get("output"), str)}
    for index, entry in enumerate(data["merges"]):
        key = f"merges[{index}]"
        where = f"{name}: {key}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping (inputs, output, method, ...); got {brief(entry)}")
            continue
        found = check_types(entry, where)
        problems += found
        if found:
            continue
        entry = {**defaults, **entry}
        if "calibration" in defaults and "calibration" in data["merges"][index]:
            entry["calibration"] = {**defaults["calibration"], **data["merges"][index]["calibration"]}
        run = {**entry, **({"overwrite": True} if overwrite else {})}
        before = len(problems)
        problems += check_merge(run, merge_argv(run), where, outputs, written)
        if len(problems) == before:
            merges.append(Merge(key, entry, merge_argv(run)))
        outputs[normal(entry["output"])] = key
    problems += check_order(merges, name)
    if problems:
        raise RecipeError(problems)
    return merges


def merge_argv(entry: dict[str, Any]) -> list[str]:
    """The `lora-lego merge` arguments a recipe merge stands for."""
    inputs = [item if isinstance(item, str) else item["path"] + (f"@{item['revision']}" if "revision" in item else "")
              for item in entry["inputs"]]
    weights = [1.0 if isinstance(item, str) else float(item.get("weight", 1.0)) for item in entry["inputs"]]
    argv = ["merge", *inputs, "-o", entry["output"]]
    if any(w != 1.0 for w in weights):
        argv += ["--weights", *(f"{w:g}" if float(w).is_integer() else repr(w) for w in weights)]
    for key in ("method", "rank", "seed", "dtype", "format", "target", "report", "threads", "device", "base_config",
                "expand_rank", "revision"):
        if key in entry:
            argv += [f"--{key.replace('_', '-')}", str(entry[key])]
    for key, value in (entry.get("params") or {}).items():
        argv += ["-p", f"{key}={_param_text(value)}"]
    argv += [f"--{key}" for key in ("pico", "overwrite", "expand") if entry.get(key)]
    calibration = entry.get("calibration") or {}
    if "model" in calibration:
        argv += ["--model", calibration["model"]]
    if "prompts" in calibration:
        argv += ["--prompts", *calibration["prompts"]]
    if "saved" in calibration:
        argv += ["--calibration", *calibration["saved"]]
    for key in ("activations", "max_prompts", "max_length", "batch_size"):
        if key in calibration:
            argv += [f"--{key.replace('_', '-')}", str(calibration[key])]
    return argv


def _param_text(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def from_provenance(provenance: dict[str, Any], output: str) -> tuple[dict[str, Any], list[str]]:
    """A recipe merge that makes `output` again, from its provenance (the recipe it recorded, else its sources,
    weights, method, parameters, rank, seed and calibration), and notes on what a recipe cannot say."""
    recorded = provenance.get("recipe") or {}
    if isinstance(recorded.get("merge"), dict):
        return _ordered(recorded["merge"]), [f"as recorded from {recorded.get('file')}, {recorded.get('key')}"]
    sources = list(provenance.get("sources") or [])
    weights = list(provenance.get("weights") or [1.0] * len(sources))
    entry: dict[str, Any] = {"inputs": [s if w == 1 else {"path": s, "weight": w} for s, w in zip(sources, weights)],
                             "output": output, "method": provenance.get("method")}
    params = dict(provenance.get("params") or {})
    rank_name = _rank_name(entry["method"])
    if rank_name in params:  # the method's own name for the rank (e.g. lego's n_clusters): a recipe says rank
        params["rank"] = params.pop(rank_name)
    if params.get("rank") is not None:
        entry["rank"] = params.pop("rank")
    if params.pop("pico", False):
        entry["pico"] = True
    params.pop("rank", None)
    if params:
        entry["params"] = params
    entry["seed"] = provenance.get("seed", 0)
    notes = [f"reconstructed from the provenance of {output} (lora-lego {provenance.get('version', '?')})"]
    calibration = provenance.get("calibration") or []
    evidence = provenance.get("evidence") or {}
    prompts = [c.get("prompts") for c in calibration] if calibration else evidence.get("prompts")
    models = {c.get("model") for c in calibration} if calibration else {evidence.get("model")}
    if prompts and len(models) == 1 and all(isinstance(p, str) and p != "<list>" for p in prompts):
        entry["calibration"] = {"model": models.pop(), "prompts": prompts}
        if any(str(c.get("activations", "base")) != "base" for c in calibration):
            entry["calibration"]["activations"] = "adapted"
    elif calibration or evidence:
        notes.append("its calibration or scoring prompts were generated or given in memory: add calibration by hand")
    if provenance.get("auto"):
        notes.append(f"method auto chose {provenance['auto'].get('chosen')} among "
                     f"{len(provenance['auto'].get('candidates', []))} candidates; this recipe makes that choice again "
                     "directly (method: auto with the calibration would choose anew)")
    return _ordered(entry), notes


def _ordered(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry's keys in the order a recipe lists them (provenance is written with sorted keys)."""
    return {k: entry[k] for k in sorted(entry, key=lambda k: KEYS.index(k) if k in KEYS else len(KEYS))}


def _rank_name(method: Any) -> str:
    from ..methods import get_method

    try:
        return get_method(str(method)).parameter_aliases.get("rank", "rank")
    except LoraLegoError:
        return "rank"


def dump(merges: list[dict[str, Any]], notes: list[str]) -> str:
    """A recipe file's text: YAML with the notes as comments (JSON when pyyaml is not installed)."""
    data = {"merges": merges}
    try:
        import yaml
    except ImportError:
        return json.dumps(data, indent=2) + "\n"
    comments = "".join(f"# {note}\n" for note in notes)
    return comments + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
