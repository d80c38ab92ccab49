"""`ceiling sweep --slurm` on a real Slurm cluster, and what the script asks it for.

The cluster test needs a running cluster: `.ci/slurm-up.sh` (what CI runs before `make test`) installs Debian's
slurm-wlm and munge and starts a one-node cluster on this machine; without one the test skips and says so.
It submits the array script `--slurm` writes for a tiny CPU sweep with two workers of one CPU each, cancels
one worker with `scancel` while it holds an item, and checks that the other finishes every item exactly once
and writes the report. The quick tests here need no cluster: GPUs per worker from the run's device, and the
thread count of a worker's item processes from the CPUs it was given."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from test_sweep import tiny_sweep  # tests/ is on sys.path under pytest

from engine.cli import main as cli_main
from engine.config import dump_config
from engine.sweep import slurm, worker
from engine.sweep.items import Sweep
from engine.sweep.worker import Item, LaunchedItem, RunDir, Worker


def cluster_missing() -> str | None:
    """Why the cluster test cannot run here, or None when Slurm answers with two idle CPUs."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no Slurm cluster: run .ci/slurm-up.sh (sinfo/sbatch not on PATH)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%C"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no Slurm cluster: run .ci/slurm-up.sh (sinfo did not answer in 30 s)"
    if out.returncode != 0:
        return f"no Slurm cluster: run .ci/slurm-up.sh (sinfo: {out.stderr.strip() or out.returncode})"
    idle = sum(int(line.split("/")[1]) for line in out.stdout.split())  # allocated/idle/other/total
    return None if idle >= 2 else f"the Slurm cluster has {idle} idle CPUs, the test needs 2 (sinfo -o %C)"


def squeue(job: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T"], capture_output=True, text=True, timeout=30)
    return out.stdout.split("\n") if out.returncode == 0 and out.stdout.strip() else []


def slurm_env(pid: int) -> dict[str, str]:
    """SLURM_* of a local process (the test's cluster is this machine): which array task a lock holder is."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
    return {k: v for k, v in pairs if k.startswith("SLURM_")}


def item_process(worker_pid: int) -> int | None:
    """The pid of the `--run-item` child a local worker is running, or None."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == worker_pid and b"--run-item" in (stat.parent / "cmdline").read_bytes():
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


@pytest.mark.slow
def test_slurm_array_runs_a_sweep_with_one_worker_cancelled_mid_item(tmp_path, trainer_env):
    if (why := cluster_missing()) is not None:
        pytest.skip(why)
    cfg = tiny_sweep(tmp_path)
    config = tmp_path / "sweep.yaml"
    dump_config(cfg, config)
    root = tmp_path / "runs" / "s"
    made = subprocess.run([sys.executable, "-m", "engine.cli", "sweep", str(config), "--slurm", "--workers", "2",
                           "--cpus-per-worker", "1", "--time", "0:15:00", "--heartbeat", "1", "--stale-after",
                           "20", "--poll", "0.5"], capture_output=True, text=True, cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    script = root / "sweep.sbatch"
    text = script.read_text()
    assert "--gpus" not in text and "#SBATCH --cpus-per-task=1" in text  # a CPU sweep asks for no GPUs

    job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True,
                         cwd=tmp_path).stdout.strip().split(";")[0]
    try:
        # the victim: the first worker seen holding an item's lock, once its item process has had time to start
        deadline, seen, victim = time.time() + 180, {}, None
        while victim is None:
            assert time.time() < deadline, f"no worker claimed an item; squeue: {squeue(job)}"
            for lock in sorted((root / "locks").rglob("*.lock")) if (root / "locks").is_dir() else []:
                name = str(lock.relative_to(root / "locks"))[: -len(".lock")]
                holder = RunDir(root).holder(name) or {}
                env = slurm_env(int(holder["pid"])) if "pid" in holder else {}
                if env.get("SLURM_ARRAY_JOB_ID") == job and (child := item_process(int(holder["pid"]))):
                    key = (name, int(holder["pid"]), env["SLURM_ARRAY_TASK_ID"], child)
                    if time.time() - seen.setdefault(key, time.time()) > 1:  # its item process is under way
                        victim = key
                        break
            time.sleep(0.2)
        item, pid, task, child = victim
        assert RunDir(root).holder(item)["pid"] == pid  # still holding it: cancelled mid-item
        subprocess.run(["scancel", f"{job}_{task}"], check=True, timeout=30)
        deadline = time.time() + 240
        while squeue(job):
            assert time.time() < deadline, f"the sweep did not finish; squeue: {squeue(job)}"
            time.sleep(1)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)

    logs = {p.name: p.read_text() for p in (root / "slurm").glob(f"{job}_*.out")}
    assert len(logs) == 2, sorted(logs)
    killed, survivor = logs.pop(f"{job}_{task}.out"), next(iter(logs.values()))
    everything = "\n\n".join([killed[-3000:], survivor[-3000:]])
    assert f"{item} claimed by pid {pid}" in killed and f"sweep: {item} done" not in killed, everything
    assert f"worker {pid}: ran" not in killed and "report: " in survivor, everything  # killed before its summary
    assert "OMP_NUM_THREADS=1" in survivor and "OMP_NUM_THREADS=2" not in survivor  # --cpus-per-task=1

    state = Sweep(cfg).state()
    st = state["scenes"]["default"]
    expected = {"default/sft", "default/sft_eval", f"default/rl/{st['branches'][0]}", "default/rl/0",
                "default/baseline/luffy"}
    assert set(state["done"]) == expected
    finished = Counter(m for log in (killed, survivor) for m in re.findall(r"sweep: (\S+) done \(", log))
    assert finished == Counter(expected), everything  # each published exactly once, by one worker
    records = {i: json.loads((root / "items" / f"{i}.done.json").read_text())["worker"] for i in expected}
    assert records[item]["pid"] != pid  # the cancelled worker's item was taken over and finished by the other
    assert not Path(f"/proc/{child}").exists()  # the cancelled worker's item process did not live on
    assert not list((root / "items").rglob("*.failed.json")) and not list((root / "locks").rglob("*.lock"))
    assert "## Compute: spent vs a full sweep" in (root / "sweep_report.md").read_text()


