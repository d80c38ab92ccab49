"""The one loss API trainers call: LM head + per-token loss, fused, never materialising [T, V] logits.

Two entry points over packed tokens (hidden_TH from the model, weight_VH the LM head / tied embedding,
targets already shifted):

    linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean") -> loss
    linear_policy_loss(hidden, weight, targets, advantages=..., loss_mask=..., ...) -> PolicyLossOutput

Per token t (logp_t = log pi(target_t), H_t = entropy of pi at t, both from one fused pass):

    loss_t = sft_weight_t * (-logp_t) + pg_weight_t * PG_t - entropy_coef * H_t
    PG_t   = max(-r A, -clip(r, 1 - eps_low, 1 + eps_high) A),  r = exp(logp_t - old_logp_t)  (on-policy)
             and, with clip_ratio_c = c (dual clip, verl's compute_policy_loss_vanilla), for A < 0:
             PG_t = min(PG_t, -c A)
    PG_t   = -(pi / (pi + luffy_gamma)) A,  pi = exp(logp_t), behaviour prob 1, no clip      (off_policy_t)
    loss   = sum_t loss_mask_t * loss_t / normalizer

logp and H are of the distribution the tokens were sampled from: softmax(logits / temperature)
(`temperature=`, default 1; RL passes its sampling temperature so it trains the policy it samples from).

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
compacted away before the LM-head GEMMs, or zeroed in them with compact="mask"). clip_frac_low /
clip_frac_high are the fractions of masked on-policy tokens with pg_weight != 0 where the clip is active:
A < 0 and r < 1 - eps_low / A > 0 and r > 1 + eps_high (0-d tensors, no host sync).

Values on tokens whose loss_mask is 0 (advantages, old_logp, weights) never reach the loss, NaN included.

Backends. Both run the chunked pass of `triton_kernels/linear_loss.py` (installed as `ceiling_kernels`):
cuBLAS GEMMs with fp32 logits per chunk, and the elementwise work in its Triton kernels ("triton": CUDA
tensors, and CPU tensors when TRITON_INTERPRET=1 is set at call time) or in their plain-PyTorch twins
("torch": CPU otherwise). `backend="triton" | "torch"` overrides; `chunk_size=` sets the rows per chunk;
`grad_weight_accum="fp32" | "weight"` how grad_W is accumulated across chunks (see the kernel file).
Under torch.no_grad (e.g. validation loss) no gradient work is done.

Host syncs. `compact=` chooses how the trained tokens are found:
  "nonzero": one `nonzero` over the mask (one device->host sync per call) gathers the trained tokens, and the
    LM-head GEMMs run on them only.
  "mask": every token runs through the GEMMs in fixed-size chunks, untrained ones zeroed: no host sync in
    forward or backward, but the LM-head work grows by T / (trained tokens) (prompt tokens are not free).
    A trained target outside [0, vocab) gives a NaN loss and NaN gradients instead of an error.
  "auto" (default): "nonzero" on CUDA and CPU, "mask" on other accelerators (Ascend NPU).
On a device where bf16 operands cannot produce fp32 logits directly (no `torch.mm(..., out_dtype=float32)`),
bf16 inputs on NPU use a bf16 GEMM (fp32 accumulation, logits rounded to bf16 once, as eager does) and on CPU
fp32 operands; see `gemm_plan` in triton_kernels/gemm.py.

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
# Per-token terms: the loss as a function of (logp_T, entropy_T) and its derivatives (see the kernel file).


def _normalizer(normalizer, mask_T):
    """The loss's divisor as a 0-d fp32 tensor on the mask's device (0 counts as 1). A Python number is filled
    in on the device (`torch.full`: a kernel argument): `torch.as_tensor(number, device=cuda)` would copy it
    from the host, a blocking copy that waits for the stream (`cudaStreamSynchronize`) on every call."""
    if isinstance(normalizer, (int, float)):
        norm = torch.full((), float(normalizer), dtype=torch.float32, device=mask_T.device)
    else:
        norm = (mask_T.sum() if normalizer is None else normalizer).to(device=mask_T.device, dtype=torch.float32)
    return torch.where(norm == 0, torch.ones_like(norm), norm)


def _masked(x, valid_T, dtype=torch.float32):
    """x as fp32 with untrained tokens set to 0, so a NaN there cannot reach the loss."""
    return None if x is None else torch.where(valid_T, x.to(dtype), 0)


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
                 clip_ratio_c, luffy_gamma, entropy_coef, normalizer):
        if clip_ratio_c is not None and not clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be > 1 (verl's dual-clip bound), got {clip_ratio_c}")
        self.valid_T = loss_mask != 0
        mask_T = _masked(loss_mask, self.valid_T)
        self.scale_T = mask_T / _normalizer(normalizer, mask_T)
        self.adv_T = _masked(advantages, self.valid_T)
        self.old_T = _masked(old_logp, self.valid_T)
        self.sft_T = _masked(sft_weight, self.valid_T)
        self.pgw_T = _masked(pg_weight, self.valid_T)
        self.off_T = None if off_policy is None else off_policy.to(torch.bool)
        self.eps_low, self.eps_high, self.clip_c, self.gamma = eps_low, eps_high, clip_ratio_c, luffy_gamma
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
        if self.clip_c is not None:  # dual clip: a negative advantage's loss is bounded by -c A
            bound = -adv * self.clip_c
            dual = (adv < 0) & (pg > bound)
            pg = torch.where(dual, bound, pg)
            dpg = torch.where(dual, 0.0, dpg)
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
        return (self.scale_T * torch.where(self.valid_T, loss_T, 0)).sum()

    def clip_fractions(self, logp_T):
        on = self.valid_T
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
# Dispatch and public API.


def _backend(hidden, backend):
    if backend is not None:
        if backend not in ("triton", "torch"):
            raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
        return backend
    if hidden.is_cuda:
        return "triton"
    return "triton" if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else "torch"


def _run(hidden, weight, targets, valid_T, terms, backend, chunk_size, temperature, grad_weight_accum, compact):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [T, H] and weight [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or valid_T.shape != hidden.shape[:1]:
        raise ValueError(f"per-token tensors must be [T] = [{hidden.shape[0]}]")
    from ceiling_kernels.linear_loss import LinearLossFunction, linear_loss_forward

    opts = dict(chunk_size=chunk_size, temperature=temperature, elementwise=_backend(hidden, backend),
                grad_weight_accum=grad_weight_accum, compact=compact)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearLossFunction.apply(hidden, weight, targets, valid_T, terms, opts)
    loss, logp, entropy, _, _ = linear_loss_forward(hidden, weight, targets, valid_T, terms, grad_hidden=False,
                                                    grad_weight=False, **opts)
    return loss, logp, entropy


def linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean", temperature=1.0,
                         backend=None, chunk_size=None, grad_weight_accum="fp32", compact="auto"):
    """Cross-entropy of softmax(hidden_TH @ weight_VH.T / temperature) against labels_T (already shifted).

    reduction "mean": mean over tokens with label != ignore_index (0 when there are none); "sum": their sum.
    A label outside [0, vocab) other than ignore_index is an error (compact="mask": a NaN loss).
    compact: "auto" | "nonzero" | "mask", how ignored tokens are skipped (module docstring, "Host syncs").
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    valid_T = labels != ignore_index
    loss, _, _ = _run(hidden, weight, labels, valid_T, _CrossEntropyTerms(valid_T, reduction), backend,
                      chunk_size, temperature, grad_weight_accum, compact)
    return loss


