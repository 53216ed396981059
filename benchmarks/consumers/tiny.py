"""The shared pieces of the consumer checks: a tiny random Llama saved as a transformers folder, PEFT LoRA
adapters made by PEFT on it, the reference logits of transformers + PEFT, and the figures that compare a
consumer's logits with them. Everything is built offline from seeds; nothing is downloaded.

The model is small but has the shapes that matter to the consumers: grouped-query attention (4 query heads,
2 key/value heads, so q and k are permuted with different head counts in GGUF), head size 64 (one that
vLLM's CPU attention supports), an untied lm_head.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

LLAMA = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=256, max_position_embeddings=128,
             rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.05,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_base(folder: Path, seed: int = 0) -> Path:
    """A LlamaForCausalLM with the LLAMA config and seeded random weights, saved (float32) to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**LLAMA))
    model.save_pretrained(folder)
    return folder


def load_base(folder: Path):
    """The base model of `folder` in float32, eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def make_adapter(base: Path, folder: Path, seed: int, **lora: object) -> Path:
    """A PEFT LoRA made by PEFT itself on the base of `base`, with random non-zero A and B (init_lora_weights
    False), saved to `folder`. `lora` are LoraConfig arguments (default: every linear module, r=8, alpha=16)."""
    from peft import LoraConfig, get_peft_model

    config = {"target_modules": ALL_LINEAR, "r": 8, "lora_alpha": 16, "init_lora_weights": False, **lora}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = get_peft_model(load_base(base), LoraConfig(**config))
        model.peft_config["default"].base_model_name_or_path = str(base)
        model.save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes: object) -> Path:
    """Change keys of folder/adapter_config.json (to make an adapter PEFT cannot make, e.g. a vLLM refusal)."""
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))
    return folder


def prompts(n: int = 4, length: int = 24, seed: int = 0, vocab: int = LLAMA["vocab_size"]) -> list[list[int]]:
    """`n` random token sequences of `length` ids in [3, vocab) (0-2 are pad, bos, eos), seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, length), generator=generator).tolist()


@torch.no_grad()
def reference_logits(base: Path, adapter: Path | None, ids: list[list[int]]) -> torch.Tensor:
    """transformers (+ PEFT when `adapter` is given) logits of each prompt, of shape (n, length, vocab), float64."""
    model = load_base(base)
    if adapter is not None:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return model(torch.tensor(ids)).logits.double()


def next_token_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """The next-token log-probs after every prefix but the whole prompt: (n, length - 1, vocab), from logits
    of shape (n, length, vocab)."""
    return logits[:, :-1].double().log_softmax(-1)


def agreement(consumer: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """How close two arrays of the same shape are: max |difference|, and the largest |reference| for scale."""
    consumer, reference = consumer.double(), reference.double()
    return {"max_abs_diff": float((consumer - reference).abs().max()), "max_abs_ref": float(reference.abs().max())}


def effect_agreement(consumer_base: torch.Tensor, consumer_adapted: torch.Tensor, reference_base: torch.Tensor,
                     reference_adapted: torch.Tensor) -> dict[str, float]:
    """How well the consumer reproduces the adapter's effect (adapted minus base, any shape): Pearson
    correlation, relative error ||c - r|| / ||r||, and the max |difference| against the max |effect|."""
    consumer = (consumer_adapted.double() - consumer_base.double()).flatten()
    reference = (reference_adapted.double() - reference_base.double()).flatten()
    correlation = torch.corrcoef(torch.stack([consumer, reference]))[0, 1]
    return {"effect_corr": float(correlation),
            "effect_rel_err": float((consumer - reference).norm() / reference.norm()),
            "effect_max_abs_diff": float((consumer - reference).abs().max()),
            "effect_max_abs": float(reference.abs().max())}


def print_table(rows: list[dict], columns: list[str]) -> None:
    """Print `rows` as a plain fixed-width table of `columns` (floats in 3 significant digits, correlations
    with 6 decimals)."""
    def cell(value: object, column: str) -> str:
        if not isinstance(value, float):
            return str(value)
        return f"{value:.6f}" if column.endswith("corr") else f"{value:.3g}"

    cells = [[cell(row.get(column, ""), column) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    for line in cells:
        print("  ".join(value.ljust(width) for value, width in zip(line, widths)))
