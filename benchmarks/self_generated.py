"""Self-generated calibration (issue 29, item 2; docs/results.md (k)): regmean at rank 4 calibrated on prompts
that each adapter writes itself (16 samples from base + that adapter), against real-prompt regmean (16 train
prompts per task) and the best data-free merge (tsv k=4), on the four r=4 q_proj/v_proj LoRAs of
SmolLM2-135M-Instruct of the evidence experiment, 200 test rows per task.

    cp /work/cache/runs/evidence4/evaluations.json /work/cache/runs/selfgen/   # reuse cached accuracies
    python benchmarks/self_generated.py --cache /work/cache --out /work/cache/runs/selfgen

The start is chosen on the dev tasks (hyperbaton, fever) only; the gap closed is reported on the confirm
tasks (rt_polarity, snips_intent): (selfgen - tsv) / (regmean real - tsv).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from beyond_regmean import CONFIG, TASKS, setup

import lora_lego as ll
from lora_lego.bench.calibrated import split_tasks
from lora_lego.calibration.generate import STARTS, generate_prompts

REAL = "evidence regmean k=4 n=16"  # the evidence experiment's keys (cached in its evaluations.json)
DATA_FREE = "evidence tsv k=4 x1.0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache")
    parser.add_argument("--out", required=True)
    parser.add_argument("--starts", nargs="+", default=list(STARTS), choices=STARTS)
    parser.add_argument("--n", type=int, default=16, help="generated prompts per adapter")
    parser.add_argument("--max-length", type=int, default=64, help="new tokens per generated prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--activations", choices=["base", "adapted"], default="base",
                        help="each task's Grams through the base model, or with its adapter applied")
    args = parser.parse_args()
    out = Path(args.out)
    s = setup(args.cache, args.out)
    bench, tasks, adapters, model, tokenizer, union = s.bench, s.tasks, s.adapters, s.model, s.tokenizer, s.union
    rows = {"tsv k=4 (data-free)": bench.evaluate(DATA_FREE, _missing, tasks),
            "regmean k=4, 16 real prompts": bench.evaluate(REAL, _missing, tasks)}
    for start in args.starts:
        started = time.perf_counter()
        prompts = [generate_prompts(model, tokenizer, a, args.n, max_length=args.max_length, seed=args.seed,
                                    start=start, progress=True) for a in adapters]
        seconds = time.perf_counter() - started
        folder = out / "prompts" / f"{start}-n{args.n}-L{args.max_length}-seed{args.seed}"
        folder.mkdir(parents=True, exist_ok=True)
        for task, texts in zip(TASKS, prompts):
            (folder / f"{task}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        calibrations = [ll.calibrate(model, p, tokenizer=tokenizer, modules=union, max_length=CONFIG.max_length,
                                     adapter=a if args.activations == "adapted" else None)
                        for a, p in zip(adapters, prompts)]
        adapted = ", adapted" if args.activations == "adapted" else ""
        label = f"regmean k=4, {args.n} generated ({start}, L={args.max_length}, seed {args.seed}{adapted})"
        rows[label] = bench.evaluate(f"selfgen regmean k=4 n={args.n} start={start} L={args.max_length} "
                                     f"seed={args.seed}{adapted}", lambda c=calibrations: bench.merged(
                                         adapters, "regmean", rank=4, calibration=c), tasks)
        print(f"{label}: generation {seconds:.0f} s for {len(adapters)} adapters")
    print(report(rows, split_tasks(TASKS)))


def _missing():
    raise SystemExit("reference accuracies not cached: copy the evidence experiment's evaluations.json into --out")


def report(rows: dict[str, dict[str, float]], splits: dict[str, list[str]]) -> str:
    tsv, real = (statistics.mean(rows[label][t] for t in splits["confirm"]) for label in list(rows)[:2])
    lines = [f"| variant | {' | '.join(TASKS)} | dev mean | confirm mean | gap closed (confirm) |",
             "|---" * (len(TASKS) + 4) + "|"]
    for label, row in rows.items():
        dev, confirm = (statistics.mean(row[t] for t in splits[s]) for s in ("dev", "confirm"))
        closed = (confirm - tsv) / (real - tsv) if real != tsv else float("nan")
        lines.append(f"| {label} | {' | '.join(f'{row[t]:.3f}' for t in TASKS)} | {dev:.3f} | {confirm:.3f} | "
                     f"{closed:+.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
