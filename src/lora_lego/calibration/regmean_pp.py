"""RegMean++ for LoRA (Nguyen et al., arXiv 2508.03121): task t's Gram at a layer is taken on the inputs that
t's prompts produce in the model whose layers *below* that layer are already merged, not in the base model.

Exact form (`rounds=0`). The model's repeated blocks (decoder layers) are merged one at a time, in order:
  1. each task's prompts run through block l from the hidden state that the merged blocks < l gave them, and
     the Grams of block l's modules are accumulated (`passes.accumulate`, one chunk of Grams at a time);
     inside block l the modules are the base model's (`within="base"`, like `regmean`'s default) or carry
     task t's own deltas (`within="adapter"`, the paper's setting for fine-tuned models);
  2. block l's modules are merged by `regmean` on those Grams;
  3. each task's hidden state is carried through block l with its merged deltas, to block l + 1.
The hidden state at a block's input is kept per prompt batch, in the model's dtype (what the model itself
carries), and the blocks below run as pass-throughs, so the whole merge costs about two forward passes per
task, not one per block. This needs blocks that hand on only the hidden state, as decoder layers do.

Fixed point (`rounds=N`): `regmean` on the base model's Grams, then N times: Grams on the merged model (every
module merged, so the layers above a module shape its inputs too), `regmean` again.

With one block, the exact form is `regmean` (within="base"); with identical adapters, it returns that adapter.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from ..errors import CalibrationError, LoraLegoWarning, MethodError
from ..merge import check_weights, merge
from ..methods.registry import describe
from ..progress import progress as progress_of
from ..provenance import merged_metadata
from ..types import Adapter, LoraFactors
from .calibrate import GRAM_MEMORY, calibrate, load_model, model_fingerprint, target_modules, token_batches
from .grams import Calibration
from .passes import AppliedAdapter, StopPass, accumulate, chunks_for, run_forward, trace
from .score import prompt_sets

PAPER = "https://arxiv.org/abs/2508.03121"
WITHIN = ("base", "adapter")
MAX_ROUNDS = 10


def options(*, rank: int | None = None, shrink: float = 0.9, rounds: int = 0,
            within: Literal["base", "adapter"] = "base", ridge: float = 0.0) -> None:
    """RegMean++: regmean with each task's Grams on the model merged so far (rounds 0: layer by layer; N: N re-merges).

    Parameters:
        rank: output rank k, the best in the calibration norm; none: the sum of the input ranks (exact)
        shrink: scale of the Grams' off-diagonal entries, in [0, 1]
        rounds: 0: layer by layer, each layer on the Grams of the model merged below it; N in 1..10: merge,
            re-calibrate on the whole merged model, merge again, N times
        within: the activations inside the layer being merged: the base model's, or each task's own adapter's
        ridge: relative ridge: lambda * mean(diag(G)) added to G's diagonal before the solve, >= 0 (as regmean's)
    """


SPEC = describe("regmean_pp", options, paper=PAPER)  # checks the CLI's -p values; the merge is merge_regmean_pp


def merge_regmean_pp(adapters: Sequence[Adapter], *, model: str | Path | torch.nn.Module, prompts: Sequence[Any],
                     tokenizer=None, weights: Sequence[float] | None = None, rank: int | None = None,
                     shrink: float = 0.9, rounds: int = 0, within: str = "base", ridge: float = 0.0, seed: int = 0,
                     max_prompts: int | None = None, max_length: int = 512, batch_size: int = 8,
                     prompts_format: str | None = None, gram_memory: int = GRAM_MEMORY, progress: bool = False,
                     threads: int | None = None, device: str | torch.device | None = None) -> Adapter:
    """RegMean++ of `adapters` on their own prompts (one prompts file or list of strings per adapter, in order).

    `model`: the base model (a transformers folder, or a loaded model with its `tokenizer`). `rank`, `shrink`,
    `ridge`: as `regmean`'s (default rank: the sum of the input ranks). `rounds` 0: the exact layer-by-layer form; N in
    1..10: the fixed point, N re-calibrations on the merged model. `within` "base" or "adapter": the
    activations inside the layer being merged (exact form only). The provenance records the method as
    "regmean_pp" with these parameters.
    """
    adapters = list(adapters)
    weights = check_weights(weights, len(adapters), [a.name for a in adapters])
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 <= rounds <= MAX_ROUNDS:
        raise MethodError(f"regmean_pp: rounds must be an integer in 0..{MAX_ROUNDS} (0: layer by layer); "
                          f"got {rounds!r}")
    if within not in WITHIN:
        raise MethodError(f"regmean_pp: within must be one of {', '.join(WITHIN)}; got {within!r}")
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model(model, device=device)
    elif tokenizer is None:
        raise CalibrationError("merge_regmean_pp with a loaded model needs its tokenizer=")
    texts = prompt_sets(prompts, max_prompts=max_prompts, format=prompts_format)
    if len(texts) != len(adapters):
        raise CalibrationError(f"got {len(texts)} prompt sets for {len(adapters)} adapters; give one per adapter")
    params = {"shrink": shrink, **({"rank": rank} if rank is not None else {}), **({"ridge": ridge} if ridge else {})}
    common = dict(weights=weights, seed=seed, threads=threads)
    options = dict(max_length=max_length, batch_size=batch_size)
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if rounds:
                merged, calibrations = _fixed_point(model, tokenizer, adapters, texts, rounds, params, common,
                                                    options, gram_memory, progress)
            else:
                merged, calibrations = _layerwise(model, tokenizer, adapters, texts, within, params, common,
                                                  options, gram_memory, progress)
    finally:
        model.train(training)
    recorded = {**params, "rounds": rounds, **({} if rounds else {"within": within})}
    metadata = merged_metadata(adapters, "regmean_pp", recorded, weights, seed, merged.metadata["report"])
    metadata["provenance"]["calibration"] = [c.summary() for c in calibrations]
    return Adapter(dict(merged.items()), metadata, "merged")


def _fixed_point(model, tokenizer, adapters, texts, rounds, params, common, options, gram_memory, progress):
    """regmean on the base Grams, then `rounds` times on the Grams of the merged model."""
    union = list(dict.fromkeys(m for a in adapters for m in a))
    merged = None
    for _ in range(rounds + 1):
        calibrations = [calibrate(model, t, tokenizer=tokenizer, modules=union, adapter=merged, gram_memory=gram_memory,
                                  progress=progress, **options) for t in texts]
        merged = merge(adapters, "regmean", calibration=calibrations, **common, **params)
    return merged, calibrations


def _layerwise(model, tokenizer, adapters, texts, within, params, common, options, gram_memory, progress):
    """The exact form: block by block, each task's hidden state carried through the merged blocks."""
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    union = list(dict.fromkeys(m for a in adapters for m in a))
    targets = target_modules(model, name, union)
    blocks, owner = find_blocks(model, union)
    tasks = [_Task(token_batches(tokenizer, t, options["max_length"], options["batch_size"], f"prompts of {a.name}"))
             for a, t in zip(adapters, texts)]
    groups, repeated = trace(model, targets, tasks[0].batches[0])
    if repeated:
        raise MethodError("regmean_pp: a module runs more than once per forward pass (shared weights); use rounds=N")
    returns_tuple = _returns_tuple(model, blocks[0], tasks[0].batches[0])
    fingerprint = model_fingerprint(model)
    merged: dict[str, LoraFactors] = {}
    report: dict[str, dict] = {}
    last = max(owner[m] for m in union)
    bar = progress_of(last + 1, "regmean_pp", "layer", enabled=progress)
    with bar, _Resumed(blocks, returns_tuple) as resumed:
        for index in range(last + 1):
            inside = [g for g in groups if owner[g[0]] == index]
            layer = [m for group in inside for m in group]
            for chunk in chunks_for(inside, targets, max(gram_memory // len(tasks), 1)) if inside else []:
                modules = [m for group in chunk for m in group]
                calibrations = [task.grams(model, targets, chunk, resumed, index,
                                           _subset(adapter, layer) if within == "adapter" else None)
                                for task, adapter in zip(tasks, adapters)]
                part = _merge_part(adapters, calibrations, modules, fingerprint, common, params)
                merged.update(part.items())
                report.update(part.metadata["report"])
            if index < last:
                block_deltas = Adapter({m: f for m, f in merged.items() if owner[m] == index}, {}, "merged")
                for task in tasks:
                    task.carry(model, resumed, index, block_deltas)
            bar.update(1)
    order = {m: i for i, m in enumerate(union)}
    merged = dict(sorted(merged.items(), key=lambda item: order[item[0]]))
    metadata = {"report": {m: report[m] for m in merged}}
    summaries = [Calibration({}, {}, task.tokens, {"model": name, "model_fingerprint": fingerprint,
                                                    "n_prompts": len(t), "activations": "merged layers below"})
                 for task, t in zip(tasks, texts)]
    return Adapter(merged, metadata, "merged"), summaries


def _merge_part(adapters, calibrations, modules, fingerprint, common, params) -> Adapter:
    """`regmean` on `modules` of the adapters that have any of them, with their Grams of this chunk."""
    keep = [i for i, a in enumerate(adapters) if any(m in a for m in modules)]
    for c in calibrations:
        c.metadata["model_fingerprint"] = fingerprint
    with warnings.catch_warnings():  # the union of modules was the caller's choice; one chunk says nothing of it
        warnings.filterwarnings("ignore", message=".*no module in common", category=LoraLegoWarning)
        return merge([_subset(adapters[i], modules) for i in keep], "regmean",
                     calibration=[calibrations[i] for i in keep],
                     **{**common, "weights": [common["weights"][i] for i in keep]}, **params)


def _subset(adapter: Adapter, modules: Sequence[str]) -> Adapter:
    return Adapter({m: adapter[m] for m in modules if m in adapter}, adapter.metadata, adapter.name)


def find_blocks(model: torch.nn.Module, modules: Sequence[str]) -> tuple[list[torch.nn.Module], dict[str, int]]:
    """The model's repeated blocks (the outermost nn.ModuleList whose items hold every module in `modules`),
    and for each module the index of its block. Raises MethodError when no such list exists."""
    for path, candidate in model.named_modules():
        if not isinstance(candidate, torch.nn.ModuleList) or not len(candidate):
            continue
        prefix = f"{path}." if path else ""
        owner = {}
        for module in modules:
            head, _, rest = module[len(prefix):].partition(".") if module.startswith(prefix) else ("", "", "")
            if head.isdigit() and rest and int(head) < len(candidate):
                owner[module] = int(head)
        if len(owner) == len(modules):
            return list(candidate), owner
    raise MethodError("regmean_pp (layer by layer) needs every adapted module inside the model's repeated blocks "
                      f"(an nn.ModuleList of decoder layers); {len(modules)} module(s) such as {modules[0]!r} are not "
                      "all in one; use rounds=N")


def _returns_tuple(model: torch.nn.Module, block: torch.nn.Module, batch) -> bool:
    """Whether the blocks return a tuple (hidden state first) rather than the hidden state itself."""
    seen = []

    def hook(module, args, output):
        seen.append(isinstance(output, tuple))
        raise StopPass

    handle = block.register_forward_hook(hook)
    try:
        ids, mask = batch
        run_forward(model, ids[:1, :8], mask[:1, :8])
    finally:
        handle.remove()
    return seen[0]


class _Resumed:
    """While active, `start(index, states)` makes the blocks below `index` pass their input through unchanged
    and feeds block `index` the kept hidden state of each batch in turn, instead of the one computed."""

    def __init__(self, blocks: list[torch.nn.Module], returns_tuple: bool):
        self.blocks, self.returns_tuple = blocks, returns_tuple
        self.saved: list[tuple[torch.nn.Module, Any]] = []
        self.handle = None

    def __enter__(self):
        return self

    def start(self, index: int, states: list[torch.Tensor] | None) -> None:
        self.stop()
        if states is None:  # the first block: the embeddings are its input
            return
        for block in self.blocks[:index]:
            self.saved.append((block, block.__dict__.get("forward")))
            block.forward = self._passthrough
        feed = iter(states)

        def replace(module, args, kwargs):
            state = next(feed)
            if args:
                return (state, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": state}

        self.handle = self.blocks[index].register_forward_pre_hook(replace, with_kwargs=True)

    def _passthrough(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states

    def stop(self) -> None:
        for block, forward in self.saved:
            if forward is None:
                del block.forward
            else:
                block.forward = forward
        self.saved.clear()
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __exit__(self, *exc) -> None:
        self.stop()


class _Task:
    """One adapter's prompt batches and, per batch, its hidden state at the input of the block being merged."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches
        self.states: list[torch.Tensor] | None = None
        self.tokens = sum(int(mask.sum()) for _, mask in batches)

    def grams(self, model, targets, chunk, resumed: _Resumed, index: int, own: Adapter | None) -> Calibration:
        """The chunk's Grams on this task's inputs at block `index` (with its `own` deltas applied if given)."""
        resumed.start(index, self.states)
        with AppliedAdapter(model, own if own is not None and len(own) else None, "model"):
            grams = dict(accumulate(model, targets, chunk, self.batches,
                                    progress_of(None, "", "", enabled=False), early_exit=True))
        keys = {module: group[0] for group in chunk for module in group}
        return Calibration(grams, keys, self.tokens, {})

    def carry(self, model, resumed: _Resumed, index: int, deltas: Adapter) -> None:
        """Run block `index` with its merged `deltas` and keep its output: the next block's input."""
        resumed.start(index, self.states)
        outputs: list[torch.Tensor] = []

        def keep(module, args, output):
            outputs.append(output[0] if isinstance(output, tuple) else output)
            raise StopPass

        handle = resumed.blocks[index].register_forward_hook(keep)
        try:
            with AppliedAdapter(model, deltas if len(deltas) else None, "model"):
                for ids, mask in self.batches:
                    run_forward(model, ids, mask)
        finally:
            handle.remove()
        self.states = outputs
