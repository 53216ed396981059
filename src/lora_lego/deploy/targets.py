"""Serving targets as data: what a server loads (format, ranks, features), so that merge / prune / convert
refuse what it cannot load and name the rank flag to serve with, and `inspect --target` says whether an
adapter loads and why not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import TargetError

if TYPE_CHECKING:  # the table is read by the CLI's parser, which imports no torch
    from ..types import Adapter

__all__ = ["TARGETS", "Target", "TargetError", "check_loads", "config_refusals", "describe", "fit_rank", "get_target",
           "refusals", "serve_line"]


@dataclass(frozen=True)
class Target:
    """A server's limits.

    `ranks` are the values its rank flag (`rank_flag`) accepts; an adapter loads when its largest module
    rank is at most the flag's value. `formats` are the adapter formats it reads, `kinds` the module
    kinds. `features` maps a PEFT config key to the values the server accepts (anything else is refused,
    with `reasons[key]`); `saved_modules` are the modules_to_save entries it accepts (a classification head).
    """

    name: str
    summary: str
    ranks: tuple[int, ...]
    rank_flag: str
    formats: tuple[str, ...]
    kinds: tuple[str, ...]
    features: dict[str, tuple]
    reasons: dict[str, str]
    default_rank: int | None = None
    saved_modules: tuple[str, ...] = ()


# vLLM: vllm/config/lora.py (max_lora_rank values, default 16) and vllm/lora/peft_helper.py (refusals)
TARGETS = {
    "vllm": Target(
        "vllm", "vLLM multi-LoRA serving (PEFT folders; --max-lora-rank in a fixed set, default 16)",
        ranks=(1, 8, 16, 32, 64, 128, 256, 320, 512), rank_flag="--max-lora-rank", formats=("peft",),
        kinds=("linear", "embedding"),
        features={"use_dora": (False, None), "bias": ("none", None), "lora_bias": (False, None),
                  "modules_to_save": (None, ()), "alora_invocation_tokens": (None, ()),
                  "layer_replication": (None, ()), "use_qalora": (False, None), "use_bdlora": (None, False)},
        reasons={"use_dora": "vLLM does not support DoRA", "bias": "vLLM does not support adapter bias",
                 "lora_bias": "vLLM does not support LoRA bias", "modules_to_save": "vLLM does not load "
                 "modules_to_save (full copies of layers)", "alora_invocation_tokens": "vLLM does not support aLoRA",
                 "layer_replication": "vLLM does not support layer_replication", "use_qalora": "vLLM does not "
                 "support QALoRA", "use_bdlora": "vLLM does not support block-diagonal LoRA"},
        default_rank=16, saved_modules=("classifier", "score")),  # PEFT's SEQ_CLS heads, which vLLM accepts
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown serving target {name!r}; choose from {', '.join(TARGETS)}") from None


def fit_rank(target: Target, requested: int) -> int:
    """The smallest rank the target allows at or above `requested`; TargetError above its largest."""
    for rank in target.ranks:
        if rank >= requested:
            return rank
    raise TargetError(f"rank {requested} is above what {target.name} serves ({target.rank_flag} in "
                      f"{', '.join(map(str, target.ranks))})")


def refusals(adapter: Adapter, target: Target, output_format: str | None = None) -> list[str]:
    """Why `target` would not load `adapter` (written as `output_format`, default its own): [] if it would."""
    reasons = []
    written = output_format or adapter.metadata.get("format") or "peft"
    if written not in target.formats:
        reasons.append(f"{target.name} loads {' / '.join(target.formats)} adapters, not {written}")
    odd = sorted({adapter.info(m).kind for m in adapter} - set(target.kinds))
    if odd:
        reasons.append(f"{target.name} loads {' and '.join(target.kinds)} LoRAs, not {', '.join(odd)}")
    if adapter.max_rank > target.ranks[-1]:
        reasons.append(f"its largest module rank {adapter.max_rank} is above {target.name}'s largest "
                       f"{target.rank_flag} {target.ranks[-1]}")
    return reasons + config_refusals(adapter.metadata.get("peft_config") or {}, target)


def config_refusals(config: dict, target: Target) -> list[str]:
    """What in a PEFT adapter_config.json the target refuses (DoRA, bias, modules_to_save, ...)."""
    reasons = []
    for key, allowed in target.features.items():
        value = config.get(key)
        if key == "modules_to_save" and isinstance(value, (list, tuple)):
            value = [m for m in value if m not in target.saved_modules] or None
        if key in config and value not in allowed and value != {} and value != []:
            reasons.append(f"{target.reasons[key]} ({key}={config[key]!r})")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower() not in ("gaussian", "eva", "orthogonal", "mica", "lora_ga"):
        reasons.append(f"{target.name} does not support init_lora_weights={init!r} (it changes the base weights)")
    return reasons


def check_loads(adapter: Adapter, target: Target, output_format: str | None = None) -> int:
    """The value of the target's rank flag that serves `adapter`; TargetError listing every refusal."""
    reasons = refusals(adapter, target, output_format)
    if reasons:
        raise TargetError(f"{adapter.name!r} does not load in {target.name}: " + "; ".join(reasons))
    return fit_rank(target, max(adapter.max_rank, 1))


def serve_line(target: Target, flag: int, rank: int) -> str:
    """The line after a write: the rank flag value to serve with (`flag`, from `check_loads`), for an adapter
    of largest module rank `rank`, which the server pads up to it."""
    enough = target.default_rank and flag <= target.default_rank
    default = f"; the default {target.default_rank} is enough" if enough else ""
    padded = f" (largest module rank {rank}, padded to {flag} by the server)" if rank != flag else ""
    return f"{target.name}: serve with {target.rank_flag} {flag} or more{padded}{default}"


def describe(adapter: Adapter, target: Target) -> str:
    """One line for `inspect --target`: loads (with the flag value to use), or why not."""
    reasons = refusals(adapter, target)
    if reasons:
        return f"{target.name}: does not load: " + "; ".join(reasons)
    flag = fit_rank(target, max(adapter.max_rank, 1))
    enough = target.default_rank and flag <= target.default_rank
    default = f"; the default {target.default_rank} is enough" if enough else ""
    return (f"{target.name}: loads with {target.rank_flag} {flag} or more{default} "
            f"(largest module rank {adapter.max_rank})")
