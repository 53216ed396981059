"""Hugging Face Hub ids wherever an adapter or a base model is named. A local path that exists always wins; a
string shaped like `owner/name` (or `owner/name/sub/folder`, `owner/name/file.safetensors`, each optionally
`@revision`) is fetched into huggingface_hub's cache (the optional extra [hub]), honouring HF_HUB_OFFLINE,
HF_HUB_CACHE and the revision (`--revision`, or `default_revision` around a command)."""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import AdapterFormatError, LoraLegoError

# what is fetched of a repo (or of its subfolder): an adapter's files first, single files only when it has no
# adapter_config.json, and of a base model what transformers and `apply` read (never pickles or other formats)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "README.md")
SINGLE_FILES = ("*.safetensors", "*.gguf")
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")
FILE_SUFFIXES = (".safetensors", ".gguf", ".bin", ".json")
EXTRA = "pip install \"lora-lego[hub]\" (or pip install huggingface_hub)"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REVISION: contextvars.ContextVar[str | None] = contextvars.ContextVar("lora_lego_revision", default=None)


@dataclass(frozen=True)
class HubId:
    """A Hub reference: the repo, a path inside it ("" for its root: a subfolder or a file), a revision or None."""

    repo_id: str
    path: str = ""
    revision: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.repo_id, self.path) if p) + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class Resolved:
    """Where a name points: the local path to read, the name to report, and (from the Hub) what was fetched."""

    path: Path
    name: str
    hub: dict[str, Any] | None = field(default=None)


def parse_hub_id(text: str) -> HubId | None:
    """The Hub reference `text` names, or None when it cannot be one (an absolute, ./, ../ or ~ path, a
    backslash, an empty part, or a name the Hub does not allow)."""
    text = str(text)
    body, at, revision = text.partition("@")
    if (at and not revision) or body.startswith(("/", ".", "~")) or "\\" in text or body.endswith("/"):
        return None
    parts = body.split("/")
    if len(parts) < 2 or not all(_NAME.fullmatch(p) and "--" not in p and ".." not in p for p in parts[:2]):
        return None
    if any(p in ("", ".", "..") for p in parts[2:]):
        return None
    return HubId("/".join(parts[:2]), "/".join(parts[2:]), revision or None)


@contextlib.contextmanager
def default_revision(revision: str | None) -> Iterator[None]:
    """Within the block, Hub ids without their own `@revision` use `revision` (the CLI's --revision)."""
    token = _REVISION.set(revision)
    try:
        yield
    finally:
        _REVISION.reset(token)


def resolve(name: str | Path, *, kind: str = "adapter", revision: str | None = None,
            error: type[LoraLegoError] = AdapterFormatError) -> Resolved:
    """The local path for `name`: itself when it exists or cannot be a Hub id (the reader then says what is
    missing), else the files fetched from the Hub into the cache.

    `kind`: "adapter" (a PEFT folder, or the single .safetensors / .gguf file a repo holds), "model" (a
    transformers folder) or "config" (its config.json only). Raises `error` in one line saying what was
    tried: the local path, then the Hub id and why it is not available (offline and not cached, not found,
    no such revision or file, huggingface_hub not installed).
    """
    if isinstance(name, Path) or Path(name).exists():
        return Resolved(Path(name), str(name))
    hub = parse_hub_id(name)
    if hub is None:
        return Resolved(Path(name), str(name))
    chosen = hub.revision or revision or _REVISION.get()
    label = str(HubId(hub.repo_id, hub.path, chosen))
    key = (label, kind, _cache_dir(), _offline())
    if key not in _RESOLVED:
        try:
            _RESOLVED[key] = _fetch(hub, chosen, kind)
        except _Unavailable as reason:
            what = {"adapter": "adapter", "model": "model", "config": "base config"}[kind]
            raise error(f"{what} {str(name)!r}: local path {str(name)!r} does not exist; Hub id {label}: "
                        f"{reason}") from None
    path, commit = _RESOLVED[key]
    return Resolved(path, label, {"repo_id": hub.repo_id, "path": hub.path, "revision": chosen or "main",
                                  "commit": commit})


_RESOLVED: dict[tuple, tuple[Path, str | None]] = {}  # one fetch per reference and cache in a process


class _Unavailable(Exception):
    """Why a Hub reference cannot be read (the end of the one-line error)."""


