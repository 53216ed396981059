"""The model card (README.md) written into every output folder, from the adapter's provenance record:
PEFT-style YAML front matter (base_model, library_name, tags), then the sources, weights, method,
parameters, seed and version, and each adapter's retention with its bar chart when it was measured."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from . import __version__

PLOT_NAME = "retention.png"


def write_card(metadata: dict[str, Any], folder: Path) -> None:
    """README.md (and retention.png when retention was measured and matplotlib is installed) into `folder`."""
    retention = (metadata.get("provenance") or {}).get("retention")
    image = retention_png(retention) if retention else None
    if image is not None:
        (folder / PLOT_NAME).write_bytes(image)
    (folder / "README.md").write_text(model_card(metadata, plot=image is not None), encoding="utf-8")


def model_card(metadata: dict[str, Any], *, plot: bool = False) -> str:
    """The README.md text of an adapter with this metadata (deterministic: no dates, sorted parameters)."""
    provenance = metadata.get("provenance") or {}
    base = metadata.get("base_model_name_or_path")
    lines = ["---"]
    if base:
        lines.append(f"base_model: {json.dumps(str(base))}")
    lines += ["library_name: peft", "tags:", "- lora", "- lora-lego"]
    lines += ["- merge", "---", ""] if provenance.get("sources") else ["---", ""]
    method = provenance.get("method")
    title = "Merged LoRA adapter" if len(provenance.get("sources", [])) > 1 else "LoRA adapter"
    lines += [f"# {title}", "", f"Written by [lora-lego](https://arxiv.org/abs/2409.16167) "
              f"{provenance.get('version', __version__)}" + (f" with method `{method}`." if method else "."), ""]
    if base:
        lines += [f"Base model: `{base}`. Load with `PeftModel.from_pretrained(base_model, this_folder)`.", ""]
    lines += _sources(provenance)
    params = provenance.get("params")
    if params is not None:
        shown = ", ".join(f"`{k}={v}`" for k, v in sorted(params.items())) or "the method's defaults"
        lines += [f"Parameters: {shown}; seed {provenance.get('seed', 0)}.", ""]
    lines += _retention(provenance, plot)
    return "\n".join(lines).rstrip() + "\n"


def _sources(provenance: dict[str, Any]) -> list[str]:
    sources = provenance.get("sources") or []
    if not sources:
        return []
    weights = provenance.get("weights") or [1.0] * len(sources)
    lines = ["| source adapter | weight |", "|---|---|"]
    lines += [f"| `{name}` | {weight:g} |" for name, weight in zip(sources, weights)]
    return lines + [""]


def _retention(provenance: dict[str, Any], plot: bool) -> list[str]:
    retention = provenance.get("retention")
    if not retention:
        return ["Not measured on prompts: data-free merges vary with the adapters. `lora-lego score` (or `merge "
                "--model BASE --prompts ...`) measures what each adapter keeps.", ""]
    auto = provenance.get("auto")
    lines = ["## What each adapter kept", "",
             "Retention on each adapter's own unlabeled prompts: 1 - KL(task model || merged) / KL(task model || "
             "base). 1 = behaves like the task model, 0 = like the base model.", "",
             "| adapter | retention |", "|---|---|"]
    lines += [f"| `{name}` | {value:.3f} |" for name, value in retention.items()]
    lines += ["", f"![retention]({PLOT_NAME})", ""] if plot else [""]
    if auto:
        lines += [f"Chosen by `--method auto` among {len(auto['candidates'])} candidates: {auto['chosen']}.", "",
                  "| candidate | mean retention | worst |", "|---|---|---|"]
        lines += [f"| {c['label']} | {c['mean_retention']:.3f} | {c['worst_retention']:.3f} |"
                  for c in sorted(auto["candidates"], key=lambda c: -c["mean_retention"])]
        lines.append("")
    return lines


def retention_png(retention: dict[str, float], title: str = "retention per adapter") -> bytes | None:
    """A bar chart of retention per adapter as PNG bytes, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [name.rstrip("/").split("/")[-1] for name in retention]
    figure, axis = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 2), 3.2))
    values = list(retention.values())
    axis.bar(range(len(values)), values, color=["#4c72b0" if v >= 0 else "#c44e52" for v in values])
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel("retention (1 = task model, 0 = base)")
    axis.set_ylim(min(0.0, min(values) - 0.05), max(1.05, max(values) + 0.05))
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()
