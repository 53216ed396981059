"""RegMean++ on tiny models built from configs: with one layer it is regmean; with identical adapters it returns
that adapter; layer by layer, each layer equals regmean on Grams computed by hand on the model whose lower
layers were merged by hand; the fixed point equals regmean on the merged model's Grams; bad options fail."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("transformers")
import lora_lego as ll
from conftest import LLAMA, make_peft_adapter, tiny_gpt2, tiny_llama_folder, write_prompts
from lora_lego.calibration.calibrate import load_model, read_prompts
from lora_lego.calibration.regmean_pp import find_blocks, merge_regmean_pp
from lora_lego.errors import MethodError
from lora_lego.types import Adapter


def one_layer_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**{**LLAMA, "num_hidden_layers": 1})).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean_pp")
    model, tokenizer = load_model(tiny_llama_folder(root / "model"))
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    adapters = [ll.load_adapter(make_peft_adapter(root, name, target_modules=targets, r=r, lora_alpha=2 * r))
                for name, r in (("a", 3), ("b", 2))]
    prompts = [read_prompts(write_prompts(root / f"p{i}.jsonl", 10, seed=i)) for i in range(2)]
    return {"root": root, "model": model, "tokenizer": tokenizer, "adapters": adapters, "prompts": prompts}


def assert_same(result: Adapter, expected: Adapter, modules=None) -> None:
    for module in modules or expected:
        torch.testing.assert_close(result[module].delta(), expected[module].delta(), rtol=1e-4, atol=1e-6)


def layer(adapter: Adapter, index: int) -> Adapter:
    return Adapter({m: f for m, f in adapter.items() if f".layers.{index}." in m}, adapter.metadata, adapter.name)


def test_one_layer_is_regmean(setup):
    tokenizer, prompts = setup["tokenizer"], setup["prompts"]
    model = one_layer_llama()
    make = functools.partial(make_peft_adapter, setup["root"] / "one", base=one_layer_llama,
                             target_modules=["q_proj", "v_proj", "o_proj", "up_proj"])
    adapters = [ll.load_adapter(make("c")), ll.load_adapter(make("d", r=2, lora_alpha=3))]
    for within in ("base", "adapter"):
        result = merge_regmean_pp(adapters, model=model, tokenizer=tokenizer, prompts=prompts, rank=3, within=within)
        calibrations = [ll.calibrate(model, p, tokenizer=tokenizer, modules=list(a),
                                     adapter=a if within == "adapter" else None) for a, p in zip(adapters, prompts)]
        assert_same(result, ll.merge(adapters, "regmean", calibration=calibrations, rank=3))
        assert result.metadata["provenance"]["method"] == "regmean_pp"
        assert result.metadata["provenance"]["params"]["within"] == within


def test_ridge_is_passed_to_regmean_and_recorded(setup):
    tokenizer, prompts = setup["tokenizer"], setup["prompts"]
    model = one_layer_llama()
    make = functools.partial(make_peft_adapter, setup["root"] / "ridge", base=one_layer_llama,
                             target_modules=["q_proj", "v_proj"])
    adapters = [ll.load_adapter(make("g")), ll.load_adapter(make("h", r=2, lora_alpha=3))]
    result = merge_regmean_pp(adapters, model=model, tokenizer=tokenizer, prompts=prompts, rank=3, ridge=0.1)
    calibrations = [ll.calibrate(model, p, tokenizer=tokenizer, modules=list(a)) for a, p in zip(adapters, prompts)]
    assert_same(result, ll.merge(adapters, "regmean", calibration=calibrations, rank=3, ridge=0.1))
    assert result.metadata["provenance"]["params"]["ridge"] == 0.1


def test_identical_adapters_give_that_adapter(setup):
    assert ll.merge_regmean_pp is merge_regmean_pp  # public
    a = setup["adapters"][0]
    result = merge_regmean_pp([a, a], model=setup["model"], tokenizer=setup["tokenizer"], prompts=setup["prompts"])
    assert_same(result, a)


def test_each_layer_is_regmean_on_the_grams_of_the_merged_layers_below(setup):
    model, tokenizer, adapters, prompts = setup["model"], setup["tokenizer"], setup["adapters"], setup["prompts"]
    result = merge_regmean_pp(adapters, model=model, tokenizer=tokenizer, prompts=prompts, rank=4, weights=[1.0, 0.5])
    below = None
    for index in range(LLAMA["num_hidden_layers"]):  # by hand: merge a layer, then calibrate the next one on it
        parts = [layer(a, index) for a in adapters]
        grams = [ll.calibrate(model, p, tokenizer=tokenizer, modules=list(part), adapter=below)
                 for part, p in zip(parts, prompts)]
        merged = ll.merge(parts, "regmean", calibration=grams, rank=4, weights=[1.0, 0.5])
        assert_same(result, merged)
        below = merged if below is None else Adapter({**dict(below.items()), **dict(merged.items())}, {}, "below")
    assert list(result) == list(dict.fromkeys(m for a in adapters for m in a))


def test_within_adapter_uses_each_tasks_own_layer(setup):
    model, tokenizer, adapters, prompts = setup["model"], setup["tokenizer"], setup["adapters"], setup["prompts"]
    result = merge_regmean_pp(adapters, model=model, tokenizer=tokenizer, prompts=prompts, within="adapter")
    base = merge_regmean_pp(adapters, model=model, tokenizer=tokenizer, prompts=prompts)
    first = [m for m in result if ".layers.0." in m]
    # layer 0: q/v read the embeddings either way; o_proj and down_proj read what task t's own q/v made
    assert_same(result, base, [m for m in first if m.endswith(("q_proj", "v_proj"))])
    hand = ll.merge([layer(a, 0) for a in adapters], "regmean", calibration=[
        ll.calibrate(model, p, tokenizer=tokenizer, modules=list(layer(a, 0)), adapter=layer(a, 0))
        for a, p in zip(adapters, prompts)])
    assert_same(result, hand)


def test_fixed_point_is_regmean_on_the_merged_models_grams(setup):
    model, tokenizer, adapters, prompts = setup["model"], setup["tokenizer"], setup["adapters"], setup["prompts"]
    result = merge_regmean_pp(adapters, model=model, tokenizer=tokenizer, prompts=prompts, rounds=1, rank=3)
    first = ll.merge(adapters, "regmean", rank=3, calibration=[
        ll.calibrate(model, p, tokenizer=tokenizer, modules=list(a)) for a, p in zip(adapters, prompts)])
    union = list(dict.fromkeys(m for a in adapters for m in a))
    again = ll.merge(adapters, "regmean", rank=3, calibration=[
        ll.calibrate(model, p, tokenizer=tokenizer, modules=union, adapter=first) for p in prompts])
    assert_same(result, again)
    assert result.metadata["provenance"]["params"]["rounds"] == 1


def test_conv1d_blocks_that_return_tuples(setup):
    """GPT-2: Conv1D layers and transformer.h blocks; layer 1 equals the hand computation too."""
    model, tokenizer, prompts = tiny_gpt2(), setup["tokenizer"], setup["prompts"]
    make = functools.partial(make_peft_adapter, setup["root"] / "gpt2", base=tiny_gpt2,
                             target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    adapters = [ll.load_adapter(make("e")), ll.load_adapter(make("f"))]
    blocks, owner = find_blocks(model, list(adapters[0]))
    assert len(blocks) == 2 and sorted(set(owner.values())) == [0, 1]
    result = merge_regmean_pp(adapters, model=model, tokenizer=tokenizer, prompts=prompts, rank=4)
    lower = [Adapter({m: f for m, f in a.items() if owner[m] == 0}, a.metadata, a.name) for a in adapters]
    below = ll.merge(lower, "regmean", rank=4, calibration=[
        ll.calibrate(model, p, tokenizer=tokenizer, modules=list(a)) for a, p in zip(lower, prompts)])
    upper = [Adapter({m: f for m, f in a.items() if owner[m] == 1}, a.metadata, a.name) for a in adapters]
    hand = ll.merge(upper, "regmean", rank=4, calibration=[
        ll.calibrate(model, p, tokenizer=tokenizer, modules=list(a), adapter=below) for a, p in zip(upper, prompts)])
    assert_same(result, hand)


@pytest.mark.parametrize("options, words", [({"rounds": -1}, "rounds must be"), ({"rounds": 11}, "rounds must be"),
                                            ({"within": "merged"}, "within must be"), ({"ridge": -1.0}, "ridge")])
def test_bad_options(setup, options, words):
    with pytest.raises(MethodError, match=words):
        merge_regmean_pp(setup["adapters"], model=setup["model"], tokenizer=setup["tokenizer"],
                         prompts=setup["prompts"], **options)


def test_cli_equals_the_api_and_refuses_saved_calibrations(setup, tmp_path, capsys):
    from conftest import make_peft_adapter
    from lora_lego.cli import main

    root = setup["root"]
    folders = [make_peft_adapter(root / "cli", name, target_modules=["q_proj", "v_proj", "o_proj"]) for name in "gh"]
    prompts = [write_prompts(root / f"cli{i}.jsonl", 8, seed=10 + i) for i in range(2)]
    model = tiny_llama_folder(root / "cli-model")
    out = tmp_path / "pp"
    code = main(["merge", *map(str, folders), "--method", "regmean_pp", "-p", "rounds=0", "--rank", "4", "--model",
                 str(model), "--prompts", *map(str, prompts), "-o", str(out), "-q"])
    captured = capsys.readouterr()
    assert code == 0 and "regmean_pp" in captured.out and "retention" in captured.out
    loaded = [ll.load_adapter(f) for f in folders]
    expected = merge_regmean_pp(loaded, model=model, prompts=prompts, rank=4)
    assert_same(ll.load_adapter(out), expected)
    code = main(["merge", *map(str, folders), "--method", "regmean_pp", "--calibration", "x", "y", "-o",
                 str(tmp_path / "no")])
    assert code == 2 and "not --calibration" in capsys.readouterr().err
    code = main(["merge", *map(str, folders), "--method", "regmean_pp", "-o", str(tmp_path / "no")])
    assert code == 2 and "--prompts P1 P2" in capsys.readouterr().err
    code = main(["merge", *map(str, folders), "--method", "regmean_pp", "-p", "within=merged", "--model", str(model),
                 "--prompts", *map(str, prompts), "-o", str(tmp_path / "no")])
    assert code == 2 and "within" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_adapters_on_different_modules_merge_as_a_union_without_chunk_warnings(setup, recwarn):
    model, tokenizer, prompts = setup["model"], setup["tokenizer"], setup["prompts"]
    first = setup["adapters"][0]
    q, v = (Adapter({m: f for m, f in first.items() if m.endswith(s)}, {}, s) for s in ("q_proj", "v_proj"))
    result = merge_regmean_pp([q, v], model=model, tokenizer=tokenizer, prompts=prompts)
    assert set(result) == set(q) | set(v)
    assert_same(result, Adapter({**dict(q.items()), **dict(v.items())}, {}, "union"))
    assert not [w for w in recwarn if "no module in common" in str(w.message)]
