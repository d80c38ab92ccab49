"""The comparing rule (engine/analysis/race.py) and its replay (race_replay.py): the bounds with a scripted
fitter, a pure function of the points seen, synthetic scenes with real fits, the released scenes and the CLI."""

import argparse
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import engine.analysis.race as race
from engine.analysis import Branch, EarlyStopConfig, FitError, Scene, load_scene, replay_branch, sigmoid
from engine.analysis.cli import register
from engine.analysis.race import CONTINUE, DONE, STOP, RaceConfig, decide, pick, settled_at
from engine.analysis.race_replay import race_markdown, replay_race

RETU = Path(__file__).resolve().parent / "data" / "retu"

# ---- the rule, with a scripted fitter -----------------------------------------------------------------


@pytest.fixture
def scripted(monkeypatch):
    """Each branch is told apart by its start score; `script[start](n)` gives (A_post, SE) of the fit of its
    first n evaluations, or None for a failed fit."""
    race._fit_cached.cache_clear()

    def install(script):
        def fake_refit(points, p_sft, min_points, fit_config):
            out = script[p_sft](len(points))
            return (None, "fit failed: scripted") if out is None else (SimpleNamespace(A_post=out[0], se=out[1]), "")

        monkeypatch.setattr(race, "refit", fake_refit)
        monkeypatch.setattr(race, "a_post_se", lambda fit: fit.se)
    yield install
    race._fit_cached.cache_clear()


def curve(start, n, dx=1.0):
    return [(0.0, start)] + [(dx * i, start) for i in range(1, n)]


RULE = RaceConfig(k=1.0, min_se=1.0, margin=-0.5, min_fraction=0.0, per_branch=None)


def test_a_clearly_losing_branch_is_stopped_and_the_leader_runs(scripted):
    scripted({70.0: lambda n: (80.0, 0.5), 60.0: lambda n: (75.0, 0.5), 65.0: lambda n: (79.0, 0.5)})
    d = decide({"a": curve(70.0, 10), "b": curve(60.0, 10), "c": curve(65.0, 10)}, dict.fromkeys("abc", 100.0), RULE)
    # The SE floor makes every half-width 1: a's lower bound 79 - 0.5 = 78.5 is the bar.
    assert (d["a"].action, d["a"].why) == (CONTINUE, "leader") and d["a"].lower == 79.0
    assert (d["b"].action, d["b"].why) == (STOP, "dominated") and d["b"].upper == 76.0
    assert "branch a's lower bound 79.00 -0.5" in d["b"].reason
    assert (d["c"].action, d["c"].why) == (CONTINUE, "contender")  # 80 >= 78.5
    assert pick(d) == "a"
    # Without the floor and with k = 2 the bounds are the fit's: 75 + 1 < 80 - 1.
    tight = dataclasses.replace(RULE, k=2.0, min_se=0.0, margin=0.0)
    assert decide({"a": curve(70.0, 10), "b": curve(60.0, 10)}, dict.fromkeys("ab", 100.0), tight)["b"].why == "dominated"


def test_no_stop_by_comparison_before_min_fraction(scripted):
    scripted({70.0: lambda n: (80.0, 0.5), 60.0: lambda n: (75.0, 0.5)})
    cfg = dataclasses.replace(RULE, min_fraction=0.3)
    d = decide({"a": curve(70.0, 10), "b": curve(60.0, 10)}, {"a": 100.0, "b": 100.0}, cfg)  # b at 9 of 100
    assert (d["b"].action, d["b"].why) == (CONTINUE, "early")
    d = decide({"a": curve(70.0, 10), "b": curve(60.0, 10, dx=4.0)}, {"a": 100.0, "b": 100.0}, cfg)  # 36 of 100
    assert d["b"].why == "dominated"


def test_an_unbounded_branch_is_not_stopped_for_it(scripted):
    # Far below the leader, but its ceiling is not pinned down: a failed fit, a huge SE, too few points.
    scripted({70.0: lambda n: (80.0, 0.5), 60.0: lambda n: None, 61.0: lambda n: (50.0, 40.0),
              62.0: lambda n: (40.0, 0.1)})
    curves = {"a": curve(70.0, 10), "fail": curve(60.0, 10), "se": curve(61.0, 10), "few": curve(62.0, 4)}
    d = decide(curves, dict.fromkeys(curves, 100.0), RULE)
    for b in ("fail", "se", "few"):
        assert (d[b].action, d[b].why, d[b].lower) == (CONTINUE, "unbounded", None), b
    assert "fit failed" in d["fail"].reason and "SE of A_post 40 > 10" in d["se"].reason
    assert d["few"].a_post is None and "too few points" in d["few"].reason
    assert pick(d) == "a"  # the failed and short ones have no A_post; 50 +- 40 is not preferred over SE <= 10