def linear_policy_loss(hidden, weight, targets, *, advantages, loss_mask, old_logp=None, sft_weight=None,
                       pg_weight=None, off_policy=None, eps_low=0.2, eps_high=0.2, clip_ratio_c=None,
                       luffy_gamma=0.1, entropy_coef=0.0, normalizer=None, temperature=1.0, backend=None,
                       chunk_size=None, grad_weight_accum="fp32", compact="auto") -> PolicyLossOutput:
    """Per-token SFT / clipped-PG / LUFFY / entropy loss over packed tokens; see the module docstring.

    clip_ratio_c: the dual-clip bound (None: off; verl's default is 3, RETU's DAPO launcher sets 10).
    temperature: logits are divided by it for logp, entropy and the gradients (the sampling temperature).
    compact: "auto" | "nonzero" | "mask", how tokens with loss_mask 0 are skipped: "mask" has no host sync
    but runs the LM head on them too (module docstring, "Host syncs").
    """
    terms = _PolicyTerms(loss_mask, advantages, old_logp, sft_weight, pg_weight, off_policy, eps_low, eps_high,
                         clip_ratio_c, luffy_gamma, entropy_coef, normalizer)
    loss, logp, entropy = _run(hidden, weight, targets, terms.valid_T, terms, backend, chunk_size, temperature,
                               grad_weight_accum, compact)
    clip_low, clip_high = terms.clip_fractions(logp)
    return PolicyLossOutput(loss, logp, entropy, clip_low, clip_high)
