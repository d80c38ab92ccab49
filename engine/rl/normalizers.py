"""Loss normalisers, token aggregation and the KL term of the RL loss (see `engine.rl.algorithms` for the
per-token weights they scale). Every normaliser is known before the fused kernel runs, so the loss stays
separable per token.

Loss normalisers, one per term (`loss_normalizers`), all known before the kernel runs:
    RL terms (PG, SRFT's on-policy log-likelihood terms, KL): the aggregation
        token-mean            s_t = 1,              normalizer = trained tokens in the global batch
        seq-mean-token-mean   s_t = 1 / |seq(t)|,   normalizer = trained sequences in the global batch
        seq-mean-token-sum    s_t = 1,              normalizer = trained sequences in the global batch
        token-sum-norm        s_t = 1,              normalizer = a constant (`norm_tokens`), verl's
                              seq-mean-token-sum-norm / the UPT-repo's loss_remove_token_mean: sum / L_pad
      |seq| counts the sequence's trained tokens. s_t is folded into loss_mask_t.
    SFT on expert trajectories (SRFT's w1 term, UPT's gated SFT), sft_norm="expert-token-mean" (the reference,
      compute_sft_pure_loss): its own token mean over the expert tokens; "shared" puts it under the RL
      normaliser. Folded into sft_weight by `scale_expert_sft`: x N_rl / (N_sft s_t).
    Entropy bonus: with token-sum-norm a token mean over the trained tokens (the UPT-repo's masked_mean);
      otherwise aggregated like the RL term (verl's agg_loss). Folded into the coefficient: x N_rl / N_ent.

KL to a reference (optional, coefficient 0 in every reference run): `kl_estimate` gives k1 = logp - ref and
k3 = exp(ref - logp) - (ref - logp) - 1 per token; `fold_kl` adds kl_coef * k as a loss term through
sft_weight, exact in gradient at the logp it is given: d(-sft_t logp_t)/dlogp_t = -sft_t = kl_coef dk/dlogp_t.
`engine.rl.update` gives it the current logp of each mini-batch (from the training forward).

Shapes: _S one value per sequence, _T per packed token, _S1 = S + 1 boundaries (cu_seqlens).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.rl.algorithms import SeqWeights, TokenWeights

__all__ = [
    "AGGREGATIONS", "SFT_NORMS", "LossNormalizers", "aggregate", "entropy_coef_scale", "fold_kl", "kl_estimate",
    "loss_normalizers", "normalizer_count", "per_sequence_mean", "scale_expert_sft",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm")
SFT_NORMS = ("expert-token-mean", "shared")


def per_sequence_mean(values_T: torch.Tensor, mask_T: torch.Tensor, cu_seqlens_S1: torch.Tensor) -> torch.Tensor:
    """[S] masked mean of a per-token value over each packed sequence's masked tokens (0 where none)."""
    n_S, idx_T = _seq_token_counts(mask_T, cu_seqlens_S1)
    on = (mask_T != 0).float()
    sum_S = torch.zeros_like(n_S).index_add(0, idx_T, values_T.float() * on)
    return sum_S / n_S.clamp(min=1)


# ----------------------------------------------------------------------------------------- normalisers


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}")


@dataclass(frozen=True)
class LossNormalizers:
    """Global normaliser of each loss term (see the module docstring): RL terms, expert SFT, entropy bonus."""

    rl: float
    sft: float | None  # None: the expert SFT term shares the RL normaliser and aggregation ("shared")
    entropy: float


def loss_normalizers(n_tokens_S: list[int], seq: SeqWeights, mode: str = "token-mean",
                     sft_norm: str = "expert-token-mean", norm_tokens: float | None = None) -> LossNormalizers:
    """Normalisers of one mini-batch from its sequences' response-token counts and weights (all sequences of
    the mini-batch, every rank's). Zero counts become 1 (an empty term contributes 0)."""
    _check_mode(mode)
    if sft_norm not in SFT_NORMS:
        raise ValueError(f"unknown sft normaliser {sft_norm!r}; choose one of {SFT_NORMS}")
    trained = seq.trained_S.tolist()
    expert = seq.expert_sft_S.tolist() if seq.expert_sft_S is not None else [False] * len(trained)
    tokens = sum(n for n, t in zip(n_tokens_S, trained) if t)
    if mode == "token-mean":
        rl = tokens
    elif mode == "token-sum-norm":
        if norm_tokens is None or not norm_tokens > 0:
            raise ValueError(f"token-sum-norm needs a constant norm_tokens > 0, got {norm_tokens}")
        rl = norm_tokens
    else:
        rl = sum(1 for n, t in zip(n_tokens_S, trained) if t and n)
    sft = None
    if sft_norm == "expert-token-mean":
        sft = float(max(sum(n for n, t, e in zip(n_tokens_S, trained, expert) if t and e), 1))
    entropy = tokens if mode == "token-sum-norm" else rl
    return LossNormalizers(float(max(rl, 1)), sft, float(max(entropy, 1)))


