"""The evidence experiment (issue 28): does retention on a few unlabeled prompts predict accuracy, and does
`auto` choose well?

Every variant (data-free methods at the LoRAs' rank r, each at scale 1 and 0.5, concat at the rank sum,
the calibrated methods) merges all task LoRAs. Per (variant, task) it records the accuracy on the task's
test rows and, on the first `PROMPTS` *train* prompts of each task (never a test row), the retention with
last and all positions and the Gram proxy. On the confirm tasks it reports the Spearman correlation of
each measure with the normalised accuracy gain (acc - zero-shot) / (own - zero-shot). Then `auto` (the
default candidates, at rank r) chooses on those prompts; its pick is evaluated against the best single
variant and the fixed data-free defaults, with paired 95% intervals.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import lora_lego as ll

from ..calibration.auto import merge_auto, scaled
from ..calibration.score import Scorer, best_scale, gram_terms, module_scales, module_terms, proxy_retention
from .calibrated import split_tasks
from .experiments import Bench, Table
from .pool import task_split
from .stats import describe, paired_difference

PROMPTS = 16
SCALES = (1.0, 0.5)
DATA_FREE = ("tsv", "ties", "iso_c", "task_arithmetic", "lego", "lego_rank1")


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); nan for fewer than 3 pairs or a constant side."""
    if len(x) < 3:
        return float("nan")
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                result[order[k]] = (i + j) / 2
            i = j + 1
        return result
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    var = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return cov / var if var > 0 else float("nan")


def evidence_table(bench: Bench) -> Table:
    """Table (j): each variant's accuracy and retentions, how well they correlate, and what `auto` chooses."""
    splits = split_tasks(bench.names)
    table = Table(f"(j) Evidence: retention on {PROMPTS} unlabeled prompts per task against accuracy, and auto",
                  bench.names, splits=splits)
    bench.references(table)
    run = _setup(bench, table)
    r, u = bench.config.rank, bench.config.rank * len(run.adapters)
    _fixed_variants(run, r, u)
    for method in ("tsv", "ties"):  # the scale from the Gram proxy: one global, or one per module
        _proxy_scale_variants(run, method, r)
    for method in ("regmean", "lego_calibrated"):
        run.add(f"{method} k={r}", f"evidence {method} k={r} n={PROMPTS}",
                lambda m=method: bench.merged(run.adapters, m, rank=r, calibration=run.calibrations))
    label, seconds = _auto_row(run, r)
    _notes(bench, table, run.measures, run.keys, label, seconds, splits)
    return table


@dataclass
class _Run:
    """What every variant is merged, evaluated and scored with; `add` fills the table's rows and the measures."""

    bench: Bench
    table: Table
    adapters: list[ll.Adapter]
    prompts: list[list[str]]  # the first PROMPTS train prompts of each task
    model: Any
    tokenizer: Any
    scorers: dict[str, Scorer]  # by positions: "last" and "all"
    calibrations: list[ll.Calibration]
    measures: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # label -> measure -> per task
    keys: dict[str, str] = field(default_factory=dict)  # label -> the key its evaluation is cached under

    def add(self, label: str, key: str, build, scale: float = 1.0) -> None:
        """The row of `build()`'s merge with its delta times `scale`, and its retentions and Gram proxy."""
        merged = build()
        applied = merged if scale == 1.0 else scaled(merged, scale)
        self.table.rows[label] = self.bench.evaluate(key, lambda: applied, self.bench.tasks)
        self.keys[label] = key
        terms = gram_terms(merged, self.adapters, self.calibrations)
        self.measures[label] = {"last": self.scorers["last"].scores(merged, scale).retention,
                                "all": self.scorers["all"].scores(merged, scale).retention,
                                "proxy": proxy_retention(terms, scale)}


def _setup(bench: Bench, table: Table) -> _Run:
    """The task LoRAs, their prompts, the base model, a scorer per positions and a calibration per task."""
    adapters = [bench.adapter(t) for t in bench.tasks]
    prompts = [[t.prompt(text) for text, _ in task_split(bench.cache, t, bench.n_test)[0][:PROMPTS]]
               for t in bench.tasks]
    model, tokenizer = bench.model()
    scorers = {p: Scorer(model, tokenizer, adapters, prompts, positions=p, max_length=bench.config.max_length)
               for p in ("last", "all")}
    union = list(dict.fromkeys(m for a in adapters for m in a))
    calibrations = [ll.calibrate(model, p, tokenizer=tokenizer, modules=union, max_length=bench.config.max_length)
                    for p in prompts]
    return _Run(bench, table, adapters, prompts, model, tokenizer, scorers, calibrations)


