"""PEFT folder I/O against PEFT itself: load_adapter's deltas equal PEFT's get_delta_weight, save_adapter's
folders load in PeftModel.from_pretrained with the same deltas, malformed adapters fail with
AdapterFormatError naming the folder, and writes are atomic."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lora_lego as ll
import lora_lego.formats.peft as peft_io
from conftest import (
    assert_matches_peft,
    build_peft_model,
    edit_config,
    edit_tensors,
    file_checksums,
    load_peft,
    lora_layers,
    peft_deltas,
    save_peft_model,
    tiny_gpt2,
)
from lora_lego.errors import AdapterFormatError, LoraLegoWarning, OutputError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
Q0, Q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
V0, V1 = "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"
K0 = "model.layers.0.self_attn.k_proj"
EMBED = "model.embed_tokens"
PATTERNS = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, lora_alpha=8,
                rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                alpha_pattern={"v_proj": 5, "layers.1.self_attn.q_proj": 3})


def load_quietly(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraLegoWarning)
        return ll.load_adapter(folder)


def assert_loads_in_peft(folder, adapter, *, base=None, fan_in_fan_out=False):
    """PEFT loads `folder` with no missing or unexpected keys, onto exactly the adapter's modules, same deltas."""
    kwargs = {} if base is None else {"base": base}
    model = load_peft(folder, **kwargs)
    result = model.load_adapter(str(folder), adapter_name="again")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_matches_peft(adapter, peft_deltas(model), fan_in_fan_out=fan_in_fan_out)
    assert_matches_peft(adapter, peft_deltas(model, "again"), fan_in_fan_out=fan_in_fan_out)
    return model


# ---------------------------------------------------------------- round trips


def test_round_trip_fp32_is_bitwise(tmp_path, peft_adapter):
    folder = peft_adapter("a", **PATTERNS)
    first = ll.load_adapter(folder)
    assert first.metadata["dtype"] == "float32"
    ll.save_adapter(first, tmp_path / "out")
    second = ll.load_adapter(tmp_path / "out")
    assert list(second) == list(first)
    for module, factors in first.items():
        assert second[module].kind == factors.kind
        assert second[module].A.dtype == torch.float32
        assert torch.equal(second[module].A, factors.A) and torch.equal(second[module].B, factors.B), module
    assert load_file(tmp_path / "out" / "adapter_model.safetensors")[f"base_model.model.{Q0}.lora_A.weight"].dtype \
        == torch.float32


def test_round_trip_bf16_keeps_bf16_and_fp32_overrides(tmp_path):
    peft_model = build_peft_model("bf", lora_dtype=torch.bfloat16)  # r=4, alpha=8: scaling 2
    folder = save_peft_model(peft_model, tmp_path / "bf")
    assert all(t.dtype == torch.bfloat16 for t in load_file(folder / "adapter_model.safetensors").values())
    adapter = ll.load_adapter(folder)
    assert adapter.metadata["dtype"] == "bfloat16"
    layers = lora_layers(peft_model)
    for module, factors in adapter.items():
        assert factors.A.dtype == torch.float32  # computed in float32 whatever the input
        root = 2.0 ** 0.5
        assert torch.equal(factors.A, layers[module].lora_A["default"].weight.float() * root)
        assert torch.equal(factors.B, layers[module].lora_B["default"].weight.float() * root)

    ll.save_adapter(adapter, tmp_path / "default")
    saved = load_file(tmp_path / "default" / "adapter_model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    again = ll.load_adapter(tmp_path / "default")
    assert again.metadata["dtype"] == "bfloat16"
    for module, factors in adapter.items():
        # sqrt(2) folded in is not a bf16 number: one rounding per entry (bf16 has 8 significant bits)
        torch.testing.assert_close(again[module].A, factors.A, rtol=2 ** -8, atol=0)
        torch.testing.assert_close(again[module].B, factors.B, rtol=2 ** -8, atol=0)
        assert not torch.equal(again[module].A, factors.A)

    ll.save_adapter(adapter, tmp_path / "fp32", dtype="fp32")
    assert {t.dtype for t in load_file(tmp_path / "fp32" / "adapter_model.safetensors").values()} == {torch.float32}
    exact = ll.load_adapter(tmp_path / "fp32")
    assert exact.metadata["dtype"] == "float32"
    for module, factors in adapter.items():
        assert torch.equal(exact[module].A, factors.A) and torch.equal(exact[module].B, factors.B)


@pytest.mark.parametrize("stored, written", [(torch.float16, torch.float16), (torch.float64, torch.float32)])
def test_default_output_dtype_follows_the_input(tmp_path, stored, written):
    # float64 is no output dtype (factors are computed in float32): the default falls back to float32
    folder = save_peft_model(build_peft_model("d", lora_dtype=stored), tmp_path / "in")
    adapter = ll.load_adapter(folder)
    assert adapter.metadata["dtype"] == str(stored).removeprefix("torch.")
    ll.save_adapter(adapter, tmp_path / "out")
    assert {t.dtype for t in load_file(tmp_path / "out" / "adapter_model.safetensors").values()} == {written}


def test_stored_dtype_tie_goes_to_the_widest(tmp_path):
    # q_proj factors fp32, v_proj factors bf16: a tie, decided the same way in every run (not by set order)
    folder = save_peft_model(build_peft_model("tie"), tmp_path / "in")
    edit_tensors(folder, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items() if "v_proj" in k}))
    assert ll.load_adapter(folder).metadata["dtype"] == "float32"
    edit_tensors(folder, lambda t: t.update({k: v.half() for k, v in t.items() if "q_proj" in k}))
    assert ll.load_adapter(folder).metadata["dtype"] == "bfloat16"  # same width: the first by name


