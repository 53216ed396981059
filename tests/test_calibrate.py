"""Calibration on a tiny Llama built from a config (no download): the Grams from the hooks against X^T X
computed by hand, shared inputs, chunked passes, the adapter-applied setting, the file round trip and
the errors on bad prompts and models."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

pytest.importorskip("transformers")
import lora_lego as ll
from conftest import make_peft_adapter, tiny_llama, tiny_llama_folder, write_prompts
from lora_lego.calibration.calibrate import load_model, model_fingerprint, read_prompts


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama_folder(tmp_path_factory.mktemp("model") / "tiny-llama")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_prompts(tmp_path_factory.mktemp("prompts") / "p.jsonl", 11, seed=1)


def grams_by_hand(model, tokenizer, texts, adapter=None):
    """Module path -> sum over every prompt's tokens of x x^T (float64), one prompt at a time, no padding."""
    sums, handles = {}, []
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def hook(name):
        def record(module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.T @ x
        return record

    with torch.no_grad():
        saved = {}
        if adapter is not None:  # the adapter's deltas added into the weights
            for name, factors in adapter.items():
                saved[name] = modules[name].weight.clone()
                modules[name].weight += factors.delta()
        handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            model(input_ids=ids)
        for handle in handles:
            handle.remove()
        for name, weight in saved.items():
            modules[name].weight.copy_(weight)
    return sums


def assert_close(actual, expected, tol=1e-6):
    error = float((actual.double() - expected.double()).norm() / expected.double().norm())
    assert error < tol, error


def test_grams_equal_x_transpose_x_by_hand_and_shared_inputs_share_one(base, prompts):
    model, tokenizer = load_model(base)
    texts = read_prompts(prompts)
    calibration = ll.calibrate(base, prompts, batch_size=3)  # padded batches: padding must not count
    expected = grams_by_hand(model, tokenizer, texts)
    assert set(calibration.modules) == set(expected)
    for module, gram in expected.items():
        assert_close(calibration.gram(module), gram)
    assert calibration.tokens == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    keys = calibration.modules
    layer = "model.layers.1."
    assert keys[layer + "self_attn.q_proj"] == keys[layer + "self_attn.k_proj"] == keys[layer + "self_attn.v_proj"]
    assert keys[layer + "mlp.gate_proj"] == keys[layer + "mlp.up_proj"]
    assert len(set(keys.values())) == 2 * 4 + 1  # per layer: q/k/v, o, gate/up, down; plus lm_head
    moment = calibration.moment(layer + "mlp.down_proj")
    assert torch.allclose(moment, calibration.gram(layer + "mlp.down_proj") / calibration.tokens)


def test_chunked_passes_give_the_same_grams_as_one_pass(base, prompts):
    one = ll.calibrate(base, prompts, batch_size=4)
    many = ll.calibrate(base, prompts, batch_size=4, gram_memory=1)  # every shared input in its own pass
    assert one.modules == many.modules
    for module in one.modules:
        assert torch.equal(one.gram(module), many.gram(module))


def test_adapter_applied_gives_the_fine_tuned_models_inputs(base, prompts, tmp_path):
    folder = make_peft_adapter(tmp_path, "task", r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = ll.load_adapter(folder)
    model, tokenizer = load_model(base)
    adapted = ll.calibrate(model, prompts, tokenizer=tokenizer, adapter=adapter)
    plain = ll.calibrate(model, prompts, tokenizer=tokenizer)
    expected = grams_by_hand(model, tokenizer, read_prompts(prompts), adapter)
    module = "model.layers.1.self_attn.q_proj"  # its input depends on layer 0's adapted modules
    assert_close(adapted.gram(module), expected[module])
    with pytest.raises(AssertionError):
        assert_close(plain.gram(module), expected[module], tol=1e-3)
    assert adapted.metadata["activations"] == f"adapter {adapter.name}"
    assert adapted.fingerprint == plain.fingerprint  # the same base model


def test_saved_calibration_reads_back_lazily_with_provenance(base, prompts, tmp_path):
    from safetensors import safe_open

    memory = ll.calibrate(base, prompts, max_prompts=5, max_length=6)
    saved = ll.calibrate(base, prompts, max_prompts=5, max_length=6, output=tmp_path / "calib")
    loaded = ll.load_calibration(tmp_path / "calib")
    for module in memory.modules:
        assert torch.equal(memory.gram(module), saved.gram(module))
        assert torch.equal(memory.gram(module), loaded.gram(module))
    meta = loaded.metadata
    texts = read_prompts(prompts)[:5]
    assert meta["n_prompts"] == 5 and meta["max_length"] == 6 and meta["model"] == str(base)
    assert meta["prompts_sha256"] == hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    assert meta["model_fingerprint"] == model_fingerprint(load_model(base)[0])
    assert loaded.tokens == memory.tokens <= 5 * 6
    with safe_open(str(tmp_path / "calib" / "calibration.safetensors"), "pt") as handle:  # an ordinary file
        key = loaded.modules["model.layers.0.mlp.down_proj"]
        assert torch.equal(handle.get_tensor(key), loaded.gram("model.layers.0.mlp.down_proj"))


def test_fingerprint_tells_models_apart_but_not_their_dtype():
    model = tiny_llama(0)
    assert model_fingerprint(model) == model_fingerprint(tiny_llama(0))
    assert model_fingerprint(model) != model_fingerprint(tiny_llama(1))
    halved = tiny_llama(0).to(torch.bfloat16)
    assert model_fingerprint(halved) == model_fingerprint(model)


@pytest.mark.parametrize("content, message", [
    ("", "holds no prompts"),
    ("\n  \n", "holds no prompts"),
    ('{"text": "w1 w2"}\nnot json\n', "line 2: expected a JSON object"),
    ('{"prompt": "w1"}\n', "line 1: expected a JSON object with a \"text\""),
    ('{"text": 3}\n', "line 1: \"text\" must be a string"),
])
def test_bad_prompts_files_are_named_with_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ll.CalibrationError, match=message):
        read_prompts(path)


def test_text_files_hold_one_prompt_per_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("w1 w2\n\nw3\n")
    assert read_prompts(path) == ["w1 w2", "w3"]
    assert read_prompts(path, max_prompts=1) == ["w1 w2"]
    with pytest.raises(ll.CalibrationError, match="no prompts|cannot read"):
        read_prompts(tmp_path / "missing.txt")


def test_modules_the_model_lacks_or_that_are_not_linear_are_refused(base, prompts):
    with pytest.raises(ll.CalibrationError, match="has no module 'transformer.h.0.attn.c_attn'"):
        ll.calibrate(base, prompts, modules=["transformer.h.0.attn.c_attn"])
    with pytest.raises(ll.CalibrationError, match="Embedding; calibrated merging supports linear layers only"):
        ll.calibrate(base, prompts, modules=["model.embed_tokens"])
    with pytest.raises(ll.CalibrationError, match="not a transformers model folder"):
        ll.calibrate(prompts.parent, prompts)


def test_missing_transformers_names_the_extra(base, without_transformers):
    with pytest.raises(ll.CalibrationError, match=r"lora-lego\[calibrate\]"):
        load_model(base)


def test_files_that_are_not_calibrations_are_refused(base, prompts, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ll.CalibrationError, match="no calibration.safetensors there"):
        ll.load_calibration(tmp_path)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2, 2)}, other)
    with pytest.raises(ll.CalibrationError, match="not a lora-lego calibration file"):
        ll.load_calibration(other)
    ll.calibrate(base, prompts, max_prompts=2, output=tmp_path / "calib")
    file = tmp_path / "calib" / "calibration.safetensors"
    file.write_bytes(file.read_bytes()[:-100])  # truncated: the header's offsets run past the end
    with pytest.raises(ll.CalibrationError, match="cannot read calibration.safetensors"):
        ll.load_calibration(tmp_path / "calib")


