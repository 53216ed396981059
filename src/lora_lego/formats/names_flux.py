"""Flux.1 module names: diffusers' FluxTransformer2DModel paths ("transformer.transformer_blocks.0.attn.to_q")
<-> kohya / BFL names ("lora_unet_double_blocks_0_img_attn_qkv"), where BFL fuses q, k, v (and, in single
blocks, the MLP input projection) into one Linear. Fusing and splitting are exact.

The map is sd-scripts' networks/convert_flux_lora.py (blocks) and diffusers'
_convert_kohya_flux_lora_to_diffusers (the embedders and final layer, whose adaLN output is (shift,
scale) in BFL and (scale, shift) in diffusers: B's two row halves swap).
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Sequence

import torch

from ..errors import AdapterFormatError
from ..types import Adapter, LoraFactors, ModuleInfo

KOHYA_PREFIX = "lora_unet_"  # sd-scripts' lora_flux: "make ComfyUI compatible"
DOTTED_PREFIX = "transformer."


class Recipe(NamedTuple):
    """How one translated module is made: `build` applied to the factors of `sources` (input module names)."""

    sources: tuple[str, ...]
    info: ModuleInfo
    build: Callable[[list[LoraFactors]], LoraFactors]


# (BFL name inside a block, diffusers paths inside the block: several = fused in BFL, in its row order)
_DOUBLE = (  # double_blocks_{i} <-> transformer_blocks.{i}
    ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn_proj", ("attn.to_out.0",)),
    ("img_mlp_0", ("ff.net.0.proj",)),
    ("img_mlp_2", ("ff.net.2",)),
    ("img_mod_lin", ("norm1.linear",)),
    ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn_proj", ("attn.to_add_out",)),
    ("txt_mlp_0", ("ff_context.net.0.proj",)),
    ("txt_mlp_2", ("ff_context.net.2",)),
    ("txt_mod_lin", ("norm1_context.linear",)),
)
_SINGLE = (  # single_blocks_{i} <-> single_transformer_blocks.{i}
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation_lin", ("norm.linear",)),
)
_GLOBAL = (
    ("img_in", ("x_embedder",)),
    ("txt_in", ("context_embedder",)),
    ("time_in_in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ("time_in_out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ("vector_in_in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ("vector_in_out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ("guidance_in_in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ("guidance_in_out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ("final_layer_linear", ("proj_out",)),
    ("final_layer_adaLN_modulation_1", ("norm_out.linear",)),
)
SWAPPED = frozenset({"final_layer_adaLN_modulation_1"})
_BLOCKS = (("double_blocks", "transformer_blocks", _DOUBLE), ("single_blocks", "single_transformer_blocks", _SINGLE))
_MLP_RATIO = 4  # FluxTransformer2DModel's single blocks: proj_mlp is (4 * dim, dim); used only when it is absent


def bfl_name(rest: str) -> tuple[str, int, int] | None:
    """(kohya body, part index, number of fused parts) for a path inside the transformer, None if unmapped.

    E.g. "transformer_blocks.0.attn.to_k" -> ("double_blocks_0_img_attn_qkv", 1, 3).
    """
    for bfl, dotted, table in _BLOCKS:
        match = re.fullmatch(rf"{dotted}\.(\d+)\.(.+)", rest)
        if match:
            for name, paths in table:
                if match[2] in paths:
                    return f"{bfl}_{match[1]}_{name}", paths.index(match[2]), len(paths)
            return None
    for name, paths in _GLOBAL:
        if rest == paths[0]:
            return name, 0, 1
    return None


def diffusers_paths(body: str) -> tuple[str, ...] | None:
    """The transformer paths of a BFL kohya body (several for a fused one), None if unmapped."""
    for bfl, dotted, table in _BLOCKS:
        match = re.fullmatch(rf"{bfl}_(\d+)_(.+)", body)
        if match:
            paths = dict(table).get(match[2])
            return tuple(f"{dotted}.{match[1]}.{path}" for path in paths) if paths else None
    return dict(_GLOBAL).get(body)


def is_bfl(body: str) -> bool:
    """Whether a kohya UNet body is a Flux (BFL) name."""
    return diffusers_paths(body) is not None


def to_kohya(adapter: Adapter, modules: Sequence[str], where: Callable[[str], str]) -> dict[str, Recipe]:
    """Recipes of the kohya modules made from the transformer `modules` (renamed or fused)."""
    groups: dict[str, dict[int, str]] = {}
    sizes: dict[str, int] = {}
    for module in modules:
        found = bfl_name(module[len(DOTTED_PREFIX):])
        if found is None:
            raise AdapterFormatError(f"{where(module)}: has no kohya (BFL) Flux name; Flux kohya files hold the "
                                     "double / single blocks, embedders and final layer")
        body, index, size = found
        groups.setdefault(body, {})[index] = module
        sizes[body] = size
    recipes = {}
    for body, parts in groups.items():
        if sizes[body] == 1:
            recipes[KOHYA_PREFIX + body] = _renamed(parts[0], adapter.info(parts[0]), body in SWAPPED, where)
        else:
            recipes[KOHYA_PREFIX + body] = _fused(adapter, body, parts, sizes[body], where)
    return recipes


def to_dotted(adapter: Adapter, modules: Sequence[str], where: Callable[[str], str]) -> dict[str, Recipe]:
    """Recipes of the transformer modules made from the BFL kohya `modules` (renamed or split)."""
    recipes: dict[str, Recipe] = {}
    for module in modules:
        body = module[len(KOHYA_PREFIX):]
        paths = diffusers_paths(body)
        if len(paths) == 1:
            recipes[DOTTED_PREFIX + paths[0]] = _renamed(module, adapter.info(module), body in SWAPPED, where)
            continue
        for index, recipe in _split(adapter, module, len(paths), where).items():
            recipes[DOTTED_PREFIX + paths[index]] = recipe
    return recipes


def _renamed(module: str, info: ModuleInfo, swap: bool, where: Callable[[str], str]) -> Recipe:
    if info.kind != "linear":
        raise AdapterFormatError(f"{where(module)}: is a {info.kind} LoRA; Flux transformer modules are linear")
    if not swap:
        return Recipe((module,), info, lambda factors: factors[0])
    if info.shape[0] % 2:
        raise AdapterFormatError(f"{where(module)}: has d_out {info.shape[0]}; expected an even (shift, scale) size")
    return Recipe((module,), info, lambda factors: swap_halves(factors[0]))


def swap_halves(factors: LoraFactors) -> LoraFactors:
    """The same LoRA with the two halves of B's rows swapped (BFL (shift, scale) <-> diffusers (scale, shift))."""
    first, second = factors.B.chunk(2, dim=0)
    return LoraFactors(factors.A, torch.cat([second, first]), factors.kind)


