"""Another training seed, confirm tasks only: the seed-0 protocol's finalists (docs/results.md (i)) evaluated
on the task LoRAs trained with SEED. Same variant keys as `lora-lego bench protocol`, so the evaluations
are reused by a later full protocol run with that seed and precision.

    python benchmarks/seed_confirm.py CACHE [SEED] [PRECISION]      (defaults: seed 1, precision auto)
"""
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from lora_lego.bench.assets import base_model_dir
from lora_lego.bench.calibrated import split_tasks
from lora_lego.bench.experiments import Bench
from lora_lego.bench.lm import TrainConfig, resolve_precision
from lora_lego.bench.protocol import variants
from lora_lego.bench.stats import describe, paired_difference
from lora_lego.bench.tasks import DEFAULT_TASKS, get_task

cache = Path(sys.argv[1])
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
precision = resolve_precision(sys.argv[3] if len(sys.argv) > 3 else "auto", torch.device("cpu"))
tasks = [get_task(n) for n in DEFAULT_TASKS]
bench = Bench(cache, base_model_dir(cache), tasks, cache / "runs" / f"seed{seed}",
              config=TrainConfig(seed=seed, precision=precision), training_seeds=(seed,))
confirm = [t for t in tasks if t.name in split_tasks(bench.names)["confirm"]]
started = time.perf_counter()
adapters = []
for t in tasks:
    adapters.append(bench.adapter(t))
    print(f"trained {t.name} at {(time.perf_counter() - started) / 60:.1f} min", flush=True)
order = ["tsv (rank 48)", "ties k=6", "iso_cts (rank 48)", "lego k=6 (paper)", "ctm k=6, scale=norm",
         "pico + task_arithmetic (rank 48)", "knots_ties k=6", "star (rank 48)", "task_arithmetic k=6, scale=norm"]
by_label = {v.label: v for v in variants(6, 48)}
results = {"zero-shot": bench.evaluate("base", lambda: None, confirm),
           "own LoRA": {t.name: bench.evaluate(f"own {t.name}", lambda t=t: bench.adapter(t), [t])[t.name]
                        for t in confirm}}
print(json.dumps(results), flush=True)
for label in order:
    v = by_label[label]
    results[label] = bench.evaluate(v.key(), lambda v=v: bench.merged(adapters, v.method, **v.params), confirm)
    own = results["own LoRA"]
    mean = statistics.mean(results[label].values())
    norm = statistics.mean(results[label][t] / own[t] for t in own)
    print(f"{label}: {json.dumps(results[label])} mean {mean:.3f} normalised {norm:.3f} "
          f"at {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    (bench.out / "confirm.json").write_text(json.dumps(results, indent=1))
reference = by_label["ties k=6"]
for label in order[:1] + order[2:]:
    difference = paired_difference({t.name: bench.rows(by_label[label].key(), t) for t in confirm},
                                   {t.name: bench.rows(reference.key(), t) for t in confirm}, [t.name for t in confirm])
    print(describe(label, reference.label, difference, f"confirm tasks, seed {seed}"))
