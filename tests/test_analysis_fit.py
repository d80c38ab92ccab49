"""The ceiling fitter and the scene loader: synthetic curves with known parameters, planted outliers,
degenerate inputs, strict data errors, and the real RETU curves."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from engine.analysis import FitConfig, FitError, fit_branch, fit_points, load_scene, sigmoid
from engine.analysis.fit import _lm_refit, _Model, _modified_z
from engine.errors import CeilingError, DataError

RETU = Path(__file__).resolve().parent / "data" / "retu"  # vendored: tests/data/retu/README.md


def synthetic(A=8.0, C_mid=12.0, B=1.6, C0=0.0, n=40, x_max=60.0, noise=0.05, seed=0, anchor=True):
    rng = np.random.default_rng(seed)
    x = np.linspace(x_max / n, x_max, n)
    y = sigmoid(x, A, C_mid, B, C0) + rng.normal(0, noise, n)
    if anchor:
        x, y = np.r_[0.0, x], np.r_[0.0, y]
    return x, y


def pts(x, y):
    return np.column_stack([x, y])


# ---- recovery ---------------------------------------------------------------------------------------


def test_plain_fit_recovers_known_parameters():
    x, y = synthetic()
    r = fit_points(pts(x, y), p_sft=70.0)
    assert r.A == pytest.approx(8.0, abs=0.2)
    assert r.C_mid == pytest.approx(12.0, rel=0.08)
    assert r.B == pytest.approx(1.6, rel=0.1)
    assert r.C0 == 0.0 and r.method == "plain"
    assert r.A_post == pytest.approx(70.0 + r.A) and r.PL_rl == r.A
    assert r.r2_train > 0.99 and r.rmse_val < 0.15
    assert r.n_train + r.n_val == len(x) and r.n_train == math.floor(0.85 * len(x))
    assert r.warnings == []


def test_planted_outliers_are_flagged_and_do_not_move_the_fit():
    x, y = synthetic(seed=1)
    planted = [7, 15, 22]
    y[planted] -= np.array([3.0, 2.5, 4.0])
    r = fit_points(pts(x, y))
    assert set(planted) <= set(np.flatnonzero(r.flagged))
    # Rounds refit without the flagged points, so the MAD shrinks and a few noisy points may join them.
    assert r.n_outliers <= 0.3 * r.n_train
    assert r.A == pytest.approx(8.0, abs=0.25) and r.C_mid == pytest.approx(12.0, rel=0.1)


def test_lts_recovers_parameters_despite_outliers():
    x, y = synthetic(seed=2)
    y[[5, 12, 19, 26]] += np.array([3.0, -3.5, 2.5, -3.0])
    r = fit_points(pts(x, y), lts_alpha=0.85)
    assert r.method == "lts" and r.h is not None
    assert r.A == pytest.approx(8.0, abs=0.3)
    assert r.C_mid == pytest.approx(12.0, rel=0.12)
    assert r.B == pytest.approx(1.6, rel=0.15)
    assert r.kept.sum() == r.h  # R^2 counts only the h kept points
    assert r.r2_train > 0.99


def test_lts_is_deterministic():
    x, y = synthetic(seed=3, noise=0.3)
    a = fit_points(pts(x, y), lts_alpha=0.75).to_dict()
    b = fit_points(pts(x, y), lts_alpha=0.75).to_dict()
    assert a == b


def test_free_c0_recovers_offset():
    x, y = synthetic(C0=-1.0, anchor=False, seed=4, noise=0.03)
    r = fit_points(pts(x, y), free_c0=True)
    assert r.C0 == pytest.approx(-1.0, abs=0.3)
    assert r.A == pytest.approx(8.0, abs=0.3)


def test_lm_refit_matches_curve_fit_lm():
    # _lm_refit calls leastsq directly; it must be what curve_fit(method='lm') computes.
    from scipy.optimize import curve_fit

    x, y = synthetic(seed=5, noise=0.2)
    u = 1.0 / (x + 1e-10)
    m = _Model(False)
    p0 = np.array([7.0, 10.0, 1.0])
    with np.errstate(all="ignore"):
        ours = _lm_refit(m, u, y, p0)
        ref, _ = curve_fit(m.f, u, y, p0=p0, method="lm", maxfev=5000)
    np.testing.assert_allclose(ours, ref, rtol=1e-10)


def test_split_and_train_start():
    x, y = synthetic(n=30)
    r = fit_points(pts(x, y), train_start=3, train_points=20)
    assert np.flatnonzero(r.train).tolist() == list(range(3, 23))
    assert np.flatnonzero(r.val).tolist() == list(range(23, 31))
    assert not r.kept[:3].any()


def test_modified_z_with_zero_mad_counts_as_one():
    z = _modified_z(np.array([0.0, 0.0, 0.0, 0.0, 5.0]))
    assert z[-1] == pytest.approx(0.6745 * 5.0)


# ---- metrics edge cases -----------------------------------------------------------------------------


def test_no_held_out_falls_back_to_train_metrics():
    x, y = synthetic(n=20)
    r = fit_points(pts(x, y), train_points=len(x))
    assert r.n_val == 0 and r.rmse_val == r.rmse_train and r.r2_val == r.r2_train
    assert any("no held-out" in w for w in r.warnings)


def test_single_held_out_point_gives_null_r2():
    x, y = synthetic(n=20)
    r = fit_points(pts(x, y), train_points=len(x) - 1)
    assert r.n_val == 1 and r.r2_val is None and r.rmse_val >= 0
    json.dumps(r.to_dict(), allow_nan=False)  # nothing NaN reaches JSON


# ---- degenerate inputs ------------------------------------------------------------------------------


def test_too_few_points_is_a_clear_error():
    with pytest.raises(FitError, match="too few points"):
        fit_points([(0, 0), (1, 1), (2, 1.5)])
    with pytest.raises(FitError, match="too few points"):
        fit_points([(0, 0)] * 6)  # all at x = 0


def test_flat_curve_is_flagged_not_crashed():
    r = fit_points([(x, 0.0) for x in range(12)])
    assert r.A == pytest.approx(0.0, abs=1e-6)
    assert any("flat curve" in w for w in r.warnings)
    assert r.r2_train is None  # undefined for constant targets
    json.dumps(r.to_dict(), allow_nan=False)


def test_collapse_to_large_negative_gain_is_flagged():
    x, y = synthetic(n=30, x_max=90)
    y[-6:] = np.linspace(-5, -50, 6)  # RL collapses at the end
    for alpha in (None, 0.75):
        r = fit_points(pts(x, y), lts_alpha=alpha)
        assert any(w.startswith("collapse") for w in r.warnings)
        assert math.isfinite(r.A_post)


def test_negative_gain_everywhere_gives_negative_pl_rl_warning():
    x, y = synthetic(A=-6.0, n=30)
    r = fit_points(pts(x, y))
    assert r.PL_rl < 0 and any("PL_rl" in w for w in r.warnings)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_in_points_is_a_clear_error(bad):
    x, y = synthetic(n=20)
    y[4] = bad
    with pytest.raises(FitError, match="point 4 has a non-finite y"):
        fit_points(pts(x, y))


def test_bad_options_and_shapes():
    with pytest.raises(FitError, match="--lts-alpha"):
        FitConfig(lts_alpha=1.5)
    with pytest.raises(FitError, match="--train-start"):
        fit_points([(i, i) for i in range(10)], train_start=10)
    with pytest.raises(FitError, match="pairs"):
        fit_points([1, 2, 3])
    with pytest.raises(FitError, match="negative x"):
        fit_points([(-1, 0)] + [(i, i) for i in range(6)])
    assert issubclass(FitError, CeilingError)


# ---- loader -----------------------------------------------------------------------------------------


def mini_scene():
    w = {"a": 3, "b": 1}

    def pt(sa, sb, **kw):
        return {"scores": {"a": sa, "b": sb}, "overall": round((3 * sa + sb) / 4, 2), **kw}

    rl = [pt(50 + 10 * (1 - math.exp(-i / 3)), 20, rl_exaflops=0.5 * i) for i in range(1, 13)]
    return {
        "benchmarks": w,
        "sft": [pt(40, 10, exaflops=0.0), pt(50, 20, exaflops=1.23)],
        "sft_step_cache_exaflops": {"0": 0.0, "100": 1.23},
        "rl": {"100": rl, "0": [dict(p) for p in rl]},
    }


def write(tmp_path, obj, name="mini.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_loader_builds_fit_data(tmp_path):
    scene = load_scene(write(tmp_path, mini_scene()))
    assert scene.name == "mini" and scene.steps == [0, 100]
    b = scene.branch(100)
    assert b.p_sft == 42.5 and b.sft_exaflops == 1.23
    assert b.x[0] == 0 and b.y[0] == 0 and b.n_points == 13
    # x = round(round(c + rl, 2) - c, 2)
    assert b.x[1] == round(round(1.23 + 0.5, 2) - 1.23, 2)
    assert scene.branch(0).p_sft == 32.5
    r = fit_branch(b)
    assert r.sft_step == 100 and r.PL_rl > 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["rl"]["100"][4].pop("overall"), "mini.json: rl[\"100\"][4]: missing field 'overall'"),
        (lambda d: d.pop("benchmarks"), "mini.json: missing field 'benchmarks'"),
        (lambda d: d["sft"][1]["scores"].pop("b"), "mini.json: sft[1].scores: missing benchmark 'b'"),
        (lambda d: d["rl"]["100"][2]["scores"].update(a=float("nan")), 'rl["100"][2].scores["a"]: not a finite'),
        (lambda d: d["rl"]["100"][2].update(overall=99.0), 'rl["100"][2].overall: stored 99.0'),
        (lambda d: d["rl"]["100"][3].update(rl_exaflops=0.1), 'rl["100"][3].rl_exaflops: not sorted'),
        (lambda d: d["sft_step_cache_exaflops"].update({"100": 7.0}), 'sft_step_cache_exaflops["100"]: 7.0'),
        (lambda d: d["rl"].update(x=[]), "rl[\"x\"]: branch key must be an integer"),
        (lambda d: d["sft"][0].update(exaflops="0"), "sft[0].exaflops: expected a number, got str"),
    ],
)
def test_loader_errors_name_file_and_field(tmp_path, mutate, message):
    d = mini_scene()
    mutate(d)
    with pytest.raises(DataError) as e:
        load_scene(write(tmp_path, d))
    assert message in str(e.value)


def test_loader_bad_json_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 1"):
        load_scene(write(tmp_path, "{not json", "bad.json"))
    with pytest.raises(DataError, match="cannot read"):
        load_scene(tmp_path / "absent.json")
    scene = load_scene(write(tmp_path, mini_scene()))
    with pytest.raises(DataError, match=r"no RL branch for SFT step 5 \(available: \[0, 100\]\)"):
        scene.branch(5)


# ---- the real curves --------------------------------------------------------------------------------


def test_retu_scenes_load_and_general_fits_are_sane():
    counts = {s: len(load_scene(RETU / f"{s}.json").steps)
              for s in ("general", "s1K", "easy102K", "uniform102K", "hard102K")}
    assert counts == {"general": 13, "s1K": 6, "easy102K": 7, "uniform102K": 6, "hard102K": 6}
    scene = load_scene(RETU / "general.json")
    b = scene.branch(360)
    assert b.p_sft == 69.15 and b.sft_exaflops == 34.92 and b.x[0] == 0 and b.y[0] == 0
    base = fit_branch(scene.branch(0))
    assert base.P_sft == 46.71
    assert 20 < base.PL_rl < 30 and base.r2_train > 0.95
    for step in (360, 3600, 14080):
        r = fit_branch(scene.branch(step))
        assert 78 < r.A_post < 86 and r.r2_train > 0.9 and r.warnings == []


def test_retu_collapse_branch_is_flagged():
    r = fit_branch(load_scene(RETU / "easy102K.json").branch(6120))
    assert any(w.startswith("collapse") for w in r.warnings)
    json.dumps(r.to_dict(), allow_nan=False)
