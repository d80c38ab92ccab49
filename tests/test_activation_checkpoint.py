"""Activation checkpointing modes (fsdp.activation_checkpointing_mode): full and selective_op give the losses and
gradients of no checkpointing; selective_op recomputes the elementwise ops in backward but not the matmuls."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import FSDPConfig
from engine.data.packing import IGNORE_INDEX, collate_packed
from engine.distributed import apply_fsdp, init_distributed
from engine.models import PackedCausalLM, build_model

TINY = str(Path(__file__).resolve().parents[1] / "configs/models/tiny-qwen2.json")
MODES = ("none", "full", "selective_op")


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run while it is active."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (7, 19, 12)]
    return collate_packed(seqs, [[0] * 3 + [1] * (len(s) - 3) for s in seqs], [0, 1, 2])


def _step(mode: str, device: torch.device, batch):
    """Loss, gradients (full tensors, in parameter order) and the ops run in backward, under `mode`."""
    model = PackedCausalLM(build_model(config=TINY, dtype=torch.float32, seed=0))
    cfg = FSDPConfig(activation_checkpointing_mode="full" if mode == "none" else mode)
    apply_fsdp(model, model.layers, param_dtype=torch.float32, device=device,
               activation_checkpointing=mode != "none", cfg=cfg, always=True)

    def loss_fn(h_TH, w_VH):
        return F.cross_entropy(h_TH @ w_VH.T, batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")

    loss = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, loss_fn)
    with OpCounter() as counter:
        loss.backward()
    grads = [p.grad.full_tensor() for p in model.parameters()]
    return loss.detach(), grads, counter.counts, len(model.layers)


def test_modes_give_the_same_loss_and_grads_and_selective_recomputes_only_cheap_ops():
    info = init_distributed("cpu")
    batch = _batch()
    runs = {mode: _step(mode, info.device, batch) for mode in MODES}
    loss, grads, base, layers = runs["none"]
    for mode in ("full", "selective_op"):
        assert torch.equal(runs[mode][0], loss), mode
        for a, b in zip(runs[mode][1], grads, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    full, selective = runs["full"][2], runs["selective_op"][2]
    # the SiLU of every MLP (forward op) runs again in backward under both modes; never without checkpointing
    assert base.get("silu", 0) == 0 and full["silu"] == selective["silu"] == layers
    assert selective.get("rsqrt", 0) == full["rsqrt"] > base.get("rsqrt", 0)  # RMSNorm recomputed
    # matmuls: full redoes the forward ones (q, k, v, o, gate, up; down_proj's output is not needed, so
    # non-reentrant checkpointing stops before it), selective_op redoes none
    matmuls = lambda c: c.get("mm", 0) + c.get("addmm", 0)  # noqa: E731
    assert matmuls(selective) == matmuls(base)
    assert matmuls(full) >= matmuls(base) + 6 * layers
    attention = "_scaled_dot_product_flash_attention_for_cpu"  # the CPU SDPA kernel of the sdpa backend
    assert full[attention] == layers and attention not in selective and attention not in base


def test_selective_op_saves_varlen_attention_instead_of_recomputing_it():
    """Fails on the code before issue #21: SAVED_OPS lacked `torch_attn::_varlen_attn`, the op that
    `varlen_attn` (the CUDA attention backend) dispatches, so selective_op recomputed attention in backward.

    CUDA-only kernel, so on meta tensors: the checkpoint policy only sees ops and shapes."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    from torch.utils.checkpoint import checkpoint

    from engine.distributed import saved_ops, selective_op_context

    assert torch.ops.torch_attn._varlen_attn.default in saved_ops()
    q, k, v = (torch.randn(16, 2, 64, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 7, 16], dtype=torch.int32, device="meta")

    def layer(q, k, v):
        return varlen.varlen_attn(q.sin(), k, v, cu, cu, 9, 9, window_size=(-1, 0)).sum()

    out = checkpoint(layer, q, k, v, use_reentrant=False, context_fn=selective_op_context, preserve_rng_state=False)
    with OpCounter() as counter:
        out.backward()
    assert counter.counts.get("sin") == 1  # the cheap op is recomputed...
    assert "_varlen_attn" not in counter.counts and counter.counts["_varlen_attn_backward"] == 1  # ...attention not


def test_saved_ops_registers_varlen_attention_itself():
    """`torch_attn::_varlen_attn` is a Python custom op, registered only when its module is imported: saved_ops()
    must not depend on someone having imported it first (a fresh interpreter here)."""
    pytest.importorskip("torch.nn.attention.varlen")
    code = ("import torch\n"
            "assert not hasattr(torch.ops.torch_attn, '_varlen_attn')\n"
            "from engine.distributed import saved_ops\n"
            "ops = saved_ops()\n"
            "assert torch.ops.torch_attn._varlen_attn.default in ops\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)


def test_mode_is_validated():
    with pytest.raises(ValueError, match="activation_checkpointing_mode must be 'full' or 'selective_op'"):
        FSDPConfig(activation_checkpointing_mode="per-op")


def _two_rank_worker(rank, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = init_distributed("cpu")
    try:
        batch = _batch(seed=1 + rank)  # each rank its own data: the gradients are reduced over both
        for mode in ("none", "selective_op"):
            loss, grads, _, _ = _step(mode, info.device, batch)
            out[rank, mode] = (loss, grads)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_selective_op_on_two_ranks_matches_no_checkpointing():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_two_rank_worker, args=(port, out), nprocs=2)
    for rank in (0, 1):
        (loss, grads), (sel_loss, sel_grads) = out[rank, "none"], out[rank, "selective_op"]
        assert torch.equal(loss, sel_loss)
        for a, b in zip(sel_grads, grads, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
