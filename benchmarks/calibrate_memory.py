"""Peak memory (and time) of calibration and of a calibrated merge on a Llama-2-7B-shaped model with random
weights (issue 15). Not a test.

    python benchmarks/calibrate_memory.py [--layers 32] [--prompts 4] [--tokens 32] [--merge-layers 4]
                                          [--adapters 3] [--scratch DIR] [--device cpu|cuda] [--json out.json]

1. Builds LlamaForCausalLM with Llama-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000) in bf16
   and random weights, and a word-level tokenizer (no download).
2. `calibrate` on `--prompts` random prompts of `--tokens` tokens over every linear layer, streaming the
   Grams to --scratch (22 GB of float32 for 32 layers). The model's forward costs are what they are on a
   CPU; few short prompts keep the run in minutes, and the memory held beyond the model (the Grams of one
   pass, the activations) does not depend on how many prompts there are.
3. `merge(..., "regmean")` of `--adapters` random r=16 adapters over the first `--merge-layers` layers, with
   that calibration (read lazily, one Gram at a time); the model is freed first.
Peak resident memory is sampled every 20 ms in a thread (/proc/self/statm) during each phase and reported
against the model's bytes; the target is model bytes + 3 GB.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import threading
import time
from pathlib import Path

import torch

import lora_lego as ll
from lora_lego.types import Adapter, LoraFactors

SHAPES = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
          "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
          "mlp.down_proj": (4096, 11008)}
GB = 2**30  # figures are printed in GiB


class PeakMemory:
    """Context manager sampling this process's resident memory; `.peak` in bytes."""

    def __enter__(self):
        self.peak, self._running = _rss(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * 4096


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)  # a benchmark script: the global generator is ours
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def build_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<pad>", "<unk>", "<eos>"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def random_adapter(index: int, layers: int, rank: int = 16) -> Adapter:
    generator = torch.Generator().manual_seed(1000 + index)
    modules = {}
    for layer in range(layers):
        for kind, (d_out, d_in) in SHAPES.items():
            A = torch.randn(rank, d_in, generator=generator) / d_in**0.5
            B = torch.randn(d_out, rank, generator=generator) * 0.01
            rounded = (A.to(torch.bfloat16).float(), B.to(torch.bfloat16).float())  # as if read from a bf16 file
            modules[f"model.layers.{layer}.{kind}"] = LoraFactors(*rounded)
    return Adapter(modules, {"dtype": "bfloat16"}, name=f"adapter-{index}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--merge-layers", type=int, default=4)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scratch", help="folder for the calibration file (default: a temporary folder)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="calibrate-memory-"))
    result = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              **{k: v for k, v in vars(args).items() if k != "json"}}

    started = time.perf_counter()
    model = build_model(args.layers).to(args.device)
    result["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    result["build_s"] = time.perf_counter() - started
    words = [f"w{i}" for i in range(500)]
    tokenizer = build_tokenizer(words)
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(words) for _ in range(args.tokens)) for _ in range(args.prompts)]
    result["rss_before_calibrate"] = _rss()
    started = time.perf_counter()
    with PeakMemory() as peak:
        calibration = ll.calibrate(model, prompts, tokenizer=tokenizer, output=scratch / "calibration", overwrite=True,
                                   progress=True)
    result["calibrate_s"] = time.perf_counter() - started
    result["calibrate_peak_rss"] = peak.peak
    result["calibrate_peak_over_model_gib"] = (peak.peak - result["model_bytes"]) / GB
    result["calibration_file_bytes"] = (scratch / "calibration" / "calibration.safetensors").stat().st_size
    del model

    adapters = [random_adapter(i, args.merge_layers) for i in range(args.adapters)]
    result["rss_before_merge"] = _rss()
    started = time.perf_counter()
    with PeakMemory() as peak:
        merged = ll.merge(adapters, "regmean", calibration=[calibration] * args.adapters, rank=16, progress=True,
                          device=args.device)
    result["merge_s"] = time.perf_counter() - started
    result["merge_modules"] = len(merged)
    result["merge_peak_over_start_gib"] = (peak.peak - result["rss_before_merge"]) / GB
    for key, value in result.items():
        print(f"{key}: {value / GB:.2f} GiB" if key.endswith(("rss", "bytes")) or "_rss_" in key else f"{key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
