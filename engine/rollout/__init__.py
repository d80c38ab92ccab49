"""Rollout backends behind one interface (`base.Rollout`): transformers `generate` (`hf`) and vLLM (`vllm`).

`build_rollout` picks the backend from the `rollout:` config section (`RolloutConfig`); the weight sync both
backends share is `weight_sync`. `engine.rollout.vllm` imports without vLLM and raises a clear error when
an engine is built without it.
"""

from engine.config import RolloutConfig
from engine.rollout.base import Rollout, RolloutOutput, SamplingParams, check_weight_version
from engine.rollout.build import build_rollout
from engine.rollout.weight_sync import WeightSyncError

__all__ = ["Rollout", "RolloutConfig", "RolloutOutput", "SamplingParams", "WeightSyncError", "build_rollout",
           "check_weight_version"]
