"""Host syncs in the RL update's per-micro-batch loss path (issue #21): MicroBatchLoss built, called on the
hidden states, backpropagated, and its metric sums read, as RLTrainer._update does for every micro-batch.

On CUDA a host sync stalls the launch queue once per micro-batch. On CPU the same code is watched by a
TorchDispatchMode that flags what would wait for the device there:
  - reading a value to the host: `_local_scalar_dense` / `item` (int(t), bool(t), float(t)), `is_nonzero`,
    `Tensor.tolist` / `numpy` (no aten op: patched);
  - shapes that depend on values: `nonzero`, `masked_select`, boolean-mask indexing, `unique`, and
    `repeat_interleave` with tensor repeats and no `output_size` (its CUDA kernel reads the repeats' sum);
  - a tensor made from Python data (`lift_fresh`: torch.tensor / as_tensor): on the device that is a copy from
    the host, which without non_blocking is `cudaMemcpyAsync` + `cudaStreamSynchronize` (ATen copy_kernel_cuda);
  - a copy between the host and a device without non_blocking (seen only when run on a GPU).
The fused loss runs with compact="mask" (no compaction sync; engine/losses.py "Host syncs") except where the
"nonzero" compaction's one sync per call is counted on purpose.
"""

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.rl.algorithms import RLBatch, sequence_weights, to_device, to_tokens
from engine.rl.normalizers import loss_normalizers
from engine.rl.update import LossSettings, MicroBatchLoss

aten = torch.ops.aten
READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero}
DYNAMIC = {aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive,
           aten.unique_dim_consecutive}
INDEX = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class SyncCounter(TorchDispatchMode):
    """The ops that would make the host wait for the device (module docstring), with the reason."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in READS or packet in DYNAMIC:
            self.syncs.append(str(func))
        elif packet in INDEX and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ()):
            self.syncs.append(f"{func} with a boolean mask")
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.syncs.append(f"{func} without output_size")
        elif func is aten.lift_fresh.default:
            self.syncs.append("a tensor made from host data (lift_fresh)")
        elif packet in (aten._to_copy, aten.copy_) and not kwargs.get("non_blocking", False):
            src = args[1] if packet is aten.copy_ else args[0]
            dst = args[0].device if packet is aten.copy_ else kwargs.get("device") or src.device
            if isinstance(src, torch.Tensor) and (src.device.type == "cpu") != (torch.device(dst).type == "cpu"):
                self.syncs.append(f"{func} between {src.device} and {dst} without non_blocking")
        return func(*args, **kwargs)


@pytest.fixture(autouse=True)
def torch_loss_path(monkeypatch):
    """The plain-torch elementwise path (the Triton interpreter reads tensors on the host by design)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _micro_batch(algorithm: str, seed: int = 0):
    """Host data of one packed micro-batch as RLTrainer._update has it: per-sequence weights (computed once
    per step on the host), rewards, expert flags, cu_seqlens, response mask and targets."""
    g = torch.Generator().manual_seed(seed)
    expert = algorithm in ("luffy", "srft", "upt")
    groups = [0, 0, 0, 1, 1, 1] + ([0, 1] if expert else [])
    is_expert = torch.tensor([False] * 6 + ([True, True] if expert else []))
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0] + ([1.0, 1.0] if expert else []))
    if algorithm == "upt":  # group 1's rollouts all fail: its expert row takes the SFT branch
        rewards[3:6] = 0.0
    seq_w = sequence_weights(algorithm, RLBatch(rewards, torch.tensor(groups), is_expert))
    keep = [i for i, t in enumerate(seq_w.trained_S.tolist()) if t]  # the trainer packs trained ones only
    seq_w, rewards, is_expert = seq_w.select(keep), rewards[keep], is_expert[keep]
    lens = torch.randint(5, 12, (len(keep),), generator=g).tolist()
    prompt = [2] * len(keep)
    response = torch.cat([torch.tensor([0] * p + [1] * (n - p - 1) + [0], dtype=torch.bool)
                          for p, n in zip(prompt, lens)])
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    T = int(cu[-1])
    return dict(seq_w=seq_w, rewards=rewards, is_expert=is_expert, cu=cu, response=response,
                targets=torch.randint(0, 37, (T,), generator=g), lens=[int(x.sum()) for x in response.split(lens)],
                hidden=torch.randn(T, 16, generator=g), weight=torch.randn(37, 16, generator=g) * 0.3,
                old=torch.randn(T, generator=g) * 0.1 - 3.6, ref=torch.randn(T, generator=g) * 0.1 - 3.6)