def test_pick_trusts_a_settled_prediction_whatever_its_se():
    """Under evaluation noise a late riser settles on its rise with SE > 10 points: the per-branch rule's
    stability makes it sure, and it beats a lower branch with a small SE; an unsettled huge-SE one does not."""
    from engine.analysis.race import Decision

    def d(why, a_post, se):
        return Decision(STOP if why == "settled" else CONTINUE, why, why, a_post, se, None, None)

    assert pick({"riser": d("settled", 82.0, 13.5), "flat": d("settled", 79.5, 0.4)}) == "riser"
    assert pick({"riser": d("contender", 82.0, 13.5), "flat": d("settled", 79.5, 0.4)}) == "flat"
    assert pick({"riser": d("plan", 82.0, 13.5), "flat": d("leader", 79.5, 0.4)}) == "riser"
    assert pick({"riser": d("dominated", 85.0, 0.1), "flat": d("settled", 79.5, 0.4)}) == "flat"


def test_the_leader_is_not_settled_before_the_leader_floor(scripted):
    # Both fits are flat, so the per-branch rule (tol 1, patience 3, 6 points) fires past its floor 0.5
    # for the follower; the leader runs on to 0.8 of its plan, then settles like any branch.
    scripted({70.0: lambda n: (80.0, 0.5), 65.0: lambda n: (79.5, 0.5)})
    cfg = dataclasses.replace(RULE, per_branch=EarlyStopConfig(min_fraction=0.5), leader_floor=0.8)
    plans = {"a": 10.0, "b": 10.0}
    d = decide({"a": curve(70.0, 8), "b": curve(65.0, 8)}, plans, cfg)  # 7 of 10 each
    assert (d["a"].action, d["a"].why) == (CONTINUE, "leader")
    assert (d["b"].action, d["b"].why) == (STOP, "settled") and d["b"].settled_at == 7  # 6 points + patience
    d = decide({"a": curve(70.0, 10), "b": curve(65.0, 8)}, plans, cfg)  # the leader at 9 of 10
    assert (d["a"].why, d["a"].settled_at) == ("settled", 8)
    with pytest.raises(FitError, match="leader-floor"):
        RaceConfig(leader_floor=1.5)


def test_the_leader_is_never_stopped_by_the_comparison(scripted):
    # A margin of 5 points would beat every branch, the leader's own upper bound included: it still runs.
    scripted({70.0: lambda n: (80.0, 0.5), 60.0: lambda n: (79.5, 0.5)})
    d = decide({"a": curve(70.0, 10), "b": curve(60.0, 10)}, dict.fromkeys("ab", 100.0),
               dataclasses.replace(RULE, margin=5.0))
    assert (d["a"].action, d["a"].why) == (CONTINUE, "leader") and d["b"].why == "dominated"


def test_a_dominated_branch_resumes_when_the_leader_falls(scripted):
    # a's ceiling drops from 80 +- 0.5 to 77 +- 2 with two more evaluations; b's frozen curve still counts.
    scripted({70.0: lambda n: (80.0, 0.5) if n <= 10 else (77.0, 2.0), 60.0: lambda n: (75.0, 0.5)})
    plans = dict.fromkeys("ab", 100.0)
    assert decide({"a": curve(70.0, 10), "b": curve(60.0, 8)}, plans, RULE)["b"].why == "dominated"
    d = decide({"a": curve(70.0, 12), "b": curve(60.0, 8)}, plans, RULE)
    assert d["b"].action == CONTINUE and d["b"].why == "contender"  # 76 >= 77 - 2 - 0.5


def test_done_and_input_errors(scripted):
    scripted({70.0: lambda n: (80.0, 0.5)})
    assert decide({"a": curve(70.0, 10)}, {"a": 9.0}, RULE)["a"].action == DONE  # ran its plan
    with pytest.raises(FitError, match="no plan for branch"):
        decide({"a": curve(70.0, 10)}, {}, RULE)
    with pytest.raises(FitError, match="at compute 0"):
        decide({"a": [(1.0, 70.0), (2.0, 71.0)]}, {"a": 9.0}, RULE)
    for bad in ({"k": -1.0}, {"margin": float("nan")}, {"min_fraction": 1.5}, {"min_points": 4}, {"max_se": 0.0}):
        with pytest.raises(FitError):
            RaceConfig(**bad)


# ---- real fits on synthetic scenes --------------------------------------------------------------------


