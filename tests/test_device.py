"""--device: argument checks everywhere, the real GPU path where CUDA exists, and a CPU-only guard that
every method creates its tensors on its inputs' device (or explicitly on the CPU), never the default one."""

import pytest
import torch

import lora_lego as ll
from lora_lego.errors import MethodError
from lora_lego.merge import module_generator
from lora_lego.methods import get_method
from synthetic import random_adapter, random_calibrations

CUDA = torch.cuda.is_available()


def adapters():
    return [random_adapter(name, 4, seed=seed) for seed, name in enumerate("abc")]


@pytest.mark.parametrize("device, message", [
    ("gpu", "device must be 'cpu', 'cuda' or 'cuda:N'; got 'gpu'"),
    (3, "device must be"),
    ("meta", "device 'meta' is not supported"),
])
def test_bad_device(device, message):
    with pytest.raises(MethodError, match=message):
        ll.merge(adapters(), "lego", device=device)


@pytest.mark.skipif(CUDA, reason="CUDA is available here")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(MethodError, match="CUDA is not available to torch"):
        ll.merge(adapters(), "lego", device="cuda")


VARIANTS = [(method, {}) for method in ll.available_methods()] + [
    ("lego", {"canonical": "svd", "max_error": 0.3, "sample_weights": True, "features": "normalized"}),
    ("lego", {"param_norm": "l2"}), ("lego_rank1", {"max_error": 0.3}), ("task_arithmetic", {"max_error": 0.2}),
    ("ties", {"exact_svd": True}), ("dare_ties", {}), ("ties", {"space": "core"}), ("dare_ties", {"space": "core"}),
    ("ctm", {"rule": "dare_ties"}), ("iso_cts", {"common": 0.5}), ("regmean", {"norm": "frobenius"}),
    ("regmean", {"max_error": 0.3}), ("lego_calibrated", {"basis": "adapter", "clustering": "units", "refit": False}),
]


@pytest.mark.parametrize("method, extra", VARIANTS)
def test_methods_create_no_tensor_on_the_default_device(method, extra):
    """With the default device set to `meta`, a tensor created without an explicit device would be a
    meta tensor and fail when mixed with the CPU inputs: the same mistake that breaks device="cuda"."""
    inputs = adapters()
    module = "model.layers.0.down_proj"
    factors, weights = [a[module] for a in inputs], [1.0, 0.5, 2.0]
    spec = get_method(method)
    ranked = "rank" in spec.parameter_aliases or "rank" in spec.parameters
    params = spec.resolve(({"rank": 3} if ranked else {}) | extra)
    grams = [c.moment(module) for c in random_calibrations(inputs)] if spec.needs_calibration else None
    expected, _ = spec(factors, weights, generator=module_generator(0, module), calibration=grams, **params)
    torch.set_default_device("meta")
    try:
        result, _ = spec(factors, weights, generator=module_generator(0, module), calibration=grams, **params)
    finally:
        torch.set_default_device(None)
    assert result.A.device.type == "cpu"
    assert torch.equal(result.A, expected.A) and torch.equal(result.B, expected.B)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lego", "lego_rank1", "task_arithmetic", "ties", "knots_ta"])
def test_cuda_merge_matches_the_cpu_merge(method):
    on_cpu = ll.merge(adapters(), method, rank=4, seed=2)
    on_gpu = ll.merge(adapters(), method, rank=4, seed=2, device="cuda")
    for module, factors in on_cpu.items():
        assert on_gpu[module].A.device.type == "cpu"
        torch.testing.assert_close(on_gpu[module].delta(), factors.delta(), rtol=1e-3, atol=1e-4)
        if "labels" in on_cpu.metadata["report"][module]:
            assert on_gpu.metadata["report"][module]["labels"] == on_cpu.metadata["report"][module]["labels"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["regmean", "lego_calibrated"])
def test_cuda_calibrated_merge_matches_the_cpu_merge(method):
    inputs = adapters()
    calibration = random_calibrations(inputs)
    on_cpu = ll.merge(inputs, method, rank=4, seed=2, calibration=calibration)
    on_gpu = ll.merge(inputs, method, rank=4, seed=2, calibration=calibration, device="cuda")
    for module, factors in on_cpu.items():
        assert on_gpu[module].A.device.type == "cpu"
        torch.testing.assert_close(on_gpu[module].delta(), factors.delta(), rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_calibration_matches_the_cpu_one(tmp_path):
    pytest.importorskip("transformers")
    from conftest import tiny_llama_folder, write_prompts

    model = tiny_llama_folder(tmp_path / "model")
    prompts = write_prompts(tmp_path / "p.jsonl", 9, seed=3)
    on_cpu = ll.calibrate(model, prompts, batch_size=4)
    on_gpu = ll.calibrate(model, prompts, batch_size=4, device="cuda")
    assert on_gpu.fingerprint == on_cpu.fingerprint and on_gpu.modules == on_cpu.modules
    for module in on_cpu.modules:
        assert on_gpu.gram(module).device.type == "cpu"
        torch.testing.assert_close(on_gpu.gram(module), on_cpu.gram(module), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_benchmark_trains_and_evaluates_like_the_cpu(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from test_bench import make_model, make_tasks

    from lora_lego.bench import run

    tasks, model = make_tasks(tmp_path), make_model(tmp_path / "model")
    results, trained = {}, {}
    for device in ("cpu", "cuda"):
        out = run(["main"], cache=tmp_path / device, out=tmp_path / device / "out", tasks=tasks, model_dir=model,
                  steps=3, n_test=20, device=device, precision="fp32")
        results[device] = json.loads((out / "main.json").read_text())["rows"]["own LoRA (upper reference)"]
        (folder,) = (tmp_path / device / "adapters").glob("colour*")
        assert json.loads((folder / "train_log.json").read_text())["device"].startswith(device)
        trained[device] = ll.load_adapter(folder)
    for module, factors in trained["cpu"].items():
        torch.testing.assert_close(trained["cuda"][module].delta(), factors.delta(), rtol=1e-2, atol=1e-4)
    assert all(abs(results["cuda"][t] - results["cpu"][t]) <= 0.1 for t in results["cpu"])
