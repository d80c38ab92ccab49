"""One set of config sections composed into every job: each job takes the sections it honours, honours them,
and refuses a key it would ignore (engine/config/jobs.py)."""

import dataclasses

import pytest

from engine.config import (
    DataConfig,
    EvalJobConfig,
    FSDPConfig,
    KernelConfig,
    ModelConfig,
    PretrainJobConfig,
    RLConfig,
    RLJobConfig,
    RolloutConfig,
    RunConfig,
    RunJobConfig,
    SFTJobConfig,
    SweepJobConfig,
    load_config,
)
from engine.data.synthetic import SyntheticTaskConfig
from engine.errors import ConfigError


def sections(job_cls) -> set[str]:
    return {f.name for f in dataclasses.fields(job_cls)}


def test_every_job_takes_the_fast_sections():
    assert sections(SFTJobConfig) == {"run", "model", "data", "sft", "kernels", "fsdp"}
    # the reward is one section, shared by every job that scores responses (one rule for a run's every score)
    assert sections(RLJobConfig) == {"run", "model", "data", "rl", "reward", "rollout", "kernels", "fsdp"}
    assert sections(RunJobConfig) == {"run", "model", "data", "sft", "rl", "reward", "pipeline", "rollout", "kernels",
                                      "fsdp"}
    assert sections(SweepJobConfig) == {"run", "model", "data", "sft", "rl", "reward", "sweep", "rollout", "kernels",
                                        "fsdp", "quick"}
    assert {"kernels", "fsdp"} <= sections(PretrainJobConfig)
    assert sections(EvalJobConfig) == {"run", "data", "rollout", "eval", "reward"}


def test_each_section_is_declared_once():
    """The job classes hold the very same section classes (no per-job copies)."""
    for job in (SFTJobConfig, RLJobConfig, RunJobConfig, SweepJobConfig, PretrainJobConfig, EvalJobConfig):
        hints = {f.name: f.type for f in dataclasses.fields(job)}
        for name, cls in (("run", "RunConfig"), ("rollout", "RolloutConfig"), ("kernels", "KernelConfig"),
                          ("fsdp", "FSDPConfig"), ("reward", "RewardConfig")):
            if name in hints:
                assert hints[name] == cls, (job, name)


@pytest.mark.parametrize("config, job_cls", [("configs/tiny.yaml", RunJobConfig),
                                             ("configs/sweep-tiny.yaml", SweepJobConfig),
                                             ("configs/rl-tiny.yaml", RLJobConfig)])
def test_the_main_jobs_take_rollout_kernels_and_fsdp(config, job_cls):
    job = load_config(config, job_cls, ["rollout.backend=vllm", "kernels.liger_rms_norm=true",
                                        "fsdp.activation_checkpointing_every=2"])
    assert job.rollout.backend == "vllm" and job.kernels.liger_rms_norm
    assert job.fsdp.activation_checkpointing_every == 2


@pytest.mark.parametrize("job_cls, text, key", [
    (RLJobConfig, "data:\n  train_path: sft.jsonl\n", "data.train_path"),
    (RLJobConfig, "data:\n  max_seq_len: 512\n", "data.max_seq_len"),
    (RLJobConfig, "data:\n  tokenize_workers: 4\n", "data.tokenize_workers"),
    (RunJobConfig, "rl:\n  init_checkpoint: runs/x/checkpoints\n", "rl.init_checkpoint"),
    (SweepJobConfig, "sft:\n  export_hf: true\n", "sft.export_hf"),
    (SweepJobConfig, "rl:\n  init_checkpoint: x\n", "rl.init_checkpoint"),
    (PretrainJobConfig, "sft:\n  export_hf: false\n", "sft.export_hf"),
    (EvalJobConfig, "run:\n  name: x\n", "run.name"),
    (EvalJobConfig, "data:\n  train_path: x.jsonl\n", "data.train_path"),
    (SweepJobConfig, "rl:\n  export_hf: true\n", "rl.export_hf"),
])
def test_a_key_the_job_would_ignore_is_an_error_naming_file_and_key(tmp_path, job_cls, text, key):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"job\.yaml: {key.replace('.', r'[.]')}: `ceiling \w+` does not use"):
        load_config(path, job_cls)
    # and from the command line
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"{section}[.]{name}: `ceiling \w+` does not use"):
        load_config(None, job_cls, [f"{key}={yaml_value(text)}"])


def yaml_value(text: str) -> str:
    return text.splitlines()[1].split(":", 1)[1].strip()


