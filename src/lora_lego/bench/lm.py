"""The language-model side of the benchmark: verbalizer scoring, LoRA training with PEFT, evaluation.

Scoring: the prompt ends in "Answer:"; a label's score is the logit of the first token of " <word>" at
the last position (rank classification; verbalizers are chosen so that first tokens differ). Training
minimises the LM loss of that answer token. Evaluation adds the adapter's deltas into the base weights
(exactly what PEFT's merge does) and restores the original weights afterwards.

Precision: forward passes run under bf16 autocast where the hardware computes bf16 natively (a CUDA GPU
that supports it, a CPU with AVX-512 or AMX), else in float32. A CPU without them emulates bf16 matrix
products: on a 2-core AVX2 EPYC one training step took 109 s in bf16 against 3.6 s in float32.
The precision is part of the training configuration, so results of different precisions never mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import LoraLegoError
from ..types import Adapter
from .tasks import Rows, Task

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_NAME = "smollm2-135m-instruct"
PRECISIONS = ("bf16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matrix products natively (not emulated, many times slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)  # AVX-512 / AMX / Arm bf16
    return bool(check()) if check is not None else False


def resolve_precision(precision: str, device: torch.device) -> str:
    """"bf16" or "fp32" as given, or for "auto" bf16 where `device` computes it natively, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise LoraLegoError(f"precision must be auto, {' or '.join(PRECISIONS)}; got {precision!r}")
    return precision


@dataclass(frozen=True)
class TrainConfig:
    """How a task LoRA is trained (the paper's setting by default: r=6, alpha=12, all linear layers)."""

    rank: int = 6
    alpha: int = 12
    targets: tuple[str, ...] = ALL_LINEAR
    steps: int = 150
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 10
    seed: int = 0
    max_length: int = 128
    precision: str = "bf16"  # autocast dtype of training and evaluation: "bf16" or "fp32"

    def key(self) -> str:
        fields = asdict(self)
        if fields["precision"] == "bf16":  # the keys from before the field existed: caches stay valid
            del fields["precision"]
        return hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=4).hexdigest()


def load_base(model_dir: Path, device: torch.device = torch.device("cpu")):
    """(model, tokenizer): the model in eval mode, float32, on `device`; left padding so the last position is
    every prompt's end, and left truncation so that a prompt longer than max_length keeps its end ("Answer:";
    vitaminc's longest 10%)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    return model.eval(), tokenizer


def label_token_ids(tokenizer, task: Task) -> torch.Tensor:
    """First token id of " <word>" for each label of the task, in the task's label order."""
    ids = [tokenizer(" " + word, add_special_tokens=False).input_ids[0] for word in task.verbalizers.values()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"task {task.name}: verbalizers {list(task.verbalizers.values())} share a first token")
    return torch.tensor(ids)


def last_logits(model, tokenizer, prompts: list[str], max_length: int, precision: str = "bf16") -> torch.Tensor:
    """Next-token logits after each prompt, on the model's device: (batch, vocab), float32."""
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    device = model.get_input_embeddings().weight.device
    ids, mask = encoded.input_ids.to(device), encoded.attention_mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
    return out.logits[:, -1].float()


def correct_rows(model, tokenizer, task: Task, rows: Rows, *, batch: int = 32, max_length: int = 128,
                 precision: str = "bf16", desc: str = "") -> list[bool]:
    """For each row (in order), whether its highest-scoring label is the true one."""
    ids = label_token_ids(tokenizer, task)
    labels = list(task.verbalizers)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths per batch: less padding
    correct = [False] * len(rows)
    with torch.no_grad():
        for start in tqdm(range(0, len(order), batch), desc=desc or f"eval {task.name}", leave=False, unit="batch"):
            chunk = order[start:start + batch]
            prompts = [task.prompt(rows[i][0]) for i in chunk]
            logits = last_logits(model, tokenizer, prompts, max_length, precision)
            scores = logits[:, ids.to(logits.device)].cpu()
            for i, predicted in zip(chunk, scores.argmax(-1)):
                correct[i] = labels[int(predicted)] == rows[i][1]
    return correct


@contextlib.contextmanager
def applied(model, adapter: Adapter | None):
    """Add the adapter's deltas (B @ A, scale folded) into the model's weights; restore them on exit."""
    saved = {}
    try:
        if adapter is not None:
            modules = dict(model.named_modules())
            with torch.no_grad():
                for name, factors in adapter.items():
                    weight = modules[name].weight
                    saved[name] = weight.detach().clone()
                    weight += (factors.B.to(weight.device) @ factors.A.to(weight.device)).to(weight.dtype)
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                dict(model.named_modules())[name].weight.copy_(original)


def train_lora(model_dir: Path, task: Task, rows: Rows, config: TrainConfig, out: Path,
               device: torch.device = torch.device("cpu")) -> dict:
    """Train one PEFT LoRA on `rows` on `device` and save it to `out` (atomically); returns the training log."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_base(model_dir, device)
    with torch.random.fork_rng(devices=[]):  # PEFT initialises A from the global generator: seed it, then restore
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                      target_modules=list(config.targets), task_type="CAUSAL_LM"))
    peft_model.peft_config["default"].base_model_name_or_path = BASE_NAME
    peft_model.train()
    ids = label_token_ids(tokenizer, task).to(device)
    label_index = {label: i for i, label in enumerate(task.verbalizers)}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, config.steps) / config.steps)))
    rng = random.Random(config.seed)
    order: list[int] = []
    losses, started = [], time.perf_counter()
    for _ in tqdm(range(config.steps), desc=f"train {task.name}", unit="step"):
        if len(order) < config.batch:
            order += rng.sample(range(len(rows)), len(rows))
        chunk = [rows[order.pop()] for _ in range(config.batch)]
        logits = last_logits(peft_model, tokenizer, [task.prompt(t) for t, _ in chunk], config.max_length,
                             config.precision)
        targets = ids[[label_index[label] for _, label in chunk]]
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    log = {"task": task.name, "config": asdict(config), "device": str(device), "train_rows": len(rows),
           "seconds": time.perf_counter() - started,
           "loss_first_10": sum(losses[:10]) / 10, "loss_last_10": sum(losses[-10:]) / 10}
    partial = out.with_name(out.name + ".partial")
    peft_model.save_pretrained(partial, save_embedding_layers=False)  # no hub lookup of the base config
    (partial / "train_log.json").write_text(json.dumps(log, indent=1))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    partial.rename(out)
    return log
