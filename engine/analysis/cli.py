"""`ceiling fit`: the Plasticity-Ceiling fit of one RL branch or of every branch of a scene.

    ceiling fit DATA.json --branch STEP [--train-start S] [--train-points K] [--outlier-threshold T]
                          [--lts-alpha A] [--free-c0] [--json OUT] [--out DIR]
    ceiling fit DATA.json --all [--out DIR] [same fit options] [--json OUT]
    ceiling fit DATA.json --early-stop [--tol T] [--patience K] [--min-points M] [--min-fraction F] [--span S]
                          [--out DIR] [--outlier-threshold T] [--lts-alpha A] [--free-c0] [--json OUT]

--branch prints a one-line summary (warnings go to stderr) and, with --json, writes the result object
(P_sft, PL_rl, A_post, C_mid, B, C0, r2_train, rmse_val, r2_val, n_train, n_val, n_outliers, ...);
with --out it also draws branch.png. --all prints the Table-4-like table and writes table.md/.csv/.json,
branches.png and a_post.png under --out (default: fit-<scene>). Exit status 0, or 1 when some branch of
--all could not be fitted. --early-stop replays every branch through `early_stop.OnlineCeilingMonitor`
(refit after each evaluation, stop once the last K predicted A_post agree within T points and at least F
of the branch's compute is spent), prints the table (points and EFLOPs used, compute saved, A_post at the
stop vs. the full fit, |error|) and the branch a user would pick against the full sweep's best, and writes
early_stop.md/.json and early_stop.png under --out (default: fit-<scene>); exit 1 when some branch's full
fit failed. Bad input raises `CeilingError` (the main CLI prints it and exits 2).

Without the main CLI: `python -m engine.analysis.cli fit DATA.json --all`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.analysis.data import load_scene
from engine.analysis.early_stop import EarlyStopConfig, decide, replay_scene
from engine.analysis.fit import FitConfig, FitResult, fit_branch, fit_scene
from engine.analysis.report import (
    Row,
    early_stop_markdown,
    markdown_table,
    plot_branches,
    plot_early_stop,
    rows_from,
    write_early_stop_tables,
    write_tables,
)
from engine.errors import CeilingError
from engine.plots import plot_a_post


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `fit` subcommand to an argparse subparsers object; its handler is `args.func`."""
    p = subparsers.add_parser("fit", help="fit the plasticity ceiling of RL branches (A_post = P_sft + PL_rl)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="scene JSON (the RETU curve format)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--branch", type=int, metavar="STEP", help="SFT step of the branch (0: pure RL)")
    which.add_argument("--all", action="store_true", help="fit every branch and write the table and figures")
    which.add_argument("--early-stop", action="store_true",
                       help="replay every branch, refitting after each evaluation, and report when it could "
                            "have stopped (compute saved, A_post error)")
    stop = EarlyStopConfig()
    p.add_argument("--tol", type=float, default=stop.tol, metavar="T",
                   help=f"--early-stop: largest spread of the last K predicted A_post (points, default {stop.tol})")
    p.add_argument("--patience", type=int, default=stop.patience, metavar="K",
                   help=f"--early-stop: consecutive refits that must agree (default {stop.patience})")
    p.add_argument("--min-points", type=int, default=stop.min_points, metavar="M",
                   help=f"--early-stop: points, anchor included, before the first refit (default {stop.min_points})")
    p.add_argument("--min-fraction", type=float, default=stop.min_fraction, metavar="F",
                   help=f"--early-stop: no stop before this fraction of the branch's compute (default {stop.min_fraction})")
    p.add_argument("--span", type=float, default=stop.span, metavar="S",
                   help="--early-stop: the refits within the last S of the compute seen must agree too "
                        f"(default {stop.span})")
    p.add_argument("--train-start", type=int, default=0, metavar="S", help="first train point index (default 0)")
    p.add_argument("--train-points", type=int, default=None, metavar="K",
                   help="number of train points (default: 85%% of the points from S)")
    p.add_argument("--outlier-threshold", type=float, default=2.5, metavar="T",
                   help="modified z-score above which a train point is an outlier (default 2.5)")
    p.add_argument("--lts-alpha", type=float, default=None, metavar="A",
                   help="use least trimmed squares keeping floor(n*A) points (e.g. 0.75, 0.85)")
    p.add_argument("--free-c0", action="store_true", help="fit C0 instead of fixing it at 0")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the result(s) as JSON")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output folder for tables and figures (--all default: fit-<scene>)")
    p.set_defaults(func=main)
    return p


