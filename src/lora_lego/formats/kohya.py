"""kohya / LyCORIS single files (sd-scripts, LyCORIS, Civitai / A1111 / ComfyUI): "<lora_name>.lora_down.weight",
".lora_up.weight", ".alpha" per module, LoCon convolutions and Tucker cores; LoHa / LoKr on request (expanded
exactly by `lycoris`); DoRA, IA3, OFT, GLoRA, full and norm modules refused. Module names are the lora_names."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import AdapterFormatError, some
from ..lowrank import scale_factors
from ..outputs import output_dtype
from ..tensorfile import TensorInfo
from ..types import Adapter, LazyModules, LoraFactors, ModuleInfo, check_factor_values, conv_kind
from . import kohya_write, lycoris, updown
from .family import carry_family, family_from_metadata, family_from_modules, mixed_families
from .files import module_producer, open_file
from .ranks import stored_dtype
from .record import apply_recorded

ALGOS = {  # the suffixes of each readable algorithm, and its name in messages
    "lora": ("LoRA", updown.SUFFIXES),
    "loha": ("LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha")),
    "lokr": ("LoKr", ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
                      "alpha")),
}
REFUSED = (  # (kind, the suffixes that mark it, why no plain LoRA can stand for it)
    ("DoRA", {"dora_scale"}, "it rescales W0 + delta by the norms of the base weights"),
    ("IA3", {"on_input"}, "it scales the base layer's activations"),
    ("OFT / BOFT", {"oft_blocks", "oft_diag", "rescale"}, "it rotates the base weights"),
    ("GLoRA", {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"},
     "its update multiplies the base weights"),
    ("full", {"diff", "diff_b"}, "it stores full weight (and bias) differences, not low-rank factors"),
    ("norm", {"w_norm", "b_norm"}, "it stores normalisation-layer weights, not low-rank factors"),
    ("T-LoRA", {"q_layer.weight", "p_layer.weight", "lambda_layer"}, "its update depends on the timestep"),
)
# LyCORIS flattens the kernel of a non-Tucker LoHa / LoKr convolution into d_in; only the model knows it. These
# are the convolutions of SD / SDXL UNets (diffusers and SAI spellings) that kohya / LyCORIS presets target.
_FLAT_CONVS = ((re.compile(r"_(conv1|conv2|conv|conv_in|conv_out|in_layers_2|out_layers_3|op)$"), (3, 3)),
               (re.compile(r"_(conv_shortcut|skip_connection)$"), (1, 1)))
_SD1_PROJ = re.compile(r"_(proj_in|proj_out)$")  # 1x1 convolutions in SD 1.x UNets, linear layers since SD 2.x


def owns(key: str) -> bool:
    """A kohya / LyCORIS key: its part before the first "." is a lora_name (lora_unet_..., lora_te_..., ...)."""
    return key.split(".", 1)[0].startswith("lora_")


def carry(adapters: Sequence[Adapter]) -> dict[str, Any]:
    """What a merge keeps for the kohya writer: the family and the inputs' headers, of which it keeps what still
    holds (`kohya_write.output_metadata`). A format hook."""
    return {**carry_family(adapters), "source_headers": [a.metadata.get("header", {}) for a in adapters]}


@dataclass(frozen=True)
class _Module:
    algo: str  # "lora", "loha", "lokr"
    parts: dict[str, TensorInfo]
    info: ModuleInfo  # of the factors read (after expansion)
    scale: float


def read(path: Path, *, lazy: bool = False, expand: bool = False, expand_rank: int | None = None) -> Adapter:
    """Read a kohya / LyCORIS .safetensors file. Factors are float32 with sqrt(|scale|) folded into A and B (the
    sign on A), scale = alpha / r per module (alpha 0 or absent: 1).

    LoRA / LoCon (conv: A = lora_down flattened, B = lora_up[:, :, 0, 0]; a Tucker lora_mid folded into A, same
    rank) are read as they are. LoHa / LoKr modules are refused unless `expand` (their exact plain factors,
    rank min(r1 r2, d_out, d_in)) or `expand_rank=K` (the best rank-K approximation of each; it wins over
    `expand`). Raises AdapterFormatError naming the file, the module and what was expected. `lazy=True` reads
    the header and the alphas now and each module's factors on access.
    """
    name = str(path)
    infos, header, fetch = open_file(path)
    if expand_rank is not None and (type(expand_rank) is not int or expand_rank < 1):
        raise AdapterFormatError(f"adapter {name!r}: expand_rank must be an integer >= 1; got {expand_rank!r}")
    groups = _group_keys(infos, name)
    algos = {module: _algo(module, parts, name) for module, parts in groups.items()}
    _refuse(algos, name, expand or expand_rank is not None)
    layouts = {module: _layout(algos[module], parts, f"adapter {name!r}, module {module!r}")
               for module, parts in groups.items()}
    family = _family(header, layouts, name)
    modules = {module: _module(module, algos[module], groups[module], layouts[module], family, expand_rank, fetch, name)
               for module in groups}

    def read_module(module: str) -> LoraFactors:
        return _read_factors(modules[module], expand_rank, fetch, f"adapter {name!r}, module {module!r}")

    metadata = _metadata(path, header, family, modules, name)
    table = LazyModules({m: s.info for m, s in modules.items()}, read_module)
    return Adapter(table if lazy else {module: read_module(module) for module in modules}, metadata, name=name)


def _family(header: dict[str, str], layouts: dict[str, lycoris.Layout], name: str) -> str | None:
    """The file's base-model family: its header's word, else its module names' (and a UNet's cross-attention
    width); refuses module names of two families."""
    cross = next((layout.shape[1] for m, layout in layouts.items()  # a UNet's cross-attention width
                  if m.startswith("lora_unet_") and m.endswith("attn2_to_k")), None)
    mixed = mixed_families(layouts)
    if mixed:
        (first, example), (second, other) = mixed
        raise AdapterFormatError(f"adapter {name!r}: module names of two model families ({first}: {example!r}; "
                                 f"{second}: {other!r}); expected the modules of one base model")
    return family_from_metadata(header) or family_from_modules(layouts, cross)


def _metadata(path: Path, header: dict[str, str], family: str | None, modules: dict[str, _Module],
              name: str) -> dict[str, Any]:
    """The adapter's metadata: family, header, stored dtype, per-module scales, LyCORIS counts, what was recorded."""
    expanded = Counter(ALGOS[m.algo][0] for m in modules.values() if m.algo != "lora")
    metadata = {
        "format": "kohya", "family": family, "header": header,
        "dtype": stored_dtype(info.dtype for m in modules.values() for key, info in m.parts.items() if key != "alpha"),
        "scaling": {module: m.scale for module, m in modules.items()},
        "folder": str(path.resolve()),  # what writes must never overwrite (writing.source_folders)
        "base_model_name_or_path": None, "task_type": None, "fan_in_fan_out": False,
    }
    if expanded:
        metadata["lycoris"] = dict(expanded)
    apply_recorded(metadata, header, name)
    return metadata


