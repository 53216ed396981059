"""Calibrated merging end to end on a tiny Llama and PEFT adapters: `merge --model/--prompts` and `calibrate`
then `merge --calibration` give the same folder, which PEFT loads; each bad input is one line, exit 2,
and leaves nothing behind."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
import lora_lego as ll
from conftest import (
    LLAMA,
    assert_matches_peft,
    file_checksums,
    load_peft,
    make_peft_adapter,
    peft_deltas,
    run_cli,
    tiny_gpt2,
    tiny_llama_folder,
    write_prompts,
)
from lora_lego.tensorfile import read_header

SPECS = {"sst": dict(r=4, lora_alpha=8), "nli": dict(r=2, lora_alpha=5, use_rslora=True,
                                                      target_modules=["q_proj", "v_proj", "down_proj"])}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrated")
    model = tiny_llama_folder(root / "model")
    adapters = [make_peft_adapter(root / "inputs", name, **kwargs) for name, kwargs in SPECS.items()]
    prompts = [write_prompts(root / f"{name}.jsonl", 12, seed=i) for i, name in enumerate(SPECS)]
    return root, model, adapters, prompts


run = run_cli


def test_merge_with_prompts_equals_the_api_and_loads_in_peft(setup, tmp_path, capsys):
    root, model, adapters, prompts = setup
    out = tmp_path / "merged"
    code, stdout, _ = run(capsys, "merge", *adapters, "--method", "regmean", "--model", model, "--prompts", *prompts,
                          "--rank", 3, "-o", out, "-q")
    assert code == 0 and "regmean" in stdout
    loaded = [ll.load_adapter(a) for a in adapters]
    calibrations = [ll.calibrate(model, p, modules=list(a)) for a, p in zip(loaded, prompts)]
    expected = ll.merge(loaded, "regmean", calibration=calibrations, rank=3)
    result = ll.load_adapter(out)
    for module, factors in expected.items():
        torch.testing.assert_close(result[module].delta(), factors.delta(), rtol=1e-5, atol=1e-7)
    assert_matches_peft(result, peft_deltas(load_peft(out)), tol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # the temporary calibrations are gone
    provenance = json.loads(read_header(out / "adapter_model.safetensors")[1]["lora_lego"])
    assert [c["prompts"] for c in provenance["calibration"]] == [str(p) for p in prompts]
    hashes = [c.metadata["prompts_sha256"] for c in calibrations]
    assert [c["prompts_sha256"] for c in provenance["calibration"]] == hashes
    assert {c["model"] for c in provenance["calibration"]} == {str(model)}


def test_calibrate_then_merge_with_calibrations_gives_the_same_file(setup, tmp_path, capsys):
    root, model, adapters, prompts = setup
    calibrations = []
    for adapter, prompt in zip(adapters, prompts):
        calibrations.append(tmp_path / f"calib-{adapter.name}")
        code, stdout, _ = run(capsys, "calibrate", "--model", model, "--prompts", prompt, "--adapter", adapter, "-o",
                              calibrations[-1], "-q")
        assert code == 0 and "calibrate: 12 prompts" in stdout
    code, stdout, _ = run(capsys, "inspect", calibrations[0])
    assert code == 0 and "calibration" in stdout and "prompts_sha256" in stdout
    merged = {}
    sources = [("cached", ["--calibration", *calibrations]), ("direct", ["--model", model, "--prompts", *prompts])]
    for name, source in sources:
        merged[name] = tmp_path / name
        assert run(capsys, "merge", *adapters, "--method", "lego_calibrated", *source, "-o", merged[name], "-q")[0] == 0
    # the calibrations made with --adapter are the adapted-activation ones: compare with --activations adapted
    assert file_checksums(merged["cached"]) != file_checksums(merged["direct"])
    merged["adapted"] = tmp_path / "adapted"
    assert run(capsys, "merge", *adapters, "--method", "lego_calibrated", "--model", model, "--prompts", *prompts,
               "--activations", "adapted", "-o", merged["adapted"], "-q")[0] == 0
    # the same tensors and config; the direct merge was also scored on the prompts (retention in its provenance)
    same = ("adapter_config.json",)
    assert {k: v for k, v in file_checksums(merged["cached"]).items() if k in same} == {
        k: v for k, v in file_checksums(merged["adapted"]).items() if k in same}
    from safetensors.torch import load_file
    cached, adapted = (load_file(merged[n] / "adapter_model.safetensors") for n in ("cached", "adapted"))
    assert cached.keys() == adapted.keys() and all(torch.equal(cached[k], adapted[k]) for k in cached)
    assert "retention" in (merged["adapted"] / "README.md").read_text()
    load_peft(merged["adapted"])


def test_bad_calibration_inputs_are_one_line_errors_that_leave_nothing(setup, tmp_path, capsys):
    root, model, adapters, prompts = setup
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    other = tiny_llama_folder(tmp_path / "other-model", seed=1)  # same shapes, other weights
    wide = tmp_path / "wide-model"
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(**{**LLAMA, "hidden_size": 48})).save_pretrained(wide)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (wide / name).write_bytes((model / name).read_bytes())
    gpt2 = make_peft_adapter(tmp_path, "gpt2", base=tiny_gpt2, target_modules=["c_attn"], fan_in_fan_out=True)
    for target, source in [("c0", model), ("c1", other), ("w1", wide)]:
        code = run(capsys, "calibrate", "--model", source, "--prompts", prompts[0], "-o", tmp_path / target, "-q")[0]
        assert code == 0
    before = {p.name for p in tmp_path.iterdir()}
    out = tmp_path / "out"
    cases = [
        (["--prompts", prompts[0]], "got 1 prompts files for 2 adapters"),
        (["--prompts", *prompts], "--prompts needs --model"),
        (["--model", model, "--prompts", prompts[0], empty], "holds no prompts"),
        (["--calibration", tmp_path / "c0", tmp_path / "c1"], "calibrations were made on different base models"),
        (["--calibration", tmp_path / "w1", tmp_path / "w1"], "48 x 48 Gram but the adapter's module has d_in = 32"),
        (["--calibration", tmp_path / "c0", tmp_path / "missing"], "no calibration.safetensors there"),
        (["--calibration", tmp_path / "c0", tmp_path / "c0", "--model", model], "--model is used with --prompts"),
        ([], "needs calibration data"),
    ]
    for extra, message in cases:
        code, _, err = run(capsys, "merge", *adapters, "--method", "regmean", "-o", out, "-q", *extra)
        assert code == 2 and message in err and "\n" not in err, (extra, err)
    code, _, err = run(capsys, "merge", *adapters, "--method", "ties", "--calibration", tmp_path / "c0",
                       tmp_path / "c0", "-o", out)
    assert code == 2 and "does not use calibration data" in err
    code, _, err = run(capsys, "merge", adapters[0], gpt2, "--method", "regmean", "--model", model,
                       "--prompts", *prompts, "-o", out, "-q")
    assert code == 2 and "has no module 'transformer.h.0.attn.c_attn'" in err, err
    assert {p.name for p in tmp_path.iterdir()} == before  # no output, no temporary calibration left


def test_missing_transformers_is_one_line_naming_the_extra(setup, tmp_path, capsys, without_transformers):
    root, model, adapters, prompts = setup
    code, _, err = run(capsys, "merge", *adapters, "--method", "regmean", "--model", model, "--prompts", *prompts,
                       "-o", tmp_path / "out", "-q")
    assert code == 2 and 'pip install "lora-lego[calibrate]"' in err and not (tmp_path / "out").exists()
