"""The one registry of merge methods. A method is a per-module pure function registered by name;
its keyword-only parameters (with defaults and simple annotations) are its public parameters, and the
`Parameters:` section of its docstring says what each one means."""

from __future__ import annotations

import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from ..errors import MethodError

if TYPE_CHECKING:  # the registry itself needs no torch: `lora-lego --help` reads its defaults
    from ..types import LoraFactors

# A method: fn(factors, weights, *, generator, [calibration,] **params) -> LoraFactors | (LoraFactors, info dict)
# A method that declares `calibration` needs calibration data: merge hands it one (d_in, d_in) Gram per adapter.
MethodFn = Callable[..., "LoraFactors | tuple[LoraFactors, dict]"]
RESERVED = ("generator", "calibration")
# What `merge` and `lora-lego merge` run without a method or prompts: the data-free method with the best worst
# case over two benchmarks (docs/results.md, table (i'') and the independent six-task benchmark of issue 28):
# ties 0.612 / 0.582, against tsv 0.720 / 0.514. With prompts, `--method auto` chooses per merge.
DEFAULT_METHOD = "ties"
# What `prune` and `lora-lego prune` run without a method: the truncated SVD of the adapter's delta (PEFT's "svd",
# registered as task_arithmetic), the best pruning measured (docs/results.md table (c): 0.752 mean accuracy at
# r = 2 of 6, against 0.717 for `lego`); `lego` stays one flag away.
PRUNE_METHOD = "svd"
_METHODS: dict[str, "MethodSpec"] = {}
_METHOD_ALIASES: dict[str, str] = {}  # another name users know -> registered name (e.g. PEFT's "svd")


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, one-line idea, paper link, parameters (with `docs`: what each means),
    other names of its parameters (`parameter_aliases`) and of itself (`method_aliases`)."""

    name: str
    fn: MethodFn
    summary: str
    paper: str | None
    parameters: dict[str, inspect.Parameter]
    parameter_aliases: dict[str, str]  # another name -> the parameter (lego: rank -> n_clusters)
    method_aliases: tuple[str, ...] = ()
    needs_calibration: bool = False
    whole_rank: bool = False  # without `rank`, the output keeps the merge's whole rank (<= sum of ranks)
    docs: dict[str, str] = field(default_factory=dict)  # parameter -> meaning, from the docstring

    def resolve(self, params: dict[str, Any]) -> dict[str, Any]:
        """Validate and coerce user parameters (values may be strings from the CLI); apply parameter aliases."""
        resolved: dict[str, Any] = {}
        for given, value in params.items():
            name = self.parameter_aliases.get(given, given)
            if name not in self.parameters:
                known = ", ".join(sorted(self.parameters)) or "none"
                raise MethodError(f"method {self.name!r} has no parameter {given!r} (its parameters: {known})")
            if name in resolved:
                raise MethodError(f"method {self.name!r}: parameter {name!r} given twice (as {given!r} and its alias)")
            resolved[name] = _coerce(self.name, name, value, self.parameters[name].annotation)
        return resolved

    def __call__(self, factors: Sequence[LoraFactors], weights: Sequence[float], *, generator, calibration=None,
                 **params):
        """Run on one module (`calibration`: the adapters' Grams, for a method that needs them); always
        returns (LoraFactors, info dict)."""
        if self.needs_calibration:
            params["calibration"] = calibration  # a sequence of Grams (merge's reads each one on access)
        result = self.fn(list(factors), list(weights), generator=generator, **params)
        return result if isinstance(result, tuple) else (result, {})


def register(name: str, *, paper: str | None = None, parameter_aliases: dict[str, str] | None = None,
             method_aliases: Sequence[str] = (), whole_rank: bool = False):
    """Decorator registering a per-module merge function under `name` (refuses duplicates).

    `parameter_aliases` maps extra parameter names to the function's (e.g. rank -> n_clusters); `method_aliases`
    are other names of the method itself (e.g. PEFT's "svd" for task_arithmetic); `whole_rank`: without
    a rank the method returns the merge's whole rank (else its default is the largest input rank).
    """

    def decorator(fn: MethodFn) -> MethodFn:
        taken = [n for n in (name, *method_aliases) if n in _METHODS or n in _METHOD_ALIASES]
        if taken:
            raise KeyError(f"merge method {taken[0]!r} is already registered")
        _METHODS[name] = describe(name, fn, paper=paper, parameter_aliases=parameter_aliases,
                                  method_aliases=method_aliases, whole_rank=whole_rank)
        _METHOD_ALIASES.update({alias: name for alias in method_aliases})
        return fn

    return decorator


def describe(name: str, fn: Callable, *, paper: str | None = None, parameter_aliases: dict[str, str] | None = None,
             method_aliases: Sequence[str] = (), whole_rank: bool = False) -> MethodSpec:
    """The spec of `fn` (its keyword-only parameters, the first line of its docstring), not registered: what
    `register` records, and what a method that runs a model (e.g. `regmean_pp`) uses to check its parameters."""
    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    parameters = {
        p.name: p.replace(annotation=hints.get(p.name, Any))
        for p in signature.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in RESERVED
    }
    doc = inspect.getdoc(fn) or ""
    return MethodSpec(name, fn, doc.split("\n", 1)[0], paper, parameters, dict(parameter_aliases or {}),
                      tuple(method_aliases),
                      needs_calibration="calibration" in signature.parameters, whole_rank=whole_rank,
                      docs=parameter_docs(doc))


def parameter_docs(doc: str) -> dict[str, str]:
    """{name: meaning} from the `Parameters:` section of a (dedented) docstring: one "    name: meaning" line per
    parameter, a longer meaning continued on more indented lines; the section ends at a blank or unindented line."""
    lines = doc.splitlines()
    if "Parameters:" not in lines:
        return {}
    docs: dict[str, str] = {}
    name = None
    for line in lines[lines.index("Parameters:") + 1:]:
        if not line.startswith("    "):
            break
        head, sep, rest = line.strip().partition(": ")
        if not line.startswith("     ") and sep and head.isidentifier():
            name, docs[head] = head, rest.strip()
        elif name is not None:
            docs[name] += " " + line.strip()
    return docs


def allowed_values(annotation: Any) -> str:
    """What a parameter of this annotation accepts, in words: "inf | l2 | off", "true | false", "integer or none"."""
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return " | ".join(shown_value(option) for option in options)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        words = " or ".join(allowed_values(option) for option in options if option is not type(None))
        return words + (" or none" if type(None) in options else "")
    return {bool: "true | false", int: "integer", float: "number", str: "text"}.get(annotation, "any")


def shown_value(value: Any) -> str:
    """A value as the CLI takes it (-p key=value): none, true, false, 0.5, inf."""
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def lookup(name: str) -> MethodSpec:
    """The spec of a registered method (by its name or a method alias); `MethodError` listing the registered ones
    otherwise. Only what has been registered so far: `lora_lego.methods.get_method` loads the built-in ones first."""
    name = _METHOD_ALIASES.get(name, name)
    if name not in _METHODS:
        raise MethodError(f"unknown merge method {name!r} (available: {', '.join(registered())})")
    return _METHODS[name]


def registered() -> list[str]:
    """Names of the methods registered so far, sorted."""
    return sorted(_METHODS)


MAX_INT = 2**31 - 1  # the largest integer parameter accepted (ranks, n_init, max_iter, ...)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}... ({len(text)} characters)"


def _coerce(method: str, name: str, value: Any, annotation: Any) -> Any:
    """Convert `value` to the parameter's annotated type, or raise a MethodError saying what was expected."""
    where = f"method {method!r} parameter {name!r}"
    options = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return _literal(where, value, options)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            if type(None) in options:
                return None
        inner = [option for option in options if option is not type(None)]
        return _coerce(method, name, value, inner[0]) if len(inner) == 1 else value
    coerce = {bool: _bool, int: _int, float: _float, str: _str}.get(annotation)
    return coerce(where, value) if coerce is not None else value


def _literal(where: str, value: Any, options: tuple) -> Any:
    text = str(value).lower() if isinstance(value, (str, bool)) else value
    for option in options:
        if text == option or str(option).lower() == text:
            return option
    raise MethodError(f"{where} must be one of {', '.join(map(repr, options))}; got {value!r}")


def _bool(where: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.lower() in ("true", "1", "yes", "on")
    raise MethodError(f"{where} must be true or false; got {value!r}")


def _int(where: str, value: Any) -> int:
    try:
        number = float(value) if isinstance(value, str) else value
        integral = not isinstance(number, bool) and isinstance(number, (int, float)) and float(number).is_integer()
    except (ValueError, OverflowError):  # not a number; an int too large for a float
        number, integral = None, isinstance(value, int) and not isinstance(value, bool)
    if not integral:
        raise MethodError(f"{where} must be an integer; got {value!r}")
    if number is None or abs(number) > MAX_INT:  # torch and range() take 64-bit sizes; no method needs more
        raise MethodError(f"{where} must be an integer of magnitude at most {MAX_INT}; got {_short(value)}")
    return int(number)


def _float(where: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise MethodError(f"{where} must be a finite number; got {value!r}")
    return number


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise MethodError(f"{where} must be a string; got {value!r}")
    return value
