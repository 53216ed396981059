"""The CLI's signals, stdlib only so that they are set before the heavy imports: Ctrl-C during start-up
quits with `error: interrupted` (exit 130); while a command runs, SIGINT and SIGTERM unwind (temporaries
are removed), SIGXFSZ is ignored so a file-size limit is an EFBIG error, and a closed stdout is quiet."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
import threading
from typing import Iterator

INTERRUPTED, TERMINATED, BROKEN_PIPE = 130, 143, 141  # 128 + the signal number, as shells report them


class Terminated(BaseException):
    """SIGTERM while a command runs: unwinds like Ctrl-C, so atomic writers remove their temporaries."""


def is_cli() -> bool:
    """Whether this process is the `lora-lego` command (console script or `python -m lora_lego`)."""
    argv = getattr(sys, "orig_argv", sys.argv)
    if os.path.basename(sys.argv[0] or "") in ("lora-lego", "lora_lego"):
        return True
    return any(a == "-m" and b in ("lora_lego", "lora_lego.cli") for a, b in itertools.pairwise(argv))


def _quit_interrupted(signum, frame) -> None:  # during start-up: nothing to clean up yet
    try:
        sys.stderr.write("error: interrupted\n")
        sys.stderr.flush()
    finally:
        os._exit(INTERRUPTED)


def startup_guard() -> None:
    """Called first thing by `lora_lego/__init__`: in the CLI process only, Ctrl-C during the imports quits
    with one line. A library import elsewhere keeps its host's handlers."""
    if is_cli() and threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _quit_interrupted)


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def command_signals() -> Iterator[None]:
    """While a command runs: SIGINT raises KeyboardInterrupt, SIGTERM raises Terminated, SIGXFSZ is ignored
    (writes past `ulimit -f` then fail with EFBIG instead of killing the process). Restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _terminate}
    if hasattr(signal, "SIGXFSZ"):
        wanted[signal.SIGXFSZ] = signal.SIG_IGN
    previous = {number: signal.signal(number, handler) for number, handler in wanted.items()}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def silence_stdout() -> None:
    """After a closed pipe on stdout: point it at /dev/null so the interpreter's last flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout replaced (tests) or already closed
        pass
