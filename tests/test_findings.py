"""The verdicts on the paper's three findings (engine/analysis/findings.py) on scenes whose answer is known, the
standard errors behind them, and the findings section of a sweep report built from a synthetic sweep state."""

import dataclasses
import json
import math

import numpy as np
import pytest

from engine.analysis.findings import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    REPRODUCED,
    SceneOutcome,
    Score,
    a_post_se,
    branch_score,
    judge_paradigms,
    judge_scenes,
    judge_switch_points,
    pass1_se,
    smoothed_max,
    unidentified,
)
from engine.analysis.fit import fit_points, sigmoid


def test_pass1_se_is_the_binomial_bound_with_a_floor_at_0_and_100():
    assert pass1_se(50.0, 200) == pytest.approx(100 * math.sqrt(0.25 / 200))
    assert pass1_se(10.0, 400) == pytest.approx(100 * math.sqrt(0.09 / 400))
    assert 0 < pass1_se(0.0, 200) < 0.5 and pass1_se(0.0, 200) == pass1_se(100.0, 200)


def _history(curve, step_ef=0.1):
    return [{"step": 5 * i, "rl_exaflops": step_ef * 5 * i, "pass@1": p / 100} for i, p in enumerate(curve)]


def test_smoothed_max_reads_a_peak_that_falls_back_not_the_end():
    hist = _history([20, 40, 47, 46, 30, 25])  # n4000's best branch of the last study: a peak, then a fall
    sc = smoothed_max(hist, 200, offset=1.0)
    assert sc.value == pytest.approx((40 + 47 + 46) / 3) and sc.rule == "smoothed max"
    assert sc.compute == pytest.approx(1.0 + 0.5 * 3)  # at the window's last evaluation
    assert sc.se == pytest.approx(pass1_se(sc.value, 200) / math.sqrt(3))
    assert smoothed_max(_history([10, 30]), 200).value == pytest.approx(20.0)  # fewer points than the window


def test_branch_score_takes_an_identified_a_post_and_a_smoothed_max_otherwise():
    x = np.array([0.0, 0.5, 1, 2, 3, 4, 6, 8, 10, 12])
    y = sigmoid(x, 30.0, 2.0, 1.5)
    rng = np.random.default_rng(0)
    done = fit_points(np.c_[x, y + rng.normal(0, 0.3, len(x))], p_sft=40.0)
    hist = _history(list(40 + y))
    assert unidentified(done, a_post_se(done)) is None
    sc = branch_score(hist, 200, done)
    assert sc.rule == "A_post" and sc.value == pytest.approx(done.A_post) and sc.value == pytest.approx(70, abs=1)
    assert sc.se == pytest.approx(a_post_se(done))
    # the rise only begun: the midpoint is beyond the compute run or the asymptote is loose -> smoothed max
    x_late = np.array([0.0, 0.5, 1, 1.5, 2, 2.5])
    start = fit_points(np.c_[x_late, sigmoid(x_late, 30.0, 6.0, 1.5) + rng.normal(0, 0.3, 6)], p_sft=40.0)
    assert unidentified(start, a_post_se(start)) is not None
    late = branch_score(_history(list(40 + sigmoid(x_late, 30.0, 6.0, 1.5))), 200, start)
    assert late.rule == "smoothed max" and late.value < 50
    assert branch_score(hist, 200, None).rule == "smoothed max"  # no fit at all


def S(v, se=2.0):
    return Score(v, se)


def test_paradigms_verdicts():
    assert judge_paradigms(S(70), {"pure RL": S(30), "LUFFY": S(50), "UPT": S(60)}).verdict == REPRODUCED
    v = judge_paradigms(S(70), {"pure RL": S(30), "SRFT": S(80)})
    assert v.verdict == NOT_REPRODUCED and "SRFT" in v.reason
    v = judge_paradigms(S(70), {"pure RL": S(30), "LUFFY": S(68)})
    assert v.verdict == INCONCLUSIVE and "LUFFY" in v.reason and "beats pure RL" in v.reason
    assert judge_paradigms(S(70), {}).verdict == INCONCLUSIVE


