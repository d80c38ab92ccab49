"""Sweep workers (engine/sweep/worker.py): the lock protocol, stale takeover, concurrent workers with one killed
mid-item, and the sbatch script (engine/sweep/slurm.py).

The multi-worker tests run real worker processes (`Worker` + `LaunchedItem`, items as child processes with the
lock watchdog) on a sweep-shaped plan whose items only sleep and log, so they take seconds; the real
`ceiling sweep --worker` path on a tiny config is in tests/test_sweep.py."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from engine.errors import CeilingError
from engine.sweep.slurm import SlurmSpec, sbatch_script, write_sbatch
from engine.sweep.worker import Item, RunDir, Worker

ROOT = Path(__file__).resolve().parents[1]

# A worker over a sweep-shaped plan: SFT first, then branches chosen by the SFT record, pure RL and a baseline.
HARNESS = r"""
import json, sys
from pathlib import Path
from engine.sweep.worker import Item, LaunchedItem, RunDir, Worker

root, log, item_seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rundir = RunDir(root, stale_after=30.0)

def plan():
    sft = rundir.record("a/sft")
    return ([Item("a/sft"), Item("a/sft_eval", ("a/sft",))]
            + [Item(f"a/rl/{k}", ("a/sft",)) for k in (sft["branches"] if sft else [])]
            + [Item("a/rl/0"), Item("a/baseline/luffy")])

def command(item, record):
    return [sys.executable, "-c", CHILD, item.name, str(record), log, item_seconds]

CHILD = '''
import json, os, sys, time
from engine.sweep.worker import WORKER_ENV, start_lock_watchdog
start_lock_watchdog(0.05)
name, record, log, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
worker = os.environ[WORKER_ENV].split(":")[0]
def note(what):
    with open(log, "a") as f:
        f.write(f"{what} {name} {worker} {os.getpid()}\\n")
note("start")
time.sleep(seconds)
with open(record, "w") as f:
    json.dump({"branches": [100, 200]} if name.endswith("/sft") else {"item": name}, f)
note("finish")
'''

