"""Early stopping measured on what a sweep user decides, over every released RETU scene.

    python benchmarks/bench_early_stop.py                    # print every table (about an hour on 2 shared cores)
    python benchmarks/bench_early_stop.py --only race        # the comparing rule only (its noise test is most of it)
    python benchmarks/bench_early_stop.py --only race --seeds 5 --seeds-compare 2     # a quick look
    python benchmarks/bench_early_stop.py --append           # ... and append the tables to benchmarks/RESULTS.md

Data: the five scenes in tests/data/retu/ (general = SFT889K, easy102K, hard102K, uniform102K, s1K). A branch's
plan is the branch as released. 'Picked right' means the branch a rule picks has a full-branch A_post (the
default 85% split fit) within 1 point of the best full-branch A_post of the scene.

Per-branch rule (engine/analysis/early_stop.py; `--only per-branch`): every RL branch replayed alone. Per scene
and rule: (a) best branch picked: the best A_post at the stop (the full fit where a branch never stopped);
(b) RL compute saved: 1 - sum of x_stop / sum of x_total; (c) |A_post error| of the stopped branches.
Rules: the previous default (tol 0.5, patience 3), a compute-span window, stopping at a fixed fraction of the
plan, and the tuned default, tuned leave-one-scene-out: for each scene, the grid point that picks right in
the four others with the most RL compute saved there is scored on the scene left out. Each branch's refits
are computed once and every rule is judged on them with `early_stop.stable_at`; the tuned default's table is
computed again through `replay_scene` and must agree.

Comparing rule (engine/analysis/race.py, replayed by race_replay.py; `--only race`): a scene's branches run side
by side in 20 slices of compute; per scene the branch picked, its gap, the compute saved and how branches
ended. Leave-one-scene-out over a grid of (k, min_se, margin, min fraction, per-branch floor) on the
noiseless curves; the rules a right branch would allow (when a right branch starts to lead the fits for
good); and the noise test: every evaluation (the start too) plus N(0, sigma^2), sigma = 0.5 points, the
same draws for every rule (seed, scene), judged against the noiseless full fits, beside the per-branch
default and the full sweep fitted on the same noisy curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import scipy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.analysis import Branch, FitError, fit_branch, load_scene  # noqa: E402
from engine.analysis.early_stop import (  # noqa: E402
    EarlyStopConfig,
    decide,
    refit,
    replay_branch,
    replay_scene,
    stable_at,
)
from engine.analysis.race import RaceConfig  # noqa: E402
from engine.analysis.race_replay import replay_race  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "retu"  # the vendored copy of the paper's curves
SCENES = ("general", "easy102K", "hard102K", "uniform102K", "s1K")
GRID = [EarlyStopConfig(tol=t, patience=k, min_points=6, span=s, min_fraction=f)
        for t, k, s, f in itertools.product((0.5, 1.0, 1.5, 2.0, 3.0), (3, 5), (0.0, 0.3, 0.5),
                                             (0.0, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6))]
NAMED = {
    "previous default: tol 0.5, patience 3": EarlyStopConfig(tol=0.5, patience=3, min_points=6, min_fraction=0.0),
    "compute span 0.5 (tol 0.5, patience 3)": EarlyStopConfig(tol=0.5, patience=3, min_points=6, span=0.5,
                                                             min_fraction=0.0),
    "fixed: stop at 50% of the plan": EarlyStopConfig(tol=1e9, patience=1, min_points=6, min_fraction=0.5),
    "fixed: stop at 60% of the plan": EarlyStopConfig(tol=1e9, patience=1, min_points=6, min_fraction=0.6),
    "tuned default: tol 1, patience 3, >= 55% of the plan": EarlyStopConfig(),
}


def all_refits(scene) -> list:
    """Per branch, the replay with a refit after every evaluation and no stop (the rules are applied later)."""
    never = EarlyStopConfig(tol=0.0, patience=10**6, min_points=4, min_fraction=0.0)
    return [replay_branch(scene.branch(step), never) for step in scene.steps]


def apply(results: list, config: EarlyStopConfig) -> list:
    """The same branches as if replayed under `config` (the refits do not depend on it)."""
    out = []
    for r in results:
        stop = next((i for i in range(len(r.trajectory)) if stable_at(r.trajectory, i, config)), None)
        stop_index = None if stop is None else r.trajectory[stop].index
        out.append(dataclasses.replace(
            r, config=config, stop_index=stop_index, x_stop=r.x_total if stop is None else r.trajectory[stop].x,
            a_post_stop=None if stop is None else r.trajectory[stop].a_post))
    return out


def score(decisions: dict, scenes) -> tuple[bool, float]:
    """All scenes picked right, and the RL compute saved over them together."""
    ok = all(decisions[s][0].ok for s in scenes)
    spent = sum(decisions[s][1] for s in scenes)
    total = sum(decisions[s][2] for s in scenes)
    return ok, 1.0 - spent / total


def evaluate(cache: dict, config: EarlyStopConfig) -> dict:
    out = {}
    for name, results in cache.items():
        rs = apply(results, config)
        out[name] = (decide(rs), sum(r.x_stop for r in rs), sum(r.x_total for r in rs))
    return out


def row(name: str, d, n_branches: int) -> str:
    errs = d.errors
    med = f"{np.median(errs):.2f}" if errs else "-"
    mx = f"{max(errs):.2f}" if errs else "-"
    pick = "yes" if d.ok else "NO"
    detail = f"{d.picked} vs {d.best}" + ("" if d.picked == d.best else f" ({d.best_full - d.picked_full:+.2f})")
    return f"| {name} | {n_branches} | {pick} | {detail} | {100 * d.saved:.1f}% | {med} | {mx} |"


HEAD = ("| scene | branches | best branch picked | picked vs best SFT step (gap) | RL compute saved | "
        "median abs. A_post error | max abs. A_post error |\n| --- | ---: | --- | --- | ---: | ---: | ---: |")


def per_branch_sections(scenes: dict) -> list[str]:
    """The per-branch rule's tables (each branch replayed alone)."""
    cache = {name: all_refits(scene) for name, scene in scenes.items()}
    n = {name: len(scene.steps) for name, scene in scenes.items()}
    sections = []
    tuned = EarlyStopConfig()
    live = {name: replay_scene(scene, tuned) for name, scene in scenes.items()}  # through the monitor itself
    ev = evaluate(cache, tuned)
    for name in SCENES:
        a, b = decide(live[name]), ev[name][0]
        assert (a.picked, a.saved, a.errors) == (b.picked, b.saved, b.errors), f"{name}: replay and cache disagree"
    lines = [HEAD] + [row(s, ev[s][0], n[s]) for s in SCENES]
    ok, saved = score(ev, SCENES)
    sections.append(f"Tuned default (tol {tuned.tol:g}, patience {tuned.patience}, min points {tuned.min_points}, "
                    f"min fraction {tuned.min_fraction:g}, span {tuned.span:g}), replayed through the monitor:\n\n"
                    + "\n".join(lines) + f"\n\nAll scenes picked right: {'yes' if ok else 'no'}; RL compute saved over "
                    f"all scenes: {100 * saved:.1f}%.")

    lines = ["| rule | best branch picked (scenes) | RL saved, all scenes | RL saved, worst scene | "
             "median abs. error | max abs. error |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, cfg in NAMED.items():
        e = evaluate(cache, cfg)
        errs = [x for s in SCENES for x in e[s][0].errors]
        picked = [s for s in SCENES if e[s][0].ok]
        lines.append(f"| {label} | {len(picked)}/5 {'' if len(picked) == 5 else '(misses ' + ', '.join(s for s in SCENES if s not in picked) + ')'} | "
                     f"{100 * score(e, SCENES)[1]:.1f}% | {100 * min(e[s][0].saved for s in SCENES):.1f}% | "
                     f"{np.median(errs):.2f} | {max(errs):.2f} |")
    sections.append("Rules compared (each judged on the same refits):\n\n" + "\n".join(lines))

    fractions = [round(0.05 * i, 2) for i in range(1, 20)]
    fixed = {f: evaluate(cache, EarlyStopConfig(tol=1e9, patience=1, min_points=6, min_fraction=f)) for f in fractions}
    lines = ["| scene | " + " | ".join(f"{f:g}" for f in fractions) + " |", "| --- |" + " :-: |" * len(fractions)]
    for s in SCENES:
        lines.append(f"| {s} | " + " | ".join("Y" if fixed[f][s][0].ok else "." for f in fractions) + " |")
    need = {s: next((f for i, f in enumerate(fractions) if all(fixed[g][s][0].ok for g in fractions[i:])), 1.0)
            for s in SCENES}
    sections.append("Why 50% saved and the right branch everywhere is out of reach: stopping every branch at a "
                    "fixed fraction F of its plan (Y: the right branch is picked). The right pick holds from F = "
                    + ", ".join(f"{need[s]:g} ({s})" for s in SCENES) + ": the best branch of s1K (SFT step 62) "
                    "stays flat until about 55% of its compute and then rises, so no rule that sees only a "
                    "branch's own curve can tell it apart earlier.\n\n" + "\n".join(lines))

    grid = {cfg: evaluate(cache, cfg) for cfg in GRID}
    lines = ["| held-out scene | chosen on the other four (tol, patience, span, min fraction) | other four: all "
             "right, saved | held-out: best branch picked | held-out: RL saved |",
             "| --- | --- | --- | --- | ---: |"]
    for held in SCENES:
        train = [s for s in SCENES if s != held]
        cfg = max(GRID, key=lambda c: score(grid[c], train))
        ok_t, saved_t = score(grid[cfg], train)
        d = grid[cfg][held][0]
        lines.append(f"| {held} | {cfg.tol:g}, {cfg.patience}, {cfg.span:g}, {cfg.min_fraction:g} | "
                     f"{'yes' if ok_t else 'no'}, {100 * saved_t:.1f}% | {'yes' if d.ok else 'NO'} | {100 * d.saved:.1f}% |")
    best_all = max(GRID, key=lambda c: score(grid[c], SCENES))
    four = [c for c in GRID if sum(grid[c][s][0].ok for s in SCENES) >= 4]
    best_four = max(four, key=lambda c: score(grid[c], SCENES)[1]) if four else None
    note = (f"Over all five scenes the grid's best rule that picks right everywhere is tol {best_all.tol:g}, patience "
            f"{best_all.patience}, span {best_all.span:g}, min fraction {best_all.min_fraction:g} "
            f"({100 * score(grid[best_all], SCENES)[1]:.1f}% saved)")
    if best_four is not None:
        missed = [s for s in SCENES if not grid[best_four][s][0].ok]
        note += (f"; the most saving rule that picks right in four scenes saves "
                 f"{100 * score(grid[best_four], SCENES)[1]:.1f}% (tol {best_four.tol:g}, patience {best_four.patience}, "
                 f"span {best_four.span:g}, min fraction {best_four.min_fraction:g}; misses {', '.join(missed) or '-'})")
    sections.append(f"Leave-one-scene-out tuning over {len(GRID)} rules (tol x patience x span x min fraction):\n\n"
                    + "\n".join(lines) + "\n\n" + note + ".")
    return sections


# ---- the comparing rule -----------------------------------------------------------------------------

RACE_GRID = [RaceConfig(k=k, min_se=m, margin=g, min_fraction=f, per_branch=EarlyStopConfig(min_fraction=p))
             for k, m, g, f, p in itertools.product((1.0, 2.0), (0.5, 1.0), (-0.5, 0.0, 0.5), (0.0, 0.3),
                                                    (0.55, 0.6, 0.65))]


def _rule(c: RaceConfig) -> str:
    return (f"k {c.k:g}, min SE {c.min_se:g}, margin {c.margin:g}, min fraction {c.min_fraction:g}, "
            f"per-branch floor {c.per_branch.min_fraction:g}")


def race_all(scenes: dict, cfg: RaceConfig, refs: dict) -> dict:
    return {s: replay_race(scene, cfg, reference=refs[s]) for s, scene in scenes.items()}


def race_score(res: dict, names) -> tuple[bool, float]:
    """All of `names` picked right, and the RL compute saved over them together."""
    used, planned = sum(res[s].used for s in names), sum(res[s].planned for s in names)
    return all(res[s].ok for s in names), 1.0 - used / planned


def leads_for_good(scene, refs: dict, points: int = 40) -> tuple[float | None, int | None]:
    """The compute (on a grid of the longest plan) from which a branch within 1 point of the best full A_post
    has the highest A_post of the fits seen, at every later grid point; and that branch."""
    best = max(v for v in refs.values() if v is not None)
    right = {s for s, v in refs.items() if v is not None and v >= best - 1}
    curves = {s: np.column_stack([scene.branch(s).x, scene.branch(s).p_sft + scene.branch(s).y]) for s in scene.steps}
    top = max(c[-1, 0] for c in curves.values())
    grid = top * np.arange(1, points + 1) / points
    leaders = []
    for x in grid:
        est = {}
        for s, c in curves.items():
            n = int(np.searchsorted(c[:, 0], x, side="right"))
            fit, _ = refit(np.column_stack([c[:n, 0], c[:n, 1] - c[0, 1]]), c[0, 1], 6, RaceConfig().fit)
            if fit is not None:
                est[s] = fit.A_post
        leaders.append(max(est, key=est.get) if est else None)
    i = next((i for i in range(points) if all(lead in right for lead in leaders[i:])), None)
    return (None, None) if i is None else (float(grid[i]), leaders[i])


def noisy(scene, sigma: float, rng) -> object:
    """The scene with every evaluation, the start included, plus N(0, sigma^2) points."""
    branches = {}
    for s, b in scene.branches.items():
        score = b.p_sft + b.y + rng.normal(0.0, sigma, len(b.y))
        branches[s] = Branch(b.sft_step, b.sft_exaflops, float(score[0]), b.x, score - score[0])
    return dataclasses.replace(scene, branches=branches)


def noise_runs(scenes: dict, refs: dict, sigma: float, seeds: int, rule: tuple, jobs: int = 1) -> dict:
    """Per scene, over `seeds` noisy copies: the share picked right (vs the noiseless full fits), the mean
    compute saved. `rule`: ("race", RaceConfig) | ("per-branch", None) | ("full", None); `jobs` processes."""
    tasks = [(name, i, seed) for i, name in enumerate(scenes) for seed in range(seeds)]
    args = [(scenes[name], refs[name], sigma, (seed, i), rule) for name, i, seed in tasks]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_noise_one, args, chunksize=4))
    else:
        results = [_noise_one(a) for a in args]
    out = {}
    for name in scenes:
        best = max(v for v in refs[name].values() if v is not None)
        mine = [(picked, sv) for (n, _, _), (picked, sv) in zip(tasks, results) if n == name]
        right = [p is not None and refs[name].get(p) is not None and refs[name][p] >= best - 1 for p, _ in mine]
        out[name] = (float(np.mean(right)), float(np.mean([sv for _, sv in mine])))
    return out


