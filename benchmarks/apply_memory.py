"""Peak memory (and time) of `apply_adapter` on a Llama-2-7B-shaped checkpoint with random weights. Not a test.

    python benchmarks/apply_memory.py [--layers 32] [--dtype bf16] [--shard-gb 4] [--rank 16]
                                      [--out-dtype bf16|fp16|fp32] [--scratch DIR] [--keep] [--json out.json]

1. Writes a random checkpoint with Llama-2-7B's shapes (hidden 4096, MLP 11008, vocab 32000, `--layers`
   decoder layers; 13.5 GB in bf16 for 32) as transformers names and shards it ("model-0000i-of-0000N",
   an index), one tensor at a time with `TensorWriter`, plus config.json; no transformers needed.
2. Saves a random rank-`--rank` PEFT adapter on q, k, v, o, gate, up and down of every layer.
3. Runs `apply_adapter` in a child process, so building the inputs does not count, and reports the child's
   peak resident memory (ru_maxrss) against the largest shard. Target: peak < largest shard + 1 GiB (the
   fold holds one tensor at a time, so the peak should not grow with the shard size at all).
4. Checks one folded tensor against W + B @ A, then deletes the scratch folder unless --keep.
Check free disk first: the base and the output each take the checkpoint's size.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import lora_lego as ll
from lora_lego.outputs import dtype_from_name
from lora_lego.tensorfile import TensorWriter, read_header, read_tensor
from lora_lego.types import Adapter, LoraFactors

HIDDEN, MLP, VOCAB = 4096, 11008, 32000
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
          "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
          "mlp.gate_proj": (MLP, HIDDEN), "mlp.up_proj": (MLP, HIDDEN), "mlp.down_proj": (HIDDEN, MLP)}
GB = 2**30  # figures are printed in GiB


def checkpoint_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a LlamaForCausalLM state dict with Llama-2-7B's sizes, in transformers' order."""
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        shapes[prefix + "input_layernorm.weight"] = (HIDDEN,)
        shapes.update({f"{prefix}{name}.weight": shape for name, shape in SHAPES.items()})
        shapes[prefix + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_checkpoint(folder: Path, layers: int, dtype: torch.dtype, shard_bytes: int) -> list[int]:
    """Random weights (normal, std 0.02) sharded greedily to at most `shard_bytes`; returns each shard's size."""
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    for key, shape in checkpoint_shapes(layers).items():
        size = math.prod(shape) * dtype.itemsize
        if groups[-1] and sum(math.prod(s) for s in groups[-1].values()) * dtype.itemsize + size > shard_bytes:
            groups.append({})
        groups[-1][key] = shape
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    weight_map, sizes = {}, []
    for number, group in enumerate(groups, 1):
        name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        layout = {key: (dtype, shape) for key, shape in group.items()}
        with TensorWriter(folder / name, layout, {"format": "pt"}) as writer:
            for key, shape in group.items():
                writer.write(key, torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=generator))
                weight_map[key] = name
        sizes.append((folder / name).stat().st_size)
    total = sum(math.prod(s) for s in checkpoint_shapes(layers).values()) * dtype.itemsize
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": VOCAB, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return sizes


def write_adapter(folder: Path, layers: int, rank: int) -> None:
    generator = torch.Generator().manual_seed(1)
    modules = {}
    for layer in range(layers):
        for name, (d_out, d_in) in SHAPES.items():
            A = torch.randn(rank, d_in, generator=generator) / d_in**0.5
            B = torch.randn(d_out, rank, generator=generator) * 0.01
            modules[f"model.layers.{layer}.{name}"] = LoraFactors(A.bfloat16().float(), B.bfloat16().float())
    ll.save_adapter(Adapter(modules, {"dtype": "bfloat16"}, name="random"), folder)


def child(base: str, adapter: str, output: str, out_dtype: str | None) -> None:
    """Run in the measured process: apply, then print the figures as one JSON line."""
    from lora_lego.deploy.apply import apply_adapter

    with open("/proc/self/statm") as stream:
        before = int(stream.read().split()[1]) * 4096
    started = time.perf_counter()
    apply_adapter(adapter, base, output, dtype=out_dtype, progress=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"rss_after_imports": before, "peak_rss": peak, "apply_s": time.perf_counter() - started}))


def check_one(base: Path, adapter: Path, output: Path) -> float:
    """Largest |out - (W + B @ A)| of layer 0's down_proj, in units of the output dtype's rounding at |W|max."""
    key, module = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj"
    shard = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][key]
    W = read_tensor(base / shard, read_header(base / shard)[0][key]).float()
    out = read_tensor(output / shard, read_header(output / shard)[0][key])
    factors = ll.load_adapter(adapter)[module]
    expected = W + factors.B @ factors.A
    return float((out.float() - expected).abs().max() / (torch.finfo(out.dtype).eps * expected.abs().max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--dtype", default="bf16", help="checkpoint dtype (default bf16)")
    parser.add_argument("--out-dtype", help="apply's output dtype (default: the checkpoint's)")
    parser.add_argument("--shard-gb", type=float, default=4.0, help="largest shard size in GiB (default 4)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--scratch", help="folder for the checkpoints (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--child", nargs=4, metavar=("BASE", "ADAPTER", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child[:3], None if args.child[3] == "-" else args.child[3])
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="apply-memory-"))
    base, adapter, output = scratch / "base", scratch / "adapter", scratch / "out"
    result = {"python": platform.python_version(), "torch": torch.__version__, "cpus": torch.get_num_threads(),
              **{k: v for k, v in vars(args).items() if k not in ("json", "child")}}
    try:
        started = time.perf_counter()
        sizes = write_checkpoint(base, args.layers, dtype_from_name(args.dtype), int(args.shard_gb * GB))
        write_adapter(adapter, args.layers, args.rank)
        result.update(build_s=time.perf_counter() - started, shards=len(sizes), checkpoint_bytes=sum(sizes),
                      largest_shard_bytes=max(sizes))
        command = [sys.executable, __file__, "--child", str(base), str(adapter), str(output), args.out_dtype or "-"]
        finished = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        result.update(json.loads(finished.stdout.strip().splitlines()[-1]))
        result["output_bytes"] = sum(p.stat().st_size for p in output.glob("*.safetensors"))
        result["peak_over_imports_bytes"] = result["peak_rss"] - result["rss_after_imports"]
        result["target_bytes"] = result["largest_shard_bytes"] + GB
        result["within_target"] = result["peak_rss"] < result["target_bytes"]
        result["throughput_gib_s"] = sum(sizes) / GB / result["apply_s"]
        result["check_down_proj_eps"] = check_one(base, adapter, output)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    for key, value in result.items():
        print(f"{key}: {value / GB:.2f} GiB" if "rss" in key or key.endswith("bytes") else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
