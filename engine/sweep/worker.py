"""Many workers, one sweep: claim the next ready item with a lock file on the shared run directory, run it,
mark it done. No scheduler of our own: N copies of `ceiling sweep CONFIG --worker` (a Slurm array, several
shells, several GPU groups of one node) share `<run>/` on a shared filesystem and agree through files.

    <run>/items/<item>.done.json     the item's record; written once (hard link of a complete temp file, which
                                     fails if it exists), so a finished item is never run or published twice
    <run>/items/<item>.failed.json   the last failure of the item (error, host, pid); blocks it and what depends
                                     on it until a worker runs with `retry_failed`
    <run>/locks/<item>.lock          the holder: {"host", "pid", "start", "token", "since"}, created with
                                     O_CREAT | O_EXCL (engine/rundir/lock.py, as the run lock is); its mtime is
                                     the heartbeat, refreshed every `heartbeat` s

Protocol of one worker (`Worker.run`), repeated until nothing is left:
  1. plan: the items and their dependencies (re-read every round: finished items may add items, e.g. the
     RL branches once the SFT run has picked its checkpoints).
  2. claim the first item, in plan order, that is not done, not failed, whose dependencies are all done and
     whose lock is free or stale. Stale: the heartbeat is older than `stale_after` s, or the holder runs on
     this host and its pid is gone (or was reused). A stale lock is removed by one taker at a time (a
     `<item>.lock.takeover` guard, O_EXCL), then claimed like a free one; `on_takeover` is told whose it was,
     so the item's own run locks can be cleared.
  3. run it; a heartbeat thread touches the lock and checks that it is still ours (same inode). A worker
     that loses its lock (it froze past `stale_after` and was taken over) stops the item and publishes nothing.
  4. publish the record (done) or the failure, release the lock.
  5. when no item can be claimed: exit if every item is done (or the rest wait on failed items), else sleep
     `poll` s (items are running elsewhere, or waiting on them) and go back to 1.

Items as child processes (`LaunchedItem`, what `ceiling sweep --worker` uses): the child (e.g. a torchrun
job) gets the lock's path and token and the worker's pid in its environment and runs `start_lock_watchdog`,
which ends it at once when its worker is gone or the lock was taken over, so an orphaned item never keeps
writing next to its new owner; the worker kills the child's process group when it loses the lock. Running an
item is at-least-once (a taken-over item resumes from its checkpoints); publishing it is exactly-once.
The child's thread pools (OMP_NUM_THREADS, which torch's intra-op pool follows) are sized to the CPUs this
worker was given (`worker_cpus`: Slurm's --cpus-per-task, the CPU affinity) split over the item's processes,
so N workers on one node do not each run a pool as wide as the node.

Cluster clocks are assumed synchronised (NTP) to well below `stale_after`: heartbeats written on one host
are judged on another. Paths: item names use '/', e.g. "n200/rl/150" -> items/n200/rl/150.done.json.
Tests inject their own `run_item` (the documented hook of `Worker`) or child command (`LaunchedItem`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import CeilingError
from engine.rundir.files import read_json, write_json_atomic, write_json_once
from engine.rundir.lock import WRITE_GRACE_S, Lock, acquire, pid_alive, pid_start, read_holder

log = logging.getLogger("ceiling")


class LockLost(CeilingError):
    """This worker's lock on an item was taken over by another worker (it looked dead)."""


@dataclass(frozen=True)
class Item:
    """One unit of work of a sweep and the items it needs first."""

    name: str
    deps: tuple[str, ...] = ()
    note: str = ""  # what the item does, for --plan


