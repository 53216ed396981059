"""Calibration data: per-module input Grams of a base model on one prompt set, and their file format.

`Calibration` maps each calibrated module to the Gram X^T X of its inputs (summed over the prompts'
non-padding tokens) and the token count. Modules that read the same input (q/k/v, gate/up) share one
Gram. It is saved as one safetensors file (float32 Grams, one tensor per shared input, provenance in the
header) inside a folder, and read back lazily, one Gram at a time. Making one needs the base model: see
`calibrate.py`; this file needs only torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .._version import version
from ..errors import CalibrationError, MethodError
from ..methods import available_methods, get_method
from ..tensorfile import TensorFileError, read_header, read_tensor
from ..types import Adapter

FILE_NAME = "calibration.safetensors"
FORMAT = "lora-lego-calibration/1"


class Calibration:
    """Input Grams of one prompt set: module path -> (d_in, d_in) X^T X, shared by modules with one input.

    `grams` maps a group key (the first module of the group) to its Gram (float32, or a function that
    reads it: lazy). `modules` maps each module path to its group key. `tokens` is the number of
    tokens summed over; `metadata` holds the provenance (model, model fingerprint, prompts hash, ...).
    """

    def __init__(self, grams: Mapping[str, torch.Tensor | Callable[[], torch.Tensor]], modules: Mapping[str, str],
                 tokens: int, metadata: dict[str, Any] | None = None, name: str = "<calibration>",
                 shapes: Mapping[str, tuple[int, int]] | None = None):
        self._grams, self.modules, self.tokens = dict(grams), dict(modules), int(tokens)
        self.metadata, self.name = dict(metadata or {}), name
        self._shapes = dict(shapes) if shapes is not None else {k: tuple(g.shape) for k, g in self._grams.items()}

    def __contains__(self, module: object) -> bool:
        return module in self.modules

    def __len__(self) -> int:
        return len(self.modules)

    def d_in(self, module: str) -> int:
        """The input width of `module` (its Gram is d_in x d_in)."""
        return self._shapes[self.modules[module]][0]

    def gram(self, module: str) -> torch.Tensor:
        """X^T X of `module`'s inputs, (d_in, d_in) float32 (read from disk on each call when lazy)."""
        gram = self._grams[self.modules[module]]
        return gram() if callable(gram) else gram

    def moment(self, module: str) -> torch.Tensor:
        """The mean input outer product X^T X / tokens, (d_in, d_in) float32: what calibrated methods receive."""
        gram = self._grams[self.modules[module]]
        if callable(gram):  # a fresh tensor read from disk: divided in place
            return gram().div_(max(self.tokens, 1))
        return gram / max(self.tokens, 1)

    @property
    def fingerprint(self) -> str | None:
        """The base model's fingerprint (config and a sample of its weights; see `calibrate.model_fingerprint`)."""
        return self.metadata.get("model_fingerprint")

    def summary(self) -> dict[str, Any]:
        """What `inspect` and the merged adapter's provenance record of this calibration."""
        keep = ("model", "model_fingerprint", "prompts", "prompts_sha256", "n_prompts", "max_length", "activations")
        return {**{k: self.metadata[k] for k in keep if k in self.metadata}, "tokens": self.tokens,
                "modules": len(self.modules), "grams": len(self._grams)}


def moments(calibrations: Sequence[Calibration], module: str) -> Sequence[torch.Tensor]:
    """`moment(module)` of each calibration, as a sequence that reads (computes) each one when accessed."""
    return _Moments(calibrations, module)


class _Moments(Sequence[torch.Tensor]):
    """The mean Grams of one module in several calibrations, each computed (read) when it is accessed, so a
    method that walks them one at a time holds one d_in x d_in Gram, not all of them."""

    def __init__(self, calibrations: Sequence[Calibration], module: str):
        self._calibrations, self._module = list(calibrations), module

    def __len__(self) -> int:
        return len(self._calibrations)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _Moments(self._calibrations[index], self._module)
        return self._calibrations[index].moment(self._module)