def test_switch_point_verdicts():
    shape = [(25, "Adaptive", S(40)), (100, "Stable", S(70)), (150, "Mild", S(68)), (200, "Severe", S(50))]
    v = judge_switch_points(shape)
    assert v.verdict == REPRODUCED and "step 100" in v.reason
    early_wins = [(25, "Adaptive", S(85)), (100, "Stable", S(70)), (200, "Severe", S(50))]
    v = judge_switch_points(early_wins)
    assert v.verdict == NOT_REPRODUCED and "Adaptive switch at SFT step 25" in v.reason
    flat = [(25, "Adaptive", S(69)), (100, "Stable", S(70)), (200, "Severe", S(71))]
    assert judge_switch_points(flat).verdict == INCONCLUSIVE
    assert judge_switch_points([(100, "Stable", S(70)), (150, "Mild", S(60))]).verdict == INCONCLUSIVE


def test_scene_verdicts():
    scenes = [SceneOutcome("n200", 200, "uniform", 0.40, S(40)), SceneOutcome("n1000", 1000, "uniform", 0.20, S(60)),
              SceneOutcome("n4000", 4000, "uniform", 0.10, S(75)), SceneOutcome("easy", 1000, "easy", 0.25, S(52)),
              SceneOutcome("hard", 1000, "hard", 0.18, S(66))]
    v = judge_scenes(scenes)
    assert v.verdict == REPRODUCED and "Pearson r = -0.9" in v.reason
    reversed_scale = [SceneOutcome(s.name, s.num_train, s.mix, s.min_val_loss, S(100 - s.best.value)) for s in scenes]
    v = judge_scenes(reversed_scale)
    assert v.verdict == NOT_REPRODUCED and "scale" in v.reason and "loss-predicts-ceiling" in v.reason
    noisy = [SceneOutcome(s.name, s.num_train, s.mix, s.min_val_loss, S(60 + i % 2, 5.0)) for i, s in enumerate(scenes)]
    assert judge_scenes(noisy).verdict == INCONCLUSIVE
    assert judge_scenes(scenes[:2]).verdict == INCONCLUSIVE


def test_a_post_se_shrinks_with_noise_and_is_inf_when_unidentified():
    x = np.array([0.0, 0.5, 1, 2, 3, 4, 6, 8, 10, 12])
    y = sigmoid(x, 30.0, 2.0, 1.5)
    rng = np.random.default_rng(0)
    quiet = fit_points(np.c_[x, y + rng.normal(0, 0.3, len(x))], p_sft=40.0)
    loud = fit_points(np.c_[x, y + rng.normal(0, 3.0, len(x))], p_sft=40.0)
    assert 0 < a_post_se(quiet) < a_post_se(loud) < 20
    assert a_post_se(quiet, p_sft_se=3.0) == pytest.approx(math.hypot(a_post_se(quiet), 3.0))
    early = fit_points(np.c_[x[:6], y[:6] + rng.normal(0, 0.3, 6)], p_sft=40.0)
    assert a_post_se(early) > a_post_se(quiet)  # the plateau not reached yet: the asymptote is loosely pinned
    three = np.zeros(len(x), dtype=bool)
    three[:3] = True
    assert a_post_se(dataclasses.replace(quiet, kept=three)) == math.inf  # 3 points, 3 parameters


def _run(algorithm, init_step, curve, budget=None, step_ef=0.1):
    return {"algorithm": algorithm, "init_step": init_step, "dir": "x", "steps": 5 * (len(curve) - 1),
            "planned_steps": 5 * (len(curve) - 1), "exaflops": step_ef * 5 * (len(curve) - 1), "stopped": None,
            "budget": budget,
            "eval_history": [{"step": 5 * i, "rl_exaflops": step_ef * 5 * i, "pass@1": p} for i, p in enumerate(curve)]}


