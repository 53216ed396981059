"""PEFT's rank_pattern / alpha_pattern rule (`re.match(rf"(.*\\.)?({key})$", module)`) in bounded time.

Keys come from downloaded files: a key with repeats or alternatives runs on a small linear-time matcher
(a Pike VM over Python's own parse of the pattern) instead of backtracking `re`, which takes exponential
time on shapes such as `(a+)+$`. A key with neither runs on `re`, which is linear for it."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, NamedTuple

try:  # Python's own regex parser and compiler: 3.11+
    from re import _compiler as sre_compile  # type: ignore[attr-defined]
    from re import _constants as sre  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # Python 3.10
    import sre_compile  # type: ignore[no-redef]
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

MAX_PATTERN_CHARS = 1000  # a key longer than this is refused
MAX_PROGRAM = 1000  # instructions of one compiled key (counted repeats expanded)
MAX_NAME_CHARS = 1000  # a module name matched on the VM; steps <= 2 * (name length + 1) * program length

_ATOMS = (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN)
_UNSUPPORTED = {getattr(sre, op): what for op, what in (  # atomic and possessive: Python 3.11+
    ("GROUPREF", "a backreference"), ("GROUPREF_EXISTS", "a conditional group"), ("ASSERT", "a lookaround"),
    ("ASSERT_NOT", "a lookaround"), ("ATOMIC_GROUP", "an atomic group"), ("POSSESSIVE_REPEAT", "a possessive repeat"))
    if hasattr(sre, op)}


class PatternError(ValueError):
    """A key that cannot be matched in bounded time; the message says why (the caller names the file)."""


class CompiledKey(NamedTuple):
    """One key, ready to match: on `re` (a key without repeats or alternatives), else on the VM `code`."""

    regex: re.Pattern | None
    code: tuple


@lru_cache(maxsize=4096)
def compile_key(key: str) -> CompiledKey:
    """PEFT's rule for `key`, compiled; raises PatternError for a key it refuses."""
    if len(key) > MAX_PATTERN_CHARS:
        raise PatternError(f"is {len(key)} characters long; expected at most {MAX_PATTERN_CHARS}")
    full = rf"(.*\.)?({key})$"
    try:
        regex = re.compile(full)
        parsed = sre_parse.parse(full)
    except (re.error, RecursionError, OverflowError) as error:
        raise PatternError(f"is not a regular expression ({error})") from None
    program = _Program(parsed.state)
    program.emit(parsed, ())  # also refuses unsupported constructs, whichever path then runs
    if not _has_repeats(list(parsed)[1:]):  # the key's own part: all but the `(.*\.)?` prefix
        return CompiledKey(regex, ())
    program.code.append(("match",))
    return CompiledKey(None, tuple(program.code))


def _has_repeats(tree) -> bool:
    for op, av in tree:
        if op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.BRANCH):
            return True
        if op is sre.SUBPATTERN and _has_repeats(av[3]):
            return True
    return False


class _Program:
    """Compiles a parsed pattern to instructions: ("char", test), ("at", test), ("split", x, y), ("jmp", x)."""

    def __init__(self, state):
        self.state = state
        self.code: list[tuple] = []

    def emit(self, tree, scopes: tuple) -> None:
        for op, av in tree:
            self.emit_one(op, av, scopes)
            if len(self.code) > MAX_PROGRAM:
                raise PatternError(f"expands to more than {MAX_PROGRAM} matching steps per character")

    def emit_one(self, op, av, scopes: tuple) -> None:
        code = self.code
        if op in _ATOMS or op is sre.AT:
            code.append(("char" if op in _ATOMS else "at", self.test(op, av, scopes)))
        elif op is sre.SUBPATTERN:
            _, add_flags, del_flags, tree = av
            self.emit(tree, scopes + ((add_flags, del_flags),) if add_flags or del_flags else scopes)
        elif op is sre.BRANCH:
            jumps = []
            for alternative in av[1][:-1]:
                split = len(code)
                code.append(None)
                self.emit(alternative, scopes)
                jumps.append(len(code))
                code.append(None)
                code[split] = ("split", split + 1, len(code))
            self.emit(av[1][-1], scopes)
            for jump in jumps:
                code[jump] = ("jmp", len(code))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # greedy or lazy: the same set of matches
            low, high, tree = av
            for _ in range(low):
                self.emit(tree, scopes)
            if high == sre.MAXREPEAT:
                loop = len(code)
                code.append(None)
                self.emit(tree, scopes)
                code.append(("jmp", loop))
                code[loop] = ("split", loop + 1, len(code))
            else:
                splits = []
                for _ in range(high - low):
                    splits.append(len(code))
                    code.append(None)
                    self.emit(tree, scopes)
                for split in splits:
                    code[split] = ("split", split + 1, len(code))
        else:
            raise PatternError(f"uses {_UNSUPPORTED.get(op, str(op).lower())}, which lora-lego does not match")

    def test(self, op, av, scopes: tuple) -> Callable[[str, int], bool]:
        """One character (or one anchor) at a position, by Python's own engine: its exact semantics."""
        tree = sre_parse.SubPattern(self.state, [(op, av)])
        for add_flags, del_flags in reversed(scopes):  # scoped flags such as (?i:...)
            tree = sre_parse.SubPattern(self.state, [(sre.SUBPATTERN, (None, add_flags, del_flags, tree))])
        match = sre_compile.compile(tree).match
        return lambda text, pos: match(text, pos) is not None


def run(code: tuple, text: str) -> tuple[bool, int]:
    """Whether `code` matches at the start of `text`, and the steps taken: at most 2 * (len + 1) * len(code)."""
    if len(text) > MAX_NAME_CHARS:
        raise PatternError(f"cannot be matched against a module name of {len(text)} characters "
                           f"(at most {MAX_NAME_CHARS})")
    steps = 0
    threads = [0]
    for pos in range(len(text) + 1):
        ready, seen, stack = [], set(), threads[::-1]
        while stack:  # follow jumps, splits and anchors: each instruction at most once per position
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            steps += 1
            kind = code[pc][0]
            if kind == "match":
                return True, steps
            if kind == "jmp":
                stack.append(code[pc][1])
            elif kind == "split":
                stack += [code[pc][2], code[pc][1]]
            elif kind == "at":
                if code[pc][1](text, pos):
                    stack.append(pc + 1)
            else:
                ready.append(pc)
        if pos == len(text):
            break
        threads = [pc + 1 for pc in ready if code[pc][1](text, pos)]
        steps += len(ready)
        if not threads:
            break
    return False, steps


def matches(key: str, module: str) -> bool:
    """PEFT's rule: module is `key` or ends with "." + a match of `key`. Raises PatternError."""
    compiled = compile_key(key)
    if compiled.regex is not None:
        return compiled.regex.match(module) is not None
    return run(compiled.code, module)[0]