# ---- no cluster needed ----------------------------------------------------------------------------------


def test_gpus_per_worker_come_from_the_user_or_the_runs_device(monkeypatch):
    assert slurm.gpus_for_device("cpu", None) == (0, None)
    gpus, note = slurm.gpus_for_device("cpu", 2)
    assert gpus == 2 and "will not use" in note  # the user's count wins, with a warning
    gpus, note = slurm.gpus_for_device("cuda", None)
    assert gpus == 8 and "--gpus-per-worker" in note
    assert slurm.gpus_for_device("cuda", 4) == (4, None)
    for found, want in (("cpu", 0), ("cuda", 8)):
        monkeypatch.setattr("engine.distributed.detect_device_type", lambda requested="auto", f=found: f)
        gpus, note = slurm.gpus_for_device("auto", None)
        assert gpus == want and f"found {found} on this host" in note
    assert slurm.gpus_for_device("auto", 2) == (2, None)


def test_slurm_script_of_a_cpu_sweep_asks_for_no_gpus(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    dump_config(tiny_sweep(tmp_path), config)  # run.device: cpu
    assert cli_main(["sweep", str(config), "--slurm", "--workers", "2", "--cpus-per-worker", "1"]) == 0
    text = (tmp_path / "runs" / "s" / "sweep.sbatch").read_text()
    assert "--gpus" not in text and "#SBATCH --cpus-per-task=1" in text and "--nproc-per-node=1" in text
    assert "note:" not in capsys.readouterr().out
    assert cli_main(["sweep", str(config), "--set", "run.device=cuda", "--set", "run.name=g", "--slurm"]) == 0
    assert "#SBATCH --gpus-per-node=8" in (tmp_path / "runs" / "g" / "sweep.sbatch").read_text()
    assert "note: run.device=cuda: 8 GPUs per worker" in capsys.readouterr().out


def test_worker_cpus_follow_the_affinity_and_slurms_grant(monkeypatch):
    one = min(os.sched_getaffinity(0))
    code = ("import os; from engine.sweep.worker import worker_cpus; "
            f"os.sched_setaffinity(0, {{{one}}}); print(worker_cpus())")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "1"  # a process pinned to one CPU
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert worker.worker_cpus() == 1  # task/none: the affinity is the node, the grant is one CPU
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4096")
    assert worker.worker_cpus() == len(os.sched_getaffinity(0))  # never more than it may run on

    monkeypatch.setattr(worker, "worker_cpus", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    assert worker.thread_env(procs=2) == {"OMP_NUM_THREADS": "4"}  # split over torchrun's ranks; the user's kept
    assert worker.thread_env(procs=16) == {"OMP_NUM_THREADS": "1"}


def test_item_processes_run_as_many_torch_threads_as_the_worker_has_cpus(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # what a worker of --cpus-per-task=1 sees
    for var in worker.THREAD_ENVS:
        monkeypatch.delenv(var, raising=False)
    child = ("import json, os, sys, torch; json.dump({'omp': os.environ.get('OMP_NUM_THREADS'), "
             "'torch': torch.get_num_threads()}, open(sys.argv[1], 'w'))")
    rundir = RunDir(tmp_path, stale_after=30)
    runner = LaunchedItem(rundir, lambda item, record: [sys.executable, "-c", child, str(record)])
    result = Worker(rundir, lambda: [Item("a/sft")], runner, heartbeat=1, poll=0.1).run()
    assert result.ran == ["a/sft"]
    rec = rundir.record("a/sft")
    assert (rec["omp"], rec["torch"]) == ("1", 1)
