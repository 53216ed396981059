"""RegMean's relative ridge (docs/results.md (m)): regmean k=4 with G + lambda mean(diag G) I, lambda in RIDGES, on
the setup of beyond_regmean.py (four r=4 q_proj/v_proj LoRAs of SmolLM2-135M-Instruct, seed 0, 200 test rows per
task), calibrated on the first 100 and the first 16 *train* prompts per task (never test rows). Per row: accuracy,
the norm ratio ||merged delta||_F / ||sum of the task deltas||_F over modules (mean and max), and the paired 95%
interval against lambda = 0 at the same prompt count (confirm; dev for information). lambda is chosen on the dev
tasks (hyperbaton, fever): the best dev mean averaged over both prompt counts (ties: the smaller lambda); the
confirm tasks report it.

    mkdir -p /work/cache/runs/ridge && cp /work/cache/runs/beyond/evaluations.json /work/cache/runs/ridge/
    PYTHONPATH=src nice python benchmarks/regmean_ridge.py --cache /work/cache --out /work/cache/runs/ridge

The lambda = 0 rows reuse the cached keys of the earlier runs ("beyond regmean k=4 n=100", "evidence regmean
k=4 n=16": the same prompts, calibration and merge).

Inputs unlike the prompts (`--heldout`): merge three of the four LoRAs (regmean calibrated on their 100 prompts
each; ties for reference) and evaluate on the fourth task, which no adapter or prompt saw, against the base model's
zero-shot accuracy; the paired interval pools the four left-out tasks' rows.

    PYTHONPATH=src nice python benchmarks/regmean_ridge.py --cache /work/cache --out /work/cache/runs/ridge --heldout
"""

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

from beyond_regmean import CONFIG, TASKS, R, evaluate, setup

import lora_lego as ll
from lora_lego.bench.calibrated import split_tasks
from lora_lego.bench.pool import task_split
from lora_lego.bench.stats import paired_difference
from lora_lego.errors import LoraLegoWarning

PROMPTS = (100, 16)
RIDGES = (0.0, 1e-3, 1e-2, 1e-1)
CACHED = {100: "beyond regmean k=4 n=100", 16: "evidence regmean k=4 n=16"}  # the lambda = 0 rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache")
    parser.add_argument("--out", required=True)
    parser.add_argument("--heldout", action="store_true", help="merge three, evaluate on the fourth task instead")
    args = parser.parse_args()
    warnings.simplefilter("ignore", LoraLegoWarning)
    started = time.perf_counter()
    out = Path(args.out)
    s = setup(args.cache, args.out)
    bench, tasks, adapters, model, tokenizer, union = s.bench, s.tasks, s.adapters, s.model, s.tokenizer, s.union
    train = [[t.prompt(text) for text, _ in task_split(bench.cache, t, bench.n_test)[0][:max(PROMPTS)]] for t in tasks]
    if args.heldout:
        return heldout(bench, tasks, adapters, model, tokenizer, union, train, out, started)
    rows, seconds = {}, {}
    for n in PROMPTS:
        calibrations = [ll.calibrate(model, p[:n], tokenizer=tokenizer, modules=union, max_length=CONFIG.max_length)
                        for p in train]
        for ridge in RIDGES:
            label = f"regmean k={R}, {n} prompts, ridge {ridge:g}"
            key = CACHED[n] if ridge == 0 else f"ridge regmean k={R} n={n} ridge={ridge:g}"
            merged = bench.merged(adapters, "regmean", rank=R, calibration=calibrations,
                                  **({"ridge": ridge} if ridge else {}))
            row = evaluate(bench, key, lambda merged=merged: merged, tasks, seconds, label)
            rows[label] = {**row, "prompts": n, "ridge": ridge, "norms": norm_ratios(merged, adapters)}
    own = {t.name: bench.evaluate(f"own {t.name}", lambda t=t: bench.adapter(t), [t])[t.name] for t in tasks}
    splits = split_tasks(TASKS)
    text = report(bench, rows, own, splits, {t.name: t for t in tasks})
    minutes = (time.perf_counter() - started) / 60
    (out / "ridge.json").write_text(json.dumps({"rows": rows, "own": own, "splits": splits, "minutes": minutes},
                                               indent=1))
    print(text)
    print(f"wall time: {minutes:.1f} min")


HELDOUT_RIDGES = (0.0, 1e-3, 1e-2)


