"""Self-generated prompts on a tiny Llama built from a config (no download): determinism for a seed, an adapter
that makes one token likely shows it in its samples, top-p keeps the nucleus, the starts, and typed errors."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
import lora_lego as ll
from conftest import make_peft_adapter, tiny_llama_folder
from lora_lego.calibration.calibrate import load_model
from lora_lego.calibration.generate import generate_prompts, next_tokens
from lora_lego.errors import CalibrationError

TOKEN = "w42"  # the token the hand-made adapter pushes up (id 45: after <pad>, <unk>, <eos>)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generate")
    model, tokenizer = load_model(tiny_llama_folder(folder / "model"))
    adapter = ll.load_adapter(make_peft_adapter(folder, "a"))
    return {"model": model, "tokenizer": tokenizer, "adapter": adapter}


def one_token_adapter(model, token_id: int, strength: float = 200.0) -> ll.Adapter:
    """A rank-1 delta on lm_head adding strength * (s . x) to one token's logit, s the unit mean direction of the
    final normalised hidden states (so s . x > 0 at most positions, where the token becomes near certain)."""
    hidden = model(input_ids=torch.arange(3, 100).unsqueeze(1), output_hidden_states=True).hidden_states[-1]
    s = hidden.mean(dim=(0, 1))
    s = s / s.norm()
    B = torch.zeros(model.config.vocab_size, 1)
    B[token_id, 0] = strength
    return ll.Adapter({"lm_head": ll.LoraFactors(s.unsqueeze(0).detach().clone(), B)}, name="one-token")


def test_same_seed_same_texts_another_seed_others_and_the_global_rng_untouched(setup):
    model, tokenizer, adapter = setup["model"], setup["tokenizer"], setup["adapter"]
    state = torch.get_rng_state()
    first = generate_prompts(model, tokenizer, adapter, 5, max_length=12, seed=3, start="bos", batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate_prompts(model, tokenizer, adapter, 5, max_length=12, seed=3, start="bos", batch_size=2) == first
    assert generate_prompts(model, tokenizer, adapter, 5, max_length=12, seed=4, start="bos", batch_size=2) != first
    assert len(first) == 5 and all(isinstance(t, str) and t for t in first)
    assert all(len(t.split()) <= 12 for t in first)
    # the default start (bos, chosen by measurement) needs no chat template
    assert generate_prompts(model, tokenizer, adapter, 2, max_length=3) == generate_prompts(
        model, tokenizer, adapter, 2, max_length=3, start="bos")


def test_the_adapter_is_applied_and_removed_and_the_mode_restored(setup):
    model, tokenizer, adapter = setup["model"], setup["tokenizer"], setup["adapter"]
    ids = torch.tensor([[5, 6, 7]])
    before = model(input_ids=ids).logits
    model.train()
    base = generate_prompts(model, tokenizer, None, 4, max_length=10, seed=0, start="bos")
    adapted = generate_prompts(model, tokenizer, adapter, 4, max_length=10, seed=0, start="bos")
    assert model.training
    model.eval()
    assert torch.equal(model(input_ids=ids).logits, before)  # the hooks are gone
    assert adapted != base


def test_an_adapter_that_makes_one_token_likely_shows_it_in_its_samples(setup):
    model, tokenizer = setup["model"], setup["tokenizer"]
    token_id = tokenizer.convert_tokens_to_ids(TOKEN)
    adapter = one_token_adapter(model, token_id)
    with_it = generate_prompts(model, tokenizer, adapter, 16, max_length=8, seed=0, start="bos")
    without = generate_prompts(model, tokenizer, None, 16, max_length=8, seed=0, start="bos")
    share = [sum(w == TOKEN for t in texts for w in t.split()) / max(1, sum(len(t.split()) for t in texts))
             for texts in (with_it, without)]
    assert sum(TOKEN in t.split() for t in with_it) >= 15
    assert share[0] > 0.5 > 0.1 > share[1]


def test_top_p_keeps_the_nucleus_and_temperature_sharpens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]]).repeat(200, 1)
    assert set(next_tokens(logits, 1.0, 0.4, generator).tolist()) == {1}  # p(1) = .48 >= .4
    assert set(next_tokens(logits, 1.0, 0.9, generator).tolist()) == {1, 3}  # p = .48, .43, .07, .02: 2 follows .91
    drawn = next_tokens(logits, 1.0, 1.0, generator).tolist()
    assert set(drawn) == {0, 1, 2, 3}
    cold = next_tokens(logits, 0.01, 1.0, generator).tolist()
    assert set(cold) == {1}


def test_starts_from_seed_words_and_from_a_chat_turn(setup, monkeypatch):
    model, tokenizer, adapter = setup["model"], setup["tokenizer"], setup["adapter"]
    monkeypatch.setattr("lora_lego.calibration.generate.SEED_WORDS", ("w7", "w8"))
    words = generate_prompts(model, tokenizer, adapter, 3, max_length=4, start="seeds")
    assert [t.split()[0] for t in words] == ["w7", "w8", "w7"] and all(2 <= len(t.split()) <= 5 for t in words)
    with pytest.raises(CalibrationError, match="chat template"):
        generate_prompts(model, tokenizer, adapter, 2, start="chat")
    tokenizer.chat_template = ("{% for m in messages %}w1 {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}w2 {% endif %}")
    try:
        chat = generate_prompts(model, tokenizer, adapter, 3, max_length=6, start="chat")
    finally:
        tokenizer.chat_template = None
    assert len(chat) == 3 and all(0 < len(t.split()) <= 6 for t in chat)  # the template's words are not kept


@pytest.mark.parametrize("kwargs, match", [({"n": 0}, "n must"), ({"n": 2.5}, "n must"),
                                           ({"max_length": 0}, "max_length"), ({"temperature": 0}, "temperature"),
                                           ({"temperature": float("nan")}, "temperature"), ({"top_p": 0}, "top_p"),
                                           ({"top_p": 1.5}, "top_p"), ({"batch_size": 0}, "batch_size"),
                                           ({"start": "eos"}, "start must")])
def test_bad_arguments_are_calibration_errors(setup, kwargs, match):
    arguments = {"n": 2, **kwargs}
    with pytest.raises(CalibrationError, match=match):
        generate_prompts(setup["model"], setup["tokenizer"], setup["adapter"], arguments.pop("n"), **arguments)
