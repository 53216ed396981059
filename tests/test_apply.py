"""`apply_adapter` / `lora-lego apply`: folding a PEFT LoRA into a sharded transformers checkpoint equals PEFT's
merge_and_unload, and every bad input is refused in one line before anything is written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import GPT2, build_peft_model, edit_tensors, file_checksums, save_peft_model, tiny_gpt2
from lora_lego import cli, load_adapter, save_adapter
from lora_lego.deploy.apply import apply_adapter
from lora_lego.errors import AdapterFormatError, BaseModelError, IncompatibleAdaptersError, LoraLegoWarning, OutputError
from lora_lego.types import Adapter, LoraFactors

LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=64, tie_word_embeddings=False)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama(seed: int = 0, **changes):
    """A tiny LlamaForCausalLM (hidden 32, 2 layers, vocab 64), the same weights for the same arguments."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **changes})).eval()


def factory(**changes):
    return lambda: llama(**changes)


def save_base(model, folder: Path, **kwargs) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, max_shard_size="20KB", **kwargs)
    return folder


def adapter_and_base(tmp_path: Path, base=factory(), name: str = "a", **config):
    """(PEFT model, its saved adapter folder, the saved sharded base folder)."""
    peft_model = build_peft_model(name, base=base, **{"target_modules": TARGETS, **config})
    folder = save_peft_model(peft_model, tmp_path / name, save_embedding_layers=False)  # LoRA factors only
    return peft_model, folder, save_base(base(), tmp_path / "base")


def load_state(folder: Path, model_class=None) -> dict[str, torch.Tensor]:
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = (model_class or LlamaForCausalLM).from_pretrained(folder)
    return {key: value.detach().float() for key, value in model.state_dict().items()}


def merged_state(peft_model) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {key: value.detach().float() for key, value in peft_model.merge_and_unload().state_dict().items()}


def max_difference(actual: dict, expected: dict) -> float:
    """The largest absolute difference over all tensors, divided by the tensor's largest |value| where that
    exceeds 1 (float32 rounding of sums near 18, as in PEFT's embedding LoRAs, is 2e-6 whatever the order)."""
    assert set(actual) == set(expected)
    return max(float((actual[key] - expected[key]).abs().max() / expected[key].abs().max().clamp(min=1))
               for key in expected)


def changed(actual: dict, reference: dict) -> set[str]:
    return {key for key in reference if not torch.equal(actual[key], reference[key])}


def assert_nothing_written(output: Path) -> None:
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}.*")), "a temporary folder was left behind"


# --- equivalence with PEFT ----------------------------------------------------------------------------------------

def test_sharded_llama_equals_peft_merge_and_unload(tmp_path):
    peft_model, adapter, base = adapter_and_base(tmp_path)
    (base / "tokenizer.json").write_text('{"model": {}}')
    (base / "extra").mkdir()
    (base / "extra" / "notes.txt").write_text("kept")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 3 and (base / "model.safetensors.index.json").is_file()
    before = file_checksums(base)
    output = apply_adapter(adapter, base, tmp_path / "out")
    assert sorted(p.name for p in output.glob("*.safetensors")) == shards
    for name in ("config.json", "generation_config.json", "tokenizer.json", "extra/notes.txt"):
        assert (output / name).read_bytes() == (base / name).read_bytes(), name
    expected, original = merged_state(peft_model), load_state(base)
    actual = load_state(output)
    assert max_difference(actual, expected) < 1e-6
    assert len(changed(actual, original)) == 3 * 2
    assert all(k.split(".")[-2] in TARGETS for k in changed(actual, original))
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert file_checksums(base) == before  # the base is read only


