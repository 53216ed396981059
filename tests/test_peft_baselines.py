"""The baselines against PEFT's own `add_weighted_adapter`, and every method end to end on PEFT folders of
mixed ranks through the CLI (outputs load in PEFT; `average` refuses mixed ranks with a one-line error)."""

import pytest

import lora_lego as ll
from conftest import assert_matches_peft, load_peft, lora_layers, peft_deltas, tiny_llama_folder, write_prompts
from lora_lego.cli import main

# same targets, different ranks and alphas; the first without rslora (PEFT copies its config to the result)
MIXED = {"one": dict(r=4, lora_alpha=8), "two": dict(r=2, lora_alpha=5, use_rslora=True),
         "three": dict(r=6, lora_alpha=3)}
EQUAL = {"one": dict(r=4, lora_alpha=8), "two": dict(r=4, lora_alpha=2, use_rslora=True),
         "three": dict(r=4, lora_alpha=12)}
WEIGHTS = [0.5, -1.0, 1.5]


def peft_combination(folders, names, combination_type, weights, **kwargs):
    """PEFT's add_weighted_adapter over the loaded folders; returns its deltas per module."""
    model = load_peft(folders[0], adapter_name=names[0])
    for folder, name in zip(folders[1:], names[1:]):
        model.load_adapter(str(folder), adapter_name=name)
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    return peft_deltas(model, "merged")


@pytest.fixture
def mixed(peft_adapter):
    return [peft_adapter(name, **kwargs) for name, kwargs in MIXED.items()]


def test_ensemble_equals_peft_cat_with_weights_over_n(mixed):
    merged = ll.merge([ll.load_adapter(f) for f in mixed], "ensemble", weights=WEIGHTS)
    assert_matches_peft(merged, peft_combination(mixed, list(MIXED), "cat", [w / 3 for w in WEIGHTS]))


@pytest.mark.parametrize("rank", [3, 6])
def test_task_arithmetic_equals_peft_svd(mixed, rank):
    merged = ll.merge([ll.load_adapter(f) for f in mixed], "task_arithmetic", weights=WEIGHTS, rank=rank)
    reference = peft_combination(mixed, list(MIXED), "svd", WEIGHTS, svd_rank=rank)
    assert_matches_peft(merged, reference, tol=1e-5)


def test_average_times_n_squared_equals_peft_linear(peft_adapter):
    folders = [peft_adapter(name, **kwargs) for name, kwargs in EQUAL.items()]
    merged = ll.merge([ll.load_adapter(f) for f in folders], "average", weights=[9 * w for w in WEIGHTS])
    assert_matches_peft(merged, peft_combination(folders, list(EQUAL), "linear", WEIGHTS), tol=1e-5)


@pytest.mark.parametrize("method", [m for m in ll.available_methods() if m != "average"])
def test_every_method_merges_mixed_ranks_into_a_peft_folder(method, mixed, tmp_path, capsys):
    rank = [] if method in ("concat", "ensemble") else ["--rank", "5"]
    out = tmp_path / "out"
    calibration = []
    if ll.get_method(method).needs_calibration:  # the base model of the adapters and a prompts file per adapter
        prompts = [str(write_prompts(tmp_path / f"p{i}.jsonl", 8, seed=i)) for i in range(len(mixed))]
        calibration = ["--model", str(tiny_llama_folder(tmp_path / "model")), "--prompts", *prompts]
    assert main(["merge", *map(str, mixed), "--method", method, *rank, "-o", str(out), "-q", *calibration]) == 0
    model = load_peft(out)
    assert {layer.r["default"] for layer in lora_layers(model).values()} == ({12} if not rank else {5})
    assert_matches_peft(ll.load_adapter(out), peft_deltas(model), tol=1e-5)


def test_average_of_mixed_ranks_is_a_one_line_error(mixed, tmp_path, capsys):
    assert main(["merge", *map(str, mixed), "--method", "average", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: module 'model.layers.0.self_attn.q_proj'")
    assert "same rank" in err and f"'{mixed[0]}'" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, sign, weights", [
    ("ties", "total", [0.7, 0.7, 0.7]), ("ties", "frequency", [0.5, 1.0, 1.5]), ("magnitude_prune", "total", WEIGHTS)])
def test_dense_trim_methods_equal_peft_svd_variants(mixed, method, sign, weights):
    """PEFT's *_svd variants trim the dense delta as we do (its plain ties / magnitude_prune trim the factors).

    PEFT elects TIES signs on the unweighted deltas and we (as mergekit) on the weighted ones; the two
    agree when the weights are equal, or positive with the "frequency" rule, which is what is compared here.
    """
    params = {"sign": sign} if method == "ties" else {}
    merged = ll.merge([ll.load_adapter(f) for f in mixed], method, weights=weights, rank=5, density=0.3,
                      exact_svd=True, **params)
    reference = peft_combination(mixed, list(MIXED), f"{method}_svd", weights, svd_rank=5, density=0.3,
                                 majority_sign_method=sign)
    assert_matches_peft(merged, reference, tol=1e-4)
