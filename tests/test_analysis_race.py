"""The comparing early-stop rule (engine/analysis/race.py): synthetic branches whose answer is known, no use of
future points, sticky stops, and the replay of a released scene through `ceiling fit --early-stop`."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from engine.analysis import Branch, Scene, sigmoid
from engine.analysis.cli import register
from engine.analysis.early_stop import RefitCache
from engine.analysis.race import (
    CONTENDER,
    DOMINATED,
    LEADER,
    NOT_IDENTIFIED,
    PLAN,
    SETTLED,
    BranchRace,
    CompareConfig,
    decide_branches,
    replay_race,
)
from engine.errors import CeilingError

RETU = Path(__file__).resolve().parents[1].parent / "shared/data/retu"
needs_retu = pytest.mark.skipif(not RETU.is_dir(), reason=f"RETU curves not found at {RETU}")

N, X_MAX = 20, 40.0


def gains(fn, noise=0.15, seed=0, n=N, x_max=X_MAX):
    x = np.linspace(x_max / n, x_max, n)
    return x, fn(x) + np.random.default_rng(seed).normal(0, noise, n)


def make_scene(spec: dict[int, tuple[float, object]], seed=0) -> Scene:
    """Branches keyed by SFT step: (P_sft, gain(x)), N evaluations up to X_MAX plus the anchor."""
    branches = {}
    for i, (step, (p_sft, fn)) in enumerate(spec.items()):
        x, y = gains(fn, seed=seed + i)
        branches[step] = Branch(step, float(step), p_sft, np.r_[0.0, x], np.r_[0.0, y])
    return Scene("synthetic", None, {"a": 1.0}, np.array([0.0]), np.array([70.0]), dict(sorted(branches.items())))


def curve(p_sft, fn, upto=None, seed=0):
    """A live sweep's curve: the checkpoint's evaluation at x = 0, then absolute scores."""
    x, y = gains(fn, seed=seed)
    pts = [(0.0, p_sft)] + [(float(a), float(p_sft + b)) for a, b in zip(x, y)]
    return pts if upto is None else [p for p in pts if p[0] <= upto]


WIN = (70.0, lambda x: sigmoid(x, 12.0, 6.0, 1.5))  # ceiling 82
TIE = (70.8, lambda x: sigmoid(x, 10.7, 6.0, 1.5))  # 81.5: within the 1-point margin
LOSE = (70.0, lambda x: sigmoid(x, 4.0, 4.0, 1.5))  # 74
FLAT = (70.0, lambda x: 0.0 * x)  # RL has not moved it (yet)


def test_clearly_losing_branch_stops_early_winner_and_near_tie_run_on():
    scene = make_scene({100: WIN, 200: TIE, 300: LOSE})
    res = replay_race(scene)
    by = {r.sft_step: r for r in res.results}
    assert by[300].stop_kind == DOMINATED and by[300].saved > 0.5, by[300].stop_reason
    assert by[300].x_stop < 0.5 * X_MAX and by[300].stop_reason.startswith(("dominated by 100", "dominated by 200"))
    for step in (100, 200):  # the winner and the near-tie end by the per-branch rule or the plan, never dominated
        assert by[step].stop_kind in (SETTLED, PLAN), by[step].stop_reason
        assert all(v[step].kind != DOMINATED for _, v in res.trace)
    assert any(v[200].kind == CONTENDER for _, v in res.trace) and res.trace[-1][1][100].kind in (SETTLED, PLAN)
    d = res.decision
    assert d.ok and d.picked in (100, 200) and d.best == 100
    assert d.saved == pytest.approx(1 - sum(r.x_stop for r in res.results) / (3 * X_MAX))
    # The per-branch rule alone stops nothing before 55% of the plan; the comparison is what saves here.
    assert by[300].x_stop < 0.55 * X_MAX
    # Bounds wide enough to overlap everywhere: nobody is dominated (the comparison, not luck, stopped 300).
    wide = replay_race(scene, CompareConfig(k=50.0), cache=RefitCache())
    assert all(r.stop_kind != DOMINATED for r in wide.results)


def test_unidentified_flat_branch_is_not_stopped_but_a_settled_low_one_is():
    plans = {"win": X_MAX, "flat": X_MAX, "low": X_MAX, "rising": X_MAX}
    curves = {"win": curve(*WIN, upto=20), "flat": curve(*FLAT, upto=20, seed=1),
              "low": curve(*LOSE, upto=20, seed=2),
              "rising": curve(70.0, lambda x: 0.25 * x, upto=20, seed=3)}  # steep and straight: SE huge
    v = decide_branches(curves, plans)
    assert v["win"].kind == LEADER and v["win"].a_post == pytest.approx(82, abs=1)
    assert v["flat"].kind == NOT_IDENTIFIED and not v["flat"].stop and "flat start" in v["flat"].reason
    assert v["low"].kind == DOMINATED and v["low"].stop
    # Its level (~75 at 20 EFLOPs) is below the leader's pessimistic ceiling, but its own ceiling is wide open.
    assert not v["rising"].stop and v["rising"].kind in (CONTENDER, NOT_IDENTIFIED), v["rising"].reason
    assert v["low"].a_post + 1.0 * v["low"].se < v["win"].a_post - 1.0 * v["win"].se  # the rule as documented


def test_verdicts_do_not_depend_on_later_points():
    scene = make_scene({100: WIN, 200: TIE, 300: LOSE})
    cache = RefitCache()
    base = replay_race(scene, cache=cache)
    loser = base.results[2]
    t = loser.x_stop
    # After t the loser soars above everyone; nothing up to t may change.
    b = scene.branches[300]
    y = np.where(b.x > t, b.y + 30.0, b.y)
    altered = Scene(scene.name, None, scene.benchmarks, scene.sft_exaflops, scene.sft_overall,
                    {**scene.branches, 300: Branch(300, b.sft_exaflops, b.p_sft, b.x, y)})
    other = replay_race(altered, cache=cache)  # the shared cache must not leak the future either
    early = [(c, v) for c, v in base.trace if c <= t]
    assert early and early == [(c, v) for c, v in other.trace if c <= t]
    assert other.results[2].stop_kind == DOMINATED and other.results[2].x_stop == t
    # A direct call: the verdicts from the points up to t, with a cache that has seen the whole curves.
    plans = {s: X_MAX for s in scene.steps}
    full = {s: [(0.0, br.p_sft)] + list(zip(br.x[1:], br.p_sft + br.y[1:])) for s, br in altered.branches.items()}
    upto = {s: [p for p in pts if p[0] <= t] for s, pts in full.items()}
    warm = RefitCache()
    decide_branches(full, plans, cache=warm)
    assert decide_branches(upto, plans, cache=warm) == decide_branches(upto, plans, cache=RefitCache())


def test_stopped_branch_stays_stopped_and_live_race_matches_replay():
    scene = make_scene({100: WIN, 200: TIE, 300: LOSE})
    res = replay_race(scene)
    race = BranchRace({s: X_MAX for s in scene.steps})
    xs = sorted({float(x) for b in scene.branches.values() for x in b.x[1:]})
    ended: dict[int, int] = {}
    for c in xs:  # the live loop: curves up to c, stopped branches keep the curve they ended with
        curves = {}
        for s, b in scene.branches.items():
            n = ended.get(s, int(np.searchsorted(b.x, c + 1e-9, side="right")))
            curves[s] = [(0.0, b.p_sft)] + list(zip(b.x[1:n], b.p_sft + b.y[1:n]))
        for s, v in race.decide(curves).items():
            if v.stop:
                ended.setdefault(s, v.n_points)
        if len(ended) == 3:
            break
    assert {s: v.kind for s, v in race.verdicts.items()} == {s: v.kind for s, v in res.verdicts.items()}
    # The leader collapses after the loser's stop: the stop stands, it is not resumed.
    stopped = race.stopped
    assert 300 in stopped
    crash = dict(curves)
    crash[100] = crash[100] + [(X_MAX * 0.99, 50.0)] * 3
    assert decide_branches(crash, race.plans, stopped=stopped)[300] == stopped[300]


def test_bad_inputs_and_config():
    plans = {"a": 10.0}
    with pytest.raises(CeilingError, match="x = 0"):
        decide_branches({"a": [(1.0, 70.0), (2.0, 71.0)]}, plans)
    with pytest.raises(CeilingError, match="compute order"):
        decide_branches({"a": [(0.0, 70.0), (2.0, 71.0), (1.0, 71.0)]}, plans)
    with pytest.raises(CeilingError, match="plan"):
        decide_branches({"a": [(0.0, 70.0)]}, {"a": 0.0})
    for bad in ({"k": -1}, {"se_floor": float("nan")}, {"margin": -0.5}, {"min_points": 3}, {"min_fraction": 2}):
        with pytest.raises(CeilingError):
            CompareConfig(**bad)
    assert decide_branches({"a": [(0.0, 70.0)]}, plans)["a"].kind == NOT_IDENTIFIED


def run(argv):
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


@needs_retu
def test_cli_compare_replay_of_a_released_scene(tmp_path, capsys):
    """general (SFT889K): the comparing rule (the default) picks the full sweep's best branch with more RL
    compute saved than the per-branch rule (40.7%, benchmarks/RESULTS.md)."""
    out = tmp_path / "race"
    assert run(["fit", str(RETU / "general.json"), "--early-stop", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| SFT step | stopped by | points used/total |" in stdout and "decision points" in stdout
    res = json.loads((out / "early_stop.json").read_text())
    assert (out / "early_stop.png").stat().st_size > 0 and (out / "early_stop.md").read_text() in stdout
    d, rows = res["decision"], res["branches"]
    assert res["rule"] == "compare" and [r["sft_step"] for r in rows][:3] == [0, 360, 720] and len(rows) == 13
    assert d["ok"] and d["picked"] == d["best"] == 14080 and d["saved"] > 0.45
    kinds = {r["stop_kind"] for r in rows}
    assert DOMINATED in kinds and SETTLED in kinds
    total = sum(r["exaflops_total"] for r in rows)
    assert d["saved"] == pytest.approx(1 - sum(r["exaflops_used"] for r in rows) / total)
    for r in rows:
        assert r["exaflops_used"] <= r["exaflops_total"] and r["stop_reason"]
        if r["stop_kind"] == DOMINATED:  # stopped by a branch whose ceiling is above it by more than the margin
            assert r["A_post_stop"] < max(q["A_post_full"] for q in rows) - 1.0
