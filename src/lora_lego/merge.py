"""Orchestration: align modules across adapters, validate once, give each module its own generator,
run the method module by module and assemble the merged adapter with its provenance and report."""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch

from .allocate import allocation_rule, check_allocatable, greedy_ranks, spectrum
from .calibration.grams import Calibration, check_calibrations, moments
from .compute import check_device, check_threads, in_threads
from .core_space import match_norm, pico_calibrate
from .errors import IncompatibleAdaptersError, LoraLegoError, LoraLegoWarning, MethodError
from .methods import get_method
from .methods.registry import DEFAULT_METHOD, PRUNE_METHOD, MethodSpec
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


def check_layouts(adapters: Sequence[Adapter]) -> None:
    """Refuse, before any module is read, adapters whose base layers store their weights differently
    (fan_in_fan_out: GPT-2's Conv1D keeps (d_in, d_out)); they cannot be written as one adapter."""
    layouts = [bool(a.metadata.get("fan_in_fan_out", False)) for a in adapters]
    if len(set(layouts)) > 1:
        raise IncompatibleAdaptersError("adapters disagree on fan_in_fan_out ("
                                        + ", ".join(f"{a.name!r}: {v}" for a, v in zip(adapters, layouts))
                                        + "): different base layer types")


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
    spec, resolved, weights, norm, allocation, average = _checked_request(adapters, method, weights, seed, pico, params)
    check_origins(adapters)
    check_layouts(adapters)
    owners = align_modules(adapters)
    calibration = check_calibrations(spec.name, spec.needs_calibration, adapters, calibration, owners, weights)
    threads, device = check_threads(threads), check_device(device)
    plan = _Plan(adapters, spec, resolved, weights, seed, calibration, device, pico, norm)
    jobs = _jobs(owners, weights)
    ranks = _allocated_ranks(plan, jobs, threads, average) if average is not None else {}
    merged, report = _merge_jobs(plan, jobs, ranks, threads, progress)
    recorded = {**resolved, **({"scale": "norm"} if norm else {}), **({"pico": True} if pico else {}),
                **({"allocate": allocation} if ranks else {})}
    metadata = merged_metadata(adapters, spec.name, recorded, weights, seed, report)  # warns at merge's caller
    if calibration:
        metadata["provenance"]["calibration"] = [c.summary() for c in calibration]
    return Adapter(merged, metadata, name="merged")


def _checked_request(adapters: list[Adapter], method: str, weights: Sequence[float] | None, seed: int, pico: bool,
                     params: dict[str, Any]) -> tuple[MethodSpec, dict[str, Any], list[float], bool, str, int | None]:
    """`merge`'s arguments checked before any module is read: (the method, its resolved parameters, the weights,
    whether to match norms, the allocation rule, the average rank to allocate or None for "uniform")."""
    if not adapters:
        raise MethodError("merge needs at least one adapter")
    if not isinstance(pico, bool):
        raise MethodError(f"pico must be true or false; got {pico!r}")
    spec = get_method(method)  # a method alias (e.g. "svd") is recorded under the registered name, spec.name
    norm, params = scale_rule(params)
    allocation, params = allocation_rule(params)
    resolved = spec.resolve(params)
    average = check_allocatable(spec.name, spec.whole_rank, resolved) if allocation != "uniform" else None
    weights = check_weights(weights, len(adapters), [a.name for a in adapters])
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MethodError(f"seed must be a non-negative integer; got {seed!r}")
    return spec, resolved, weights, norm or pico, allocation, average


@dataclass(frozen=True)
class _Plan:
    """A checked merge: what merging any one module needs."""

    adapters: list[Adapter]
    spec: MethodSpec
    resolved: dict[str, Any]  # the method's parameters, defaults filled in
    weights: list[float]
    seed: int
    calibration: list[Calibration] | None
    device: torch.device
    pico: bool
    norm: bool  # rescale each merged module to the inputs' mean norm (`scale="norm"`, implied by pico)


def _jobs(owners: dict[str, list[int]], weights: list[float]) -> list[tuple[str, list[int]]]:
    """(module, indices of the adapters merged into it), in module order: a weight of 0 leaves the adapter out,
    and a module that only such adapters have is left out of the result."""
    jobs = [(module, [i for i in holders if weights[i] != 0]) for module, holders in owners.items()]
    return [(module, holders) for module, holders in jobs if holders]