def _noise_one(a) -> tuple[int | None, float]:
    scene, ref, sigma, key, (kind, cfg) = a
    noisy_scene = noisy(scene, sigma, np.random.default_rng(list(key)))
    if kind == "race":
        return _pick_saved(replay_race(noisy_scene, cfg, reference=ref))
    return (_per_branch_rule if kind == "per-branch" else _full_sweep)(noisy_scene, ref)


def _per_branch_rule(scene, ref):
    d = decide(replay_scene(scene, to_end=False))
    return d.picked, d.saved


def _full_sweep(scene, ref):
    est = {}
    for s in scene.steps:
        try:
            est[s] = fit_branch(scene.branch(s)).A_post
        except FitError:
            pass
    return (max(est, key=est.get) if est else None), 0.0


def race_sections(scenes: dict, sigma: float, seeds: int, seeds_compare: int, grid_rules: bool = True,
                  jobs: int = 1) -> list[str]:
    refs = {}
    for name, scene in scenes.items():
        refs[name] = {}
        for s in scene.steps:
            try:
                refs[name][s] = fit_branch(scene.branch(s)).A_post
            except FitError:
                refs[name][s] = None
    sections = []
    default = RaceConfig()
    res = race_all(scenes, default, refs)
    lines = ["| scene | branches | picked vs best SFT step (gap) | picked right | RL compute saved | dominated / "
             "settled / ran the plan | resumed | abs. A_post error of the pick |",
             "| --- | ---: | --- | --- | ---: | --- | ---: | ---: |"]
    for s in SCENES:
        r = res[s]
        why = [row.decision.why for row in r.rows]
        gap = "" if r.picked == r.best else f" ({r.gap:+.2f})"
        lines.append(f"| {s} | {len(r.rows)} | {r.picked} vs {r.best}{gap} | {'yes' if r.ok else 'NO'} | "
                     f"{100 * r.saved:.1f}% | {why.count('dominated')} / {why.count('settled')} / {why.count('plan')} | "
                     f"{sum(row.resumes for row in r.rows)} | {r.error:.2f} |")
    ok, saved = race_score(res, SCENES)
    sections.append(f"Comparing rule, default ({_rule(default)}; per-branch tol {default.per_branch.tol:g}, patience "
                    f"{default.per_branch.patience}), 20 slices:\n\n" + "\n".join(lines)
                    + f"\n\nAll scenes picked right: {'yes' if ok else 'no'}; RL compute saved over all scenes: "
                    f"{100 * saved:.1f}%.")

    if grid_rules:
        sections += grid_sections(scenes, refs)
    t = time.time()
    rows = {f"comparing rule, default ({seeds} seeds)": noise_runs(scenes, refs, sigma, seeds, ("race", default), jobs)}
    if grid_rules:
        grid = {cfg: race_all(scenes, cfg, refs) for cfg in RACE_GRID}  # cached fits: cheap the second time
        fast = max((c for c in RACE_GRID if race_score(grid[c], SCENES)[0]),
                   key=lambda c: race_score(grid[c], SCENES)[1])
        rows[f"comparing rule, most saving noiseless 5/5 rule ({_rule(fast)}; {seeds_compare} seeds)"] = noise_runs(
            scenes, refs, sigma, seeds_compare, ("race", fast), jobs)
    if seeds_compare:
        rows[f"per-branch rule, default ({seeds_compare} seeds)"] = noise_runs(
            scenes, refs, sigma, seeds_compare, ("per-branch", None), jobs)
        rows[f"full sweep, every branch fitted to its end ({seeds_compare} seeds)"] = noise_runs(
            scenes, refs, sigma, seeds_compare, ("full", None), jobs)
    lines = ["| rule | " + " | ".join(SCENES) + " | all scenes |", "| --- |" + " ---: |" * (len(SCENES) + 1)]
    for label, r in rows.items():
        planned = {s: sum(float(b.x[-1]) for b in scenes[s].branches.values()) for s in SCENES}
        total = sum(planned[s] * r[s][1] for s in SCENES) / sum(planned.values())
        lines.append(f"| {label} | " + " | ".join(f"{100 * r[s][0]:.0f}% ({100 * r[s][1]:.0f}%)" for s in SCENES)
                     + f" | {100 * np.mean([r[s][0] for s in SCENES]):.0f}% ({100 * total:.1f}%) |")
    sections.append(f"Noise: every evaluation plus N(0, {sigma:g}^2) points; picked right in % of the replays "
                    f"(mean RL compute saved) against the noiseless full fits ({time.time() - t:.0f} s):\n\n"
                    + "\n".join(lines))
    return sections


