"""The dev / confirm protocol for choosing data-free methods and defaults without overfitting (issue 17).

  1. Every variant (a method with its parameters: output rank, `scale="norm"`, Pico, core space, ...) is
     evaluated on the *dev* tasks only, for each training seed of the task LoRAs (all LoRAs of one seed
     are merged together).
  2. In each family (the methods of one paper), the variant with the best dev mean is chosen.
  3. Only the chosen variants, and `ties` at its defaults as the reference, are evaluated on the *confirm*
     tasks, once. The confirm numbers are what we report; nothing is tuned on them. The best of them
     is the CLI's default method (`registry.DEFAULT_METHOD`).

Accuracies are means over the seeds; "A beats B" intervals pair each test row's seed-averaged correctness
(`stats.paired_difference`). Dev tasks are the odd positions of the task list, confirm the even ones.
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass, field, replace

from .calibrated import split_tasks
from .experiments import Bench, Table
from .stats import describe, paired_difference
from .tasks import Task

REFERENCE = "ties"


@dataclass(frozen=True)
class Variant:
    family: str
    label: str
    method: str
    params: dict = field(default_factory=dict)

    def key(self) -> str:
        return f"merge {self.method}" + "".join(f" {k}={v}" for k, v in sorted(self.params.items()))


def variants(r: int, R: int) -> list[Variant]:
    """The variants tried on the dev tasks: r = the LoRAs' rank, R = the sum of their ranks. (24 of them,
    what a few CPU hours allow for two seeds of 8 tasks; the last four were added after a first run of the
    other 20, see docs/results.md table (i''). More scale=norm and Pico combinations are left to a larger run.)"""
    norm = {"scale": "norm"}
    return [
        Variant("task arithmetic", f"task_arithmetic k={r}", "task_arithmetic"),
        Variant("task arithmetic", f"task_arithmetic k={r}, scale=norm", "task_arithmetic", norm),
        Variant("task arithmetic", f"concat (rank {R})", "concat"),
        Variant("ties", f"ties k={r}", "ties"),
        Variant("ties", f"ties k={r}, space=core", "ties", {"space": "core"}),
        Variant("ties", f"ties k={r}, scale=norm", "ties", norm),
        Variant("knots", f"knots_ties k={r}", "knots_ties"),
        Variant("dare", f"dare_ties k={r}", "dare_ties"),
        Variant("lego", f"lego k={r} (paper)", "lego"),
        Variant("lego", f"lego k={r}, canonical=svd", "lego", {"canonical": "svd"}),
        Variant("lego", f"lego k={3 * r}", "lego", {"rank": 3 * r}),
        Variant("lego", f"lego_rank1 k={r}", "lego_rank1"),
        Variant("lego", f"lego_rank1 k={3 * r}", "lego_rank1", {"rank": 3 * r}),
        Variant("tsv", f"tsv (rank {R})", "tsv"),
        Variant("tsv", f"tsv (rank {R}), scale=norm", "tsv", norm),
        Variant("iso", f"iso_c (rank {R})", "iso_c"),
        Variant("iso", f"iso_c (rank {R}), scale=norm", "iso_c", norm),
        Variant("iso", f"iso_cts (rank {R})", "iso_cts"),
        Variant("star", f"star (rank {R})", "star"),
        Variant("star", f"star (rank {R}), scale=norm", "star", norm),
        Variant("ctm", f"ctm k={r}", "ctm"),
        Variant("ctm", f"ctm k={r}, scale=norm", "ctm", norm),
        Variant("pico", f"pico + task_arithmetic (rank {R})", "task_arithmetic", {"rank": R, "pico": True}),
        Variant("pico", f"pico + ties k={r}", "ties", {"pico": True}),
    ]


def seeded(bench: Bench, seed: int) -> Bench:
    """A view of `bench` whose task LoRAs are trained with `seed`; shares the model and the evaluations."""
    bench.model()
    view = copy.copy(bench)
    view.config = replace(bench.config, seed=seed)
    return view


def protocol_table(bench: Bench) -> Table:
    splits = split_tasks(bench.names)
    tasks = {t.name: t for t in bench.tasks}
    dev, confirm = ([tasks[n] for n in splits[s]] for s in ("dev", "confirm"))
    views = [seeded(bench, seed) for seed in bench.training_seeds]
    merged = {view.config.seed: [view.adapter(t) for t in bench.tasks] for view in views}
    r = bench.config.rank
    R = r * len(bench.tasks)
    table = Table(f"(i) Dev / confirm protocol: data-free methods over {len(views)} training seed(s)",
                  bench.names, splits=splits)

    def evaluate(variant: Variant, on: list[Task]) -> None:
        per_seed = [view.evaluate(variant.key(), lambda v=view: v.merged(merged[v.config.seed], variant.method,
                                                                            **variant.params), on) for view in views]
        row = table.rows.setdefault(variant.label, {})
        row.update({t.name: statistics.mean(result[t.name] for result in per_seed) for t in on})

    table.rows["zero-shot (base model)"] = views[0].evaluate("base", lambda: None, bench.tasks)
    table.rows["own LoRA (upper reference)"] = {
        t.name: statistics.mean(view.evaluate(f"own {t.name}", lambda v=view, t=t: v.adapter(t), [t])[t.name]
                                for view in views) for t in bench.tasks}
    tried = variants(r, R)
    for variant in tried:
        evaluate(variant, dev)
    dev_mean = {v.label: statistics.mean(table.rows[v.label][t.name] for t in dev) for v in tried}
    chosen: dict[str, Variant] = {}
    for variant in tried:
        best = chosen.get(variant.family)
        if best is None or dev_mean[variant.label] > dev_mean[best.label]:
            chosen[variant.family] = variant
    reference = tried[[v.method for v in tried].index(REFERENCE)]
    finalists = list({v.label: v for v in [reference, *chosen.values()]}.values())
    for variant in finalists:
        evaluate(variant, confirm)
    _notes(table, views, tried, chosen, finalists, reference, dev, confirm, r, R)
    return table


def _rows(views: list[Bench], variant: Variant, task: Task) -> list[float]:
    """The seed-averaged correctness of each test row of `task` under `variant`."""
    per_seed = [view.rows(variant.key(), task) for view in views]
    return [statistics.mean(values) for values in zip(*per_seed)]


def _notes(table, views, tried, chosen, finalists, reference, dev, confirm, r, R) -> None:
    def mean(label: str, on: list[Task]) -> float:
        return statistics.mean(table.rows[label][t.name] for t in on)

    def compare(first: Variant, second: Variant, on: list[Task], where: str) -> str:
        result = paired_difference({t.name: _rows(views, first, t) for t in on},
                                   {t.name: _rows(views, second, t) for t in on}, [t.name for t in on])
        return describe(first.label, second.label, result, where)

    best = max(finalists, key=lambda v: mean(v.label, confirm))
    table.notes += [
        f"{len(table.columns)} task LoRAs of rank r={r} per training seed, seeds "
        f"{', '.join(str(view.config.seed) for view in views)}; "
        f"every merge merges all of one seed's LoRAs; accuracies are means over the seeds. Rank {R} = the sum of "
        "the ranks (the exact span); k = r rows are truncated to the LoRAs' own rank.",
        f"Dev tasks (variants compared, one chosen per family): {', '.join(t.name for t in dev)}. Confirm tasks "
        f"(only the chosen variants, evaluated once, never tuned on): {', '.join(t.name for t in confirm)}.",
        "Chosen on dev: " + "; ".join(f"{family}: {v.label} ({mean(v.label, dev):.3f})"
                                      for family, v in chosen.items()) + ".",
        f"Best on the confirm tasks: {best.label}, {mean(best.label, confirm):.3f} against "
        f"{reference.label} {mean(reference.label, confirm):.3f}.",
    ]
    for variant in finalists:
        if variant is not reference:
            table.notes.append(compare(variant, reference, confirm, "confirm tasks"))
    for view in views:  # is the ranking stable across training seeds?
        seed = view.config.seed
        scores = {v.label: statistics.mean(statistics.mean(view.rows(v.key(), t)) for t in confirm) for v in finalists}
        order = sorted(scores, key=scores.get, reverse=True)
        table.notes.append(f"training seed {seed}, confirm mean: " + ", ".join(f"{label} {scores[label]:.3f}"
                                                                            for label in order))
        if len(views) > 1 and best is not reference:
            alone = paired_difference({t.name: view.rows(best.key(), t) for t in confirm},
                                      {t.name: view.rows(reference.key(), t) for t in confirm},
                                      [t.name for t in confirm])
            table.notes.append(describe(best.label, reference.label, alone,
                                        f"confirm tasks, training seed {seed} alone"))