def scene(branches, seed=0, n=50, x_max=100.0, noise=0.2):
    """A scene of sigmoid branches {sft_step: (A, C_mid)} from P_sft 70, n evaluations each."""
    rng = np.random.default_rng(seed)
    x = np.linspace(x_max / n, x_max, n)
    out = {}
    for step, (a, c_mid) in branches.items():
        gain = sigmoid(x, a, c_mid, 1.5) + rng.normal(0, noise, n)
        out[step] = Branch(step, float(step), 70.0, np.r_[0.0, x], np.r_[0.0, gain])
    return Scene("synthetic", None, {"a": 1.0}, np.zeros(1), np.full(1, 70.0), out)


THREE = {100: (10.0, 15.0), 200: (2.0, 10.0), 300: (8.5, 15.0)}


def test_replay_stops_the_loser_early_and_picks_the_best():
    res = replay_race(scene(THREE))
    rows = {r.sft_step: r for r in res.rows}
    assert rows[200].decision.why == "dominated" and rows[200].saved > 0.6 and rows[200].stops == 1
    assert rows[100].decision.why in ("settled", "plan") and rows[100].stops == 0
    assert res.picked == res.best == 100 and res.ok and res.gap == 0.0
    assert all("dominated" != t[1][100] for t in res.trace)  # the best branch is never stopped by the comparison


def test_replay_totals_add_up():
    sc = scene(THREE)
    res = replay_race(sc)
    assert res.used == pytest.approx(sum(r.used for r in res.rows))
    assert res.planned == pytest.approx(sum(float(sc.branch(s).x[-1]) for s in sc.steps))
    assert res.saved == pytest.approx(1 - res.used / res.planned)
    for r in res.rows:
        b = sc.branch(r.sft_step)
        assert r.used == b.x[r.points_used - 1] and r.used <= r.plan and r.points_total == b.n_points
        if r.decision.why == "settled":
            assert r.points_used == r.decision.settled_at + 1  # cut back to where it settled
        if r.decision.why == "plan":
            assert r.used == r.plan
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["saved"] == pytest.approx(res.saved) and len(d["branches"]) == 3
    assert "| 100 (picked) |" in race_markdown(res)


def test_decisions_never_use_future_points():
    """Two scenes equal up to compute 50 and wildly different after it: every decision made before 50 is the
    same (the later ones are not)."""
    a = scene(THREE)
    later = {s: dataclasses.replace(b, y=np.where(b.x > 50, b.y - 10 * (s == 100), b.y)) for s, b in a.branches.items()}
    b = dataclasses.replace(a, branches=later)
    ra, rb = replay_race(a), replay_race(b)
    before = [t for t in ra.trace if t[0] < 50]
    assert len(before) >= 5 and before == [t for t in rb.trace if t[0] < 50]
    assert ra.trace != rb.trace  # the future does matter once it is seen


def test_the_per_branch_input_is_the_monitor():
    """`settled_at` makes only the refits the per-branch rule looks at; it stops where the monitor stops."""
    b = scene({100: (8.0, 12.0)}, noise=0.05).branch(100)
    scores = np.column_stack([b.x, b.p_sft + b.y])
    for cfg in (EarlyStopConfig(), EarlyStopConfig(min_fraction=0.3, span=0.3), EarlyStopConfig(min_fraction=0.0)):
        assert settled_at(scores, float(b.x[-1]), cfg, RaceConfig().fit) == replay_branch(b, cfg).stop_index


# ---- the released scenes and the CLI --------------------------------------------------------------------


def test_released_scenes_pick_right_and_save():
    """The default rule on the paper's five scenes (benchmarks/bench_early_stop.py has the tables): the
    right branch in 5/5, 32.3% of the RL compute saved in total."""
    res = [replay_race(load_scene(RETU / f"{s}.json")) for s in ("general", "easy102K", "hard102K", "uniform102K",
                                                                  "s1K")]
    assert all(r.ok for r in res), [r.summary() for r in res if not r.ok]
    saved = 1 - sum(r.used for r in res) / sum(r.planned for r in res)
    assert saved >= 0.32, saved
    assert {r.scene: r.picked for r in res}["s1K"] == 62  # the late riser survives


def run(argv):
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_early_stop_compares_branches(tmp_path, capsys):
    out = tmp_path / "es"
    assert run(["fit", str(RETU / "hard102K.json"), "--early-stop", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| SFT step | EFLOPs used/plan | saved | ended |" in stdout and "picks SFT step 1080" in stdout
    d = json.loads((out / "early_stop.json").read_text())
    assert d["ok"] and d["picked"] == d["best"] == 1080 and len(d["branches"]) == 6
    assert d["used"] == pytest.approx(sum(b["used"] for b in d["branches"]))
    assert all(b["why"] in ("dominated", "settled", "plan") for b in d["branches"])
    assert (out / "early_stop.md").read_text().startswith("### hard102K: branches side by side in 20 slices")
    with pytest.raises(FitError, match="--k"):
        run(["fit", str(RETU / "hard102K.json"), "--early-stop", "--k", "-1", "--out", str(out)])
