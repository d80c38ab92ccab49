"""Rollout backends behind one interface (`base.Rollout`): transformers `generate` (`hf`) and vLLM (`vllm`).

`engine.rollout.vllm` imports without vLLM; its class raises RuntimeError when vLLM is missing.
"""

from engine.rollout.base import Rollout, RolloutOutput, SamplingParams

__all__ = ["Rollout", "RolloutOutput", "SamplingParams"]