def _fetch(hub: HubId, revision: str | None, kind: str) -> tuple[Path, str | None]:
    try:
        import huggingface_hub as hf
    except ImportError:
        raise _Unavailable(f"reading from the Hub needs huggingface_hub: {EXTRA}") from None
    options = {"revision": revision, "cache_dir": _cache_dir(), "local_files_only": _offline()}
    try:
        if hub.path.endswith(FILE_SUFFIXES):
            file = Path(hf.hf_hub_download(hub.repo_id, hub.path, **options))
            return file, _commit_of(file)
        prefix = f"{hub.path}/" if hub.path else ""
        patterns = {"adapter": ADAPTER_FILES, "model": MODEL_FILES, "config": ("config.json",)}[kind]
        snapshot = Path(hf.snapshot_download(hub.repo_id, allow_patterns=[prefix + p for p in patterns], **options))
        folder = snapshot / hub.path
        if kind == "adapter" and not (folder / "adapter_config.json").is_file():
            snapshot = Path(hf.snapshot_download(hub.repo_id, allow_patterns=[prefix + p for p in SINGLE_FILES],
                                                 **options))
            return _single_file(snapshot / hub.path, hub), snapshot.name
    except Exception as error:  # huggingface_hub's errors (and httpx's) have no common base worth naming
        names = {cls.__name__ for cls in type(error).__mro__}
        if not names & {"HfHubHTTPError", "EntryNotFoundError", "OfflineModeIsEnabled", "HFValidationError",
                        "ConnectionError", "TimeoutError", "OSError", "ValueError"}:
            raise
        raise _Unavailable(_reason(error, names, hub, revision)) from None
    if kind != "adapter" and not (folder / "config.json").is_file():
        raise _Unavailable(f"no config.json in {'/'.join(p for p in (hub.repo_id, hub.path) if p)} (not a "
                           "transformers model)")
    return folder, snapshot.name


def _single_file(folder: Path, hub: HubId) -> Path:
    """The one adapter file of a repo without adapter_config.json (e.g. a kohya LoRA), or why there is none."""
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf")) if folder.is_dir() else []
    if len(files) == 1:
        return files[0]
    where = "/".join(p for p in (hub.repo_id, hub.path) if p)
    if not files:
        raise _Unavailable(f"{where} has no adapter_config.json and no .safetensors or .gguf file")
    shown = ", ".join(f"{where}/{p.name}" for p in files[:3]) + (" ..." if len(files) > 3 else "")
    raise _Unavailable(f"{where} holds {len(files)} adapter files and no adapter_config.json; name one: {shown}")


def _reason(error: Exception, names: set[str], hub: HubId, revision: str | None) -> str:
    if "GatedRepoError" in names:
        return "a gated repository: accept its terms on the Hub, then log in (hf auth login)"
    if "RepositoryNotFoundError" in names:
        return "no such repository on the Hub (or a private one: log in with hf auth login)"
    if "RevisionNotFoundError" in names:
        return f"no revision {revision!r} on the Hub"
    if "LocalEntryNotFoundError" in names:
        cached = _in_cache(hub, revision)
        if _offline():
            return f"{cached}, and HF_HUB_OFFLINE is set (nothing is downloaded)"
        return f"{cached}, and the Hub cannot be reached"
    if "EntryNotFoundError" in names:
        return f"no file {hub.path!r} in {hub.repo_id} at revision {revision or 'main'}"
    return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"


def _in_cache(hub: HubId, revision: str | None) -> str:
    """What the cache holds of the reference, in words (for a reference that cannot be downloaded)."""
    cache = Path(_cache_dir())
    repo = cache / ("models--" + hub.repo_id.replace("/", "--"))
    if not repo.is_dir():
        return f"not in the Hugging Face cache ({cache})"
    wanted = revision or "main"
    refs = sorted(str(p.relative_to(repo / "refs")) for p in (repo / "refs").rglob("*") if p.is_file()) \
        if (repo / "refs").is_dir() else []
    commit = wanted if _COMMIT.fullmatch(wanted) else None
    if commit is None and (repo / "refs" / wanted).is_file():
        commit = (repo / "refs" / wanted).read_text().strip()
    if commit is None or not (repo / "snapshots" / commit).is_dir():
        return f"revision {wanted!r} not in the cache (cached: {', '.join(refs) or 'no revision'})"
    return f"no {hub.path or 'adapter files'} in the cached snapshot {commit[:12]} of revision {wanted!r}"


def _commit_of(file: Path) -> str | None:
    """The commit of a file inside a cache snapshot (snapshots/<commit>/...)."""
    parts = file.parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def _cache_dir() -> str:
    """HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default, read now (not when it was imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "huggingface", "hub")


def _offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as huggingface_hub reads it, but read now."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE",
                                                                                      "TRANSFORMERS_OFFLINE"))
