"""The calibrated-merging experiment: `regmean` and `lego_calibrated` with a few unlabeled prompts per task,
taken from the first rows of the task's *train* split (never a test row), against the data-free methods.

Protocol: the task columns are split into dev tasks (odd positions in the task list), where shrink, the
activations and the LEGO variant are compared and chosen, and confirm tasks (even positions), reported and
never tuned on. Every merge merges all task LoRAs; "A beats B" claims come with a paired 95% interval over
the test rows (`stats.paired_difference`). Calibrations are cached under <cache>/calibrations.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import lora_lego as ll

from ..calibration.grams import FILE_NAME, load_calibration
from ..errors import LoraLegoError
from .experiments import Bench, Table
from .pool import task_split
from .stats import describe, paired_difference

PROMPT_COUNTS = (8, 32, 100, 300)
SHRINKS = (0.5, 0.7, 0.9, 1.0)
PROMPTS = 100  # the default calibration set per task
DATA_FREE = ("ties", "dare_ties", "task_arithmetic", "lego")


def split_tasks(names: list[str]) -> dict[str, list[str]]:
    """Dev tasks (choose on them) and confirm tasks (report on them): alternating in the task order."""
    return {"dev": names[1::2], "confirm": names[0::2]}


def calibrations(bench: Bench, adapters: list[ll.Adapter], n: int, activations: str) -> list[ll.Calibration]:
    """One calibration per task LoRA: its first `n` train prompts through the base model (or with the LoRA
    applied, activations="adapted"), computed once and cached on disk."""
    result = []
    for task, adapter in zip(bench.tasks, adapters):
        folder = bench.cache / "calibrations" / (f"{task.name}-{bench.config.key()}-n{n}-{activations}"
                                                 f"-L{bench.config.max_length}")
        if not (folder / FILE_NAME).exists():
            train, _ = task_split(bench.cache, task, bench.n_test)
            model, tokenizer = bench.model()
            ll.calibrate(model, [task.prompt(text) for text, _ in train[:n]], tokenizer=tokenizer,
                         modules=list(adapter), adapter=adapter if activations == "adapted" else None,
                         max_length=bench.config.max_length, output=folder, overwrite=True, progress=True)
        result.append(load_calibration(folder))
    return result


def calibrated_table(bench: Bench) -> Table:
    """Table (h): the calibrated methods and their variants against the data-free methods, dev and confirm."""
    splits = split_tasks(bench.names)
    table = Table("(h) Calibrated merging: RegMean and LEGO in the calibration metric, against the data-free "
                  "methods", bench.names, splits=splits)
    bench.references(table)
    adapters = [bench.adapter(t) for t in bench.tasks]
    r, u = bench.config.rank, bench.config.rank * len(adapters)
    rows = _Rows(bench, table, adapters)
    add, calibrated = rows.add, rows.calibrated
    data_free = [add(f"{m} (k={r}, data-free)", f"merge {m}", lambda m=m: bench.merged(adapters, m)) for m in DATA_FREE]
    data_free.append(add(f"concat (rank {u}, data-free)", "merge concat", lambda: bench.merged(adapters, "concat")))
    full = add(f"regmean (rank {u})", *calibrated("regmean"))
    low = add(f"regmean k={r}", *calibrated("regmean", rank=r))
    plain = add(f"regmean k={r}, Frobenius truncation", *calibrated("regmean", rank=r, norm="frobenius"))
    lego = add(f"lego_calibrated k={r}", *calibrated("lego_calibrated", rank=r))
    variants = [add(f"lego_calibrated k={r}, {label}", *calibrated("lego_calibrated", rank=r, **params))
                for label, params in [("clustering=units", {"clustering": "units"}),
                                      ("basis=adapter (the first probe)", {"basis": "adapter"}),
                                      ("no refit", {"refit": False})]]
    adapted = [add(f"regmean (rank {u}), adapted activations", *calibrated("regmean", activations="adapted")),
               add(f"regmean k={r}, adapted activations", *calibrated("regmean", rank=r, activations="adapted"))]
    shrinks = {s: add(f"regmean (rank {u}), shrink={s}", *calibrated("regmean", shrink=s)) for s in SHRINKS if s != 0.9}
    shrinks = {s: label for s, label in {**shrinks, 0.9: full}.items() if label is not None}
    counts = _count_rows(rows, full, low, r, u)
    _notes(bench, table, rows.keys, data_free, full, low, plain, lego, variants, adapted, shrinks, r, u)
    few = min(counts)
    for fewest, default in zip(counts[few], (full, low)):  # do more prompts help?
        table.notes += _compare(bench, table, rows.keys, fewest, default)
    _plot_counts(table, counts, data_free, bench.out / "calibrated_prompts.png")
    return table


class _Rows:
    """Adds the table's rows (merges of all task LoRAs, evaluated) and keeps the key each one's evaluation is cached
    under (`keys`: label -> key)."""

    def __init__(self, bench: Bench, table: Table, adapters: list[ll.Adapter]):
        self.bench, self.table, self.adapters = bench, table, adapters
        self.keys: dict[str, str] = {}

    def add(self, label: str, key: str, build) -> str | None:
        """The row `label` of `build()`'s merge, or None with a note when the merge is refused."""
        try:
            self.table.rows[label] = self.bench.evaluate(key, build, self.bench.tasks)
        except LoraLegoError as error:  # e.g. shrink=1 on a singular Gram: a finding, not a crash
            self.table.notes.append(f"{label}: refused ({' '.join(str(error).split())})")
            return None
        self.keys[label] = key
        return label

    def calibrated(self, method: str, *, n: int = PROMPTS, activations: str = "base", **params):
        """(key, build) of `method` calibrated on each task's first `n` train prompts, with `activations`."""
        key = f"calibrated {method} n={n} activations={activations} " + " ".join(
            f"{k}={v}" for k, v in sorted(params.items()))
        return key, lambda: self.bench.merged(self.adapters, method,
                                              calibration=calibrations(self.bench, self.adapters, n, activations),
                                              **params)