def test_round_trip_bf16_is_bitwise_when_the_scale_is_a_power_of_four(tmp_path):
    # alpha / r = 4: sqrt(4) = 2 on each factor is exact in bf16, so nothing is rounded
    folder = save_peft_model(build_peft_model("p4", lora_alpha=16, lora_dtype=torch.bfloat16), tmp_path / "p4")
    adapter = ll.load_adapter(folder)
    ll.save_adapter(adapter, tmp_path / "out")
    again = ll.load_adapter(tmp_path / "out")
    for module, factors in adapter.items():
        assert torch.equal(again[module].A, factors.A) and torch.equal(again[module].B, factors.B)


# ---------------------------------------------------------------- deltas equal PEFT's get_delta_weight

CASES = {
    "plain r4 a8": dict(r=4, lora_alpha=8),
    "alpha != r": dict(r=4, lora_alpha=3, target_modules=ALL_LINEAR),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR),
    "rslora r=3": dict(r=3, lora_alpha=5, use_rslora=True),
    "patterns": PATTERNS,
    "regex pattern": dict(target_modules=["q_proj", "up_proj", "down_proj"], r=4, lora_alpha=4,
                          rank_pattern={r"layers\.0\.mlp\..*_proj": 3}, alpha_pattern={r"layers\.0\.mlp\..*_proj": 9}),
}


@pytest.mark.parametrize("kwargs", CASES.values(), ids=CASES.keys())
def test_delta_equals_peft_get_delta_weight(peft_adapter, kwargs):
    peft_model = build_peft_model("case", **kwargs)
    folder = peft_adapter("case", **kwargs)
    adapter = ll.load_adapter(folder)
    assert_matches_peft(adapter, peft_deltas(peft_model))  # the model that made the folder
    assert_matches_peft(adapter, peft_deltas(load_peft(folder)))  # and PEFT's reading of the folder
    for module, layer in lora_layers(peft_model).items():  # same rank and scaling as PEFT's layers
        assert adapter[module].rank == layer.r["default"]
        assert adapter.metadata["scaling"][module] == pytest.approx(layer.scaling["default"], rel=1e-12)


