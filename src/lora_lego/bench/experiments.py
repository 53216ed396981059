"""The benchmark's experiments (the paper's, reproduced offline). Each returns a `Table` of accuracies.

  main     all task LoRAs merged with every registered method (default ranks)   - the paper's main table
  sweep    `lego` and its variants with k = 0.5r .. 6r, and the dual-reweighting ablation at k = r
  prune    each LoRA pruned to r/2 and r/3: `lego` (prune) vs truncated SVD (task_arithmetic of one)
  hetero   one task at 2r (alpha 2x), the others at r: every method that accepts mixed ranks
  seeds    `lego`, its variants and `dare_ties` over 5 seeds: spread of the mean accuracy
  heldout  merge n-1 LoRAs, evaluate on the left-out task (out of domain), against zero-shot
  autorank the `lego` variants choosing k per module (max_error, cap 3r) against fixed k = r and 3r
  calibrated  regmean and lego_calibrated with unlabeled train prompts (in `calibrated.py`)

The `lego` variants (canonical="svd", lego_rank1) are beyond the paper (issue 7).

Evaluations are cached in <out>/evaluations.json (key: what was evaluated), so an interrupted run resumes.
"""

from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

import lora_lego as ll

from ..errors import LoraLegoError, LoraLegoWarning
from ..methods import available_methods, get_method
from .lm import TrainConfig, applied, correct_rows, load_base
from .pool import ensure_adapter, task_split
from .tasks import Task

NEEDS_RANK = {"concat", "ensemble", "average"}  # methods whose output rank is not a parameter
# lego and its beyond-the-paper variants (issue 7): label -> (method, parameters)
LEGO_VARIANTS = {"lego": ("lego", {}), "lego canonical=svd": ("lego", {"canonical": "svd"}),
                 "lego_rank1": ("lego_rank1", {})}


def data_free_methods() -> list[str]:
    """The registered methods that need no calibration data (the calibrated ones have their own experiment)."""
    return [m for m in available_methods() if not get_method(m).needs_calibration]


@dataclass
class Table:
    """Rows of accuracies: row label -> {column -> accuracy}; plus notes shown under the table."""

    title: str
    columns: list[str]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    splits: dict[str, list[str]] = field(default_factory=dict)  # e.g. "dev" -> task columns: a mean column each


class Bench:
    """The trained task LoRAs, the base model and a persistent cache of evaluations."""

    def __init__(self, cache: Path, model_dir: Path, tasks: list[Task], out: Path, *,
                 config: TrainConfig = TrainConfig(), n_test: int = 300, seed: int = 0,
                 training_seeds: tuple[int, ...] = (0, 1), device: torch.device = torch.device("cpu")):
        self.cache, self.model_dir, self.tasks, self.out = cache, model_dir, tasks, out
        self.device = device  # where the model trains and evaluates (merges run on the CPU)
        self.config, self.n_test, self.seed = config, n_test, seed
        self.training_seeds = training_seeds  # the protocol's training seeds of the task LoRAs
        self.out.mkdir(parents=True, exist_ok=True)
        self._evaluations_path = out / "evaluations.json"
        self._evaluations = json.loads(self._evaluations_path.read_text()) if self._evaluations_path.exists() else {}
        self._model = None

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def folder(self, task: Task, config: TrainConfig | None = None) -> Path:
        return ensure_adapter(self.cache, self.model_dir, task, config or self.config, self.n_test, self.device)

    def adapter(self, task: Task, config: TrainConfig | None = None) -> ll.Adapter:
        adapter = ll.load_adapter(self.folder(task, config))
        adapter.name = task.name
        return adapter

    def evaluate(self, key: str, adapter: Callable[[], ll.Adapter | None], tasks: list[Task]) -> dict[str, float]:
        """Accuracy per task of the base model plus `adapter()` (built only if not cached under `key`).

        Each test row's correctness is cached too ("<key> @ <task> #rows", a 0/1 string), for `rows`."""
        key = self._key(key)
        missing = [t for t in tasks if f"{key} @ {t.name} #rows" not in self._evaluations]
        if missing:
            model, tokenizer = self.model()
            with applied(model, adapter()):
                for task in missing:
                    _, test = task_split(self.cache, task, self.n_test)
                    correct = correct_rows(model, tokenizer, task, test, max_length=self.config.max_length,
                                           precision=self.config.precision, desc=f"{key} on {task.name}")
                    self._evaluations[f"{key} @ {task.name}"] = sum(correct) / len(correct)
                    self._evaluations[f"{key} @ {task.name} #rows"] = "".join("01"[c] for c in correct)
                    self._save()
        return {t.name: self._evaluations[f"{key} @ {t.name}"] for t in tasks}

    def rows(self, key: str, task: Task) -> list[int]:
        """The 0/1 correctness of each test row of `task` under an evaluation already made with `evaluate`."""
        return [int(c) for c in self._evaluations[f"{self._key(key)} @ {task.name} #rows"]]

    def _key(self, key: str) -> str:
        return f"{self.config.key()} n_test={self.n_test} {key}"  # evaluations of other settings never mix

    def model(self):
        """(model, tokenizer) of the base model, loaded once."""
        if self._model is None:
            self._model = load_base(self.model_dir, self.device)
        return self._model

    def _save(self) -> None:
        partial = self._evaluations_path.with_suffix(".partial")
        partial.write_text(json.dumps(self._evaluations, indent=1, sort_keys=True))
        partial.replace(self._evaluations_path)

    def merged(self, adapters: list[ll.Adapter], method: str, **params) -> ll.Adapter:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LoraLegoWarning)
            return ll.merge(adapters, method, seed=params.pop("seed", self.seed), **params)

    def references(self, table: Table) -> None:
        """Add the zero-shot row and the own-LoRA row (each task's LoRA on its own task) to `table`."""
        table.rows["zero-shot (base model)"] = self.evaluate("base", lambda: None, self.tasks)
        table.rows["own LoRA (upper reference)"] = {
            t.name: self.evaluate(f"own {t.name}", lambda t=t: self.adapter(t), [t])[t.name] for t in self.tasks}


