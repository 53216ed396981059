"""The layers of DESIGN.md, checked on the source (issue 31, item 3): every module of lora_lego imports only modules
of its own layer or of the layers below it. Imports are read with `ast`, so imports inside functions and under
`TYPE_CHECKING` count as much as the ones at the top. A new module must be placed in a layer here; a new upward
import fails unless it is listed in KNOWN_UPWARD with its reason. The README's "Repository map" says the same in
words. Also: only the calibration modules and the benchmark import transformers, peft or diffusers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lora_lego"

# Lowest first. A module is named relative to the package ("formats.peft"); a package name ("methods") covers the
# package and everything inside it; "__init__" is lora_lego itself (the public API, which re-exports every layer).
LAYERS: dict[str, set[str]] = {
    # stdlib-only or torch-only helpers that know nothing of LoRA merging
    "foundation": {"_version", "errors", "types", "defaults", "signals", "progress", "oserrors", "noreplace",
                   "outputs", "tensorfile", "hub", "compute"},
    # pure torch math on factors
    "math": {"lowrank", "kmeans", "core_space"},
    # the merge methods and their registry (the package loads the families; the families import the registry)
    "methods": {"methods"},
    # the orchestration and what a merge records; the calibration data that the methods consume
    "merge": {"merge", "allocate", "provenance", "card", "calibration.grams"},
    # reading and writing adapter files
    "formats": {"formats"},
    # calibration and evidence (a base model's forward passes), and deployment (base checkpoints, serving targets)
    "calibration and deploy": {"calibration", "deploy"},
    # what a user touches: the public API, the command line (with recipes and descriptions), the benchmark harness
    "interfaces": {"__init__", "__main__", "cli", "bench"},
}

# (importer, imported) -> why the upward import stays. Empty today: keep it empty.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

# Third-party packages that only some modules may import (heavy, optional extras).
HEAVY = {"transformers", "peft", "diffusers"}
HEAVY_ALLOWED = {"calibration", "bench"}  # calibration: the `calibrate` extra; bench: the `bench` extra


def _modules() -> dict[str, Path]:
    """Every module of the package by its relative dotted name ("formats.peft", "__init__" for the root)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _package_of(module: str) -> list[str]:
    """The package a module's relative imports start from."""
    if module == "__init__":
        return []
    parts = module.split(".")
    return parts if MODULES[module].name == "__init__.py" else parts[:-1]


def _known(parts: list[str]) -> str:
    return ".".join(parts) if parts else "__init__"


def _imports(module: str) -> tuple[set[str], set[str]]:
    """(lora_lego modules, third-party top-level packages) that `module` imports anywhere in its source."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    own, other = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, *rest = alias.name.split(".")
                if top == "lora_lego":
                    own.add(_known(rest))
                else:
                    other.add(top)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                top, *rest = (node.module or "").split(".")
                if top != "lora_lego":
                    other.add(top)
                    continue
                base = rest
            else:
                package = _package_of(module)
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            for alias in node.names:  # `from .formats import files`: the submodule itself where it is one
                target = _known(base + [alias.name])
                own.add(target if target in MODULES else _known(base))
    return own, other


def _layer_of(module: str) -> int:
    names = [module, *(".".join(module.split(".")[:i]) for i in range(len(module.split(".")) - 1, 0, -1))]
    for index, members in enumerate(LAYERS.values()):
        if any(name in members for name in names):
            return index
    raise KeyError(module)


def test_every_module_is_in_exactly_one_layer():
    missing = [m for m in MODULES if not any(m == name or m.startswith(name + ".")
                                             for members in LAYERS.values() for name in members)]
    assert not missing, f"place these modules in a layer of LAYERS: {missing}"
    listed = [name for members in LAYERS.values() for name in members]
    assert len(listed) == len(set(listed)), "a module is listed in two layers"
    assert all(name in MODULES for name in listed), [name for name in listed if name not in MODULES]


def test_no_module_imports_a_higher_layer():
    layer_names = list(LAYERS)
    upward = {}
    for module in MODULES:
        for imported in _imports(module)[0]:
            if _layer_of(imported) > _layer_of(module) and (module, imported) not in KNOWN_UPWARD:
                upward[(module, imported)] = (f"{layer_names[_layer_of(module)]} -> "
                                              f"{layer_names[_layer_of(imported)]}")
    assert not upward, f"upward imports (move the code down, or list them in KNOWN_UPWARD with a reason): {upward}"


def test_known_upward_imports_are_still_there():
    stale = [pair for pair in KNOWN_UPWARD if pair[1] not in _imports(pair[0])[0]]
    assert not stale, f"these imports are gone; remove them from KNOWN_UPWARD: {stale}"


def test_only_the_calibration_modules_and_the_benchmark_import_heavy_packages():
    offenders = {module: sorted(_imports(module)[1] & HEAVY) for module in MODULES
                 if _imports(module)[1] & HEAVY and module.split(".")[0] not in HEAVY_ALLOWED}
    assert not offenders, offenders


def test_the_import_reader_sees_relative_nested_and_absolute_imports():
    own, other = _imports("calibration.calibrate")
    assert {"calibration.grams", "errors", "types"} <= own and "transformers" in other  # inside a function
    assert "formats.peft_keys" in _imports("formats.peft")[0]  # `from . import peft_keys`
    assert "__init__" in _imports("bench.calibrated")[0]  # `from .. import ...`
    assert "methods.registry" in _imports("methods.lego")[0]  # `from .registry import register`


def _cycle() -> list[str] | None:
    """One import cycle among the package's modules (counting imports inside functions too), or None."""
    graph = {module: sorted(_imports(module)[0] - {module}) for module in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module], path[len(path):] = 1, [module]
        for imported in graph.get(module, []):
            if state.get(imported) == 1:
                return path[path.index(imported):] + [imported]
            if imported not in state and (found := visit(imported)):
                return found
        state[module] = 2
        path.pop()
        return None

    return next((found for module in graph if module not in state and (found := visit(module))), None)


def test_no_import_cycle():
    """Not even through imports deferred into functions: the method registry sits below the families that register
    in it, and the package that loads the families sits above both (issue 31)."""
    assert _cycle() is None, " -> ".join(_cycle())


def test_no_module_imports_another_modules_private_names():
    """What a module shares has a public name: `from .lego import _pool` hid a dependency (issue 31's review)."""
    private = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lora_lego")):
                private += [f"{module}: {node.module}.{alias.name}" for alias in node.names
                            if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not private, private
