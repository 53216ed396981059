"""Fuzzing `load_adapter` and `merge` with hypothesis: random shapes, ranks, alphas, dtypes, module sets,
weights, methods and corrupted bytes. The property everywhere: a result or a `LoraLegoError`, never any
other exception; and a result is usable (finite float32 factors of rank >= 1 that save and load back).

A bounded, derandomized run by default (a few seconds). A longer, random run, e.g. 2000 examples each:

    LORA_LEGO_FUZZ_EXAMPLES=2000 python -m pytest -q tests/test_fuzz.py -p no:cacheprovider

(on a failure hypothesis prints the smallest failing example and a `@reproduce_failure(...)` line to replay it).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import lora_lego as ll
from lora_lego.errors import LoraLegoError
from lora_lego.types import Adapter, LoraFactors
from synthetic import calibration_for

_LONG = os.environ.get("LORA_LEGO_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(_LONG or 60), deadline=None, derandomize=not _LONG, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# module -> (d_out, d_in, kind); for an embedding LoRA d_in is the number of embeddings
POOL = {
    "model.layers.0.self_attn.q_proj": (8, 6, "linear"),
    "model.layers.0.self_attn.v_proj": (4, 6, "linear"),
    "model.layers.1.mlp.down_proj": (6, 10, "linear"),
    "model.embed_tokens": (6, 12, "embedding"),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MAGNITUDES = [0.0, 1e-30, 1e-3, 1.0, 1e3, 1e30]
CONFIG_FILE = "adapter_config.json"


@st.composite
def adapter_specs(draw):
    """What `write_adapter` writes: modules {name: (rank, extra d_in)}, config values, dtype, values.

    Mostly valid (so that merges run), sometimes not: rank 0, a d_in of another base model, a config that
    lies about r, an alpha that overflows, values that overflow or underflow the dtype.
    """
    names = draw(st.lists(st.sampled_from(sorted(POOL)), unique=True, min_size=1, max_size=3))
    modules = {name: (draw(st.sampled_from([1, 2, 3, 4, 5] * 3 + [0])), draw(st.sampled_from([0] * 9 + [2])))
               for name in names}
    alpha = draw(st.one_of(st.integers(1, 32), st.integers(1, 32), st.integers(-4, 0), st.floats()))
    return {
        "modules": modules,
        "alpha": alpha,
        "rslora": draw(st.booleans()),
        "config_r_offset": draw(st.sampled_from([0] * 9 + [1])),  # sometimes the config lies about r
        "dtype": draw(st.sampled_from(DTYPES)),
        "bin": draw(st.sampled_from([False] * 4 + [True])),  # adapter_model.bin (torch.save) instead of safetensors
        "magnitude": draw(st.sampled_from([1.0] * 4 + MAGNITUDES)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def write_adapter(folder: Path, spec: dict) -> Path:
    """A PEFT-style folder: lora_A (r, d_in) and lora_B (d_out, r) per module, r / rank_pattern in the config."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(spec["seed"])
    tensors, ranks = {}, {}
    for name, (rank, extra) in spec["modules"].items():
        d_out, d_in, kind = POOL[name]
        a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else (
            "lora_A.weight", "lora_B.weight")
        A = torch.randn(rank, d_in + extra, generator=generator) * spec["magnitude"]
        B = torch.randn(d_out, rank, generator=generator) * spec["magnitude"]
        tensors[f"base_model.model.{name}.{a_key}"] = A.to(spec["dtype"])
        tensors[f"base_model.model.{name}.{b_key}"] = B.to(spec["dtype"])
        ranks[name] = rank
    r = next(iter(ranks.values()), 8)
    config = {"peft_type": "LORA", "r": r + spec["config_r_offset"], "lora_alpha": spec["alpha"],
              "use_rslora": spec["rslora"], "target_modules": sorted(ranks),
              "rank_pattern": {re.escape(m): k for m, k in ranks.items() if k != r}}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    if spec["bin"]:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return folder


