"""Table (l) over two training seeds of the task LoRAs: the rows that `beyond_regmean.py --seed 1 --only ...`
also evaluated, averaged over seeds 0 and 1, with paired intervals on the seed-averaged correctness of each
test row (as the protocol of table (i'') does).

    python benchmarks/beyond_two_seeds.py --out /work/cache/runs/beyond
"""

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

from beyond_regmean import CONFIG, TASKS

from lora_lego.bench.calibrated import split_tasks
from lora_lego.bench.stats import paired_difference

ROWS = {  # label -> evaluation key (without the config prefix)
    "tsv k=4": "evidence tsv k=4 x1.0",
    "ties k=4": "evidence ties k=4 x1.0",
    "wudi k=4": "beyond wudi k=4",
    "wudi k=4, ridge 1 (dev's choice among wudi variants)": "beyond wudi k=4 ridge=1",
    "regmean k=4": "beyond regmean k=4 n=100",
    "regmean_pp k=4 (layer by layer)": "beyond regmean_pp k=4 n=100",
    "auto k=4 (16 prompts)": "beyond auto k=4 n=16",
}
PAIRS = [("regmean_pp k=4 (layer by layer)", "regmean k=4"), ("regmean_pp k=4 (layer by layer)", "tsv k=4"),
         ("auto k=4 (16 prompts)", "regmean k=4"), ("wudi k=4", "tsv k=4"), ("wudi k=4", "ties k=4"),
         ("regmean k=4", "tsv k=4")]
SEEDS = (0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    evaluations = json.loads((Path(args.out) / "evaluations.json").read_text())
    prefixes = [f"{replace(CONFIG, seed=seed).key()} n_test=200 " for seed in SEEDS]

    def rows(key: str, task: str) -> list[float]:
        """Each test row's correctness averaged over the seeds."""
        per_seed = [[int(c) for c in evaluations[f"{p}{key} @ {task} #rows"]] for p in prefixes]
        return [statistics.fmean(values) for values in zip(*per_seed)]

    splits = split_tasks(TASKS)
    own = {t: statistics.fmean(evaluations[f"{p}own {t} @ {t}"] for p in prefixes) for t in TASKS}
    table = {label: {t: statistics.fmean(rows(key, t)) for t in TASKS} for label, key in ROWS.items()
             if all(f"{p}{key} @ {t} #rows" in evaluations for p in prefixes for t in TASKS)}
    lines = [f"| variant (mean of 2 seeds) | {' | '.join(TASKS)} | dev mean | confirm mean | confirm / own |",
             "|---" * (len(TASKS) + 4) + "|"]
    for label, acc in {**table, "own LoRA": own}.items():
        dev, confirm = (statistics.fmean(acc[t] for t in splits[s]) for s in ("dev", "confirm"))
        normalised = statistics.fmean(acc[t] / own[t] for t in splits["confirm"])
        lines.append(f"| {label} | {' | '.join(f'{acc[t]:.3f}' for t in TASKS)} | {dev:.3f} | {confirm:.3f} | "
                     f"{normalised:.3f} |")
    lines.append("")
    for first, second in PAIRS:
        if first in table and second in table:
            for name in ("confirm", "dev"):
                d, low, high = paired_difference({t: rows(ROWS[first], t) for t in splits[name]},
                                                 {t: rows(ROWS[second], t) for t in splits[name]}, splits[name])
                lines.append(f"- {first} minus {second}, {name}: {d:+.3f} [{low:+.3f}, {high:+.3f}]")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
