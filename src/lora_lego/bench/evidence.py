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
    splits = split_tasks(bench.names)
    table = Table(f"(j) Evidence: retention on {PROMPTS} unlabeled prompts per task against accuracy, and auto",
                  bench.names, splits=splits)
    bench.references(table)
    adapters = [bench.adapter(t) for t in bench.tasks]
    r, u = bench.config.rank, bench.config.rank * len(adapters)
    prompts = [[t.prompt(text) for text, _ in task_split(bench.cache, t, bench.n_test)[0][:PROMPTS]]
               for t in bench.tasks]
    model, tokenizer = bench.model()
    scorers = {p: Scorer(model, tokenizer, adapters, prompts, positions=p, max_length=bench.config.max_length)
               for p in ("last", "all")}
    union = list(dict.fromkeys(m for a in adapters for m in a))
    calibrations = [ll.calibrate(model, p, tokenizer=tokenizer, modules=union, max_length=bench.config.max_length)
                    for p in prompts]
    measures: dict[str, dict[str, list[float]]] = {}
    keys: dict[str, str] = {}

    def add(label: str, key: str, build, scale: float = 1.0) -> None:
        merged = build()
        applied = merged if scale == 1.0 else scaled(merged, scale)
        table.rows[label] = bench.evaluate(key, lambda: applied, bench.tasks)
        keys[label] = key
        terms = gram_terms(merged, adapters, calibrations)
        measures[label] = {"last": scorers["last"].scores(merged, scale).retention,
                           "all": scorers["all"].scores(merged, scale).retention,
                           "proxy": proxy_retention(terms, scale)}

    for method in DATA_FREE:
        for scale in SCALES:
            add(f"{method} k={r}" + (f", scale {scale}" if scale != 1 else ""), f"evidence {method} k={r} x{scale}",
                lambda m=method: bench.merged(adapters, m, rank=r), scale)
    add(f"concat (rank {u})", "merge concat", lambda: bench.merged(adapters, "concat"))
    add(f"concat (rank {u}), weights 1/n", "evidence concat mean",
        lambda: bench.merged(adapters, "concat", weights=[1 / len(adapters)] * len(adapters)))
    for method in ("tsv", "ties"):  # the scale from the Gram proxy: one global, or one per module
        merged = bench.merged(adapters, method, rank=r)
        per_module = module_terms(merged, adapters, calibrations)
        s = best_scale(gram_terms(merged, adapters, calibrations))
        add(f"{method} k={r}, proxy scale ({s:.2f})", f"evidence {method} k={r} proxy-scale n={PROMPTS}",
            lambda m=merged: m, s)
        scales = module_scales(per_module)
        modules = {m: ll.LoraFactors(f.A * abs(scales[m]) ** 0.5, f.B * (abs(scales[m]) ** 0.5 * (1 if scales[m] >= 0
                                                                                           else -1)), f.kind)
                   for m, f in merged.items()}
        add(f"{method} k={r}, per-module proxy scales", f"evidence {method} k={r} module-scales n={PROMPTS}",
            lambda m=modules, src=merged: ll.Adapter(m, src.metadata, "scaled"))
        add(f"{method} k={r}, scale=auto (retention)", f"evidence {method} k={r} scale-auto n={PROMPTS}",
            lambda m=method: merge_auto(adapters, model=model, tokenizer=tokenizer, prompts=prompts,
                                        calibration=calibrations, rank=r, methods=[m], scorer=scorers["last"]))
    for method in ("regmean", "lego_calibrated"):
        add(f"{method} k={r}", f"evidence {method} k={r} n={PROMPTS}",
            lambda m=method: bench.merged(adapters, m, rank=r, calibration=calibrations))
    started = time.perf_counter()
    chosen = merge_auto(adapters, model=model, tokenizer=tokenizer, prompts=prompts, calibration=calibrations,
                        rank=r, max_length=bench.config.max_length, scorer=scorers["last"])
    seconds = time.perf_counter() - started
    label = f"auto k={r}: {chosen.metadata['provenance']['auto']['chosen']}"
    table.rows[label] = bench.evaluate(f"evidence auto k={r} n={PROMPTS}", lambda: chosen, bench.tasks)
    keys[label] = f"evidence auto k={r} n={PROMPTS}"
    _notes(bench, table, measures, keys, label, seconds, splits)
    return table


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
