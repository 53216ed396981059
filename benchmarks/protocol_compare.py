"""Paired "A beats B" intervals between any two variants of a finished protocol run, from its evaluation
cache alone (no model, no training): each test row's correctness is averaged over the training seeds in
the cache, as `lora-lego bench protocol` does for its own notes. The extra intervals quoted in
docs/results.md table (i'') were computed with it, e.g.

    python benchmarks/protocol_compare.py docs/results/protocol_two_seeds_evaluations.json confirm \\
        "merge tsv" "merge iso_c"

SPLIT is dev, confirm or all; A and B are the variants' cache keys (`Variant.key()`, e.g. "merge lego rank=18").
"""
import json
import statistics
import sys

from lora_lego.bench.calibrated import split_tasks
from lora_lego.bench.stats import describe, paired_difference
from lora_lego.bench.tasks import DEFAULT_TASKS

path, split, first, second = sys.argv[1:5]
evaluations = json.loads(open(path).read())
tasks = list(DEFAULT_TASKS) if split == "all" else split_tasks(list(DEFAULT_TASKS))[split]
# an evaluation key reads "<training config> n_test=<n> <variant key> @ <task> #rows"
prefixes = sorted({key.split(f" {first} @ ")[0] for key in evaluations if f" {first} @ " in key})
if not prefixes:
    sys.exit(f"{path}: no evaluation of {first!r}")


def rows(variant: str, task: str) -> list[float]:
    try:
        per_seed = [[int(c) for c in evaluations[f"{prefix} {variant} @ {task} #rows"]] for prefix in prefixes]
    except KeyError as missing:
        sys.exit(f"{path}: no per-row evaluation {missing}")
    return [statistics.mean(values) for values in zip(*per_seed)]


result = paired_difference({t: rows(first, t) for t in tasks}, {t: rows(second, t) for t in tasks}, tasks)
print(f"{len(prefixes)} training seed(s): " + describe(first, second, result, f"{split} tasks"))
