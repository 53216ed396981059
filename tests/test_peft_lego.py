"""End to end against PEFT for `lego`: adapters made by PEFT with ranks 4, 8 and 16 and different alphas
(one with rslora) merge into one adapter whose saved folder PeftModel.from_pretrained loads unchanged,
with PEFT's deltas equal to ours and the model output equal to the base plus those deltas; `prune` and
the CLI do the same on one adapter."""

import json

import pytest
import torch

import lora_lego as ll
from conftest import assert_matches_peft, load_peft, lora_layers, peft_deltas, relative_error, tiny_llama
from lora_lego.cli import main

HETEROGENEOUS = {
    "r4": dict(r=4, lora_alpha=8),
    "r8": dict(r=8, lora_alpha=16, use_rslora=True),
    "r16": dict(r=16, lora_alpha=4),
}


@pytest.fixture
def folders(peft_adapter):
    return [peft_adapter(name, **kwargs) for name, kwargs in HETEROGENEOUS.items()]


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 42, 7, 99, 0, 3]])).logits.double()


def base_plus(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the tiny base model with `deltas` (module path -> weight-layout delta) added by hand."""
    model = tiny_llama()
    state = model.state_dict()
    for module, delta in deltas.items():
        state[f"{module}.weight"] += delta
    model.load_state_dict(state)
    return logits(model)


@pytest.mark.parametrize("rank", [8, 6])
def test_lego_merge_of_ranks_4_8_16_loads_in_peft(tmp_path, folders, rank):
    adapters = [ll.load_adapter(f) for f in folders]
    assert [a["model.layers.0.self_attn.q_proj"].rank for a in adapters] == [4, 8, 16]
    merged = ll.merge(adapters, "lego", rank=rank, seed=3)
    out = ll.save_adapter(merged, tmp_path / "merged")
    peft_model = load_peft(out)
    assert {layer.r["default"] for layer in lora_layers(peft_model).values()} == {rank}
    assert_matches_peft(merged, peft_deltas(peft_model))
    # the merged model is the base plus the merged deltas, and differs from the base
    expected = base_plus({m: f.delta() for m, f in merged.items()})
    assert relative_error(logits(peft_model), expected) < 1e-5
    assert relative_error(logits(tiny_llama()), expected) > 1e-4
    report = merged.metadata["report"]["model.layers.1.self_attn.v_proj"]
    assert sum(report["cluster_sizes"]) == 4 + 8 + 16
    assert 0 < report["relative_error"] < 1


def test_lego_with_k_at_least_units_and_no_reweighting_is_the_exact_sum_in_peft(tmp_path, folders):
    adapters = [ll.load_adapter(f) for f in folders]
    merged = ll.merge(adapters, "lego", rank=28, param_norm="off", output_reweight=False)
    out = ll.save_adapter(merged, tmp_path / "merged", dtype="fp32")
    expected = {}
    for folder in folders:
        for module, delta in peft_deltas(load_peft(folder)).items():
            expected[module] = expected.get(module, 0) + delta
    assert_matches_peft(ll.load_adapter(out), expected, tol=1e-5)


def test_cli_merge_and_prune_outputs_load_in_peft(tmp_path, folders, capsys):
    merged, pruned, report = tmp_path / "merged", tmp_path / "pruned", tmp_path / "report.json"
    assert main(["merge", *map(str, folders), "--method", "lego", "--rank", "8", "-o", str(merged),
                 "--report", str(report)]) == 0
    assert main(["prune", str(folders[2]), "--rank", "4", "-o", str(pruned)]) == 0
    assert {layer.r["default"] for layer in lora_layers(load_peft(merged)).values()} == {8}
    assert {layer.r["default"] for layer in lora_layers(load_peft(pruned)).values()} == {4}
    assert_matches_peft(ll.load_adapter(pruned), peft_deltas(load_peft(pruned)))
    assert set(json.loads(report.read_text())["modules"]) == set(ll.load_adapter(merged).modules)
