"""`ceiling`: one subcommand per capability.

    ceiling --help
    ceiling run configs/tiny.yaml                  # SFT -> switch at the Stable sub-phase -> RL -> report
    ceiling sweep configs/sweep-tiny.yaml          # the paper's study in miniature: branches, baselines, fits
    ceiling pretrain configs/pretrain-tiny.yaml    # the tiny base model (facts + direct answers; shipped)
    ceiling fit DATA.json --all --out runs/fit     # Plasticity-Ceiling fits (engine/analysis)
    ceiling flops sft --model-config configs/models/qwen2.5-7b.json --batch-size 512 --mean-seq-len 3771 --steps 360
    ceiling sft configs/tiny.yaml [--set sft.lr=3e-4]
    ceiling rl configs/rl-tiny.yaml [--set rl.algorithm=luffy]

Each capability module exposes `register(subparsers)`, which adds its parser and sets `func`. A
`CeilingError` (bad config, bad data, bad flag) prints `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from engine import __version__
from engine.errors import CeilingError


def build_parser() -> argparse.ArgumentParser:
    from engine import evaluate, flops, pipeline, pretrain, sft, sweep_cli
    from engine.analysis import cli as analysis_cli
    from engine.rl import cli as rl_cli

    parser = argparse.ArgumentParser(
        prog="ceiling",
        description="ceiling-engine: SFT, RL with verifiable rewards, SFT-then-RL, and Plasticity-Ceiling analysis.",
    )
    parser.add_argument("--version", action="version", version=f"ceiling-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in (pipeline.register, sweep_cli.register, pretrain.register, sft.register, rl_cli.register, evaluate.register, flops.register,
                     analysis_cli.register):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CeilingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