def _settings(algorithm: str, aggregation: str, kl: bool, compact: str) -> LossSettings:
    no_clip = algorithm in ("luffy", "srft", "upt")
    return LossSettings(eps_low=1.0 if no_clip else 0.2, eps_high=math.inf if no_clip else 0.28,
                        clip_ratio_c=10.0 if algorithm == "dapo_dc" else None, entropy_coef=0.001, temperature=0.7,
                        aggregation=aggregation, kl_coef=0.05 if kl else 0.0, entropy_weights=algorithm == "srft",
                        compact=compact)


def _run(d, settings, old: bool = True):
    """What _update does per micro-batch, on the micro-batch `d`; returns (syncs, host reads, out, stats)."""
    norms = loss_normalizers(d["lens"], d["seq_w"], settings.aggregation, norm_tokens=64.0)  # once per update
    h = d["hidden"].clone().requires_grad_(True)
    w = d["weight"].clone().requires_grad_(True)
    host_reads = []
    real = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
    for name, fn in real.items():
        setattr(torch.Tensor, name, lambda self, *a, _f=fn, _n=name, **k: host_reads.append(_n) or _f(self, *a, **k))
    try:
        with SyncCounter() as counter:
            loss_fn = MicroBatchLoss(d["seq_w"], d["rewards"], d["is_expert"], d["cu"], d["response"], d["targets"],
                                     norms, settings, old_logp_T=d["old"] if old else None,
                                     ref_logp_T=d["ref"] if settings.kl_coef else None)
            out = loss_fn(h, w)
            out.loss.backward()
            stats = loss_fn.token_stats(out)
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)
    assert h.grad is not None and torch.isfinite(out.loss)
    return counter.syncs, host_reads, out, stats, loss_fn



@pytest.mark.parametrize("algorithm,aggregation,kl", [
    ("grpo", "token-mean", False),
    ("grpo", "token-mean", True),
    ("dapo_dc", "token-mean", False),
    ("dapo_dc", "seq-mean-token-sum", False),
    ("luffy", "token-mean", False),
    ("upt", "token-sum-norm", False),
    ("upt", "token-mean", True),
    ("srft", "token-mean", False),
    ("grpo", "seq-mean-token-mean", False),
])
def test_micro_batch_loss_path_has_no_host_sync(algorithm, aggregation, kl):
    """Fails on the code before issue #21: `int(cu_seqlens[-1])` in to_tokens, `repeat_interleave` without
    output_size in MicroBatchLoss and RLTrainer._update, `torch.as_tensor(normalizer, device=...)` in the
    fused loss, per-sequence `.to(device)` copies and the metric sums' repeat_interleave."""
    d = _micro_batch(algorithm)
    syncs, host_reads, _, _, _ = _run(d, _settings(algorithm, aggregation, kl, compact="mask"))
    assert syncs == [] and host_reads == [], (syncs, host_reads)


@pytest.mark.parametrize("algorithm,kl,calls", [("grpo", False, 1), ("grpo", True, 2), ("upt", True, 2)])
def test_nonzero_compaction_is_the_only_sync_left(algorithm, kl, calls):
    """compact="nonzero" (the default on CUDA) costs one `nonzero` per fused-loss call (the training call, and
    the no-grad stats pass of KL/SRFT) and nothing else of this path; the counter sees it."""
    syncs, _, _, _, _ = _run(_micro_batch(algorithm), _settings(algorithm, "token-mean", kl, compact="nonzero"))
    assert syncs.count("aten.nonzero.default") == calls, syncs
    # the CPU kernel also checks the compacted targets' range on the host (a device assert on CUDA)
    assert set(syncs) <= {"aten.nonzero.default", "aten._local_scalar_dense.default"}, syncs


