"""The two data types of lora-lego: the factors of one LoRA module and an adapter (module path -> factors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

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


@dataclass
class Adapter:
    """An ordered mapping module path -> `LoraFactors`, plus metadata.

    Module paths are those of the base model (e.g. "model.layers.0.self_attn.q_proj"), without
    PEFT's "base_model.model." prefix. `metadata` holds what is carried to the output, e.g.
    "base_model_name_or_path", "task_type", "fan_in_fan_out", "provenance"; `name` says where the adapter came from
    (its folder) for error messages and reports.
    """

    modules: dict[str, LoraFactors]
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
    def ranks(self) -> Mapping[str, int]:
        return {m: f.rank for m, f in self.modules.items()}

    @property
    def max_rank(self) -> int:
        return max((f.rank for f in self.modules.values()), default=0)

    def num_parameters(self) -> int:
        return sum(f.A.numel() + f.B.numel() for f in self.modules.values())
