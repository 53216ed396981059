"""Self-generated calibration: an adapter writes its own prompts. Sample text from base + adapter (the
adapter's deltas added by forward hooks, `AppliedAdapter`) with temperature and top-p, seeded through one
explicit torch.Generator, so that a user with only the base model and the adapters can calibrate a merge.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from ..defaults import DEFAULT_START, STARTS
from ..errors import CalibrationError
from ..progress import progress as progress_of
from ..types import Adapter
from .passes import AppliedAdapter

SEED_WORDS = ("The", "A", "In", "This", "I", "It", "We", "When")  # "seeds": sample i starts from word i mod 8


def generate_prompts(model: torch.nn.Module, tokenizer, adapter: Adapter | None, n: int, *, max_length: int = 64,
                     temperature: float = 1.0, top_p: float = 0.95, seed: int = 0, start: str = DEFAULT_START,
                     batch_size: int = 8, progress: bool = False) -> list[str]:
    """`n` texts sampled from `model` with `adapter` applied (None: the base model alone), in a fixed order.

    Each sample starts from `start`: "bos" (the tokenizer's BOS token, else its EOS token, as GPT-2 separates
    documents), "chat" (an empty user turn of the chat template, then the assistant's turn), or "seeds" (one
    of SEED_WORDS, in turn). It draws at most `max_length` new tokens, at `temperature` with nucleus (top-p)
    sampling, and stops at the EOS token (never drawn first: no sample is empty). A text is the decoded new
    tokens (with the seed word for "seeds"), special tokens left out, stripped. Randomness comes only from one
    torch.Generator seeded with `seed` (on the CPU, whatever the model's device): the same model, adapter,
    arguments and seed give the same texts; `batch_size` samples are drawn together (a different batch size
    draws differently). Uses the key-value cache; the model's weights and mode are left as they were.
    """
    check_generation(n, max_length, temperature, top_p, batch_size, start)
    starts = [_start_ids(tokenizer, start, i) for i in range(n)]
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(seed)
    texts: list[str] = [""] * n
    name = getattr(adapter, "name", "base model")
    training = model.training
    bar = progress_of(n, f"generate {name}"[:60], "sample", enabled=progress)
    try:
        model.eval()
        with torch.no_grad(), AppliedAdapter(model, adapter, type(model).__name__), bar:
            for rows in _batches_by_start(starts, batch_size):
                new = _sample(model, torch.tensor([starts[i] for i in rows]), max_length, temperature, top_p, eos,
                              generator)
                for i, ids in zip(rows, new):
                    kept = starts[i] + ids if start == "seeds" else ids  # a seed word is part of its text
                    texts[i] = tokenizer.decode(kept, skip_special_tokens=True).strip()
                bar.update(len(rows))
    finally:
        model.train(training)
    return texts


def check_generation(n: Any, max_length: Any, temperature: Any, top_p: Any, batch_size: Any, start: str) -> None:
    """Raise CalibrationError for arguments `generate_prompts` refuses (checked before any model is loaded)."""
    for label, value in (("n", n), ("max_length", max_length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"generated prompts: {label} must be an integer >= 1; got {value!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise CalibrationError(f"generated prompts: temperature must be a finite number > 0; got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise CalibrationError(f"generated prompts: top_p must be in (0, 1]; got {top_p!r}")
    if start not in STARTS:
        raise CalibrationError(f"generated prompts: start must be one of {', '.join(STARTS)}; got {start!r}")


def _start_ids(tokenizer, start: str, index: int) -> list[int]:
    """The token ids sample `index` starts from (never empty)."""
    if start == "bos":
        token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if token is None:
            raise CalibrationError("generated prompts: start 'bos' needs a tokenizer with a BOS or EOS token")
        return [token]
    if start == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationError("generated prompts: start 'chat' needs a tokenizer with a chat template; use "
                                   "start 'bos' or 'seeds'")
        text = tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(SEED_WORDS[index % len(SEED_WORDS)])["input_ids"]
    if not ids:
        raise CalibrationError(f"generated prompts: start {start!r} tokenizes to nothing with this tokenizer")
    return list(ids)


def _batches_by_start(starts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Sample indices in batches whose starts have one length (no padding), in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(starts):
        groups.setdefault(len(ids), []).append(i)
    return [rows[j:j + batch_size] for rows in groups.values() for j in range(0, len(rows), batch_size)]


def _sample(model: torch.nn.Module, ids: torch.Tensor, max_length: int, temperature: float, top_p: float,
            eos: int | None, generator: torch.Generator) -> list[list[int]]:
    """New token ids for each row of `ids` (b, s): at most `max_length`, up to (not including) EOS."""
    device = model.get_input_embeddings().weight.device
    rows = ids.shape[0]
    done = torch.zeros(rows, dtype=torch.bool)
    drawn: list[torch.Tensor] = []
    # transformers 5 names the key-value cache `cache`; earlier versions `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, step_ids = None, ids.to(device)
    for step in range(max_length):
        out = model(input_ids=step_ids, use_cache=True, **{name: past})
        past = out[name]
        logits = out.logits[:, -1, :].float().cpu()
        if step == 0 and eos is not None:
            logits[:, eos] = -math.inf  # no empty sample
        token = next_tokens(logits, temperature, top_p, generator)
        token = torch.where(done, eos if eos is not None else 0, token)
        drawn.append(token)
        if eos is not None:
            done |= token == eos
            if bool(done.all()):
                break
        step_ids = token.unsqueeze(1).to(device)
    tokens = torch.stack(drawn, 1).tolist()
    return [row[:row.index(eos)] if eos in row else row for row in tokens]


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row of `logits` (b, vocab), drawn from softmax(logits / temperature) restricted to the
    smallest set of most likely tokens whose probability reaches `top_p` (the top token always kept)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

