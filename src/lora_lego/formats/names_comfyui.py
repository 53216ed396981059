"""ComfyUI's module names ("diffusion_model.<path>" on its LDM UNet or BFL transformer) <-> kohya names, exactly.

ComfyUI's LoRA loader (comfy/lora.py, model_lora_keys_unet) takes kohya's "lora_unet_<path with _>" for the module
"diffusion_model.<path>". sd-scripts names SDXL UNets with those LDM (SAI) paths and Flux with the BFL ones
(names_flux.py), so both translate by a rename. SD 1.x / 2.x kohya and diffusers files name the UNet the diffusers
way ("lora_unet_down_blocks_0_attentions_0_proj_in"), so their ComfyUI names go through the LDM <-> diffusers block
map of that UNet layout (names_ldm.py). Everything translates on to diffusers names through kohya's. Other models'
names, and those that do not say their family, are refused rather than guessed.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

from ..errors import AdapterFormatError
from ..types import Adapter, ModuleInfo
from . import names_flux, names_ldm
from .family import family_from_modules
from .names import assemble, cross_attention_dim, dotted_name, kohya_name
from .names_flux import Recipe

PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"
TRANSLATED = ("flux", *names_ldm.LAYOUTS)  # the families whose ComfyUI names have kohya names
_MODELS = {"flux": "Flux transformer (BFL names)", "sdxl": "SDXL UNet (LDM names)",
           "sd1": "SD 1.x UNet (LDM names)", "sd2": "SD 2.x UNet (LDM names)"}
# BFL paths by their kohya body (names_flux's names), inside a double / single block and at the top
_FLUX_INNER = {f"{side}_{part}_{leaf}": f"{side}_{part}.{leaf}" for side in ("img", "txt")
               for part, leaf in (("attn", "qkv"), ("attn", "proj"), ("mlp", "0"), ("mlp", "2"), ("mod", "lin"))}
_FLUX_INNER.update({"linear1": "linear1", "linear2": "linear2", "modulation_lin": "modulation.lin"})
_FLUX_TOP = {"img_in": "img_in", "txt_in": "txt_in", "final_layer_linear": "final_layer.linear",
             "final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
             **{f"{e}_in_{layer}": f"{e}_in.{layer}" for e in ("time", "vector", "guidance")
                for layer in ("in_layer", "out_layer")}}
_BFL = re.compile(r"(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer)\b")
_LDM = re.compile(r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)\.")
# LDM paths that only one UNet layout holds. SDXL: 3 levels, attention at levels 1-2 (up: output_blocks 0-5),
# transformer depth 2 and 10, label_emb. SD 1.x / 2.x: 4 levels, attention at levels 0-2 (up: output_blocks 3-11).
_SDXL_ONLY = re.compile(r"^(label_emb\.|.*\.transformer_blocks\.[1-9]|output_blocks\.[0-2]\.1\.(?!conv)"
                        r"|output_blocks\.2\.2\.)")
_SD_ONLY = re.compile(r"^((input|output)_blocks\.(9|10|11)\.|input_blocks\.[12]\.1\.|output_blocks\.[6-8]\.[12]\."
                      r"|output_blocks\.2\.1\.conv$)")
_UP_MIDDLE = re.compile(r"^output_blocks\.[3-5]\.(?!.*ff\.net\.0\.proj$)")  # width 640 in SDXL, 1280 in SD 1.x / 2.x


def family(infos: Mapping[str, ModuleInfo]) -> str | None:
    """The family ComfyUI module names say: "flux" (BFL), "sdxl" / "sd1" / "sd2" (LDM UNet), else None."""
    paths = {module.removeprefix(PREFIX): info for module, info in infos.items()}
    bfl, ldm = any(_BFL.match(p) for p in paths), any(_LDM.match(p) for p in paths)
    if bfl != ldm:
        return "flux" if bfl else _ldm_family(paths)
    return None


def _ldm_family(paths: Mapping[str, ModuleInfo]) -> str | None:
    """SDXL or SD 1.x / 2.x from blocks only one has and two widths; None when nothing or both are said."""
    cross = next((info.shape[1] for p, info in paths.items() if p.endswith("attn2.to_k")), None)
    widths = {info.shape[0] for p, info in paths.items() if _UP_MIDDLE.match(p)}
    sdxl = any(_SDXL_ONLY.match(p) for p in paths) or cross == 2048 or 640 in widths
    sd = any(_SD_ONLY.match(p) for p in paths) or cross in (768, 1024) or 1280 in widths
    if sdxl == sd:
        return None
    return "sdxl" if sdxl else "sd2" if cross == 1024 else "sd1"


def to_kohya(adapter: Adapter) -> Adapter:
    """The adapter with the kohya names sd-scripts writes for its family (SDXL, Flux: "lora_unet_<path with _>";
    SD 1.x / 2.x: the diffusers UNet path's), else AdapterFormatError."""
    fam = adapter.metadata.get("family") or family({m: adapter.info(m) for m in adapter})
    where = _where(adapter)
    if fam not in TRANSLATED:
        raise AdapterFormatError(f"{where(next(iter(adapter), ''))}: {_why_not(fam)}")
    plan = {}
    for module in adapter:
        path = module.removeprefix(PREFIX)
        target = _kohya_name(path, fam, where) if module.startswith(PREFIX) else None
        if target is None or _comfy_path(target, fam, where) != path:
            raise AdapterFormatError(f"{where(module)}: has no kohya name; expected a Linear / Conv2d of the "
                                     f"{_MODELS[fam]}")
        plan[target] = Recipe((module,), adapter.info(module), lambda factors: factors[0])
    return assemble(adapter, plan, "kohya", family=fam)


def _kohya_name(path: str, fam: str, where: Callable[[str], str]) -> str | None:
    """The kohya name of a ComfyUI path (its round trip is checked by the caller), None when it has none."""
    if fam == "flux":
        return KOHYA_PREFIX + path.replace(".", "_")
    dotted = names_ldm.to_diffusers(path, fam)
    return kohya_name("unet." + dotted, fam, where) if dotted is not None else None


def from_kohya(adapter: Adapter) -> Adapter:
    """The adapter with ComfyUI names, from SD 1.x / 2.x, SDXL or Flux kohya UNet names, else AdapterFormatError."""
    infos = {module: adapter.info(module) for module in adapter}
    fam = adapter.metadata.get("family") or family_from_modules(infos, cross_attention_dim(infos))
    where = _where(adapter)
    plan = {}
    for module in adapter:
        if not module.startswith(KOHYA_PREFIX):
            raise AdapterFormatError(f"{where(module)}: is no diffusion-model module; the ComfyUI files read and "
                                     f"written here hold the diffusion model's only ({PREFIX}<module>), expected "
                                     f"{KOHYA_PREFIX}<module>")
        if fam not in TRANSLATED:
            raise AdapterFormatError(f"{where(module)}: {_why_not(fam)}")
        path = _comfy_path(module, fam, where)
        if path is None:
            raise AdapterFormatError(f"{where(module)}: has no ComfyUI name; expected a Linear / Conv2d of the "
                                     f"{_MODELS[fam]}")
        plan[PREFIX + path] = Recipe((module,), infos[module], lambda factors: factors[0])
    return assemble(adapter, plan, "comfyui", family=fam)


def _comfy_path(module: str, fam: str, where: Callable[[str], str]) -> str | None:
    """The LDM / BFL path of a kohya UNet name of an adapter of `fam`, None when it names no such module."""
    body = module.removeprefix(KOHYA_PREFIX)
    if fam == "flux":
        match = re.fullmatch(r"(double_blocks|single_blocks)_(\d+)_(.+)", body)
        inner = _FLUX_INNER.get(match[3]) if match else None
        if not names_flux.is_bfl(body):
            return None
        return f"{match[1]}.{match[2]}.{inner}" if match and inner else _FLUX_TOP.get(body)
    try:
        dotted = dotted_name(module, fam, where)
    except AdapterFormatError:
        return None
    return names_ldm.to_ldm(dotted.removeprefix("unet."), fam) if dotted.startswith("unet.") else None


def _why_not(fam: str | None) -> str:
    """Why a family's modules have no name in the other naming (the end of a one-line error)."""
    if fam is None:
        said = ("its adapter's module names do not say which base model it is for (no block or width that only SDXL "
                "or only SD 1.x / 2.x has, or another model's names)")
    else:
        said = f"its adapter is for {fam}"
    return (f"{said}; expected SD 1.x / 2.x or SDXL (LDM UNet) or Flux (BFL) modules, whose ComfyUI and kohya / "
            "diffusers names translate")


def _where(adapter: Adapter) -> Callable[[str], str]:
    return lambda module: f"adapter {adapter.name!r}, module {module!r}"