def heldout(bench, tasks, adapters, model, tokenizer, union, train, out, started) -> None:
    """Each task left out in turn: regmean (per ridge) and ties of the other three, evaluated on the left-out task."""
    calibrations = [ll.calibrate(model, p[:100], tokenizer=tokenizer, modules=union, max_length=CONFIG.max_length)
                    for p in train]
    keys = {"zero-shot (base model)": lambda t: "base", "ties k=4": lambda t: f"heldout ties k={R} without {t}",
            **{f"regmean k=4, ridge {r:g}": (lambda t, r=r: f"heldout regmean k={R} n=100 ridge={r:g} without {t}")
               for r in HELDOUT_RIDGES}}
    rows = {label: {} for label in keys}
    for i, task in enumerate(tasks):
        others, grams = [a for j, a in enumerate(adapters) if j != i], [c for j, c in enumerate(calibrations) if j != i]
        builds = {"zero-shot (base model)": lambda: None, "ties k=4": lambda o=others: bench.merged(o, "ties", rank=R),
                  **{f"regmean k=4, ridge {r:g}": (lambda o=others, g=grams, r=r: bench.merged(
                      o, "regmean", rank=R, calibration=g, **({"ridge": r} if r else {}))) for r in HELDOUT_RIDGES}}
        for label, build in builds.items():
            rows[label][task.name] = bench.evaluate(keys[label](task.name), build, [task])[task.name]
    lines = [f"| left out: | {' | '.join(TASKS)} | mean | - (ridge 0) [95% CI, rows of all four] |",
             "|---" * (len(TASKS) + 3) + "|"]
    zero = "regmean k=4, ridge 0"
    for label, row in rows.items():
        a, b = ({t.name: bench.rows(keys[lab](t.name), t) for t in tasks} for lab in (label, zero))
        d, low, high = paired_difference(a, b, TASKS)
        shown = "-" if label == zero else f"{d:+.3f} [{low:+.3f}, {high:+.3f}]"
        lines.append(f"| {label} | {' | '.join(f'{row[t]:.3f}' for t in TASKS)} | "
                     f"{statistics.fmean(row.values()):.3f} | {shown} |")
    minutes = (time.perf_counter() - started) / 60
    (out / "ridge_heldout.json").write_text(json.dumps({"rows": rows, "minutes": minutes}, indent=1))
    print("\n".join(lines) + f"\nwall time: {minutes:.1f} min")


def norm_ratios(merged: ll.Adapter, adapters: list[ll.Adapter]) -> dict[str, float]:
    """Per module ||merged delta||_F / ||sum of the task deltas||_F: the mean and the max over modules, and the
    module of the max."""
    ratios = {}
    for module in merged:
        total = sum(a[module].delta().double() for a in adapters if module in a)
        ratios[module] = float(merged[module].delta().double().norm() / total.norm())
    worst = max(ratios, key=ratios.__getitem__)
    return {"mean": statistics.fmean(ratios.values()), "max": ratios[worst], "max_module": worst}


def report(bench, rows, own, splits, by_name) -> str:
    """The table, the paired confirm intervals against lambda = 0 and the dev choice of lambda."""
    lines = [f"| variant | {' | '.join(TASKS)} | dev mean | confirm mean | confirm / own | norm ratio mean | "
             "norm ratio max | confirm - (ridge 0) [95% CI] | dev - (ridge 0) [95% CI] |",
             "|---" * (len(TASKS) + 8) + "|"]
    for label, row in rows.items():
        acc = row["accuracy"]
        dev, confirm = (statistics.fmean(acc[t] for t in splits[s]) for s in ("dev", "confirm"))
        normalised = statistics.fmean(acc[t] / own[t] for t in splits["confirm"])
        lines.append(f"| {label} | {' | '.join(f'{acc[t]:.3f}' for t in TASKS)} | {dev:.3f} | {confirm:.3f} | "
                     f"{normalised:.3f} | {row['norms']['mean']:.2f} | {row['norms']['max']:.2f} | "
                     f"{difference(bench, rows, row, splits['confirm'], by_name)} | "
                     f"{difference(bench, rows, row, splits['dev'], by_name)} |")
    dev_means = {ridge: statistics.fmean(statistics.fmean(r["accuracy"][t] for t in splits["dev"])
                                         for r in rows.values() if r["ridge"] == ridge) for ridge in RIDGES}
    chosen = max(RIDGES, key=lambda ridge: (round(dev_means[ridge], 6), -ridge))
    means = ", ".join(f"ridge {r:g}: {m:.4f}" for r, m in dev_means.items())
    lines += ["", f"dev mean over both prompt counts: {means}", f"dev-chosen ridge: {chosen:g}"]
    return "\n".join(lines)


def difference(bench, rows, row, names, by_name) -> str:
    """The paired difference of `row` minus the lambda = 0 row of its prompt count, on the tasks `names`."""
    if row["ridge"] == 0:
        return "-"
    zero = next(r for r in rows.values() if r["prompts"] == row["prompts"] and r["ridge"] == 0)
    a, b = ({t: bench.rows(r["key"], by_name[t]) for t in names} for r in (row, zero))
    d, low, high = paired_difference(a, b, names)
    return f"{d:+.3f} [{low:+.3f}, {high:+.3f}]"


if __name__ == "__main__":
    main()
