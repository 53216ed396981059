"""The forward passes of `calibrate`: the trace pass (module order, shared inputs), the chunking of the
Grams to a memory budget, the accumulation by forward hooks (float32 products, float64 sums, stopping
each pass after its last module), and an adapter's deltas applied by hooks for adapted activations."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ..errors import CalibrationError
from ..types import Adapter

_BLOCK = 1024  # columns of a Gram per float32 product (bounds the temporary)


class StopPass(Exception):
    """Raised by the hook of a pass's last module: the rest of the forward pass is not needed."""


def in_features(module: torch.nn.Module) -> int | None:
    """d_in of a linear layer (nn.Linear or transformers' Conv1D, whose weight is (d_in, d_out)); else None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return module.weight.shape[0]
    return None


def run_forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> None:
    device = model.get_input_embeddings().weight.device
    try:
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    except StopPass:
        pass


def _input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def trace(model: torch.nn.Module, targets: dict[str, torch.nn.Module],
           batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[list[str]], bool]:
    """Groups of target modules that read the same input tensor, in the order they first run (one pass
    on a few tokens), and whether any module runs more than once per pass (then no early exit)."""
    calls: list[tuple[str, torch.Tensor]] = []  # holding the inputs keeps their ids unique during the pass

    def hook(name: str):
        return lambda module, args, kwargs: calls.append((name, _input(args, kwargs)))

    handles = [module.register_forward_pre_hook(hook(name), with_kwargs=True) for name, module in targets.items()]
    try:
        ids, mask = batch
        run_forward(model, ids[:1, :8], mask[:1, :8])
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in targets if name not in {n for n, _ in calls}]
    if missing:
        raise CalibrationError(f"module {missing[0]!r} ({len(missing)} in all) did not run in the model's forward pass")
    groups: dict[int, list[str]] = {}
    for name, tensor in calls:
        group = groups.setdefault(id(tensor), [])
        if name not in group:
            group.append(name)
    first = {}
    for name, _ in calls:
        first.setdefault(name, len(first))
    repeated = len(calls) > len(first)
    if repeated:  # a module called twice (shared weights): keep it alone, so a group is one input
        ordered = [[name] for name in first]
    else:
        ordered = sorted(groups.values(), key=lambda group: first[group[0]])
    return ordered, repeated


def chunks_for(groups: list[list[str]], targets: dict[str, torch.nn.Module], budget: int) -> list[list[list[str]]]:
    """Consecutive groups whose float64 Grams fit `budget` bytes together (a larger group is a chunk alone)."""
    chunks: list[list[list[str]]] = [[]]
    used = 0
    for group in groups:
        size = 8 * in_features(targets[group[0]]) ** 2
        if chunks[-1] and used + size > budget:
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += size
    return chunks


def accumulate(model: torch.nn.Module, targets: dict[str, torch.nn.Module], chunk: list[list[str]],
                batches: list[tuple[torch.Tensor, torch.Tensor]], bar, *,
                early_exit: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """One pass over the prompts, then (key, Gram) for each of the chunk's groups (float32, CPU; key: the
    group's first module), converted one at a time."""
    grams: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    last = chunk[-1][0]

    def hook(key: str):
        def add_batch(module, args, kwargs):
            x = _input(args, kwargs).detach()
            rows = x.reshape(-1, x.shape[-1])
            mask = state["mask"].to(rows.device).flatten().bool()
            if rows.shape[0] != mask.shape[0]:
                raise CalibrationError(f"module {key!r}: its input has {rows.shape[0]} rows for {mask.shape[0]} "
                                       "token positions (not one row per token; e.g. a mixture-of-experts layer)")
            rows = rows[mask].float()
            if key not in grams:
                grams[key] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
            for start in range(0, rows.shape[1], _BLOCK):  # float32 products, float64 sums, in column blocks
                grams[key][:, start:start + _BLOCK] += rows.T @ rows[:, start:start + _BLOCK]
            if early_exit and key == last:
                raise StopPass
        return add_batch

    handles = [targets[group[0]].register_forward_pre_hook(hook(group[0]), with_kwargs=True) for group in chunk]
    try:
        for ids, mask in batches:
            state["mask"] = mask
            run_forward(model, ids, mask)
            bar.update(ids.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    while grams:  # float32 copies one at a time, each float64 accumulator freed as it goes
        key = next(iter(grams))
        yield key, grams.pop(key).float().cpu()


class AppliedAdapter:
    """Context manager: the adapter's deltas added to its modules' outputs (forward hooks), removed on exit."""

    def __init__(self, model: torch.nn.Module, adapter: Adapter | None, model_name: str, *, scale: float = 1.0):
        self.model, self.adapter, self.model_name, self.handles = model, adapter, model_name, []
        self.scale = scale  # the deltas added are scale * B A

    def __enter__(self):
        if self.adapter is None:
            return self
        found = dict(self.model.named_modules())
        for path in self.adapter:
            module, factors = found.get(path), self.adapter[path]
            if module is None or in_features(module) is None:
                raise CalibrationError(f"model {self.model_name!r} has no linear module {path!r} for adapter "
                                       f"{self.adapter.name!r} (is this its base model?)")
            if factors.kind != "linear" or in_features(module) != factors.d_in:
                raise CalibrationError(f"adapter {self.adapter.name!r}, module {path!r}: a {factors.kind} delta of "
                                       f"shape {factors.shape} does not fit the model's {type(module).__name__} "
                                       f"with d_in {in_features(module)}")
            self.handles.append(module.register_forward_hook(_delta_hook(factors, self.scale)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


def _delta_hook(factors, scale: float = 1.0):
    cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module, args, output):
        x = args[0]
        key = (x.device, x.dtype)
        if key not in cache:
            B = factors.B if scale == 1.0 else factors.B * scale
            cache[key] = (factors.A.to(x.device, x.dtype), B.to(x.device, x.dtype))
        A, B = cache[key]
        return output + (x @ A.T) @ B.T
    return hook