def _group_keys(infos: dict[str, TensorInfo], name: str) -> dict[str, dict[str, TensorInfo]]:
    """Tensor keys -> {lora_name: {suffix: info}}."""
    groups: dict[str, dict[str, TensorInfo]] = {}
    for key, info in infos.items():
        module, dot, suffix = key.partition(".")
        if not module.startswith("lora_") or not dot:
            raise AdapterFormatError(f"adapter {name!r}: tensor {key!r} is not a kohya key; expected "
                                     "'<lora_name>.<suffix>' with a lora_name such as 'lora_unet_...' or 'lora_te_...'")
        groups.setdefault(module, {})[suffix] = info
    return groups


def _algo(module: str, parts: dict[str, TensorInfo], name: str) -> str:
    """The algorithm a module's suffixes name: "lora", "loha", "lokr", or a REFUSED kind."""
    suffixes = set(parts)
    for kind, markers, _ in REFUSED:
        if markers & suffixes:
            return kind
    where = f"adapter {name!r}, module {module!r}"
    found = [algo for algo, (_, known) in ALGOS.items() if (suffixes - {"alpha"}) & set(known)]
    if len(found) > 1:
        raise AdapterFormatError(f"{where}: mixes {' and '.join(ALGOS[a][0] for a in found)} keys "
                                 f"({', '.join(sorted(suffixes))}); expected those of one algorithm")
    known = set(ALGOS[found[0]][1]) if found else set()
    unknown = sorted(suffixes - known) if found else sorted(suffixes - {"alpha"})
    if unknown or not found:
        listed = "; ".join(f"{label}: {', '.join(keys)}" for label, keys in ALGOS.values())
        what = f"unknown tensor suffix(es) {some(unknown)}" if unknown else "only an alpha"
        raise AdapterFormatError(f"{where}: {what}; expected the suffixes of one of {listed}")
    for suffix, info in parts.items():
        if suffix != "alpha" and not info.dtype.is_floating_point:
            raise AdapterFormatError(f"{where}: {suffix} has dtype {info.dtype}; expected a float tensor")
    return found[0]


def _refuse(algos: dict[str, str], name: str, expanding: bool) -> None:
    """One error for all modules no plain LoRA stands for, or for LoHa / LoKr modules when not expanding."""
    counts = Counter(algos.values())
    refused = [(kind, why) for kind, _, why in REFUSED if counts[kind]]
    if refused:
        example = next(m for m, a in algos.items() if a == refused[0][0])
        shown = "; ".join(f"{kind}: {counts[kind]} module(s) ({why})" for kind, why in refused)
        raise AdapterFormatError(f"adapter {name!r}: modules that are not additive low-rank updates, which no plain "
                                 f"LoRA can stand for without the base model: {shown}; e.g. module {example!r}")
    lycoris_counts = [f"{ALGOS[a][0]}: {counts[a]} module(s)" for a in ("loha", "lokr") if counts[a]]
    if lycoris_counts and not expanding:
        raise AdapterFormatError(
            f"adapter {name!r}: LyCORIS modules that are not plain LoRA ({', '.join(lycoris_counts)}); read them "
            "with --expand / expand=True (exact: a plain LoRA of rank r^2 for LoHa, rank(w1) * rank(w2) for LoKr) "
            "or --expand-rank K / expand_rank=K (their best rank-K approximation, by a truncated SVD)")


