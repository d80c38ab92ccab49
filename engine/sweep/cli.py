"""The `ceiling sweep` command line: run a sweep in one process, as one of N workers (items as child processes),
as a worker's child (`--run-item`), print its plan, or write a Slurm array. What a sweep is: engine/sweep/items.py."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from engine.config import SweepJobConfig, add_config_arguments
from engine.errors import ConfigError
from engine.rundir.files import write_json_atomic
from engine.sweep import items as sweep_lib
from engine.sweep.items import Sweep
from engine.sweep.worker import Item, LaunchedItem, start_lock_watchdog


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0



def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="SFT checkpoints x RL branches + baselines, ceiling fits, report",
                              description=sweep_lib.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the items, their dependencies and status")
    p.add_argument("--quick", action="store_true", help="apply the config's `quick:` overrides (a smoke check)")
    mode.add_argument("--worker", action="store_true",
                      help="claim and run items (each as a child process) until none is left; run N of these")
    mode.add_argument("--slurm", action="store_true", help="write <run>/sweep.sbatch: an array of --worker jobs")
    mode.add_argument("--run-item", metavar="ITEM", help=argparse.SUPPRESS)  # a worker's child process
    p.add_argument("--record", type=Path, help=argparse.SUPPRESS)  # where --run-item writes the item's record
    w = p.add_argument_group("workers")
    w.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                   help="processes per item (> 1: items run under torchrun --standalone)")
    w.add_argument("--launcher", metavar="CMD",
                   help="command that runs `sweep CONFIG --run-item ITEM --record PATH` for an item (default: "
                        "python -m engine.cli, or torchrun -m engine.cli with --nproc-per-node > 1)")
    w.add_argument("--stale-after", type=float, default=600.0, metavar="S",
                   help="a lock whose heartbeat is older than S seconds is taken over (default 600)")
    w.add_argument("--heartbeat", type=float, default=30.0, metavar="S", help="heartbeat interval (default 30)")
    w.add_argument("--poll", type=float, default=10.0, metavar="S",
                   help="wait between looks while other workers' items run (default 10)")
    w.add_argument("--retry-failed", action="store_true", help="clear failure marks and run those items again")
    w.add_argument("--no-report", action="store_true", help="do not write the report when everything is done")
    s = p.add_argument_group("--slurm")
    s.add_argument("--workers", type=int, default=4, help="array size: workers started at once (default 4)")
    s.add_argument("--gpus-per-worker", type=int, default=None,
                   help="GPUs (and item processes) per worker (default: none for run.device=cpu, 8 for cuda; "
                        "auto: what this host has)")
    s.add_argument("--cpus-per-worker", type=int, default=32,
                   help="CPUs per worker (--cpus-per-task); its item processes use that many threads")
    s.add_argument("--time", default="24:00:00", help="time limit per worker (Slurm format)")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--sbatch", dest="sbatch_args", action="append", default=[], metavar="ARG",
                   help="an extra #SBATCH line, e.g. --sbatch=--qos=high (repeatable)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from engine.jobs import run_job

    status = {"rc": 0}
    if args.quick:
        from engine.config import load_config

        quick = load_config(args.config, SweepJobConfig, args.overrides).quick
        if not quick:
            raise ConfigError(f"{args.config}: --quick needs a `quick:` list of overrides in the config")
        args.overrides = [*quick, *args.overrides]

    def run(job: SweepJobConfig) -> None:
        sweep = Sweep(job, stale_after=args.stale_after)
        if args.plan:
            print(sweep.plan_text(), end="")
        elif args.run_item:
            start_lock_watchdog()  # a worker's child: exit if the worker dies or loses the item's lock
            record = sweep.run_item(args.run_item)
            if args.record is not None and _is_main_rank():
                write_json_atomic(args.record, record)
        elif args.slurm:
            from engine.sweep.slurm import SlurmSpec, gpus_for_device, write_sbatch

            sweep.check_config()
            gpus, note = gpus_for_device(job.run.device, args.gpus_per_worker)
            if note:
                print(f"note: {note}")
            path = write_sbatch(SlurmSpec(
                run_dir=sweep.root, config=sweep.root / "config.yaml", workers=args.workers,
                gpus_per_worker=gpus, cpus_per_worker=args.cpus_per_worker, time=args.time,
                partition=args.partition, account=args.account, extra=args.sbatch_args, workdir=Path.cwd(),
                python=sys.executable, stale_after=args.stale_after, heartbeat=args.heartbeat, poll=args.poll))
            print(f"wrote {path}\nsubmit: sbatch {path}")
        elif args.worker:
            sweep.check_config()
            status["rc"] = _work(sweep, args)
        else:
            state = sweep.run()
            print(f"report: {sweep.root / 'sweep_report.md'}  ({len(state['done'])} items done)")

    run_job(args, SweepJobConfig, run)
    return status["rc"]


def item_command(item: str, config: str, record: Path, nproc_per_node: int = 1, launcher: str | None = None) -> list[str]:
    """The child process of a worker for one item: `--launcher` if given, else python -m engine.cli, or this
    environment's torchrun with nproc_per_node > 1 (the SFT evaluation always runs in one process)."""
    if launcher:
        prefix = shlex.split(launcher)
    elif nproc_per_node > 1 and not item.endswith("/sft_eval"):
        prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
                  "-m", "engine.cli"]
    else:
        prefix = [sys.executable, "-m", "engine.cli"]
    return [*prefix, "sweep", config, "--run-item", item, "--record", str(record)]


def _work(sweep: Sweep, args: argparse.Namespace) -> int:
    """One worker: items run as child processes on `<run>/config.yaml`; the report when all is done."""
    config = str(sweep.root / "config.yaml")

    def command(item: Item, record: Path) -> list[str]:
        return item_command(item.name, config, record, args.nproc_per_node, args.launcher)

    runner = LaunchedItem(sweep.rundir, command, procs=args.nproc_per_node)
    worker = sweep.worker(runner, heartbeat=args.heartbeat, poll=args.poll, retry_failed=args.retry_failed)
    runner.attach(worker)
    result = worker.run()
    print(f"worker {os.getpid()}: ran {len(result.ran)} item(s): {', '.join(result.ran) or '-'}")
    if result.failed or result.blocked:
        print(f"failed: {', '.join(result.failed) or '-'}; blocked: {', '.join(result.blocked) or '-'}",
              file=sys.stderr)
        return 1
    if not args.no_report:
        lock = sweep.rundir.try_claim("report")
        if lock is not None:
            try:
                path = sweep.write_report()
                if path is not None:
                    print(f"report: {path}")
            finally:
                sweep.rundir.release(lock)
    return 0