def _config(args) -> FitConfig:
    return FitConfig(train_start=args.train_start, train_points=args.train_points,
                     outlier_threshold=args.outlier_threshold, lts_alpha=args.lts_alpha, free_c0=args.free_c0)


def summary_line(name: str, step: int, f: FitResult) -> str:
    def g(v, d=2):
        return "null" if v is None else f"{v:.{d}f}"
    return (f"{name} step {step}: P_sft={f.P_sft:.2f} PL_rl={f.PL_rl:.2f} A_post={f.A_post:.2f} "
            f"C_mid={f.C_mid:.3g} B={f.B:.3g} C0={f.C0:.3g} | r2_train={g(f.r2_train, 3)} "
            f"rmse_val={g(f.rmse_val)} r2_val={g(f.r2_val, 3)} | n_train={f.n_train} n_val={f.n_val} "
            f"outliers={f.n_outliers} [{f.method}]")


def _write_json(path: Path, obj) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")
    except OSError as e:
        raise CeilingError(f"{path}: cannot write: {e.strerror or e}") from None


def main(args) -> int:
    config = _config(args)
    scene = load_scene(args.data)
    name = args.data.name
    if args.all:
        return _main_all(args, scene, config, name)
    if args.early_stop:
        return _main_early_stop(args, scene, config)
    res = fit_branch(scene.branch(args.branch), config)
    print(summary_line(name, args.branch, res))
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if args.json:
        _write_json(args.json, res.to_dict() | {"scene": scene.name, "file": str(args.data)})
    if args.out:
        row = Row(args.branch, res.sft_exaflops, res)
        print(f"wrote {plot_branches([row], args.out / f'branch_{args.branch}.png', scene.name)}")
    return 0


def _main_all(args, scene, config: FitConfig, name: str) -> int:
    results = fit_scene(scene, config)
    rows = rows_from(results, scene)
    title = f"{scene.name}: ceiling fits ({'LTS alpha=' + str(config.lts_alpha) if config.lts_alpha else 'plain'}" \
            f", outlier threshold {config.outlier_threshold})"
    out = args.out or Path(f"fit-{scene.name}")
    try:
        paths = write_tables(rows, out, title)
        figs = [plot_branches(rows, out / "branches.png", scene.name), plot_a_post(rows, out / "a_post.png", scene.name)]
    except OSError as e:
        raise CeilingError(f"{out}: cannot write: {e.strerror or e}") from None
    print(markdown_table(rows, title), end="")
    if args.json:
        _write_json(args.json, [r.to_dict() for r in rows])
    print("wrote " + ", ".join(str(p) for p in [*paths.values(), *figs]))
    return 1 if any(r.fit is None for r in rows) else 0


def _main_early_stop(args, scene, config: FitConfig) -> int:
    if args.train_start != 0 or args.train_points is not None:
        raise CeilingError("--early-stop fits all the points seen so far: --train-start and --train-points "
                           "do not apply (the full-branch reference uses the default split)")
    stop = EarlyStopConfig(tol=args.tol, patience=args.patience, min_points=args.min_points,
                           min_fraction=args.min_fraction, span=args.span)
    results = replay_scene(scene, stop, config)
    title = (f"{scene.name}: early stop (tol {stop.tol:g}, patience {stop.patience}, min points "
             f"{stop.min_points}, min fraction {stop.min_fraction:g}, span {stop.span:g}; "
             f"{'LTS alpha=' + str(config.lts_alpha) if config.lts_alpha else 'plain'} fits)")
    out = args.out or Path(f"fit-{scene.name}")
    try:
        paths = write_early_stop_tables(results, out, title)
        fig = plot_early_stop(results, out / "early_stop.png", scene.name)
    except OSError as e:
        raise CeilingError(f"{out}: cannot write: {e.strerror or e}") from None
    print(early_stop_markdown(results, title), end="")
    print("\n" + decide(results).summary())
    if args.json:
        _write_json(args.json, [r.to_dict() for r in results])
    print("wrote " + ", ".join(str(p) for p in [*paths.values(), fig]))
    return 1 if any(r.reference is None for r in results) else 0


def _standalone(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ceiling")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CeilingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_standalone())
