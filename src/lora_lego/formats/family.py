"""The base-model family of a diffusion-model LoRA file ("sd1", "sd2", "sdxl", "flux"), from its header
metadata when it says so, else from its module names; None for other adapters (e.g. LLMs)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from ..errors import IncompatibleAdaptersError
from ..types import Adapter

# ss_base_model_version (sd-scripts) and modelspec.architecture (SAI model spec) prefixes -> family
_VERSIONS = {"sd_v1": "sd1", "sd_v2": "sd2", "sdxl": "sdxl", "flux1": "flux"}
_ARCHITECTURES = {"stable-diffusion-v1": "sd1", "stable-diffusion-v2": "sd2", "stable-diffusion-xl": "sdxl",
                  "flux-1": "flux"}
# and back: sd-scripts' ss_base_model_version and ss_v2 of a family, which writers record when no input header did
BASE_MODEL_VERSIONS = {"sd1": ("sd_v1", "False"), "sd2": ("sd_v2", "True"), "sdxl": ("sdxl_base_v1-0", "False"),
                       "flux": ("flux1", "False")}


def family_from_metadata(header: Mapping[str, str]) -> str | None:
    """The family a file's header names (sd-scripts' ss_base_model_version / ss_v2, modelspec, or diffusers'
    lora_adapter_metadata does not say), or None."""
    version = str(header.get("ss_base_model_version", ""))
    for prefix, family in _VERSIONS.items():
        if version.startswith(prefix):
            return family
    architecture = str(header.get("modelspec.architecture", ""))
    for prefix, family in _ARCHITECTURES.items():
        if architecture.startswith(prefix):
            return family
    if str(header.get("ss_v2", "")).lower() == "true":
        return "sd2"
    return None


def family_from_modules(modules: Iterable[str], cross_attention_dim: int | None = None) -> str | None:
    """The family that module names imply (kohya or diffusers spellings), or None when they say nothing.

    SD 1.x and 2.x share module names; `cross_attention_dim` (the d_in of a UNet cross-attention to_k:
    768 for SD 1.x, 1024 for SD 2.x, 2048 for SDXL) tells them apart, and SD 1.x is assumed when it
    is unknown.
    """
    names = list(modules)
    text = " ".join(names)
    if any(token in text for token in ("double_blocks", "single_blocks", "single_transformer_blocks")):
        return "flux"
    if "transformer." in text and "transformer_blocks" in text and "unet" not in text:
        return "flux"
    # lora_te1_ beside a UNet says nothing: diffusers' convert_state_dict_to_kohya and ComfyUI use it for SD 1.x
    # too; in a text-encoder-only file it is sd-scripts' SDXL naming (SD 1.x / 2.x text encoders: lora_te_)
    text_only = bool(names) and all(n.startswith(("lora_te", "text_encoder")) for n in names)
    if text_only and any(n.startswith("lora_te1_") for n in names):
        return "sdxl"
    if (any(n.startswith(("lora_te2_", "text_encoder_2.")) for n in names)
            or any(token in text for token in ("input_blocks", "output_blocks", "middle_block"))
            or cross_attention_dim == 2048):
        return "sdxl"
    if any(n.startswith(("lora_unet_", "lora_te_", "unet.", "text_encoder.")) for n in names):
        return "sd2" if cross_attention_dim == 1024 else "sd1"
    return None


# module-name evidence of one family that no other family's file holds: (family, test)
_EVIDENCE = (
    ("flux", lambda n: any(t in n for t in ("double_blocks", "single_blocks"))),
    ("sdxl", lambda n: n.startswith("lora_te2_") or any(t in n for t in ("input_blocks", "output_blocks",
                                                                          "middle_block"))),
    ("sd1/sd2", lambda n: n.startswith("lora_te_") or (n.startswith("lora_unet_") and any(
        t in n for t in ("down_blocks", "up_blocks", "mid_block")))),
)


def mixed_families(modules: Iterable[str]) -> tuple[tuple[str, str], tuple[str, str]] | None:
    """Two (family, example module) pairs when kohya module names belong to two families (e.g. SD 1.x's
    lora_te_ beside SDXL's lora_te2_, or Flux blocks beside a UNet's), else None."""
    found: dict[str, str] = {}
    for name in modules:
        for family, test in _EVIDENCE:
            if family not in found and test(name):
                found[family] = name
    if "sdxl" in found and "sd1/sd2" in found and not found["sd1/sd2"].startswith("lora_te_"):
        del found["sd1/sd2"]  # SDXL's diffusers-named UNet (down_blocks ...) is SDXL's too
    pairs = sorted(found.items())
    return (pairs[0], pairs[1]) if len(pairs) > 1 else None


def check_families(adapters: Sequence[Adapter]) -> None:
    """Refuse diffusion-model adapters of different families (e.g. SD 1.x and SDXL): a format hook."""
    families = {a.metadata.get("family") for a in adapters} - {None}
    if len(families) > 1:
        shown = ", ".join(f"{a.name!r}: {a.metadata.get('family')}" for a in adapters if a.metadata.get("family"))
        raise IncompatibleAdaptersError(f"adapters are for different base-model families ({shown}); "
                                        "merge adapters of one base model")


def carry_family(adapters: Sequence[Adapter]) -> dict[str, Any]:
    """The family a merge keeps (the first adapter's): the kohya writer's header and the names' translation
    need it. A format hook."""
    return {"family": adapters[0].metadata.get("family")}


# the component a module belongs to: kohya prefixes and diffusers component prefixes -> one name
_COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
               "lora_te2": "text_encoder_2", "lora_te3": "text_encoder_3"}


def component(module: str) -> str | None:
    """The model component a module belongs to ("unet", "transformer", "text_encoder", ...), or None for a
    module of a single model (e.g. an LLM's "model.layers.0.self_attn.q_proj")."""
    if module.startswith("lora_"):
        head = module.split("_", 2)
        prefix = "_".join(head[:2])
        return "transformer" if prefix == "lora_unet" and "_blocks_" in module and (
            "double_blocks" in module or "single_blocks" in module) else _COMPONENTS.get(prefix, prefix)
    head = module.split(".", 1)[0]
    heads = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior")
    return head if head in heads else None
