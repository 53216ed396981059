"""Speed and memory of merging Llama-2-7B-shaped PEFT adapters read from disk (issue 6). Not a test.

    python benchmarks/speed.py [--scratch DIR] [--reps 5] [--workloads base many mixed] [--no-peft]
                               [--device cpu|cuda] [--markdown docs/performance.md]

Workloads (generated once into --scratch, seeded): `base` 8 adapters r=16 alpha=32 bf16 over q/k/v/o/
gate/up/down of 32 layers (224 modules); `many` 64 such adapters; `mixed` 8 adapters of ranks
4..32 and alphas 8..64. Each measurement runs in a fresh process (imports not timed, page cache warm
after the first read) and reports the median of --reps wall times (the floor: the fastest, as it is a
lower bound) and the process's peak resident memory. Rows: the I/O floor (read every input tensor into
float32, write one rank-16 adapter), `lora-lego merge` with lego / task_arithmetic / ties -p space=core / tsv /
iso_c / ctm (the CLI end to end), ties (dense per module, timed on layer 0 and extrapolated to 32 layers) and
PEFT's add_weighted_adapter (benchmarks/speed_peft.py, timed on one module of each shape and extrapolated).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HIDDEN, INTER, LAYERS = 4096, 11008, 32
SHAPES = {  # module type -> (d_out, d_in)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN), "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}
WORKLOADS = {  # name -> list of (rank, alpha) per adapter
    "base": [(16, 32)] * 8,
    "many": [(16, 32)] * 64,
    "mixed": [(4, 8), (8, 16), (16, 32), (32, 64), (8, 8), (16, 16), (32, 32), (16, 64)],
}


def write_adapter(folder: Path, index: int, rank: int, alpha: int) -> None:
    """One PEFT LoRA folder of random bf16 factors with a decaying spectrum, seeded by `index`."""
    generator = torch.Generator().manual_seed(1000 + index)
    decay = (1.0 / torch.arange(1, rank + 1, dtype=torch.float32)).sqrt()
    tensors = {}
    for layer in range(LAYERS):
        for kind, (d_out, d_in) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{kind}"
            A = torch.randn(rank, d_in, generator=generator) * decay[:, None] / d_in**0.5
            B = torch.randn(d_out, rank, generator=generator) * decay[None, :] * 0.01
            tensors[f"{key}.lora_A.weight"] = A.to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = B.to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
              "target_modules": sorted(k.split(".")[-1] for k in SHAPES),
              "task_type": "CAUSAL_LM", "base_model_name_or_path": "synthetic/llama-2-7b-shapes", "bias": "none",
              "fan_in_fan_out": False, "lora_dropout": 0.0, "use_rslora": False}
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def workload(scratch: Path, name: str) -> list[Path]:
    """The workload's adapter folders, generated on first use (a finished folder has its config)."""
    folders = []
    for index, (rank, alpha) in enumerate(WORKLOADS[name]):
        folder = scratch / "adapters" / f"r{rank}-a{alpha}-{index}"
        if not (folder / "adapter_config.json").is_file():
            print(f"  generating {folder}", file=sys.stderr)
            write_adapter(folder, index, rank, alpha)
        folders.append(folder)
    return folders


# --- measurements, each run in a child process: python speed.py --child JSON ---------------------------

def io_floor(folders: list[str], out: str, device: str) -> None:
    """Read every input tensor into float32 memory, then write one rank-16 bf16 adapter."""
    held = [{k: t.float() for k, t in load_file(Path(f) / "adapter_model.safetensors").items()} for f in folders]
    first = held[0]
    output = {k: t[:16].to(torch.bfloat16) if "lora_A" in k else t[:, :16].to(torch.bfloat16).contiguous()
              for k, t in first.items()}
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(output, Path(out) / "adapter_model.safetensors", metadata={"format": "pt"})


def cli_merge(folders: list[str], out: str, device: str, method: str, params: tuple[str, ...] = ()) -> None:
    from lora_lego.cli import main
    args = ["merge", *folders, "-o", out, "--method", method, "--rank", "16", "--overwrite", "-q"]
    args += [item for param in params for item in ("-p", param)]
    code = main(args + (["--device", device] if device != "cpu" else []))
    if code != 0:
        raise SystemExit(f"lora-lego merge failed with exit code {code}")


def layer0_merge(folders: list[str], out: str, device: str, method: str) -> None:
    """Load the inputs, then merge only layer 0's seven modules (the caller extrapolates x32)."""
    import lora_lego as ll
    adapters = [ll.load_adapter(f) for f in folders]
    subset = [ll.Adapter({m: a[m] for m in a if ".layers.0." in m}, a.metadata, a.name) for a in adapters]
    started = time.perf_counter()
    ll.merge(subset, method, rank=16)
    print(json.dumps({"layer0_seconds": time.perf_counter() - started}))