def _layout(algo: str, parts: dict[str, TensorInfo], where: str) -> lycoris.Layout:
    """What a module's shapes say (delta shape, kernel, exact rank, the rank alpha divides by); checks them."""
    shapes = {suffix: info.shape for suffix, info in parts.items()}
    try:
        layout = {"lora": updown.layout, "loha": lycoris.loha_layout, "lokr": lycoris.lokr_layout}[algo](shapes)
    except ValueError as error:
        raise AdapterFormatError(f"{where}: {error}") from None
    if min(layout.shape) < 1 or layout.rank < 1:
        raise AdapterFormatError(f"{where}: empty factors ({ALGOS[algo][0]} shapes {shapes}); expected sizes >= 1")
    return layout


def _module(module: str, algo: str, parts: dict[str, TensorInfo], layout: lycoris.Layout, family: str | None,
            expand_rank: int | None, fetch: Callable[[TensorInfo], torch.Tensor], name: str) -> _Module:
    """The module's kind (conv kernel), scale (read from its alpha) and the info of the factors it reads as."""
    shape, kernel, rank, dim = layout.shape, layout.kernel, layout.rank, layout.dim
    if kernel is None and algo != "lora":
        kernel = _flat_kernel(module, shape[1], family)
    kind = conv_kind(kernel) if kernel is not None else "linear"
    where = f"adapter {name!r}, module {module!r}"
    scale = updown.scale(updown.read_alpha(parts.get("alpha"), fetch, where), dim)
    if algo != "lora":
        rank = lycoris.plain_rank(rank, shape, expand_rank)
    return _Module(algo, parts, ModuleInfo(shape, rank, kind), scale)


def _flat_kernel(module: str, d_in: int, family: str | None) -> tuple[int, int] | None:
    """The kernel of a LyCORIS convolution whose tensors flattened it, from its lora_name (see _FLAT_CONVS)."""
    if not module.startswith("lora_unet_") or family == "flux":
        return None
    candidates = [kernel for pattern, kernel in _FLAT_CONVS if pattern.search(module)]
    if family == "sd1" and _SD1_PROJ.search(module):
        candidates.append((1, 1))
    kernel = candidates[0] if candidates else None
    return kernel if kernel is not None and d_in % (kernel[0] * kernel[1]) == 0 else None


def _read_factors(module: _Module, expand_rank: int | None, fetch: Callable[[TensorInfo], torch.Tensor],
                  where: str) -> LoraFactors:
    """Read one module's tensors as float32, make its plain factors with the scale folded in, check them."""
    tensors = {}
    for suffix, info in module.parts.items():
        if suffix != "alpha":
            tensors[suffix] = fetch(info).to(torch.float32)
            if not torch.isfinite(tensors[suffix]).all():
                raise AdapterFormatError(f"{where}: {suffix} contains NaN or Inf")
    plain = {"lora": updown.plain_factors, "loha": lycoris.loha_factors, "lokr": lycoris.lokr_factors}[module.algo]
    A, B = plain(tensors)
    scaled = scale_factors(LoraFactors(A.contiguous(), B.contiguous(), module.info.kind), module.scale, in_place=True)
    factors = scaled if module.algo == "lora" else lycoris.to_plain(scaled.A, scaled.B, module.info.kind, expand_rank)
    check_factor_values(factors, f"{where} (scale {module.scale:g} folded in)")
    return factors


def write(adapter: Adapter, path: Path, *, dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write `adapter` (kohya-named modules) as a kohya LoRA / LoCon .safetensors file, atomically.

    Per module lora_down.weight (r, d_in) or (r, c_in, kh, kw), lora_up.weight (d_out, r) or (d_out, r, 1, 1),
    one alpha for the file (`kohya_write.file_alpha`; B carries r / alpha), in `dtype` (default: the inputs').
    Keys sorted (safetensors' own order), one module in memory at a time; header from
    `kohya_write.output_metadata` with sd-scripts' sshs hashes. Raises AdapterFormatError for a module name that
    is not a lora_name, an embedding LoRA or a rank-0 module, OutputError for an existing path (unless
    `overwrite`), a folder or an input.
    """
    path = Path(path)
    target = output_dtype(adapter, dtype)
    entries = kohya_write.file_entries(adapter, target)
    ranks, kinds = dict(adapter.ranks), {module: adapter.info(module).kind for module in adapter}
    alpha = kohya_write.file_alpha(ranks)
    produce = module_producer(adapter, updown.SUFFIXES, lambda module, factors: updown.module_tensors(
        factors, target, alpha, f"output {str(path)!r}, module {module!r}"))
    metadata = kohya_write.output_metadata(adapter, path, ranks, kinds)
    return kohya_write.write_hashed(adapter, path, entries, produce, metadata, overwrite=overwrite)
