"""The one loss API trainers call: LM head + per-token loss, fused, never materialising [T, V] logits.

Two entry points over packed tokens (hidden_TH from the model, weight_VH the LM head / tied embedding,
targets already shifted):

    linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean") -> loss
    linear_policy_loss(hidden, weight, targets, advantages=..., loss_mask=..., ...) -> PolicyLossOutput

Per token t (logp_t = log pi(target_t), H_t = entropy of pi at t, both from one fused pass):

    loss_t = sft_weight_t * (-logp_t) + pg_weight_t * PG_t - entropy_coef * H_t
    PG_t   = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A),  r = exp(logp_t - old_logp_t)   (on-policy)
    PG_t   = -(pi / (pi + luffy_gamma)) A,  pi = exp(logp_t), behaviour prob 1, no clip      (off_policy_t)
    loss   = sum_t loss_mask_t * loss_t / normalizer

Defaults: sft_weight 0, pg_weight 1, off_policy False; old_logp=None is a single on-policy update
(old = logp.detach(), r = 1); normalizer = sum(loss_mask) of this call. Pass the token count of the
whole global batch (python number or 0-d tensor, no host sync) for a global token-mean; loss_mask may be
fractional, e.g. 1 / (n_seqs * len_seq) with normalizer 1 gives seq-mean-token-mean.

Every algorithm is a choice of per-token weights:

    | algorithm   | tokens            | sft_weight       | pg_weight | off_policy | notes                        |
    |-------------|-------------------|------------------|-----------|------------|------------------------------|
    | SFT         | expert trajectory | 1                | 0         | False      | = linear_cross_entropy       |
    | GRPO / DAPO | rollouts          | 0                | 1         | False      | DAPO: eps_high 0.28,         |
    |             |                   |                  |           |            | normalizer = global tokens   |
    | LUFFY       | rollouts          | 0                | 1         | False      |                              |
    |             | expert trajectory | 0                | 1         | True       | shaped pi/(pi+gamma), no clip|
    | SRFT        | expert trajectory | w1               | 1         | True       | w1 = 0.5 sg(exp(-H))         |
    |             | positive rollouts | w2               | 0         | False      | w2 = 0.1 sg(exp(H))          |
    |             | negative rollouts | -1               | 0         | False      | pushes logp down             |
    | UPT         | SFT-gated prompt  | 1 (expert traj.) | 0         | False      | gate: group mean reward <= g |
    |             | other prompts     | 0                | 1         | False      | GRPO                         |

SRFT's w1 / w2 are stop-gradient functions of the policy entropy; the trainer computes them (e.g. from
the entropy this function returned on the rollout forward) and passes them as sft_weight.

Outputs: `logp` and `entropy` are per-token fp32, detached, 0 where loss_mask is 0 (those tokens are
compacted away before the LM-head GEMMs). clip_frac_low / clip_frac_high are the fractions of masked
on-policy tokens with pg_weight != 0 where the clip is active: A < 0 and r < 1 - eps_low / A > 0 and
r > 1 + eps_high (0-d tensors, no host sync).

Backends. CUDA tensors run the Triton kernels of `triton_kernels/linear_loss.py`; CPU tensors run them in
the Triton interpreter when TRITON_INTERPRET=1 is set at call time, otherwise the chunked PyTorch path
below (grads computed in forward per chunk of tokens, like the kernels, so CPU training never holds
[T, V] logits either). `backend="triton" | "torch"` overrides; `chunk_size=` sets the rows per chunk.
Under torch.no_grad (e.g. validation loss) no gradient work is done.

Tests: TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_linear_loss.py -q
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

__all__ = ["PolicyLossOutput", "linear_cross_entropy", "linear_policy_loss"]


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # 0-d, differentiable w.r.t. hidden and weight
    logp: torch.Tensor  # [T] fp32, detached, 0 where loss_mask == 0
    entropy: torch.Tensor  # [T] fp32, detached, 0 where loss_mask == 0
    clip_frac_low: torch.Tensor  # 0-d fp32
    clip_frac_high: torch.Tensor  # 0-d fp32


# ---------------------------------------------------------------------------------------------------------
# Per-token terms: the loss as a function of (logp_T, entropy_T) and its derivatives, shared by both backends.


def _normalizer(normalizer, mask_T):
    norm = mask_T.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32,
                                                                      device=mask_T.device)
    norm = norm.to(torch.float32)
    return torch.where(norm == 0, torch.ones_like(norm), norm)


class _CrossEntropyTerms:
    """loss = -sum_t valid_t logp_t / norm."""

    entropy_grad = False

    def __init__(self, valid_T, reduction):
        mask_T = valid_T.to(torch.float32)
        self.scale_T = mask_T if reduction == "sum" else mask_T / _normalizer(None, mask_T)

    def token_grads(self, idx_C, logp_C, entropy_C):
        return -self.scale_T[idx_C], None

    def loss(self, logp_T, entropy_T):
        return -(self.scale_T * logp_T).sum()


class _PolicyTerms:
    """loss = sum_t mask_t (sft_t (-logp_t) + pg_t PG_t(logp_t) - entropy_coef H_t) / norm."""

    def __init__(self, loss_mask, advantages, old_logp, sft_weight, pg_weight, off_policy, eps_low, eps_high,
                 luffy_gamma, entropy_coef, normalizer):
        mask_T = loss_mask.to(torch.float32)
        self.scale_T = mask_T / _normalizer(normalizer, mask_T)
        self.adv_T = advantages.to(torch.float32)
        self.old_T = None if old_logp is None else old_logp.to(torch.float32)
        self.sft_T = None if sft_weight is None else sft_weight.to(torch.float32)
        self.pgw_T = None if pg_weight is None else pg_weight.to(torch.float32)
        self.off_T = None if off_policy is None else off_policy.to(torch.bool)
        self.eps_low, self.eps_high, self.gamma = eps_low, eps_high, luffy_gamma
        self.entropy_coef = float(entropy_coef)
        self.entropy_grad = self.entropy_coef != 0.0

    def _pg(self, logp, idx):
        """PG and dPG/dlogp per token (fp32) for tokens `idx` (a slice or index tensor)."""
        adv = self.adv_T[idx]
        ratio = torch.ones_like(logp) if self.old_T is None else torch.exp(logp - self.old_T[idx])
        clipped = ratio.clamp(1 - self.eps_low, 1 + self.eps_high)
        pg1, pg2 = -adv * ratio, -adv * clipped
        pg = torch.maximum(pg1, pg2)
        dpg = torch.where(pg2 > pg1, 0.0, -adv * ratio)  # the clipped branch has no gradient
        if self.off_T is not None:
            pi = torch.exp(logp)
            den = pi + self.gamma
            off = self.off_T[idx]
            pg = torch.where(off, -adv * pi / den, pg)
            dpg = torch.where(off, -adv * self.gamma * pi / (den * den), dpg)
        return pg, dpg

    def token_grads(self, idx_C, logp_C, entropy_C):
        scale = self.scale_T[idx_C]
        _, dpg = self._pg(logp_C, idx_C)
        d = dpg if self.pgw_T is None else self.pgw_T[idx_C] * dpg
        if self.sft_T is not None:
            d = d - self.sft_T[idx_C]
        dent = -self.entropy_coef * scale if self.entropy_grad else None
        return scale * d, dent

    def loss(self, logp_T, entropy_T):
        pg, _ = self._pg(logp_T, slice(None))
        loss_T = pg if self.pgw_T is None else self.pgw_T * pg
        if self.sft_T is not None:
            loss_T = loss_T - self.sft_T * logp_T
        if self.entropy_coef != 0.0:
            loss_T = loss_T - self.entropy_coef * entropy_T
        return (self.scale_T * loss_T).sum()

    def clip_fractions(self, logp_T, valid_T):
        on = valid_T
        if self.off_T is not None:
            on = on & ~self.off_T
        if self.pgw_T is not None:
            on = on & (self.pgw_T != 0)
        n_on = on.sum().clamp(min=1).to(torch.float32)
        if self.old_T is None:  # r == 1: the clip is never active
            zero = torch.zeros((), dtype=torch.float32, device=logp_T.device)
            return zero, zero.clone()
        ratio = torch.exp(logp_T - self.old_T)
        low = on & (self.adv_T < 0) & (ratio < 1 - self.eps_low)
        high = on & (self.adv_T > 0) & (ratio > 1 + self.eps_high)
        return low.sum() / n_on, high.sum() / n_on


# ---------------------------------------------------------------------------------------------------------
# Chunked PyTorch path (CPU without Triton): same grads-in-forward scheme as the kernels.


def _torch_forward(hidden_TH, weight_VH, targets_T, valid_T, terms, *, grad_hidden, grad_weight, chunk_size):
    """Returns (loss, logp_T, entropy_T, grad_h, grad_w) like `triton_kernels.linear_loss.linear_loss_forward`.

    Ignored tokens are compacted with nonzero() (a host sync, free on CPU). Per chunk of C valid tokens the
    fp32 logits z_CV are formed once; grad_w accumulates in fp32.
    """
    T, H = hidden_TH.shape
    V = weight_VH.shape[0]
    idx_N = valid_T.nonzero()[:, 0]
    w32 = weight_VH.float()
    logp_T = torch.zeros(T, dtype=torch.float32, device=hidden_TH.device)
    entropy_T = torch.zeros_like(logp_T)
    grad_h = torch.zeros((T, H), dtype=torch.float32, device=hidden_TH.device) if grad_hidden else None
    grad_w = torch.zeros((V, H), dtype=torch.float32, device=hidden_TH.device) if grad_weight else None
    C = chunk_size or max(1, (256 << 20) // (8 * max(V, 1)))
    for start in range(0, idx_N.numel(), C):
        idx = idx_N[start:start + C]
        h32 = hidden_TH[idx].float()
        z = h32 @ w32.T
        lse = torch.logsumexp(z, dim=1)
        p = torch.exp(z - lse[:, None])
        ez = (p * z).sum(dim=1)
        tgt = targets_T[idx].long()
        logp = z.gather(1, tgt[:, None])[:, 0] - lse
        ent = lse - ez
        logp_T[idx], entropy_T[idx] = logp, ent
        if not (grad_hidden or grad_weight):
            continue
        c, e = terms.token_grads(idx, logp, ent)
        g = -c[:, None] * p  # G = c (onehot - p) - e p (z - Ez)
        g.scatter_add_(1, tgt[:, None], c[:, None])
        if e is not None:
            g -= e[:, None] * p * (z - ez[:, None])
        if grad_hidden:
            grad_h[idx] = g @ w32
        if grad_weight:
            grad_w.addmm_(g.T, h32)
    loss = terms.loss(logp_T, entropy_T)
    if grad_h is not None:
        grad_h = grad_h.to(hidden_TH.dtype)
    if grad_w is not None and weight_VH.dtype != torch.float16:
        grad_w = grad_w.to(weight_VH.dtype)
    return loss, logp_T, entropy_T, grad_h, grad_w


class _ChunkedTorchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_TH, weight_VH, targets_T, valid_T, terms, chunk_size=None):
        loss, logp_T, entropy_T, grad_h, grad_w = _torch_forward(
            hidden_TH, weight_VH, targets_T, valid_T, terms, grad_hidden=ctx.needs_input_grad[0],
            grad_weight=ctx.needs_input_grad[1], chunk_size=chunk_size)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden_TH.dtype, weight_VH.dtype)
        ctx.mark_non_differentiable(logp_T, entropy_T)
        return loss, logp_T, entropy_T

    @staticmethod
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h.mul_(grad_loss.to(grad_h.dtype)).to(h_dtype)
        grad_w = None if grad_w is None else grad_w.mul_(grad_loss.to(grad_w.dtype)).to(w_dtype)
        return grad_h, grad_w, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Dispatch and public API.


def _backend(hidden, backend):
    if backend is not None:
        if backend not in ("triton", "torch"):
            raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
        return backend
    if hidden.is_cuda:
        return "triton"
    return "triton" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "torch"


def _run(hidden, weight, targets, valid_T, terms, backend, chunk_size):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or valid_T.shape != hidden.shape[:1]:
        raise ValueError(f"per-token tensors must be [T] = [{hidden.shape[0]}]")
    targets = torch.where(valid_T, targets, 0)
    which = _backend(hidden, backend)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if which == "triton":
        from triton_kernels.linear_loss import LinearLossFunction, linear_loss_forward

        fn, forward = LinearLossFunction, linear_loss_forward
    else:
        fn, forward = _ChunkedTorchFunction, _torch_forward
    if grad:
        return fn.apply(hidden, weight, targets, valid_T, terms, chunk_size)
    loss, logp, entropy, _, _ = forward(hidden, weight, targets, valid_T, terms, grad_hidden=False,
                                        grad_weight=False, chunk_size=chunk_size)
    return loss, logp, entropy


def linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean", backend=None,
                         chunk_size=None):
    """Cross-entropy of softmax(hidden_TH @ weight_VH.T) against labels_T (already shifted).

    reduction "mean": mean over tokens with label != ignore_index (0 when there are none); "sum": their sum.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    valid_T = labels != ignore_index
    loss, _, _ = _run(hidden, weight, labels, valid_T, _CrossEntropyTerms(valid_T, reduction), backend,
                      chunk_size)
    return loss


def linear_policy_loss(hidden, weight, targets, *, advantages, loss_mask, old_logp=None, sft_weight=None,
                       pg_weight=None, off_policy=None, eps_low=0.2, eps_high=0.2, luffy_gamma=0.1,
                       entropy_coef=0.0, normalizer=None, backend=None, chunk_size=None) -> PolicyLossOutput:
    """Per-token SFT / clipped-PG / LUFFY / entropy loss over packed tokens; see the module docstring."""
    terms = _PolicyTerms(loss_mask, advantages, old_logp, sft_weight, pg_weight, off_policy, eps_low, eps_high,
                         luffy_gamma, entropy_coef, normalizer)
    valid_T = loss_mask != 0
    loss, logp, entropy = _run(hidden, weight, targets, valid_T, terms, backend, chunk_size)
    clip_low, clip_high = terms.clip_fractions(logp, valid_T)
    return PolicyLossOutput(loss, logp, entropy, clip_low, clip_high)
