"""Run directory contents: resolved config snapshot, metrics.jsonl lines, NaN written as null."""

import json
import math

import torch
import yaml

from engine.config import RunConfig
from engine.rundir.metrics import MetricsLogger, make_run_dir, read_metrics


def test_run_dir_snapshot_and_metrics(tmp_path):
    cfg = RunConfig(name="demo", seed=7)
    run_dir = make_run_dir(tmp_path, "demo", cfg)
    assert run_dir == tmp_path / "demo"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["seed"] == 7
    with MetricsLogger(run_dir) as m:
        m.log(1, {"train/loss": torch.tensor(2.5), "perf/tokens_per_s": 100})
        m.log(2, {"train/loss": float("nan"), "val/loss": 1.0, "val/subphase": "Stable"})
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["step"] == 1 and first["train/loss"] == 2.5 and first["perf/tokens_per_s"] == 100
    assert second["train/loss"] is None and second["nonfinite"] == ["train/loss"]
    assert second["val/subphase"] == "Stable"
    assert read_metrics(run_dir / "metrics.jsonl")[1]["val/loss"] == 1.0
    # appending (a resumed run) keeps earlier lines
    with MetricsLogger(run_dir) as m:
        m.log(3, {"train/loss": 1.0})
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3]


def test_disabled_logger_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path, enabled=False) as m:
        rec = m.log(1, {"a/b": 1.0})
    assert rec["a/b"] == 1.0 and not (tmp_path / "metrics.jsonl").exists()


def test_tensorboard_events(tmp_path):
    with MetricsLogger(tmp_path, loggers=["jsonl", "tensorboard"]) as m:
        m.log(1, {"train/loss": 1.5, "val/subphase": "Stable"})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert not math.isnan(read_metrics(tmp_path / "metrics.jsonl")[0]["train/loss"])
