"""`ceiling sft CONFIG [--set section.key=value ...]`: supervised fine-tuning (engine/sft/trainer.py)."""

from __future__ import annotations

import argparse

from engine.config import add_config_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("sft", help="supervised fine-tuning on expert trajectories (packed, FSDP2)",
                              description=__doc__)
    add_config_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from engine.config import SFTJobConfig
    from engine.jobs import run_job
    from engine.sft.trainer import run_sft
    return run_job(args, SFTJobConfig, run_sft)
