"""`ceiling rl CONFIG [--set section.key=value ...]`: RL with verifiable rewards (engine/rl/trainer.py)."""

from __future__ import annotations

import argparse

from engine.config import add_config_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("rl", help="RL with verifiable rewards: GRPO, DAPO, LUFFY, SRFT, UPT",
                              description=__doc__)
    add_config_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from engine.config import RLJobConfig
    from engine.jobs import run_job
    from engine.rl.trainer import run_rl

    return run_job(args, RLJobConfig, run_rl)
