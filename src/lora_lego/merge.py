"""Orchestration: align modules across adapters, validate once, give each module its own generator,
run the method module by module and assemble the merged adapter with its provenance and report."""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from typing import Any, Sequence

import torch

from .allocate import allocation_rule, check_allocatable, greedy_ranks, spectrum
from .calibration.grams import Calibration, check_calibrations, moments
from .compute import check_device, check_threads, in_threads
from .core_space import match_norm, pico_calibrate
from .errors import IncompatibleAdaptersError, LoraLegoError, LoraLegoWarning, MethodError
from .methods import get_method
from .methods.registry import DEFAULT_METHOD, PRUNE_METHOD
from .progress import progress as progress_of
from .provenance import merged_metadata, module_report
from .types import Adapter, LoraFactors, check_factor_values, check_origins

MAX_WEIGHT = 1e6  # largest |weight| of an adapter: task weights are O(1), larger ones overflow float32

log = logging.getLogger(__name__)


def module_generator(seed: int, module: str) -> torch.Generator:
    """A generator seeded from (seed, module name) by a stable hash, so modules are independent of order."""
    digest = hashlib.blake2b(f"{seed}\x00{module}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def check_weights(weights: Sequence[float] | None, n: int, names: Sequence[str] | None = None) -> list[float]:
    """Per-adapter weights as floats (default all 1): n finite values with |w| <= MAX_WEIGHT, not all zero.

    `names` (the adapters', in order) make the messages say which adapter's weight is wrong.
    """
    if weights is None:
        return [1.0] * n
    names = list(names) if names is not None else [f"#{i + 1}" for i in range(n)]
    listed = ", ".join(repr(name) for name in names)
    weights = list(weights)
    if len(weights) != n:
        raise MethodError(f"got {len(weights)} weights for {n} adapters ({listed}); give one weight per adapter")
    try:
        values = [float(w) for w in weights]
    except (TypeError, ValueError, OverflowError):
        raise MethodError(f"weights must be numbers; got {weights!r} for adapters {listed}") from None
    for name, w in zip(names, values):
        if not math.isfinite(w) or abs(w) > MAX_WEIGHT:
            raise MethodError(f"adapter {name!r}: weight {w} is not a finite number with |w| <= {MAX_WEIGHT:g}; "
                              f"got weights {values}")
    if all(w == 0 for w in values):
        raise MethodError(f"all weights are zero (adapters {listed}): the merge would be empty")
    return values


def align_modules(adapters: Sequence[Adapter]) -> dict[str, list[int]]:
    """Union of modules (in order of first appearance) -> indices of the adapters that have each.

    Raises IncompatibleAdaptersError when a module differs in shape or kind between adapters.
    """
    owners: dict[str, list[int]] = {}
    for index, adapter in enumerate(adapters):
        for module in adapter:
            factors = adapter.info(module)  # shape and kind only: a lazy adapter's factors are not read here
            holders = owners.setdefault(module, [])
            if holders:
                first = adapters[holders[0]].info(module)
                if (first.shape, first.kind) != (factors.shape, factors.kind):
                    raise IncompatibleAdaptersError(
                        f"module {module!r}: adapter {adapter.name!r} has a {factors.kind} delta of shape "
                        f"{factors.shape} but adapter {adapters[holders[0]].name!r} has a {first.kind} delta "
                        f"of shape {first.shape} (adapters of different base models?)"
                    )
            holders.append(index)
    if len(adapters) > 1:
        for index, adapter in enumerate(adapters):
            if adapter.modules and all(owners[m] == [index] for m in adapter):
                warnings.warn(
                    f"adapter {adapter.name!r} has no module in common with the other adapters; "
                    "it is merged as a union (its modules are taken from it alone)",
                    LoraLegoWarning,
                    stacklevel=3,
                )
    return owners


def scale_rule(params: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(whether `scale="norm"` was asked for, the other parameters). `scale="norm"` works with every
    method: the method runs at its own default scale, then each module's merged delta is rescaled to
    the mean Frobenius norm of the weighted inputs (`core.match_norm`). A number stays the method's own
    `scale` parameter."""
    value = params.get("scale")
    if isinstance(value, str) and value.strip().lower() == "norm":
        return True, {key: v for key, v in params.items() if key != "scale"}
    return False, dict(params)


def merge(
    adapters: Sequence[Adapter],
    method: str = DEFAULT_METHOD,
    *,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    progress: bool = False,
    threads: int | None = None,
    device: str | torch.device | None = None,
    calibration: Sequence[Calibration] | None = None,
    pico: bool = False,
    **params: Any,
) -> Adapter:
    """Merge adapters module by module with a registered method.

    A module that an adapter lacks contributes nothing from that adapter (union of modules), and so
    does an adapter of weight 0 (a module only such adapters have is left out of the result).
    `weights` are per adapter (default 1 each; negative values negate a task). The result's
    metadata holds the provenance and a per-module report (rank, relative error against the exact
    weighted sum, and what the method records, e.g. cluster sizes). Modules are merged side by side on
    `threads` worker threads (default: torch's thread count), each with one torch thread; the result
    does not depend on `threads`. `device` ("cpu" by default, or "cuda") is where the methods' large
    products run; inputs are read and checked on the CPU, and the result comes back to the CPU.
    `calibration` (one per adapter, in order; see `calibrate`) is what calibrated methods such as
    `regmean` need: each module's call gets the adapters' mean input Grams (`Calibration.moment`).

    `allocate="greedy"` (with `rank` r, for regmean and the spectral methods) spends the parameter count of
    rank r everywhere over the modules by their singular values instead (see `allocate`).

    Two steps work with every method, without data: `pico=True` shrinks the output directions the
    adapters share before the method runs (`core.pico_calibrate`, arXiv 2604.16826) and implies
    `scale="norm"`, which rescales each merged module to the inputs' mean norm (see `scale_rule`).
    """
    adapters = list(adapters)
    if not adapters:
        raise MethodError("merge needs at least one adapter")
    if not isinstance(pico, bool):
        raise MethodError(f"pico must be true or false; got {pico!r}")
    spec = get_method(method)
    method = spec.name  # a method alias (e.g. "svd") is recorded under the registered name
    norm, params = scale_rule(params)
    norm = norm or pico
    allocation, params = allocation_rule(params)
    resolved = spec.resolve(params)
    average = check_allocatable(method, spec.whole_rank, resolved) if allocation != "uniform" else None
    weights = check_weights(weights, len(adapters), [a.name for a in adapters])
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MethodError(f"seed must be a non-negative integer; got {seed!r}")
    check_origins(adapters)
    owners = align_modules(adapters)
    calibration = check_calibrations(method, spec.needs_calibration, adapters, calibration, owners, weights)
    threads, device = check_threads(threads), check_device(device)
    jobs = [(module, [i for i in holders if weights[i] != 0]) for module, holders in owners.items()]
    # a weight of 0 leaves the adapter out; a module that only such adapters have is left out of the result
    jobs = [(module, holders) for module, holders in jobs if holders]
    ranks = _allocated_ranks(spec, adapters, jobs, weights, calibration, resolved, seed, threads, device,
                             average) if average is not None else {}

    def merge_module(job: tuple[str, list[int]]) -> tuple[str, LoraFactors, dict[str, Any]]:
        module, holders = job
        # a lazy adapter reads the module from disk here
        factors = [_read(adapters[i], module).to(device) for i in holders]
        module_weights = [weights[i] for i in holders]
        names = ", ".join(repr(adapters[i].name) for i in holders)
        grams = moments([calibration[i] for i in holders], module) if calibration else None  # read one at a time
        try:
            result, info = spec(pico_calibrate(factors) if pico else factors, module_weights,
                                generator=module_generator(seed, module), calibration=grams,
                                **{**resolved, **({"rank": ranks[module]} if ranks else {})})
            if norm:
                result, info["norm_scale"] = match_norm(result, factors, module_weights)
        except LoraLegoError as error:
            raise type(error)(f"module {module!r} (adapters {names}): {error}") from error
        except torch.linalg.LinAlgError as error:  # e.g. an SVD of values overflowed by a huge `scale`
            raise MethodError(f"module {module!r} (adapters {names}): {method} failed numerically "
                              f"({_first_line(error)}); check its parameters {resolved}") from error
        if not (torch.isfinite(result.A).all() and torch.isfinite(result.B).all()):
            raise MethodError(f"module {module!r} (adapters {names}): {method} produced NaN or Inf "
                              f"(parameters {resolved}: a scale too large for float32?)")
        if result.rank == 0:  # an exactly zero delta (e.g. all-zero inputs): one zero rank keeps it a valid LoRA
            result = LoraFactors(result.A.new_zeros(1, result.d_in), result.B.new_zeros(result.d_out, 1), result.kind)
        entry = module_report(result, factors, module_weights, info, [adapters[i].name for i in holders])
        return module, result.to("cpu"), entry

    merged: dict[str, LoraFactors] = {}
    report: dict[str, dict[str, Any]] = {}
    results = in_threads(merge_module, jobs, threads)
    for module, result, entry in progress_of(len(jobs), f"merge ({method})", "module", enabled=progress,
                                             iterable=results):
        merged[module], report[module] = result, entry
    recorded = {**resolved, **({"scale": "norm"} if norm else {}), **({"pico": True} if pico else {}),
                **({"allocate": allocation} if ranks else {})}
    metadata = merged_metadata(adapters, method, recorded, weights, seed, report)
    if calibration:
        metadata["provenance"]["calibration"] = [c.summary() for c in calibration]
    return Adapter(merged, metadata, name="merged")


def _allocated_ranks(spec, adapters, jobs, weights, calibration, resolved, seed, threads, device,
                     average: int) -> dict[str, int]:
    """Each module's rank under a budget of `average` ranks per module in parameters (see `allocate`)."""
    def module_spectrum(job: tuple[str, list[int]]) -> tuple[str, torch.Tensor, int]:
        module, holders = job
        factors = [_read(adapters[i], module).to(device) for i in holders]
        module_weights = [weights[i] for i in holders]
        grams = moments([calibration[i] for i in holders], module) if calibration else None

        def run(**params):
            return spec(factors, module_weights, generator=module_generator(seed, module), calibration=grams,
                        **{**resolved, **params})
        return module, spectrum(spec.name, run, factors, module_weights, grams, resolved).cpu(), sum(factors[0].shape)

    spectra, costs = {}, {}
    for module, values, cost in in_threads(module_spectrum, jobs, threads):
        spectra[module], costs[module] = values, cost
    budget = sum(max(min(average, len(values)), 1) * costs[m] for m, values in spectra.items())
    return greedy_ranks(spectra, costs, budget)


def _read(adapter: Adapter, module: str) -> LoraFactors:
    """The module's factors; values checked here unless a lazy adapter's reader already checked them."""
    factors = adapter[module]
    if not adapter.lazy:  # adapters built in memory skip load_adapter's checks
        check_factor_values(factors, f"adapter {adapter.name!r}, module {module!r}")
    return factors


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def prune(adapter: Adapter, *, rank: int, method: str = PRUNE_METHOD, seed: int = 0, **params: Any) -> Adapter:
    """Reduce one adapter to rank `rank` per module (modules with fewer ranks keep theirs); by default by the
    truncated SVD of each module's delta ("svd", the best measured), `method="lego"` for LoRA-LEGO."""
    return merge([adapter], method, seed=seed, rank=rank, **params)