def header_metadata(modules: Mapping[str, str], tokens: int, metadata: dict[str, Any]) -> dict[str, str]:
    """The safetensors header metadata of a calibration file (string values only)."""
    return {"format": FORMAT, "lora_lego_calibration": json.dumps(
        {"modules": dict(modules), "tokens": int(tokens), "metadata": metadata, "version": version()},
        sort_keys=True)}


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration folder (or its calibration.safetensors) lazily: Grams are read when asked for."""
    path = Path(path)
    file = path / FILE_NAME if path.is_dir() else path
    name = str(path)
    if not file.is_file():
        raise CalibrationError(f"calibration {name!r}: no {FILE_NAME} there (make one with `lora-lego calibrate`)")
    try:
        infos, header = read_header(file)
        content = json.loads(header["lora_lego_calibration"])
        modules, tokens, metadata = dict(content["modules"]), int(content["tokens"]), dict(content["metadata"])
    except (OSError, TensorFileError) as error:
        raise CalibrationError(f"calibration {name!r}: cannot read {file.name} ({error})") from None
    except (KeyError, TypeError, ValueError):
        raise CalibrationError(f"calibration {name!r}: {file.name} is not a lora-lego calibration file "
                                 "(no calibration header; make one with `lora-lego calibrate`)") from None
    for module, key in modules.items():
        info = infos.get(key)
        if info is None or len(info.shape) != 2 or info.shape[0] != info.shape[1] or not info.is_floating_point():
            raise CalibrationError(f"calibration {name!r}: module {module!r} has no square Gram {key!r} in {file.name}")
    if tokens < 1:
        raise CalibrationError(f"calibration {name!r}: token count {tokens} (expected >= 1)")

    def reader(key: str) -> Callable[[], torch.Tensor]:
        def read() -> torch.Tensor:
            try:
                gram = read_tensor(file, infos[key]).float()
            except (OSError, TensorFileError) as error:
                raise CalibrationError(f"calibration {name!r}: cannot read Gram {key!r} ({error})") from None
            if not all(bool(torch.isfinite(rows).all()) for rows in gram.split(1024)):  # bounded temporaries
                raise CalibrationError(f"calibration {name!r}: Gram {key!r} holds NaN or Inf")
            return gram
        return read

    keys = set(modules.values())
    return Calibration({k: reader(k) for k in keys}, modules, tokens, metadata, name=name,
                       shapes={k: tuple(infos[k].shape) for k in keys})


def check_calibrations(method: str, needs: bool, adapters: Sequence[Adapter], calibrations: Sequence[Any] | None,
                       owners: Mapping[str, list[int]], weights: Sequence[float]) -> list[Calibration] | None:
    """The calibrations of a merge, checked against the method and the adapters before any work.

    One per adapter, in order, all of the same base model (fingerprint), each with a Gram of the right
    width for every module its adapter merges (adapters of weight 0 are left out). Raises MethodError
    when the method and the presence of calibrations disagree, CalibrationError otherwise.
    """
    if calibrations is None:
        if needs:
            raise MethodError(f"method {method!r} needs calibration data, one per adapter: lora-lego merge ... "
                              f"--method {method} --model BASE_DIR --prompts P1 P2 ... (or --calibration C1 C2 ...); "
                              "in Python, merge(..., calibration=[calibrate(model, prompts), ...])")
        return None
    if not needs:
        raise MethodError(f"method {method!r} does not use calibration data; the calibrated methods are "
                          f"{', '.join(n for n in available_methods() if get_method(n).needs_calibration)}")
    calibrations = list(calibrations)
    _check_one_per_adapter(calibrations, adapters)
    _check_module_grams(calibrations, adapters, owners, weights)
    return calibrations


def _check_one_per_adapter(calibrations: list[Any], adapters: Sequence[Adapter]) -> None:
    """One Calibration per adapter, all made on the same base model (by fingerprint)."""
    names = ", ".join(repr(a.name) for a in adapters)
    if len(calibrations) != len(adapters):
        raise CalibrationError(f"got {len(calibrations)} calibration(s) for {len(adapters)} adapters ({names}); "
                               "give one per adapter, in the same order")
    for calibration in calibrations:
        if not isinstance(calibration, Calibration):
            raise CalibrationError(f"expected Calibration objects (from calibrate or load_calibration); got "
                                   f"{type(calibration).__name__}")
    models = {c.fingerprint: c for c in calibrations}
    if len(models) > 1:
        first, second = list(models.values())[:2]
        raise CalibrationError(f"calibrations were made on different base models: {first.name!r} on "
                               f"{first.metadata.get('model')!r} and {second.name!r} on "
                               f"{second.metadata.get('model')!r}")


def _check_module_grams(calibrations: list[Calibration], adapters: Sequence[Adapter],
                        owners: Mapping[str, list[int]], weights: Sequence[float]) -> None:
    """Each adapter of nonzero weight has linear modules only, each with a Gram of its width in its calibration."""
    for module, holders in owners.items():
        for i in (i for i in holders if weights[i] != 0):
            calibration, adapter, info = calibrations[i], adapters[i], adapters[i].info(module)
            where = f"calibration {calibration.name!r} (for adapter {adapter.name!r})"
            if info.kind != "linear":
                raise CalibrationError(f"adapter {adapter.name!r}, module {module!r}: calibrated merging supports "
                                       f"linear modules only, not {info.kind} ones")
            if module not in calibration:
                raise CalibrationError(f"{where} has no Gram for module {module!r}; calibrate the modules the adapter "
                                       "targets")
            if calibration.d_in(module) != info.shape[1]:
                d = calibration.d_in(module)
                raise CalibrationError(f"{where}: module {module!r} has a {d} x {d} Gram but the adapter's module has "
                                       f"d_in = {info.shape[1]} (made on another base model?)")
