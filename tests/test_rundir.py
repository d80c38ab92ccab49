"""The run directory's durable state (engine/rundir/): atomic fsynced JSON, and the one lock implementation that
the run lock and the sweep's item locks share."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.rundir import files, lock
from engine.rundir.files import read_json, write_json_atomic, write_json_once
from engine.rundir.run_lock import RunLockError, acquire_run_lock, release_run_lock
from engine.sweep.worker import RunDir

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- atomic JSON


def test_atomic_write_fsyncs_the_file_then_renames_then_fsyncs_the_folder(tmp_path, monkeypatch):
    path = tmp_path / "state" / "pipeline.json"
    write_json_atomic(path, {"done": []})
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    write_json_atomic(path, {"done": ["sft"]})
    tmp = events[1][1]
    assert events == [("fsync", tmp), ("replace", tmp, str(path)), ("fsync", str(path.parent))]
    assert Path(tmp).parent == path.parent and Path(tmp).name.startswith(".pipeline.json.")
    assert read_json(path) == {"done": ["sft"]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["pipeline.json"]  # no temp left


def test_write_once_refuses_an_existing_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "items" / "s" / "sft.done.json"
    write_json_once(path, {"x": 1})
    with pytest.raises(FileExistsError):
        write_json_once(path, {"x": 2})
    assert read_json(path) == {"x": 1} and [p.name for p in path.parent.iterdir()] == ["sft.done.json"]


def test_read_json_missing_and_unreadable(tmp_path):
    assert read_json(tmp_path / "nothing.json") is None
    (tmp_path / "torn.json").write_text('{"host": "a", "pi')
    assert read_json(tmp_path / "torn.json") == {}


WRITER = r"""
import sys
from engine.rundir.files import write_json_atomic
i = 0
while True:
    i += 1
    write_json_atomic(sys.argv[1], {"i": i, "pad": "x" * (50_000 * (1 + i % 4))})
"""


@pytest.mark.parametrize("kill_after", [3, 20])
def test_a_reader_never_sees_a_torn_file_when_the_writer_is_killed(tmp_path, kill_after):
    """A child rewrites the file in a loop (sizes vary, so a torn copy cannot look whole); the parent reads all
    the while and SIGKILLs the child mid-loop: every read, and the file left behind, is one complete write."""
    path = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    seen: set[int] = set()
    try:
        deadline = time.time() + 60
        while len(seen) < kill_after:
            assert time.time() < deadline and proc.poll() is None, f"the writer made only {len(seen)} writes"
            obj = read_json(path)
            if obj is None:
                continue  # not written yet
            assert obj and len(obj["pad"]) == 50_000 * (1 + obj["i"] % 4), "a torn file was read"
            seen.add(obj["i"])
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    last = read_json(path)
    assert len(last["pad"]) == 50_000 * (1 + last["i"] % 4) and last["i"] >= max(seen)


# ---------------------------------------------------------------- one lock implementation


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def _stale_lock(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "start": None, "token": "old"}))


def _run_lock(tmp_path):
    run_dir = tmp_path / "run"

    def take():
        try:
            acquire_run_lock(run_dir)
        except RunLockError:
            return False
        release_run_lock(run_dir)
        return True

    return run_dir / "run.lock", take


def _sweep_lock(tmp_path):
    rd = RunDir(tmp_path / "sweep")

    def take():
        got = rd.try_claim("s/rl/5")
        if got is not None:
            rd.release(got)
        return got is not None

    return rd.lock_path("s/rl/5"), take


@pytest.mark.parametrize("make", [_run_lock, _sweep_lock], ids=["run lock", "sweep item lock"])
def test_stale_takeover_goes_through_the_guard(tmp_path, make, caplog):
    """The run lock and the sweep's item locks are one implementation: a dead holder's lock is taken over only
    by the holder of `<lock>.takeover`; while another taker holds it, nobody moves the lock."""
    path, take = make(tmp_path)
    _stale_lock(path)
    guard = path.with_name(path.name + ".takeover")
    guard.write_text("")  # another taker is mid-takeover
    assert not take() and read_json(path)["token"] == "old"
    old = time.time() - lock.GUARD_STALE_S - 1
    os.utime(guard, (old, old))  # that taker crashed: its guard is left over
    with caplog.at_level(logging.WARNING, logger="ceiling"):
        assert take()
    assert "taking over" in caplog.text
    assert not path.exists() and not guard.exists() and not list(path.parent.glob("*.stale.*"))


def test_run_lock_holder_is_a_lock_of_the_shared_module(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    acquire_run_lock(run_dir)
    try:
        holder = lock.read_holder(run_dir / "run.lock")
        assert holder["pid"] == os.getpid() and holder["token"] and holder["age"] < 5
        assert holder["start"] == lock.pid_start(os.getpid())
    finally:
        release_run_lock(run_dir)
    assert not (run_dir / "run.lock").exists()


def test_break_lock_removes_only_the_holder_it_read_and_waits_for_the_guard(tmp_path):
    """The sweep removes a dead host's run locks with `break_lock`: never a lock another process has taken since
    it was read, and never while another taker holds the guard."""
    path = tmp_path / "run" / "run.lock"
    path.parent.mkdir()
    dead = {"host": "gone-host", "pid": 7, "start": None, "token": "old"}
    path.write_text(json.dumps(dead))
    guard = path.with_name(path.name + ".takeover")
    guard.write_text("")
    assert not lock.break_lock(path, dead) and read_json(path) == dead  # another taker is mid-takeover
    guard.unlink()
    fresh = {**dead, "host": socket.gethostname(), "token": "new"}
    path.write_text(json.dumps(fresh))  # retaken since the caller read it
    assert not lock.break_lock(path, dead) and read_json(path) == fresh
    path.write_text(json.dumps(dead))
    assert lock.break_lock(path, dead) and not path.exists() and not list(path.parent.glob("*.stale.*"))