def _split_sizes(d_in: int, d_out: int, size: int) -> list[int] | None:
    """Row sizes of a fused module's parts: q, k, v of d_in each, then (single blocks) the MLP's rest."""
    if size == 3:
        return [d_in] * 3 if d_out == 3 * d_in else None
    return [d_in] * 3 + [d_out - 3 * d_in] if d_out > 3 * d_in else None


def _fused(adapter: Adapter, body: str, parts: dict[int, str], size: int, where: Callable[[str], str]) -> Recipe:
    """BFL fused module from its present parts: A stacked (sum r, d_in), B block-diagonal; absent parts
    get zero rows (of their known size), so the fused delta is exactly the parts' deltas stacked."""
    infos = {index: adapter.info(module) for index, module in parts.items()}
    first = parts[min(parts)]
    d_in = infos[min(parts)].shape[1]
    for index, info in infos.items():
        if info.kind != "linear" or info.shape[1] != d_in:
            raise AdapterFormatError(f"{where(parts[index])}: has shape {info.shape} ({info.kind}); expected a linear "
                                     f"(d_out, {d_in}) LoRA like {first!r}, to fuse into {KOHYA_PREFIX + body!r}")
    bad = [index for index in infos if index < 3 and infos[index].shape[0] != d_in]
    if bad:
        raise AdapterFormatError(f"{where(parts[bad[0]])}: has shape {infos[bad[0]].shape}; Flux's q / k / v are "
                                 f"({d_in}, {d_in}) squares, to fuse into {KOHYA_PREFIX + body!r}")
    sizes = [d_in] * 3
    if size == 4:  # an absent proj_mlp still has its rows in linear1: FluxTransformer2DModel's 4 * dim
        sizes.append(infos[3].shape[0] if 3 in infos else _MLP_RATIO * d_in)
    present = sorted(parts)
    info = ModuleInfo((sum(sizes), d_in), sum(infos[i].rank for i in present), "linear")
    offsets = [sum(sizes[:i]) for i in range(size)]
    rows = [(offsets[i], sizes[i]) for i in present]
    return Recipe(tuple(parts[i] for i in present), info, lambda factors: fuse(factors, rows, sum(sizes)))


