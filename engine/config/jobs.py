"""The jobs, each composed from the sections it honours (engine/config/sections.py, training.py, study.py).

    ceiling sft CONFIG       SFTJobConfig        run model data sft kernels fsdp
    ceiling rl CONFIG        RLJobConfig         run model data rl reward rollout kernels fsdp
    ceiling run CONFIG       RunJobConfig        run model data sft rl reward pipeline rollout kernels fsdp
    ceiling sweep CONFIG     SweepJobConfig      run model data sft rl reward sweep rollout kernels fsdp (+ quick)
    ceiling pretrain CONFIG  PretrainJobConfig   run model corpus sft kernels fsdp (+ max_seq_len, export_dir)
    ceiling eval MODEL       EvalJobConfig       run data rollout eval reward (--set only; the model is the argument)

A job takes a section whole or not at all; where it takes a section but not every key of it, the key is in
its `UNUSED` map with what to set instead, and setting it is an error (engine/config/loader.py), so no key
in a config file is silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from engine.config.sections import (
    DataConfig,
    EvalConfig,
    FSDPConfig,
    KernelConfig,
    ModelConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
)
from engine.config.study import PipelineConfig, PretrainCorpusConfig, SweepConfig
from engine.config.training import RLConfig, SFTConfig
from engine.data.synthetic import SyntheticTaskConfig
from engine.errors import ConfigError

TINY_MODEL = "configs/models/tiny-qwen2.json"


def _tiny_model() -> ModelConfig:
    return ModelConfig(config=TINY_MODEL, tokenizer="char")


# RL reads prompts (rl.prompts_path, or the synthetic task's rl split), never SFT data files.
_SFT_DATA_KEYS = ("train_path", "val_path", "max_seq_len", "overlong", "tokenize_workers")
_RL_DATA_UNUSED = {f"data.{key}": "RL reads its prompts from rl.prompts_path or data.synthetic; this key is SFT's"
                   for key in _SFT_DATA_KEYS}
_INIT_SET_BY_JOB = {"rl.init_checkpoint": "this job starts each RL run from the SFT checkpoint it chose"}


@dataclass
class SFTJobConfig:
    COMMAND: ClassVar[str] = "ceiling sft"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=_tiny_model)
    data: DataConfig = field(default_factory=lambda: DataConfig(synthetic=None, train_path="train.jsonl"))
    sft: SFTConfig = field(default_factory=SFTConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class RLJobConfig:
    COMMAND: ClassVar[str] = "ceiling rl"
    UNUSED: ClassVar[dict[str, str]] = _RL_DATA_UNUSED
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=_tiny_model)
    data: DataConfig = field(default_factory=DataConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class RunJobConfig:
    COMMAND: ClassVar[str] = "ceiling run"
    UNUSED: ClassVar[dict[str, str]] = _INIT_SET_BY_JOB
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=_tiny_model)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)


@dataclass
class SweepJobConfig:
    COMMAND: ClassVar[str] = "ceiling sweep"
    UNUSED: ClassVar[dict[str, str]] = {
        **_INIT_SET_BY_JOB,
        **{f"sft.{key}": "the sweep checkpoints SFT at every validation and keeps every checkpoint"
           for key in ("checkpoint_every", "keep_checkpoints", "save_best", "export_hf")},
        "rl.export_hf": "the sweep's branches keep their checkpoints; `ceiling export` turns any of them into an "
                        "HF directory",
    }
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=_tiny_model)
    data: DataConfig = field(default_factory=lambda: DataConfig(synthetic=SyntheticTaskConfig()))
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    kernels: KernelConfig = field(default_factory=KernelConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    quick: list[str] = field(default_factory=list)
    """`--set` overrides that `ceiling sweep CONFIG --quick` applies first: the same study, smaller, as a smoke
    check (give it its own run.name)."""

    def __post_init__(self):
        if self.data.synthetic is not None:
            return
        for scene in self.sweep.scenes:  # on files: every scene names (or inherits) its SFT, RL and eval data
            files = {"train_path": scene.train_path or self.data.train_path,
                     "val_path": scene.val_path or self.data.val_path,
                     "prompts_path": scene.prompts_path or self.rl.prompts_path,
                     "eval_path": scene.eval_path or self.rl.eval_path}
            missing = [k for k, v in files.items() if v is None]
            if missing:
                raise ValueError(f"sweep.scenes[{scene.name}]: a sweep on files needs {', '.join(missing)} (in the "
                                 "scene, or data.train_path/val_path and rl.prompts_path/eval_path for every scene), "
                                 "or data.synthetic for the built-in task")
            if scene.num_train is not None or scene.difficulty_mix is not None:
                raise ValueError(f"sweep.scenes[{scene.name}]: num_train and difficulty_mix vary data.synthetic; on "
                                 "files, give the scene its own train_path")


@dataclass
class PretrainJobConfig:
    COMMAND: ClassVar[str] = "ceiling pretrain"
    UNUSED: ClassVar[dict[str, str]] = {"sft.export_hf": "pretraining always exports its HF directory"}
    run: RunConfig = field(default_factory=lambda: RunConfig(name="pretrain-tiny"))
    model: ModelConfig = field(default_factory=_tiny_model)
    corpus: PretrainCorpusConfig = field(default_factory=PretrainCorpusConfig)
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(
        steps=300, global_batch_size=32, micro_batch_tokens=4096, lr=2e-3, warmup_steps=20, val_every=50,
        checkpoint_every=100, keep_checkpoints=1))
    """Optimisation of the stage (the `sft:` section)."""
    kernels: KernelConfig = field(default_factory=KernelConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    max_seq_len: int = 256
    """Longest corpus row in tokens."""
    export_dir: str | None = None
    """Also copy the final HF directory here (e.g. configs/models/tiny-base, the base the demo and sweep use)."""

    def __post_init__(self):
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")


@dataclass
class EvalJobConfig:
    COMMAND: ClassVar[str] = "ceiling eval"
    UNUSED: ClassVar[dict[str, str]] = {
        f"run.{key}": "evaluation writes no run directory; use --json for the result"
        for key in ("name", "output_dir", "loggers", "project", "progress", "log_every", "peak_tflops",
                    "on_bad_checkpoint")} | {
        f"data.{key}": "evaluation reads the benchmark files given to it; only data.fields applies"
        for key in ("synthetic", *_SFT_DATA_KEYS)}
    run: RunConfig = field(default_factory=RunConfig)
    """Only `device` and `seed` (the sampling seed) are read."""
    data: DataConfig = field(default_factory=DataConfig)
    """Only `fields` (how the benchmark rows map) is read."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


