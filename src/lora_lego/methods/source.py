"""The built-in methods' specs read from their source with `ast`, without importing them (they import torch):
what `lora-lego methods` lists in a fraction of a second. The method modules stay the one source: this reads
the same `@register(...)` / `describe(...)` arguments, keyword-only parameters, annotations, defaults and
docstrings that `registry.describe` reads from the imported functions, and a test checks that both agree."""

from __future__ import annotations

import ast
import functools
import inspect
from pathlib import Path
from typing import Any, Literal

from .registry import RESERVED, MethodSpec, parameter_docs

PACKAGE = Path(__file__).parents[1]  # lora_lego
# what a parameter's annotation may name ("simple annotations", DESIGN.md); anything else is an error here
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "dict": dict, "list": list, "tuple": tuple, "Any": Any}


def builtin_specs() -> dict[str, MethodSpec]:
    """Every method that importing `lora_lego.methods` registers, by name, with `fn` None."""
    specs: dict[str, MethodSpec] = {}
    for module in _method_modules():
        specs.update(specs_in(f"methods.{module}"))
    return specs


def specs_in(module: str) -> dict[str, MethodSpec]:
    """The specs that the module `lora_lego.<module>` builds, by name: one per function decorated with
    `@register(name, ...)`, and one per module-level `X = describe(name, function, ...)`."""
    tree = _tree(module)
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    specs: dict[str, MethodSpec] = {}
    for node in tree.body:
        calls = node.decorator_list if isinstance(node, ast.FunctionDef) else \
            [node.value] if isinstance(node, ast.Assign) else []
        for call in calls:
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                    and call.func.id in ("register", "describe")):
                continue
            name = _value(call.args[0], module)
            fn = node if call.func.id == "register" else functions[call.args[1].id]
            options = {keyword.arg: _value(keyword.value, module) for keyword in call.keywords}
            specs[name] = _spec(name, fn, module, **options)
    return specs


def _spec(name: str, fn: ast.FunctionDef, module: str, *, paper: str | None = None,
          parameter_aliases: dict[str, str] | None = None, method_aliases=(), whole_rank: bool = False) -> MethodSpec:
    """What `registry.describe` makes of the function `fn`, with `fn` None."""
    arguments = fn.args
    parameters = {
        arg.arg: inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY,
                                   default=inspect.Parameter.empty if default is None else _value(default, module),
                                   annotation=Any if arg.annotation is None else _annotation(arg.annotation))
        for arg, default in zip(arguments.kwonlyargs, arguments.kw_defaults)
        if arg.arg not in RESERVED
    }
    every = [arg.arg for arg in (*arguments.posonlyargs, *arguments.args, arguments.vararg, *arguments.kwonlyargs,
                                 arguments.kwarg) if arg is not None]
    doc = ast.get_docstring(fn) or ""
    return MethodSpec(name, None, doc.split("\n", 1)[0], paper, parameters, dict(parameter_aliases or {}),
                      tuple(method_aliases), needs_calibration="calibration" in every, whole_rank=whole_rank,
                      docs=parameter_docs(doc))


def _method_modules() -> list[str]:
    """The families that `methods.load_builtin` imports (`from . import a, b, ...`), in order."""
    load = next(node for node in _tree("methods.__init__").body
                if isinstance(node, ast.FunctionDef) and node.name == "load_builtin")
    return [alias.name for node in load.body
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None for alias in node.names]


@functools.cache
def _tree(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8"))


@functools.cache
def _bindings(module: str) -> dict[str, ast.expr | tuple[str, str]]:
    """The module's top-level names: an assigned value's expression, or (module, name) for `from .x import name`."""
    package = module.rpartition(".")[0]
    names: dict[str, ast.expr | tuple[str, str]] = {}
    for node in _tree(module).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = node.value
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            source = f"{package}.{node.module}" if package else node.module
            names.update({alias.asname or alias.name: (source, alias.name) for alias in node.names})
    return names


def _value(node: ast.expr, module: str) -> Any:
    """The value of a literal expression, whose names are the module's constants (e.g. paper=TIES)."""
    if isinstance(node, ast.Name):
        binding = _bindings(module).get(node.id)
        if isinstance(binding, tuple):
            return _value(ast.Name(binding[1]), binding[0])
        if binding is None:
            raise ValueError(f"lora_lego.{module}: {node.id} is not a constant of the module")
        return _value(binding, module)
    if isinstance(node, (ast.Tuple, ast.List)):
        return (tuple if isinstance(node, ast.Tuple) else list)(_value(item, module) for item in node.elts)
    if isinstance(node, ast.Dict):
        return {_value(key, module): _value(value, module) for key, value in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _annotation(node: ast.expr) -> Any:
    """A parameter's annotation as `typing.get_type_hints` evaluates it: int, float | None, Literal["a", "b"], ..."""
    if isinstance(node, ast.Constant) and node.value is None:
        return None
    if isinstance(node, ast.Name) and node.id in _TYPES:
        return _TYPES[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return _annotation(node.left) | _annotation(node.right)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "Literal":
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return Literal[tuple(ast.literal_eval(item) for item in items)]
    raise ValueError(f"a method parameter's annotation {ast.unparse(node)!r} is not one this reader knows")