def _module_inputs(plan: _Plan, module: str,
                   holders: list[int]) -> tuple[list[LoraFactors], list[float], Sequence[torch.Tensor] | None]:
    """The module's factors (on the plan's device), weights and mean input Grams (None uncalibrated) of `holders`."""
    factors = [_read(plan.adapters[i], module).to(plan.device) for i in holders]  # a lazy adapter reads them here
    module_weights = [plan.weights[i] for i in holders]
    grams = moments([plan.calibration[i] for i in holders], module) if plan.calibration else None  # read lazily
    return factors, module_weights, grams


def _merge_jobs(plan: _Plan, jobs: list[tuple[str, list[int]]], ranks: dict[str, int], threads: int,
                progress: bool) -> tuple[dict[str, LoraFactors], dict[str, dict[str, Any]]]:
    """Every module's merged factors and report entry, in the jobs' order, merged on `threads` worker threads."""
    merged: dict[str, LoraFactors] = {}
    report: dict[str, dict[str, Any]] = {}
    results = in_threads(partial(_merge_module, plan, ranks), jobs, threads)
    for module, result, entry in progress_of(len(jobs), f"merge ({plan.spec.name})", "module", enabled=progress,
                                             iterable=results):
        merged[module], report[module] = result, entry
    return merged, report


def _merge_module(plan: _Plan, ranks: dict[str, int],
                  job: tuple[str, list[int]]) -> tuple[str, LoraFactors, dict[str, Any]]:
    """One module merged by the method (with the allocated rank, if any): its factors on the CPU and report entry."""
    module, holders = job
    factors, module_weights, grams = _module_inputs(plan, module, holders)
    where = f"module {module!r} (adapters {', '.join(repr(plan.adapters[i].name) for i in holders)})"
    method, resolved = plan.spec.name, plan.resolved
    try:
        result, info = plan.spec(pico_calibrate(factors) if plan.pico else factors, module_weights,
                                 generator=module_generator(plan.seed, module), calibration=grams,
                                 **{**resolved, **({"rank": ranks[module]} if ranks else {})})
        if plan.norm:
            result, info["norm_scale"] = match_norm(result, factors, module_weights)
    except LoraLegoError as error:
        raise type(error)(f"{where}: {error}") from error
    except torch.linalg.LinAlgError as error:  # e.g. an SVD of values overflowed by a huge `scale`
        raise MethodError(f"{where}: {method} failed numerically ({_first_line(error)}); "
                          f"check its parameters {resolved}") from error
    result = _valid_result(result, where, method, resolved)
    entry = module_report(result, factors, module_weights, info, [plan.adapters[i].name for i in holders])
    return module, result.to("cpu"), entry


def _valid_result(result: LoraFactors, where: str, method: str, resolved: dict[str, Any]) -> LoraFactors:
    """The method's result, checked finite; an exactly zero delta (e.g. all-zero inputs) as one zero rank."""
    if not (torch.isfinite(result.A).all() and torch.isfinite(result.B).all()):
        raise MethodError(f"{where}: {method} produced NaN or Inf (parameters {resolved}: a scale too large for "
                          "float32?)")
    if result.rank == 0:  # one zero rank keeps it a valid LoRA
        result = LoraFactors(result.A.new_zeros(1, result.d_in), result.B.new_zeros(result.d_out, 1), result.kind)
    return result


def _allocated_ranks(plan: _Plan, jobs: list[tuple[str, list[int]]], threads: int, average: int) -> dict[str, int]:
    """Each module's rank under a budget of `average` ranks per module in parameters (see `allocate`)."""
    def module_spectrum(job: tuple[str, list[int]]) -> tuple[str, torch.Tensor, int]:
        module, holders = job
        factors, module_weights, grams = _module_inputs(plan, module, holders)

        def run(**params):
            return plan.spec(factors, module_weights, generator=module_generator(plan.seed, module),
                             calibration=grams, **{**plan.resolved, **params})
        values = spectrum(plan.spec.name, run, factors, module_weights, grams, plan.resolved)
        return module, values.cpu(), sum(factors[0].shape)

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
