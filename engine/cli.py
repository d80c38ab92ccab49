"""`ceiling`: one subcommand per capability.

    ceiling --help
    ceiling run configs/tiny.yaml                  # SFT -> switch at the Stable sub-phase -> RL -> report
    ceiling sweep configs/sweep-tiny.yaml          # the paper's study in miniature: branches, baselines, fits
    ceiling pretrain configs/pretrain-tiny.yaml    # the tiny base model (facts + direct answers; shipped)
    ceiling fit DATA.json --all --out runs/fit     # Plasticity-Ceiling fits (engine/analysis)
    ceiling flops sft --model-config configs/models/qwen2.5-7b.json --batch-size 512 --mean-seq-len 3771 --steps 360
    ceiling sft configs/sft-tiny.yaml [--set sft.lr=3e-4]
    ceiling rl configs/rl-tiny.yaml [--set rl.algorithm=luffy]
    ceiling eval runs/tiny/hf --benchmarks math500.jsonl --samples 8  # pass@1, pass@k, maj@k
    ceiling export runs/tiny/rl OUT                  # any checkpoint as an HF directory
    ceiling data runs/openr1-tiny                    # the synthetic task as openr1.parquet + math500.jsonl

Each capability module exposes `register(subparsers)`, which adds its parser and sets `func`. Only the module of
the command being run is imported (`ceiling fit` never loads torch); `ceiling --help` imports them all. A
`CeilingError` (bad config, bad data, bad flag) prints `error: ...` and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine import __version__
from engine.errors import CeilingError

# command -> the module whose `register` adds it, in the order `ceiling --help` lists them
COMMANDS = {
    "run": "engine.pipeline", "sweep": "engine.sweep.cli", "pretrain": "engine.pretrain", "sft": "engine.sft",
    "rl": "engine.rl.cli", "eval": "engine.evaluate", "export": "engine.models.export", "flops": "engine.flops",
    "fit": "engine.analysis.cli", "data": "engine.data.public_layouts",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command`'s subcommand only (its module alone is imported), or with all of them."""
    parser = argparse.ArgumentParser(
        prog="ceiling",
        description="ceiling-engine: SFT, RL with verifiable rewards, SFT-then-RL, and Plasticity-Ceiling analysis.",
    )
    parser.add_argument("--version", action="version", version=f"ceiling-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CeilingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
