"""Human-readable descriptions: adapters (modules, ranks, scaling, size; shared modules and the cosine
similarity of their deltas per module type) and merge reports."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

from ..errors import AdapterFormatError
from ..formats.family import component
from ..formats.names import parse_underscored
from ..lowrank import frobenius_norm, inner
from ..types import Adapter


def module_type(module: str) -> str:
    """The last component of a module path, e.g. "q_proj" (of a kohya name too: "..._attn1_to_q" -> "to_q")."""
    if module.startswith("lora_") and "." not in module:
        body = module.split("_", 2)[-1]
        dotted, _ = parse_underscored(body)
        return dotted.rsplit(".", 1)[-1] if dotted else body.rsplit("_", 1)[-1]
    return module.rsplit(".", 1)[-1]


# header metadata worth showing (kohya's sd-scripts, the SAI model spec)
TRAINER_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                "ss_sd_model_name", "ss_output_name", "modelspec.architecture", "modelspec.title",
                "modelspec.merged_from", "sshs_model_hash")


def describe_adapter(adapter: Adapter) -> str:
    meta = adapter.metadata
    infos = [adapter.info(m) for m in adapter]
    types = Counter(module_type(m) for m in adapter)
    ranks = Counter(info.rank for info in infos)
    kinds = Counter(info.kind for info in infos)
    components = Counter(component(m) or "model" for m in adapter)
    scalings = sorted({round(s, 6) for s in meta.get("scaling", {}).values()})
    lines = [
        f"adapter {adapter.name}",
        f"  format: {meta.get('format', 'in memory')}   family: {meta.get('family') or '-'}"
        f"   dtype: {meta.get('dtype')}",
    ]
    if meta.get("format") == "peft" or meta.get("base_model_name_or_path") or meta.get("task_type"):
        lines.append(f"  base model: {meta.get('base_model_name_or_path')}   task: {meta.get('task_type')}")
    if meta.get("format") == "peft":
        config = meta.get("peft_config", {})
        lines += [
            f"  config: r={config.get('r')} lora_alpha={config.get('lora_alpha')}"
            f" use_rslora={bool(config.get('use_rslora'))}"
            f" rank_pattern={len(config.get('rank_pattern') or {})}"
            f" alpha_pattern={len(config.get('alpha_pattern') or {})}"
            f" fan_in_fan_out={bool(config.get('fan_in_fan_out'))}",
        ]
    if len(components) > 1 or "model" not in components:
        lines.append(f"  components: {', '.join(f'{c}: {n}' for c, n in sorted(components.items()))}")
    lines += [
        f"  modules: {len(adapter)} ({', '.join(f'{k}: {n}' for k, n in sorted(kinds.items()))})"
        + (f"; LyCORIS expanded: {', '.join(f'{k}: {n}' for k, n in sorted(meta['lycoris'].items()))}"
           if meta.get("lycoris") else ""),
        f"  module types: {', '.join(f'{t}: {n}' for t, n in sorted(types.items()))}",
        f"  ranks: {', '.join(f'{r} ({n} modules)' for r, n in sorted(ranks.items()))}",
        f"  scaling: {', '.join(f'{s:g}' for s in scalings) or '-'}   parameters: {adapter.num_parameters():,}",
    ]
    header = meta.get("header") or {}
    shown = [f"{key}={_short(header[key])}" for key in TRAINER_KEYS if key in header]
    if shown:
        lines.append(f"  trainer metadata: {'  '.join(shown)}")
    if "lora_adapter_metadata" in header:
        lines.append("  diffusers lora_adapter_metadata: present")
    lines += provenance_lines(meta.get("provenance"))
    return "\n".join(lines)


def provenance_lines(provenance: dict | None) -> list[str]:
    """How lora-lego made the adapter, as its outputs record it (every format): method, parameters, seed,
    sources and weights, calibration, retention, recipe. `inspect --recipe` prints it as a recipe."""
    if not provenance:
        return ["  provenance: none recorded (not written by lora-lego)"]
    params = provenance.get("params") or {}
    shown = ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "defaults"
    lines = [f"  made by: {provenance.get('tool', 'lora-lego')} {provenance.get('version', '?')}, method "
             f"{provenance.get('method')} ({shown}), seed {provenance.get('seed')}"]
    sources = provenance.get("sources") or []
    weights = provenance.get("weights") or [1.0] * len(sources)
    if sources:
        lines.append("  sources: " + ", ".join(f"{s} (weight {w:g})" for s, w in zip(sources, weights)))
    for entry in provenance.get("calibration") or []:
        lines.append(f"  calibration: {entry.get('model')} on {entry.get('prompts')} "
                     f"({entry.get('n_prompts')} prompts)")
    evidence = provenance.get("evidence")
    if evidence:
        prompts = ", ".join(evidence.get("prompts") or ["generated prompts"])
        lines.append(f"  measured with: {evidence.get('model')} on {prompts}")
    retention = provenance.get("retention")
    if retention:
        lines.append("  retention: " + ", ".join(f"{name} {value:.3f}" for name, value in retention.items()))
    if provenance.get("auto"):
        lines.append(f"  auto chose: {provenance['auto'].get('chosen')}")
    recipe = provenance.get("recipe")
    if recipe:
        lines.append(f"  recipe: {recipe.get('file')}, {recipe.get('key')}")
    return lines


def _short(value: str, limit: int = 60) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= limit else value[:limit - 3] + "..."


def type_cosines(left: Adapter, right: Adapter) -> dict[str, float]:
    """Per module type: cosine of the two adapters' deltas over all their shared modules of that type."""
    dots: dict[str, float] = defaultdict(float)
    norms: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for module in left:
        if module in right and left[module].shape == right[module].shape:
            kind = module_type(module)
            dots[kind] += inner(left[module], right[module])
            norms[kind][0] += frobenius_norm(left[module]) ** 2
            norms[kind][1] += frobenius_norm(right[module]) ** 2
    return {kind: dots[kind] / math.sqrt(a * b) if a * b > 0 else 0.0 for kind, (a, b) in norms.items()}


