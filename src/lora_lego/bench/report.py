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
    """A horizontal bar chart of each row's mean accuracy (or its `mean` column); a table with dev / confirm
    splits gets one bar per split instead, so rows evaluated on the dev tasks only are shown too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summary_columns(table)
    splits = list(table.splits) or [None]

    def value(label: str, split: str | None) -> float | None:
        if split is None:
            return summary[label].get("mean", table.rows[label].get("mean"))
        return summary[label].get(f"{split} mean")

    labels = [label for label in table.rows if any(value(label, split) is not None for split in splits)]
    height = 0.8 / len(splits)
    figure, axis = plt.subplots(figsize=(7, (0.2 + 0.15 * len(splits)) * len(labels) + 1.2))
    top = 0.0
    for j, (split, colour) in enumerate(zip(splits, ["#4c72b0", "#c44e52", "#55a868"])):
        bars = [(i + (j - (len(splits) - 1) / 2) * height, value(label, split)) for i, label in enumerate(labels)
                if value(label, split) is not None]
        axis.barh([y for y, _ in bars], [v for _, v in bars], height=height, color=colour,
                  label=None if split is None else f"{split} tasks")
        for y, v in bars:
            axis.text(v, y, f" {v:.3f}", va="center", fontsize=7 if len(splits) == 1 else 6)
        top = max([top, *(v for _, v in bars)])
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("mean accuracy over tasks")
    axis.set_title(table.title, fontsize=9)
    if splits != [None]:
        axis.legend(fontsize=7, loc="lower right")
    axis.set_xlim(0, min(1.0, top * 1.15))
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
