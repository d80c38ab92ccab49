"""Durable JSON files of a run directory: a file is there whole or not at all, also after a crash or power loss.

    write_json_atomic(path, obj)   replace: temp file in the same folder, fsync, rename, fsync the folder
    write_json_once(path, obj)     publish once: the same, but a hard link that fails if `path` exists
    read_json(path)                None when missing, {} when unreadable (a lock file being written)

Readers on other hosts (a sweep's workers share the folder) never see a half-written file: the rename or
link makes it appear complete. Without the fsyncs a crash can leave the new name pointing at an empty file.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def fsync_dir(path: str | Path) -> None:
    """Make the names in `path` (a rename or link into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, obj: Any, indent: int | None, allow_nan: bool = True) -> Path:
    """`obj` as JSON in a fresh, fsynced temp file beside `path` (hidden, unique per process and call)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=indent, allow_nan=allow_nan))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 1, allow_nan: bool = True) -> None:
    """Write `obj` to `path`, replacing it atomically and durably. `allow_nan=False`: a NaN or inf in `obj`
    raises ValueError before anything is written (strict JSON for other tools)."""
    path = Path(path)
    tmp = _write_temp(path, obj, indent, allow_nan)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_once(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """Create `path` holding `obj`; `FileExistsError` if it exists (link(2) is atomic, also over NFS)."""
    path = Path(path)
    tmp = _write_temp(path, obj, indent)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def read_json(path: str | Path) -> Any:
    """The JSON in `path`; None when it does not exist, {} when it cannot be parsed (its writer is between
    create and write, or died there: only lock files, created empty by O_EXCL, have that window)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
