"""Progress for long work: a tqdm bar when stderr is a terminal, else a plain line every few seconds (for logs),
and nothing at all when the caller asks for none (the CLI's -q; the library's default)."""

from __future__ import annotations

import math
import sys
import time
from typing import Iterable, Iterator

INTERVAL = 5.0  # seconds between two plain lines (a line only after this long: quick work stays silent)


def progress(total: int | None, desc: str, unit: str, *, enabled: bool = True, iterable: Iterable | None = None):
    """A progress object with tqdm's `update(n)`, `close()`, context manager and iteration (over `iterable`).

    A tqdm bar (removed when done) when `enabled` and stderr is a terminal; `LineProgress` when `enabled` and
    stderr is not one; a silent stand-in otherwise."""
    if enabled and _is_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)
    return LineProgress(total, desc, unit, iterable=iterable, enabled=enabled)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class LineProgress:
    """Writes `desc: n/total units (p%), t s, about s left` to stderr at most every INTERVAL seconds, and a
    last line when it closes, if it wrote any (so work shorter than INTERVAL writes nothing)."""

    def __init__(self, total: int | None, desc: str, unit: str, *, iterable: Iterable | None = None,
                 enabled: bool = True):
        self.total, self.desc, self.unit, self.iterable, self.enabled = total, desc, unit, iterable, enabled
        self.n = 0
        self.started = self.last = time.monotonic()
        self.wrote = False
        self.closed = False

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable if self.iterable is not None else ():
                yield item
                self.update(1)
        finally:
            self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last >= INTERVAL:
            self.last = now
            self._write(now)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.enabled and self.wrote:
            self._write(time.monotonic(), done=True)

    def _write(self, now: float, done: bool = False) -> None:
        elapsed = now - self.started
        units = f"{self.unit}s" if self.unit and not self.unit.endswith("s") else self.unit
        if self.total:
            count = f"{self.n}/{self.total} {units} ({100 * self.n / self.total:.0f}%)"
        else:
            count = f"{self.n} {units}"
        line = f"{self.desc}: {count}, {_seconds(elapsed)}"
        if done:
            line += ", done"
        elif self.total and 0 < self.n < self.total:
            line += f", about {_seconds(elapsed * (self.total - self.n) / self.n)} left"
        try:
            print(line, file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr closed under us: progress is never worth a failure
            self.enabled = False
            return
        self.wrote = True


def _seconds(value: float) -> str:
    if not math.isfinite(value):
        return "?"
    if value < 60:
        return f"{value:.0f} s"
    minutes, seconds = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