def test_rank_and_alpha_patterns_follow_peft_matching(peft_adapter):
    adapter = ll.load_adapter(peft_adapter("p", **PATTERNS))
    ranks, scaling = adapter.ranks, adapter.metadata["scaling"]
    # "v_proj" matches every v_proj; "layers.1.self_attn.q_proj" only layer 1's q_proj; others keep r / alpha
    assert ranks[V0] == ranks[V1] == 2 and scaling[V0] == scaling[V1] == 5 / 2
    assert ranks[Q1] == 6 and scaling[Q1] == 3 / 6
    assert ranks[Q0] == ranks[K0] == 4 and scaling[Q0] == scaling[K0] == 8 / 4
    assert peft_io.pattern_value({"proj": 1}, Q0, 7) == 7  # a pattern matches whole dotted name parts only
    assert peft_io.pattern_value({"self_attn.q_proj": 1}, Q0, 7) == 1
    assert peft_io.pattern_value({"layers.1.self_attn.q_proj": 1}, "model.layers.11.self_attn.q_proj", 7) == 7


def test_rslora_with_rank_pattern(peft_adapter):
    kwargs = dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 6})
    adapter = ll.load_adapter(peft_adapter("rp", **kwargs))
    assert adapter.metadata["scaling"][V0] == pytest.approx(8 / 2 ** 0.5)
    assert adapter.metadata["scaling"][Q0] == pytest.approx(6 / 2)
    assert_matches_peft(adapter, peft_deltas(build_peft_model("rp", **kwargs)))


def test_embedding_lora(peft_adapter):
    kwargs = dict(target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8)
    folder = peft_adapter("emb", **kwargs)
    # PEFT saves a copy of the base embedding beside the LoRA factors
    assert f"base_model.model.{EMBED}.base_layer.weight" in load_file(folder / "adapter_model.safetensors")
    with pytest.warns(LoraLegoWarning, match="base_layer") as caught:
        adapter = ll.load_adapter(folder)
    assert str(folder) in str(caught[0].message)
    assert adapter[EMBED].kind == "embedding" and adapter[Q0].kind == "linear"
    assert adapter[EMBED].shape == (32, 100)  # (embedding size, number of embeddings): update is delta.T
    assert_matches_peft(adapter, peft_deltas(build_peft_model("emb", **kwargs)))

    ll.save_adapter(adapter, folder.parent / "out")
    saved = load_file(folder.parent / "out" / "adapter_model.safetensors")
    assert f"base_model.model.{EMBED}.lora_embedding_A" in saved
    assert not any("base_layer" in key for key in saved)
    assert_loads_in_peft(folder.parent / "out", adapter)


