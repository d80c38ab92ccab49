"""Plain-PyTorch references for the fused LM-head losses: materialise the [T, V] logits.

They define the semantics that `triton_kernels/linear_loss.py` and the chunked torch path in
`engine/losses.py` must reproduce; tests run them in float64, benchmarks use them as the eager anchor.
They are written the textbook way (autograd through log_softmax and torch.min/clamp), independently of
the per-token derivative formulas used by the fused paths.

Shapes: hidden_TH, weight_VH, labels_T / targets_T (int64), per-token tensors *_T; T tokens, H hidden, V vocab.
Tests: TRITON_INTERPRET=1 .venv/bin/python -m pytest tests/test_linear_loss.py -q
"""

from __future__ import annotations

import torch


def logits_reference(hidden_TH, weight_VH, temperature=1.0):
    """[T, V] logits / temperature in fp32 at least (the eager anchor computes the GEMM in the input dtype)."""
    z_TV = hidden_TH @ weight_VH.T
    z_TV = z_TV if z_TV.dtype == torch.float64 else z_TV.float()
    return z_TV / temperature


def linear_cross_entropy_reference(hidden_TH, weight_VH, labels_T, *, ignore_index=-100, reduction="mean",
                                   temperature=1.0):
    """Cross-entropy of softmax(hidden @ weight.T / temperature) against labels; mean over non-ignored tokens."""
    z_TV = logits_reference(hidden_TH, weight_VH, temperature)
    valid_T = labels_T != ignore_index
    logp_TV = torch.log_softmax(z_TV, dim=-1)
    logp_T = logp_TV.gather(1, torch.where(valid_T, labels_T, 0)[:, None])[:, 0]
    total = -(logp_T * valid_T).sum()
    if reduction == "sum":
        return total
    return total / valid_T.sum().clamp(min=1)


def linear_policy_loss_reference(hidden_TH, weight_VH, targets_T, *, advantages, loss_mask, old_logp=None,
                                 sft_weight=None, pg_weight=None, off_policy=None, eps_low=0.2, eps_high=0.2,
                                 clip_ratio_c=None, luffy_gamma=0.1, entropy_coef=0.0, normalizer=None,
                                 temperature=1.0):
    """Returns (loss, logp_T, entropy_T, clip_frac_low, clip_frac_high), as `engine.losses.linear_policy_loss`.

    loss = sum_t mask_t (sft_t (-logp_t) + pg_t PG_t - entropy_coef H_t) / normalizer, with
    PG_t = -min(r A, clip(r, 1-eps_low, 1+eps_high) A), r = exp(logp - old_logp) on-policy, and
    PG_t = -(pi / (pi + gamma)) A, pi = exp(logp), on off-policy tokens; with clip_ratio_c = c, for A < 0,
    PG_t = min(PG_t, -c A) (verl's dual clip). logits are divided by temperature. Masked tokens' inputs are
    ignored (NaN included). logp / entropy are 0 where mask is 0.
    """
    z_TV = logits_reference(hidden_TH, weight_VH, temperature)
    mask_T = loss_mask.to(z_TV.dtype)
    valid_T = loss_mask != 0
    logp_TV = torch.log_softmax(z_TV, dim=-1)
    logp_T = logp_TV.gather(1, torch.where(valid_T, targets_T, 0)[:, None])[:, 0]
    entropy_T = -(logp_TV.exp() * logp_TV).sum(dim=-1)
    zero = torch.zeros_like(logp_T)
    adv_T = torch.where(valid_T, advantages.to(z_TV.dtype), zero)
    old_T = logp_T.detach() if old_logp is None else torch.where(valid_T, old_logp.to(z_TV.dtype), zero)
    ratio_T = torch.exp(logp_T - old_T)
    clipped_T = torch.clamp(ratio_T, 1 - eps_low, 1 + eps_high)
    pg_on_T = -torch.min(ratio_T * adv_T, clipped_T * adv_T)
    if clip_ratio_c is not None:
        pg_on_T = torch.where(adv_T < 0, torch.min(pg_on_T, -adv_T * clip_ratio_c), pg_on_T)
    pi_T = torch.exp(logp_T)
    pg_off_T = -(pi_T / (pi_T + luffy_gamma)) * adv_T
    off_T = torch.zeros_like(valid_T) if off_policy is None else off_policy.to(torch.bool)
    pg_T = torch.where(off_T, pg_off_T, pg_on_T)
    sft_T = 0.0 if sft_weight is None else torch.where(valid_T, sft_weight.to(z_TV.dtype), zero)
    pgw_T = 1.0 if pg_weight is None else torch.where(valid_T, pg_weight.to(z_TV.dtype), zero)
    loss_T = sft_T * (-logp_T) + pgw_T * pg_T - entropy_coef * entropy_T
    norm = mask_T.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=z_TV.dtype)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    loss = torch.where(valid_T, mask_T * loss_T, zero).sum() / norm

    on_T = valid_T & ~off_T & (torch.ones_like(valid_T) if pg_weight is None else pg_weight != 0)
    n_on = on_T.sum().clamp(min=1)
    r = ratio_T.detach()
    clip_low = (on_T & (adv_T < 0) & (r < 1 - eps_low)).sum() / n_on
    clip_high = (on_T & (adv_T > 0) & (r > 1 + eps_high)).sum() / n_on
    return (loss, torch.where(valid_T, logp_T, zero).detach(), torch.where(valid_T, entropy_T, zero).detach(),
            clip_low, clip_high)
