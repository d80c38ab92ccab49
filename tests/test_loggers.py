"""Metrics loggers (run.loggers): each backend written for real, offline, and read back with its own reader;
a failing backend is switched off with a warning while metrics.jsonl keeps every record; a resumed run continues
the same W&B and MLflow run; the config rejects unknown and repeated logger names."""

import json
import logging
import struct
import sys

import pytest

from engine.config import EvalJobConfig, SFTJobConfig, load_config
from engine.errors import ConfigError
from engine.rundir.loggers import mlflow_key
from engine.rundir.metrics import MetricsLogger, read_metrics

STEP1 = {"train/loss": 1.5, "eval/pass@4": 0.25, "flag": True, "val/subphase": "Stable", "gone": float("nan")}
STEP2 = {"train/loss": 1.25}
SENT = {1: {"train/loss": 1.5, "eval/pass@4": 0.25}, 2: {"train/loss": 1.25}}  # numbers only: no bool/str/None


@pytest.fixture
def offline(monkeypatch):
    """W&B offline and quiet (no console capture under pytest); MLflow left to pick `<run>/mlruns`. The logger
    sets MLFLOW_ALLOW_FILE_STORE for that store: the setenv before the delenv makes monkeypatch unset it again."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "false")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")


def log_two_steps(run_dir, loggers, **kwargs):
    with MetricsLogger(run_dir, loggers=loggers, **kwargs) as m:
        m.log(1, STEP1)
        m.log(2, STEP2)


def wandb_records(path):
    """The records of an offline run's `run-<id>.wandb`: LevelDB's log format (google/leveldb doc/log_format.md:
    32 KiB blocks of chunks with a 7-byte crc/length/type header) after W&B's 7-byte file header (':W&B', magic,
    version), each record a `wandb.proto.wandb_internal_pb2.Record`."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a record is complete
            record = Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def end_wandb_process():
    """What the end of a training process does: stop wandb's service, which writes out the `.wandb` file (it
    flushes it only every `x_transaction_log_flush_interval`, 15 s, and when it stops)."""
    import wandb

    wandb.teardown()


def wandb_files(run_dir):
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files
    return files


def wandb_history(path):
    history = {}
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def test_tensorboard_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_two_steps(tmp_path, ["jsonl", "tensorboard"])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["eval/pass@4", "train/loss"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.5), (2, 1.25)]
    assert [(e.step, e.value) for e in events.Scalars("eval/pass@4")] == [(1, 0.25)]


def test_wandb_offline_read_back(tmp_path, offline):
    config = {"run": {"name": "demo"}, "sft": {"lr": 0.5}}
    log_two_steps(tmp_path, ["wandb"], project="proj", run_name="demo", config=config)
    end_wandb_process()
    run_id = (tmp_path / "wandb_id").read_text().strip()
    (path,) = wandb_files(tmp_path)
    runs = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
    assert runs and all(r.run_id == run_id and r.project == "proj" and r.display_name == "demo" for r in runs)
    sent_config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert sent_config["sft"] == {"lr": 0.5} and sent_config["run"] == {"name": "demo"}
    assert wandb_history(path) == SENT
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]  # jsonl is always written


def test_mlflow_file_store_read_back(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = (tmp_path / "store").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = {"run": {"name": "demo", "loggers": ["mlflow"]}, "sft": {"lr": 0.5, "note": "x" * 10_000}}
    log_two_steps(run_dir, ["jsonl", "mlflow"], project="proj", run_name="demo", config=config)
    assert not (run_dir / "mlruns").exists()  # MLFLOW_TRACKING_URI wins over the run directory's store
    client = MlflowClient(tracking_uri=store)
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.info.run_name == "demo" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "proj"
    assert run.data.params["sft.lr"] == "0.5" and run.data.params["run.loggers"] == "['mlflow']"
    assert len(run.data.params["sft.note"]) == 6000  # MLflow's MAX_PARAM_VAL_LENGTH
    assert set(run.data.metrics) == {"train/loss", "eval/pass_4"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval/pass_4")] == [(1, 0.25)]
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.5), (2, 1.25)]


