"""Mirrors of `<run>/metrics.jsonl` to TensorBoard, Weights & Biases and MLflow (`run.loggers`).

    tensorboard   <run>/tb/ events (torch.utils.tensorboard)
    wandb         wandb.init(project=run.project, name=run.name, dir=<run>, config=the resolved config) writes
                  <run>/wandb/; its run id is kept in <run>/wandb_id so a resumed run continues the same W&B run.
                  WANDB_MODE (e.g. offline) and the other WANDB_* variables are honoured by wandb itself.
    mlflow        MLFLOW_TRACKING_URI, else a file store in <run>/mlruns; experiment run.project, run run.name;
                  its run id is kept in <run>/mlflow_run_id so a resumed run continues it; params: the flattened
                  resolved config (`sft.lr`, ...), values cut to MLflow's length limit

metrics.jsonl is written first and keeps everything; these get a record's numeric values only (not bools, not
None, not strings such as `val/subphase`). Each backend is one small class with `log(step, record)` and `close()`;
`Mirrors` runs them so that one which fails to import, start or log is named in one warning and switched off:
a dashboard never stops a run.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("ceiling")

META_KEYS = ("step", "time")  # the record's own bookkeeping, not metrics


def numeric_scalars(record: Mapping[str, Any]) -> dict[str, int | float]:
    """The values a dashboard can plot: numbers, not bools (an int subclass), None or strings."""
    return {key: value for key, value in record.items()
            if key not in META_KEYS and isinstance(value, int | float) and not isinstance(value, bool)}


def _read_id(path: Path) -> str | None:
    text = path.read_text().strip() if path.is_file() else ""
    return text or None


def _write_id(path: Path, run_id: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)  # a crash leaves the old id or the new one, never half of one


class TensorBoardLogger:
    name = "tensorboard"

    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: dict[str, Any] | None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        for key, value in numeric_scalars(record).items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbLogger:
    """A resume re-logs the steps after its checkpoint: W&B ignores (with a warning) steps below the last one it
    has, so those keep their first values there; metrics.jsonl, TensorBoard and MLflow have both."""

    name = "wandb"

    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: dict[str, Any] | None):
        import wandb

        id_file = run_dir / "wandb_id"
        run_id = _read_id(id_file)
        if run_id is None:
            run_id = secrets.token_hex(4)
            _write_id(id_file, run_id)
        # No `reinit`: its "create_new" needs wandb 0.19.10; close() finishes the run, so the next logger in this
        # process (SFT then RL in `ceiling run`) starts a run of its own.
        self._run = wandb.init(project=project, name=run_name, dir=str(run_dir), config=config, id=run_id,
                               resume="allow")

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        scalars = numeric_scalars(record)
        if scalars:
            self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


_MLFLOW_BAD_CHARS = re.compile(r"[^\w./ -]")  # mlflow/utils/validation.py allows these (and ':', not on Windows)


def mlflow_key(key: str) -> str:
    """`key` as a name MLflow accepts: other characters become `_` (`eval/pass@4` -> `eval/pass_4`), and empty,
    `.` and `..` path parts are dropped (MLflow refuses a name that normalises to another path)."""
    parts = [part for part in _MLFLOW_BAD_CHARS.sub("_", key).split("/") if part not in ("", ".", "..")]
    return "/".join(parts) or "_"


def _flatten(config: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class MLflowLogger:
    name = "mlflow"

    def __init__(self, run_dir: Path, *, project: str, run_name: str, config: dict[str, Any] | None):
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import (
            MAX_ENTITY_KEY_LENGTH,
            MAX_METRICS_PER_BATCH,
            MAX_PARAM_VAL_LENGTH,
            MAX_PARAMS_TAGS_PER_BATCH,
        )

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            # MLflow 3 refuses a file store unless asked (mlflow/store/tracking/file_store.py): this one is the
            # run directory's own, so ask, unless the environment already says otherwise.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self._client = client = MlflowClient(tracking_uri=uri)
        self._metric, self._max_key, self._max_batch = Metric, MAX_ENTITY_KEY_LENGTH, MAX_METRICS_PER_BATCH
        id_file = run_dir / "mlflow_run_id"
        run_id, logged = _read_id(id_file), {}
        if run_id is not None:
            try:
                logged = client.get_run(run_id).data.params
                client.update_run(run_id, status="RUNNING")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("mlflow: run %s from %s is not in %s; starting a new MLflow run", run_id, id_file, uri)
                run_id = None
        if run_id is None:
            experiment = client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(project)
            run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
            _write_id(id_file, run_id)
        self._run_id = run_id
        # Params cannot change once logged: a resumed run adds only keys it has not logged yet.
        params = {}
        for key, value in _flatten(config or {}):
            key = mlflow_key(key)[:MAX_ENTITY_KEY_LENGTH]
            if key not in logged:
                params[key] = Param(key, str(value)[:MAX_PARAM_VAL_LENGTH])
        for batch in _chunks(list(params.values()), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=batch)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        timestamp_ms = int(record.get("time", 0) * 1000)
        metrics = [self._metric(mlflow_key(key)[:self._max_key], float(value), timestamp_ms, step)
                   for key, value in numeric_scalars(record).items()]
        for batch in _chunks(metrics, self._max_batch):
            self._client.log_batch(self._run_id, metrics=batch)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


BACKENDS = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MLflowLogger}
NAMES = ("jsonl", *BACKENDS)  # jsonl: metrics.jsonl itself, written by engine/rundir/metrics.py


class Mirrors:
    """The backends named in `names` (jsonl, always written elsewhere, is skipped), each started, fed and closed
    behind one guard: a failure is one warning naming the backend and the error, and that backend is dropped."""

    def __init__(self, names: Sequence[str], run_dir: str | Path, *, project: str, run_name: str,
                 config: dict[str, Any] | None = None):
        unknown = [name for name in names if name not in NAMES]
        if unknown:
            raise ValueError(f"unknown metrics logger(s) {unknown}; choose from {list(NAMES)}")
        self._active: list[Any] = []
        for name in names:
            if name == "jsonl":
                continue
            try:
                self._active.append(BACKENDS[name](Path(run_dir), project=project, run_name=run_name,
                                                   config=config))
            except Exception as exc:  # ImportError, no credentials, an unreachable server, ...
                self._drop(name, "start", exc)

    def _drop(self, name: str, action: str, exc: BaseException) -> None:
        log.warning("metrics logger %s failed to %s and is switched off (metrics.jsonl keeps every record): %s: %s",
                    name, action, type(exc).__name__, exc)

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        for backend in list(self._active):
            try:
                backend.log(step, record)
            except Exception as exc:
                self._active.remove(backend)
                self._drop(backend.name, "log", exc)
                self._close_quietly(backend)

    def _close_quietly(self, backend: Any) -> None:
        try:
            backend.close()
        except Exception:
            pass  # already reported as failed; its own close failing adds nothing

    def close(self) -> None:
        active, self._active = self._active, []
        for backend in active:
            try:
                backend.close()
            except Exception as exc:
                self._drop(backend.name, "close", exc)
