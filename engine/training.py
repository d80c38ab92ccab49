"""What the SFT and RL trainers share: the FSDP2 policy, the optimizer and schedule, the guarded
optimizer step, and the seeded sample order.

    model, hf_config = build_policy(job.model, seed, info)
    optimizer, scheduler = build_optimizer(model, cfg, total_steps)
    grad_norm = guarded_step(model, optimizer, scheduler, cfg.grad_clip, loss_sum, micro_losses, step, ckpt_root)

`guarded_step` is the NaN guard: one host sync per optimizer step, before the update can spoil the
weights. A non-finite loss or gradient norm raises `NonFiniteError` naming the step, the sample ids
of the bad micro-batches and the last good checkpoint, which is left as it was.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from engine.config import FSDPConfig, KernelConfig, ModelConfig
from engine.distributed import DistInfo, all_reduce_sum, apply_fsdp, compute_dtype
from engine.models import PackedCausalLM, build_model, set_attention_backend
from engine.models.hf_checkpoint import load_hf_sharded
from engine.models.patches import apply_kernels
from engine.rundir.checkpoint import latest_checkpoint


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient; the message names the step and the sample ids."""


def build_policy(model_cfg: ModelConfig, seed: int, info: DistInfo, fsdp: FSDPConfig | None = None,
                 kernels: KernelConfig | None = None) -> tuple[PackedCausalLM, object]:
    """The policy under FSDP2 (fp32 master weights, compute in the configured dtype).

    A local HF dir is built on the meta device, sharded, then each rank reads only its shard of the
    safetensors (no rank holds the full model); a random-init config is built whole (seeded) and sharded.
    """
    set_attention_backend(model_cfg.attention)
    meta = model_cfg.path is not None
    hf = build_model(path=model_cfg.path, config=model_cfg.config, dtype=torch.float32, seed=seed, meta=meta)
    model = PackedCausalLM(hf)
    apply_kernels(model, kernels or KernelConfig())
    apply_fsdp(model, model.layers, param_dtype=compute_dtype(info.device, model_cfg.dtype), device=info.device,
               activation_checkpointing=model_cfg.activation_checkpointing, cfg=fsdp)
    if meta:
        load_hf_sharded(model, model_cfg.path, info.device)
    return model, hf.config


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup, then cosine from 1 to `min_ratio` (min_ratio 1 = constant)."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


def build_optimizer(model: torch.nn.Module, cfg, total_steps: int):
    """AdamW + warmup-cosine from a config with lr, betas, eps, weight_decay, warmup_steps, min_lr_ratio."""
    params = list(model.parameters())
    # Fused: one kernel for all parameters (FSDP2's DTensors included) where foreach runs eight, and on CPU none of
    # the two host reads per parameter that foreach makes of its step count for the bias corrections: 117 -> 10
    # aten ops per step on the tiny model (benchmarks/bench_peers.py). NPU keeps foreach: torch_npu's is untested.
    fused = all(p.device.type in ("cuda", "cpu") for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                  weight_decay=cfg.weight_decay, fused=fused or None, foreach=None if fused else True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        warmup_cosine, warmup=cfg.warmup_steps, total=total_steps, min_ratio=cfg.min_lr_ratio))
    return optimizer, scheduler


def guarded_step(model, optimizer, scheduler, grad_clip: float, loss_sum: torch.Tensor,
                 micro_losses: list[tuple[list[int], torch.Tensor]], step: int, ckpt_root, rank: int):
    """Clip, check finiteness (the only per-step host sync), then update. Returns (grad_norm, lr)."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    all_reduce_sum(loss_sum)
    if not (torch.isfinite(loss_sum) & torch.isfinite(grad_norm)).item():
        bad = [ids for ids, loss in micro_losses if not torch.isfinite(loss).item()]
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(
            f"non-finite {'loss' if bad else 'gradient norm'} at step {step}: "
            f"loss_sum={loss_sum.item()}, grad_norm={grad_norm.item()}, "
            f"sample ids of bad micro-batches on rank {rank}: {bad or 'none (loss finite here)'}; "
            f"the last good checkpoint is {latest_checkpoint(ckpt_root)}"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return grad_norm, lr


class DataOrder:
    """A seeded stream of sample indices: epoch e is a fixed permutation; position p is a fixed sample."""

    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError("DataOrder needs at least one sample")
        self.num_samples, self.seed = num_samples, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int):
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.num_samples, generator=gen)
            self._epoch, self._perm = epoch, perm.numpy()  # 8 bytes per sample, not a list of Python ints
        return self._perm

    def take(self, start: int, count: int) -> list[int]:
        """Sample indices at stream positions [start, start + count)."""
        return [int(self._permutation(pos // self.num_samples)[pos % self.num_samples])
                for pos in range(start, start + count)]

    def batch(self, step: int, batch_size: int) -> list[int]:
        return self.take(step * batch_size, batch_size)
