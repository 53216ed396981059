"""Beyond RegMean and TSV (issue 29; docs/results.md (l)): RegMean++ (exact and fixed point), WUDI (closed form,
ridge, the reference's early-stopped Adam, scale=auto) and the rank budget (allocate=greedy), at equal output
size, on the four r=4 q_proj/v_proj LoRAs of SmolLM2-135M-Instruct of the evidence experiment, 200 test rows
per task, 100 *train* prompts per task for calibration and 16 of them for scale=auto (never test rows).

    cp /work/cache/runs/evidence4/evaluations.json /work/cache/runs/beyond/   # reuse cached accuracies
    python benchmarks/beyond_regmean.py --cache /work/cache --out /work/cache/runs/beyond

Dev tasks (hyperbaton, fever) choose the variants' options; the confirm tasks (rt_polarity, snips_intent) report.
Every row states its rank and parameter count; rows above rank r = 4 are the "rank sum" block (16 = 4 x 4).
"""

import argparse
import json
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import lora_lego as ll
from lora_lego.bench.assets import base_model_dir, cache_dir
from lora_lego.bench.calibrated import split_tasks
from lora_lego.bench.experiments import Bench
from lora_lego.bench.lm import TrainConfig
from lora_lego.bench.pool import task_split
from lora_lego.bench.stats import paired_difference
from lora_lego.bench.tasks import get_task
from lora_lego.calibration.auto import merge_auto
from lora_lego.calibration.regmean_pp import merge_regmean_pp
from lora_lego.calibration.score import Scorer
from lora_lego.errors import LoraLegoWarning

CONFIG = TrainConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
TASKS = ["rt_polarity", "hyperbaton", "snips_intent", "fever"]
N = 100  # calibration prompts per task
SCORED = 16  # prompts per task on which scale=auto scores its candidates
R, SUM = 4, 16


@dataclass
class Setup:
    """The four-task benchmark of (j)-(m): its Bench, tasks, task LoRAs, base model and the modules they touch."""

    bench: Bench
    tasks: list
    adapters: list
    model: object
    tokenizer: object
    union: list[str]