def grid_sections(scenes: dict, refs: dict) -> list[str]:
    """Leave-one-scene-out over RACE_GRID on the noiseless curves, and the bound on what any rule can save."""
    sections = []
    grid = {cfg: race_all(scenes, cfg, refs) for cfg in RACE_GRID}
    lines = ["| held-out scene | chosen on the other four | other four: all right, saved | held-out: picked right | "
             "held-out: RL saved |", "| --- | --- | --- | --- | ---: |"]
    for held in SCENES:
        train = [s for s in SCENES if s != held]
        cfg = max(RACE_GRID, key=lambda c: race_score(grid[c], train))
        ok_t, saved_t = race_score(grid[cfg], train)
        r = grid[cfg][held]
        lines.append(f"| {held} | {_rule(cfg)} | {'yes' if ok_t else 'no'}, {100 * saved_t:.1f}% | "
                     f"{'yes' if r.ok else 'NO'} | {100 * r.saved:.1f}% |")
    floors = []
    for p in (0.55, 0.6, 0.65):
        cands = [c for c in RACE_GRID if c.per_branch.min_fraction == p and race_score(grid[c], SCENES)[0]]
        if cands:
            c = max(cands, key=lambda c: race_score(grid[c], SCENES)[1])
            floors.append(f"per-branch floor {p:g}: {100 * race_score(grid[c], SCENES)[1]:.1f}% ({_rule(c)})")
        else:
            floors.append(f"per-branch floor {p:g}: no rule right in all five")
    sections.append(f"Comparing rule, leave-one-scene-out over {len(RACE_GRID)} rules on the noiseless curves:\n\n"
                    + "\n".join(lines) + "\n\nThe most saving grid rule right in all five scenes, per per-branch "
                    "floor: " + "; ".join(floors) + ".")

    lines = ["| scene | right branches (full A_post within 1 point of the best) | a right branch leads the fits "
             "for good from | saving if every other branch stopped there |", "| --- | --- | --- | ---: |"]
    for s in SCENES:
        x, lead = leads_for_good(scenes[s], refs[s])
        best = max(v for v in refs[s].values() if v is not None)
        right = sorted(k for k, v in refs[s].items() if v is not None and v >= best - 1)
        if x is None:
            lines.append(f"| {s} | {right} | never (a branch more than 1 point worse leads at the end) | - |")
            continue
        plans = {k: float(scenes[s].branch(k).x[-1]) for k in scenes[s].steps}
        used = sum(min(v, x) for k, v in plans.items() if k != lead) + max(x, 0.55 * plans[lead])
        top = max(plans.values())
        lines.append(f"| {s} | {right} | {x:.1f} EFLOPs ({100 * x / top:.0f}% of the longest plan; step {lead}) | "
                     f"{100 * (1 - used / sum(plans.values())):.1f}% |")
    sections.append("Why 60% saved is out of reach on these scenes: the fits do not single out a right branch "
                    "before 30-45% of the longest plan (the late risers: step 62 of s1K, 1080 of uniform102K and "
                    "hard102K), so even a rule told that moment, which stopped every other branch there and the "
                    "right one at 55% of its plan, would save about half the compute:\n\n" + "\n".join(lines))

    return sections


