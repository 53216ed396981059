"""What the commands print after their work: the output's format and the tools that load it, the distance from
the exact sum, the retention tables, and the notes that point a user to what they may want instead."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..calibration.score import Scores
    from ..types import Adapter

DATA_FREE_NOTE = ("note: data-free merges vary with the adapters (no rule without data suits every set); give "
                  "--model BASE_DIR --prompts P1 P2 ... to measure what each adapter keeps, and --method auto to "
                  "choose the method and scale on them")


def written_words(written: str) -> str:
    """The format written and the tools that load it, for the line a merge or a conversion ends with."""
    from ..formats import get_format

    consumers = get_format(written).consumers
    return f"{written}; loads in {consumers}" if consumers else written


def folder_note(adapter: Adapter, written: str, output: str) -> str | None:
    """For an LLM adapter (no diffusion-model family) written as one diffusers file: what loads the folder form."""
    if written != "diffusers" or adapter.metadata.get("family"):
        return None
    from ..formats import SINGLE_FILE

    folder = output.removesuffix(SINGLE_FILE)
    return (f"note: this is an LLM adapter in a single diffusers file; PEFT (PeftModel.from_pretrained) and vLLM "
            f"load LLM adapters as a folder: write -o {folder} instead")


def scores_table(result: Scores) -> str:
    """The per-adapter table: retention, the two divergences, and the Gram proxy when computed."""
    width = max(len("adapter"), *(len(n) for n in result.names))
    head = f"{'adapter':<{width}}  retention  KL(task||merged)  KL(task||base)" + ("  proxy" if result.proxy else "")
    lines = [head]
    for i, name in enumerate(result.names):
        line = f"{name:<{width}}  {result.retention[i]:>9.3f}  {result.kl_merged[i]:>16.4g}  {result.kl_base[i]:>14.4g}"
        lines.append(line + (f"  {result.proxy[i]:>5.3f}" if result.proxy else ""))
    worst = result.names[result.retention.index(result.worst)]
    lines.append(f"mean retention {result.mean:.3f}, worst {result.worst:.3f} ({worst}); {result.positions} "
                 "position(s) of each adapter's prompts; 1 = like the task model, 0 = like the base model")
    return "\n".join(lines)


def candidates_table(auto: dict[str, Any], names: list[str]) -> str:
    short = [n.rstrip("/").split("/")[-1][:12] for n in names]
    lines = [f"{'candidate':<34} {'mean':>6} {'worst':>6}  " + " ".join(f"{s:>12}" for s in short)]
    for c in auto["candidates"]:
        mark = "*" if c["label"] == auto["chosen"] else " "
        lines.append(f"{mark}{c['label']:<33} {c['mean_retention']:>6.3f} {c['worst_retention']:>6.3f}  "
                     + " ".join(f"{r:>12.3f}" for r in c["retention"]))
    return "\n".join(lines)


def distance_words(report, command: str) -> str:
    """What the per-module relative errors say, in words that nobody reads as a quality score."""
    errors = [entry["relative_error"] for entry in report]
    finite = [e for e in errors if math.isfinite(e)]
    shown = f"{sum(finite) / len(finite):.3g}" if finite else "n/a"
    shown += f" ({len(errors) - len(finite)} module(s) whose deltas cancel exactly left out)" if len(finite) < len(
        errors) else ""
    if command == "prune":
        return f"relative error of the pruned deltas {shown} (0 = unchanged)"
    return (f"distance from the exact sum {shown} (0 = the weighted sum of the deltas, which tsv, ties and iso_c "
            "do not aim for: not a quality score)")