def main_table(bench: Bench) -> Table:
    table = Table("(a) Multi-task merge of all task LoRAs, every method at its default rank", bench.names)
    bench.references(table)
    adapters = [bench.adapter(t) for t in bench.tasks]
    r = bench.config.rank
    for method in data_free_methods():
        label = method if method in NEEDS_RANK else f"{method} (k={r})"
        table.rows[label] = bench.evaluate(f"merge {method}", lambda m=method: bench.merged(adapters, m), bench.tasks)
    table.rows[f"lego canonical=svd (k={r})"] = bench.evaluate(
        "merge lego canonical=svd", lambda: bench.merged(adapters, "lego", canonical="svd"), bench.tasks)
    table.notes.append(f"{len(adapters)} LoRAs of rank {r}; weights 1; concat = sum of deltas (rank "
                       f"{r * len(adapters)}), ensemble = their mean; rank-k methods default to k = r.")
    return table


def sweep_table(bench: Bench) -> Table:
    table = Table("(b) lego and its variants: number of clusters k; the dual-reweighting ablation", bench.names)
    adapters = [bench.adapter(t) for t in bench.tasks]
    r, units = bench.config.rank, bench.config.rank * len(bench.tasks)
    for label, (method, params) in LEGO_VARIANTS.items():
        for k in sorted({max(1, r // 2), r, 2 * r, 3 * r, units}):
            table.rows[f"{label}, k={k}"] = bench.evaluate(
                f"{label} k={k}", lambda k=k, m=method, p=params: bench.merged(adapters, m, rank=k, **p), bench.tasks)
    for k in (r, 3 * r):
        for label, param_norm, output in [("no reweighting", "off", False), ("parameter only", "inf", False),
                                          ("output only", "off", True), ("both (default)", "inf", True)]:
            table.rows[f"lego, k={k}, {label}"] = bench.evaluate(
                f"lego k={k} param_norm={param_norm} output_reweight={output}",
                lambda k=k, p=param_norm, o=output: bench.merged(adapters, "lego", rank=k, param_norm=p,
                                                                  output_reweight=o), bench.tasks)
    table.notes.append(f"k={units} is every unit in its own cluster: the exact sum, scaled by sqrt(r/k) when "
                       f"output reweighting is on. At k=r={r} the output factor sqrt(r/k) is 1, so the "
                       f"ablation is repeated at k={3 * r} (factor {(1 / 3) ** 0.5:.3f}).")
    return table


def prune_table(bench: Bench) -> Table:
    r = bench.config.rank
    ranks = sorted({max(1, r // 2), max(1, r // 3)}, reverse=True)
    table = Table(f"(c) Pruning each LoRA from rank {r}: lego vs truncated SVD, on its own task", bench.names)
    table.rows[f"original (r={r})"] = {
        t.name: bench.evaluate(f"own {t.name}", lambda t=t: bench.adapter(t), [t])[t.name] for t in bench.tasks}
    for k in ranks:
        for method, label in [("lego", "lego"), ("task_arithmetic", "truncated SVD")]:
            table.rows[f"{label}, r={k}"] = {
                t.name: bench.evaluate(f"prune {method} k={k} {t.name}",
                                       lambda t=t, m=method, k=k: bench.merged([bench.adapter(t)], m, rank=k),
                                       [t])[t.name]
                for t in bench.tasks}
    return table


def hetero_table(bench: Bench) -> Table:
    big = replace(bench.config, rank=2 * bench.config.rank, alpha=2 * bench.config.alpha)
    first = bench.tasks[0]
    table = Table(f"(d) Heterogeneous merge: {first.name} at r={big.rank} (alpha {big.alpha}), the others at "
                  f"r={bench.config.rank}", bench.names)
    adapters = [bench.adapter(first, big)] + [bench.adapter(t) for t in bench.tasks[1:]]
    table.rows[f"own LoRA ({first.name} at r={big.rank})"] = {
        first.name: bench.evaluate(f"own {first.name} r={big.rank}", lambda: adapters[0], [first])[first.name]}
    for method in data_free_methods():
        try:
            table.rows[method] = bench.evaluate(f"hetero {method}", lambda m=method: bench.merged(adapters, m),
                                                bench.tasks)
        except LoraLegoError as error:
            table.notes.append(f"{method}: refused ({error})")
    table.rows["lego canonical=svd"] = bench.evaluate(
        "hetero lego canonical=svd", lambda: bench.merged(adapters, "lego", canonical="svd"), bench.tasks)
    table.notes.append(f"Rank-k methods default to k = the largest input rank, {big.rank}.")
    return table


def seeds_table(bench: Bench, seeds: int = 5) -> Table:
    table = Table(f"(e) Seed variance over {seeds} seeds (mean accuracy over tasks)", ["mean", "std", "min", "max"])
    adapters = [bench.adapter(t) for t in bench.tasks]
    for label, (method, params) in {**LEGO_VARIANTS, "dare_ties": ("dare_ties", {})}.items():
        means = []
        for seed in range(seeds):
            result = bench.evaluate(f"merge {label}" if seed == bench.seed else f"merge {label} seed={seed}",
                                    lambda m=method, s=seed, p=params: bench.merged(adapters, m, seed=s, **p),
                                    bench.tasks)
            means.append(statistics.mean(result.values()))
        table.rows[label] = {"mean": statistics.mean(means), "std": statistics.stdev(means) if seeds > 1 else 0.0,
                              "min": min(means), "max": max(means)}
    return table


def heldout_table(bench: Bench) -> Table:
    table = Table("(f) Held-out task: merge the other LoRAs, evaluate on the left-out task", bench.names)
    table.rows["zero-shot (base model)"] = bench.evaluate("base", lambda: None, bench.tasks)
    methods = {**LEGO_VARIANTS, **{m: (m, {}) for m in ("ensemble", "task_arithmetic", "ties")}}
    for label, (method, params) in methods.items():
        row = {}
        for task in bench.tasks:
            others = [bench.adapter(t) for t in bench.tasks if t is not task]
            row[task.name] = bench.evaluate(f"heldout {label} without {task.name}",
                                            lambda m=method, o=others, p=params: bench.merged(o, m, **p),
                                            [task])[task.name]
        table.rows[label] = row
    return table


AUTORANK_ERRORS = (0.5, 0.35, 0.2)  # max_error: relative unit error left by the clustering


def autorank_table(bench: Bench) -> Table:
    """The lego variants with k chosen per module (issue 7): smallest k whose clustering meets `max_error`,
    capped at 3r, against fixed k = r and k = 3r (the `sweep` rows, same cache keys); label: mean k."""
    table = Table("(g) Choosing k per module: max_error with cap k = 3r, against fixed k", bench.names)
    adapters = [bench.adapter(t) for t in bench.tasks]
    r = bench.config.rank
    cap = min(3 * r, r * len(adapters))  # k >= the number of units is every unit its own cluster
    for label, (method, params) in LEGO_VARIANTS.items():
        runs = [(f"k={k}", f"{label} k={k}", {"rank": k}) for k in (r, 3 * r)]
        runs += [(f"max_error={e}", f"{label} k<={3 * r} max_error={e}", {"rank": 3 * r, "max_error": e})
                 for e in AUTORANK_ERRORS]
        for name, key, extra in runs:
            merged = bench.merged(adapters, method, **params, **extra)
            ranks = [entry["rank"] for entry in merged.metadata["report"].values()]
            row = f"{label}, {name} (mean k {statistics.mean(ranks):.1f})"
            table.rows[row] = bench.evaluate(key, lambda m=merged: m, bench.tasks)
            if "max_error" in extra:
                table.notes.append(f"{label}, {name}: k per module {min(ranks)}-{max(ranks)}, mean "
                                   f"{statistics.mean(ranks):.2f}, at the cap {cap} in "
                                   f"{sum(k == cap for k in ranks)} of {len(ranks)} modules")
    table.notes.append(f"{len(adapters)} LoRAs of rank r={r}; k is the smallest rank whose clustering leaves a "
                       "relative unit error sqrt(inertia / energy) <= max_error (binary search), capped at 3r; "
                       "mean k is over modules (merged adapter's report). Fixed-k rows are the `sweep` ones.")
    return table


EXPERIMENTS: dict[str, Callable[[Bench], Table]] = {
    "main": main_table, "sweep": sweep_table, "prune": prune_table, "hetero": hetero_table, "seeds": seeds_table,
    "heldout": heldout_table, "autorank": autorank_table,
}
