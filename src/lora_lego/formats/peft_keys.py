"""PEFT's tensor keys, read one way for PEFT folders and diffusers files: "<module>.lora_A.weight" and
".lora_B.weight" (embeddings: ".lora_embedding_A" / "_B"), optionally under "base_model.model.", plus
diffusers' "<module>.alpha"; grouped per module, checked from dtypes and shapes, then read as float32
factors with the module's scale folded in."""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch

from ..errors import AdapterFormatError, some
from ..lowrank import scale_factors
from ..types import LoraFactors, ModuleInfo, check_factor_values, conv_kind

PREFIX = "base_model.model."  # PeftModel's own prefix, kept in its weights files
PARTS = {"lora_A.weight": ("A", "linear"), "lora_B.weight": ("B", "linear"), "lora_embedding_A": ("A", "embedding"),
         "lora_embedding_B": ("B", "embedding"), "alpha": ("alpha", None)}
KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|alpha)$")
DORA = re.compile(r"\.(lora_magnitude_vector|dora_scale)(\.|$)")
BIAS = re.compile(r"\.lora_B(\.[^.]+)?\.bias$")
Groups = dict[str, dict[str, Any]]  # module -> {"A", "B", optionally "alpha": entry; "kind": "linear" | "embedding"}


def factor_keys(kind: str) -> tuple[str, str]:
    """The key endings of A and B for a module of this kind."""
    return ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")


def is_key(key: str, *, alpha: bool = True) -> bool:
    """A LoRA factor key (or, with `alpha`, an alpha key) of a dotted module path."""
    match = KEY.match(key)
    return match is not None and (alpha or match["part"] != "alpha")


def group_keys(entries: Mapping[str, Any], name: str, *, known: Callable[[str], bool], expected: str,
               ignore: frozenset[str] = frozenset()) -> tuple[Groups, bool]:
    """Keys -> {module: {"A", "B", "alpha": entry, "kind": ...}} and whether PEFT's prefix was stripped.

    `entries` are tensors or header infos (dtype and shape); keys in `ignore` are left out. Refuses DoRA,
    lora bias, keys that are not `known` (the message says they are not `expected`), a module with both
    linear and embedding keys, and a key given with and without the prefix.
    """
    dora = [key for key in entries if DORA.search(key)]
    if dora:
        raise AdapterFormatError(f"adapter {name!r}: DoRA magnitude vectors are not supported ({some(dora)}); "
                                 "DoRA needs the base weights, so it is not an additive low-rank update")
    bias = [key for key in entries if BIAS.search(key)]
    if bias:
        raise AdapterFormatError(f"adapter {name!r}: lora_bias tensors are not supported ({some(bias)})")
    unknown = [key for key in entries if key not in ignore and not known(key)]
    if unknown:
        raise AdapterFormatError(f"adapter {name!r}: tensor keys that are not {expected}: {some(unknown)}")
    groups: Groups = {}
    prefixed = False
    for key, entry in entries.items():
        match = KEY.match(key)
        if key in ignore or match is None:
            continue
        module = match["module"]
        if module.startswith(PREFIX):
            module, prefixed = module[len(PREFIX):], True
        side, kind = PARTS[match["part"]]
        parts = groups.setdefault(module, {})
        if kind is not None and parts.setdefault("kind", kind) != kind:
            raise AdapterFormatError(f"adapter {name!r}, module {module!r}: mixes linear and embedding LoRA keys")
        if side in parts:
            raise AdapterFormatError(f"adapter {name!r}, module {module!r}: two {match['part']} tensors "
                                     f"(with and without the {PREFIX!r} prefix)")
        parts[side] = entry
    return groups, prefixed


def check_parts(module: str, parts: dict[str, Any], name: str, *, conv: bool) -> ModuleInfo:
    """One module's entries (dtype and shape only) -> its ModuleInfo, or AdapterFormatError.

    A (r, d_in) and B (d_out, r); with `conv` also PEFT's conv layout, A (r, c_in, kh, kw) and
    B (c_out, r, 1, 1), read as kind "conv{kh}x{kw}" on the unfolded weight (d_in = c_in * kh * kw).
    """
    where = f"adapter {name!r}, module {module!r}"
    for side, other in (("A", "B"), ("B", "A")):
        if side not in parts:
            has = f"lora_{other}" if other in parts else "an alpha"
            raise AdapterFormatError(f"{where}: has {has} but no lora_{side}; expected both lora_A and lora_B")
        if not parts[side].dtype.is_floating_point:
            raise AdapterFormatError(f"{where}: lora_{side} has dtype {parts[side].dtype}; expected a float tensor")
    a_shape, b_shape = tuple(parts["A"].shape), tuple(parts["B"].shape)
    kind = parts["kind"]
    if conv and len(a_shape) == 4 and len(b_shape) == 4 and kind == "linear":
        if b_shape[2:] != (1, 1):
            raise AdapterFormatError(f"{where}: conv lora_B has shape {b_shape}; expected (c_out, r, 1, 1)")
        kind = conv_kind(a_shape[2:])
        a_shape, b_shape = (a_shape[0], a_shape[1] * a_shape[2] * a_shape[3]), b_shape[:2]
    elif len(a_shape) != 2 or len(b_shape) != 2:
        allowed = ("2-D (r, d_in) and (d_out, r), or 4-D conv (r, c_in, kh, kw) and (c_out, r, 1, 1)" if conv else
                   "2-D (r, d_in) and (d_out, r): a PEFT folder holds linear or embedding LoRA here (convolution "
                   "LoRA is read from kohya / LyCORIS and diffusers files)")
        raise AdapterFormatError(f"{where}: lora_A has shape {a_shape} and lora_B {b_shape}; expected {allowed}")
    if a_shape[0] != b_shape[1]:
        raise AdapterFormatError(f"{where}: lora_A has shape {tuple(parts['A'].shape)} and lora_B "
                                 f"{tuple(parts['B'].shape)}; expected the same rank r (A rows, B columns; "
                                 "expected (r, d_in) and (d_out, r))")
    if a_shape[0] == 0:
        raise AdapterFormatError(f"{where}: rank 0 (lora_A has shape {a_shape}); expected r >= 1")
    if min(a_shape[1], b_shape[0]) < 1:
        raise AdapterFormatError(f"{where}: lora_A has shape {a_shape} and lora_B {b_shape}; "
                                 "expected d_in >= 1 and d_out >= 1")
    return ModuleInfo((b_shape[0], a_shape[1]), a_shape[0], kind)


def read_factors(parts: dict[str, Any], kind: str, scaling: float, fetch: Callable[[Any], torch.Tensor],
                 where: str) -> LoraFactors:
    """One module's factors as float32, A (r, d_in) and B (d_out, r) (conv ones unfolded), with the scale
    folded in (sqrt(|scaling|) on each, the sign on A); values checked."""
    A = fetch(parts["A"]).to(torch.float32)
    B = fetch(parts["B"]).to(torch.float32)
    A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1])  # conv: (r, c_in*kh*kw), (c_out, r)
    factors = scale_factors(LoraFactors(A, B, kind), scaling, in_place=True)
    check_factor_values(factors, f"{where} (scaling {scaling:g} folded in)")
    return factors
