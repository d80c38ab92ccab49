"""`ceiling sweep CONFIG --slurm`: an sbatch array script whose tasks are sweep workers.

    ceiling sweep configs/sweep-tiny.yaml --slurm --workers 8 --gpus-per-worker 8 --partition gpu
    ceiling sweep configs/sweep-tiny.yaml --slurm --workers 2 --cpus-per-worker 1 --set run.device=cpu
    sbatch runs/sweep-tiny/sweep.sbatch

Each array task is one node (or GPU group) running `ceiling sweep <run>/config.yaml --worker`: it claims
items through the lock files of the shared run directory (engine/sweep/worker.py), runs each as a
`torchrun --standalone --nproc-per-node G` job, and exits when nothing is left. Slurm only starts workers;
which item runs where is decided by the workers. A task that dies (node failure, preemption, time limit)
leaves a lock that goes stale after `--stale-after` seconds; another task takes the item over and resumes it
from its checkpoints. Resubmitting the same script later continues the sweep.

GPUs per worker follow the sweep's `run.device` (`gpus_for_device`): a CPU sweep asks for none (no --gpus line,
so a CPU-only cluster can schedule it); a CUDA sweep takes `--gpus-per-worker`, 8 when not given. Each worker's
item processes use the CPUs Slurm gave it (`--cpus-per-task`; engine/sweep/worker.py `worker_cpus`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError


@dataclass
class SlurmSpec:
    """What the sbatch script asks Slurm for and the worker command each array task runs."""

    run_dir: Path
    """The sweep's run directory (on a filesystem every node sees)."""
    config: Path
    """The sweep's resolved config (`<run>/config.yaml`)."""
    workdir: Path
    """Directory the workers start in (relative paths in the config resolve from it)."""
    python: str
    """The Python interpreter of the environment with ceiling-engine installed."""
    workers: int = 4
    """Array size: how many workers may run at once."""
    gpus_per_worker: int = 0
    """GPUs per worker (0: none, no --gpus line); an item runs as `torchrun --nproc-per-node` this many
    (0 or 1: a plain process). `gpus_for_device` picks it from the run's device."""
    cpus_per_worker: int = 32
    """CPU cores per worker."""
    time: str = "24:00:00"
    """Time limit of one worker (Slurm's --time)."""
    partition: str | None = None
    """Slurm partition (None: the cluster's default)."""
    account: str | None = None
    """Slurm account (None: the user's default)."""
    extra: list[str] = field(default_factory=list)
    """Extra sbatch options, one per #SBATCH line, e.g. "--qos=high"."""
    stale_after: float = 600.0
    """Seconds without a heartbeat before another worker takes an item over."""
    heartbeat: float = 30.0
    """Seconds between heartbeats."""
    poll: float = 10.0
    """Seconds between looks while the remaining items wait on running ones."""

    def __post_init__(self):
        if self.workers < 1 or self.gpus_per_worker < 0 or self.cpus_per_worker < 1:
            raise ConfigError("--slurm: need --workers >= 1, --gpus-per-worker >= 0 and --cpus-per-worker >= 1")
        for opt in self.extra:
            if not opt.startswith("-") or "\n" in opt:
                raise ConfigError(f"--sbatch {opt!r}: expected one sbatch option such as --qos=high")

    def worker_command(self) -> list[str]:
        return [self.python, "-m", "engine.cli", "sweep", str(self.config), "--worker",
                f"--nproc-per-node={max(1, self.gpus_per_worker)}", f"--stale-after={self.stale_after:g}",
                f"--heartbeat={self.heartbeat:g}", f"--poll={self.poll:g}"]


DEFAULT_GPUS = 8  # a CUDA sweep without --gpus-per-worker: one 8-GPU node per worker


def gpus_for_device(device: str, requested: int | None) -> tuple[int, str | None]:
    """GPUs per worker for a sweep whose `run.device` is `device`, and a note for the user, or None.

    The user's `requested` count wins. Otherwise cpu: none; cuda/npu: DEFAULT_GPUS; auto: what this host has
    (engine/distributed.py `detect_device_type`), which on a login node without GPUs means none."""
    if device == "auto":
        from engine.distributed import detect_device_type

        found = detect_device_type("auto")
        if requested is None:
            gpus = 0 if found == "cpu" else DEFAULT_GPUS
            return gpus, (f"run.device=auto found {found} on this host: {gpus} GPUs per worker; pass "
                          "--gpus-per-worker or set run.device if the compute nodes differ")
        return requested, None
    if requested is None:
        if device == "cpu":
            return 0, None
        return DEFAULT_GPUS, (f"run.device={device}: {DEFAULT_GPUS} GPUs per worker (pass --gpus-per-worker "
                              "to change)")
    if device == "cpu" and requested:
        return requested, (f"run.device=cpu: the items will not use the {requested} GPUs per worker asked for "
                           "(leave --gpus-per-worker out to ask for none)")
    return requested, None


def sbatch_script(spec: SlurmSpec) -> str:
    logs = spec.run_dir.resolve() / "slurm"
    directives = [f"--job-name=ceiling-sweep-{spec.run_dir.name}", f"--array=0-{spec.workers - 1}",
                  "--nodes=1", "--ntasks-per-node=1", f"--cpus-per-task={spec.cpus_per_worker}",
                  f"--time={spec.time}", f"--output={logs}/%A_%a.out"]
    if spec.gpus_per_worker:
        directives.append(f"--gpus-per-node={spec.gpus_per_worker}")
    if spec.partition:
        directives.append(f"--partition={spec.partition}")
    if spec.account:
        directives.append(f"--account={spec.account}")
    directives += spec.extra
    lines = ["#!/bin/bash", f"# ceiling sweep workers for {spec.run_dir} (engine/sweep/slurm.py); submit: sbatch <this file>"]
    lines += [f"#SBATCH {shlex.quote(d)}" for d in directives]
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(spec.workdir.resolve()))}",
        'echo "worker ${SLURM_ARRAY_TASK_ID:-0} on $(hostname): job ${SLURM_JOB_ID:-none}"',
        "exec " + " ".join(shlex.quote(a) for a in spec.worker_command()),
        "",
    ]
    return "\n".join(lines)


def write_sbatch(spec: SlurmSpec) -> Path:
    """Write `<run>/sweep.sbatch` (and create the log directory Slurm writes into)."""
    (spec.run_dir / "slurm").mkdir(parents=True, exist_ok=True)
    path = spec.run_dir / "sweep.sbatch"
    path.write_text(sbatch_script(spec))
    path.chmod(0o755)
    return path