def load_or_error(folder: Path) -> Adapter | None:
    """The adapter, or None after a LoraLegoError; any other exception fails the test."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ll.LoraLegoWarning)
            adapter = ll.load_adapter(folder)
    except LoraLegoError as error:
        assert str(folder) in str(error), error  # every load error names the adapter
        event(f"load: {type(error).__name__}")
        return None
    event("load: ok")
    assert_usable(adapter)
    return adapter


def assert_usable(adapter: Adapter) -> None:
    assert len(adapter) > 0
    for module, factors in adapter.items():
        assert factors.rank >= 1 and factors.A.dtype == torch.float32, module
        assert torch.isfinite(factors.A).all() and torch.isfinite(factors.B).all(), module


def merge_or_error(adapters: list[Adapter], method: str, weights: list[float], rank: int | None,
                   out: Path) -> Adapter | None:
    """merge + save + load back, or None after a LoraLegoError; the saved deltas equal the merged ones."""
    params = {} if rank is None or not _takes_rank(method) else {"rank": rank}
    if method.startswith("lego"):
        params["n_init"] = 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ll.LoraLegoWarning)
            merged = ll.merge(adapters, method, weights=weights, seed=0, **params, **calibration_for(method, adapters))
            assert_usable(merged)
            ll.save_adapter(merged, out, dtype="fp32")
            again = ll.load_adapter(out)
    except LoraLegoError as error:
        event(f"merge: {type(error).__name__}")
        return None
    event("merge: ok")
    assert set(again) == set(merged)  # (safetensors stores keys sorted)
    for module, factors in merged.items():
        delta = factors.delta()  # entries that cancel get float32 rounding of the largest ones
        torch.testing.assert_close(again[module].delta(), delta, rtol=1e-4,
                                   atol=1e-6 * max(1.0, float(delta.abs().max())))
    return merged


def _takes_rank(method: str) -> bool:
    spec = ll.get_method(method)
    return "rank" in spec.parameters or "rank" in spec.parameter_aliases


METHODS = st.sampled_from(ll.available_methods())
WEIGHTS = st.one_of(st.integers(-3, 3).map(float), st.integers(-3, 3).map(float), st.floats(-1e3, 1e3),
                    st.sampled_from([0.0, 1e30]))
RANKS = st.one_of(st.none(), st.integers(-1, 12))


@FUZZ
@given(spec=adapter_specs())
def test_load_adapter_gives_an_adapter_or_a_typed_error(spec):
    with tempfile.TemporaryDirectory() as tmp:
        load_or_error(write_adapter(Path(tmp) / "adapter", spec))


@FUZZ
@given(specs=st.lists(adapter_specs(), min_size=1, max_size=3), method=METHODS, data=st.data(), rank=RANKS)
def test_merge_of_loaded_adapters_gives_a_result_or_a_typed_error(specs, method, data, rank):
    with tempfile.TemporaryDirectory() as tmp:
        loaded = [load_or_error(write_adapter(Path(tmp) / f"in{i}", spec)) for i, spec in enumerate(specs)]
        adapters = [a for a in loaded if a is not None]
        assume(adapters)
        weights = data.draw(st.lists(WEIGHTS, min_size=len(adapters), max_size=len(adapters)))
        merge_or_error(adapters, method, weights, rank, Path(tmp) / "out")


@st.composite
def memory_adapters(draw, index: int):
    """An Adapter built in memory (no loading, so no load-time checks): any float values, NaN and Inf included."""
    modules = {}
    for name in draw(st.lists(st.sampled_from(sorted(POOL)), unique=True, min_size=1, max_size=3)):
        d_out, d_in, kind = POOL[name]
        rank = draw(st.integers(1, 4))
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        A, B = torch.randn(rank, d_in, generator=generator), torch.randn(d_out, rank, generator=generator)
        special = draw(st.sampled_from([None] * 8 + [0.0, float("nan"), float("inf"), 1e30, 1e-40]))
        if special is not None:
            A[0, 0] = special
        modules[name] = LoraFactors(A * draw(st.sampled_from([1.0] * 4 + MAGNITUDES)), B, kind)
    return Adapter(modules, {"dtype": "float32"}, name=f"memory{index}")


@FUZZ
@given(method=METHODS, data=st.data(), rank=RANKS)
def test_merge_of_in_memory_adapters_gives_a_result_or_a_typed_error(method, data, rank):
    n = data.draw(st.integers(1, 3))
    adapters = [data.draw(memory_adapters(i)) for i in range(n)]
    weights = data.draw(st.lists(WEIGHTS, min_size=n, max_size=n))
    with tempfile.TemporaryDirectory() as tmp:
        merge_or_error(adapters, method, weights, rank, Path(tmp) / "out")


def corrupt(data: bytes, how: str, where: float, byte: int, count: int, start: int = 0) -> bytes:
    """`data` damaged at a fraction `where` of data[start:]: bytes flipped (XOR `byte`), zeroed or appended,
    the file truncated, or the 8-byte little-endian length at the front (safetensors' header size) shifted."""
    data = bytearray(data)
    at = min(start + int(where * (len(data) - start)), len(data) - 1)
    if how == "flip":
        for i in range(at, min(at + count, len(data))):
            data[i] ^= byte or 0xFF
    elif how == "truncate":
        del data[at:]
    elif how == "zero":
        data[at:at + count] = bytes(len(data[at:at + count]))
    elif how == "append":
        data += bytes([byte]) * count
    else:
        data[:8] = ((int.from_bytes(data[:8], "little") + (byte - 128) * count) % 2**64).to_bytes(8, "little")
    return bytes(data)


@FUZZ
@given(spec=adapter_specs(), target=st.sampled_from(["header", "tensor data", "config"]),
       how=st.sampled_from(["flip", "flip", "truncate", "zero", "append", "length"]), where=st.floats(0, 1),
       byte=st.integers(0, 255), count=st.integers(1, 16), method=METHODS)
def test_corrupted_bytes_give_an_adapter_or_a_typed_error(spec, target, how, where, byte, count, method):
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_adapter(Path(tmp) / "adapter", {**spec, "magnitude": 1.0, "config_r_offset": 0})
        weights = "adapter_model.bin" if spec["bin"] else "adapter_model.safetensors"
        path = folder / (CONFIG_FILE if target == "config" else weights)
        data = path.read_bytes()
        start = 8 + int.from_bytes(data[:8], "little") if target == "tensor data" and not spec["bin"] else 0
        path.write_bytes(corrupt(data, how, where, byte, count, min(start, len(data) - 1)))
        adapter = load_or_error(folder)
        if adapter is not None:
            merge_or_error([adapter, adapter], method, [1.0, -0.5], None, Path(tmp) / "out")
