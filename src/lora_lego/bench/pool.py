"""The trained task LoRAs of the benchmark: trained once per (task, training configuration), cached on disk."""

from __future__ import annotations

from pathlib import Path

import torch

from .lm import TrainConfig, train_lora
from .tasks import Task, split, task_rows

N_TEST = 300
N_TRAIN = 4000


def adapter_dir(cache: Path, task: Task, config: TrainConfig) -> Path:
    return cache / "adapters" / f"{task.name}-r{config.rank}-{config.key()}"


def task_split(cache: Path, task: Task, n_test: int = N_TEST) -> tuple:
    """(train rows, test rows) of a task: fixed seed 0, the same for every experiment."""
    return split(task_rows(task, cache), n_test, N_TRAIN)


def ensure_adapter(cache: Path, model_dir: Path, task: Task, config: TrainConfig, n_test: int = N_TEST,
                   device: torch.device = torch.device("cpu")) -> Path:
    """The folder of the task's LoRA under `config`, trained now (on `device`) if it is not cached yet."""
    out = adapter_dir(cache, task, config)
    if not (out / "adapter_config.json").exists():
        train, _ = task_split(cache, task, n_test)
        train_lora(model_dir, task, train, config, out, device)
    return out