runner = LaunchedItem(rundir, command, kill_grace=1.0)
worker = Worker(rundir, plan, runner, heartbeat=0.2, poll=0.1)
runner.attach(worker)
result = worker.run()
print(json.dumps({"ran": result.ran, "failed": result.failed, "blocked": result.blocked}))
"""
ITEMS = {"a/sft", "a/sft_eval", "a/rl/100", "a/rl/200", "a/rl/0", "a/baseline/luffy"}


def start_workers(root: Path, log: Path, n: int, seconds: float = 0.8) -> list[subprocess.Popen]:
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    return [subprocess.Popen([sys.executable, "-c", HARNESS, str(root), str(log), str(seconds)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]


def events(log: Path) -> list[tuple[str, str, int, int]]:
    if not log.is_file():
        return []
    return [(w[0], w[1], int(w[2]), int(w[3])) for w in (line.split() for line in log.read_text().splitlines())]


def finish(procs, timeout=90.0) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        if p.returncode == -signal.SIGKILL:
            continue
        assert p.returncode == 0, stderr[-3000:]
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def done_items(root: Path) -> set[str]:
    return {str(p.relative_to(root / "items"))[: -len(".done.json")] for p in (root / "items").rglob("*.done.json")}


@pytest.mark.slow
def test_concurrent_workers_one_killed_mid_item_match_a_single_worker(tmp_path):
    single = tmp_path / "single"
    reports = finish(start_workers(single, tmp_path / "single.log", 1, seconds=0.2))
    assert set(reports[0]["ran"]) == ITEMS and done_items(single) == ITEMS
    assert Counter(e[1] for e in events(tmp_path / "single.log") if e[0] == "finish") == Counter(ITEMS)

    for n, victim_item in ((2, "a/rl/100"), (3, "a/sft")):
        root, log = tmp_path / f"w{n}", tmp_path / f"w{n}.log"
        procs = start_workers(root, log, n)
        by_pid = {p.pid: p for p in procs}
        deadline = time.time() + 60
        while not any(e[0] == "start" and e[1] == victim_item for e in events(log)):
            assert time.time() < deadline, f"{victim_item} never started: {events(log)}"
            time.sleep(0.02)
        start = next(e for e in events(log) if e[0] == "start" and e[1] == victim_item)
        by_pid[start[2]].send_signal(signal.SIGKILL)  # the worker dies mid-item; its child must not finish
        reports = finish(procs)
        ev = events(log)

        assert done_items(root) == ITEMS  # the same items as one worker ...
        finished = Counter(e[1] for e in ev if e[0] == "finish")
        assert finished == Counter(ITEMS)  # ... each run exactly once to completion
        starts = [e for e in ev if e[0] == "start" and e[1] == victim_item]
        assert len(starts) == 2 and starts[1][2] != start[2]  # taken over by another worker
        assert not any(e[0] == "finish" and e[3] == start[3] for e in ev)  # the orphaned child was stopped
        published_by = {i: json.loads((root / "items" / f"{i}.done.json").read_text())["worker"]["pid"] for i in ITEMS}
        assert published_by[victim_item] != start[2]
        ran = [i for r in reports for i in r["ran"]]  # the survivors' reports: what each one published
        assert sorted(ran) == sorted(i for i, pid in published_by.items() if pid != start[2])
        assert all(not r["failed"] and not r["blocked"] for r in reports)
        assert not list((root / "locks").rglob("*.lock"))  # every lock released


# ---- the protocol, in one process ---------------------------------------------------------------------


def test_claim_is_exclusive_and_released(tmp_path):
    rd = RunDir(tmp_path)
    lock = rd.try_claim("s/sft")
    assert lock is not None and rd.try_claim("s/sft") is None  # this process is alive: not stale
    holder = rd.holder("s/sft")
    assert holder["pid"] == os.getpid() and holder["age"] < 5 and rd.stale_reason(holder) is None
    rd.release(lock)
    assert rd.holder("s/sft") is None and rd.try_claim("s/sft") is not None


def test_dead_pid_on_this_host_is_stale(tmp_path):
    rd = RunDir(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rd.lock_path("s/rl/5").parent.mkdir(parents=True)
    rd.lock_path("s/rl/5").write_text(json.dumps({"host": rd.host, "pid": gone.pid, "start": None, "token": "x"}))
    taken = []
    lock = rd.try_claim("s/rl/5", on_takeover=lambda name, holder: taken.append((name, holder["pid"])))
    assert lock is not None and taken == [("s/rl/5", gone.pid)] and rd.holder("s/rl/5")["pid"] == os.getpid()


def test_old_heartbeat_from_another_host_is_stale(tmp_path):
    rd = RunDir(tmp_path, stale_after=60)
    path = rd.lock_path("s/sft")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": "node-that-died", "pid": 1, "start": None, "token": "x"}))
    assert rd.try_claim("s/sft") is None  # another host, fresh heartbeat: cannot tell, so it is alive
    os.utime(path, (time.time() - 61, time.time() - 61))
    assert "no heartbeat for 61 s" in rd.stale_reason(rd.holder("s/sft"))
    assert rd.try_claim("s/sft") is not None


def test_one_taker_wins_a_stale_lock(tmp_path, monkeypatch):
    # 8 threads race for 12 stale locks; each rename is slowed down so that a late taker's rename lands
    # after the first taker made its fresh lock (the window that once let two takers win)
    real_rename = os.rename

    def slow_rename(src, dst):
        real_rename(src, dst)
        time.sleep(0.005)

    monkeypatch.setattr("engine.rundir.lock.os.rename", slow_rename)
    names = [f"s/rl/{i}" for i in range(12)]
    rd = RunDir(tmp_path, stale_after=60)
    for name in names:
        path = rd.lock_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"host": "gone", "pid": 1, "start": None, "token": "x"}))
        os.utime(path, (0, 0))
    won, barrier = [], threading.Barrier(8)

    def take(k):
        mine = RunDir(tmp_path, stale_after=60)
        barrier.wait()
        won.extend(name for name in names[k % 4:] + names[:k % 4] if mine.try_claim(name) is not None)

    threads = [threading.Thread(target=take, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(won) == sorted(names)  # each exactly once (the takers live on: their locks stay fresh)
    left = sorted(p.name for p in rd.lock_path(names[0]).parent.iterdir())
    assert left == sorted(f"{i}.lock" for i in range(12))  # no stale copies or guards left behind


def test_done_is_published_once(tmp_path):
    rd = RunDir(tmp_path)
    rd.publish_failed("s/sft", "RuntimeError: boom")
    assert rd.failure("s/sft")["failures"] == 1
    rd.publish_done("s/sft", {"x": 1})
    assert rd.record("s/sft") == {"x": 1} and rd.failure("s/sft") is None
    with pytest.raises(CeilingError, match="already published"):
        rd.publish_done("s/sft", {"x": 2})
    assert rd.record("s/sft") == {"x": 1}


def test_worker_in_process_order_failure_and_blocking(tmp_path):
    """The in-process hook: items in plan order once their deps are done; a failure blocks its dependents,
    the rest still runs, and a retry runs only what is left."""
    rd = RunDir(tmp_path, stale_after=3)
    ran, fail = [], {"s/sft_eval"}

    def plan():
        return [Item("s/sft"), Item("s/sft_eval", ("s/sft",)), Item("s/report", ("s/sft_eval",)), Item("s/rl/0")]

    def run_item(item, lock, hb):
        assert lock.still_ours() and rd.holder(item.name)["pid"] == os.getpid()
        ran.append(item.name)
        if item.name in fail:
            raise RuntimeError("no eval data")
        return {"name": item.name}

    result = Worker(rd, plan, run_item, heartbeat=0.5, poll=0.05).run()
    assert ran == ["s/sft", "s/sft_eval", "s/rl/0"] and result.failed == ["s/sft_eval"]
    assert result.blocked == ["s/sft_eval", "s/report"] and not result.ok
    assert "no eval data" in rd.failure("s/sft_eval")["error"]
    assert rd.record("s/sft")["worker"]["pid"] == os.getpid()
    fail.clear()
    ran.clear()
    result = Worker(rd, plan, run_item, heartbeat=0.5, poll=0.05, retry_failed=True).run()
    assert ran == ["s/sft_eval", "s/report"] and result.ok


def test_describe_says_where_each_item_stands(tmp_path):
    rd = RunDir(tmp_path)
    items = [Item("s/sft"), Item("s/sft_eval", ("s/sft",), "eval"), Item("s/rl/0"), Item("s/baseline/upt"),
             Item("s/rl/5", ("s/sft",))]
    rd.publish_done("s/sft", {})
    rd.publish_failed("s/rl/0", "OOM")
    rd.try_claim("s/sft_eval")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    rd.lock_path("s/rl/5").parent.mkdir(parents=True)
    rd.lock_path("s/rl/5").write_text(json.dumps({"host": rd.host, "pid": gone.pid, "token": "t"}))
    lines = dict(line.split(None, 1) for line in rd.describe(items))
    assert lines["s/sft"].startswith("done")
    assert lines["s/sft_eval"].startswith(f"running on {rd.host} pid {os.getpid()}") and "after s/sft" in lines["s/sft_eval"]
    assert lines["s/rl/0"].startswith("FAILED (OOM)") and lines["s/baseline/upt"].startswith("ready")
    assert f"stale: pid {gone.pid} on this host" in lines["s/rl/5"]


def test_worker_rejects_a_heartbeat_too_slow_for_the_timeout(tmp_path):
    with pytest.raises(CeilingError, match="stale_after >= 3x heartbeat"):
        Worker(RunDir(tmp_path, stale_after=10), list, None, heartbeat=5)


# ---- the sbatch script ----------------------------------------------------------------------------------


def test_sbatch_script_is_valid_bash_and_starts_workers(tmp_path):
    fake_python = tmp_path / "bin" / "python"  # stands in for the interpreter: prints what it was asked to run
    fake_python.parent.mkdir()
    fake_python.write_text('#!/bin/bash\nprintf "%s\\n" "$PWD" "$@"\n')
    fake_python.chmod(0o755)
    run = tmp_path / "runs" / "paper sweep"
    spec = SlurmSpec(run_dir=run, config=run / "config.yaml", workdir=tmp_path, python=str(fake_python), workers=6,
                     gpus_per_worker=8, partition="gpu", extra=["--qos=high"], stale_after=900)
    path = write_sbatch(spec)
    text = path.read_text()
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    directives = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")]
    for want in ("--array=0-5", "--gpus-per-node=8", "--partition=gpu", "--qos=high", "--nodes=1"):
        assert want in directives
    assert (run / "slurm").is_dir()  # Slurm does not create the log directory itself
    out = subprocess.run(["bash", str(path)], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "SLURM_ARRAY_TASK_ID": "3"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "worker 3 on " + os.uname().nodename + ": job none"
    assert lines[1] == str(tmp_path)  # it starts in the workdir
    assert lines[2:] == ["-m", "engine.cli", "sweep", str(run / "config.yaml"), "--worker", "--nproc-per-node=8",
                         "--stale-after=900", "--heartbeat=30", "--poll=10"]


def test_sbatch_rejects_bad_options(tmp_path):
    with pytest.raises(CeilingError, match="--workers"):
        SlurmSpec(run_dir=tmp_path, config=tmp_path / "c.yaml", workdir=tmp_path, python="python", workers=0)
    with pytest.raises(CeilingError, match="--sbatch"):
        SlurmSpec(run_dir=tmp_path, config=tmp_path / "c.yaml", workdir=tmp_path, python="python",
                  extra=["qos=high\nrm -rf /"])
    assert "--gpus-per-node" not in sbatch_script(SlurmSpec(run_dir=tmp_path, config=tmp_path / "c.yaml",
                                                            workdir=tmp_path, python="python", gpus_per_worker=0))
