"""Safe output: atomic folder writes (temporary folder, then rename), stale-temporary clean-up,
output-path checks against the inputs, and dtype names."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .errors import OutputError
from .noreplace import rename_no_replace
from .oserrors import output_error, reason
from .types import Adapter

# the output dtypes a user may name (--dtype, dtype=); tensorfile.DTYPES is the safetensors header codes
OUTPUT_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}


def dtype_from_name(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from "bf16" | "fp16" | "fp32" (or their long names, or a torch.dtype)."""
    if isinstance(dtype, torch.dtype) and dtype in OUTPUT_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in OUTPUT_DTYPES:
        return OUTPUT_DTYPES[dtype.lower()]
    raise OutputError(f"unsupported output dtype {dtype!r} (use bf16, fp16 or fp32)")


def output_dtype(adapter: Adapter, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype to write: `dtype` if given, else the adapter's (its inputs'), float32 for others (e.g. float64)."""
    if dtype is None:
        dtype = adapter.metadata.get("dtype", "float32")
        if dtype not in OUTPUT_DTYPES and dtype not in OUTPUT_DTYPES.values():
            dtype = "float32"
    return dtype_from_name(dtype)


def cast_finite(tensor: torch.Tensor, dtype: torch.dtype, what: str, *, inherited_ok: bool = False) -> torch.Tensor:
    """`tensor` cast to `dtype`, checked before it is written: OutputError naming `what` when an entry is NaN
    or Inf after the cast (e.g. above 65504 in float16). `inherited_ok`: a tensor lora-lego did not change
    may keep the NaN / Inf it already had (only what the cast or the work produced is refused)."""
    out = tensor.to(dtype)
    if not out.is_floating_point() or bool(torch.isfinite(out).all()):
        return out
    source_finite = bool(torch.isfinite(tensor).all())
    if inherited_ok and not source_finite:
        return out
    name = str(dtype).removeprefix("torch.")
    why = (f"largest |value| {tensor.detach().abs().max().item():.3g} does not fit {name}; write a wider dtype "
           "(fp32 or bf16) or smaller values" if source_finite else "the values themselves are not finite")
    raise OutputError(f"{what} would hold NaN or Inf in {name} ({why}); nothing was written")


def check_output_path(output: str | Path, inputs: Sequence[str | Path], *, overwrite: bool) -> None:
    """Refuse an output that exists (unless overwrite), equals or lies inside an input, or contains one."""
    out = Path(output).resolve()
    for source in inputs:
        src = Path(source).resolve()
        if out == src or src in out.parents:
            raise OutputError(f"output {str(output)!r} lies inside input adapter {str(source)!r}")
        if out in src.parents:
            raise OutputError(f"output {str(output)!r} contains input adapter {str(source)!r}")
    check_output_name(output, f"output {str(output)!r}")
    if out.exists() and not overwrite:
        raise OutputError(f"output {str(output)!r} already exists (pass --overwrite / overwrite=True to replace it)")
    check_writable(out.parent, f"output {str(output)!r}")


def check_output_name(path: str | Path, what: str) -> None:
    """Refuse `.`, `..` (or a path ending in them) and an existing path that is not a regular file, a
    folder or a link: a fifo, a socket or a device is never replaced, not even with overwrite."""
    if Path(path).name in ("", ".", "..") or str(path).rstrip("/").endswith(("/.", "/..")):
        raise OutputError(f"{what} names a current or parent folder ('.' or '..'); expected a new name")
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # absent (or unreadable: the write will say why)
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        kind = "a fifo" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or special file"
        raise OutputError(f"{what} is {kind}; expected a regular file or folder (or a new name)")


def check_report_path(report: str | Path, inputs: Sequence[str | Path], output: str | Path, *,
                      overwrite: bool = False) -> None:
    """Refuse a report file inside an input adapter, at the output folder or an existing folder, a link,
    an existing file (unless overwrite), or not writable: the same rules as the output."""
    check_output_name(report, f"report {str(report)!r}")
    if Path(report).is_symlink():
        raise OutputError(f"report {str(report)!r} is a symbolic link; refusing to write through it")
    path = Path(report).resolve()
    for source in inputs:
        if Path(source).resolve() in (path, *path.parents):
            raise OutputError(f"report {str(report)!r} lies inside input adapter {str(source)!r}")
    if path == Path(output).resolve():
        raise OutputError(f"report {str(report)!r} is the output folder; expected a .json file path beside it")
    if path.is_dir():
        raise OutputError(f"report {str(report)!r} is a folder; expected a .json file path")
    if path.exists() and not overwrite:
        raise OutputError(f"report {str(report)!r} already exists (pass --overwrite to replace it)")
    check_writable(path.parent, f"report {str(report)!r}")


def check_writable(folder: Path, what: str) -> None:
    """Refuse to write under `folder` when its nearest existing ancestor is not a writable folder."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot write {what}: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {what}: {str(existing)!r} is not writable")