def check_inputs(job, label: str) -> None:
    """Every file or directory the job will read exists, checked before any work starts (a run should not tokenize
    its data and then stop on a missing model config). Relative paths are read from the working directory."""
    from pathlib import Path

    from engine.data.files import expand_paths
    from engine.errors import DataError

    model, data, rl = getattr(job, "model", None), getattr(job, "data", None), getattr(job, "rl", None)
    wanted = []  # (dotted key, path, hint)
    data_files = []  # (dotted key, path setting): files, globs or lists of them
    if model is not None:
        wanted += [("model.path", model.path, ""), ("model.config", model.config, "")]
        if model.tokenizer not in (None, "char", model.path):
            wanted.append(("model.tokenizer", model.tokenizer, ""))
    if data is not None and data.synthetic is None and not isinstance(job, RLJobConfig | EvalJobConfig):
        data_files += [("data.train_path", data.train_path), ("data.val_path", data.val_path)]
    if rl is not None:
        data_files += [("rl.prompts_path", rl.prompts_path), ("rl.eval_path", rl.eval_path)]
        if isinstance(job, RLJobConfig):
            wanted.append(("rl.init_checkpoint", rl.init_checkpoint,
                           "; it is written by an SFT run: run that first (configs/rl-tiny.yaml starts from "
                           "`ceiling sft configs/sft-tiny.yaml`, which writes runs/sft-tiny/checkpoints)"))
    for scene in getattr(getattr(job, "sweep", None), "scenes", []):
        data_files += [(f"sweep.scenes[{scene.name}].{key}", getattr(scene, key))
                       for key in ("train_path", "val_path", "prompts_path", "eval_path")]
    reward = getattr(job, "reward", None)
    if reward is not None and reward.function is not None:
        wanted.append(("reward.function", reward.function.rsplit(":", 1)[0], ""))
    for key, path, hint in wanted:
        if path is not None and not Path(path).exists():
            where = "" if Path(path).is_absolute() else f" (relative to the working directory {Path.cwd()})"
            raise ConfigError(f"{label}: {key}: {path} does not exist{where}{hint}")
    for key, spec in data_files:
        if spec is not None:
            try:
                expand_paths(spec, key)
            except DataError as exc:
                raise ConfigError(f"{label}: {exc}") from None