def child(spec: dict) -> None:
    kinds = {"io_floor": io_floor, "cli": cli_merge, "layer0": layer0_merge}
    run = kinds[spec["kind"]]
    extra = {"method": spec["method"]} if "method" in spec else {}
    if spec.get("params"):
        extra["params"] = tuple(spec["params"])
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(spec["reps"]):
            started = time.perf_counter()
            run(spec["folders"], str(Path(tmp) / "out"), spec["device"], **extra)
            times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"times": times, "peak_rss": peak * 1024, "import_rss": baseline * 1024}))


def measure(spec: dict) -> dict:
    """Run one measurement in a fresh process; the last JSON line of its output is the result."""
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"measurement {spec['kind']} {spec.get('method', '')} failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result = lines[-1]
    for line in lines[:-1]:
        result.update(line)
    return result


def run_workload(name: str, folders: list[Path], reps: int, device: str) -> list[dict]:
    paths = [str(f) for f in folders]
    input_bytes = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)
    rows = []

    def add(label, spec, extrapolate=None, note=""):
        print(f"  {name}: {label} ...", file=sys.stderr, flush=True)
        result = measure({"folders": paths, "device": device, **spec})
        # the floor is a lower bound, so its fastest run: its median swings (0.24 to 1.2 s for base in one
        # run) with the state of the page cache and of freshly allocated memory; every other row is a median
        seconds = (min if spec["kind"] == "io_floor" else statistics.median)(result["times"])
        if extrapolate:
            seconds = extrapolate(result)
        rows.append({"workload": name, "row": label, "seconds": seconds, "times": result["times"],
                     "peak_rss": result["peak_rss"], "import_rss": result["import_rss"],
                     "input_bytes": input_bytes, "note": note})

    add("I/O floor", {"kind": "io_floor", "reps": reps})
    add("lego (CLI)", {"kind": "cli", "method": "lego", "reps": reps})
    add("task_arithmetic (CLI)", {"kind": "cli", "method": "task_arithmetic", "reps": reps})
    add("ties space=core (CLI)", {"kind": "cli", "method": "ties", "params": ["space=core"], "reps": reps})
    for method in ("tsv", "iso_c", "ctm"):  # the core-space spectral methods
        add(f"{method} (CLI)", {"kind": "cli", "method": method, "reps": reps})
    if name == "base":
        floor = rows[0]["seconds"]
        add("ties", {"kind": "layer0", "method": "ties", "reps": 1},
            extrapolate=lambda r: r["layer0_seconds"] * LAYERS + floor,
            note="extrapolated: layer 0 merge x 32 + I/O floor")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| workload | row | seconds (median; floor: fastest) | x I/O floor | peak RSS (GB) "
             "| RSS / input bytes | note |",
             "|---|---|---|---|---|---|---|"]
    floors = {r["workload"]: r["seconds"] for r in rows if r["row"] == "I/O floor"}
    for r in rows:
        floor = floors.get(r["workload"])
        ratio = f"{r['seconds'] / floor:.2f}" if floor else "-"
        rss = f"{r['peak_rss'] / 1e9:.2f}" if r.get("peak_rss") else "-"
        per_input = f"{r['peak_rss'] / r['input_bytes']:.2f}" if r.get("peak_rss") else "-"
        lines.append(f"| {r['workload']} | {r['row']} | {r['seconds']:.2f} | {ratio} | {rss} | {per_input} "
                     f"| {r['note']} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, GPU: {gpu}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", default=os.environ.get("LORA_LEGO_SCRATCH", "/tmp/lora-lego-speed"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workloads", nargs="+", default=["base", "mixed", "many"], choices=list(WORKLOADS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT's add_weighted_adapter rows (minutes)")
    parser.add_argument("--markdown", help="also write the table (with command and machine) to this file")
    parser.add_argument("--json", help="also write the raw rows to this file")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    scratch = Path(args.scratch)
    rows = []
    for name in args.workloads:
        rows += run_workload(name, workload(scratch, name), args.reps, args.device)
    if not args.no_peft:
        from speed_peft import peft_rows
        rows += peft_rows(workload(scratch, "base"), rows)
    text = table(rows)
    print(text)
    if args.markdown:
        command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
        Path(args.markdown).write_text(f"Command: `{command}`\n\nMachine: {machine()}\n\n{text}\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
