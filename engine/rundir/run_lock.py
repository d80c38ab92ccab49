"""One process per run directory: `<run>/run.lock` names the holder's host and pid (a lock of engine/rundir/lock.py).

    acquire_run_lock(run_dir)     # called by engine.rundir.metrics.make_run_dir on rank 0
    release_run_lock(run_dir)     # also done at interpreter exit

A second process on the same run directory gets a `RunLockError` naming the holder. A lock left by a process
that is gone (same host, pid not running, or the pid now belongs to a process started later) is taken over
with a warning, through the same guarded takeover as the sweep's item locks. A lock held from another host
cannot be checked from here: the error says to remove the file if that process is gone. The same process may
take its own lock again (the pipeline runs SFT and RL trainers in one process).
"""

from __future__ import annotations

import atexit
import logging
import socket
from pathlib import Path

from engine.errors import CeilingError
from engine.rundir.lock import Lock, acquire, pid_alive

log = logging.getLogger("ceiling")

LOCK_NAME = "run.lock"
_held: dict[Path, Lock] = {}


class RunLockError(CeilingError):
    """The run directory is in use by another process."""


def _stale_reason(holder: dict) -> str | None:
    """Gone only when it ran on this host and its process no longer runs; another host's pid cannot be checked."""
    if holder.get("host") != socket.gethostname() or pid_alive(int(holder["pid"]), holder.get("start")):
        return None
    return f"pid {holder['pid']} on {holder['host']}, which is no longer running"


def acquire_run_lock(run_dir: str | Path) -> Path:
    """Take `<run_dir>/run.lock` for this process, or raise `RunLockError` naming the holder."""
    path = Path(run_dir) / LOCK_NAME
    key = path.resolve()
    if key in _held and _held[key].still_ours():
        return path

    def took_over(holder: dict, reason: str) -> None:
        log.warning("%s: taking over a stale run lock (%s)", run_dir, reason)

    got = acquire(path, _stale_reason, attempts=20, on_takeover=took_over)
    if isinstance(got, Lock):
        if not _held:
            atexit.register(_release_all)
        _held[key] = got
        return path
    if got is None:
        raise RunLockError(f"{path}: could not take the run lock (another process keeps re-creating it)")
    if got.get("host") != socket.gethostname():
        raise RunLockError(
            f"{run_dir} is in use by pid {got.get('pid')} on host {got.get('host')} (since {got.get('since')}); "
            f"one process per run directory. If that process is gone, remove {path}")
    raise RunLockError(
        f"{run_dir} is in use by pid {got['pid']} on this host ({got['host']}, since {got.get('since')}); one "
        f"process per run directory: wait for it, stop it, or set another run.name")


def release_run_lock(run_dir: str | Path) -> None:
    """Remove this process's lock on `run_dir` (no-op if it does not hold it)."""
    lock = _held.pop((Path(run_dir) / LOCK_NAME).resolve(), None)
    if lock is not None:
        lock.release()


def _release_all() -> None:
    for lock in list(_held.values()):
        lock.release()
    _held.clear()
