"""Module names of diffusion-model LoRAs in the two namings, translated exactly both ways: dotted paths under
a diffusers component ("unet.down_blocks.0.resnets.0.conv1", "text_encoder.text_model.encoder.layers.0...")
and kohya names ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_te_text_model_encoder_layers_0_...").

kohya names are the dotted paths with "_" for "."; going back needs the identifiers that contain "_"
(`_JOINED`). Flux uses BFL names with fused q/k/v (names_flux.py), SDXL kohya files SAI / LDM block names
(names_ldm.py).
"""

from __future__ import annotations

from typing import Callable, Mapping

from ..errors import AdapterFormatError
from ..types import Adapter, LazyModules, ModuleInfo
from . import names_flux, names_ldm
from .diffusers_config import split_component
from .family import family_from_modules
from .names_flux import Recipe

# identifiers with "_" in diffusers UNets (SD 1.x / 2.x / XL), CLIP, T5 and diffusers' Flux transformer
_JOINED = frozenset("""
    down_blocks up_blocks mid_block transformer_blocks to_q to_k to_v to_out proj_in proj_out time_emb_proj
    conv_shortcut conv_in conv_out conv_norm_out time_embedding linear_1 linear_2 add_embedding cond_proj
    class_embedding encoder_hid_proj
    text_model self_attn q_proj k_proj v_proj out_proj token_embedding position_embedding final_layer_norm
    text_projection layer_norm1 layer_norm2
    wi_0 wi_1 embed_tokens relative_attention_bias layer_norm
    single_transformer_blocks add_q_proj add_k_proj add_v_proj to_add_out ff_context norm1_context proj_mlp
    norm_out x_embedder context_embedder time_text_embed timestep_embedder text_embedder guidance_embedder
""".split())
# the other identifiers of those models' module paths (numbers are always allowed)
_PLAIN = frozenset("""
    attentions resnets downsamplers upsamplers attn attn1 attn2 ff net proj conv conv1 conv2 norm norm1 norm2
    norm3 linear encoder layers mlp fc1 fc2 embeddings block layer SelfAttention DenseReluDense q k v o wo shared
""".split())
_LONGEST = max(name.count("_") for name in _JOINED) + 1
# kohya prefix -> diffusers component (lora_te3_ is Flux's T5, diffusers' text_encoder_2)
_COMPONENTS = (("lora_unet_", "unet"), ("lora_te_", "text_encoder"), ("lora_te1_", "text_encoder"),
               ("lora_te2_", "text_encoder_2"), ("lora_te3_", "text_encoder_2"), ("lora_transformer_", "transformer"))
_T5 = ("encoder.block.", "encoder.embed_tokens", "shared")


def canonical_dotted(module: str) -> str:
    """The path with CLIP's "text_model." level (transformers 5 dropped it from CLIPTextModel; kohya
    files, transformers 4 and diffusers' loader all accept it)."""
    component, rest = split_component(module)
    if component in ("text_encoder", "text_encoder_2") and rest.startswith(("encoder.layers.", "embeddings.")):
        return f"{component}.text_model.{rest}"
    return module


def parse_underscored(body: str) -> tuple[str | None, str | None]:
    """(dotted path, None) for a kohya body ("down_blocks_0_attentions_0_proj_in"), or (None, the first
    part that is no known identifier). Identifiers with "_" are matched longest first."""
    tokens, parts, i = body.split("_"), [], 0
    while i < len(tokens):
        for j in range(min(len(tokens), i + _LONGEST), i, -1):
            word = "_".join(tokens[i:j])
            known = word in _JOINED if j > i + 1 else word in _JOINED or word in _PLAIN or word.isdigit()
            if known:
                parts.append(word)
                i = j
                break
        else:
            return None, tokens[i]
    return ".".join(parts), None


def cross_attention_dim(infos: Mapping[str, ModuleInfo]) -> int | None:
    """d_in of a UNet cross-attention to_k (768 SD 1.x, 1024 SD 2.x, 2048 SDXL), None without one."""
    return next((info.shape[1] for module, info in infos.items()
                 if module.startswith(("unet.", "lora_unet_")) and module.endswith(("attn2.to_k", "attn2_to_k"))), None)


def translate(adapter: Adapter, naming: str) -> Adapter:
    """The same deltas under the other naming ("kohya" or "dotted"), exactly; lazy when `adapter` is.

    Renames module by module; for Flux fuses q / k / v (and proj_mlp) into BFL's fused modules (A
    stacked, B block-diagonal) or splits them back (which reads each fused module once now, to see
    whether its B is block-diagonal; every other module is read only when accessed). Metadata is
    copied, with "format" "kohya" or "diffusers" and "scaling" keyed by the new names. Raises
    AdapterFormatError naming the module that has no translation.
    """
    if naming not in ("kohya", "dotted"):
        raise AdapterFormatError(f"unknown module naming {naming!r}; expected 'kohya' or 'dotted'")
    infos = {module: adapter.info(module) for module in adapter}
    family = adapter.metadata.get("family") or family_from_modules(infos, cross_attention_dim(infos))

    def where(module: str) -> str:
        return f"adapter {adapter.name!r}, module {module!r}"

    is_kohya = [module.startswith("lora_") for module in infos]
    if all(is_kohya) == (naming == "kohya") and len(set(is_kohya)) <= 1:
        plan = {module: Recipe((module,), info, lambda factors: factors[0]) for module, info in infos.items()}
    elif naming == "kohya":
        plan = _to_kohya(adapter, family, where)
    else:
        plan = _to_dotted(adapter, family, where)
    return assemble(adapter, plan, "kohya" if naming == "kohya" else "diffusers")


