"""Process groups, devices and FSDP2, in one place: the rest of the engine never asks which rank it is.

Device types and their collective backends:
    cuda  nccl   bf16 params and compute, fp32 gradient reduction
    npu   hccl   via torch_npu (Ascend). Written against torch_npu's documented API; NOT run here
    cpu   gloo   fp32 throughout; how tests run FSDP2 with 2 ranks

Launch with torchrun (one or many nodes); a plain `python` run is a world of one.

    torchrun --nproc-per-node 8 -m engine.cli sft configs/qwen2.5-7b-sft.yaml
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from engine.config import FSDPConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_device_type(requested: str = "auto") -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    try:
        import torch_npu  # noqa: F401

        if torch.npu.is_available():
            return "npu"
    except ImportError:
        pass
    return "cpu"


BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def init_distributed(device_type: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise the default process group (a world of one without torchrun) and pick the device."""
    device_type = detect_device_type(device_type)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif device_type == "npu":
        import torch_npu  # noqa: F401  (registers the npu device and the hccl backend)

        torch.npu.set_device(local_rank)
        device = torch.device("npu", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if world_size == 1:  # an in-memory store: no port to collide with other runs on this host
            dist.init_process_group(BACKENDS[device_type], store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        else:  # torchrun (or a test spawning ranks) sets MASTER_PORT
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(BACKENDS[device_type], rank=rank, world_size=world_size, timeout=timeout)
    return DistInfo(rank, world_size, local_rank, device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def compute_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """bf16 on accelerators, fp32 on CPU, unless the config says otherwise."""
    if requested == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]


# Ops whose outputs selective_op checkpointing keeps (compute-bound: recomputing them costs a matmul or an attention
# pass; communication is never redone); every other op in a checkpointed layer is recomputed. Ops this build of
# torch (or torch_npu, flash_attn) does not have are skipped. The policy sees the op a module dispatches, not the
# kernels inside it: `torch.nn.attention.varlen.varlen_attn` (the `varlen` backend on CUDA) is the custom op
# `torch_attn::_varlen_attn`, whose inner `aten::_flash_attention_forward` never reaches the policy.
SAVED_OPS = (
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_fused_attention_overrideable", "aten::_flash_attention_forward",
    "aten::_efficient_attention_forward", "torch_attn::_varlen_attn", "flash_attn::_flash_attn_varlen_forward",
    "npu::npu_fusion_attention", "_c10d_functional::reduce_scatter_tensor",
)


def saved_ops() -> set:
    try:  # registers torch_attn::_varlen_attn (a Python custom op: absent until its module is imported)
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:  # a torch without varlen_attn
        pass
    ops = set()
    for qualified in SAVED_OPS:
        namespace, name = qualified.split("::")
        try:
            ops.add(getattr(getattr(torch.ops, namespace), name).default)
        except (AttributeError, RuntimeError):  # not registered in this process
            continue
    return ops


def selective_op_context():
    """`context_fn` for torch.utils.checkpoint: save the outputs of `saved_ops()`, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = saved_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def fsdp_needed(param_dtype: torch.dtype) -> bool:
    """FSDP2 has work to do: more than one rank to shard over, or a compute dtype to cast the fp32 parameters to.
    On one rank in fp32 it would only add per-parameter all-gather copies and hooks to every forward and
    backward (268 aten ops per micro-batch on the tiny model, benchmarks/RESULTS.md), so the model stays plain."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    return world > 1 or param_dtype != torch.float32


def apply_fsdp(model: nn.Module, layers: nn.ModuleList, *, param_dtype: torch.dtype, device: torch.device,
               activation_checkpointing: bool = False, cfg: FSDPConfig | None = None,
               always: bool = False) -> nn.Module:
    """FSDP2: activation checkpointing (optional: every k-th layer, full or selective per op), then fully_shard per
    decoder layer, then the root; on one rank in fp32 (`fsdp_needed`) no fully_shard unless `always`.

    Parameters stay fp32 (the optimizer's master copy); FSDP casts them to `param_dtype` for compute
    and reduces gradients in fp32. The root is not resharded after forward: backward needs it at once.
    A model on the meta device stays there; `engine.models.hf_checkpoint.load_hf_sharded` then allocates
    each rank's shards and fills them from the HF files, so no rank ever holds all of it.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg = cfg or FSDPConfig()
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        extra = {"context_fn": selective_op_context} if cfg.activation_checkpointing_mode == "selective_op" else {}
        for i, layer in enumerate(layers):
            if i % cfg.activation_checkpointing_every == 0:
                layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False, **extra)
    if not any(p.is_meta for p in model.parameters()):
        model.to(device)
    if not (always or fsdp_needed(param_dtype)):
        return model
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
