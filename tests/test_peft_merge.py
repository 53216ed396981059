"""End to end against PEFT: a `concat` merge of PEFT adapters (different ranks, alphas, rslora, rank
patterns, partly different targets, an embedding LoRA), saved and loaded by PeftModel.from_pretrained,
gives the logits of the base model with the weighted PEFT deltas added by hand, and equals PEFT's own
add_weighted_adapter(combination_type="cat")."""

import warnings

import pytest
import torch

import lora_lego as ll
from conftest import (
    assert_matches_peft,
    load_peft,
    lora_layers,
    peft_deltas,
    relative_error,
    tiny_llama,
    weight_update,
)
from lora_lego.errors import LoraLegoWarning

# Partly overlapping targets: q_proj in 1 and 2, v_proj in 1 and 3, embed_tokens in 1 and 3, the rest in one.
# Adapter 1 comes first because PEFT's "cat" copies the first adapter's config (use_rslora included) to the result.
ADAPTERS = {
    "one": dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8),
    "two": dict(target_modules=["q_proj", "k_proj", "down_proj"], r=2, lora_alpha=5, use_rslora=True),
    "three": dict(target_modules=["v_proj", "o_proj", "up_proj", "embed_tokens"], r=6, lora_alpha=3,
                  rank_pattern={"layers.1.self_attn.v_proj": 3}, alpha_pattern={"up_proj": 12}),
}
WEIGHTS = {"positive": [0.5, 1.0, 1.5], "negation": [1.0, -1.0, 0.25]}


@pytest.fixture
def folders(peft_adapter):
    return [peft_adapter(name, **kwargs) for name, kwargs in ADAPTERS.items()]


def load_all(folders):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraLegoWarning)  # PEFT's saved base embedding copies
        return [ll.load_adapter(f) for f in folders]


def input_ids():
    return torch.tensor([[1, 5, 9, 42, 7, 99, 0, 3], [64, 2, 2, 17, 88, 31, 5, 11]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids()).logits.double()


def reference_logits(folders, weights) -> torch.Tensor:
    """The base model with sum_t w_t * (PEFT's get_delta_weight of adapter t) added into its weights."""
    model = tiny_llama()
    state = model.state_dict()
    touched = set()
    for folder, weight in zip(folders, weights):
        for module, delta in peft_deltas(load_peft(folder)).items():
            state[f"{module}.weight"] += weight * delta
            touched.add(module)
    model.load_state_dict(state)
    assert len(touched) == 1 + 2 * 6  # the embedding and six linear module types over two layers
    return logits(model)


@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_concat_merge_loaded_by_peft_gives_the_summed_model(tmp_path, folders, weights):
    merged = ll.merge(load_all(folders), "concat", weights=weights)
    out = ll.save_adapter(merged, tmp_path / "merged")
    expected = reference_logits(folders, weights)
    base = logits(tiny_llama())
    actual = logits(load_peft(out))
    assert relative_error(base, expected) > 1e-3  # the adapters really change the output
    assert relative_error(actual, expected) < 1e-5
    # the folder PEFT loaded holds exactly the merged modules, with rank = sum of the holders' ranks
    layers = lora_layers(load_peft(out))
    assert set(layers) == set(merged.modules)
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 4 + 2
    assert layers["model.layers.1.self_attn.v_proj"].r["default"] == 4 + 3
    assert layers["model.layers.0.self_attn.v_proj"].r["default"] == 4 + 6
    assert layers["model.layers.0.self_attn.k_proj"].r["default"] == 2
    assert layers["model.embed_tokens"].r["default"] == 4 + 6


@pytest.mark.parametrize("weights", WEIGHTS.values(), ids=WEIGHTS.keys())
def test_concat_equals_peft_add_weighted_adapter_cat(folders, weights):
    merged = ll.merge(load_all(folders), "concat", weights=weights)
    model = load_peft(folders[0], adapter_name="one")
    for folder, name in zip(folders[1:], list(ADAPTERS)[1:]):
        result = model.load_adapter(str(folder), adapter_name=name)
        assert result.missing_keys == [] and result.unexpected_keys == []
    model.add_weighted_adapter(list(ADAPTERS), weights, "cat", combination_type="cat")
    # PEFT's "cat" adapter is injected into the union of the targets; modules an adapter lacks are skipped
    reference = peft_deltas(model, "cat")
    assert_matches_peft(merged, reference)
    separate = {name: peft_deltas(model, name) for name in ADAPTERS}
    for module, factors in merged.items():  # and both equal the weighted sum of the separate deltas
        expected = sum(w * separate[name][module] for name, w in zip(ADAPTERS, weights) if module in separate[name])
        assert relative_error(weight_update(factors), expected) < 1e-6, module


def test_negation_cancels_exactly(tmp_path, peft_adapter):
    folder = peft_adapter("one", **ADAPTERS["one"])
    adapter = load_all([folder])[0]
    merged = ll.merge([adapter, adapter], "concat", weights=[1.0, -1.0])
    for module, factors in merged.items():
        assert factors.rank == 2 * adapter[module].rank
        delta = factors.delta()
        assert delta.abs().max() <= 1e-6 * adapter[module].delta().abs().max(), module
    out = ll.save_adapter(merged, tmp_path / "zero")
    # PEFT's forward adds x A^T B^T in float32: the halves cancel up to rounding, small against the adapter's effect
    base = logits(tiny_llama())
    residual = (logits(load_peft(out)) - base).norm()
    effect = (logits(load_peft(folder)) - base).norm()
    assert residual < 1e-5 * effect


def test_default_method_through_the_cli_is_loaded_by_peft_unchanged(tmp_path, folders):
    """`lora-lego merge` with the default method (tsv, whole rank) on PEFT folders of mixed ranks, alphas
    and rslora: PEFT loads the output, and its deltas are the ones the Python API computes."""
    from lora_lego.cli import main
    from lora_lego.methods.registry import DEFAULT_METHOD

    out = tmp_path / "merged"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraLegoWarning)
        assert main(["merge", *map(str, folders), "-o", str(out), "-q"]) == 0
    expected = ll.merge(load_all(folders), DEFAULT_METHOD)
    loaded = peft_deltas(load_peft(out))
    assert set(loaded) == set(expected.modules)
    for module, delta in loaded.items():
        torch.testing.assert_close(delta.double(), weight_update(expected[module]).double(), rtol=1e-5, atol=1e-6)
