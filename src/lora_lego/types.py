"""The two data types of lora-lego: the factors of one LoRA module and an adapter (module path -> factors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

KINDS = ("linear", "embedding")


@dataclass(frozen=True)
class LoraFactors:
    """The LoRA of one module, with its scale already folded in: delta = B @ A.

    A is of shape (r, d_in), B of shape (d_out, r). For an embedding LoRA, d_in is the number of
    embeddings and d_out the embedding size (PEFT's lora_embedding_A / lora_embedding_B), so the
    embedding weight's update is delta.T.
    """

    A: torch.Tensor
    B: torch.Tensor
    kind: str = "linear"

    def __post_init__(self) -> None:
        if self.A.ndim != 2 or self.B.ndim != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(f"LoraFactors needs A (r, d_in) and B (d_out, r); got A {tuple(self.A.shape)}, B {tuple(self.B.shape)}")
        if self.kind not in KINDS:
            raise ValueError(f"LoraFactors kind must be one of {KINDS}, got {self.kind!r}")

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
        return self.modules.info(module) if isinstance(self.modules, LazyModules) else ModuleInfo.of(self.modules[module])

    @property
    def ranks(self) -> Mapping[str, int]:
        return {m: self.info(m).rank for m in self.modules}

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    def num_parameters(self) -> int:
        return sum(i.rank * (i.shape[0] + i.shape[1]) for i in map(self.info, self.modules))
