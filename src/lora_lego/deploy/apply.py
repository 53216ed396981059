"""Fold a LoRA adapter into a transformers base checkpoint (safetensors, one file or shards): every check
is made from the headers first, then each shard is rewritten under its own name, one tensor at a time,
in an atomic output folder beside the copied config, tokenizer and other non-weight files."""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._version import version
from ..errors import AdapterFormatError, BaseModelError, IncompatibleAdaptersError, LoraLegoWarning, OutputError, some
from ..formats import base_family, naming
from ..formats.files import tie_word_embeddings
from ..outputs import atomic_folder, cast_finite, check_output_path, dtype_from_name, source_folders
from ..progress import progress as progress_of
from ..tensorfile import TensorFileError, TensorInfo, TensorWriter, read_tensor
from ..types import Adapter, ModuleInfo, kernel_size
from .checkpoint import Checkpoint, check_space, copy_other_files, read_checkpoint, write_config, write_index

log = logging.getLogger(__name__)

INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")  # tied to the head
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")


@dataclass
class Plan:
    """What to write: base key -> (module, layout) to fold, output key -> the base key it is read from
    (itself, except an untied head read from the input embedding), and keys added to a shard."""

    targets: dict[str, tuple[str, str]]
    sources: dict[str, str] = field(default_factory=dict)
    added: dict[str, str] = field(default_factory=dict)  # new key -> shard it goes to
    untied: tuple[str, str] | None = None  # (input embedding key, head key) when untie applied


def apply_adapter(adapter: Adapter | str | Path, base: str | Path, output: str | Path, *, scale: float = 1.0,
                  dtype: str | torch.dtype | None = None, untie: bool = False, overwrite: bool = False,
                  progress: bool = False) -> Path:
    """Write `base` with `scale` * delta of every adapter module added to its weight, to the folder `output`.

    A linear weight (d_out, d_in) gets B @ A; stored (d_in, d_out) (fan_in_fan_out, Conv1D) it gets the
    transpose; an embedding (num_embeddings, dim) gets (B @ A).T; a conv weight (c_out, c_in, kh, kw) gets
    B @ A reshaped. Sums are made in float32 and written in `dtype` (None: each tensor's own). Tied input
    and output embeddings that the adapter touches are refused unless `untie` (then the head is written
    as its own tensor and tie_word_embeddings set false). Raises AdapterFormatError, BaseModelError,
    IncompatibleAdaptersError or OutputError, all before anything is written (but a factor read lazily
    that holds NaN, or a failing disk, which leave nothing behind either).
    """
    if not isinstance(adapter, Adapter):
        from ..formats import load_adapter

        adapter = load_adapter(adapter, lazy=True, base_config=base)  # a GGUF file's head counts: the base's
    check_dotted(adapter)
    target = None if dtype is None else dtype_from_name(dtype)
    if not math.isfinite(scale):
        raise OutputError(f"scale must be a finite number, got {scale!r}")
    checkpoint = read_checkpoint(base)
    check_output(output, checkpoint.folder, adapter, overwrite=overwrite)
    plan = plan_apply(adapter, checkpoint, untie=untie)
    entries = output_entries(checkpoint, plan, target)
    check_space(output, sum(math.prod(s) * d.itemsize for e in entries.values() for d, s in e.values()))
    skipped: list[str] = []
    with atomic_folder(output, overwrite=overwrite) as folder:
        skipped = copy_other_files(checkpoint, folder)
        write_config(checkpoint, plan.untied is not None, folder, target)
        bar = progress_of(sum(map(len, entries.values())), "apply", "tensor", enabled=progress)
        with bar:
            for shard, shard_entries in entries.items():
                write_shard(checkpoint, shard, shard_entries, plan, adapter, scale, folder,
                            _provenance(adapter, scale), bar)
        write_index(checkpoint, plan.added, entries, folder)
    if skipped:
        warnings.warn(f"base {str(base)!r}: did not copy {len(skipped)} weight file(s) that are not its safetensors "
                      f"checkpoint (they would not carry the adapter): {some(skipped)}", LoraLegoWarning, stacklevel=2)
    if plan.untied:
        warnings.warn(f"base {str(base)!r} ties {plan.untied[1]} to {plan.untied[0]}; wrote a separate "
                      f"{plan.untied[1]} and set tie_word_embeddings false in the output config.json (--untie)",
                      LoraLegoWarning, stacklevel=2)
    log.info("applied %d modules of %s to %s -> %s", len(adapter), adapter.name, base, output)
    return Path(output)


