"""The working directory: confined to the configured roots, and snapshotted so a run can say
which files it changed."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from shipyard.errors import ShipyardError

SKIP_DIRS = frozenset({".git", "node_modules", ".venv", "venv", "__pycache__", ".mypy_cache"})
MAX_SNAPSHOT_FILES = 20_000
MAX_HASH_BYTES = 4 * 1024 * 1024  # larger files are compared by size and mtime only


class WorkdirRefused(ShipyardError):
    """The working directory is not under a configured root: add its parent to
    `handler.workdir_roots` in shipyard.toml, or dispatch into an allowed directory."""


def confine(workdir: str, roots: list[Path]) -> Path:
    """The real path of ``workdir`` if it lies under one of ``roots`` (symlinks resolved)."""
    if not workdir or not os.path.isabs(workdir):
        raise WorkdirRefused(f"working directory {workdir!r} must be an absolute path")
    if any(part == ".." for part in Path(workdir).parts):
        raise WorkdirRefused(f"working directory {workdir!r} must not contain '..'")
    if any(unicodedata.category(ch) == "Cc" for ch in workdir):
        # A NUL would make the path functions raise ValueError instead of refusing.
        raise WorkdirRefused(f"working directory {workdir!r} must not contain control characters")
    real = Path(os.path.realpath(workdir))
    for root in roots:
        root_real = Path(os.path.realpath(root))
        if real == root_real or root_real in real.parents:
            if real == root_real:
                raise WorkdirRefused(
                    f"working directory {workdir} is a root itself; use a folder inside it"
                )
            return real
    allowed = ", ".join(str(r) for r in roots) or "(none configured)"
    raise WorkdirRefused(
        f"working directory {workdir} (really {real}) is outside the allowed roots: {allowed}. "
        "Add its parent to handler.workdir_roots in shipyard.toml, or use another directory."
    )


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    digest: str


def snapshot(root: Path) -> dict[str, FileState]:
    """Every file under ``root`` (skipping VCS and dependency folders), by relative path."""
    files: dict[str, FileState] = {}
    if not root.is_dir():
        return files
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            digest = ""
            if st.st_size <= MAX_HASH_BYTES and path.is_file():
                try:
                    digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
                except OSError:
                    digest = ""
            files[str(path.relative_to(root))] = FileState(st.st_size, st.st_mtime_ns, digest)
            if len(files) >= MAX_SNAPSHOT_FILES:
                return files
    return files


def changes(before: dict[str, FileState], after: dict[str, FileState]) -> list[str]:
    """Files added (``+``), removed (``-``) or modified (``~``), sorted by path."""
    out = []
    for path in sorted(set(before) | set(after)):
        old, new = before.get(path), after.get(path)
        if old is None:
            out.append(f"+ {path}")
        elif new is None:
            out.append(f"- {path}")
        elif (old.digest and new.digest and old.digest != new.digest) or (
            not (old.digest and new.digest) and (old.size, old.mtime_ns) != (new.size, new.mtime_ns)
        ):
            out.append(f"~ {path}")
    return out


def read_head(path: Path, limit: int = 8000) -> str:
    """The start of a text file, or '' if it is missing or unreadable."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return ""
    text = data[:limit].decode("utf-8", "replace")
    return text + ("\n…(truncated)" if len(data) > limit else "")
