"""Early stopping of RL branches: synthetic curves that settle or keep rising, the streak rules at their
boundaries (with a scripted fitter), the monitor against the replay, and `ceiling fit --early-stop`."""

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import engine.analysis.early_stop as early_stop
from engine.analysis import (
    Branch,
    EarlyStopConfig,
    FitError,
    OnlineCeilingMonitor,
    fit_points,
    replay_branch,
    sigmoid,
)
from engine.analysis.cli import register
from engine.errors import CeilingError

RETU = Path(__file__).resolve().parent / "data" / "retu"  # vendored: tests/data/retu/README.md


def branch(A=8.0, C_mid=12.0, B=1.6, n=40, x_max=60.0, noise=0.05, seed=0, p_sft=70.0, y=None):
    """A branch with the anchor (0, 0) and n evaluations of a noisy sigmoid (or of `y(x)`)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(x_max / n, x_max, n)
    gain = (sigmoid(x, A, C_mid, B) if y is None else y(x)) + rng.normal(0, noise, n)
    return Branch(100, 1.0, p_sft, np.r_[0.0, x], np.r_[0.0, gain])


# ---- real fits on synthetic curves ------------------------------------------------------------------


def test_settled_sigmoid_stops_early_with_a_small_error():
    b = branch()
    r = replay_branch(b)
    assert r.stopped and r.points_used < r.n_total and r.saved > 0.3
    assert r.x_stop == b.x[r.stop_index] and r.saved == pytest.approx(1 - r.x_stop / b.x[-1])
    assert r.error < 0.5 and r.a_post_full == pytest.approx(78.0, abs=0.3)
    assert r.last_observed == pytest.approx(70.0 + b.y[-1])
    # The stop sits on a stable window (the last `patience` predictions lie within tol), past min_fraction.
    window = [t.a_post for t in r.trajectory[r.stop_index - 2: r.stop_index + 1]]
    assert None not in window and max(window) - min(window) <= r.config.tol
    assert r.trajectory[r.stop_index].progress >= r.config.min_fraction > r.trajectory[r.stop_index - 1].progress
    assert len(r.trajectory) == r.n_total  # replayed to the end for the figure
    assert all(t.a_post is None and t.note.startswith("too few") for t in r.trajectory[:5])
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["points_used"] == r.points_used and d["why_not_stopped"] is None and len(d["trajectory"]) == 41


def test_curve_still_rising_steeply_never_stops():
    r = replay_branch(branch(y=lambda x: 0.5 * x, noise=0.02))
    assert not r.stopped and r.stop_index is None
    assert r.points_used == r.n_total and r.saved == 0.0 and r.x_stop == r.x_total
    assert r.a_post_stop is None and r.error is None
    assert r.why_not_stopped().startswith("never stable")


def test_to_end_does_not_change_the_stop():
    b = branch(seed=3)
    full, short = replay_branch(b), replay_branch(b, to_end=False)
    assert short.stop_index == full.stop_index and short.a_post_stop == full.a_post_stop
    assert len(short.trajectory) == short.stop_index + 1


def test_monitor_and_replay_agree():
    b = branch(seed=5, noise=0.1)
    r = replay_branch(b)
    mon = OnlineCeilingMonitor(p_sft=b.p_sft)  # a live branch: the anchor is implied
    decisions = [mon.update(x, g, progress=x / b.x[-1]) for x, g in zip(b.x[1:], b.y[1:])]
    assert mon.stop_index == r.stop_index and mon.stop_prediction == r.a_post_stop
    assert [t.a_post for t in mon.refits] == [t.a_post for t in r.trajectory[1:]]
    assert decisions.index(True) == r.stop_index - 1 and all(decisions[r.stop_index - 1:])  # sticky
    assert mon.prediction == r.trajectory[-1].a_post and mon.should_stop


# ---- the streak rules, with a scripted fitter -------------------------------------------------------


@pytest.fixture
def scripted(monkeypatch):
    """Make each refit return the next scripted A_post (P_sft = 0); FitError or "ni" (not identified)."""
    x = np.linspace(0, 10, 11)
    base = fit_points(np.column_stack([x, sigmoid(x, 5.0, 3.0, 2.0)]), train_points=11)

    def install(script):
        values = iter(script)

        def fake(points, p_sft=0.0, config=None, **options):
            v = next(values)
            if isinstance(v, Exception):
                raise v
            if v == "ni":
                return dataclasses.replace(base, C_mid=1e6)
            return dataclasses.replace(base, A=v, P_sft=0.0)

        monkeypatch.setattr(early_stop, "fit_points", fake)
    return install


def feed(n, progress=None, **config):
    """n evaluations after the anchor, a refit after each (min_points=2; no compute floor unless asked)."""
    mon = OnlineCeilingMonitor(config=EarlyStopConfig(**({"min_points": 2, "min_fraction": 0.0, "tol": 0.5} | config)))
    for i in range(n):
        mon.update(i + 1.0, 0.0, progress=None if progress is None else progress[i])
    return mon


def test_tol_boundary_is_inclusive(scripted):
    scripted([80.0, 80.5, 80.25])
    assert feed(3, tol=0.5).stop_index == 3  # max - min == tol stops (the anchor is index 0)
    scripted([80.0, 80.5, 80.25])
    assert not feed(3, tol=0.49).should_stop


def test_patience_boundary(scripted):
    scripted([80.0, 80.0, 80.0])
    assert not feed(3, patience=4).should_stop
    scripted([80.0, 80.0, 80.0, 80.0])
    assert feed(4, patience=4).stop_index == 4
    scripted([81.0, 80.0])
    assert feed(2, patience=1).stop_index == 1  # one valid refit is enough
    scripted([90.0, 80.0, 80.2, 80.4])  # the window slides: 90 drops out
    assert feed(4).stop_index == 4


def test_failed_or_unidentified_fit_resets_the_streak(scripted):
    scripted([80.0, 80.0, FitError("boom"), 80.0, 80.0, 80.0])
    mon = feed(6)
    assert mon.stop_index == 6  # not 4: the failure at index 3 broke the streak
    assert mon.refits[2].a_post is None and mon.refits[2].note == "fit failed: boom"
    scripted([80.0, 80.0, "ni", 80.0, 80.0])
    mon = feed(5)
    assert not mon.should_stop and mon.refits[2].note.startswith("ceiling not identified")
    assert mon.prediction == 80.0


def test_refits_wait_for_min_points(scripted):
    scripted([80.0] * 10)
    mon = OnlineCeilingMonitor(config=EarlyStopConfig(min_points=6, patience=2, min_fraction=0.0))
    out = [mon.update(i + 1.0, 0.0) for i in range(6)]
    # The anchor + 4 evaluations = 5 points: no refit yet; refits at 6 and 7 points; stop at the 7th.
    assert [r.a_post for r in mon.refits] == [None] * 4 + [80.0, 80.0] and out == [False] * 5 + [True]


def test_compute_floor_waits_for_min_fraction(scripted):
    scripted([80.0] * 6)
    mon = feed(6, progress=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], min_fraction=0.55)
    assert mon.stop_index == 6  # stable from index 3, but the floor holds it until 60% of the plan
    scripted([80.0])
    with pytest.raises(FitError, match="needs the progress"):
        feed(1, min_fraction=0.5, patience=1)


def test_compute_span_widens_the_window(scripted):
    # Refit i is at x = i. At index 6 the last 3 agree, but with span 0.5 the window reaches back to x >= 3,
    # where the 78 is; at index 7 it starts at x >= 3.5 and holds only 80s.
    scripted([70.0, 70.0, 78.0, 80.0, 80.0, 80.0])
    assert feed(6).stop_index == 6
    scripted([70.0, 70.0, 78.0, 80.0, 80.0, 80.0, 80.0, 80.0])
    assert feed(8, span=0.5).stop_index == 7


def test_decide_picks_by_the_stop_prediction_and_scores_against_the_full_fit():
    def result(step, full, stop=None, x_stop=10.0):
        fit = dataclasses.replace(fit_points(np.column_stack([np.arange(6.0), sigmoid(np.arange(6.0), 5, 2, 2)]),
                                             train_points=6), P_sft=full - 5.0)
        return early_stop.EarlyStopResult(step, 1.0, 0.0, EarlyStopConfig(), None if stop is None else 3, 10, 20.0,
                                          20.0 if stop is None else x_stop, stop, fit, None, 0.0, np.zeros(1),
                                          np.zeros(1))
    rs = [result(0, 70.0, stop=70.5), result(100, 80.0, stop=79.0), result(200, 80.8, stop=78.5),
          result(300, 79.5)]  # 300 never stopped: its estimate is the full fit
    d = early_stop.decide(rs)
    assert (d.picked, d.best) == (300, 200) and not d.ok and d.picked_full == pytest.approx(79.5)
    assert d.saved == pytest.approx(1 - (3 * 10 + 20) / 80) and sorted(d.errors) == pytest.approx([0.5, 1.0, 2.3])
    assert "WRONG" in d.summary() and early_stop.decide(rs, margin=1.5).ok
    assert d.to_dict()["error_max"] == pytest.approx(2.3)


def test_tuned_rule_picks_the_best_branch_in_the_hardest_released_scene():
    """On the paper's s1K curves (benchmarks/bench_early_stop.py has all five scenes), where the best branch
    rises only late: the best early-stopped A_post is on the full sweep's best branch, 43% of RL compute saved;
    the previous default (tol 0.5, no compute floor) picks a branch 4.66 points worse."""
    from engine.analysis import load_scene, replay_scene

    scene = load_scene(RETU / "s1K.json")
    d = early_stop.decide(replay_scene(scene, to_end=False))
    assert d.ok and d.picked == d.best == 62 and d.saved == pytest.approx(0.430, abs=0.001), d.summary()
    old = early_stop.decide(replay_scene(scene, to_end=False, tol=0.5, min_fraction=0.0))
    assert not old.ok and old.picked == 310 and old.best_full - old.picked_full == pytest.approx(4.66, abs=0.01)


def test_bad_config_is_a_ceiling_error():
    for bad in ({"tol": -0.1}, {"patience": 0}, {"min_points": 1}, {"tol": float("nan")}, {"min_fraction": 1.5},
                {"span": 1.0}):
        with pytest.raises(CeilingError):
            EarlyStopConfig(**bad)


# ---- CLI ------------------------------------------------------------------------------------------


def run(argv):
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_per_branch_early_stop_on_a_real_scene(tmp_path, capsys):
    out = tmp_path / "es"
    assert run(["fit", str(RETU / "general.json"), "--early-stop", "--per-branch", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| SFT step | points used/total | EFLOPs used/total | compute saved |" in stdout
    assert "branches early" in stdout and "Best branch: early-stopped sweep picks SFT step" in stdout
    for name in ("early_stop.md", "early_stop.json", "early_stop.png"):
        assert (out / name).stat().st_size > 0
    rows = json.loads((out / "early_stop.json").read_text())
    assert [r["sft_step"] for r in rows][:3] == [0, 360, 720] and len(rows) == 13
    for r in rows:
        assert r["points_used"] <= r["points_total"] and 0 <= r["saved"] < 1
        if r["stopped"]:
            assert r["error"] == pytest.approx(abs(r["A_post_stop"] - r["A_post_full"]))
    assert any(r["stopped"] for r in rows)


def test_cli_early_stop_rejects_bad_options(tmp_path):
    pt = {"scores": {"a": 50.0}, "overall": 50.0}
    rl = [pt | {"rl_exaflops": 0.5 * i, "scores": {"a": 50.0 + i}, "overall": 50.0 + i} for i in range(1, 9)]
    data = tmp_path / "mini.json"
    data.write_text(json.dumps({"benchmarks": {"a": 1}, "sft": [pt | {"exaflops": 0.0}], "rl": {"0": rl}}))
    with pytest.raises(CeilingError, match="--tol"):
        run(["fit", str(data), "--early-stop", "--per-branch", "--tol", "-1", "--out", str(tmp_path / "o")])
    with pytest.raises(CeilingError, match="--train-start and --train-points do not apply"):
        run(["fit", str(data), "--early-stop", "--per-branch", "--train-points", "5", "--out", str(tmp_path / "o")])


def test_live_rule_waits_for_the_compute_floor():
    """`ceiling_stop_rule` (the RL trainer's stop_when) with the sweep's floor: no stop before min_fraction of
    the planned steps, even on a curve that settled long before."""
    from engine.analysis.early_stop import ceiling_stop_rule

    def first_stop(**kw):
        rule, history = ceiling_stop_rule(tol=0.5, patience=3, **kw), []
        for i in range(40):  # pass@1 saturates at 50% within the first ~10 evaluations
            x = 0.5 * i
            history.append({"step": i, "rl_exaflops": x, "pass@1": (20 + 30 / (1 + (4.0 / (x + 1e-10)) ** 2)) / 100})
            if rule(history):
                return i
        return None

    early = first_stop()
    assert early is not None and early < 20
    assert first_stop(min_fraction=0.55, planned_steps=40) == 22  # the first step >= 0.55 * 40
    with pytest.raises(ValueError, match="needs planned_steps"):
        ceiling_stop_rule(min_fraction=0.5)