def setup(cache: str | None, out: str, *, seed: int = 0) -> Setup:
    """The benchmark of CONFIG (training `seed`) on TASKS, 200 test rows each, results cached in `out`."""
    root = cache_dir(cache)
    tasks = [get_task(name) for name in TASKS]
    bench = Bench(root, base_model_dir(root), tasks, Path(out), config=replace(CONFIG, seed=seed), n_test=200)
    adapters = [bench.adapter(t) for t in tasks]
    model, tokenizer = bench.model()
    return Setup(bench, tasks, adapters, model, tokenizer, list(dict.fromkeys(m for a in adapters for m in a)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache")
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", help="build only the rows whose label contains one of these words")
    parser.add_argument("--seed", type=int, default=0, help="training seed of the task LoRAs (1: a second set, "
                        "trained on first use)")
    args = parser.parse_args()
    warnings.simplefilter("ignore", LoraLegoWarning)
    out = Path(args.out)
    s = setup(args.cache, args.out, seed=args.seed)
    bench, tasks, adapters, model, tokenizer, union = s.bench, s.tasks, s.adapters, s.model, s.tokenizer, s.union
    prompts = [[t.prompt(text) for text, _ in task_split(bench.cache, t, bench.n_test)[0][:N]] for t in tasks]
    length = CONFIG.max_length
    started = time.perf_counter()
    calibrations = [ll.calibrate(model, p, tokenizer=tokenizer, modules=union, max_length=length) for p in prompts]
    seconds = {"calibrate (base)": time.perf_counter() - started}
    rows: dict[str, dict] = {}
    calibrated = dict(calibration=calibrations)
    pp = dict(model=model, tokenizer=tokenizer, prompts=prompts, max_length=length)
    scored = [p[:SCORED] for p in prompts]  # scale=auto scores on the first 16, as the evidence experiment did
    auto = dict(model=model, tokenizer=tokenizer, prompts=scored, calibration=calibrations, max_length=length,
                scorer=Scorer(model, tokenizer, adapters, scored, max_length=length))
    rows_spec = [
        ("base model", "base", lambda: None),
        ("tsv k=4", "evidence tsv k=4 x1.0", lambda: bench.merged(adapters, "tsv", rank=R)),
        ("ties k=4", "evidence ties k=4 x1.0", lambda: bench.merged(adapters, "ties", rank=R)),
        ("iso_c k=4", "evidence iso_c k=4 x1.0", lambda: bench.merged(adapters, "iso_c", rank=R)),
        ("tsv k=4, scale=auto", "evidence tsv k=4 scale-auto n=16", None),
        ("ties k=4, scale=auto", "evidence ties k=4 scale-auto n=16", None),
        ("iso_c k=4, scale=auto", f"beyond iso_c k=4 scale-auto n={SCORED}", lambda: merge_auto(
            adapters, **auto, rank=R, methods=["iso_c"])),
        ("tsv k=4, allocate=greedy", "beyond tsv k=4 allocate", lambda: bench.merged(adapters, "tsv", rank=R,
                                                                                      allocate="greedy")),
        ("wudi k=4", "beyond wudi k=4", lambda: bench.merged(adapters, "wudi", rank=R)),
        ("wudi k=4, ridge 0.1", "beyond wudi k=4 ridge=0.1", lambda: bench.merged(adapters, "wudi", rank=R,
                                                                                   ridge=0.1)),
        ("wudi k=4, ridge 1", "beyond wudi k=4 ridge=1", lambda: bench.merged(adapters, "wudi", rank=R, ridge=1.0)),
        ("wudi k=4, Adam (reference: 300 steps, lr 1e-5)", "beyond wudi k=4 adam", lambda: bench.merged(
            adapters, "wudi", rank=R, solver="adam")),
        ("wudi k=4, scale=auto", f"beyond wudi k=4 scale-auto n={SCORED}", lambda: merge_auto(
            adapters, **auto, rank=R, methods=["wudi"])),
        ("regmean k=4", f"beyond regmean k=4 n={N}", lambda: bench.merged(adapters, "regmean", rank=R, **calibrated)),
        ("regmean k=4, allocate=greedy", f"beyond regmean k=4 allocate n={N}", lambda: bench.merged(
            adapters, "regmean", rank=R, allocate="greedy", **calibrated)),
        ("regmean_pp k=4 (layer by layer)", f"beyond regmean_pp k=4 n={N}", lambda: merge_regmean_pp(
            adapters, **pp, rank=R)),
        ("regmean_pp k=4, within=adapter", f"beyond regmean_pp k=4 within=adapter n={N}", lambda: merge_regmean_pp(
            adapters, **pp, rank=R, within="adapter")),
        ("regmean_pp k=4, rounds=1", f"beyond regmean_pp k=4 rounds=1 n={N}", lambda: merge_regmean_pp(
            adapters, **pp, rank=R, rounds=1)),
        ("regmean_pp k=4, rounds=2", f"beyond regmean_pp k=4 rounds=2 n={N}", lambda: merge_regmean_pp(
            adapters, **pp, rank=R, rounds=2)),
        ("auto k=4, 16 prompts (candidates now with wudi and regmean_pp)",
         f"beyond auto k=4 n={SCORED}", lambda: merge_auto(adapters, model=model, tokenizer=tokenizer, prompts=scored,
                                                          rank=R, max_length=length, scorer=auto["scorer"])),
        ("concat (exact sum), k=16", "merge concat", lambda: bench.merged(adapters, "concat")),
        ("wudi k=16", "beyond wudi k=16", lambda: bench.merged(adapters, "wudi", rank=SUM)),
        ("regmean k=16", f"beyond regmean k=16 n={N}", lambda: bench.merged(adapters, "regmean", **calibrated)),
        ("regmean_pp k=16 (layer by layer)", f"beyond regmean_pp k=16 n={N}", lambda: merge_regmean_pp(
            adapters, **pp)),
    ]
    for label, key, build in rows_spec:
        if args.only and (build is None or not any(word in label for word in args.only)):
            continue
        rows[label] = evaluate(bench, key, build, tasks, seconds, label)
    rows["own LoRA (upper reference)"] = {"key": None, "accuracy": {
        t.name: bench.evaluate(f"own {t.name}", lambda t=t: bench.adapter(t), [t])[t.name] for t in tasks},
        "rank": R, "parameters": adapters[0].num_parameters()}
    result = {"rows": rows, "seconds": seconds, "splits": split_tasks(TASKS)}
    (out / "beyond.json").write_text(json.dumps(result, indent=1))
    print(report(bench, rows, split_tasks(TASKS), tasks))
    print("seconds:", json.dumps({k: round(v, 1) for k, v in seconds.items() if v is not None}))


def evaluate(bench, key, build, tasks, seconds, label) -> dict:
    """Accuracy per task (cached by key), with the rank and parameter count of the merge and the seconds it took
    to build (cached in sizes.json beside the evaluations, so that a rerun builds nothing it has measured)."""
    if build is None:
        return {"key": key, "accuracy": bench.evaluate(key, _missing, tasks), "rank": R, "parameters": None}
    path = bench.out / "sizes.json"
    sizes = json.loads(path.read_text()) if path.exists() else {}

    def timed():
        begin = time.perf_counter()
        adapter = build()
        seconds[label] = time.perf_counter() - begin
        if adapter is not None:
            ranks = sorted(set(adapter.ranks.values()))
            sizes[key] = {"rank": "/".join(map(str, ranks)) if len(ranks) <= 2 else f"{ranks[0]}..{ranks[-1]}",
                          "parameters": adapter.num_parameters(), "seconds": seconds[label],
                          "chosen": adapter.metadata.get("provenance", {}).get("auto", {}).get("chosen")}
            path.write_text(json.dumps(sizes, indent=1))
        return adapter

    accuracy = bench.evaluate(key, timed, tasks)
    if key not in sizes and key != "base":
        timed()
    size = sizes.get(key, {"rank": 0, "parameters": 0})
    seconds.setdefault(label, size.get("seconds"))
    return {"key": key, "accuracy": accuracy, "rank": size["rank"], "parameters": size["parameters"],
            "chosen": size.get("chosen")}


def _missing():
    raise SystemExit("reference accuracies not cached: copy the evidence experiment's evaluations.json into --out")


def report(bench, rows, splits, tasks) -> str:
    own = rows["own LoRA (upper reference)"]["accuracy"]
    lines = [f"| variant | rank | parameters | {' | '.join(TASKS)} | dev mean | confirm mean | confirm / own |",
             "|---" * (len(TASKS) + 6) + "|"]
    for label, row in rows.items():
        acc = row["accuracy"]
        dev, confirm = (statistics.mean(acc[t] for t in splits[s]) for s in ("dev", "confirm"))
        normalised = statistics.mean(acc[t] / own[t] for t in splits["confirm"])
        params = f"{row['parameters']:,}" if row.get("parameters") is not None else "-"
        lines.append(f"| {label} | {row['rank']} | {params} | {' | '.join(f'{acc[t]:.3f}' for t in TASKS)} | "
                     f"{dev:.3f} | {confirm:.3f} | {normalised:.3f} |")
    pairs = [("regmean_pp k=4 (layer by layer)", "regmean k=4"), ("regmean_pp k=4, rounds=1", "regmean k=4"),
             ("regmean_pp k=4, rounds=2", "regmean k=4"), ("regmean_pp k=4, within=adapter", "regmean k=4"),
             ("regmean k=4, allocate=greedy", "regmean k=4"), ("regmean_pp k=16 (layer by layer)", "regmean k=16"),
             ("wudi k=4", "tsv k=4"), ("wudi k=4", "ties k=4"), ("wudi k=4, scale=auto", "tsv k=4"),
             ("wudi k=4, Adam (reference: 300 steps, lr 1e-5)", "wudi k=4"), ("tsv k=4, allocate=greedy", "tsv k=4"),
             ("regmean k=4", "tsv k=4")]
    lines.append("")
    by_name = {t.name: t for t in tasks}
    for first, second in pairs:
        if first in rows and second in rows:
            a, b = ({t: bench.rows(rows[x]["key"], by_name[t]) for t in splits["confirm"]} for x in (first, second))
            d, low, high = paired_difference(a, b, splits["confirm"])
            lines.append(f"- {first} minus {second}, confirm: {d:+.3f} [{low:+.3f}, {high:+.3f}]")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