def _count_rows(rows: _Rows, full: str | None, low: str | None, r: int,
                u: int) -> dict[int, tuple[str | None, str | None]]:
    """Prompts per task -> the regmean rows (rank sum u, k = r) calibrated on that many (PROMPTS: `full`, `low`)."""
    counts = {}
    for n in PROMPT_COUNTS:
        counts[n] = (full, low) if n == PROMPTS else (
            rows.add(f"regmean (rank {u}), {n} prompts", *rows.calibrated("regmean", n=n)),
            rows.add(f"regmean k={r}, {n} prompts", *rows.calibrated("regmean", n=n, rank=r)))
    return counts


def _notes(bench, table, keys, data_free, full, low, plain, lego, variants, adapted, shrinks, r, u) -> None:
    means = {label: {split: statistics.mean(table.rows[label][c] for c in columns)
                     for split, columns in {**table.splits, "all": bench.names}.items()} for label in table.rows}
    best = max(data_free, key=lambda label: means[label]["dev"])  # chosen on the dev tasks

    def compare(first: str | None, second: str | None) -> list[str]:
        return _compare(bench, table, keys, first, second)

    own = means["own LoRA (upper reference)"]["all"]
    zero = table.rows["zero-shot (base model)"]
    table.notes += [
        f"Calibration: the first {PROMPTS} train prompts of each task (prompt as the model sees it, no answer) "
        f"through the base model, shrink 0.9, unless the row says otherwise; k={r} is the task LoRAs' rank, "
        f"rank {u} the sum of their ranks (RegMean's exact solution).",
        f"Dev tasks: {', '.join(table.splits['dev'])}; confirm tasks: {', '.join(table.splits['confirm'])}. "
        f"Best data-free method on the dev tasks: {best}.",
        f"Targets (all tasks): {full} mean {means[full]['all']:.3f} = {means[full]['all'] / own:.2f} x the task LoRAs' "
        f"mean {own:.3f} (target 0.90), {means[full]['all'] - means[best]['all']:+.3f} against {best} (target +0.05); "
        f"{low}: {means[low]['all'] / own:.2f} x (target 0.88).",
    ]
    for label in (full, low):
        below = [c for c in bench.names if table.rows[label][c] < zero[c]]
        table.notes.append(f"{label}: tasks below their zero-shot score: {', '.join(below) or 'none'}.")
    choice = max(shrinks, key=lambda s: means[shrinks[s]]["dev"])
    table.notes.append("shrink on the dev tasks (rank sum): " + ", ".join(
        f"{s}: {means[shrinks[s]]['dev']:.3f}" for s in sorted(shrinks)) + f"; best {choice}, which scores "
        f"{means[shrinks[choice]]['confirm']:.3f} on the confirm tasks"
        + (f" (the default 0.9: {means[shrinks[0.9]]['confirm']:.3f})." if choice != 0.9 else "."))
    for first, second in [(full, best), (low, best), (low, plain), (lego, low), (adapted[0], full), (adapted[1], low)]:
        table.notes += compare(first, second)
    for variant in variants:
        table.notes += compare(lego, variant)


def _compare(bench: Bench, table: Table, keys: dict[str, str], first: str | None, second: str | None) -> list[str]:
    """`first` - `second` with its paired 95% interval on the dev and on the confirm tasks (none for a refused row)."""
    if first is None or second is None:
        return []
    tasks = {t.name: t for t in bench.tasks}
    lines = []
    for split, columns in table.splits.items():
        result = paired_difference({c: bench.rows(keys[first], tasks[c]) for c in columns},
                                   {c: bench.rows(keys[second], tasks[c]) for c in columns}, columns)
        lines.append(describe(first, second, result, f"{split} tasks ({', '.join(columns)})"))
    return lines


def _plot_counts(table: Table, counts: dict[int, tuple[str, str]], data_free: list[str], path: Path) -> None:
    """Mean accuracy (all, dev, confirm tasks) against the number of prompts per task, rank sum and k = r."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    ns = sorted(counts)
    for index, (style, name) in enumerate([("-o", "rank sum"), ("--s", "k = r")]):
        for split, columns, colour in [("all", table.columns, "#4c72b0"), ("dev", table.splits["dev"], "#55a868"),
                                       ("confirm", table.splits["confirm"], "#c44e52")]:
            present = [n for n in ns if counts[n][index] is not None]  # refused rows are left out
            values = [statistics.mean(table.rows[counts[n][index]][c] for c in columns) for n in present]
            axis.plot(present, values, style, color=colour, label=f"regmean {name}, {split} tasks", markersize=4)
    for label, style in [(max(data_free, key=lambda lb: statistics.mean(table.rows[lb].values())), ":"),
                         ("own LoRA (upper reference)", "-.")]:
        axis.axhline(statistics.mean(table.rows[label].values()), linestyle=style, color="grey", linewidth=1)
        axis.text(ns[0], statistics.mean(table.rows[label].values()), f" {label}", fontsize=7, va="bottom")
    axis.set_xscale("log")
    axis.set_xticks(ns, [str(n) for n in ns])
    axis.set_xlabel("calibration prompts per task (unlabeled, from the train split)")
    axis.set_ylabel("mean accuracy")
    axis.set_title("Calibrated merging: accuracy against the number of prompts", fontsize=9)
    axis.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