@pytest.mark.parametrize("algorithm", ["dapo_dc", "luffy", "upt"])
def test_token_stats_are_the_trainer_metrics(algorithm):
    """`MicroBatchLoss.token_stats` gives the sums RLTrainer._update computed itself before (on the host side
    lists here): entropy and count of trained response tokens, clip fractions over the on-policy PG tokens."""
    d = _micro_batch(algorithm, seed=2)
    _, _, out, stats, loss_fn = _run(d, _settings(algorithm, "token-mean", True, compact="mask"))
    lens = (d["cu"][1:] - d["cu"][:-1]).tolist()
    seq = [i for i, n in enumerate(lens) for _ in range(n)]
    w = d["seq_w"]
    on = torch.tensor([bool(d["response"][t]) and bool(w.trained_S[s]) for t, s in enumerate(seq)])
    pg = torch.tensor([bool(on[t]) and float(w.pg_weight_S[s]) != 0 and not bool(w.off_policy_S[s])
                       for t, s in enumerate(seq)])
    torch.testing.assert_close(stats["entropy"], (out.entropy * on).sum())
    assert int(stats["tokens"]) == int(on.sum()) and int(stats["pg_tokens"]) == int(pg.sum())
    torch.testing.assert_close(stats["clip_low"], out.clip_frac_low * pg.sum())
    torch.testing.assert_close(stats["clip_high"], out.clip_frac_high * pg.sum())
    assert stats["kl"] is loss_fn.kl_sum and float(stats["kl"]) > 0
    assert int(stats["stats_tokens"]) == int(d["response"].sum())


def test_cu_seqlens_that_miss_the_tokens_are_refused_without_a_host_read():
    d = _micro_batch("grpo")
    with pytest.raises(RuntimeError, match="cu_seqlens does not end at"):
        to_tokens(d["seq_w"], d["cu"], d["response"][:-1])
    with pytest.raises(ValueError, match="sequences, weights have"):
        to_tokens(d["seq_w"], d["cu"][:-1], d["response"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                    reason="needs CUDA (the compiled Triton kernels)")
@pytest.mark.parametrize("algorithm,kl", [("dapo_dc", False), ("grpo", True), ("upt", True), ("luffy", False)])
def test_micro_batch_loss_path_has_no_sync_on_cuda(algorithm, kl):
    """The same path on CUDA under torch.cuda.set_sync_debug_mode("error"): any synchronising call raises,
    including the host-to-device copies the CPU run cannot see."""
    d = _micro_batch(algorithm)
    dev = torch.device("cuda")
    host = [torch.tensor([0.5, float("nan"), -2.0]), torch.tensor([True, False, True]), None,
            torch.tensor([3, 0, 7], dtype=torch.int32)]
    for got, want in zip(to_device(dev, *host), host):  # one pinned non-blocking copy, cast back on the device
        assert got is None if want is None else (got.device.type == "cuda" and got.dtype == want.dtype
                                                 and torch.equal(got.cpu().nan_to_num(9), want.nan_to_num(9)))
    norms = loss_normalizers(d["lens"], d["seq_w"], "token-mean")
    cuda = {k: d[k].to(dev) for k in ("cu", "response", "targets", "old", "ref")}
    h = d["hidden"].to(dev).requires_grad_(True)
    w = d["weight"].to(dev).requires_grad_(True)
    settings = _settings(algorithm, "token-mean", kl, compact="mask")
    MicroBatchLoss(d["seq_w"], d["rewards"], d["is_expert"], cuda["cu"], cuda["response"], cuda["targets"], norms,
                   settings, old_logp_T=cuda["old"], ref_logp_T=cuda["ref"] if kl else None)(h, w)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_fn = MicroBatchLoss(d["seq_w"], d["rewards"], d["is_expert"], cuda["cu"], cuda["response"],
                                 cuda["targets"], norms, settings, old_logp_T=cuda["old"],
                                 ref_logp_T=cuda["ref"] if kl else None)
        out = loss_fn(h, w)
        out.loss.backward()
        loss_fn.token_stats(out)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _, _, cpu_out, _, _ = _run(d, settings)  # the same micro-batch on the CPU
    torch.testing.assert_close(out.loss.cpu(), cpu_out.loss, rtol=1e-4, atol=1e-5)