class RunDir:
    """The shared files of a sweep run: done records, failures and item locks under `root`."""

    def __init__(self, root: str | Path, stale_after: float = 600.0):
        self.root = Path(root)
        self.stale_after = stale_after
        self.host = socket.gethostname()

    # ------------------------------------------------------------ paths and records
    def done_path(self, name: str) -> Path:
        return self.root / "items" / f"{name}.done.json"

    def failed_path(self, name: str) -> Path:
        return self.root / "items" / f"{name}.failed.json"

    def lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    def record(self, name: str) -> dict | None:
        """The done record of `name`, or None while it is not done."""
        rec = read_json(self.done_path(name))
        return rec or None

    def is_done(self, name: str) -> bool:
        return self.done_path(name).is_file()

    def failure(self, name: str) -> dict | None:
        return read_json(self.failed_path(name))

    def publish_done(self, name: str, record: dict) -> None:
        """Write the record once: the link fails if another worker already published this item."""
        path = self.done_path(name)
        try:
            write_json_once(path, record)
        except FileExistsError:
            raise CeilingError(f"{path}: item {name} was already published by another worker") from None
        self.failed_path(name).unlink(missing_ok=True)

    def publish_failed(self, name: str, error: str) -> None:
        prev = self.failure(name) or {}
        write_json_atomic(self.failed_path(name), {"error": error, "host": self.host, "pid": os.getpid(),
                                                    "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                    "failures": int(prev.get("failures", 0)) + 1})

    def describe(self, items: list[Item]) -> list[str]:
        """One line per item: name, status (done, FAILED, running/stale, ready, waiting), note, dependencies."""
        lines = []
        for item in items:
            if self.is_done(item.name):
                status = "done"
            elif (f := self.failure(item.name)) is not None:
                status = f"FAILED ({f.get('error', '?')[:80]})"
            elif (h := self.holder(item.name)) is not None:
                why = self.stale_reason(h)
                status = (f"running on {h.get('host')} pid {h.get('pid')} (heartbeat {h['age']:.0f} s ago)"
                          + (f", stale: {why}" if why else ""))
            else:
                status = "ready" if all(self.is_done(d) for d in item.deps) else "waiting"
            after = f"  after {', '.join(item.deps)}" if item.deps else ""
            lines.append(f"{item.name:28s} {status:12s} {item.note}{after}")
        return lines

    # ------------------------------------------------------------ locks (engine/rundir/lock.py)
    def holder(self, name: str) -> dict | None:
        """The lock's content plus its heartbeat `age` in seconds, or None when the item is not locked."""
        return read_holder(self.lock_path(name))

    def stale_reason(self, holder: dict) -> str | None:
        """Why a lock no longer protects a running item, or None while its holder looks alive."""
        age = holder.get("age", 0.0)
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_after:g} s)"
        if "pid" not in holder:
            return "an unreadable lock file" if age > WRITE_GRACE_S else None  # its writer may be writing it
        if holder.get("host") == self.host and not pid_alive(int(holder["pid"]), holder.get("start")):
            return f"pid {holder.get('pid')} on this host ({self.host}) is gone"
        return None

    def try_claim(self, name: str, on_takeover: Callable[[str, dict], None] | None = None) -> Lock | None:
        """Take the lock of `name`, taking over a stale one; None if a live holder has it."""
        def took_over(holder: dict, reason: str) -> None:
            log.warning("sweep: taking over %s from pid %s on %s: %s", name, holder.get("pid"), holder.get("host"),
                        reason)
            if on_takeover is not None:
                on_takeover(name, holder)

        got = acquire(self.lock_path(name), self.stale_reason, attempts=5, on_takeover=took_over)
        return got if isinstance(got, Lock) else None

    def release(self, lock: Lock) -> None:
        lock.release()


class Heartbeat:
    """Touches a held lock every `interval` s; sets `lost` (and calls `on_lost`) once it is no longer ours."""

    def __init__(self, lock: Lock, interval: float, on_lost: Callable[[], None] | None = None):
        self.lock, self.interval, self.on_lost = lock, interval, on_lost
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweep-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.lock.still_ours():
                self.lost.set()
                log.error("sweep: lost the lock %s (taken over); stopping this item", self.lock.path)
                if self.on_lost is not None:
                    self.on_lost()
                return
            try:
                os.utime(self.lock.path)
            except FileNotFoundError:
                pass


@dataclass
class WorkerResult:
    ran: list[str] = field(default_factory=list)  # items this worker finished
    failed: list[str] = field(default_factory=list)  # items this worker saw fail (its own runs)
    blocked: list[str] = field(default_factory=list)  # items left waiting on failed items when it exited

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