def check_dotted(adapter: Adapter) -> None:
    """Refuse adapters whose module names are not the base model's dotted paths (e.g. kohya files)."""
    names = naming(adapter)
    if names != "dotted":
        raise AdapterFormatError(f"adapter {adapter.name!r} has {names} module names (e.g. "
                                 f"{next(iter(adapter), '')!r}), not a transformers model's dotted paths; apply "
                                 "diffusion LoRAs in their UI "
                                 "(or convert it with `lora-lego convert`); expected a PEFT adapter")


def check_output(output: str | Path, base: Path, adapter: Adapter, *, overwrite: bool) -> None:
    """Refuse an output equal to, inside or containing the base folder or the adapter, or existing."""
    out, src = Path(output).resolve(), base.resolve()
    if out == src or src in out.parents:
        raise OutputError(f"output {str(output)!r} lies inside base model folder {str(base)!r}; expected a new folder")
    if out in src.parents:
        raise OutputError(f"output {str(output)!r} contains base model folder {str(base)!r}; expected a new folder")
    check_output_path(output, source_folders(adapter), overwrite=overwrite)


def plan_apply(adapter: Adapter, checkpoint: Checkpoint, *, untie: bool) -> Plan:
    """Map every module to its base key and layout, checking names, shapes and tied embeddings."""
    tied = tied_pair(checkpoint)
    keys = set(checkpoint.where) | ({tied[1]} if tied else set())
    rename = _key_rule(list(adapter), keys)
    keyed = {module: rename(module) + ".weight" for module in adapter}
    missing = [module for module, key in keyed.items() if key not in keys]
    if missing:
        family = base_family(adapter)
        hint = f" (a {family} diffusion LoRA; apply it in its UI)" if family else ""
        raise IncompatibleAdaptersError(
            f"adapter {adapter.name!r}: {len(missing)} of {len(adapter)} module(s) have no weight in base "
            f"{str(checkpoint.folder)!r}{hint}: {some([keyed[m] for m in missing])}; "
            "expected the base it was trained on")
    plan = Plan({})
    if tied and set(tied) & set(keyed.values()):
        touched = sorted(m for m, k in keyed.items() if k in tied)
        if not untie:
            raise IncompatibleAdaptersError(
                f"adapter {adapter.name!r} changes {some(touched)}, but base {str(checkpoint.folder)!r} ties "
                f"{tied[1]} to {tied[0]} (tie_word_embeddings): folding into the one shared matrix would change both "
                "the input and the output embeddings; pass --untie (untie=True) to write a separate head")
        plan.untied, plan.sources[tied[1]] = tied, tied[0]
        if tied[1] not in checkpoint.where:
            plan.added[tied[1]] = checkpoint.where[tied[0]]
        elif checkpoint.info(tied[1]).shape != checkpoint.info(tied[0]).shape:
            raise BaseModelError(f"base {str(checkpoint.folder)!r}: tied {tied[1]} and {tied[0]} differ in shape")
    fan_in_fan_out = bool(adapter.metadata.get("fan_in_fan_out"))
    for module, key in keyed.items():
        source = plan.sources.get(key, key)
        info, options = checkpoint.info(source), layouts(adapter.info(module), fan_in_fan_out)
        layout = next((layout for shape, layout in options if shape == info.shape), None)
        if layout is None or not info.is_floating_point():
            raise IncompatibleAdaptersError(
                f"adapter {adapter.name!r}, module {module!r}: delta of shape {adapter.info(module).shape} does not "
                f"fit {source!r} ({str(info.dtype).removeprefix('torch.')}, shape {info.shape}) in "
                f"{checkpoint.where[source]} of base {str(checkpoint.folder)!r}; expected a float weight of "
                f"shape {options[0][0]}")
        plan.targets[key] = (module, layout)
    return plan


def tied_pair(checkpoint: Checkpoint) -> tuple[str, str] | None:
    """(input embedding key, head key) when the config ties them or the checkpoint has no head; else None."""
    flag = tie_word_embeddings(checkpoint.config)
    keys = list(checkpoint.where)
    inputs = [k for k in keys if k.endswith(".weight") and k.split(".")[-2] in INPUT_EMBEDDINGS]
    heads = [k for k in keys if k.removesuffix(".weight") in OUTPUT_EMBEDDINGS and k.endswith(".weight")]
    if len(inputs) != 1 or (heads and flag is not True):
        return None  # no single input embedding, or a head of its own
    if flag is False and not heads:
        return None  # e.g. an encoder without a head: nothing to tie
    return inputs[0], heads[0] if heads else "lm_head.weight"


