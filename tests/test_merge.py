import warnings

import pytest
import torch

import lora_lego as ll
from lora_lego.errors import IncompatibleAdaptersError, LoraLegoWarning, MethodError
from lora_lego.merge import module_generator
from lora_lego.types import LazyModules, LoraFactors
from synthetic import dense_sum, random_adapter, random_calibrations


def test_concat_merge_is_exact_weighted_sum_per_module():
    adapters = [random_adapter(n, r, seed=s) for s, (n, r) in enumerate([("a", 2), ("b", 4), ("c", 8)])]
    weights = [1.0, 0.5, -0.25]
    merged = ll.merge(adapters, "concat", weights=weights)
    for module in adapters[0]:
        assert merged[module].rank == 14
        torch.testing.assert_close(merged[module].delta().double(), dense_sum(adapters, module, weights),
                                   rtol=1e-5, atol=1e-5)
        assert merged.metadata["report"][module]["relative_error"] < 1e-6


def test_union_of_modules_missing_module_contributes_nothing():
    full = random_adapter("full", 4, seed=1)
    partial = random_adapter("partial", 4, seed=2, types=("q_proj",))
    merged = ll.merge([full, partial], "concat")
    assert list(merged) == list(full)  # order of first appearance
    v = "model.layers.0.v_proj"
    assert merged[v].rank == 4
    torch.testing.assert_close(merged[v].delta(), full[v].delta())
    q = "model.layers.1.q_proj"
    torch.testing.assert_close(merged[q].delta().double(), dense_sum([full, partial], q), rtol=1e-5, atol=1e-5)


def test_no_common_module_warns():
    q = random_adapter("q", types=("q_proj",))
    v = random_adapter("v", types=("v_proj",))
    with pytest.warns(LoraLegoWarning, match="no module in common"):
        merged = ll.merge([q, v], "concat")
    assert len(merged) == len(q) + len(v)


def test_shape_mismatch_names_module_and_adapters():
    a = random_adapter("a")
    b = random_adapter("b")
    module = "model.layers.0.q_proj"
    b.modules[module] = LoraFactors(torch.ones(4, 99), torch.ones(24, 4))
    with pytest.raises(IncompatibleAdaptersError, match=r"model\.layers\.0\.q_proj.*'b'.*\(24, 99\).*'a'"):
        ll.merge([a, b], "concat")


@pytest.mark.parametrize("weights, message", [
    ([1.0], "2 adapters"),
    ([1.0, float("nan")], "finite"),
    ([1.0, float("inf")], "finite"),
    ([0.0, 0.0], "zero"),
    (["x", 1.0], "numbers"),
])
def test_bad_weights(weights, message):
    with pytest.raises(MethodError, match=message):
        ll.merge([random_adapter("a"), random_adapter("b")], "concat", weights=weights)


def test_unknown_method_and_parameter():
    with pytest.raises(MethodError, match="unknown merge method 'nope'.*concat"):
        ll.merge([random_adapter("a")], "nope")
    with pytest.raises(MethodError, match="has no parameter 'density'"):
        ll.merge([random_adapter("a")], "concat", density=0.5)


def test_bad_seed():
    for seed in (-1, 1.5, "3"):
        with pytest.raises(MethodError, match="seed"):
            ll.merge([random_adapter("a")], "concat", seed=seed)


def test_module_generator_is_stable_and_distinct():
    first = torch.rand(4, generator=module_generator(7, "m.q"))
    assert torch.equal(first, torch.rand(4, generator=module_generator(7, "m.q")))
    assert not torch.equal(first, torch.rand(4, generator=module_generator(7, "m.v")))
    assert not torch.equal(first, torch.rand(4, generator=module_generator(8, "m.q")))


def test_provenance_and_inputs_untouched():
    adapters = [random_adapter("a", seed=1), random_adapter("b", seed=2)]
    before = {m: (f.A.clone(), f.B.clone()) for m, f in adapters[0].items()}
    merged = ll.merge(adapters, "concat", weights=[2, 1], seed=5)
    provenance = merged.metadata["provenance"]
    assert provenance["method"] == "concat" and provenance["seed"] == 5
    assert provenance["weights"] == [2.0, 1.0] and provenance["sources"] == ["a", "b"]
    assert provenance["version"] == ll.__version__
    for m, (A, B) in before.items():
        assert torch.equal(adapters[0][m].A, A) and torch.equal(adapters[0][m].B, B)


def test_different_base_models_warn():
    a, b = random_adapter("a"), random_adapter("b")
    b.metadata["base_model_name_or_path"] = "other"
    with pytest.warns(LoraLegoWarning, match="different base models"):
        ll.merge([a, b], "concat")


def test_fan_in_fan_out_disagreement_is_an_error_before_any_module_is_read():
    a, b = random_adapter("a"), random_adapter("b")
    b.metadata["fan_in_fan_out"] = True
    read = []
    lazy = ll.Adapter(LazyModules({m: b.info(m) for m in b}, lambda m: read.append(m) or b.modules[m]),
                      b.metadata, name="b")
    with pytest.raises(IncompatibleAdaptersError, match="'a': False, 'b': True"):
        ll.merge([a, lazy], "concat")
    assert read == []  # refused up front, not after merging every module


def test_empty_adapter_list():
    with pytest.raises(MethodError, match="at least one"):
        ll.merge([], "concat")


def test_progress_bar_flag_runs_quietly_by_default(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll.merge([random_adapter("a")], "concat")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("method", ll.available_methods())
def test_zero_weight_adapters_are_left_out(method):
    a = random_adapter("a", 4, seed=1, types=("q_proj", "v_proj"))
    b = random_adapter("b", 4, seed=2, types=("q_proj",))
    calibration = random_calibrations([a, b]) if ll.get_method(method).needs_calibration else None
    merged = ll.merge([a, b], method, weights=[0.0, 1.0], calibration=calibration)
    alone = ll.merge([b], method, calibration=calibration[1:] if calibration else None)
    assert set(merged) == set(b)  # v_proj only exists in the zero-weight adapter
    for module in b:
        torch.testing.assert_close(merged[module].delta(), alone[module].delta())


@pytest.mark.parametrize("method", ["lego", "task_arithmetic", "ties"])
def test_threads_do_not_change_the_result(method):
    adapters = [random_adapter(name, 4, seed=seed, layers=3) for seed, name in enumerate("abc")]
    one = ll.merge(adapters, method, rank=4, threads=1)
    three = ll.merge(adapters, method, rank=4, threads=3)
    assert list(one) == list(three)  # module order kept
    for module in one:
        assert torch.equal(one[module].A, three[module].A) and torch.equal(one[module].B, three[module].B)
    assert one.metadata["report"] == three.metadata["report"]


def test_threads_leave_the_callers_torch_thread_count():
    before = torch.get_num_threads()
    ll.merge([random_adapter("a"), random_adapter("b", seed=1)], "lego", rank=2, threads=2)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_bad_threads(threads):
    with pytest.raises(MethodError, match="threads must be an integer >= 1"):
        ll.merge([random_adapter("a")], "concat", threads=threads)


def test_a_bad_module_stops_a_threaded_merge_with_its_name():
    bad = random_adapter("bad", layers=4)
    module = "model.layers.2.v_proj"
    bad.modules[module] = LoraFactors(bad[module].A * float("nan"), bad[module].B)
    with pytest.raises(ll.AdapterFormatError, match=f"adapter 'bad', module '{module}': lora_A contains NaN"):
        ll.merge([random_adapter("a", layers=4), bad], "lego", rank=2, threads=2)