def scale_expert_sft(sft_weight_S: torch.Tensor, seq: SeqWeights, n_tokens_S: torch.Tensor,
                     norms: LossNormalizers, mode: str) -> torch.Tensor:
    """sft weights with the expert SFT rows rescaled so their term is normalised by `norms.sft` after the
    fused loss's per-token scale s_t and division by `norms.rl`: x N_rl / (N_sft s_t)."""
    if seq.expert_sft_S is None or norms.sft is None:
        return sft_weight_S
    scale = norms.rl / norms.sft
    if mode == "seq-mean-token-mean":  # undo s_t = 1 / |seq|
        scale = scale * n_tokens_S.to(sft_weight_S).clamp(min=1)
    return torch.where(seq.expert_sft_S.to(sft_weight_S.device), sft_weight_S * scale, sft_weight_S)


def entropy_coef_scale(norms: LossNormalizers) -> float:
    """Factor on entropy_coef that turns the fused loss's sum / N_rl into sum / N_entropy."""
    return norms.rl / norms.entropy


def _seq_token_counts(loss_mask_T: torch.Tensor, cu_seqlens_S1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lens_S = (cu_seqlens_S1[1:] - cu_seqlens_S1[:-1]).long().to(loss_mask_T.device)
    idx_T = torch.repeat_interleave(torch.arange(lens_S.numel(), device=loss_mask_T.device), lens_S,
                                    output_size=loss_mask_T.numel())  # known: no host sync for the size
    n_S = torch.zeros(lens_S.numel(), device=loss_mask_T.device).index_add(0, idx_T, (loss_mask_T != 0).float())
    return n_S, idx_T


def normalizer_count(loss_mask_T: torch.Tensor, cu_seqlens_S1: torch.Tensor, mode: str = "token-mean",
                     norm_tokens: float | None = None):
    """This micro-batch's share of the RL normaliser (0-d fp32 tensor, no host sync): trained tokens for
    token-mean, trained sequences for the seq-mean modes, `norm_tokens` (a constant) for token-sum-norm. Sum it
    over micro-batches and ranks (all-reduce) for the global one (token-sum-norm: do not)."""
    _check_mode(mode)
    if mode == "token-mean":
        return (loss_mask_T != 0).sum().float()
    if mode == "token-sum-norm":
        if norm_tokens is None:
            raise ValueError("token-sum-norm needs norm_tokens")
        return torch.tensor(float(norm_tokens))
    n_S, _ = _seq_token_counts(loss_mask_T, cu_seqlens_S1)
    return (n_S > 0).sum().float()


def aggregate(weights: TokenWeights, cu_seqlens_S1: torch.Tensor, mode: str = "token-mean",
              normalizer: float | torch.Tensor | None = None,
              norm_tokens: float | None = None) -> tuple[TokenWeights, torch.Tensor | float]:
    """Apply a loss aggregation: returns (weights with the per-token scale folded into loss_mask, normalizer).

    normalizer: the global value (`loss_normalizers(...).rl`); None uses this micro-batch's own count, which is
    right only when it is the whole batch.
    """
    _check_mode(mode)
    if normalizer is None:
        normalizer = normalizer_count(weights.loss_mask_T, cu_seqlens_S1, mode, norm_tokens)
    if mode != "seq-mean-token-mean":
        return weights, normalizer
    n_S, idx_T = _seq_token_counts(weights.loss_mask_T, cu_seqlens_S1)
    scale_T = 1.0 / n_S.clamp(min=1)[idx_T]
    return replace(weights, loss_mask_T=weights.loss_mask_T * scale_T), normalizer


# ----------------------------------------------------------------------------------------- KL


def kl_estimate(logp_T: torch.Tensor, ref_logp_T: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || ref) estimator: k1 = logp - ref, k3 = exp(ref - logp) - (ref - logp) - 1 (>= 0)."""
    d_T = ref_logp_T.float() - logp_T.float()
    if kind == "k1":
        return -d_T
    if kind == "k3":
        return torch.exp(d_T) - d_T - 1
    raise ValueError(f"unknown KL estimator {kind!r}; choose 'k1' or 'k3'")


def fold_kl(weights: TokenWeights, logp_T: torch.Tensor, ref_logp_T: torch.Tensor, kl_coef: float,
            kind: str = "k3") -> TokenWeights:
    """Add kl_coef * k(logp) as a loss term via sft_weight, gradient-exact at the given (detached) logp_T.

    dk1/dlogp = 1, dk3/dlogp = 1 - exp(ref - logp); the SFT term's gradient is -sft_weight, so
    sft_weight += -kl_coef * dk/dlogp on trained tokens.
    """
    if kl_coef == 0:
        return weights
    if kind == "k1":
        dk_T = torch.ones_like(logp_T, dtype=torch.float32)
    elif kind == "k3":
        dk_T = 1 - torch.exp(ref_logp_T.float() - logp_T.float())
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; choose 'k1' or 'k3'")
    on_T = weights.loss_mask_T != 0
    sft_T = weights.sft_weight_T - torch.where(on_T, kl_coef * dk_T.detach(), torch.zeros_like(dk_T))
    return replace(weights, sft_weight_T=sft_T)
