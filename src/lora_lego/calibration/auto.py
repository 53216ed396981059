"""Merge with evidence: score merges on the adapters' own unlabeled prompts and keep the best one.

`merge_auto` builds candidates at one output rank (data-free methods, each at scale 1 and at the scale
that the Gram proxy prefers, plus the calibrated methods), scores each by its retention of every adapter
(`score.Scorer`: one forward pass over the prompts per candidate), keeps the best mean retention (within
`TIE` of it: the best worst task), refines its global scale by a short 1-D search, and returns it with the
whole table in its provenance. A single candidate is `-p scale=auto` for that method. `score` measures one
merge that already exists. The choice is made here, in `merge`'s layer; methods stay pure functions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import MethodError
from ..lowrank import concat_factors, relative_error
from ..merge import check_weights, merge
from ..methods import get_method
from ..types import Adapter, LoraFactors
from .calibrate import calibrate, load_model
from .grams import Calibration
from .regmean_pp import SPEC as REGMEAN_PP
from .regmean_pp import merge_regmean_pp
from .score import Scorer, Scores, best_scale, gram_terms, prompt_sets, proxy_retention

DATA_FREE = ("tsv", "ties", "iso_c", "wudi", "task_arithmetic", "lego_rank1")
CALIBRATED = ("regmean", "regmean_pp", "lego_calibrated")
TIE = 0.005  # candidates within this mean retention of the best are ranked by their worst task
STEP, STEPS = 1.4, 3  # the scale search: multiply or divide by STEP while retention improves, at most STEPS times
NEAR = 0.05  # a proxy scale this close to 1 is not scored as a candidate of its own

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    """One scored merge: `method` with `params`, its merged delta multiplied by `scale`."""

    method: str
    params: dict[str, Any]
    scale: float
    scores: Scores
    proxy: list[float]

    @property
    def label(self) -> str:
        shown = "".join(f" {k}={v}" for k, v in sorted(self.params.items()) if k != "rank")
        return f"{self.method}{shown} scale={self.scale:.3g}"

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "params": self.params, "scale": self.scale,
                "mean_retention": self.scores.mean, "worst_retention": self.scores.worst,
                "retention": self.scores.retention, "proxy_retention": self.proxy}


def choose(candidates: Sequence[Candidate]) -> Candidate:
    """The best mean retention; among those within TIE of it, the best worst-task retention."""
    finite = [c for c in candidates if math.isfinite(c.scores.mean)] or list(candidates)
    top = max(c.scores.mean for c in finite)
    return max((c for c in finite if c.scores.mean >= top - TIE), key=lambda c: (c.scores.worst, c.scores.mean))


def scaled(adapter: Adapter, scale: float) -> Adapter:
    """The adapter with every delta multiplied by `scale` > 0 (sqrt(scale) on both factors)."""
    root = math.sqrt(scale)
    modules = {m: LoraFactors(f.A * root, f.B * root, f.kind) for m, f in adapter.items()}
    return Adapter(modules, adapter.metadata, adapter.name)


def candidate_specs(methods: Sequence[str] | None, calibrated: bool) -> list[tuple[str, dict[str, Any]]]:
    """(method, params) of the candidates: `methods` as given (names, or "name key=value ..." strings), or
    the default data-free ones plus, with calibrations, the calibrated ones."""
    if methods is None:
        methods = list(DATA_FREE) + (list(CALIBRATED) if calibrated else [])
    specs = []
    for item in methods:
        name, *pairs = item.split()
        params = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
        spec = REGMEAN_PP if name == REGMEAN_PP.name else get_method(name)
        rank_names = {"rank", spec.parameter_aliases.get("rank", "rank")}  # lego's rank is n_clusters
        if rank_names & set(params):
            raise MethodError(f"candidate {item!r} sets a rank; every candidate is compared at one output rank: "
                              "give it once, as rank=")
        if (spec.needs_calibration or spec is REGMEAN_PP) and not calibrated:
            raise MethodError(f"candidate {name!r} needs calibration data (prompts or calibrations)")
        specs.append((spec.name, params))
    return specs


def merge_auto(adapters: Sequence[Adapter], *, model: str | Path | torch.nn.Module, prompts: Sequence[Any],
               tokenizer=None, calibration: Sequence[Calibration] | None = None, rank: int | None = None,
               methods: Sequence[str] | None = None, weights: Sequence[float] | None = None, seed: int = 0,
               positions: str = "last", max_prompts: int | None = None, max_length: int = 512, batch_size: int = 8,
               prompts_format: str | None = None, search: bool = True, progress: bool = False,
               threads: int | None = None,
               device: str | torch.device | None = None, scorer: Scorer | None = None) -> Adapter:
    """The best merge of `adapters` that the candidates give, judged on the adapters' prompts.

    `model`: the base model (a transformers folder, or a loaded model with its `tokenizer`); `prompts`: one
    prompts file or list of strings per adapter, in order (unlabeled; never test rows). `rank`: the output
    rank of every candidate (default: the largest input rank). `methods`: the candidates (default
    `DATA_FREE`, plus `CALIBRATED`); one method is "-p scale=auto" for it. `calibration` (one per adapter)
    saves recomputing the input Grams; they should cover every merged module. `search`: refine the chosen
    candidate's scale by retention. The result's provenance records every candidate's scores.
    """
    adapters = list(adapters)
    weights = check_weights(weights, len(adapters), [a.name for a in adapters])
    rank = rank if rank is not None else max(a.max_rank for a in adapters)
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model(model, device=device)
    texts = prompt_sets(prompts, max_prompts=max_prompts, format=prompts_format)
    if scorer is None:
        scorer = Scorer(model, tokenizer, adapters, texts, positions=positions, max_length=max_length,
                        batch_size=batch_size, progress=progress)
    if calibration is None:
        calibration = _calibrations(model, tokenizer, adapters, texts, max_length, batch_size, progress)
    build = partial(_candidate_merge, adapters, rank, model=model, tokenizer=tokenizer, texts=texts,
                    calibration=calibration, weights=weights, seed=seed, threads=threads, max_length=max_length,
                    batch_size=batch_size, progress=progress)
    tried: list[Candidate] = []
    merges: dict[tuple, Adapter] = {}
    for method, params in candidate_specs(methods, calibrated=True):
        key = (method, tuple(sorted(params.items())))
        merges[key], ranked = build(method, params)
        tried += _scored(method, {**params, **ranked}, merges[key], adapters, calibration, scorer)
    best = choose(tried)
    key = (best.method, tuple(sorted((k, v) for k, v in best.params.items() if k != "rank")))
    if search:
        best = _search_scale(best, merges[key], scorer, gram_terms(merges[key], adapters, calibration), tried)
    return _result(merges[key], best, tried, adapters, weights, scorer)


def _calibrations(model: torch.nn.Module, tokenizer, adapters: list[Adapter], texts: list[list[str]], max_length: int,
                  batch_size: int, progress: bool) -> list[Calibration]:
    """One calibration per adapter, on its prompts, of every module that any adapter has."""
    union = list(dict.fromkeys(m for a in adapters for m in a))
    return [calibrate(model, t, tokenizer=tokenizer, modules=union, max_length=max_length, batch_size=batch_size,
                      progress=progress) for t in texts]


def _candidate_merge(adapters: list[Adapter], rank: int, method: str, params: dict[str, Any], *, model, tokenizer,
                     texts: list[list[str]], calibration: list[Calibration], weights: list[float], seed: int,
                     threads: int | None, max_length: int, batch_size: int,
                     progress: bool) -> tuple[Adapter, dict[str, Any]]:
    """The candidate's merge, at output rank `rank` for a method that takes a rank, and that rank parameter
    ({"rank": rank}, or {} for a method without one)."""
    spec = REGMEAN_PP if method == REGMEAN_PP.name else get_method(method)
    ranked = {"rank": rank} if "rank" in spec.parameters or "rank" in spec.parameter_aliases else {}
    if spec is REGMEAN_PP:  # its Grams come from the model as it merges: the prompts, not `calibration`
        return merge_regmean_pp(adapters, model=model, tokenizer=tokenizer, prompts=texts, weights=weights, seed=seed,
                                threads=threads, max_length=max_length, batch_size=batch_size, progress=progress,
                                **spec.resolve({**params, **ranked})), ranked
    return merge(adapters, method, weights=weights, seed=seed, threads=threads, **ranked,
                 calibration=calibration if spec.needs_calibration else None, **params), ranked


def _scored(method: str, params: dict[str, Any], merged: Adapter, adapters: list[Adapter],
            calibration: list[Calibration], scorer: Scorer) -> list[Candidate]:
    """The candidate `merged` scored at scale 1 and, unless within NEAR of 1, at the scale the Gram proxy prefers."""
    terms = gram_terms(merged, adapters, calibration)
    proxy = round(best_scale(terms), 4)
    scored = []
    for scale in [1.0] + ([proxy] if proxy > 0 and abs(proxy - 1) > NEAR else []):
        if scale > 0:
            scored.append(Candidate(method, dict(params), scale, scorer.scores(merged, scale),
                                    proxy_retention(terms, scale)))
            log.info("auto: %s mean retention %.3f", scored[-1].label, scored[-1].scores.mean)
    return scored


def _search_scale(best: Candidate, merged: Adapter, scorer: Scorer, terms, tried: list[Candidate]) -> Candidate:
    """Multiply (or divide) the scale by STEP while the mean retention improves, at most STEPS times each way."""
    for factor in (STEP, 1 / STEP):
        current = best
        for _ in range(STEPS):
            scale = round(current.scale * factor, 4)
            trial = Candidate(best.method, best.params, scale, scorer.scores(merged, scale),
                              proxy_retention(terms, scale))
            tried.append(trial)
            if choose([current, trial]) is not trial:
                break
            current = trial
        if current is not best:
            return current
    return best


def _result(merged: Adapter, best: Candidate, tried: list[Candidate], adapters: list[Adapter], weights: list[float],
            scorer: Scorer) -> Adapter:
    result = scaled(merged, best.scale) if best.scale != 1.0 else merged
    metadata = dict(merged.metadata)
    provenance = dict(metadata["provenance"])
    provenance["params"] = {**provenance["params"], **({"scale": best.scale} if best.scale != 1.0 else {})}
    provenance["auto"] = {"chosen": best.label, "positions": scorer.positions, "n_prompts": scorer.n_prompts,
                          "candidates": [c.to_dict() for c in tried]}
    provenance["retention"] = dict(zip(best.scores.names, best.scores.retention))
    metadata["provenance"] = provenance
    if best.scale != 1.0:  # the distance from the exact sum, for the scaled delta
        report = {m: dict(entry) for m, entry in metadata["report"].items()}
        for module, entry in report.items():
            inputs = [(a[module], w) for a, w in zip(adapters, weights) if module in a and w != 0]
            target = concat_factors([f for f, _ in inputs], [w for _, w in inputs])
            entry["relative_error"] = relative_error(result[module], target)
        metadata["report"] = report
    return Adapter(dict(result.items()), metadata, "merged")


def score(merged: Adapter, adapters: Sequence[Adapter], *, model: str | Path | torch.nn.Module,
          prompts: Sequence[Any], tokenizer=None, calibration: Sequence[Calibration] | None = None,
          positions: str = "last", max_prompts: int | None = None, max_length: int = 512, batch_size: int = 8,
          prompts_format: str | None = None, device: str | torch.device | None = None,
          progress: bool = False) -> Scores:
    """Each adapter's retention in `merged` on its own prompts (see `score.Scorer`), and with `calibration`
    (one per adapter) the Gram proxy's retention too."""
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model(model, device=device)
    texts = prompt_sets(prompts, max_prompts=max_prompts, format=prompts_format)
    scorer = Scorer(model, tokenizer, list(adapters), texts,
                    positions=positions, max_length=max_length, batch_size=batch_size, progress=progress)
    result = scorer.scores(merged)
    if calibration is not None:
        result.proxy = proxy_retention(gram_terms(merged, list(adapters), list(calibration)))
    return result