def source_folders(adapter: Adapter) -> list[str]:
    """The folders `adapter` was read from: its own (load_adapter) or its inputs' (merge), resolved."""
    meta = adapter.metadata
    return [meta["folder"]] if "folder" in meta else list(meta.get("input_folders", []))


@contextlib.contextmanager
def atomic_output(path: str | Path, *, overwrite: bool = False, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or, with `folder`, a temporary folder) beside `path`; on success it replaces
    `path`, on failure it is removed. The one atomic writer of every output (adapters, files, checkpoints).

    A run killed mid-write leaves only ".<name>.tmp-<pid>-*", which the next write to `path` deletes.
    """
    final, what = Path(path), f"output {str(path)!r}"
    check_output_name(path, what)
    if final.exists() and not overwrite:
        raise OutputError(f"{what} already exists (pass --overwrite / overwrite=True to replace it)")
    try:
        temporary = _temporary(final, folder)
    except OSError as error:
        raise OutputError(f"cannot write {what}: {reason(error)}") from None
    try:
        yield temporary
        commit(temporary, final, overwrite=overwrite, what=what)
    except BaseException as error:
        _discard(temporary)
        translated = output_error(what, error)  # full disk, ulimit -f, ...: one typed error
        if translated is not None:
            raise translated from None
        raise


def atomic_folder(path: str | Path, *, overwrite: bool = False) -> contextlib.AbstractContextManager[Path]:
    """`atomic_output` of a folder: yields the temporary folder to fill."""
    return atomic_output(path, overwrite=overwrite, folder=True)


def _temporary(final: Path, folder: bool) -> Path:
    """A new empty temporary file or folder beside `final`, readable as the umask allows (mkstemp / mkdtemp
    would make it private to this user), after removing the stale ones of dead runs. Raises OSError."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, final.name)
    prefix = f".{final.name}.tmp-{os.getpid()}-"
    if folder:
        name = tempfile.mkdtemp(prefix=prefix, dir=final.parent)
        os.chmod(name, 0o777 & ~current_umask())
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=final.parent)
        os.close(handle)
        os.chmod(name, 0o666 & ~current_umask())
    return Path(name)


def _discard(temporary: Path) -> None:
    if temporary.is_dir() and not temporary.is_symlink():
        shutil.rmtree(temporary, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            temporary.unlink()


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def commit(temporary: Path, final: Path, *, overwrite: bool, what: str) -> None:
    """Put a finished temporary (file or folder) in place: replacing `final` only with overwrite, else
    atomically refusing whatever appeared there since the checks (a concurrent run)."""
    if overwrite:
        _replace(temporary, final)
        return
    try:
        rename_no_replace(temporary, final)
    except FileExistsError:
        raise OutputError(f"{what} already exists (written meanwhile by another run? pass --overwrite / "
                          "overwrite=True to replace it)") from None


def _replace(temporary: Path, final: Path) -> None:
    """Rename `temporary` to `final`; an existing `final` is moved aside first and deleted after."""
    if not (final.exists() or final.is_symlink()):
        os.replace(temporary, final)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-{os.getpid()}-", dir=final.parent))
    aside = old / "previous"
    os.replace(final, aside)
    try:
        os.replace(temporary, final)
    except OSError:
        os.replace(aside, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def remove_stale(parent: Path, name: str) -> None:
    """Delete temporary folders and files of `name` left by processes that no longer run."""
    for candidate in parent.glob(f".{glob.escape(name)}.*-*-*"):
        kind, _, rest = candidate.name[len(name) + 2:].partition("-")
        pid = rest.partition("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    candidate.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json_atomic(path: str | Path, data: object, *, overwrite: bool = True) -> None:
    """Write JSON to `path` through a temporary file and a rename (without overwrite: one that never
    replaces a file, even one created meanwhile). Never writes through a symbolic link."""
    final, temporary = Path(path), None
    if final.is_symlink():
        raise OutputError(f"cannot write {str(path)!r}: a symbolic link; refusing to write through it")
    try:
        temporary = _temporary(final, folder=False)
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2, sort_keys=True)
            stream.write("\n")
        commit(temporary, final, overwrite=overwrite, what=repr(str(path)))
    except BaseException as error:
        if temporary is not None:
            _discard(temporary)
        translated = output_error(repr(str(path)), error)
        if translated is not None:
            raise translated from None
        raise
