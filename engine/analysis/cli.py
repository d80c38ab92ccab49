"""`ceiling fit`: the Plasticity-Ceiling fit of one RL branch or of every branch of a scene.

    ceiling fit DATA.json --branch STEP [--train-start S] [--train-points K] [--outlier-threshold T]
                          [--lts-alpha A] [--free-c0] [--json OUT] [--out DIR]
    ceiling fit DATA.json --all [--out DIR] [same fit options] [--json OUT]
    ceiling fit DATA.json --early-stop [--k K] [--min-se S] [--margin M] [--race-min-fraction F] [--slices N]
                          [--per-branch] [--tol T] [--patience K] [--min-points M] [--min-fraction F] [--span S]
                          [--out DIR] [--outlier-threshold T] [--lts-alpha A] [--free-c0] [--json OUT]

--branch prints a one-line summary (warnings go to stderr) and, with --json, writes the result object
(P_sft, PL_rl, A_post, C_mid, B, C0, r2_train, rmse_val, r2_val, n_train, n_val, n_outliers, ...);
with --out it also draws branch.png. --all prints the Table-4-like table and writes table.md/.csv/.json,
branches.png and a_post.png under --out (default: fit-<scene>). Exit status 0, or 1 when some branch of
--all could not be fitted. --early-stop replays the scene as a sweep running its branches side by side
(`race_replay.replay_race`: N slices of compute, the comparing rule `race.decide` after each: a branch whose
optimistic ceiling A_post + K max(SE, S) falls below the leader's pessimistic one, plus M, once it has run F
of its plan, stops; the rest run until the per-branch rule settles them), prints per branch the compute
used and why it ended, and per scene the branch picked, its gap to the full sweep's best and the compute
saved, and writes early_stop.md/.json under --out (default: fit-<scene>). --per-branch replays every branch
alone through `early_stop.OnlineCeilingMonitor` instead (stop once the last K predicted A_post agree within
T points and at least F of the branch's compute is spent) and also draws early_stop.png. The per-branch
flags set the per-branch rule in both modes (its floor F defaults to 0.65 under the comparing rule, 0.55
alone). Exit 1 when some branch's full fit failed. Bad input raises `CeilingError` (the main CLI prints it
and exits 2).

Without the main CLI: `python -m engine.analysis.cli fit DATA.json --all`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.analysis.data import load_scene
from engine.analysis.early_stop import EarlyStopConfig, decide, replay_scene
from engine.analysis.fit import FitConfig, FitResult, fit_branch, fit_scene
from engine.analysis.race import RaceConfig
from engine.analysis.race_replay import race_markdown, replay_race
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
from engine.rundir.files import write_json_atomic


def register(subparsers) -> argparse.ArgumentParser:
    """Add the `fit` subcommand to an argparse subparsers object; its handler is `args.func`."""
    p = subparsers.add_parser("fit", help="fit the plasticity ceiling of RL branches (A_post = P_sft + PL_rl)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="scene JSON (the RETU curve format)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--branch", type=int, metavar="STEP", help="SFT step of the branch (0: pure RL)")
    which.add_argument("--all", action="store_true", help="fit every branch and write the table and figures")
    which.add_argument("--early-stop", action="store_true",
                       help="replay the scene's branches side by side under the comparing rule and report "
                            "the compute each used, why it stopped, the branch picked and the compute saved")
    race, stop = RaceConfig(), EarlyStopConfig()
    p.add_argument("--per-branch", action="store_true",
                   help="--early-stop: replay each branch alone under the per-branch rule instead")
    p.add_argument("--k", type=float, default=race.k, metavar="K",
                   help=f"--early-stop: standard errors on each side of A_post (default {race.k:g})")
    p.add_argument("--min-se", type=float, default=race.min_se, metavar="S",
                   help=f"--early-stop: floor on the SE in the bounds, points (default {race.min_se:g})")
    p.add_argument("--margin", type=float, default=race.margin, metavar="M",
                   help=f"--early-stop: points added to the leader's lower bound (default {race.margin:g})")
    p.add_argument("--race-min-fraction", type=float, default=race.min_fraction, metavar="F",
                   help="--early-stop: no stop by the comparison before this fraction of a branch's plan "
                        f"(default {race.min_fraction:g})")
    p.add_argument("--slices", type=int, default=20, metavar="N",
                   help="--early-stop: decision points, equal steps of compute up to the longest plan (default 20)")
    p.add_argument("--tol", type=float, default=stop.tol, metavar="T",
                   help=f"per-branch rule: largest spread of the last K predicted A_post (points, default {stop.tol})")
    p.add_argument("--patience", type=int, default=stop.patience, metavar="K",
                   help=f"per-branch rule: consecutive refits that must agree (default {stop.patience})")
    p.add_argument("--min-points", type=int, default=stop.min_points, metavar="M",
                   help=f"per-branch rule: points, anchor included, before the first refit (default {stop.min_points})")
    p.add_argument("--min-fraction", type=float, default=None, metavar="F",
                   help="per-branch rule: no stop before this fraction of the branch's compute (default "
                        f"{race.per_branch.min_fraction:g} under the comparing rule, {stop.min_fraction:g} with --per-branch)")
    p.add_argument("--span", type=float, default=stop.span, metavar="S",
                   help="per-branch rule: the refits within the last S of the compute seen must agree too "
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
        write_json_atomic(path, obj, indent=2, allow_nan=False)
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
    floor = args.min_fraction
    if floor is None:
        floor = EarlyStopConfig().min_fraction if args.per_branch else RaceConfig().per_branch.min_fraction
    stop = EarlyStopConfig(tol=args.tol, patience=args.patience, min_points=args.min_points,
                           min_fraction=floor, span=args.span)
    if not args.per_branch:
        return _main_race(args, scene, config, stop)
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


def _main_race(args, scene, config: FitConfig, stop: EarlyStopConfig) -> int:
    race = RaceConfig(k=args.k, min_se=args.min_se, margin=args.margin, min_fraction=args.race_min_fraction,
                      per_branch=stop, fit=config)
    res = replay_race(scene, race, slices=args.slices)
    title = (f"{scene.name}: branches side by side in {args.slices} slices (k {race.k:g}, min SE {race.min_se:g}, "
             f"margin {race.margin:g}, min fraction {race.min_fraction:g}; per-branch tol {stop.tol:g}, patience "
             f"{stop.patience}, min fraction {stop.min_fraction:g}; "
             f"{'LTS alpha=' + str(config.lts_alpha) if config.lts_alpha else 'plain'} fits)")
    text = race_markdown(res, title)
    out = args.out or Path(f"fit-{scene.name}")
    paths = [out / "early_stop.md", out / "early_stop.json"]
    try:
        out.mkdir(parents=True, exist_ok=True)
        paths[0].write_text(text)
    except OSError as e:
        raise CeilingError(f"{out}: cannot write: {e.strerror or e}") from None
    _write_json(paths[1], res.to_dict())
    print(text, end="")
    if args.json:
        _write_json(args.json, res.to_dict())
    print("wrote " + ", ".join(str(p) for p in paths))
    return 1 if any(r.a_post_full is None for r in res.rows) else 0


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