def describe_adapters(adapters: Sequence[Adapter]) -> str:
    parts = [describe_adapter(a) for a in adapters]
    if len(adapters) > 1:
        shared = set.intersection(*(set(a) for a in adapters))
        union = set().union(*(set(a) for a in adapters))
        parts.append(f"shared modules: {len(shared)} of {len(union)} in the union")
        for i, left in enumerate(adapters):
            for right in adapters[i + 1:]:
                cosines = type_cosines(left, right)
                shown = ", ".join(f"{t} {c:+.3f}" for t, c in sorted(cosines.items())) or "no shared modules"
                parts.append(f"cosine of deltas, {left.name} vs {right.name}: {shown}")
    return "\n".join(parts)


def describe_report(path: str | Path) -> str:
    """Summary of a report written by `merge --report`: ranks, errors, cluster sizes, sources per rank."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        modules = data["modules"]
        provenance = data.get("provenance", {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise AdapterFormatError(f"report {str(path)!r}: not a lora-lego merge report ({error})") from None
    errors = [entry["relative_error"] for entry in modules.values()]
    ranks = Counter(entry["rank"] for entry in modules.values())
    lines = [
        f"report {path}: method {provenance.get('method')} params {provenance.get('params')}"
        f" seed {provenance.get('seed')}",
        f"  sources: {', '.join(provenance.get('sources', []))}",
        f"  modules: {len(modules)}; ranks: {', '.join(f'{r} ({n})' for r, n in sorted(ranks.items()))}",
        f"  distance from the exact weighted sum of the deltas (0 for concat; ties, tsv, iso_c and the like "
        f"depart from it by design, so it is not a quality score): "
        f"mean {_mean_finite(errors):.4f}, max {max(errors, default=0.0):.4f}",
    ]
    lines += _retention_lines(provenance)
    sizes = [s for entry in modules.values() for s in entry.get("cluster_sizes", [])]
    if sizes:
        lines.append(f"  cluster sizes: mean {sum(sizes) / len(sizes):.2f}, max {max(sizes)}, singletons "
                     f"{sum(1 for s in sizes if s == 1)} of {len(sizes)}")
    mixed = [per for entry in modules.values() for per in entry.get("sources_per_rank", [])]
    if mixed:
        shared = sum(1 for per in mixed if len(per) > 1)
        lines.append(f"  merged ranks drawing on more than one adapter: {shared} of {len(mixed)}")
    worst = sorted(modules.items(), key=lambda item: -item[1]["relative_error"])[:3]
    lines += [f"  worst: {m} error {e['relative_error']:.4f} rank {e['rank']}" for m, e in worst]
    return "\n".join(lines)


def _mean_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _retention_lines(provenance: dict) -> list[str]:
    """Retention per adapter (measured on its own prompts: 1 = like the task model, 0 = like the base model)."""
    retention = provenance.get("retention")
    if not retention:
        return ["  retention: not measured (merge with --model BASE --prompts ..., or `lora-lego score`)"]
    lines = ["  retention on each adapter's own prompts (1 - KL(task||merged) / KL(task||base); 1 = like the task "
             "model, 0 = like the base model):"]
    lines += [f"    {name}: {value:.3f}" for name, value in retention.items()]
    auto = provenance.get("auto")
    if auto:
        lines.append(f"  auto chose {auto['chosen']} among {len(auto['candidates'])} candidates")
    return lines
