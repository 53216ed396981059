"""Renaming a finished temporary into place without replacing anything that appeared meanwhile:
`renameat2(RENAME_NOREPLACE)` on Linux, else a hard link (files) or an exclusive `mkdir` (folders)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def _load_renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # not Linux, or a libc before glibc 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def rename_no_replace(source: Path, target: Path) -> None:
    """Rename `source` (a file or a folder) to `target` atomically; FileExistsError if `target` exists
    (a file, a folder, even an empty one, or a dangling link), whoever created it and when."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # else: a file system without the flag
            raise OSError(code, os.strerror(code), str(target))
    if source.is_dir() and not source.is_symlink():
        os.mkdir(target)  # FileExistsError if anything is there: the name is ours from now on
        try:
            os.rename(source, target)  # onto our own empty folder
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(target)
            raise
    else:
        os.link(source, target)  # FileExistsError if anything is there
        os.unlink(source)
