"""Time a `lego` merge of Llama-2-7B-shaped adapters held in memory (no disk I/O), module by module,
against scikit-learn's KMeans on the same pools (same k, n_init=10). Not a test: prints a table.

    python benchmarks/lego_pool.py --adapters 8 --rank 16 --layers 32 [--sklearn-layers 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lora_lego as ll
from lora_lego.kmeans import kmeans
from lora_lego.lowrank import concat_factors, to_units
from lora_lego.types import Adapter, LoraFactors

HIDDEN, INTER = 4096, 11008
SHAPES = {  # module type -> (d_out, d_in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def synthetic_adapter(index: int, rank: int, layers: int) -> Adapter:
    """Random factors with a decaying spectrum (rank i scaled by 1/(1+i)), seeded per adapter."""
    generator = torch.Generator().manual_seed(1000 + index)
    decay = (1.0 / torch.arange(1, rank + 1, dtype=torch.float32)).sqrt()
    modules = {}
    for layer in range(layers):
        for kind, (d_out, d_in) in SHAPES.items():
            A = torch.randn(rank, d_in, generator=generator) * decay[:, None] / d_in**0.5
            B = torch.randn(d_out, rank, generator=generator) * decay[None, :] * 0.01
            modules[f"model.layers.{layer}.{kind}"] = LoraFactors(A, B)
    return Adapter(modules, {"dtype": "bfloat16"}, name=f"adapter{index}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sklearn-layers", type=int, default=1, help="layers timed with scikit-learn (0: skip)")
    args = parser.parse_args()
    adapters = [synthetic_adapter(i, args.rank, args.layers) for i in range(args.adapters)]
    modules = len(adapters[0])
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        merged = ll.merge(adapters, "lego", rank=args.rank, seed=0)
        times.append(time.perf_counter() - start)
    lego_time = statistics.median(times)
    error = statistics.mean(entry["relative_error"] for entry in merged.metadata["report"].values())
    print(f"{args.adapters} adapters x r{args.rank}, {modules} modules, k={args.rank}, n_init=10")
    print(f"lego merge (incl. report): median {lego_time:.2f} s over {args.repeats} runs "
          f"({1000 * lego_time / modules:.1f} ms/module), mean relative error {error:.3f}")
    if args.sklearn_layers:
        from sklearn.cluster import KMeans

        names = list(adapters[0])[: args.sklearn_layers * len(SHAPES)]
        ours, theirs, ratio = 0.0, 0.0, []
        for name in names:
            units = to_units(concat_factors([a[name] for a in adapters]))
            start = time.perf_counter()
            result = kmeans(units, args.rank, generator=torch.Generator().manual_seed(0))
            ours += time.perf_counter() - start
            start = time.perf_counter()
            reference = KMeans(args.rank, n_init=10, random_state=0).fit(units.numpy())
            theirs += time.perf_counter() - start
            ratio.append(result.inertia / reference.inertia_)
        scale = modules / len(names)
        print(f"K-means only, {len(names)} modules: ours {ours:.2f} s, scikit-learn {theirs:.2f} s "
              f"(x{theirs / ours:.0f}); extrapolated to {modules} modules: "
              f"{ours * scale:.1f} s vs {theirs * scale:.0f} s; "
              f"inertia ours/sklearn mean {statistics.mean(ratio):.4f}, max {max(ratio):.4f}")


if __name__ == "__main__":
    main()