def test_mlflow_key_is_a_name_mlflow_accepts():
    assert mlflow_key("eval/pass@4") == "eval/pass_4"
    assert mlflow_key("/a//b/./c:d") == "a/b/c_d"
    assert mlflow_key("train/loss") == "train/loss"


def test_resume_continues_the_same_runs(tmp_path, offline):
    from mlflow.tracking import MlflowClient

    with MetricsLogger(tmp_path, loggers=["wandb", "mlflow"], project="proj", run_name="demo") as m:
        m.log(1, STEP1)
    end_wandb_process()  # the resumed run is another process
    wandb_id = (tmp_path / "wandb_id").read_text().strip()
    mlflow_id = (tmp_path / "mlflow_run_id").read_text().strip()
    with MetricsLogger(tmp_path, loggers=["wandb", "mlflow"], project="proj", run_name="demo") as m:
        m.log(2, STEP2)
    end_wandb_process()
    assert (tmp_path / "wandb_id").read_text().strip() == wandb_id
    assert (tmp_path / "mlflow_run_id").read_text().strip() == mlflow_id
    steps = set()
    for path in wandb_files(tmp_path):  # one offline run folder per start, every one the same W&B run
        runs = [r.run for r in wandb_records(path) if r.WhichOneof("record_type") == "run"]
        assert runs and {r.run_id for r in runs} == {wandb_id}
        steps |= set(wandb_history(path))
    assert len(wandb_files(tmp_path)) == 2 and steps == {1, 2}
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "proj"]
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [mlflow_id]
    assert sorted(m.step for m in client.get_metric_history(mlflow_id, "train/loss")) == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_logger_failing_to_log_is_switched_off(tmp_path, monkeypatch, caplog):
    from torch.utils.tensorboard import SummaryWriter

    def broken(*args, **kwargs):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(SummaryWriter, "add_scalar", broken)
    with caplog.at_level(logging.WARNING, logger="ceiling"), MetricsLogger(tmp_path, loggers=["tensorboard"]) as m:
        for step in range(1, 4):
            m.log(step, {"train/loss": float(step)})
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # reported once, then off
    assert "tensorboard" in warnings[0] and "failed to log" in warnings[0] and "disk quota exceeded" in warnings[0]
    assert [r["train/loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_logger_failing_to_start_is_switched_off(tmp_path, monkeypatch, caplog, name):
    if name == "wandb":
        monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises
        error = "import of wandb halted"
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
        error = "nosuchscheme"
    with caplog.at_level(logging.WARNING, logger="ceiling"), MetricsLogger(tmp_path, loggers=[name]) as m:
        m.log(1, STEP1)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert name in warning and "failed to start" in warning and error in warning
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["train/loss"] == 1.5


def test_config_loggers_and_project():
    job = load_config(None, SFTJobConfig, ["run.loggers=[jsonl, tensorboard, wandb, mlflow]", "run.project=p"])
    assert job.run.loggers == ["jsonl", "tensorboard", "wandb", "mlflow"] and job.run.project == "p"
    assert load_config(None, SFTJobConfig).run.loggers == ["jsonl"]
    with pytest.raises(ConfigError, match=r"run\.loggers\[0\]: 'foo' is not one of 'jsonl'"):
        load_config(None, SFTJobConfig, ["run.loggers=[foo]"])
    with pytest.raises(ConfigError, match=r"run\.loggers lists wandb more than once"):
        load_config(None, SFTJobConfig, ["run.loggers=[wandb, tensorboard, wandb]"])
    with pytest.raises(ConfigError, match=r"run\.loggers: `ceiling eval` does not use this key"):
        load_config(None, EvalJobConfig, ["run.loggers=[wandb]"])


def test_unknown_logger_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown metrics logger"):
        MetricsLogger(tmp_path, loggers=["neptune"])
