"""The README's table of methods names every registered method (and regmean_pp), so a new method cannot ship
undocumented."""

from __future__ import annotations

import re
from pathlib import Path

import lora_lego as ll

README = Path(__file__).resolve().parents[1] / "README.md"


def methods_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Methods")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_the_methods_table_lists_every_method():
    rows = [line for line in methods_section().splitlines() if line.startswith("| `")]
    first_cells = [line.split(" | ")[0] for line in rows]
    named = {name for cell in first_cells for name in re.findall(r"`([a-z_0-9]+)`", cell)}
    missing = sorted(set(ll.available_methods()) - named)
    assert not missing, f"README's Methods table does not name {missing}"
    assert "regmean_pp" in named