class Worker:
    """Claims, runs and publishes items until none is left (see the module docstring).

    `plan()` returns the items in the order to take them; `run_item(item, lock, heartbeat)` does the work and
    returns the record to publish (it may poll `heartbeat.lost` to give up early; `on_lost` of the heartbeat
    is `stop_item`, which a runner that starts a subprocess sets to kill it).
    """

    def __init__(self, rundir: RunDir, plan: Callable[[], list[Item]],
                 run_item: Callable[[Item, Lock, Heartbeat], dict], heartbeat: float = 30.0, poll: float = 10.0,
                 retry_failed: bool = False, on_takeover: Callable[[str, dict], None] | None = None,
                 max_items: int | None = None):
        if heartbeat <= 0 or poll <= 0 or heartbeat * 3 > rundir.stale_after:
            raise CeilingError(f"sweep worker: need heartbeat > 0, poll > 0 and stale_after >= 3x heartbeat "
                               f"(heartbeat {heartbeat:g} s, stale after {rundir.stale_after:g} s)")
        self.rundir, self.plan, self.run_item = rundir, plan, run_item
        self.heartbeat, self.poll, self.retry_failed = heartbeat, poll, retry_failed
        self.on_takeover, self.max_items = on_takeover, max_items
        self.stop_item: Callable[[], None] | None = None

    def run(self) -> WorkerResult:
        result = WorkerResult()
        if self.retry_failed:
            for item in self.plan():
                self.rundir.failed_path(item.name).unlink(missing_ok=True)
        while self.max_items is None or len(result.ran) < self.max_items:
            items = self.plan()
            claimed = None
            for item in self._ready(items):
                lock = self.rundir.try_claim(item.name, self.on_takeover)
                if lock is not None:
                    if self.rundir.is_done(item.name):  # finished between our scan and our claim
                        self.rundir.release(lock)
                        continue
                    claimed = (item, lock)
                    break
            if claimed is not None:
                try:
                    self._run_one(*claimed, result)
                except LockLost as e:
                    log.error("sweep: %s", e)
                continue
            pending = [i for i in items if not self.rundir.is_done(i.name)]
            if not pending:
                return result
            blocked = self._blocked(items)
            if len(blocked) == len(pending):
                result.blocked = [i.name for i in blocked]
                log.error("sweep: nothing left to run; waiting on failed items: %s", ", ".join(result.blocked))
                return result
            time.sleep(self.poll)
        return result

    def _ready(self, items: list[Item]) -> list[Item]:
        done = {i.name for i in items if self.rundir.is_done(i.name)}
        return [i for i in items if i.name not in done and all(d in done for d in i.deps)
                and self.rundir.failure(i.name) is None]

    def _blocked(self, items: list[Item]) -> list[Item]:
        """Pending items that cannot run: failed, or depending (transitively) on a failed item."""
        by_name = {i.name: i for i in items}
        memo: dict[str, bool] = {}

        def blocked(name: str) -> bool:
            if name not in memo:
                memo[name] = False  # cycles cannot block
                item = by_name.get(name)
                memo[name] = (not self.rundir.is_done(name)) and (
                    self.rundir.failure(name) is not None or any(blocked(d) for d in (item.deps if item else ())))
            return memo[name]

        return [i for i in items if blocked(i.name)]

    def _run_one(self, item: Item, lock: Lock, result: WorkerResult) -> None:
        log.info("sweep: %s claimed by pid %d on %s", item.name, os.getpid(), self.rundir.host)
        started = time.time()
        try:
            with Heartbeat(lock, self.heartbeat, on_lost=lambda: self.stop_item and self.stop_item()) as hb:
                try:
                    record = self.run_item(item, lock, hb)
                except Exception as e:
                    if hb.lost.is_set():
                        raise LockLost(f"{item.name}: lock lost while running") from e
                    self.rundir.publish_failed(item.name, f"{type(e).__name__}: {e}")
                    result.failed.append(item.name)
                    log.exception("sweep: %s failed", item.name)
                    return
            if hb.lost.is_set() or not lock.still_ours():
                raise LockLost(f"{item.name}: lock lost while running; the result is not published")
            record["worker"] = {"host": self.rundir.host, "pid": os.getpid(), "seconds": round(time.time() - started, 2),
                                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
            self.rundir.publish_done(item.name, record)
            result.ran.append(item.name)
            log.info("sweep: %s done (%.1f s)", item.name, time.time() - started)
        finally:
            self.rundir.release(lock)


# ---------------------------------------------------------------- items as child processes

LOCK_ENV, TOKEN_ENV, WORKER_ENV = "CEILING_SWEEP_LOCK", "CEILING_SWEEP_TOKEN", "CEILING_SWEEP_WORKER"
THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def worker_cpus() -> int:
    """CPUs this worker may use: its CPU affinity, capped by Slurm's --cpus-per-task. Slurm without a task
    plugin that binds (task/none) leaves the affinity at the whole node, so the count it granted is the cap."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    granted = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if granted.isdigit() and int(granted) > 0:
        cpus = min(cpus, int(granted))
    return max(1, cpus)


def thread_env(procs: int = 1) -> dict[str, str]:
    """Thread counts for an item of `procs` processes sharing this worker's CPUs; a value the user exported
    is kept."""
    threads = str(max(1, worker_cpus() // max(1, procs)))
    return {var: threads for var in THREAD_ENVS if var not in os.environ}


class LaunchedItem:
    """Runs each item as a child process (`command(item, record_path) -> argv`, e.g. a torchrun job) and
    returns the record it wrote. The child gets the lock's path and token and the worker's pid in its
    environment (`start_lock_watchdog`); the worker kills the child's process group when it loses the lock.
    `procs`: processes an item's command starts (torchrun's --nproc-per-node); they share `worker_cpus()`."""

    def __init__(self, rundir: RunDir, command: Callable[[Item, Path], list[str]], kill_grace: float = 10.0,
                 procs: int = 1):
        self.rundir, self.command, self.kill_grace, self.procs = rundir, command, kill_grace, procs
        self._proc: subprocess.Popen | None = None

    def attach(self, worker: Worker) -> None:
        worker.stop_item = self.stop

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.kill_grace), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def __call__(self, item: Item, lock: Lock, heartbeat: Heartbeat) -> dict:
        record = self.rundir.root / "items" / f"{item.name}.{lock.token}.record.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        argv = self.command(item, record)
        env = os.environ | thread_env(self.procs) | {LOCK_ENV: str(lock.path), TOKEN_ENV: lock.token,
                                                     WORKER_ENV: f"{os.getpid()}:{pid_start(os.getpid())}"}
        log.info("sweep: %s: %s (OMP_NUM_THREADS=%s)", item.name, " ".join(argv), env.get("OMP_NUM_THREADS"))
        self._proc = subprocess.Popen(argv, env=env, start_new_session=True)  # its own group: killed as one
        try:
            rc = self._proc.wait()
        except BaseException:
            self.stop()
            raise
        finally:
            self._proc = None
        try:
            if heartbeat.lost.is_set():
                raise LockLost(f"{item.name}: lock lost while running")
            if rc != 0:
                raise CeilingError(f"{item.name}: `{' '.join(argv)}` exited with status {rc}")
            rec = read_json(record)
            if not rec:
                raise CeilingError(f"{item.name}: the item process exited 0 but wrote no record to {record}")
            return rec
        finally:
            record.unlink(missing_ok=True)


def start_lock_watchdog(interval: float = 1.0) -> bool:
    """In an item's child process: exit at once (status 75) when the worker that started it is gone or no
    longer holds the item's lock, so that a taken-over item never runs twice. No-op outside a worker."""
    path, token, worker = os.environ.get(LOCK_ENV), os.environ.get(TOKEN_ENV), os.environ.get(WORKER_ENV)
    if not (path and token and worker):
        return False
    pid, _, start = worker.partition(":")

    def watch() -> None:
        while True:
            time.sleep(interval)
            holder = read_json(Path(path))
            if holder is None or (holder and holder.get("token") != token):  # {}: a new taker is writing it
                why = "the item's lock was taken over"
            elif not pid_alive(int(pid), None if start in ("", "None") else start):
                why = f"its worker (pid {pid}) is gone"
            else:
                continue
            log.error("sweep item process %d: %s; exiting", os.getpid(), why)
            os._exit(75)

    threading.Thread(target=watch, name="sweep-lock-watchdog", daemon=True).start()
    return True