def synthetic_state(scenes):
    """A sweep state with the known answer: SFT-then-RL wins, Stable/Mild switches win, more data wins."""
    state = {"done": [], "scenes": {}}
    for name, n_train, top in scenes:
        losses = [1.0, 0.6, 0.45, 0.3 * 200 / n_train + 0.1, 0.3 * 200 / n_train + 0.105, 0.3 * 200 / n_train + 0.2]
        history = [{"step": 25 * (i + 1), "val_loss": v, "exaflops": 1e-7 * (i + 1)} for i, v in enumerate(losses)]
        best = min(history, key=lambda h: h["val_loss"])
        rl = {}
        for step, gain in ((25, 0.55), (100, 1.0), (125, 0.98), (150, 0.75)):
            rl[f"rl/{step}"] = _run("dapo_dc", step, [0.3 * gain, 0.5 * gain, top * gain, top * gain, top * gain])
        rl["rl/0"] = _run("dapo_dc", 0, [0.1, 0.15, 0.2, 0.22, 0.22, 0.23])
        rl["baseline/luffy"] = _run("luffy", 0, [0.1, 0.2, 0.3, 0.4, 0.4, 0.41])
        state["scenes"][name] = {
            "sft": {"steps": 150, "exaflops": 6e-7, "best": best, "val_history": history},
            "branches": [25, 100, 125, 150], "sft_pass1": {"0": 10.0} | {str(h["step"]): 30.0 for h in history},
            "n_eval": 200, "rl": rl}
    return state


def test_sweep_report_findings_section_on_a_known_scene(tmp_path):
    from engine.config import SceneSpec, SweepConfig, SweepJobConfig
    from engine.sweep.findings_report import findings_markdown
    job = SweepJobConfig(sweep=SweepConfig(scenes=[SceneSpec("n200", num_train=200), SceneSpec("n1000", num_train=1000),
                                                   SceneSpec("n4000", num_train=4000)]))
    state = synthetic_state([("n200", 200, 0.55), ("n1000", 1000, 0.7), ("n4000", 4000, 0.85)])
    text = findings_markdown(job, tmp_path, state, {})
    verdicts = {v["finding"]: v for v in json.loads((tmp_path / "findings.json").read_text())}
    assert {k: v["verdict"] for k, v in verdicts.items()} == {"1": REPRODUCED, "2": REPRODUCED, "3": REPRODUCED}
    assert "scene `n200`" in verdicts["1"]["reason"]  # the first scene with pure RL / baselines
    assert "| 1. Sequential SFT-then-RL" in text and "**reproduced**" in text
    for png in ("finding1_paradigms.png", "finding2_switch.png", "finding3_scenes.png"):
        assert (tmp_path / png).stat().st_size > 1000 and png in text
    # the same sweep where the early switch wins in every scene: finding 2 is contradicted
    for st in state["scenes"].values():
        st["rl"]["rl/25"] = _run("dapo_dc", 25, [0.3, 0.5, 0.95, 0.95, 0.95])
    findings_markdown(job, tmp_path, state, {})
    verdicts = {v["finding"]: v["verdict"] for v in json.loads((tmp_path / "findings.json").read_text())}
    assert verdicts["2"] == NOT_REPRODUCED
    # the Stable branch peaks high and falls back at its end: what it reaches is its peak, so it still wins
    state = synthetic_state([("n200", 200, 0.55), ("n1000", 1000, 0.7), ("n4000", 4000, 0.85)])
    for st in state["scenes"].values():
        st["rl"]["rl/100"] = _run("dapo_dc", 100, [0.3, 0.6, 0.9, 0.9, 0.9, 0.4, 0.3])
    findings_markdown(job, tmp_path, state, {})
    found = {v["finding"]: v for v in json.loads((tmp_path / "findings.json").read_text())}
    assert found["2"]["verdict"] == REPRODUCED
    assert {r["score"]["rule"] for r in found["2"]["rows"]} == {"smoothed max"}
