"""Faster decoder blocks on the unchanged HF model: Liger-Kernel's RMSNorm / SwiGLU / RoPE, per-block torch.compile.

    apply_kernels(model, KernelConfig(compile=True, liger_rms_norm=True, liger_swiglu=True, liger_rope=True))

Each switch is independent and keeps parameter names, so checkpoints and HF export are the same with or
without it. Applied before FSDP (and before activation checkpointing), as torchtitan orders them.

    liger_rms_norm  every *RMSNorm module becomes liger_kernel's LigerRMSNorm (one Triton kernel forward and
                    backward instead of ~6 elementwise ops); its `weight` Parameter is moved over as is
    liger_swiglu    every decoder MLP becomes LigerSwiGLUMLP (silu(gate) * up fused); the three Linear
                    modules are moved over as they are
    liger_rope      the HF modeling module's `apply_rotary_pos_emb` becomes liger_rotary_pos_emb. This is a
                    process-wide swap (the function is looked up as a module global, as Liger itself patches it)
    compile         each decoder layer's forward goes through torch.compile(dynamic=True): the packed token
                    count and max_seqlen are symbolic, so one graph serves every micro-batch (no recompile
                    per shape). FSDP2's hooks stay outside the compiled region (they wrap `__call__`)

Liger's kernels are Triton: on CPU they run only under TRITON_INTERPRET=1 (slowly; for tests). On CUDA and
Ascend (triton-ascend) they run natively.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from engine.config import KernelConfig


def _require_liger():
    try:
        import liger_kernel  # noqa: F401
    except ImportError as exc:
        raise ImportError("kernels.liger_*: liger-kernel is not installed (pip install liger-kernel)") from exc


def _rms_norms(model: nn.Module):
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "weight"):
            yield name, module


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def apply_liger_rms_norm(model: nn.Module) -> int:
    """Swap every RMSNorm module for LigerRMSNorm, moving its weight Parameter over. Returns the count."""
    _require_liger()
    from liger_kernel.transformers import LigerRMSNorm

    swaps = list(_rms_norms(model))
    for name, old in swaps:
        eps = getattr(old, "variance_epsilon", None) or getattr(old, "eps", None) or 1e-6
        with torch.device("meta"):
            new = LigerRMSNorm(old.weight.shape[0], eps=eps, offset=0.0, casting_mode="llama")
        new.weight = old.weight
        _set_submodule(model, name, new)
    return len(swaps)


def apply_liger_swiglu(layers: nn.ModuleList, config) -> int:
    """Swap every decoder layer's MLP for LigerSwiGLUMLP, moving its three Linear modules over."""
    _require_liger()
    from liger_kernel.transformers import LigerSwiGLUMLP

    for layer in layers:
        old = layer.mlp
        with torch.device("meta"):
            new = LigerSwiGLUMLP(config, intermediate_size=old.gate_proj.out_features)
        new.gate_proj, new.up_proj, new.down_proj = old.gate_proj, old.up_proj, old.down_proj
        layer.mlp = new
    return len(layers)


def apply_liger_rope(model_type: str) -> None:
    """Point `transformers.models.<type>.modeling_<type>.apply_rotary_pos_emb` at Liger's fused RoPE."""
    _require_liger()
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    if not hasattr(module, "apply_rotary_pos_emb"):
        raise ValueError(f"{module.__name__} has no apply_rotary_pos_emb to replace")
    module.apply_rotary_pos_emb = liger_rotary_pos_emb


def compile_layers(layers: nn.ModuleList) -> None:
    """torch.compile each layer's forward with dynamic shapes (the layer's hooks stay outside the graph)."""
    for layer in layers:
        layer.forward = torch.compile(layer.forward, dynamic=True)


def apply_kernels(model: nn.Module, cfg: KernelConfig) -> nn.Module:
    """Apply the switches of `cfg` to a PackedCausalLM (before FSDP and activation checkpointing)."""
    hf = model.hf
    if cfg.liger_rms_norm:
        apply_liger_rms_norm(hf)
    if cfg.liger_swiglu:
        if getattr(hf.config, "hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"kernels.liger_swiglu needs a silu MLP, the model has {hf.config.hidden_act!r}")
        apply_liger_swiglu(model.layers, hf.config)
    if cfg.liger_rope:
        apply_liger_rope(hf.config.model_type)
    if cfg.compile:
        compile_layers(model.layers)
    return model
