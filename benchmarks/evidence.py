"""Run the evidence experiment (`lora-lego bench evidence`, table (j)) on the example adapters' training
setting: r=4 LoRAs on q_proj/v_proj of SmolLM2-135M-Instruct (the three of examples/ plus the tasks named
here, trained once into the cache with the same configuration), 200 test rows per task.

    python benchmarks/evidence.py --cache /work/cache --out /work/cache/runs/evidence \
        --tasks rt_polarity tweet_sentiment snips_intent hyperbaton fever
"""

import argparse
import shutil
import time
from pathlib import Path

from lora_lego.bench import _header
from lora_lego.bench.assets import base_model_dir, cache_dir
from lora_lego.bench.evidence import evidence_table
from lora_lego.bench.experiments import Bench
from lora_lego.bench.lm import TrainConfig
from lora_lego.bench.pool import adapter_dir
from lora_lego.bench.report import write
from lora_lego.bench.tasks import get_task

CONFIG = TrainConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))  # examples/make_examples.py's
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tasks", nargs="+", default=["rt_polarity", "tweet_sentiment", "snips_intent", "hyperbaton",
                                                       "fever"])
    parser.add_argument("--n-test", type=int, default=200)
    args = parser.parse_args()
    root = cache_dir(args.cache)
    tasks = [get_task(name) for name in args.tasks]
    for task in tasks:  # the shipped example adapters are these very LoRAs: no need to train them again
        folder = adapter_dir(root, task, CONFIG)
        if (EXAMPLES / task.name / "adapter_config.json").exists() and not folder.exists():
            shutil.copytree(EXAMPLES / task.name, folder)
    out = Path(args.out)
    bench = Bench(root, base_model_dir(root), tasks, out, config=CONFIG, n_test=args.n_test)
    started = time.perf_counter()
    table = evidence_table(bench)
    table.notes.append(f"`python benchmarks/evidence.py --out {args.out} --tasks {' '.join(args.tasks)} --n-test "
                       f"{args.n_test}`: {(time.perf_counter() - started) / 60:.1f} min (cached trainings reused)")
    write(table, out, "evidence")
    (out / "results.md").write_text(_header(bench) + "\n" + (out / "evidence.md").read_text())
    print(out / "results.md")


if __name__ == "__main__":
    main()