def fuse(factors: list[LoraFactors], rows: list[tuple[int, int]], d_out: int) -> LoraFactors:
    """A = the A's stacked (sum r, d_in); B (d_out, sum r) holds each B at its (row offset, size) block."""
    A = torch.cat([f.A for f in factors])
    B = A.new_zeros(d_out, A.shape[0])
    column = 0
    for f, (start, size) in zip(factors, rows, strict=True):
        B[start:start + size, column:column + f.rank] = f.B
        column += f.rank
    return LoraFactors(A, B, "linear")


def _split(adapter: Adapter, module: str, size: int, where: Callable[[str], str]) -> dict[int, Recipe]:
    """Part index -> recipe of a fused BFL module's parts. When every column of B lies in one part's rows
    (sd-scripts' split_qkv training and our fuse write that), each part takes its own A rows and B block
    (ranks add up to r; parts with no column are left out); otherwise each part takes all of A and its
    rows of B (rank r each). Either way sum of the parts' deltas, stacked, is exactly the fused delta."""
    info = adapter.info(module)
    (d_out, d_in) = info.shape
    sizes = _split_sizes(d_in, d_out, size)
    if info.kind != "linear" or sizes is None:
        expected = f"({3 * d_in}, {d_in})" if size == 3 else f"({3 * d_in} + mlp, {d_in})"
        raise AdapterFormatError(f"{where(module)}: has shape {info.shape} ({info.kind}); expected a linear {expected} "
                                 "fused Flux projection")
    starts = [sum(sizes[:i]) for i in range(size)]
    columns = _block_columns(adapter[module].B, starts, sizes)
    recipes = {}
    for index in range(size):
        rows = slice(starts[index], starts[index] + sizes[index])
        if columns is None:
            recipes[index] = Recipe((module,), ModuleInfo((sizes[index], d_in), info.rank, "linear"),
                                    lambda factors, rows=rows: LoraFactors(factors[0].A, factors[0].B[rows], "linear"))
        elif columns[index]:
            cols = torch.tensor(columns[index])
            recipes[index] = Recipe((module,), ModuleInfo((sizes[index], d_in), len(columns[index]), "linear"),
                                    lambda factors, rows=rows, cols=cols: LoraFactors(
                                        factors[0].A[cols], factors[0].B[rows][:, cols], "linear"))
    return recipes


def _block_columns(B: torch.Tensor, starts: list[int], sizes: list[int]) -> list[list[int]] | None:
    """Per part, the columns of B (d_out, r) whose non-zeros all lie in that part's rows; None when some
    column spans two parts, or when B is all zero (then every part keeps the full rank)."""
    nonzero = torch.stack([(B[start:start + size] != 0).any(dim=0)
                           for start, size in zip(starts, sizes, strict=True)])
    if (nonzero.sum(dim=0) > 1).any() or not nonzero.any():
        return None
    return [torch.nonzero(row).flatten().tolist() for row in nonzero]
