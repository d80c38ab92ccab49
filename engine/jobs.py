"""Run a config-driven job: load CONFIG (+ `--set` overrides) into its dataclass, run it, tear down.

    return run_job(args, SFTJobConfig, run_sft)      # in a subcommand's `main(args)`

Shared by `ceiling sft`, `ceiling rl`, `ceiling run` and `ceiling sweep`; it sits below engine/cli.py so
that the capability modules never import the CLI entry point.
"""

from __future__ import annotations

import argparse
import logging


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


def run_job(args: argparse.Namespace, job_cls, runner) -> int:
    """Load `args.config` (+ `args.overrides`) into `job_cls`, run `runner(job)`, and tear the process group down."""
    from engine.config import load_config
    from engine.config.jobs import check_inputs
    from engine.distributed import destroy_distributed

    setup_logging()
    job = load_config(args.config, job_cls, args.overrides)
    check_inputs(job, args.config)
    try:
        runner(job)
    finally:
        destroy_distributed()
    return 0