def _to_kohya(adapter: Adapter, family: str | None, where: Callable[[str], str]) -> dict[str, Recipe]:
    flux = [module for module in adapter if module.startswith(names_flux.DOTTED_PREFIX)]
    skip = set(flux)
    plan: dict[str, Recipe] = {}
    for module in adapter:
        if module in skip:
            continue
        target = kohya_name(module, family, where)
        try:
            back = dotted_name(target, family, where)
            shown = repr(back)
        except AdapterFormatError as error:
            back, shown = None, f"nothing ({str(error).partition(': ')[2]})"
        if back != canonical_dotted(module):  # kohya names drop the dots; only known identifiers bring them back
            raise AdapterFormatError(f"{where(module)}: its kohya name {target!r} would translate back to {shown}; "
                                     "expected a diffusers UNet / CLIP / T5 module path")
        _add(plan, target, Recipe((module,), adapter.info(module), lambda factors: factors[0]), where)
    for target, recipe in names_flux.to_kohya(adapter, flux, where).items():
        _add(plan, target, recipe, where)
    return plan


def _to_dotted(adapter: Adapter, family: str | None, where: Callable[[str], str]) -> dict[str, Recipe]:
    prefix = names_flux.KOHYA_PREFIX
    flux = [m for m in adapter if m.startswith(prefix) and names_flux.is_bfl(m[len(prefix):])]
    skip = set(flux)
    plan: dict[str, Recipe] = {}
    for module in adapter:
        if module not in skip:
            _add(plan, dotted_name(module, family, where), Recipe((module,), adapter.info(module),
                                                                  lambda factors: factors[0]), where)
    for target, recipe in names_flux.to_dotted(adapter, flux, where).items():
        _add(plan, target, recipe, where)
    return plan


def _add(plan: dict[str, Recipe], target: str, recipe: Recipe, where: Callable[[str], str]) -> None:
    if target in plan:
        raise AdapterFormatError(f"{where(recipe.sources[0])}: translates to {target!r}, as "
                                 f"{plan[target].sources[0]!r} does; expected one module per name")
    plan[target] = recipe


def kohya_name(module: str, family: str | None, where: Callable[[str], str]) -> str:
    """The kohya name of a dotted UNet / text-encoder path (SDXL UNet: SAI block names)."""
    component, rest = split_component(canonical_dotted(module))
    if component == "unet":
        if family == "sdxl":
            sai = names_ldm.to_ldm(rest, family)
            if sai is None:
                raise AdapterFormatError(f"{where(module)}: has no SAI (SDXL kohya) name; expected a UNet Linear / "
                                         "Conv2d of SDXL")
            rest = sai
        return "lora_unet_" + rest.replace(".", "_")
    if component == "text_encoder":
        return ("lora_te1_" if family in ("sdxl", "flux") else "lora_te_") + rest.replace(".", "_")
    if component == "text_encoder_2":
        t5 = rest.startswith(_T5) or family == "flux"
        return ("lora_te3_" if t5 else "lora_te2_") + rest.replace(".", "_")
    raise AdapterFormatError(f"{where(module)}: has no kohya name; kohya files are for diffusion models, whose "
                             "module paths start with a diffusers component (unet., transformer., text_encoder., "
                             "text_encoder_2.)")


def dotted_name(module: str, family: str | None, where: Callable[[str], str]) -> str:
    """The dotted path of a kohya UNet / text-encoder name (not Flux's BFL names: names_flux)."""
    found = next(((prefix, component) for prefix, component in _COMPONENTS if module.startswith(prefix)), None)
    if found is None:
        raise AdapterFormatError(f"{where(module)}: is not a kohya module name; expected one starting with "
                                 f"{', '.join(prefix for prefix, _ in _COMPONENTS)}")
    prefix, component = found
    body = module[len(prefix):]
    if prefix == "lora_te3_" and family != "flux":
        raise AdapterFormatError(f"{where(module)}: lora_te3_ (T5) converts to diffusers names only for Flux "
                                 f"(text_encoder_2); this adapter's family is {family}")
    head = ""
    if component == "unet" and names_ldm.is_ldm(body):
        if family != "sdxl":
            raise AdapterFormatError(f"{where(module)}: SAI / LDM UNet names convert to diffusers names only for "
                                     f"SDXL (this adapter's family is {family}); merge and write it as kohya")
        mapped = names_ldm.from_ldm(body, family)
        if mapped is None:
            raise AdapterFormatError(f"{where(module)}: is no SDXL UNet Linear / Conv2d in SAI naming")
        head, body = mapped
    path, unknown = parse_underscored(body) if body else ("", None)
    if path is None:
        raise AdapterFormatError(f"{where(module)}: cannot be translated to a diffusers module path ({unknown!r} is no "
                                 "identifier of diffusers UNets, CLIP or T5); it can be merged and written as kohya")
    return canonical_dotted(f"{component}.{'.'.join(p for p in (head, path) if p)}")


def assemble(adapter: Adapter, plan: dict[str, Recipe], fmt: str, *, family: str | None = None) -> Adapter:
    """The translated adapter (targets built on access when lazy), with format `fmt` and, given, `family`."""
    def read(target: str):
        recipe = plan[target]
        return recipe.build([adapter[source] for source in recipe.sources])

    modules = (LazyModules({t: r.info for t, r in plan.items()}, read) if adapter.lazy
               else {target: read(target) for target in plan})
    metadata = dict(adapter.metadata)
    metadata["format"] = fmt
    if family is not None:
        metadata["family"] = family
    if isinstance(metadata.get("scaling"), dict):  # the scale folded into each target's (first) source
        metadata["scaling"] = {t: metadata["scaling"][r.sources[0]] for t, r in plan.items()
                               if r.sources[0] in metadata["scaling"]}
    return Adapter(modules, metadata, name=adapter.name)

