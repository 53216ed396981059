"""OS-level failures as typed errors, in one place: a full disk, a file-size limit, a closed pipe, a
permission, a read-only file system or an interrupted call while writing (ENOSPC, EFBIG, EPIPE, EACCES,
EROFS, EINTR, ...) becomes a one-line OutputError in the system's words."""

from __future__ import annotations

import errno
import os
import re

from .errors import OutputError

# errno -> a hint after the system's own words (os.strerror)
HINTS = {errno.EFBIG: "the file system's or the process's file-size limit, ulimit -f",
         errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere"}
# safetensors' Rust writer: "Error while serializing: I/O error: File too large (os error 27)"
_RUST_CODE = re.compile(r"\(os error (\d+)\)|\bcode: (\d+)")


def os_errno(error: BaseException) -> int | None:
    """The errno behind `error`: an OSError's, or the one in a safetensors writer error; None for others."""
    if isinstance(error, OSError):
        return error.errno
    if type(error).__name__ == "SafetensorError":
        match = _RUST_CODE.search(str(error))
        return int(match[1] or match[2]) if match else None
    return None


def reason(error: BaseException) -> str:
    """One line saying why an OS call failed (no file name: the caller names what it was writing)."""
    code = os_errno(error)
    if code is None:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    hint = HINTS.get(code)
    return os.strerror(code) + (f" ({hint})" if hint else "")


def output_error(what: str, error: BaseException) -> OutputError | None:
    """`OutputError("cannot write <what>: <reason>")` for an OS-level failure, None for any other error."""
    if os_errno(error) is None and not isinstance(error, OSError):  # an OSError without errno still is one
        return None
    return OutputError(f"cannot write {what}: {reason(error)}")
