"""Every config section, declared once, and the jobs composed from them (torchtitan's `config/` layout).

    from engine.config import RLJobConfig, load_config
    job = load_config("configs/rl-tiny.yaml", RLJobConfig, overrides=["rollout.backend=vllm"])

loader.py     reads YAML + `--set` overrides into a job, checks every key and type, writes the resolved config
sections.py   run, model, data, kernels, fsdp, rollout, eval, reward
training.py   sft, rl
study.py      pipeline, sweep (and its scenes), corpus (pretraining)
jobs.py       SFT, RL, run, sweep, pretrain and eval jobs: which sections each takes and which keys it ignores
"""

from engine.config.jobs import (
    EvalJobConfig,
    PretrainJobConfig,
    RLJobConfig,
    RunJobConfig,
    SFTJobConfig,
    SweepJobConfig,
)
from engine.config.loader import add_config_arguments, dump_config, from_dict, load_config, to_dict
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
from engine.config.study import BASELINES, PipelineConfig, PretrainCorpusConfig, SceneSpec, SweepConfig
from engine.config.training import RLConfig, SFTConfig

__all__ = [
    "BASELINES", "DataConfig", "EvalConfig", "EvalJobConfig", "FSDPConfig", "KernelConfig", "ModelConfig",
    "PipelineConfig", "PretrainCorpusConfig", "PretrainJobConfig", "RLConfig", "RLJobConfig", "RewardConfig",
    "RolloutConfig",
    "RunConfig", "RunJobConfig", "SFTConfig", "SFTJobConfig", "SceneSpec", "SweepConfig", "SweepJobConfig",
    "add_config_arguments", "dump_config", "from_dict", "load_config", "to_dict",
]
