"""Shared helpers for the PEFT tests: tiny base models built from configs (no download), PEFT LoRA
adapters made by PEFT itself (non-zero B, a per-name seed), and PEFT's own deltas for comparison.

Test files import the helpers directly (`from conftest import make_peft_adapter, ...`) or use the
fixtures at the bottom. Seeding happens inside `torch.random.fork_rng`, so the global RNG is untouched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_lego.types import LoraFactors

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False)
GPT2 = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
PREFIX = "base_model.model."


def name_seed(name: str) -> int:
    """A stable seed from a name (crc32), so adapters of different names differ and runs repeat."""
    return zlib.crc32(name.encode())


def tiny_llama(seed: int = 0):
    """A fresh tiny LlamaForCausalLM (2 layers, hidden 32, vocab 100), same weights for the same seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    return model.eval()


def tiny_gpt2(seed: int = 0):
    """A fresh tiny GPT2LMHeadModel (Conv1D layers: weights stored (in, out), PEFT needs fan_in_fan_out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**GPT2))
    return model.eval()


def build_peft_model(name: str, *, base: Callable[[], torch.nn.Module] = tiny_llama,
                     lora_dtype: torch.dtype | None = None, config_class=None, base_name: str | None = None,
                     **config_kwargs: Any):
    """A PeftModel (adapter "default") on a fresh `base()` with LoRA weights drawn from a seed of `name`.

    Defaults: target_modules q_proj/v_proj, r=4, lora_alpha=8, init_lora_weights=False (B is non-zero),
    base_model_name_or_path `base_name` (default from the factory: "tiny-llama"). `lora_dtype` casts the
    adapter's parameters (e.g. torch.bfloat16).
    `config_class` replaces LoraConfig (e.g. peft.IA3Config); then no LoRA defaults are added.
    """
    from peft import LoraConfig, get_peft_model

    if config_class is None:
        config_class = LoraConfig
        config_kwargs = {"target_modules": ["q_proj", "v_proj"], "r": 4, "lora_alpha": 8,
                         "init_lora_weights": False, **config_kwargs}
    model = base()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(name_seed(name))
        peft_model = get_peft_model(model, config_class(**config_kwargs))
    # get_peft_model takes the name from the model (empty for one built from a config); save_pretrained keeps this
    peft_model.peft_config["default"].base_model_name_or_path = base_name or base.__name__.replace("_", "-")
    if lora_dtype is not None:
        for parameter_name, parameter in peft_model.named_parameters():
            if "lora_" in parameter_name:
                parameter.data = parameter.data.to(lora_dtype)
    return peft_model.eval()


def save_peft_model(peft_model, folder: str | Path, **save_kwargs: Any) -> Path:
    """`peft_model.save_pretrained(folder)` with PEFT's warnings silenced; returns the folder."""
    folder = Path(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(folder, **save_kwargs)
    return folder


def make_peft_adapter(tmp_path: Path, name: str, *, base: Callable[[], torch.nn.Module] = tiny_llama,
                      lora_dtype: torch.dtype | None = None, safe_serialization: bool = True,
                      config_class=None, **config_kwargs: Any) -> Path:
    """Save a PEFT adapter made by PEFT (see `build_peft_model`) to tmp_path / name and return the folder.

    E.g. make_peft_adapter(tmp_path, "a", target_modules=["embed_tokens", "q_proj"], r=2, lora_alpha=5,
    use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={...}, lora_dtype=torch.bfloat16).
    """
    peft_model = build_peft_model(name, base=base, lora_dtype=lora_dtype, config_class=config_class,
                                  **config_kwargs)
    return save_peft_model(peft_model, Path(tmp_path) / name, safe_serialization=safe_serialization)


def load_peft(folder: str | Path, *, base: Callable[[], torch.nn.Module] = tiny_llama, adapter_name: str = "default"):
    """`PeftModel.from_pretrained(base(), folder)`; fails the test on PEFT's missing-keys warning."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base(), str(folder), adapter_name=adapter_name)
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    assert not missing, missing
    return model.eval()


def lora_layers(peft_model, adapter_name: str = "default") -> dict[str, Any]:
    """Module path (no "base_model.model." prefix) -> PEFT LoraLayer holding `adapter_name`."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and (adapter_name in module.lora_A or adapter_name in module.lora_embedding_A):
            layers[module_name.removeprefix(PREFIX)] = module
    return layers


def peft_deltas(peft_model, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """Module path -> PEFT's `get_delta_weight(adapter_name)` (float32), in the layout of the base weight."""
    with torch.no_grad():
        return {module: layer.get_delta_weight(adapter_name).float()
                for module, layer in lora_layers(peft_model, adapter_name).items()}


def weight_update(factors: LoraFactors, fan_in_fan_out: bool = False) -> torch.Tensor:
    """Our delta B @ A in the layout of the base weight: transposed for embeddings and fan_in_fan_out."""
    delta = factors.delta()
    return delta.T if factors.kind == "embedding" or fan_in_fan_out else delta


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_F / ||expected||_F in float64."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).norm() / expected.norm())


def assert_matches_peft(adapter, reference: dict[str, torch.Tensor], *, fan_in_fan_out: bool = False,
                        tol: float = 1e-6) -> None:
    """Every module of `adapter` is in `reference` (PEFT deltas) and vice versa, with deltas equal to `tol`."""
    assert set(adapter.modules) == set(reference)
    for module, factors in adapter.items():
        expected = reference[module]
        assert expected.abs().max() > 0, module  # a zero reference would prove nothing
        error = relative_error(weight_update(factors, fan_in_fan_out), expected)
        assert error < tol, (module, error)


def file_checksums(folder: str | Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (to prove inputs are left untouched)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_config(folder: str | Path, **changes: Any) -> None:
    """Change keys of folder/adapter_config.json in place."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(folder: str | Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Load folder/adapter_model.safetensors, let `edit` change the dict in place, save it back."""
    path = Path(folder) / "adapter_model.safetensors"
    tensors = dict(load_file(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


@pytest.fixture
def peft_adapter(tmp_path) -> Callable[..., Path]:
    """`peft_adapter(name, **config_kwargs)`: make_peft_adapter bound to the test's tmp_path / "inputs"."""
    return functools.partial(make_peft_adapter, tmp_path / "inputs")


WORDS = [f"w{i}" for i in range(97)]  # with <pad>, <unk>, <eos>: the 100 tokens of tiny_llama's vocabulary


def tiny_llama_folder(folder: str | Path, seed: int = 0) -> Path:
    """`tiny_llama(seed)` saved as a transformers folder with a whitespace word-level tokenizer (w0 .. w96)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(["<pad>", "<unk>", "<eos>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>")
    folder = Path(folder)
    tiny_llama(seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_prompts(path: str | Path, n: int, *, seed: int, length: tuple[int, int] = (3, 12)) -> Path:
    """A JSONL prompts file of `n` random word sequences (lengths in `length`), from a seeded local RNG."""
    import random

    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(*length)))}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def without_transformers(monkeypatch):
    """Make `import transformers` fail for the test, as on a machine without the calibrate extra."""
    import builtins

    real_import = builtins.__import__

    def fail(name, *args, **kwargs):
        if name.startswith("transformers"):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fail)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr stripped) of `lora-lego ARGV` run in process (arguments may be paths)."""
    from lora_lego.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip()
