"""Random adapters for tests that do not need PEFT: factors from an explicit generator."""

from __future__ import annotations

import torch

from lora_lego.types import Adapter, LoraFactors

SHAPES = {"q_proj": (24, 16), "v_proj": (8, 16), "down_proj": (16, 40)}  # module type -> (d_out, d_in)


def random_factors(d_out: int, d_in: int, rank: int, generator: torch.Generator) -> LoraFactors:
    return LoraFactors(torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator))


def random_adapter(name: str, rank: int = 4, *, seed: int = 0, layers: int = 2,
                   types: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")) -> Adapter:
    """An adapter over `layers` layers and the given module types, all of rank `rank`."""
    generator = torch.Generator().manual_seed(seed)
    modules = {
        f"model.layers.{layer}.{kind}": random_factors(*SHAPES[kind], rank, generator)
        for layer in range(layers)
        for kind in types
    }
    return Adapter(modules, {"base_model_name_or_path": "tiny", "dtype": "float32"}, name=name)


def dense_sum(adapters: list[Adapter], module: str, weights: list[float] | None = None) -> torch.Tensor:
    """sum_t w_t B_t A_t of one module, densely (reference for tests)."""
    weights = weights or [1.0] * len(adapters)
    return sum(w * a[module].delta().double() for a, w in zip(adapters, weights) if module in a)


def random_calibrations(adapters: list[Adapter], seed: int = 0, tokens: int = 64) -> list:
    """One in-memory `Calibration` per adapter (for methods that need one): for each of its linear modules the
    Gram X^T X of `tokens` random inputs (full rank when tokens >= d_in), from an explicit generator."""
    from lora_lego import Calibration

    generator = torch.Generator().manual_seed(seed)
    calibrations = []
    for index, adapter in enumerate(adapters):
        grams = {}
        for module in adapter:
            x = torch.randn(tokens, adapter.info(module).shape[1], generator=generator)
            grams[module] = x.T @ x
        calibrations.append(Calibration(grams, {m: m for m in grams}, tokens, {"model_fingerprint": "synthetic"},
                                        name=f"calibration-{index}"))
    return calibrations


def calibration_for(method: str, adapters: list[Adapter], seed: int = 0) -> dict:
    """{"calibration": random_calibrations(adapters)} for a method that needs calibration, else {}."""
    from lora_lego import get_method

    return {"calibration": random_calibrations(adapters, seed)} if get_method(method).needs_calibration else {}
