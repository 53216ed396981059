"""The two data types of lora-lego: the factors of one LoRA module and an adapter (module path -> factors)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .errors import AdapterFormatError

KINDS = ("linear", "embedding")  # and "conv{kh}x{kw}" (see conv_kind)
_CONV = re.compile(r"^conv(\d+)x(\d+)$")
MAX_ABS = 1e8  # largest |entry| of a factor (scale folded in); real LoRAs stay below ~1e2


def conv_kind(kernel: tuple[int, int]) -> str:
    """The kind of a 2-D convolution LoRA with kernel (kh, kw), e.g. "conv3x3"."""
    kh, kw = kernel
    return f"conv{kh}x{kw}"


def kernel_size(kind: str) -> tuple[int, int] | None:
    """(kh, kw) of a convolution kind, None for "linear" and "embedding"."""
    match = _CONV.match(kind)
    return (int(match[1]), int(match[2])) if match else None


def is_valid_kind(kind: object) -> bool:
    return isinstance(kind, str) and (kind in KINDS or (kernel_size(kind) is not None and min(kernel_size(kind)) >= 1))


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA of one module, with its scale already folded in: delta = B @ A.

    A is of shape (r, d_in), B of shape (d_out, r). For an embedding LoRA, d_in is the number of
    embeddings and d_out the embedding size (PEFT's lora_embedding_A / lora_embedding_B), so the
    embedding weight's update is delta.T. A convolution LoRA (kind "conv{kh}x{kw}") is a linear LoRA on
    the unfolded weight: A (r, c_in * kh * kw) is lora_down flattened, B (c_out, r) is lora_up, and the
    weight's update is delta.reshape(c_out, c_in, kh, kw).
    """

    A: torch.Tensor
    B: torch.Tensor
    kind: str = "linear"

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"LoraFactors needs A (r, d_in) and B (d_out, r); "
                             f"got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}")
        if not is_valid_kind(self.kind):
            raise ValueError(f"LoraFactors kind must be one of {KINDS} or 'conv<kh>x<kw>', got {self.kind!r}")
        kernel = kernel_size(self.kind)
        if kernel is not None and self.A.shape[1] % (kernel[0] * kernel[1]):
            raise ValueError(f"a {self.kind} LoraFactors needs d_in divisible by {kernel[0] * kernel[1]}; "
                             f"got A {tuple(self.A.shape)}")

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in): the shape of the module's delta."""
        return (self.d_out, self.d_in)

    def delta(self) -> torch.Tensor:
        """The dense update B @ A, of shape (d_out, d_in). For tests and small modules only."""
        return self.B @ self.A

    def to(self, device: torch.device | str) -> "LoraFactors":
        """The same factors on `device` (self when they are there already)."""
        if self.A.device == torch.device(device) and self.B.device == torch.device(device):
            return self
        return LoraFactors(self.A.to(device), self.B.to(device), self.kind)


@dataclass(frozen=True)
class ModuleInfo:
    """What is known of a module without reading its factors: delta shape (d_out, d_in), rank and kind."""

    shape: tuple[int, int]
    rank: int
    kind: str = "linear"

    @classmethod
    def of(cls, factors: LoraFactors) -> "ModuleInfo":
        return cls(factors.shape, factors.rank, factors.kind)


class LazyModules(Mapping[str, LoraFactors]):
    """Module path -> factors read on each access by `read(module)` (never cached), so a merge that
    walks the modules one at a time holds one module per adapter in memory. `infos` are known up front."""

    def __init__(self, infos: Mapping[str, ModuleInfo], read: Callable[[str], LoraFactors]):
        self._infos, self._read = dict(infos), read

    def __getitem__(self, module: str) -> LoraFactors:
        if module not in self._infos:
            raise KeyError(module)
        return self._read(module)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, module: object) -> bool:
        return module in self._infos

    def info(self, module: str) -> ModuleInfo:
        return self._infos[module]


@dataclass
class Adapter:
    """An ordered mapping module path -> `LoraFactors`, plus metadata.

    Module paths are those of the base model (e.g. "model.layers.0.self_attn.q_proj"), without
    PEFT's "base_model.model." prefix. `metadata` holds what is carried to the output, e.g.
    "base_model_name_or_path", "task_type", "fan_in_fan_out", "provenance"; `name` says where the adapter came from
    (its folder) for error messages and reports.
    """

    modules: Mapping[str, LoraFactors]  # a dict, or LazyModules (read from disk module by module)
    metadata: dict[str, Any] = field(default_factory=dict)
    name: str = "<adapter>"

    def __getitem__(self, module: str) -> LoraFactors:
        return self.modules[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __contains__(self, module: object) -> bool:
        return module in self.modules

    def items(self):
        return self.modules.items()

    @property
    def lazy(self) -> bool:
        """True when factors are read from disk on each access (load_adapter(..., lazy=True))."""
        return isinstance(self.modules, LazyModules)

    def info(self, module: str) -> ModuleInfo:
        """Shape, rank and kind of a module, without reading a lazy adapter's factors."""
        if isinstance(self.modules, LazyModules):
            return self.modules.info(module)
        return ModuleInfo.of(self.modules[module])

    @property
    def ranks(self) -> Mapping[str, int]:
        return {m: self.info(m).rank for m in self.modules}

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def num_parameters(self) -> int:
        return sum(i.rank * (i.shape[0] + i.shape[1]) for i in map(self.info, self.modules))


def check_factor_values(factors: LoraFactors, where: str) -> None:
    """Refuse factors with NaN / Inf or entries above MAX_ABS: their products would overflow float32.

    `where` names the adapter and module ("adapter 'x', module 'y'"). One pass per factor: NaN
    propagates through the min / max, and so does Inf. Raises AdapterFormatError.
    """
    for side, tensor in (("A", factors.A), ("B", factors.B)):
        if not tensor.numel():
            continue
        low, high = torch.aminmax(tensor)
        peak = max(-float(low), float(high))
        if peak <= MAX_ABS:  # False for NaN
            continue
        if not torch.isfinite(tensor).all():
            raise AdapterFormatError(f"{where}: lora_{side} contains NaN or Inf")
        raise AdapterFormatError(f"{where}: lora_{side} has entries up to {peak:.3g}; expected |values| <= "
                                 f"{MAX_ABS:g} (larger ones make float32 products overflow)")


# Where adapters come from is the format layer's knowledge: `formats` registers, on import, how to refuse
# adapters that no merge can combine (another base model, another module naming) and what a merge of them
# keeps for the writers (the first's format, kohya headers, a GGUF base config...). merge and provenance
# ask through these two functions and read no format's metadata keys themselves.
_ORIGINS: list[tuple[Callable[[Sequence["Adapter"]], None], Callable[[Sequence["Adapter"]], dict[str, Any]]]] = []


def register_origins(check: Callable[[Sequence[Adapter]], None],
                     carry: Callable[[Sequence[Adapter]], dict[str, Any]]) -> None:
    """Add `check(adapters)` (raises IncompatibleAdaptersError) and `carry(adapters)` (metadata to keep)."""
    _ORIGINS.append((check, carry))


def check_origins(adapters: Sequence[Adapter]) -> None:
    """Refuse adapters that cannot be merged, by the rules the format layer registered."""
    for check, _ in _ORIGINS:
        check(adapters)


def carried_metadata(adapters: Sequence[Adapter]) -> dict[str, Any]:
    """The metadata a merge of `adapters` keeps for the writers, as the format layer registered it."""
    carried: dict[str, Any] = {}
    for _, carry in _ORIGINS:
        carried.update(carry(adapters))
    return carried
