"""Lock files in a run directory: the one implementation behind the run lock (engine/rundir/run_lock.py) and
the sweep's item locks (engine/sweep/worker.py).

    got = acquire(path, stale_reason, attempts=5, on_takeover=None)   # a Lock, a live holder's record, or None
    got.still_ours(); got.release()
    read_holder(path)   # {"host", "pid", "start", "token", "since", "age"}, or None when the lock is free
    break_lock(path, holder)   # remove exactly `holder`'s lock, under the takeover guard (a dead host's lock)

A lock is a file created with O_CREAT | O_EXCL that holds its holder as JSON, so exactly one creator wins. Its
mtime is when the holder last touched it (the sweep's heartbeat); `age` is the seconds since. A holder that the
caller's `stale_reason` calls gone (its pid on this host is dead, its heartbeat is old, ...) is removed by one
taker at a time: takers hold a `<lock>.takeover` guard (O_EXCL), so a late taker can never move away the fresh
lock of the first one while a third process slips into the gap (two winners: a race seen in the sweep). The
taker then creates its lock like anyone else. Whether a pid still runs the process that took the lock is
`pid_alive(pid, start)`: the start time tells a reused pid apart (Linux /proc).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from engine.rundir.files import read_json

WRITE_GRACE_S = 5.0  # an unreadable lock younger than this may be between its creator's create and write
GUARD_STALE_S = 30.0  # a takeover guard is held for milliseconds; one this old is a crashed taker's leftover


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


@dataclass
class Lock:
    """A held lock: the path, our token and the inode we created (a takeover puts another file there)."""

    path: Path
    token: str
    inode: int
    holder: dict

    def still_ours(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self.inode and (read_json(self.path) or {}).get("token") == self.token
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.still_ours():
            self.path.unlink(missing_ok=True)


def read_holder(path: Path) -> dict | None:
    """The holder's record plus its `age` in seconds; just {"age": ...} while the file is unreadable (no
    "pid"); None when the lock is free."""
    holder = read_json(path)
    if holder is None:
        return None
    try:
        return {**holder, "age": time.time() - path.stat().st_mtime}
    except FileNotFoundError:
        return None


def acquire(path: str | Path, stale_reason: Callable[[dict], str | None], *, attempts: int = 5,
            on_takeover: Callable[[dict, str], None] | None = None) -> Lock | dict | None:
    """Take the lock at `path` for this process. A readable holder for which `stale_reason(holder)` names a
    reason, or a file still unreadable after WRITE_GRACE_S, is taken over; `on_takeover(holder, reason)` is
    told once its file is gone. Returns our `Lock`, the record of a live holder, or None when every attempt
    lost a race (the lock changed under us, or another taker held the guard)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": pid_start(os.getpid()),
          "token": uuid.uuid4().hex, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(attempts):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me))
                f.flush()
                os.fsync(f.fileno())
                inode = os.fstat(f.fileno()).st_ino
            return Lock(path, me["token"], inode, me)
        holder = read_holder(path)
        if holder is None:
            continue  # released between our create and our read
        if "pid" not in holder:
            if holder["age"] < WRITE_GRACE_S:
                time.sleep(0.05)  # its creator may be between create and write
                continue
            reason = "an unreadable lock file"
        elif (reason := stale_reason(holder)) is None:
            return holder
        if _take_over(path, holder, me["token"]) and on_takeover is not None:
            on_takeover(holder, reason)
    return None


def break_lock(path: str | Path, holder: dict) -> bool:
    """Remove the lock at `path` if it is still `holder`'s (as read from it), by the takeover rules: for a caller
    that knows the holder is gone where `stale_reason` cannot tell (its host is dead). True when it was removed."""
    return _take_over(Path(path), holder, uuid.uuid4().hex)


def _take_over(path: Path, holder: dict, token: str) -> bool:
    """Remove the stale lock `holder` (read from `path`) under the takeover guard. True when that lock is gone
    and we may create ours; False when the guard is busy or the lock changed (the caller looks again)."""
    guard = path.with_name(path.name + ".takeover")
    seen = {k: v for k, v in holder.items() if k != "age"}
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > GUARD_STALE_S:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        time.sleep(0.01)
        return False
    os.close(fd)
    try:
        if read_json(path) != seen:
            return False  # released or taken meanwhile
        moved = path.with_name(f"{path.name}.stale.{token}")
        try:
            os.rename(path, moved)
        except FileNotFoundError:
            return False
        if read_json(moved) != seen:
            # its owner released it and a fresh claimer created a new lock between our read and the rename:
            # put that lock back (if a third claimer got in first, the fresh one sees the loss: `still_ours`)
            try:
                os.link(moved, path)
            except FileExistsError:
                pass
            moved.unlink(missing_ok=True)
            return False
        moved.unlink(missing_ok=True)
        return True
    finally:
        guard.unlink(missing_ok=True)
