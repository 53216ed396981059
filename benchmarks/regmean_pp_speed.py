"""Cost of RegMean++ against regmean, side by side in one run (issue 29's calibration-cost target): SmolLM2-135M,
six rank-6 LoRAs on every linear layer (random factors: the cost does not depend on what they learned), 100
prompts each (the bench tasks' train prompts, cycled), on the CPU.

    python benchmarks/regmean_pp_speed.py --cache /work/cache [--adapters 6 --prompts 100 --rank 6]

Prints seconds and peak RSS for: regmean (calibrate every prompt set, then merge), regmean_pp layer by layer,
and regmean_pp rounds=1.
"""

import argparse
import resource
import time

import torch

import lora_lego as ll
from lora_lego.bench.assets import base_model_dir, cache_dir
from lora_lego.bench.pool import task_split
from lora_lego.bench.tasks import get_task
from lora_lego.calibration.calibrate import linear_modules, load_model
from lora_lego.calibration.regmean_pp import merge_regmean_pp

TASKS = ["rt_polarity", "hyperbaton", "snips_intent", "fever"]


def random_adapter(model, rank: int, seed: int) -> ll.Adapter:
    """A LoRA of `rank` on every linear layer of the decoder (not lm_head), factors ~ N(0, 1/d)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path in linear_modules(model):
        if "layers." not in path:
            continue
        layer = model.get_submodule(path)
        d_out, d_in = layer.weight.shape
        modules[path] = ll.LoraFactors(torch.randn(rank, d_in, generator=g) / d_in ** 0.5,
                                       torch.randn(d_out, rank, generator=g) / d_out ** 0.5 * 0.1, "linear")
    return ll.Adapter(modules, {}, f"random{seed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache")
    parser.add_argument("--adapters", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--rank", type=int, default=6)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--only", choices=["regmean", "layers", "rounds"], help="run one (its own peak memory)")
    args = parser.parse_args()
    root = cache_dir(args.cache)
    model, tokenizer = load_model(base_model_dir(root))
    texts = [[t.prompt(x) for x, _ in task_split(root, t, 200)[0][:args.prompts]] for t in map(get_task, TASKS)]
    prompts = [texts[i % len(texts)] for i in range(args.adapters)]
    adapters = [random_adapter(model, args.rank, seed) for seed in range(args.adapters)]
    union = list(adapters[0])
    print(f"{args.adapters} adapters x {len(union)} modules, rank {args.rank}, {args.prompts} prompts each, "
          f"{torch.get_num_threads()} threads")

    def regmean():
        calibrations = [ll.calibrate(model, p, tokenizer=tokenizer, modules=union, max_length=args.max_length)
                        for p in prompts]
        return ll.merge(adapters, "regmean", calibration=calibrations, rank=args.rank)

    runs = {"regmean (calibrate + merge)": regmean,
            "regmean_pp layer by layer": lambda: merge_regmean_pp(adapters, model=model, tokenizer=tokenizer,
                                                                  prompts=prompts, rank=args.rank,
                                                                  max_length=args.max_length),
            "regmean_pp rounds=1": lambda: merge_regmean_pp(adapters, model=model, tokenizer=tokenizer,
                                                            prompts=prompts, rank=args.rank, rounds=1,
                                                            max_length=args.max_length)}
    if args.only:
        runs = {label: run for label, run in runs.items() if {"regmean": "regmean (", "layers": "layer",
                                                              "rounds": "rounds"}[args.only] in label}
    first = None
    for label, run in runs.items():
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
        first = first or seconds
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"{label}: {seconds:.1f} s ({seconds / first:.2f}x regmean), peak RSS so far {peak:.2f} GiB")


if __name__ == "__main__":
    main()
