"""`lora-lego bench`: the offline benchmark on SmolLM2-135M and real tasks (the `bench` extra; see `bench/`)."""

from __future__ import annotations

import argparse

from ..errors import LoraLegoError


def add_parser(commands) -> None:
    cmd = commands.add_parser("bench", help="offline benchmark on SmolLM2-135M and real tasks (extra [bench])")
    cmd.add_argument("experiments", nargs="+", metavar="EXPERIMENT",
                     help="main, sweep, prune, hetero, seeds, heldout, autorank, calibrated, protocol, or all")
    cmd.add_argument("--quick", action="store_true", help="2 tasks, 30 training steps, 100 test rows")
    cmd.add_argument("--cache", help="cache folder (default $LORA_LEGO_CACHE or ~/.cache/lora-lego)")
    cmd.add_argument("--out", help="results folder (default <cache>/runs/full or /quick)")
    cmd.add_argument("--tasks", nargs="+", metavar="TASK", help="built-in task names or .jsonl files")
    cmd.add_argument("--steps", type=int, help="training steps per task LoRA")
    cmd.add_argument("--n-test", type=int, help="test rows per task")
    cmd.add_argument("--training-seeds", type=int, nargs="+", default=[0, 1], metavar="SEED",
                     help="protocol: training seeds of the task LoRAs (default 0 1)")
    cmd.add_argument("--model", help="a transformers causal-LM folder instead of SmolLM2 (e.g. for tests)")
    cmd.add_argument("--device", default="cpu", help="where the model trains and evaluates: cpu (default), cuda or "
                     "cuda:N")
    cmd.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                     help="bf16 autocast or fp32; auto (default): bf16 where the device computes it natively")
    cmd.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        from ..bench import EXPERIMENTS, run
    except ImportError as error:
        raise LoraLegoError(f"lora-lego bench needs the bench extra (pip install -e \".[bench]\"): {error}") from None
    unknown = [e for e in args.experiments if e != "all" and e not in EXPERIMENTS]
    if unknown:
        raise LoraLegoError(f"unknown experiment(s) {', '.join(unknown)}; choose from {', '.join(EXPERIMENTS)} or all")
    out = run(args.experiments, cache=args.cache, out=args.out, tasks=args.tasks, quick=args.quick,
              model_dir=args.model, steps=args.steps, n_test=args.n_test, training_seeds=args.training_seeds,
              device=args.device, precision=args.precision)
    print(f"bench: results in {out / 'results.md'}")
    return 0
