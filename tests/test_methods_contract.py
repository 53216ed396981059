"""The contract every registered method keeps, checked for each of them automatically."""

import hashlib
import random

import numpy as np
import pytest
import torch

import lora_lego as ll
from lora_lego.errors import MethodError
from synthetic import calibration_for, dense_sum, random_adapter


def adapters():
    return [random_adapter("a", 4, seed=1), random_adapter("b", 4, seed=2), random_adapter("c", 4, seed=3)]


@pytest.mark.parametrize("method", ll.available_methods())
def test_contract(method, tmp_path):
    inputs = adapters()
    before = {(a.name, m): (f.A.clone(), f.B.clone()) for a in inputs for m, f in a.items()}
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()

    calibration = calibration_for(method, inputs)  # {} unless the method needs calibration data
    first = ll.merge(inputs, method, weights=[1.0, 0.5, 2.0], seed=4, **calibration)
    second = ll.merge(inputs, method, weights=[1.0, 0.5, 2.0], seed=4, **calibration)

    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.random.get_state()[1].tolist() == numpy_state[1].tolist() and random.getstate() == python_state
    for a in inputs:
        for m, f in a.items():
            assert torch.equal(f.A, before[(a.name, m)][0]) and torch.equal(f.B, before[(a.name, m)][1])
    assert list(first) == list(inputs[0])
    for module, factors in first.items():
        assert factors.shape == inputs[0][module].shape and factors.rank >= 1
        assert factors.A.dtype == torch.float32 and torch.isfinite(factors.A).all() and torch.isfinite(factors.B).all()
        assert torch.equal(factors.A, second[module].A) and torch.equal(factors.B, second[module].B)
        target = dense_sum(inputs, module, [1.0, 0.5, 2.0])  # the report's error, checked densely
        error = float((factors.delta().double() - target).norm() / target.norm())
        assert first.metadata["report"][module]["relative_error"] == pytest.approx(error, rel=1e-4, abs=1e-6)

    ll.save_adapter(first, tmp_path / "one")
    ll.save_adapter(second, tmp_path / "two")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        digest = [hashlib.sha256((tmp_path / d / name).read_bytes()).hexdigest() for d in ("one", "two")]
        assert digest[0] == digest[1], f"{method}: {name} differs between two identical runs"

    with pytest.raises(MethodError, match="no parameter 'not_a_parameter'"):
        ll.merge(inputs, method, not_a_parameter=1, **calibration)
