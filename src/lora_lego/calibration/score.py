"""Evidence: how much of each adapter a merge keeps, measured on that adapter's own unlabeled prompts.

For adapter t with prompts P_t, three models are compared on P_t: the task model p_t (base + adapter t),
the merged model q (base + merge) and the base model b. With D the KL divergence of next-token
distributions, summed over the scored positions of P_t,

    retention_t = 1 - D(p_t, q) / D(p_t, b)

1: the merge behaves like the task model on its task; 0: no better than the base model; < 0: worse.
`positions` scores the token after each prompt ("last") or every position of the prompt ("all").

The teachers' outputs are computed once (`Scorer`), as each position's top-`top_k` tokens of p_t plus one
bin for the rest of the vocabulary; D is the KL between those binned distributions, a lower bound of the
full KL that is exact when the vocabulary has at most `top_k` tokens. Scoring a candidate then costs one
forward pass over the prompts. Adapters are applied by forward hooks (x A^T B^T added to each module's
output), never folded into the weights.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from ..defaults import POSITIONS
from ..errors import CalibrationError, LoraLegoWarning
from ..lowrank import inner
from ..progress import progress as progress_of
from ..types import Adapter
from .calibrate import read_prompts, token_batches
from .passes import AppliedAdapter

TOP_K = 256


@dataclass
class Scores:
    """Per-adapter retention of one merge (in the adapters' order), with what it was computed from.

    `kl_merged[t]` and `kl_base[t]` are the mean divergences D(p_t, q) and D(p_t, b) per scored position;
    `proxy[t]` (when calibrations were given) is the Gram proxy's retention (see `gram_terms`).
    """

    names: list[str]
    retention: list[float]
    kl_merged: list[float]
    kl_base: list[float]
    positions: str
    n_prompts: list[int]
    proxy: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return sum(self.retention) / len(self.retention)

    @property
    def worst(self) -> float:
        return min(self.retention)

    def to_dict(self) -> dict[str, Any]:
        rows = [{"adapter": n, "retention": r, "kl_merged": m, "kl_base": b, "n_prompts": p}
                for n, r, m, b, p in zip(self.names, self.retention, self.kl_merged, self.kl_base, self.n_prompts)]
        for row, proxy in zip(rows, self.proxy or []):
            row["proxy_retention"] = proxy
        return {"mean_retention": self.mean, "worst_retention": self.worst, "positions": self.positions,
                "adapters": rows, **self.extra}


class Scorer:
    """The cached teacher outputs of `adapters` on their prompts (one prompt list per adapter, in order).

    `model` is a transformers causal LM (its weights are never changed) with its `tokenizer`. Building
    the scorer runs the base model and each task model once over that task's prompts; each `scores`
    call runs the candidate once over every task's prompts.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, adapters: Sequence[Adapter], prompts: Sequence[Sequence[str]],
                 *, positions: str = "last", top_k: int = TOP_K, max_length: int = 512, batch_size: int = 8,
                 progress: bool = False):
        if positions not in POSITIONS:
            raise CalibrationError(f"positions must be one of {', '.join(POSITIONS)}; got {positions!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise CalibrationError(f"top_k must be an integer >= 1; got {top_k!r}")
        if len(prompts) != len(adapters):
            raise CalibrationError(f"got {len(prompts)} prompt sets for {len(adapters)} adapters; give one per "
                                   "adapter, in the same order")
        self.model, self.adapters, self.positions, self.progress = model, list(adapters), positions, progress
        self.names = [a.name for a in self.adapters]
        self.n_prompts = [len(p) for p in prompts]
        self.batches = [token_batches(tokenizer, list(p), max_length, batch_size, f"prompts of {a.name!r}")
                        for a, p in zip(self.adapters, prompts)]
        self.teachers: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per task, per batch: (top ids, log bins)
        self.kl_base: list[float] = []
        with self._bar(2 * sum(len(b) for b in self.batches), "score: teachers") as bar:
            for adapter, batches in zip(self.adapters, self.batches):
                teacher = []
                for logits in self._pass(adapter, 1.0, batches, bar):
                    top = logits.topk(min(top_k, logits.shape[-1]), dim=-1).indices
                    teacher.append((top, log_bins(logits, top)))
                base = [kl_bins(bins, log_bins(logits, top))
                        for (top, bins), logits in zip(teacher, self._pass(None, 1.0, batches, bar))]
                self.teachers.append(teacher)
                self.kl_base.append(_mean(base))
        for name, value in zip(self.names, self.kl_base):
            if value <= 0:
                warnings.warn(f"adapter {name!r} does not change the model's outputs on its prompts (KL 0 from "
                              "the base model): its retention is undefined (nan)", LoraLegoWarning, stacklevel=2)

    def divergences(self, candidate: Adapter | None, scale: float = 1.0) -> list[float]:
        """Mean D(p_t, q) per scored position for each task t, q = base + `scale` * candidate."""
        if candidate is not None and candidate.lazy:
            candidate = Adapter(dict(candidate.items()), candidate.metadata, candidate.name)  # read once
        result = []
        with self._bar(sum(len(b) for b in self.batches), "score: candidate") as bar:
            for batches, teacher in zip(self.batches, self.teachers):
                values = [kl_bins(bins, log_bins(logits, top))
                          for (top, bins), logits in zip(teacher, self._pass(candidate, scale, batches, bar))]
                result.append(_mean(values))
        return result

    def scores(self, candidate: Adapter | None, scale: float = 1.0) -> Scores:
        """The retention of each adapter in `scale` * candidate (None: the base model, retention 0)."""
        kl = self.divergences(candidate, scale)
        retention = [1 - m / b if b > 0 else math.nan for m, b in zip(kl, self.kl_base)]
        return Scores(list(self.names), retention, kl, list(self.kl_base), self.positions, list(self.n_prompts))

    def _pass(self, adapter: Adapter | None, scale: float, batches, bar) -> Iterator[torch.Tensor]:
        """For each batch, the next-token logits at its scored positions, (positions, vocab) float32 on the CPU,
        with `scale` * adapter applied."""
        device = self.model.get_input_embeddings().weight.device
        with torch.no_grad(), AppliedAdapter(self.model, adapter, "the base model", scale=scale):
            for ids, mask in batches:
                ids, mask = ids.to(device), mask.to(device)
                if self.positions == "last":
                    ends = mask.sum(1) - 1  # right padding: each prompt's last token
                    keep = torch.unique(ends)
                    logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False,
                                        logits_to_keep=keep).logits
                    picked = logits[torch.arange(len(ends), device=device), torch.searchsorted(keep, ends)]
                else:
                    picked = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
                bar.update(1)
                yield picked.float().cpu()

    def _bar(self, total: int, desc: str):
        return progress_of(total, desc, "batch", enabled=self.progress)


