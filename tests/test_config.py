"""Config loading: unknown keys, wrong types, bad values and missing files name the file and the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from engine.config import RunConfig, dump_config, load_config
from engine.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)
    path: str | None = None

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"inner.steps must be >= 1, got {self.steps}")


@dataclass
class Job:
    run: RunConfig = field(default_factory=RunConfig)
    inner: Inner = field(default_factory=Inner)


def write(tmp_path, text):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_loads_values_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "run:\n  name: x\ninner:\n  lr: 3\n  tags: [a, b]\n"), Job)
    assert cfg.run.name == "x" and cfg.run.seed == 0
    assert cfg.inner.lr == 3.0 and isinstance(cfg.inner.lr, float)  # an int is a valid float
    assert cfg.inner.tags == ["a", "b"] and cfg.inner.path is None


def test_unknown_key_names_file_and_key(tmp_path):
    path = write(tmp_path, "inner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"job\.yaml: inner\.lrr: unknown key") as exc:
        load_config(path, Job)
    assert "lr" in str(exc.value)  # lists the known keys


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"job\.yaml: trainer: unknown key"):
        load_config(write(tmp_path, "trainer: {}\n"), Job)


@pytest.mark.parametrize(
    "text, message",
    [
        ("inner:\n  steps: ten\n", r"inner\.steps: expected an integer, got 'ten'"),
        ("inner:\n  steps: 1.5\n", r"inner\.steps: expected an integer"),
        ("inner:\n  lr: fast\n", r"inner\.lr: expected a number"),
        ("inner:\n  mode: c\n", r"inner\.mode: 'c' is not one of 'a', 'b'"),
        ("inner:\n  tags: a\n", r"inner\.tags: expected a list"),
        ("run:\n  progress: 1\n", r"run\.progress: expected true/false"),
        ("inner: 3\n", r"inner: expected a mapping"),
    ],
)
def test_wrong_type_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=r"job\.yaml: " + message):
        load_config(write(tmp_path, text), Job)


def test_post_init_validation_names_the_section(tmp_path):
    with pytest.raises(ConfigError, match=r"job\.yaml: inner: inner\.steps must be >= 1"):
        load_config(write(tmp_path, "inner:\n  steps: 0\n"), Job)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml", Job)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "inner: [1,\n"), Job)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n"), Job)


def test_overrides(tmp_path):
    path = write(tmp_path, "inner:\n  lr: 0.1\n")
    cfg = load_config(path, Job, ["inner.lr=3e-4", "inner.tags=[x]", "run.name=o", "inner.path=null"])
    assert cfg.inner.lr == 3e-4 and cfg.inner.tags == ["x"] and cfg.run.name == "o"
    with pytest.raises(ConfigError, match=r"--set inner\.lrr: unknown key 'lrr'"):
        load_config(path, Job, ["inner.lrr=1"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, Job, ["inner.lr"])
    with pytest.raises(ConfigError, match=r"inner\.steps: expected an integer"):
        load_config(path, Job, ["inner.steps=abc"])


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, Job, ["inner.tags=[a]", "run.seed=3"])
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml", Job) == cfg


def test_shipped_configs_load():
    """Every YAML in configs/ loads into its job's dataclasses."""
    from pathlib import Path

    from engine.config import PretrainJobConfig, RLJobConfig, RunJobConfig, SFTJobConfig, SweepJobConfig
    root = Path(__file__).resolve().parents[1] / "configs"
    kinds = {"sft": SFTJobConfig, "rl": RLJobConfig, "sweep": SweepJobConfig, "pretrain": PretrainJobConfig}
    paths = sorted(root.glob("*.yaml"))
    assert root / "tiny.yaml" in paths and root / "sft-tiny.yaml" in paths and root / "rl-tiny.yaml" in paths
    for path in paths:
        load_config(path, kinds.get(path.name.split("-")[0], RunJobConfig))