def test_a_gguf_adapter_applies_like_its_peft_source(tmp_path):
    """merge -> GGUF -> apply: the base folder gives the head counts that undo llama.cpp's q / k order."""
    pytest.importorskip("gguf")
    peft_model, adapter, base = adapter_and_base(tmp_path, target_modules=["q_proj", "k_proj", "down_proj"])
    gguf_file = save_adapter(load_adapter(adapter), tmp_path / "a.gguf", base_config=base)
    assert cli.main(["apply", str(gguf_file), "--base", str(base), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert max_difference(load_state(tmp_path / "out"), merged_state(peft_model)) < 1e-6


def test_scale_multiplies_the_delta(tmp_path):
    peft_model, adapter, base = adapter_and_base(tmp_path)
    original, expected = load_state(base), merged_state(peft_model)
    actual = load_state(apply_adapter(adapter, base, tmp_path / "half", scale=0.5))
    half = {key: original[key] + 0.5 * (expected[key] - original[key]) for key in original}
    assert max_difference(actual, half) < 1e-6 and changed(actual, original)


def test_rslora_and_rank_alpha_patterns(tmp_path):
    peft_model, adapter, base = adapter_and_base(
        tmp_path, r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    assert max_difference(load_state(apply_adapter(adapter, base, tmp_path / "out")), merged_state(peft_model)) < 1e-6


def test_embedding_and_lm_head_of_an_untied_model(tmp_path):
    peft_model, adapter, base = adapter_and_base(tmp_path, target_modules=["embed_tokens", "lm_head", "q_proj"])
    actual = load_state(apply_adapter(adapter, base, tmp_path / "out"))
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= changed(actual, load_state(base))
    assert max_difference(actual, merged_state(peft_model)) < 1e-6


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    from transformers import GPT2LMHeadModel

    peft_model = build_peft_model("g", base=tiny_gpt2, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    adapter = save_peft_model(peft_model, tmp_path / "g")
    base = save_base(tiny_gpt2(), tmp_path / "base")  # tied wte / lm_head, no lm_head.weight saved: untouched here
    actual = load_state(apply_adapter(adapter, base, tmp_path / "out"), GPT2LMHeadModel)
    assert GPT2["n_embd"] == 32
    assert len(changed(actual, load_state(base, GPT2LMHeadModel))) == 2 * 4  # square c_proj too
    assert max_difference(actual, merged_state(peft_model)) < 1e-6


def test_adapter_of_the_bare_model_matches_the_causal_lm_checkpoint(tmp_path):
    """PEFT on LlamaModel names modules "layers.0...."; the LlamaForCausalLM checkpoint has "model.layers.0...."."""
    from transformers import LlamaConfig, LlamaModel

    def bare():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return LlamaModel(LlamaConfig(**LLAMA)).eval()

    peft_model = build_peft_model("bare", base=bare, target_modules=["q_proj"])
    adapter = save_peft_model(peft_model, tmp_path / "bare")
    base = save_base(llama(), tmp_path / "base")
    expected = {"model." + key: value for key, value in merged_state(peft_model).items()}
    actual = load_state(apply_adapter(adapter, base, tmp_path / "out"))
    assert max(float((actual[key] - value).abs().max()) for key, value in expected.items()) < 1e-6
    assert len(changed(actual, load_state(base))) == 2


def test_dtype_bf16_casts_the_float32_sums(tmp_path):
    peft_model, adapter, base = adapter_and_base(tmp_path)
    output = apply_adapter(adapter, base, tmp_path / "bf16", dtype="bf16")
    tensors = {key: value for path in output.glob("*.safetensors") for key, value in load_file(path).items()}
    assert {value.dtype for value in tensors.values()} == {torch.bfloat16}
    expected = merged_state(peft_model)
    assert all(torch.equal(tensors[key], expected[key].to(torch.bfloat16)) for key in expected)
    sizes = [json.loads((folder / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
             for folder in (base, output)]
    assert sizes[1] * 2 == sizes[0] == sum(v.numel() * 4 for v in expected.values())


@pytest.mark.parametrize("dtype, name", [("bf16", "bfloat16"), ("fp16", "float16")])
def test_config_dtype_follows_the_written_dtype(tmp_path, dtype, name):
    _, adapter, base = adapter_and_base(tmp_path)
    config = json.loads((base / "config.json").read_text())
    keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]
    output = apply_adapter(adapter, base, tmp_path / dtype, dtype=dtype)
    written = json.loads((output / "config.json").read_text())
    assert [written[key] for key in keys] == [name] * len(keys)
    assert {k: v for k, v in written.items() if k not in keys} == {k: v for k, v in config.items() if k not in keys}
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(output, torch_dtype="auto")
    assert model.dtype == getattr(torch, name)


def test_a_fold_that_overflows_the_output_dtype_writes_nothing(tmp_path, capsys):
    _, adapter, base = adapter_and_base(tmp_path)
    with pytest.raises(OutputError, match=r"tensor '.*' of .*safetensors \(module '.*' folded in at scale 1e\+30\) "
                                          r"would hold NaN or Inf in float16 \(largest \|value\| .* does not fit"):
        apply_adapter(adapter, base, tmp_path / "out", dtype="fp16", scale=1e30)
    assert_nothing_written(tmp_path / "out")
    capsys.readouterr()  # transformers' save progress
    code = cli.main(["apply", str(adapter), "--base", str(base), "-o", str(tmp_path / "out"), "--scale", "1e30",
                     "--dtype", "fp16", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "would hold NaN or Inf in float16" in err[0], err
    assert_nothing_written(tmp_path / "out")


def test_conv_kind_is_reshaped_onto_a_4d_weight(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    generator = torch.Generator().manual_seed(0)
    weights = {"conv.weight": torch.randn(6, 4, 3, 3, generator=generator),
               "conv.bias": torch.randn(6, generator=generator)}
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    factors = LoraFactors(torch.randn(2, 4 * 9, generator=generator), torch.randn(6, 2, generator=generator), "conv3x3")
    output = apply_adapter(Adapter({"conv": factors}, {"format": "peft"}), base, tmp_path / "out", scale=2.0)
    result = load_file(output / "model.safetensors")
    expected = weights["conv.weight"] + 2 * factors.delta().reshape(6, 4, 3, 3)
    assert torch.allclose(result["conv.weight"], expected, atol=1e-6)
    assert torch.equal(result["conv.bias"], weights["conv.bias"])


# --- tied embeddings ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("targets", [["lm_head"], ["embed_tokens", "q_proj"]])
def test_tied_embeddings_are_refused(tmp_path, targets):
    tied = factory(tie_word_embeddings=True)
    _, adapter, base = adapter_and_base(tmp_path, base=tied, target_modules=targets)
    assert "lm_head.weight" not in json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    with pytest.raises(IncompatibleAdaptersError) as caught:
        apply_adapter(adapter, base, tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message and "--untie" in message and "tie_word_embeddings" in message
    assert "model.embed_tokens.weight" in message and "both the input and the output embeddings" in message
    assert_nothing_written(tmp_path / "out")


def test_untie_writes_a_separate_head_that_reproduces_the_unmerged_peft_model(tmp_path):
    from transformers import LlamaForCausalLM

    tied = factory(tie_word_embeddings=True)
    peft_model, adapter, base = adapter_and_base(tmp_path, base=tied,
                                                 target_modules=["embed_tokens", "lm_head", "q_proj"])
    with pytest.warns(LoraLegoWarning, match="tie_word_embeddings false"):
        output = apply_adapter(adapter, base, tmp_path / "out", untie=True)
    assert json.loads((output / "config.json").read_text())["tie_word_embeddings"] is False
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
    tensors = {key: value for path in output.glob("*.safetensors") for key, value in load_file(path).items()}
    assert index["metadata"]["total_size"] == sum(value.numel() * value.element_size() for value in tensors.values())
    # the math: both start from the one tied matrix E; the input gets E + dE, the head E + dH
    E = load_state(base)["model.embed_tokens.weight"]
    layers = {name.removeprefix("base_model.model."): module for name, module in peft_model.named_modules()
              if name.endswith(("embed_tokens", "lm_head"))}
    with torch.no_grad():
        dE, dH = (layers[name].get_delta_weight("default") for name in ("model.embed_tokens", "lm_head"))
    expected = {"model.embed_tokens.weight": E + dE, "lm_head.weight": E + dH}
    assert max_difference({key: tensors[key] for key in expected}, expected) < 1e-6
    # and the untied model's logits are those of the PEFT model before any merge
    tokens = torch.arange(12).reshape(2, 6)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        reference = peft_model(input_ids=tokens).logits
        logits = LlamaForCausalLM.from_pretrained(output).eval()(input_ids=tokens).logits
    assert float((logits - reference).abs().max()) < 1e-5


@pytest.mark.parametrize("config, stored_head", [({"tie_word_embeddings": True}, True), ({}, False)])
def test_untied_head_starts_from_the_input_embedding(tmp_path, config, stored_head):
    """Tied by the config (a stale lm_head.weight stored too: transformers would load E there) or by a
    checkpoint without a head and no tie_word_embeddings key: the head written is E + dH either way."""
    generator = torch.Generator().manual_seed(0)
    E = torch.randn(10, 4, generator=generator)
    weights = {"model.embed_tokens.weight": E, "model.norm.weight": torch.ones(4)}
    if stored_head:
        weights["lm_head.weight"] = torch.randn(10, 4, generator=generator)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(config))
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    head = LoraFactors(torch.randn(2, 4, generator=generator), torch.randn(10, 2, generator=generator))
    adapter = Adapter({"lm_head": head}, {"format": "peft"})
    with pytest.raises(IncompatibleAdaptersError, match="--untie"):
        apply_adapter(adapter, base, tmp_path / "out")
    with pytest.warns(LoraLegoWarning, match="wrote a separate lm_head.weight"):
        output = apply_adapter(adapter, base, tmp_path / "out", untie=True)
    result = load_file(output / "model.safetensors")
    assert torch.allclose(result["lm_head.weight"], E + head.delta(), atol=1e-6)
    assert torch.equal(result["model.embed_tokens.weight"], E)
    assert json.loads((output / "config.json").read_text())["tie_word_embeddings"] is False


# --- refusals: one line, nothing written ----------------------------------------------------------------------------

def test_shape_mismatch_names_module_shapes_and_file(tmp_path):
    wide = factory(hidden_size=48, num_attention_heads=4)
    adapter = save_peft_model(build_peft_model("w", base=wide, target_modules=["q_proj"]), tmp_path / "w")
    base = save_base(llama(), tmp_path / "base")
    with pytest.raises(IncompatibleAdaptersError) as caught:
        apply_adapter(adapter, base, tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message and "model.layers.0.self_attn.q_proj" in message
    assert "(48, 48)" in message and "(32, 32)" in message and "model-0000" in message
    assert_nothing_written(tmp_path / "out")


def test_modules_missing_from_the_base_are_named_and_counted(tmp_path):
    deeper = factory(num_hidden_layers=3)
    adapter = save_peft_model(build_peft_model("d", base=deeper, target_modules=["q_proj", "v_proj"]), tmp_path / "d")
    base = save_base(llama(), tmp_path / "base")
    with pytest.raises(IncompatibleAdaptersError, match=r"2 of 6 module\(s\) have no weight") as caught:
        apply_adapter(adapter, base, tmp_path / "out")
    assert "model.layers.2.self_attn.q_proj.weight" in str(caught.value) and "\n" not in str(caught.value)
    assert_nothing_written(tmp_path / "out")


def test_pickled_base_is_refused(tmp_path):
    _, adapter, _ = adapter_and_base(tmp_path)
    base = tmp_path / "bin"
    base.mkdir()
    llama().config.save_pretrained(base)
    torch.save(llama().state_dict(), base / "pytorch_model.bin")
    with pytest.raises(BaseModelError, match=r"only pickled weights \('pytorch_model.bin'\)") as caught:
        apply_adapter(adapter, base, tmp_path / "out")
    assert "\n" not in str(caught.value)
    assert_nothing_written(tmp_path / "out")


def test_stray_pickled_weights_beside_safetensors_are_not_copied(tmp_path):
    _, adapter, base = adapter_and_base(tmp_path)
    torch.save({"x": torch.zeros(2)}, base / "pytorch_model.bin")
    with pytest.warns(LoraLegoWarning, match="did not copy 1 weight file"):
        output = apply_adapter(adapter, base, tmp_path / "out")
    assert not (output / "pytorch_model.bin").exists()


def test_kohya_adapter_is_refused():
    kohya = Adapter({"lora_unet_x": LoraFactors(torch.ones(1, 2), torch.ones(2, 1))}, {"format": "kohya"},
                    name="k.safetensors")
    with pytest.raises(AdapterFormatError, match="apply diffusion LoRAs in their UI"):
        apply_adapter(kohya, "unused", "unused-out")


def test_base_without_config_is_refused(tmp_path):
    _, adapter, base = adapter_and_base(tmp_path)
    (base / "config.json").unlink()
    with pytest.raises(BaseModelError, match="no config.json"):
        apply_adapter(adapter, base, tmp_path / "out")


def test_existing_output_needs_overwrite(tmp_path):
    peft_model, adapter, base = adapter_and_base(tmp_path)
    output = tmp_path / "out"
    output.mkdir()
    (output / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        apply_adapter(adapter, base, output)
    assert (output / "old.txt").is_file()
    apply_adapter(adapter, base, output, overwrite=True)
    assert not (output / "old.txt").exists()
    assert max_difference(load_state(output), merged_state(peft_model)) < 1e-6


@pytest.mark.parametrize("where", ["base", "base/out", "."])
def test_output_at_inside_or_around_the_base_is_refused(tmp_path, where):
    _, adapter, base = adapter_and_base(tmp_path)
    before = file_checksums(base)
    with pytest.raises(OutputError, match="base model folder"):
        apply_adapter(adapter, base, tmp_path / where, overwrite=True)
    assert file_checksums(base) == before


def test_nan_factor_read_mid_write_leaves_nothing(tmp_path):
    _, adapter, base = adapter_and_base(tmp_path)

    def poison(tensors):
        key = next(k for k in sorted(tensors) if "layers.1" in k and "lora_B" in k)
        tensors[key][0, 0] = float("nan")

    edit_tensors(adapter, poison)
    with pytest.raises(AdapterFormatError, match="NaN"):
        apply_adapter(adapter, base, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_full_disk_is_an_output_error_and_leaves_nothing(tmp_path, monkeypatch):
    from lora_lego import tensorfile

    _, adapter, base = adapter_and_base(tmp_path)

    def full(self, key, tensor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorfile.TensorWriter, "write", full)
    with pytest.raises(OutputError, match="No space left on device"):
        apply_adapter(adapter, base, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_too_little_free_space_is_refused_up_front(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    _, adapter, base = adapter_and_base(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OutputError, match="GiB free"):
        apply_adapter(adapter, base, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


# --- CLI --------------------------------------------------------------------------------------------------------------

def test_cli_apply_prints_one_summary_line(tmp_path, capsys):
    peft_model, adapter, base = adapter_and_base(tmp_path)
    capsys.readouterr()
    code = cli.main(["apply", str(adapter), "--base", str(base), "-o", str(tmp_path / "out"), "--scale", "1", "-q"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1
    shards = len(list(base.glob("*.safetensors")))
    assert out[0].startswith("apply:") and "6 modules" in out[0] and f"{shards} shard(s) written" in out[0]
    assert max_difference(load_state(tmp_path / "out"), merged_state(peft_model)) < 1e-6


def test_cli_bad_input_exits_2_with_one_error_line(tmp_path, capsys):
    _, adapter, _ = adapter_and_base(tmp_path)
    capsys.readouterr()  # transformers' save progress
    code = cli.main(["apply", str(adapter), "--base", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "config.json" in err[0]
    assert_nothing_written(tmp_path / "out")
