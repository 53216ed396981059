"""UNet paths in diffusers' spelling ("down_blocks.1.attentions.0.proj_in") <-> the LDM (SAI) spelling of the same
modules ("input_blocks.4.1.proj_in"), for the UNet layouts of SDXL and SD 1.x / 2.x. sd-scripts writes SDXL kohya
files with LDM names, ComfyUI names every UNet so; inside attention blocks the paths are the same in both spellings.
The block map follows diffusers' convert_ldm_unet_checkpoint and sd-scripts' make_unet_conversion_map.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Layout:
    """A UNet's blocks: `levels` resolutions with 2 resnets down and 3 up each; `attention`: the down levels with
    attention blocks (their up level, at the same resolution, has them too); `label_emb`: SDXL's added embedding."""

    levels: int
    attention: tuple[int, ...]
    label_emb: bool = False


LAYOUTS = {"sdxl": Layout(3, (1, 2), label_emb=True), "sd1": Layout(4, (0, 1, 2)), "sd2": Layout(4, (0, 1, 2))}
# a resnet's inner layers: (LDM, diffusers)
_RESNET = (("in_layers.2", "conv1"), ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"),
           ("skip_connection", "conv_shortcut"))
Pairs = tuple[tuple[str, str], ...]
LDM_STARTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")


@lru_cache(maxsize=None)
def block_map(layout: Layout) -> tuple[Pairs, Pairs]:
    """(resnets, others): the (LDM prefix, diffusers prefix) pairs of a layout's blocks; a resnet prefix also maps
    its inner layer names (`_RESNET`), another prefix keeps what follows it."""
    resnets: list[tuple[str, str]] = []
    others: list[tuple[str, str]] = []
    last = layout.levels - 1
    for level in range(layout.levels):  # up level `level` has the resolution of down level `last - level`
        down, up = level in layout.attention, last - level in layout.attention
        for j in range(2):
            resnets.append((f"input_blocks.{3 * level + j + 1}.0", f"down_blocks.{level}.resnets.{j}"))
            if down:
                others.append((f"input_blocks.{3 * level + j + 1}.1", f"down_blocks.{level}.attentions.{j}"))
        for j in range(3):
            resnets.append((f"output_blocks.{3 * level + j}.0", f"up_blocks.{level}.resnets.{j}"))
            if up:
                others.append((f"output_blocks.{3 * level + j}.1", f"up_blocks.{level}.attentions.{j}"))
        if level < last:  # the lowest resolution has no down- / upsampler; an upsampler follows the attention
            others.append((f"input_blocks.{3 * level + 3}.0.op", f"down_blocks.{level}.downsamplers.0.conv"))
            others.append((f"output_blocks.{3 * level + 2}.{1 + up}", f"up_blocks.{level}.upsamplers.0"))
    resnets += [("middle_block.0", "mid_block.resnets.0"), ("middle_block.2", "mid_block.resnets.1")]
    others += [("middle_block.1", "mid_block.attentions.0"), ("time_embed.0", "time_embedding.linear_1"),
               ("time_embed.2", "time_embedding.linear_2"), ("input_blocks.0.0", "conv_in"), ("out.2", "conv_out")]
    if layout.label_emb:
        others += [("label_emb.0.0", "add_embedding.linear_1"), ("label_emb.0.2", "add_embedding.linear_2")]
    return tuple(resnets), tuple(sorted(others, key=lambda pair: -len(pair[0])))  # "out.2" after "output_blocks"


def is_ldm(body: str) -> bool:
    """Whether a kohya UNet body ("input_blocks_4_1_...") uses LDM / SAI block names."""
    return body.startswith(LDM_STARTS)


def to_ldm(path: str, family: str = "sdxl") -> str | None:
    """The LDM path of a diffusers UNet path of `family` ("sdxl", "sd1", "sd2"), None when it has none (a norm)."""
    resnets, others = block_map(LAYOUTS[family])
    return _rename(path, resnets, others, {d: s for s, d in _RESNET}, reverse=True)


def to_diffusers(path: str, family: str = "sdxl") -> str | None:
    """The diffusers path of an LDM UNet path of `family`, None when it has none."""
    resnets, others = block_map(LAYOUTS[family])
    return _rename(path, resnets, others, dict(_RESNET), reverse=False)


def _rename(path: str, resnets: Pairs, others: Pairs, inner_names: dict[str, str], *, reverse: bool) -> str | None:
    """`path` renamed by the first (LDM, diffusers) prefix pair it starts with: diffusers -> LDM when `reverse`."""
    for ldm, dotted in resnets:
        old, new = (dotted, ldm) if reverse else (ldm, dotted)
        if path.startswith(old + "."):
            inner = inner_names.get(path[len(old) + 1:])
            return f"{new}.{inner}" if inner else None
    for ldm, dotted in others:
        old, new = (dotted, ldm) if reverse else (ldm, dotted)
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    return None


def from_ldm(body: str, family: str = "sdxl") -> tuple[str, str] | None:
    """(diffusers prefix, the rest of the underscored body to parse) of an LDM kohya body, None if unmapped.

    E.g. "input_blocks_4_1_transformer_blocks_0_attn1_to_q" -> ("down_blocks.1.attentions.0",
    "transformer_blocks_0_attn1_to_q"); a resnet's inner layer is mapped here ("middle_block_0_in_layers_2"
    -> ("mid_block.resnets.0.conv1", "")).
    """
    resnets, others = block_map(LAYOUTS[family])
    for ldm, dotted in resnets:
        head = ldm.replace(".", "_") + "_"
        if body.startswith(head):
            inner = {s.replace(".", "_"): d for s, d in _RESNET}.get(body[len(head):])
            return (f"{dotted}.{inner}", "") if inner else None
    for ldm, dotted in others:
        head = ldm.replace(".", "_")
        if body == head:
            return dotted, ""
        if body.startswith(head + "_"):
            return dotted, body[len(head) + 1:]
    return None