def test_rl_builds_its_policy_with_the_kernels_and_fsdp_sections(tmp_path, trainer_env):
    """`kernels:` and `fsdp:` reach the RL policy as they reach SFT's (Liger RMSNorm swapped in; every second
    layer checkpoint-wrapped, selectively; on one rank in fp32 no FSDP2 wrapping, `distributed.fsdp_needed`)."""
    pytest.importorskip("liger_kernel", reason="liger-kernel is a dev dependency (make test installs it)")
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule

    from engine.rl.trainer import RLTrainer

    job = RLJobConfig(
        run=RunConfig(name="rl", output_dir=str(tmp_path), progress=False, device="cpu"),
        model=ModelConfig(config="configs/models/tiny-qwen2.json", tokenizer="char", activation_checkpointing=True),
        data=DataConfig(synthetic=SyntheticTaskConfig(num_train=16, num_val=4, num_rl=8, num_eval=4, seed=1)),
        rl=RLConfig(steps=1, max_prompt_len=96, max_new_tokens=8, micro_batch_tokens=512),
        rollout=RolloutConfig(backend="hf"),
        kernels=KernelConfig(liger_rms_norm=True),
        fsdp=FSDPConfig(activation_checkpointing_every=2, activation_checkpointing_mode="selective_op"),
    )
    trainer = RLTrainer(job)
    layers = trainer.model.layers
    wrapped = [isinstance(layer, CheckpointWrapper) for layer in layers]
    assert wrapped == [i % 2 == 0 for i in range(len(layers))]
    assert not any(isinstance(m, FSDPModule) for m in trainer.model.modules())
    norms = [type(m).__name__ for m in trainer.model.modules() if "RMSNorm" in type(m).__name__]
    assert norms and set(norms) == {"LigerRMSNorm"}


def test_pipeline_and_sweep_pass_every_section_to_their_phases(tmp_path):
    from engine.pipeline import Pipeline
    from engine.sweep.items import Sweep

    over = [f"run.output_dir={tmp_path}", "rollout.backend=vllm", "rollout.bucket_mib=7", "kernels.compile=true",
            "fsdp.reshard_after_forward=false"]
    run = load_config("configs/tiny.yaml", RunJobConfig, over)
    pipe = Pipeline(run)
    for phase in (pipe.sft_job(run.sft), pipe.rl_job("ckpt")):
        assert phase.kernels == run.kernels and phase.fsdp == run.fsdp
    rl = pipe.rl_job("ckpt")
    assert rl.rollout == run.rollout and rl.rl.init_checkpoint == "ckpt"
    sweep_job = load_config("configs/sweep-tiny.yaml", SweepJobConfig, over + ["sweep.matched_compute=false"])
    sweep = Sweep(sweep_job)
    rl_job, _ = sweep.rl_job(sweep_job.sweep.scenes[0], "n200/rl/0", "dapo_dc", None)
    assert rl_job.rollout.bucket_mib == 7 and rl_job.kernels.compile and not rl_job.fsdp.reshard_after_forward


@pytest.mark.parametrize("job_cls", [SFTJobConfig, RLJobConfig, RunJobConfig, SweepJobConfig, PretrainJobConfig,
                                     EvalJobConfig])
def test_a_dumped_config_loads_back_into_the_same_job(tmp_path, job_cls):
    """`<run>/config.yaml` is what sweep workers and resumed runs read: it leaves out the keys the job refuses."""
    from engine.config import dump_config, to_dict

    job = job_cls()
    dump_config(job, tmp_path / "config.yaml")
    assert to_dict(load_config(tmp_path / "config.yaml", job_cls)) == to_dict(job)


def test_every_input_path_is_checked_before_work_starts(tmp_path, monkeypatch, capsys):
    """From another directory, a config's relative paths are missing: the job says so before it tokenizes or
    builds anything; RL before its SFT says which run to do first."""
    from pathlib import Path

    from engine.cli import main

    config = Path("configs/sft-tiny.yaml").resolve()
    monkeypatch.chdir(tmp_path)
    assert main(["sft", str(config), "--set", f"run.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "model.config: configs/models/tiny-qwen2.json does not exist (relative to the working directory" in err
    assert not (tmp_path / "sft-tiny").exists()  # nothing was started
    monkeypatch.chdir(config.parent.parent)
    assert main(["rl", "configs/rl-tiny.yaml", "--set", f"rl.init_checkpoint={tmp_path / 'none'}"]) == 2
    assert "ceiling sft configs/sft-tiny.yaml" in capsys.readouterr().err
