"""Write three small synthetic PEFT adapters shaped like LoRAs of SmolLM2-135M (q_proj/v_proj of 30 layers, r=4, bf16).

They are random but structured like real task LoRAs that share some skills: each adapter's rank-one
units are drawn around a few directions shared by all adapters plus directions of its own, so a
clustering merge has something to find. They exist for the quick start and the CLI; they are not
trained adapters (the benchmark issue replaces them with real ones).

    python examples/make_synthetic.py examples/synthetic
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lora_lego import Adapter, LoraFactors, save_adapter

HIDDEN, KV, LAYERS, RANK = 576, 192, 30, 4
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (KV, HIDDEN)}  # (d_out, d_in)


def unit_directions(d_out: int, d_in: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random units [a ; b] of shape (count, d_in + d_out), with entries of a trained LoRA's size."""
    return torch.randn(count, d_in + d_out, generator=generator) * 0.02


def make_adapter(task: int, shared: dict[str, torch.Tensor], generator: torch.Generator) -> Adapter:
    modules = {}
    for layer in range(LAYERS):
        for kind, (d_out, d_in) in SHAPES.items():
            name = f"model.layers.{layer}.{kind}"
            own = unit_directions(d_out, d_in, RANK, generator)
            # two of the four ranks lean on directions every task shares, with task-specific noise
            units = own.clone()
            units[:2] = shared[name][:2] + 0.3 * own[:2]
            sign = torch.where(torch.rand(RANK, generator=generator) < 0.5, -1.0, 1.0)[:, None]
            units = units * sign  # the same update can appear as (b, a) or (-b, -a)
            modules[name] = LoraFactors(units[:, :d_in].contiguous(), units[:, d_in:].T.contiguous())
    metadata = {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "task_type": "CAUSAL_LM",
                "dtype": "bfloat16"}
    return Adapter(modules, metadata, name=f"task{task}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path, help="folder that receives task_a, task_b, task_c")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(2409)
    shared = {f"model.layers.{layer}.{kind}": unit_directions(d_out, d_in, 2, generator)
              for layer in range(LAYERS) for kind, (d_out, d_in) in SHAPES.items()}
    for task, name in enumerate(["task_a", "task_b", "task_c"]):
        adapter = make_adapter(task, shared, generator)
        save_adapter(adapter, args.output / name, overwrite=True)
        print(f"wrote {args.output / name}")


if __name__ == "__main__":
    main()