def _pick_saved(r) -> tuple[int | None, float]:
    return r.picked, r.saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder of the RETU scene JSON files")
    ap.add_argument("--only", choices=("all", "per-branch", "race"), default="all", help="which rule's tables")
    ap.add_argument("--sigma", type=float, default=0.5, help="noise of one evaluation, points (default 0.5)")
    ap.add_argument("--seeds", type=int, default=50, help="noisy replays per scene of the default rule (default 50)")
    ap.add_argument("--seeds-compare", type=int, default=20,
                    help="noisy replays per scene of the other rules in the noise table (default 20)")
    ap.add_argument("--no-grid", action="store_true",
                    help="skip the leave-one-scene-out grid of the comparing rule (most of the run time)")
    ap.add_argument("--jobs", type=int, default=1, help="processes for the noisy replays (default 1)")
    ap.add_argument("--append", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = ap.parse_args()
    t0 = time.time()
    scenes = {name: load_scene(args.data / f"{name}.json") for name in SCENES}
    sections = []
    if args.only in ("all", "per-branch"):
        sections += per_branch_sections(scenes)
    if args.only in ("all", "race"):
        sections += race_sections(scenes, args.sigma, args.seeds, args.seeds_compare, not args.no_grid, args.jobs)
    elapsed = time.time() - t0
    text = "\n\n".join(sections)
    print(text)
    print(f"\n(total {elapsed:.0f} s)")
    if args.append:
        argv = " ".join(sys.argv[1:])
        header = (f"\n## Early stopping judged by the branch a user picks (benchmarks/bench_early_stop.py) — "
                  f"{time.strftime('%Y-%m-%d')}\n\n"
                  f"Command: `python benchmarks/bench_early_stop.py {argv}` (CPU, 2 shared cores; numpy "
                  f"{np.__version__}, scipy {scipy.__version__}, Python {platform.python_version()}; {elapsed:.0f} s). "
                  f"Data: the five released RETU scenes in tests/data/retu/. A branch's plan is the branch as "
                  f"released; 'picked right' means the picked branch's full-branch A_post is within 1 point of "
                  f"the scene's best.\n\n")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(header + text + "\n")
        print("appended to benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
