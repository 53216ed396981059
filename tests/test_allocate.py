"""The rank budget: greedy allocation never exceeds its budget and is exact at the sum of ranks; it gives ranks
where the spectrum is flat; an allocated merge keeps the parameter count of uniform rank r, and its mixed ranks
load in PEFT (rank_pattern), in our GGUF reader and pass the vLLM target's checks."""

from __future__ import annotations

import pytest
import torch

import lora_lego as ll
from conftest import assert_matches_peft, load_peft, make_peft_adapter, peft_deltas, tiny_llama_folder, write_prompts
from lora_lego.allocate import greedy_ranks
from lora_lego.deploy.targets import check_loads, get_target
from lora_lego.errors import MethodError


def test_greedy_never_exceeds_the_budget():
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 6, (1,), generator=g))
        spectra = {f"m{i}": torch.rand(int(torch.randint(1, 9, (1,), generator=g)), generator=g).sort(
            descending=True).values for i in range(n)}
        costs = {m: int(torch.randint(5, 50, (1,), generator=g)) for m in spectra}
        budget = sum(costs.values()) + int(torch.randint(0, 400, (1,), generator=g))
        ranks = greedy_ranks(spectra, costs, budget)
        assert sum(ranks[m] * costs[m] for m in spectra) <= budget
        assert all(1 <= ranks[m] <= max(len(spectra[m]), 1) for m in spectra)
        full = sum(len(s) * costs[m] for m, s in spectra.items())
        if budget >= full:
            assert all(ranks[m] == len(spectra[m]) for m in spectra)
    with pytest.raises(MethodError, match="rank 1"):
        greedy_ranks({"a": torch.ones(2)}, {"a": 10}, 9)


def test_flat_spectra_get_the_ranks():
    spectra = {"flat": torch.ones(8), "steep": torch.tensor([10.0, 0.1, 0.01, 0.001, 0, 0, 0, 0])}
    ranks = greedy_ranks(spectra, {"flat": 10, "steep": 10}, 8 * 10)
    assert ranks["flat"] > ranks["steep"] and ranks["flat"] + ranks["steep"] == 8


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("allocate")
    model = tiny_llama_folder(root / "model")
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    adapters = [ll.load_adapter(make_peft_adapter(root, name, target_modules=targets, r=4, lora_alpha=8))
                for name in ("a", "b", "c")]
    calibrations = [ll.calibrate(model, write_prompts(root / f"p{i}.jsonl", 12, seed=i), modules=list(a))
                    for i, a in enumerate(adapters)]
    return adapters, calibrations


def test_regmean_at_the_sum_of_ranks_is_exact_and_rank_r_keeps_the_budget(calibrated):
    adapters, calibrations = calibrated
    exact = ll.merge(adapters, "regmean", calibration=calibrations)
    full = ll.merge(adapters, "regmean", calibration=calibrations, rank=12, allocate="greedy")
    for module, factors in exact.items():
        torch.testing.assert_close(full[module].delta(), factors.delta(), rtol=1e-4, atol=1e-6)
    uniform = ll.merge(adapters, "regmean", calibration=calibrations, rank=4)
    allocated = ll.merge(adapters, "regmean", calibration=calibrations, rank=4, allocate="greedy")
    assert allocated.num_parameters() <= uniform.num_parameters()
    assert len(set(allocated.ranks.values())) > 1
    assert allocated.metadata["provenance"]["params"]["allocate"] == "greedy"


def test_spectral_methods_and_errors(calibrated):
    adapters, _ = calibrated
    uniform = ll.merge(adapters, "tsv", rank=3)
    allocated = ll.merge(adapters, "tsv", rank=3, allocate="greedy")
    assert allocated.num_parameters() <= uniform.num_parameters()
    with pytest.raises(MethodError, match="not 'lego'"):
        ll.merge(adapters, "lego", rank=3, allocate="greedy")
    with pytest.raises(MethodError, match="needs --rank"):
        ll.merge(adapters, "tsv", allocate="greedy")
    with pytest.raises(MethodError, match="allocate must be"):
        ll.merge(adapters, "tsv", rank=3, allocate="best")


def test_mixed_ranks_load_in_peft_gguf_and_vllm(calibrated, tmp_path):
    adapters, calibrations = calibrated
    merged = ll.merge(adapters, "regmean", calibration=calibrations, rank=4, allocate="greedy")
    ll.save_adapter(merged, tmp_path / "peft")
    assert_matches_peft(merged, peft_deltas(load_peft(tmp_path / "peft")), tol=1e-5)
    check_loads(ll.load_adapter(tmp_path / "peft"), get_target("vllm"))
    ll.save_adapter(merged, tmp_path / "m.gguf", base_config=tiny_llama_folder(tmp_path / "base"))  # GGUF: llama.cpp
    back = ll.load_adapter(tmp_path / "m.gguf")
    assert back.ranks == merged.ranks
    for module, factors in merged.items():
        torch.testing.assert_close(back[module].delta(), factors.delta(), rtol=1e-3, atol=1e-5)