def test_the_prompts_format_comes_from_the_content_or_is_given(tmp_path):
    jsonl = tmp_path / "prompts.csv"  # JSONL whatever its name
    jsonl.write_text('{"text": "w1 w2"}\n\n{"text": "w3", "id": 2}\n')
    assert read_prompts(jsonl) == ["w1 w2", "w3"]
    assert read_prompts(jsonl, format="txt") == ['{"text": "w1 w2"}', '{"text": "w3", "id": 2}']
    assert read_prompts(jsonl, max_prompts=1) == ["w1 w2"]  # the call other commands make
    text = tmp_path / "prompts.txt"
    text.write_text('{"text": "w1"}\nw2 w3\n')  # one line is not JSON: a text file
    assert read_prompts(text) == ['{"text": "w1"}', "w2 w3"]
    with pytest.raises(ll.CalibrationError, match="line 2: expected a JSON object"):
        read_prompts(text, format="jsonl")
    with pytest.raises(ll.CalibrationError, match="prompts format must be one of jsonl, txt; got 'csv'"):
        read_prompts(text, format="csv")


def test_truncated_prompts_are_counted_in_a_warning(base, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text(" ".join(f"w{i}" for i in range(40)) + "\nw1 w2\n" + " ".join(["w5"] * 30) + "\n")
    model, tokenizer = load_model(base)
    with pytest.warns(ll.LoraLegoWarning, match=r"2 of 3 prompt\(s\) truncated to max_length 8 tokens"):
        cut = ll.calibrate(model, path, tokenizer=tokenizer, max_length=8, modules=["model.layers.0.mlp.up_proj"])
    kept = ll.calibrate(model, ["w0 w1 w2 w3 w4 w5 w6 w7", "w1 w2", " ".join(["w5"] * 8)], tokenizer=tokenizer,
                        max_length=8, modules=["model.layers.0.mlp.up_proj"])  # the same tokens, cut by hand
    assert torch.equal(cut.gram("model.layers.0.mlp.up_proj"), kept.gram("model.layers.0.mlp.up_proj"))


def test_a_huge_prompt_is_announced_before_it_is_tokenized(base, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("lora_lego.calibration.calibrate"), "LONG_PROMPT_CHARS", 50)
    model, tokenizer = load_model(base)
    with pytest.warns(ll.LoraLegoWarning) as caught:
        ll.calibrate(model, ["w1 " * 30, "w2"], tokenizer=tokenizer, max_length=4,
                     modules=["model.layers.0.mlp.up_proj"])
    messages = [str(w.message) for w in caught]
    assert messages[0] == ("prompts '<list>': 1 prompt(s) of more than 50 characters (the longest 90); only their "
                           "first 4 tokens are used, but tokenizing them whole takes a while")
    assert "1 of 2 prompt(s) truncated to max_length 4 tokens" in messages[1]


def test_cli_prompts_format_option(base, tmp_path, capsys):
    from lora_lego.cli import main

    path = tmp_path / "p.csv"
    path.write_text('{"text": "w1 w2"}\n{"text": "w3"}\n')
    args = ["calibrate", "--model", str(base), "--prompts", str(path), "--modules", "model.layers.0.mlp.up_proj", "-q"]
    assert main([*args, "-o", str(tmp_path / "auto")]) == 0
    assert main([*args, "-o", str(tmp_path / "txt"), "--prompts-format", "txt"]) == 0
    tokens = [ll.load_calibration(tmp_path / name).summary()["tokens"] for name in ("auto", "txt")]
    assert tokens[0] == 3 and tokens[1] > tokens[0]  # JSON punctuation read as text gives more tokens
    capsys.readouterr()
    assert main([*args, "-o", str(tmp_path / "x"), "--prompts-format", "xml"]) == 2
    assert "--prompts-format: invalid choice: 'xml'" in capsys.readouterr().err
