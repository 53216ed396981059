"""Write an experiment's `Table` as JSON, a markdown table (with mean and own-normalised mean) and a PNG."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict
from pathlib import Path

from .experiments import Table

OWN = "own LoRA (upper reference)"


def summary_columns(table: Table) -> dict[str, dict[str, float]]:
    """Per row: mean over the table's task columns present, and the mean of acc / own-LoRA acc when known."""
    own = table.rows.get(OWN, {})
    out = {}
    for label, row in table.rows.items():
        values = [row[c] for c in table.columns if c in row]
        complete = len(values) == len(table.columns) or not table.splits  # a split table: means of whole rows only
        entry = {"mean": statistics.mean(values)} if values and complete and "mean" not in table.columns else {}
        ratios = [row[c] / own[c] for c in table.columns if c in row and own.get(c)]
        if ratios and complete and label != OWN and "mean" not in table.columns:
            entry["normalised"] = statistics.mean(ratios)
        for split, columns in table.splits.items():
            values = [row[c] for c in columns if c in row]
            if len(values) == len(columns):
                entry[f"{split} mean"] = statistics.mean(values)
                if label != OWN and all(own.get(c) for c in columns):
                    entry[f"{split} normalised"] = statistics.mean(row[c] / own[c] for c in columns)
        out[label] = entry
    return out


def markdown(table: Table) -> str:
    summary = summary_columns(table)
    order = ["mean", "normalised", *(f"{split} {what}" for split in table.splits for what in ("mean", "normalised"))]
    extra = sorted({k for entry in summary.values() for k in entry}, key=order.index)
    header = ["", *table.columns, *extra]
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in table.rows.items():
        cells = [f"{row[c]:.3f}" if c in row else "–" for c in table.columns]
        cells += [f"**{summary[label][k]:.3f}**" if k in summary[label] else "–" for k in extra]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any(k.endswith("normalised") for k in extra):
        lines.append("")
        lines.append("normalised = mean over tasks of (accuracy / the task's own-LoRA accuracy).")
    lines += [""] + [f"- {note}" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def plot(table: Table, path: Path) -> None:
    """A horizontal bar chart of each row's mean accuracy (or its `mean` column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summary_columns(table)
    labels = [label for label in table.rows if "mean" in summary[label] or "mean" in table.rows[label]]
    values = [summary[label].get("mean", table.rows[label].get("mean")) for label in labels]
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.2))
    axis.barh(range(len(labels)), values, color="#4c72b0")
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("mean accuracy over tasks")
    axis.set_title(table.title, fontsize=9)
    for i, value in enumerate(values):
        axis.text(value, i, f" {value:.3f}", va="center", fontsize=7)
    axis.set_xlim(0, min(1.0, max(values) * 1.15))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write(table: Table, out: Path, name: str) -> str:
    """<out>/<name>.json, .md and .png; returns the markdown."""
    text = markdown(table)
    (out / f"{name}.json").write_text(json.dumps({**asdict(table), "summary": summary_columns(table)}, indent=1))
    (out / f"{name}.md").write_text(text)
    plot(table, out / f"{name}.png")
    return text