def log_bins(logits: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the bins [top tokens..., rest of the vocabulary], (n, k + 1) float64.

    `logits` (n, vocab), `top` (n, k) token ids. The rest bin is log(1 - sum of the top probabilities).
    """
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, top)
    covered = torch.logsumexp(picked, dim=-1, keepdim=True).clamp(max=0.0)
    rest = torch.log(-torch.expm1(covered))  # -inf when the top tokens hold all the mass
    return torch.cat([picked, rest], dim=-1)


def kl_bins(p: torch.Tensor, q: torch.Tensor) -> tuple[float, int]:
    """(sum over rows of KL(p || q), rows) for log-probability rows `p`, `q` of shape (n, bins)."""
    mass, q = p.exp(), q.clamp_min(-700.0)  # a candidate's underflowed bin: e^-700, not a zero probability
    terms = torch.where(mass > 0, mass * (p - q), torch.zeros_like(p))
    return float(terms.sum().clamp_min(0.0)), p.shape[0]


def _mean(parts: list[tuple[float, int]]) -> float:
    total, count = sum(s for s, _ in parts), sum(n for _, n in parts)
    return total / max(count, 1)


def prompt_sets(prompts: Sequence[str | Sequence[str]], *, max_prompts: int | None = None,
                format: str | None = None) -> list[list[str]]:
    """One list of prompt strings per adapter from prompts files (see `read_prompts`; `format` "jsonl", "txt" or
    None: from the content) or lists of strings."""
    sets = []
    for item in prompts:
        if isinstance(item, str) or hasattr(item, "__fspath__"):
            sets.append(read_prompts(item, max_prompts=max_prompts, format=format))
        else:
            texts = list(item)[:max_prompts]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise CalibrationError("each prompt set must be a prompts file or a non-empty list of strings")
            sets.append(texts)
    return sets


def gram_terms(merged: Adapter, adapters: Sequence[Adapter],
               calibrations: Sequence[Any]) -> list[tuple[float, float, float]]:
    """For each adapter t, (e, c, d) = sums over modules of <D, D>, <D, D_t> and <D_t, D_t> in the metric of
    t's input Gram (`lowrank.inner`), D the merged delta and D_t adapter t's (0 where it lacks the module).

    Modules that t's calibration does not cover are left out. From these, the merge scaled by s leaves
    ||X_t (s D - D_t)||^2 = s^2 e - 2 s c + d of t's output change on its inputs (`proxy_retention`).
    """
    per_module = module_terms(merged, adapters, calibrations)
    return [tuple(sum(terms[t][i] for terms in per_module.values()) for i in range(3)) for t in range(len(adapters))]


def module_terms(merged: Adapter, adapters: Sequence[Adapter],
                 calibrations: Sequence[Any]) -> dict[str, list[tuple[float, float, float]]]:
    """`gram_terms` per module: module -> [(e, c, d) of each adapter] (zeros where a calibration lacks it)."""
    result: dict[str, list[tuple[float, float, float]]] = {}
    for module in dict.fromkeys([*merged, *(m for a in adapters for m in a)]):
        row = []
        for adapter, calibration in zip(adapters, calibrations):
            if module not in calibration:
                row.append((0.0, 0.0, 0.0))
                continue
            gram = calibration.gram(module)
            own = adapter[module] if module in adapter else None
            mine = merged[module] if module in merged else None
            row.append((inner(mine, mine, gram) if mine is not None else 0.0,
                        inner(mine, own, gram) if mine is not None and own is not None else 0.0,
                        inner(own, own, gram) if own is not None else 0.0))
        result[module] = row
    return result


def module_scales(per_module: dict[str, list[tuple[float, float, float]]]) -> dict[str, float]:
    """A scale per module that maximises the mean proxy retention (`best_scale` with each adapter's total d_t as
    its normaliser, module by module); 1.0 for a module the merge leaves empty on every adapter's inputs."""
    totals = [sum(terms[t][2] for terms in per_module.values()) for t in range(len(next(iter(per_module.values()))))]
    scales = {}
    for module, terms in per_module.items():
        energy = sum(e / d for (e, _, _), d in zip(terms, totals) if d > 0)
        cross = sum(c / d for (_, c, _), d in zip(terms, totals) if d > 0)
        scales[module] = cross / energy if energy > 0 else 1.0
    return scales


def proxy_retention(terms: Sequence[tuple[float, float, float]], scale: float = 1.0) -> list[float]:
    """The Gram proxy of retention per adapter: 1 - ||X_t (s D - D_t)||^2 / ||X_t D_t||^2 (1 when the merge is
    adapter t on its modules, 0 for an empty merge; nan when t's calibration covers none of its modules)."""
    return [1 - (scale * scale * e - 2 * scale * c + d) / d if d > 0 else math.nan for e, c, d in terms]


def best_scale(terms: Sequence[tuple[float, float, float]]) -> float:
    """The global scale s of the merged delta that maximises the mean proxy retention over adapters:
    s = sum_t c_t / d_t / sum_t e_t / d_t (1.0 when the merge is empty on every adapter's inputs)."""
    usable = [(e, c, d) for e, c, d in terms if d > 0]
    energy = sum(e / d for e, _, d in usable)
    return sum(c / d for _, c, d in usable) / energy if energy > 0 else 1.0


def module_proxy_retention(per_module: dict[str, list[tuple[float, float, float]]],
                           scales: dict[str, float]) -> list[float]:
    """`proxy_retention` with each module's merged delta multiplied by its own scale."""
    n = len(next(iter(per_module.values())))
    change = [sum(scales[m] ** 2 * terms[t][0] - 2 * scales[m] * terms[t][1] + terms[t][2]
                  for m, terms in per_module.items()) for t in range(n)]
    own = [sum(terms[t][2] for terms in per_module.values()) for t in range(n)]
    return [1 - c / d if d > 0 else math.nan for c, d in zip(change, own)]
