"""The one place that picks the rollout backend (`rollout.backend: hf | vllm`) and builds it.

    rollout = build_rollout(job.rollout, job.model, tokenizer, info, workdir=run_dir, seed=0,
                            max_model_len=max_prompt_len + max_new_tokens, hf_batch_size=64)

Call it before the FSDP policy is built: vLLM sizes its memory from what is free when it starts.
Both backends start from the model's initial weights (`model.path`, or random weights from `model.config`)
and receive the policy's weights through `Rollout.sync_weights` before the first generation.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from engine.config import ModelConfig, RolloutConfig
from engine.distributed import DistInfo, barrier, compute_dtype
from engine.models import build_model
from engine.rollout.base import Rollout

__all__ = ["build_rollout"]


def resolve_backend(cfg: RolloutConfig) -> RolloutConfig:
    """`backend: auto` made concrete: vllm where it imports, else hf."""
    if cfg.backend != "auto":
        return cfg
    from engine.rollout.vllm import vllm_available

    return replace(cfg, backend="vllm" if vllm_available() else "hf")


def build_rollout(cfg: RolloutConfig, model_cfg: ModelConfig, tokenizer, info: DistInfo, *, workdir: str | Path,
                  seed: int, max_model_len: int, hf_batch_size: int) -> Rollout:
    cfg = resolve_backend(cfg)
    dtype = compute_dtype(info.device, model_cfg.dtype)
    if cfg.backend == "hf":
        from engine.rollout.hf import HFRollout

        model = build_model(path=model_cfg.path, config=model_cfg.config, dtype=dtype, seed=seed).to(info.device)
        return HFRollout(model, tokenizer, info.device, batch_size=hf_batch_size, bucket_bytes=cfg.bucket_bytes,
                         checksum=cfg.checksum != "off")
    from engine.rollout.vllm import VLLMRollout

    model_dir = model_cfg.path
    if model_dir is None:  # random weights from a config: vLLM loads a directory, so write one
        model_dir = Path(workdir) / "rollout_init"
        if info.is_main:
            build_model(config=model_cfg.config, dtype=torch.float32, seed=seed).save_pretrained(model_dir)
        barrier()
    return VLLMRollout(model_dir, tokenizer, cfg, dtype=str(dtype).removeprefix("torch."),
                       max_model_len=cfg.max_model_len or max_model_len, seed=seed)