def _fixed_variants(run: _Run, r: int, u: int) -> None:
    """The data-free methods at rank r, each at every scale of SCALES, and concat at the rank sum u (sum and mean)."""
    bench, adapters = run.bench, run.adapters
    for method in DATA_FREE:
        for scale in SCALES:
            run.add(f"{method} k={r}" + (f", scale {scale}" if scale != 1 else ""), f"evidence {method} k={r} x{scale}",
                    lambda m=method: bench.merged(adapters, m, rank=r), scale)
    run.add(f"concat (rank {u})", "merge concat", lambda: bench.merged(adapters, "concat"))
    run.add(f"concat (rank {u}), weights 1/n", "evidence concat mean",
            lambda: bench.merged(adapters, "concat", weights=[1 / len(adapters)] * len(adapters)))


def _proxy_scale_variants(run: _Run, method: str, r: int) -> None:
    """`method` at rank r scaled by the Gram proxy's best scale, by its best scale per module, and by `auto`."""
    bench, adapters, calibrations = run.bench, run.adapters, run.calibrations
    merged = bench.merged(adapters, method, rank=r)
    per_module = module_terms(merged, adapters, calibrations)
    s = best_scale(gram_terms(merged, adapters, calibrations))
    run.add(f"{method} k={r}, proxy scale ({s:.2f})", f"evidence {method} k={r} proxy-scale n={PROMPTS}",
            lambda m=merged: m, s)
    scales = module_scales(per_module)
    modules = {m: ll.LoraFactors(f.A * abs(scales[m]) ** 0.5, f.B * (abs(scales[m]) ** 0.5 * (1 if scales[m] >= 0
                                                                                       else -1)), f.kind)
               for m, f in merged.items()}
    run.add(f"{method} k={r}, per-module proxy scales", f"evidence {method} k={r} module-scales n={PROMPTS}",
            lambda m=modules, src=merged: ll.Adapter(m, src.metadata, "scaled"))
    run.add(f"{method} k={r}, scale=auto (retention)", f"evidence {method} k={r} scale-auto n={PROMPTS}",
            lambda m=method: merge_auto(adapters, model=run.model, tokenizer=run.tokenizer, prompts=run.prompts,
                                        calibration=calibrations, rank=r, methods=[m], scorer=run.scorers["last"]))


def _auto_row(run: _Run, r: int) -> tuple[str, float]:
    """`auto`'s choice among the default candidates at rank r, evaluated: its row's label and the seconds it took."""
    bench = run.bench
    started = time.perf_counter()
    chosen = merge_auto(run.adapters, model=run.model, tokenizer=run.tokenizer, prompts=run.prompts,
                        calibration=run.calibrations, rank=r, max_length=bench.config.max_length,
                        scorer=run.scorers["last"])
    seconds = time.perf_counter() - started
    label = f"auto k={r}: {chosen.metadata['provenance']['auto']['chosen']}"
    run.table.rows[label] = bench.evaluate(f"evidence auto k={r} n={PROMPTS}", lambda: chosen, bench.tasks)
    run.keys[label] = f"evidence auto k={r} n={PROMPTS}"
    return label, seconds


def _notes(bench, table, measures, keys, auto_label, seconds, splits) -> None:
    zero, own = table.rows["zero-shot (base model)"], table.rows["own LoRA (upper reference)"]
    tasks = {t.name: t for t in bench.tasks}
    for split, columns in splits.items():
        gains, values = [], {m: [] for m in ("last", "all", "proxy")}
        for label, measure in measures.items():
            for i, name in enumerate(bench.names):
                if name in columns and own[name] - zero[name] > 0.02:
                    gains.append((table.rows[label][name] - zero[name]) / (own[name] - zero[name]))
                    for m in values:
                        values[m].append(measure[m][i])
        table.notes.append(f"Spearman correlation with the normalised accuracy gain over {len(gains)} (variant, task) "
                           f"pairs of the {split} tasks: " + ", ".join(
                               f"retention ({m}) {spearman(v, gains):+.3f}" if m != "proxy" else
                               f"Gram proxy {spearman(v, gains):+.3f}" for m, v in values.items()) + ".")
    for label, measure in measures.items():
        table.notes.append(f"{label}: retention (last) " + ", ".join(f"{v:.2f}" for v in measure["last"]))
    confirm = splits["confirm"]

    def mean(label: str) -> float:
        return statistics.mean(table.rows[label][c] for c in confirm)

    best = max(measures, key=mean)
    table.notes.append(f"auto (rank {bench.config.rank}, {PROMPTS} prompts per task, scored with last positions) "
                       f"took {seconds:.0f} s and chose {auto_label.split(': ', 1)[1]}; "
                       f"confirm mean {mean(auto_label):.3f}, "
                       f"best single variant on confirm {best} {mean(best):.3f}.")
    for other in (best, f"tsv k={bench.config.rank}", f"ties k={bench.config.rank}"):
        result = paired_difference({c: bench.rows(keys[auto_label], tasks[c]) for c in confirm},
                                   {c: bench.rows(keys[other], tasks[c]) for c in confirm}, confirm)
        table.notes.append(describe("auto", other, result, "confirm tasks"))
