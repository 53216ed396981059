"""PEFT's add_weighted_adapter on the speed benchmark's adapters (imported by benchmarks/speed.py).

A 2-layer model with Llama-2-7B dimensions (plain nn.Linear, uninitialised, nothing downloaded) gets
the 8 `base` adapters on ONE module of each distinct shape in layer 0 (q_proj 4096x4096, gate_proj
11008x4096, down_proj 4096x11008), one fresh process per module; the time of add_weighted_adapter
(svd with svd_rank=16 and PEFT's defaults, or cat) is extrapolated to the 224 modules of the full model
(q/k/v/o x 4, gate/up x 2, down x 1, times 32 layers). Loading the adapters into PEFT is not timed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SAMPLES = {"self_attn.q_proj": 4, "mlp.gate_proj": 2, "mlp.down_proj": 1}  # module -> modules of its shape per layer
LAYERS = 32


def _model(hidden: int = 4096, inter: int = 11008, layers: int = 2):
    import torch.nn as nn
    from torch.nn.utils import skip_init

    def linear(d_in, d_out):
        return skip_init(nn.Linear, d_in, d_out, bias=False)

    blocks = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        block.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.self_attn, name, linear(hidden, hidden))
        block.mlp = nn.Module()
        block.mlp.gate_proj, block.mlp.up_proj = linear(hidden, inter), linear(hidden, inter)
        block.mlp.down_proj = linear(inter, hidden)
        blocks.append(block)
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = blocks
    return root


def child(spec: dict) -> None:
    """Load the adapters' factors of one module into PEFT, then time add_weighted_adapter once."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open

    module = f"model.layers.0.{spec['module']}"
    names = []
    model = None
    for index, folder in enumerate(spec["folders"]):
        config = json.loads((Path(folder) / "adapter_config.json").read_text())
        lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=[module], lora_dropout=0.0)
        name = f"a{index}"
        if model is None:
            model = get_peft_model(_model(), lora, adapter_name=name)
        else:
            model.add_adapter(name, lora)
        with safe_open(Path(folder) / "adapter_model.safetensors", "pt") as weights:
            state = {f"base_model.model.{module}.lora_{side}.weight": weights.get_tensor(
                f"base_model.model.{module}.lora_{side}.weight").float() for side in "AB"}
        set_peft_model_state_dict(model, state, adapter_name=name)
        names.append(name)
    started = time.perf_counter()
    extra = {"svd_rank": 16} if spec["combination"] == "svd" else {}
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=spec["combination"], **extra)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": seconds, "peak_rss": peak}))


def peft_rows(folders: list[Path], rows: list[dict]) -> list[dict]:
    """Extrapolated full-model rows for PEFT's svd and cat on the `base` workload."""
    floor = next(r["seconds"] for r in rows if r["workload"] == "base" and r["row"] == "I/O floor")
    input_bytes = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)
    out = []
    for combination in ("cat", "svd"):
        total, peak, parts = 0.0, 0, []
        for module, count in SAMPLES.items():
            print(f"  base: PEFT {combination} on {module} ...", file=sys.stderr, flush=True)
            spec = {"folders": [str(f) for f in folders], "module": module, "combination": combination}
            done = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"PEFT {combination} on {module} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.splitlines()[-1])
            total += result["seconds"] * count * LAYERS
            peak = max(peak, result["peak_rss"])
            parts.append(f"{module.split('.')[-1]} {result['seconds']:.2f} s")
        out.append({"workload": "base", "row": f"PEFT add_weighted_adapter {combination}", "seconds": total + floor,
                    "times": [], "peak_rss": peak, "import_rss": 0, "input_bytes": input_bytes,
                    "note": f"extrapolated: one module per shape ({', '.join(parts)}, 1 run each) x 224 + I/O floor; "
                            "RSS of one module's run"})
    return out


if __name__ == "__main__":
    child(json.loads(sys.argv[1]))