def test_fan_in_fan_out_gpt2(peft_adapter):
    kwargs = dict(target_modules=["c_attn"], fan_in_fan_out=True, r=4, lora_alpha=6, base=tiny_gpt2)
    folder = peft_adapter("gpt2", **kwargs)
    adapter = ll.load_adapter(folder)
    assert adapter.metadata["fan_in_fan_out"] is True
    module = "transformer.h.0.attn.c_attn"
    assert adapter[module].shape == (96, 32)  # (out, in) although Conv1D stores its weight (in, out)
    reference = peft_deltas(build_peft_model("gpt2", **kwargs))
    assert reference[module].shape == (32, 96)
    assert_matches_peft(adapter, reference, fan_in_fan_out=True)

    ll.save_adapter(adapter, folder.parent / "out")
    assert json.loads((folder.parent / "out" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert_loads_in_peft(folder.parent / "out", adapter, base=tiny_gpt2, fan_in_fan_out=True)


def test_pytorch_bin_weights(peft_adapter):
    kwargs = dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    folder = peft_adapter("bin", safe_serialization=False, **kwargs)
    assert (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").exists()
    adapter = ll.load_adapter(folder)
    assert_matches_peft(adapter, peft_deltas(build_peft_model("bin", **kwargs)))


# ---------------------------------------------------------------- saved output


def test_saved_config_and_peft_reload_with_mixed_ranks(tmp_path, peft_adapter):
    folder = peft_adapter("mixed", **PATTERNS)
    adapter = ll.load_adapter(folder)
    out = ll.save_adapter(adapter, tmp_path / "out")
    config = json.loads((out / "adapter_config.json").read_text())
    # ranks: q0 k0 o0 k1 o1 -> 4 (most common), v0 v1 -> 2, q1 -> 6
    assert config["peft_type"] == "LORA"
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert config["rank_pattern"] == {V0: 2, V1: 2, Q1: 6}
    assert config["alpha_pattern"] == {V0: 2, V1: 2, Q1: 6}
    assert config["target_modules"] == sorted(adapter.modules)
    assert len(config["target_modules"]) == 8
    assert config["use_rslora"] is False and config["use_dora"] is False
    assert config["base_model_name_or_path"] == "tiny-llama"
    model = assert_loads_in_peft(out, adapter)
    for module, layer in lora_layers(model).items():
        assert layer.r["default"] == adapter[module].rank and layer.scaling["default"] == 1.0


def test_provenance_in_safetensors_metadata(tmp_path, peft_adapter):
    a = ll.load_adapter(peft_adapter("a"))
    b = ll.load_adapter(peft_adapter("b", r=2, lora_alpha=2))
    merged = ll.merge([a, b], "concat", weights=[1.0, 0.5], seed=3)
    out = ll.save_adapter(merged, tmp_path / "merged")
    with safe_open(out / "adapter_model.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "pt"
    provenance = json.loads(metadata["lora_lego"])
    assert provenance["tool"] == "lora-lego" and provenance["version"] == ll.__version__
    assert provenance["method"] == "concat" and provenance["seed"] == 3
    assert provenance["weights"] == [1.0, 0.5]
    assert provenance["sources"] == [a.name, b.name]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["rank_pattern"] == {}
    # bitwise-identical files for the same adapter (safetensors alone writes its metadata in hash-map order)
    for attempt in range(6):
        again = ll.save_adapter(merged, tmp_path / f"again{attempt}")
        assert file_checksums(again) == file_checksums(out)
    size = int.from_bytes((out / "adapter_model.safetensors").read_bytes()[:8], "little")
    assert (8 + size) % 8 == 0
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert_loads_in_peft(out, merged)


# ---------------------------------------------------------------- malformed adapters


def expect_format_error(folder, *fragments):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraLegoWarning)
        with pytest.raises(AdapterFormatError) as caught:
            ll.load_adapter(folder)
    message = str(caught.value)
    assert str(folder) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_dora_is_refused(peft_adapter):
    folder = peft_adapter("dora", use_dora=True)
    expect_format_error(folder, "DoRA")
    edit_config(folder, use_dora=False)  # config says plain LoRA but the tensors are DoRA's
    expect_format_error(folder, "DoRA", f"{Q0}.lora_magnitude_vector")


def test_lora_bias_is_refused(peft_adapter):
    folder = peft_adapter("bias", lora_bias=True)
    expect_format_error(folder, "lora_bias")
    edit_config(folder, lora_bias=False)
    expect_format_error(folder, "lora_bias", f"{Q0}.lora_B.bias")


def test_non_lora_peft_type_is_refused(peft_adapter):
    from peft import IA3Config

    folder = peft_adapter("ia3", config_class=IA3Config, target_modules=["k_proj", "v_proj", "down_proj"],
                          feedforward_modules=["down_proj"])
    expect_format_error(folder, "IA3")
    lora = peft_adapter("edited")
    edit_config(lora, peft_type="LOHA")
    expect_format_error(lora, "LOHA")


def test_unknown_tensor_key_is_refused(peft_adapter):
    folder = peft_adapter("stray")
    stray = f"base_model.model.{Q0}.lora_C.weight"
    edit_tensors(folder, lambda t: t.update({stray: torch.ones(2, 2)}))
    expect_format_error(folder, stray)


def test_missing_weights_file(peft_adapter):
    folder = peft_adapter("empty")
    (folder / "adapter_model.safetensors").unlink()
    expect_format_error(folder, "adapter_model.safetensors", "adapter_model.bin")


def test_missing_config(peft_adapter):
    folder = peft_adapter("noconfig")
    (folder / "adapter_config.json").unlink()
    expect_format_error(folder, "adapter_config.json")


def test_truncated_safetensors(peft_adapter):
    folder = peft_adapter("cut")
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_format_error(folder, "adapter_model.safetensors")


def test_rank_in_tensors_differs_from_config(peft_adapter):
    folder = peft_adapter("rank")
    edit_config(folder, r=8)
    expect_format_error(folder, "rank 4", "r=8", Q0)


def test_lora_a_b_shape_mismatch(peft_adapter):
    folder = peft_adapter("shape")
    key = f"base_model.model.{V1}.lora_B.weight"
    edit_tensors(folder, lambda t: t.update({key: torch.ones(16, 5)}))
    expect_format_error(folder, V1, "lora_A has shape (4, 32)", "(16, 5)")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensor(peft_adapter, value):
    folder = peft_adapter("nan")
    key = f"base_model.model.{V0}.lora_A.weight"

    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][1, 2] = value

    edit_tensors(folder, poison)
    expect_format_error(folder, V0, "lora_A", "NaN or Inf")


def test_config_values_are_checked(peft_adapter):
    folder = peft_adapter("badalpha")
    edit_config(folder, lora_alpha="eight")
    expect_format_error(folder, "lora_alpha")
    (folder / "adapter_config.json").write_text("{not json")
    expect_format_error(folder, "adapter_config.json")


# ---------------------------------------------------------------- atomic, careful writes


def test_existing_output_needs_overwrite(tmp_path, peft_adapter):
    adapter = ll.load_adapter(peft_adapter("a"))
    other = ll.load_adapter(peft_adapter("b", r=2))
    out = tmp_path / "out"
    ll.save_adapter(adapter, out)
    before = file_checksums(out)
    with pytest.raises(OutputError, match="already exists"):
        ll.save_adapter(other, out)
    assert file_checksums(out) == before
    (out / "junk.txt").write_text("left over")
    ll.save_adapter(other, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert ll.load_adapter(out).ranks == other.ranks
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_behind(tmp_path, peft_adapter, monkeypatch, existing):
    adapter = ll.load_adapter(peft_adapter("a"))
    parent = tmp_path / "outputs"
    out = parent / "merged"
    if existing:
        ll.save_adapter(adapter, out)
        before = file_checksums(out)

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as stream:
            stream.write(b"\x00" * 64)  # half a file, then the disk fills up
        raise RuntimeError("disk full")

    monkeypatch.setattr(peft_io, "save_file", broken_save_file)
    with pytest.raises(RuntimeError, match="disk full"):
        ll.save_adapter(adapter, out, overwrite=True)
    if existing:
        assert file_checksums(out) == before  # the previous output is intact
        assert sorted(p.name for p in parent.iterdir()) == ["merged"]
    else:
        assert list(parent.iterdir()) == []


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporary_folders_are_removed(tmp_path, peft_adapter):
    adapter = ll.load_adapter(peft_adapter("a"))
    pid = dead_pid()
    stale_tmp = tmp_path / f".out.tmp-{pid}-xyz"
    stale_old = tmp_path / f".out.old-{pid}-abc"
    alive = tmp_path / f".out.tmp-{os.getpid()}-live"  # a write in progress in a running process
    other = tmp_path / f".other.tmp-{pid}-xyz"  # a different output's temporary
    for folder in (stale_tmp, stale_old, alive, other):
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"partial")
    ll.save_adapter(adapter, tmp_path / "out")
    assert not stale_tmp.exists() and not stale_old.exists()
    assert alive.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["inputs", "out", alive.name, other.name])


def test_inputs_are_not_modified(tmp_path, peft_adapter):
    folders = [peft_adapter("a", **PATTERNS), peft_adapter("b", target_modules=["embed_tokens", "q_proj"]),
               peft_adapter("c", safe_serialization=False, use_rslora=True)]
    before = [file_checksums(f) for f in folders]
    adapters = [load_quietly(f) for f in folders]
    originals = [{m: (f.A.clone(), f.B.clone()) for m, f in a.items()} for a in adapters]
    merged = ll.merge(adapters, "concat", weights=[1.0, -0.5, 2.0])
    ll.save_adapter(merged, tmp_path / "out")
    ll.save_adapter(adapters[0], tmp_path / "copy")
    assert [file_checksums(f) for f in folders] == before
    for adapter, original in zip(adapters, originals):
        for module, (A, B) in original.items():
            assert torch.equal(adapter[module].A, A) and torch.equal(adapter[module].B, B)
