"""Run directory and metrics: `runs/<name>/` with the resolved config, `metrics.jsonl` and its mirrors.

    runs/<name>/config.yaml     the resolved config, exactly what ran (written at start)
    runs/<name>/run.lock        host and pid of the process using the run (engine/rundir/run_lock.py)
    runs/<name>/metrics.jsonl   one JSON object per logged step: {"step": 12, "time": ..., "train/loss": ...}
    runs/<name>/tb/             TensorBoard events (run.loggers: [tensorboard])
    runs/<name>/wandb/, wandb_id          Weights & Biases files and run id (run.loggers: [wandb])
    runs/<name>/mlruns/, mlflow_run_id    MLflow file store (without MLFLOW_TRACKING_URI) and run id ([mlflow])

metrics.jsonl is the source of truth: always written, first; the loggers in engine/rundir/loggers.py mirror its
numeric values, and one that fails is switched off with a warning, never stopping the run.
Keys are namespaced with `/` (`train/loss`, `val/loss`, `perf/tokens_per_s`, `compute/exaflops`).
Only rank 0 writes. Values may be Python numbers or 0-d tensors; they are converted here, at the
logging interval, which is the only place the training loop pays for a host sync. NaN and inf are
written as null (JSON has no NaN) and listed under "nonfinite".
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from engine.config import dump_config
from engine.rundir.loggers import Mirrors
from engine.rundir.run_lock import acquire_run_lock


def make_run_dir(output_dir: str | Path, name: str, cfg: Any | None = None) -> Path:
    """Create `output_dir/name` (kept if it exists: resume), lock it for this run (rank 0) and snapshot the
    resolved config."""
    import torch.distributed as dist

    run_dir = Path(output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    if not dist.is_initialized() or dist.get_rank() == 0:
        acquire_run_lock(run_dir)
    if cfg is not None:
        dump_config(cfg, run_dir / "config.yaml")
    return run_dir


def _to_number(value: Any) -> Any:
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    return value


class MetricsLogger:
    """Appends one JSON line per `log` call, then hands the record to the other `loggers` (run.loggers)."""

    def __init__(self, run_dir: str | Path, *, loggers: Sequence[str] = ("jsonl",), project: str = "ceiling-engine",
                 run_name: str | None = None, config: dict[str, Any] | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._mirrors = Mirrors(loggers if enabled else (), run_dir, project=project,
                                run_name=run_name or Path(run_dir).name, config=config)
        self._file = self.path.open("a") if enabled else None

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        record: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        nonfinite = []
        for key, value in metrics.items():
            value = _to_number(value)
            if isinstance(value, float) and not math.isfinite(value):
                nonfinite.append(key)
                value = None
            record[key] = value
        if nonfinite:
            record["nonfinite"] = nonfinite
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        self._mirrors.log(int(step), record)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mirrors.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a metrics.jsonl back (used by reports and tests)."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def progress(total: int, desc: str, *, initial: int = 0, enabled: bool = True) -> tqdm:
    """A progress bar with rate and ETA; silent on non-zero ranks (`enabled=False`)."""
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True, smoothing=0.1)