def layouts(info: ModuleInfo, fan_in_fan_out: bool) -> list[tuple[tuple[int, ...], str]]:
    """The (base weight shape, layout) a module's update may take, the expected one first.

    Layouts: "normal" (d_out, d_in), "transposed" (d_in, d_out) for embeddings and fan_in_fan_out, "conv"
    (c_out, c_in, kh, kw). A linear module may take either (d_out, d_in) or (d_in, d_out): the base's
    shape decides when only one fits, as PEFT decides by layer type (it overrides fan_in_fan_out per
    layer: Conv1D weights are stored (d_in, d_out), nn.Linear ones (d_out, d_in)).
    """
    d_out, d_in = info.shape
    kernel = kernel_size(info.kind)
    if kernel is not None:
        return [((d_out, d_in // (kernel[0] * kernel[1]), *kernel), "conv")]
    if info.kind == "embedding":
        return [((d_in, d_out), "transposed")]
    return [((d_out, d_in), "normal"), ((d_in, d_out), "transposed")][::-1 if fan_in_fan_out else 1]


def _key_rule(modules: list[str], keys: set[str]):
    """The renaming module -> base key stem that matches the most modules: none, or adding / removing one
    leading component (a PEFT adapter made on LlamaModel names "layers.0...", the checkpoint "model.layers.0...")."""
    heads = sorted({k.split(".")[0] + "." for k in keys if "." in k})
    own = sorted({m.split(".")[0] + "." for m in modules if "." in m})
    rules = [lambda m: m] + [lambda m, p=p: p + m for p in heads] + [lambda m, p=p: m.removeprefix(p) for p in own]
    return max(rules, key=lambda rule: sum(rule(m) + ".weight" in keys for m in modules))  # first of the best


def output_entries(checkpoint: Checkpoint, plan: Plan, target: torch.dtype | None) -> dict[str, dict[str, tuple]]:
    """Shard name -> output key -> (dtype, shape), in the base's order (an untied head after the others)."""
    def cast(info: TensorInfo) -> torch.dtype:
        return target if target is not None and info.is_floating_point() else info.dtype

    entries = {name: {key: (cast(info), info.shape) for key, info in infos.items()}
               for name, infos in checkpoint.shards.items()}
    for key, shard in plan.added.items():
        info = checkpoint.info(plan.sources[key])
        entries[shard][key] = (cast(info), info.shape)
    return entries


def write_shard(checkpoint: Checkpoint, shard: str, entries: dict, plan: Plan, adapter: Adapter, scale: float,
                folder: Path, provenance: dict[str, str], bar) -> None:
    """Rewrite one shard: each tensor read, folded when it is a target, cast, and written before the next."""
    metadata = {"format": "pt", **checkpoint.metadata[shard], **provenance}
    with TensorWriter(folder / shard, entries, metadata) as writer:
        for key, (dtype, _) in entries.items():
            source = plan.sources.get(key, key)
            tensor = _read_base(checkpoint, source)
            what = f"tensor {key!r} of {shard}"
            if key in plan.targets:
                module, layout = plan.targets[key]
                tensor = fold(tensor, adapter[module], layout, scale)
                what += f" (module {module!r} folded in at scale {scale:g})"
            writer.write(key, cast_finite(tensor, dtype, what, inherited_ok=key not in plan.targets))
            del tensor
            bar.update()


def _read_base(checkpoint: Checkpoint, key: str) -> torch.Tensor:
    shard = checkpoint.where[key]
    try:
        return read_tensor(checkpoint.folder / shard, checkpoint.shards[shard][key])
    except (OSError, TensorFileError) as error:
        raise BaseModelError(f"base {str(checkpoint.folder)!r}: cannot read {key!r} from {shard} ({error})") from None


def fold(weight: torch.Tensor, factors, layout: str, scale: float) -> torch.Tensor:
    """weight + scale * update in float32 (in place when `weight` is a float32 tensor the caller owns).

    `weight` of shape (d_out, d_in) ("normal"), (d_in, d_out) ("transposed") or (c_out, c_in, kh, kw) ("conv");
    factors A (r, d_in), B (d_out, r). One addmm: no dense delta beside the weight.
    """
    total = weight.to(torch.float32)
    A, B = factors.A.to("cpu", torch.float32), factors.B.to("cpu", torch.float32)
    if layout == "transposed":
        total.addmm_(A.T, B.T, alpha=scale)
    else:
        total.view(B.shape[0], -1).addmm_(B, A, alpha=scale)
    return total


def _provenance(adapter: Adapter, scale: float) -> dict[str, str]:
    return {"lora_lego": json.dumps({"apply": {"adapter": adapter.name, "modules": len(adapter), "scale": scale},
                                     "version": version()}, sort_keys=True)}
