"""`fit` subcommand through argparse: one branch, --all with its tables and figures, and clear errors."""

import argparse
import json
import math
from pathlib import Path

import pytest

from engine.analysis.cli import register
from engine.errors import CeilingError, DataError

RETU = Path(__file__).resolve().parent / "data" / "retu"  # vendored: tests/data/retu/README.md


def mini_scene():
    """A two-branch scene in the RETU format (kept in step with test_analysis_fit.mini_scene)."""
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
    p.write_text(json.dumps(obj))
    return p


def run(argv):
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(argv)
    return args.func(args)


def test_branch_summary_and_json(tmp_path, capsys):
    data = write(tmp_path, mini_scene())
    out = tmp_path / "r.json"
    assert run(["fit", str(data), "--branch", "100", "--json", str(out), "--lts-alpha", "0.85"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("mini.json step 100: P_sft=42.50") and "[lts]" in line and "\n" not in line
    d = json.loads(out.read_text())
    for key in ("P_sft", "PL_rl", "A_post", "C_mid", "B", "C0", "r2_train", "rmse_val", "r2_val",
                "n_train", "n_val", "n_outliers"):
        assert key in d
    assert d["A_post"] == pytest.approx(d["P_sft"] + d["PL_rl"])


def test_all_writes_tables_and_figures(tmp_path, capsys):
    data = write(tmp_path, mini_scene())
    out = tmp_path / "fit"
    assert run(["fit", str(data), "--all", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "| SFT step | SFT EFLOPs | PL_rl | C_mid | B | P_sft | A_post |" in stdout
    for name in ("table.md", "table.csv", "table.json", "branches.png", "a_post.png"):
        assert (out / name).stat().st_size > 0
    rows = json.loads((out / "table.json").read_text())
    assert [r["sft_step"] for r in rows] == [0, 100]


def test_errors_are_ceiling_errors(tmp_path):
    d = mini_scene()
    d["rl"]["100"][4].pop("overall")
    with pytest.raises(DataError, match=r"mini\.json: rl\[\"100\"\]\[4\]: missing field 'overall'"):
        run(["fit", str(write(tmp_path, d)), "--branch", "100"])
    good = write(tmp_path, mini_scene(), "good.json")
    with pytest.raises(CeilingError, match="no RL branch for SFT step 7"):
        run(["fit", str(good), "--branch", "7"])
    with pytest.raises(CeilingError, match="--lts-alpha"):
        run(["fit", str(good), "--branch", "100", "--lts-alpha", "2"])
    with pytest.raises(SystemExit):  # argparse: --branch and --all are exclusive and one is required
        run(["fit", str(good)])


def test_retu_general_branch(tmp_path, capsys):
    out = tmp_path / "g.json"
    assert run(["fit", str(RETU / "general.json"), "--branch", "360", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["P_sft"] == 69.15 and 78 < d["A_post"] < 86


def test_early_stop_writes_table_and_figure(tmp_path, capsys):
    data = write(tmp_path, mini_scene())
    out = tmp_path / "es"
    assert run(["fit", str(data), "--early-stop", "--per-branch", "--patience", "2", "--out", str(out), "--json",
                str(tmp_path / "es.json")]) == 0
    assert "| SFT step | points used/total |" in capsys.readouterr().out
    for name in ("early_stop.md", "early_stop.json", "early_stop.png"):
        assert (out / name).stat().st_size > 0
    rows = json.loads((tmp_path / "es.json").read_text())
    assert [r["sft_step"] for r in rows] == [0, 100] and all(r["patience"] == 2 for r in rows)
