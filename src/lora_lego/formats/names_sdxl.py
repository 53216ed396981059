"""SDXL UNet paths in diffusers' spelling ("down_blocks.1.attentions.0.proj_in") <-> SAI / LDM spelling
("input_blocks.4.1.proj_in"), which sd-scripts uses for SDXL kohya files. The block map is that of
sd-scripts' library/sdxl_model_util.make_unet_conversion_map (SDXL's fixed layout: 3 levels, 2 resnets
down and 3 up per level, attention in down levels 1-2 and up levels 0-1); inside attention blocks
the paths are the same in both spellings."""

from __future__ import annotations

# (SAI prefix, diffusers prefix); resnet prefixes also map their inner layer names (_RESNET)
_RESNETS: list[tuple[str, str]] = []
_OTHERS: list[tuple[str, str]] = []
for _level in range(3):
    for _j in range(2):
        _RESNETS.append((f"input_blocks.{3 * _level + _j + 1}.0", f"down_blocks.{_level}.resnets.{_j}"))
        _OTHERS.append((f"input_blocks.{3 * _level + _j + 1}.1", f"down_blocks.{_level}.attentions.{_j}"))
    for _j in range(3):
        _RESNETS.append((f"output_blocks.{3 * _level + _j}.0", f"up_blocks.{_level}.resnets.{_j}"))
        _OTHERS.append((f"output_blocks.{3 * _level + _j}.1", f"up_blocks.{_level}.attentions.{_j}"))
    if _level < 2:  # the lowest resolution has no down- / upsampler
        _OTHERS.append((f"input_blocks.{3 * (_level + 1)}.0.op", f"down_blocks.{_level}.downsamplers.0.conv"))
        _OTHERS.append((f"output_blocks.{3 * _level + 2}.2", f"up_blocks.{_level}.upsamplers.0"))
_RESNETS += [("middle_block.0", "mid_block.resnets.0"), ("middle_block.2", "mid_block.resnets.1")]
_OTHERS += [("middle_block.1", "mid_block.attentions.0"), ("time_embed.0", "time_embedding.linear_1"),
            ("time_embed.2", "time_embedding.linear_2"), ("label_emb.0.0", "add_embedding.linear_1"),
            ("label_emb.0.2", "add_embedding.linear_2"), ("input_blocks.0.0", "conv_in"), ("out.2", "conv_out")]
_RESNET = (("in_layers.2", "conv1"), ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"),
           ("skip_connection", "conv_shortcut"))
SAI_STARTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")


def is_sai(body: str) -> bool:
    """Whether a kohya UNet body ("input_blocks_4_1_...") uses SAI / LDM block names."""
    return body.startswith(SAI_STARTS)


def to_sai(path: str) -> str | None:
    """The SAI path of a diffusers SDXL UNet path, None when it has none (e.g. a norm)."""
    for sai, dotted in _RESNETS:
        if path.startswith(dotted + "."):
            inner = {d: s for s, d in _RESNET}.get(path[len(dotted) + 1:])
            return f"{sai}.{inner}" if inner else None
    for sai, dotted in _OTHERS:
        if path == dotted or path.startswith(dotted + "."):
            return sai + path[len(dotted):]
    return None


def from_sai(body: str) -> tuple[str, str] | None:
    """(diffusers prefix, the rest of the underscored body to parse) of an SAI kohya body, None if unmapped.

    E.g. "input_blocks_4_1_transformer_blocks_0_attn1_to_q" -> ("down_blocks.1.attentions.0",
    "transformer_blocks_0_attn1_to_q"); a resnet's inner layer is mapped here ("middle_block_0_in_layers_2"
    -> ("mid_block.resnets.0.conv1", "")).
    """
    for sai, dotted in _RESNETS:
        head = sai.replace(".", "_") + "_"
        if body.startswith(head):
            inner = {s.replace(".", "_"): d for s, d in _RESNET}.get(body[len(head):])
            return (f"{dotted}.{inner}", "") if inner else None
    for sai, dotted in sorted(_OTHERS, key=lambda pair: -len(pair[0])):  # "out.2" after "output_blocks..."
        head = sai.replace(".", "_")
        if body == head:
            return dotted, ""
        if body.startswith(head + "_"):
            return dotted, body[len(head) + 1:]
    return None
