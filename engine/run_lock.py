"""One process per run directory: `<run>/run.lock` names the holder's host and pid.

    acquire_run_lock(run_dir)     # called by engine.metrics.make_run_dir on rank 0
    release_run_lock(run_dir)     # also done at interpreter exit

The lock file is created with O_CREAT | O_EXCL, so exactly one process wins. A second process on the
same run directory gets a `RunLockError` naming the holder. A lock left by a process that is gone
(same host, pid not running, or the pid now belongs to a process started later) is taken over with a
warning; the takeover renames the stale file first, so two processes racing for it cannot both win.
A lock held from another host cannot be checked from here: the error says to remove the file if
that process is gone. The same process may take its own lock again (the pipeline runs SFT and RL
trainers in one process).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

from engine.errors import CeilingError

log = logging.getLogger("ceiling")

LOCK_NAME = "run.lock"
_held: set[Path] = set()


class RunLockError(CeilingError):
    """The run directory is in use by another process."""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...); None off Linux or when the pid is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
    except OSError:
        return None


def pid_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux /proc): tells a reused pid apart."""
    stat = _proc_stat(pid)
    return stat[19] if stat else None


def pid_alive(pid: int, start: str | None) -> bool:
    """Whether `pid` on this host still runs the process that started at `start` (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc: kill(0) is all we know
    return stat[0] not in ("Z", "X") and (start is None or stat[19] == start)


def _holder(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # empty or torn: its writer died between create and write (or is writing right now)


def acquire_run_lock(run_dir: str | Path) -> Path:
    """Take `<run_dir>/run.lock` for this process, or raise `RunLockError` naming the holder."""
    lock = Path(run_dir) / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": pid_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(20):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
            if not _held:
                atexit.register(_release_all)
            _held.add(lock.resolve())
            return lock
        holder = _holder(lock)
        if holder is None:
            continue  # released between our create and our read: try again
        if holder.get("host") == me["host"] and holder.get("pid") == me["pid"] and lock.resolve() in _held:
            return lock  # ours already
        if not holder:
            if time.time() - _mtime(lock) < 5:
                time.sleep(0.1)  # its writer may be between create and write
                continue
            reason = "an unreadable lock file"
        elif holder.get("host") != me["host"]:
            raise RunLockError(
                f"{run_dir} is in use by pid {holder.get('pid')} on host {holder.get('host')} (since "
                f"{holder.get('since')}); one process per run directory. If that process is gone, remove {lock}")
        elif pid_alive(int(holder.get("pid", -1)), holder.get("start")):
            raise RunLockError(
                f"{run_dir} is in use by pid {holder['pid']} on this host ({me['host']}, since "
                f"{holder.get('since')}); one process per run directory: wait for it, stop it, or set another "
                f"run.name")
        else:
            reason = f"pid {holder.get('pid')} on {holder.get('host')}, which is no longer running"
        stale = lock.with_name(f"{LOCK_NAME}.stale.{me['pid']}")
        try:
            os.rename(lock, stale)  # only one taker wins the rename
        except FileNotFoundError:
            continue
        stale.unlink(missing_ok=True)
        log.warning("%s: taking over a stale run lock (%s)", run_dir, reason)
    raise RunLockError(f"{lock}: could not take the run lock (another process keeps re-creating it)")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def release_run_lock(run_dir: str | Path) -> None:
    """Remove this process's lock on `run_dir` (no-op if it does not hold it)."""
    lock = (Path(run_dir) / LOCK_NAME).resolve()
    if lock not in _held:
        return
    _held.discard(lock)
    holder = _holder(lock)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def _release_all() -> None:
    for lock in list(_held):
        release_run_lock(lock.parent)
