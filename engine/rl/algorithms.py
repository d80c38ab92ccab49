"""RL algorithms as per-token weights for the one fused loss (`engine.losses.linear_policy_loss`).

Every algorithm of the paper (RETU, arXiv 2512.11470, Section 3 / Appendix B) is a choice of five per-token
tensors for the fused loss, which computes per token t

    loss_t = sft_weight_t * (-logp_t) + pg_weight_t * PG_t - entropy_coef * H_t
    PG_t   = -min(r A_t, clip(r, 1 - eps_low, 1 + eps_high) A_t),  r = exp(logp_t - old_logp_t)   on-policy
    PG_t   = -(pi_t / (pi_t + gamma)) A_t,  pi_t = exp(logp_t)  (behaviour prob 1, no clip)   off_policy_t
    loss   = sum_t loss_mask_t * loss_t / normalizer

This module decides those tensors from per-sequence facts (reward, group id, expert or on-policy) in three
pure steps, none of which knows about rollout, ranks or the model:

    1. advantages   adv_S = spec.advantage_fn(batch, params)            one value per sequence
    2. weights      SeqWeights = spec.weight_fn(batch, adv_S, params)   sft / pg / off-policy / trained
    3. tokens       TokenWeights = to_tokens(seq, cu_seqlens, response_mask_T), then `aggregate(...)`

Advantages (group = the samples of one prompt):
    GRPO   A_i = (R_i - mean_g R) / (std_g R + eps) over the group's on-policy samples. std is the
           unbiased (n-1) estimate, as torch.std / verl; a group of one has std 0 and A = 0.
    LUFFY  A_i = R_i - mean_g R over the mixed group (on-policy + expert), no std (as the paper states).
    SRFT   same as LUFFY (used by its off-policy expert term; its on-policy terms take no advantage).
    UPT    GRPO over the on-policy samples.

Weights per sequence (pos = on-policy with R > 0, neg = on-policy with R <= 0):

    | algorithm   | sequences     | sft_weight | pg_weight | off_policy | trained              |
    |-------------|---------------|------------|-----------|------------|----------------------|
    | SFT         | expert        | 1          | 0         | no         | yes (on-policy: no)  |
    | GRPO / DAPO | on-policy     | 0          | 1         | no         | yes (expert: error)  |
    | LUFFY       | on-policy     | 0          | 1         | no         | yes                  |
    |             | expert        | 0          | 1         | yes        | yes                  |
    | SRFT        | expert        | w1         | 1         | yes        | yes                  |
    |             | pos           | w2         | 0         | no         | yes                  |
    |             | neg           | -1         | 0         | no         | yes                  |
    | UPT         | gate SFT      | 1 (expert) | 0         | no         | expert only          |
    |             | gate RL       | 0          | 1         | no         | on-policy only       |

SRFT: w1 = 0.5 sg(exp(-H)), w2 = 0.1 sg(exp(H)), H the token-averaged policy entropy. The fused loss
reports entropy only after its forward, so the weights take H as a number known before the update:
`srft_weights(mean_entropy)`. The trainer's default source is `entropy_from_logprobs(rollout logprobs)`,
-mean_t log pi(y_t) over the batch's sampled on-policy tokens: with y_t ~ pi this is an unbiased Monte-Carlo
estimate of the token-averaged entropy of the rollout policy (exact in expectation at temperature 1,
top_p 1), i.e. of the policy right before this update. The mean of the fused loss's `entropy` output of
the previous forward is an equally valid source.

UPT gate (per prompt): p = mean reward of the prompt's on-policy samples; p <= gamma -> SFT on its expert
trajectory (its on-policy samples are not trained), else GRPO on its on-policy samples (its expert
trajectory is not trained). gamma defaults to 0 (SFT only when every rollout fails), the value of the UPT
paper's main runs; `WeightParams.upt_gamma` changes it. A prompt with no on-policy samples counts as p = 0.

Aggregation (`aggregate`), as a per-token scale s_t and a normalizer known before the kernel runs:
    token-mean            s_t = 1,              normalizer = trained tokens in the global batch (default)
    seq-mean-token-mean   s_t = 1 / |seq(t)|,   normalizer = trained sequences in the global batch
    seq-mean-token-sum    s_t = 1,              normalizer = trained sequences in the global batch
|seq| counts the sequence's trained tokens. s_t is folded into loss_mask_t (the fused loss multiplies the
whole per-token loss by it), which scales the SFT, PG and entropy terms alike; folding it into sft_weight
and pg_weight instead would leave the entropy bonus unscaled.

KL to a reference (optional, coefficient 0 by default): `kl_estimate` gives k1 = logp - ref_logp and
k3 = exp(ref - logp) - (ref - logp) - 1 per token (for logging); `fold_kl` adds kl_coef * k as a loss term
through sft_weight, exact in gradient at the logp it is given (the rollout / old logp, i.e. exact for
the first update on a rollout batch): d(-sft_t logp_t)/dlogp_t = -sft_t = kl_coef dk/dlogp_t.

Shapes: _S one value per sequence, _T per packed token, _S1 = S + 1 boundaries (cu_seqlens).
`policy_loss_reference` is the plain-torch per-token loss above, used by tests as ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

__all__ = [
    "AGGREGATIONS", "ALGORITHMS", "AlgorithmSpec", "RLBatch", "SeqWeights", "TokenWeights", "WeightParams",
    "aggregate", "entropy_from_logprobs", "fold_kl", "group_mean_advantages", "grpo_advantages",
    "group_stats", "kl_estimate", "normalizer_count", "policy_loss_reference", "sequence_weights",
    "sft_weights", "srft_weights", "to_tokens", "token_weights", "upt_sft_gate",
]

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# ----------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RLBatch:
    """Per-sequence facts of a batch: rewards_S (float), group_ids_S (int, one id per prompt), is_expert_S."""

    rewards_S: torch.Tensor
    group_ids_S: torch.Tensor
    is_expert_S: torch.Tensor

    def __post_init__(self):
        for f in fields(self):
            t = getattr(self, f.name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                raise ValueError(f"RLBatch.{f.name} must be a 1-D tensor")
        n = self.rewards_S.numel()
        if self.group_ids_S.numel() != n or self.is_expert_S.numel() != n:
            raise ValueError(f"RLBatch fields differ in length: {n}, {self.group_ids_S.numel()}, "
                             f"{self.is_expert_S.numel()}")
        if self.is_expert_S.dtype != torch.bool:
            raise ValueError("RLBatch.is_expert_S must be a bool tensor")
        if self.group_ids_S.dtype.is_floating_point:
            raise ValueError("RLBatch.group_ids_S must be an integer tensor")
        if not self.rewards_S.dtype.is_floating_point:
            object.__setattr__(self, "rewards_S", self.rewards_S.float())

    @property
    def num_seqs(self) -> int:
        return self.rewards_S.numel()


@dataclass(frozen=True)
class WeightParams:
    """Hyper-parameters the weight functions read; each algorithm ignores the ones it does not use."""

    upt_gamma: float = 0.0  # UPT: SFT when the prompt's mean on-policy reward p <= upt_gamma
    mean_entropy: float | None = None  # SRFT: token-averaged policy entropy H (nats), see module docstring
    adv_eps: float = 1e-6  # GRPO: (R - mean) / (std + adv_eps)

    def __post_init__(self):
        if self.mean_entropy is not None and not (math.isfinite(self.mean_entropy) and self.mean_entropy >= 0):
            raise ValueError(f"mean_entropy must be a finite number >= 0, got {self.mean_entropy}")
        if not math.isfinite(self.upt_gamma):
            raise ValueError(f"upt_gamma must be finite, got {self.upt_gamma}")
        if self.adv_eps < 0:
            raise ValueError(f"adv_eps must be >= 0, got {self.adv_eps}")


@dataclass(frozen=True)
class SeqWeights:
    """Per-sequence loss weights; `trained_S` False means the sequence contributes nothing."""

    advantages_S: torch.Tensor
    sft_weight_S: torch.Tensor
    pg_weight_S: torch.Tensor
    off_policy_S: torch.Tensor
    trained_S: torch.Tensor


@dataclass(frozen=True)
class TokenWeights:
    """Per-token inputs of `linear_policy_loss` (all [T]); `loss_kwargs()` gives them as keyword arguments."""

    advantages_T: torch.Tensor
    sft_weight_T: torch.Tensor
    pg_weight_T: torch.Tensor
    off_policy_T: torch.Tensor
    loss_mask_T: torch.Tensor

    def loss_kwargs(self) -> dict[str, torch.Tensor]:
        return {"advantages": self.advantages_T, "sft_weight": self.sft_weight_T, "pg_weight": self.pg_weight_T,
                "off_policy": self.off_policy_T, "loss_mask": self.loss_mask_T}


# ----------------------------------------------------------------------------------------- advantages


def group_stats(values_S: torch.Tensor, group_ids_S: torch.Tensor, member_S: torch.Tensor | None = None):
    """Per-sequence (mean, unbiased std, count) of `values` over the members of its group.

    Non-members take their group's statistics too (so they can be compared against it); groups with no
    member have mean 0 and count 0; std is 0 where count < 2.
    """
    values_S = values_S.float()
    if values_S.numel() == 0:
        return values_S.clone(), values_S.clone(), values_S.clone()
    member = torch.ones_like(values_S) if member_S is None else member_S.to(values_S.dtype)
    _, inv_S = torch.unique(group_ids_S, return_inverse=True)
    num_groups = int(inv_S.max()) + 1
    zeros_G = values_S.new_zeros(num_groups)
    count_G = zeros_G.index_add(0, inv_S, member)
    mean_G = zeros_G.index_add(0, inv_S, member * values_S) / count_G.clamp(min=1)
    sq_G = zeros_G.index_add(0, inv_S, member * (values_S - mean_G[inv_S]) ** 2)
    std_G = torch.where(count_G > 1, (sq_G / (count_G - 1).clamp(min=1)).sqrt(), zeros_G)
    return mean_G[inv_S], std_G[inv_S], count_G[inv_S]


def grpo_advantages(rewards_S: torch.Tensor, group_ids_S: torch.Tensor, member_S: torch.Tensor | None = None,
                    eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (R - mean_g) / (std_g + eps) over the members (default all) of each group; 0 for non-members.

    rewards_S [S] float, group_ids_S [S] int (any ids; equal id = same prompt) -> advantages_S [S] fp32.
    """
    mean_S, std_S, _ = group_stats(rewards_S, group_ids_S, member_S)
    adv_S = (rewards_S.float() - mean_S) / (std_S + eps)
    return adv_S if member_S is None else torch.where(member_S, adv_S, torch.zeros_like(adv_S))


def group_mean_advantages(rewards_S: torch.Tensor, group_ids_S: torch.Tensor,
                          member_S: torch.Tensor | None = None) -> torch.Tensor:
    """LUFFY: R - mean_g over the members (default all: the mixed on-policy + expert group), no std."""
    mean_S, _, _ = group_stats(rewards_S, group_ids_S, member_S)
    adv_S = rewards_S.float() - mean_S
    return adv_S if member_S is None else torch.where(member_S, adv_S, torch.zeros_like(adv_S))


def _onpolicy_grpo(batch: RLBatch, params: WeightParams) -> torch.Tensor:
    return grpo_advantages(batch.rewards_S, batch.group_ids_S, ~batch.is_expert_S, eps=params.adv_eps)


def _mixed_group_mean(batch: RLBatch, params: WeightParams) -> torch.Tensor:
    return group_mean_advantages(batch.rewards_S, batch.group_ids_S)


# ----------------------------------------------------------------------------------------- weights


def _seq_weights(adv_S, sft_S, pg_S, off_S, trained_S) -> SeqWeights:
    z = torch.zeros_like(adv_S)
    return SeqWeights(torch.where(trained_S, adv_S, z), torch.where(trained_S, sft_S, z),
                      torch.where(trained_S, pg_S, z), off_S & trained_S, trained_S)


def sft_weights(batch: RLBatch, adv_S: torch.Tensor, params: WeightParams) -> SeqWeights:
    """SFT: -logp on the expert sequences; on-policy sequences are not trained."""
    e = batch.is_expert_S
    return _seq_weights(torch.zeros_like(adv_S), e.float(), torch.zeros_like(adv_S), torch.zeros_like(e), e)


def grpo_weights(batch: RLBatch, adv_S: torch.Tensor, params: WeightParams) -> SeqWeights:
    """GRPO / DAPO: clipped PG with weight 1 on every (on-policy) sequence."""
    if bool(batch.is_expert_S.any()):
        raise ValueError("GRPO/DAPO take on-policy samples only; the batch holds expert trajectories")
    ones = torch.ones_like(adv_S)
    return _seq_weights(adv_S, torch.zeros_like(adv_S), ones, torch.zeros_like(batch.is_expert_S),
                        torch.ones_like(batch.is_expert_S))


def luffy_weights(batch: RLBatch, adv_S: torch.Tensor, params: WeightParams) -> SeqWeights:
    """LUFFY: clipped PG on on-policy sequences, shaped off-policy PG on expert ones."""
    ones = torch.ones_like(adv_S)
    return _seq_weights(adv_S, torch.zeros_like(adv_S), ones, batch.is_expert_S.clone(),
                        torch.ones_like(batch.is_expert_S))


def srft_weights(mean_entropy: float) -> tuple[float, float]:
    """SRFT's stop-gradient weights (w1, w2) = (0.5 exp(-H), 0.1 exp(H)) for entropy H in nats."""
    if not (math.isfinite(mean_entropy) and mean_entropy >= 0):
        raise ValueError(f"mean_entropy must be a finite number >= 0, got {mean_entropy}")
    return 0.5 * math.exp(-mean_entropy), 0.1 * math.exp(mean_entropy)


def entropy_from_logprobs(logprobs_T: torch.Tensor, mask_T: torch.Tensor | None = None) -> float:
    """-mean log pi(y_t) over sampled tokens: an unbiased estimate of the token-averaged entropy (one host sync)."""
    lp = logprobs_T.float()
    if mask_T is not None:
        lp = lp[mask_T.bool()]
    if lp.numel() == 0:
        raise ValueError("entropy_from_logprobs needs at least one token")
    return float(-lp.mean())


def srft_seq_weights(batch: RLBatch, adv_S: torch.Tensor, params: WeightParams) -> SeqWeights:
    """SRFT: w1*SFT + off-policy PG on expert, w2*SFT on positive rollouts, -1*SFT (push down) on negative."""
    if params.mean_entropy is None:
        raise ValueError("SRFT needs WeightParams.mean_entropy (e.g. entropy_from_logprobs of the rollouts)")
    w1, w2 = srft_weights(params.mean_entropy)
    e = batch.is_expert_S
    positive = batch.rewards_S > 0
    sft_S = torch.where(e, w1, torch.where(positive, w2, -1.0)).to(adv_S.dtype)
    return _seq_weights(adv_S, sft_S, e.to(adv_S.dtype), e.clone(), torch.ones_like(e))


def upt_sft_gate(batch: RLBatch, gamma: float = 0.0) -> torch.Tensor:
    """[S] bool: True where the sequence's prompt takes the SFT branch (mean on-policy reward p <= gamma)."""
    p_S, _, _ = group_stats(batch.rewards_S, batch.group_ids_S, ~batch.is_expert_S)  # p = 0 without rollouts
    return p_S <= gamma


def upt_weights(batch: RLBatch, adv_S: torch.Tensor, params: WeightParams) -> SeqWeights:
    """UPT: per prompt, SFT on the expert trajectory (gate) or GRPO on the on-policy samples."""
    gate_S = upt_sft_gate(batch, params.upt_gamma)
    e = batch.is_expert_S
    trained_S = torch.where(gate_S, e, ~e)
    return _seq_weights(adv_S, e.to(adv_S.dtype), (~e).to(adv_S.dtype), torch.zeros_like(e), trained_S)


# ----------------------------------------------------------------------------------------- registry

AdvantageFn = Callable[[RLBatch, WeightParams], torch.Tensor]
WeightFn = Callable[[RLBatch, torch.Tensor, WeightParams], SeqWeights]


@dataclass(frozen=True)
class AlgorithmSpec:
    """One RL algorithm: its clip range, whether it uses DAPO dynamic sampling / expert data, and its maps."""

    name: str
    advantage_fn: AdvantageFn
    weight_fn: WeightFn
    eps_low: float = 0.2
    eps_high: float = 0.2
    dynamic_sampling: bool = False
    uses_expert: bool = False

    def __post_init__(self):
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"{self.name}: need 0 <= eps_low < 1 and eps_high >= 0, got "
                             f"{self.eps_low}, {self.eps_high}")


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "grpo": AlgorithmSpec("grpo", _onpolicy_grpo, grpo_weights),
    "dapo_d": AlgorithmSpec("dapo_d", _onpolicy_grpo, grpo_weights, dynamic_sampling=True),
    "dapo_dc": AlgorithmSpec("dapo_dc", _onpolicy_grpo, grpo_weights, eps_high=0.28, dynamic_sampling=True),
    "luffy": AlgorithmSpec("luffy", _mixed_group_mean, luffy_weights, uses_expert=True),
    "srft": AlgorithmSpec("srft", _mixed_group_mean, srft_seq_weights, uses_expert=True),
    "upt": AlgorithmSpec("upt", _onpolicy_grpo, upt_weights, uses_expert=True),
}


def _spec(algorithm: str | AlgorithmSpec) -> AlgorithmSpec:
    if isinstance(algorithm, AlgorithmSpec):
        return algorithm
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown RL algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[algorithm]


def sequence_weights(algorithm: str | AlgorithmSpec, batch: RLBatch,
                     params: WeightParams | None = None) -> SeqWeights:
    """Advantages then per-sequence weights of `algorithm` (a key of ALGORITHMS or a spec)."""
    spec, params = _spec(algorithm), params or WeightParams()
    return spec.weight_fn(batch, spec.advantage_fn(batch, params), params)


def to_tokens(seq: SeqWeights, cu_seqlens_S1: torch.Tensor, response_mask_T: torch.Tensor) -> TokenWeights:
    """Broadcast per-sequence weights onto packed tokens; loss_mask_T = response_mask_T * trained.

    response_mask_T [T]: 1 on tokens whose target is a response token (prompt tokens and each sequence's
    last token 0), i.e. `labels != -100` of the packed batch. cu_seqlens_S1 [S+1] int.
    """
    lens_S = (cu_seqlens_S1[1:] - cu_seqlens_S1[:-1]).long()
    if lens_S.numel() != seq.trained_S.numel():
        raise ValueError(f"cu_seqlens has {lens_S.numel()} sequences, weights have {seq.trained_S.numel()}")
    if int(cu_seqlens_S1[-1]) != response_mask_T.numel():
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens_S1[-1])} but there are {response_mask_T.numel()} tokens")
    device = response_mask_T.device
    idx_T = torch.repeat_interleave(torch.arange(lens_S.numel(), device=device), lens_S.to(device))
    mask_T = response_mask_T.float() * seq.trained_S.to(device)[idx_T].float()
    on_T = mask_T != 0
    z = torch.zeros_like(mask_T)
    return TokenWeights(
        advantages_T=torch.where(on_T, seq.advantages_S.to(device).float()[idx_T], z),
        sft_weight_T=torch.where(on_T, seq.sft_weight_S.to(device).float()[idx_T], z),
        pg_weight_T=torch.where(on_T, seq.pg_weight_S.to(device).float()[idx_T], z),
        off_policy_T=on_T & seq.off_policy_S.to(device)[idx_T],
        loss_mask_T=mask_T,
    )


def token_weights(algorithm: str | AlgorithmSpec, batch: RLBatch, cu_seqlens_S1: torch.Tensor,
                  response_mask_T: torch.Tensor, params: WeightParams | None = None) -> TokenWeights:
    """`sequence_weights` then `to_tokens`: the fused loss inputs of one packed micro-batch (before aggregation)."""
    return to_tokens(sequence_weights(algorithm, batch, params), cu_seqlens_S1, response_mask_T)


# ----------------------------------------------------------------------------------------- aggregation


def _check_mode(mode: str) -> None:
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGGREGATIONS}")


def _seq_token_counts(loss_mask_T: torch.Tensor, cu_seqlens_S1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lens_S = (cu_seqlens_S1[1:] - cu_seqlens_S1[:-1]).long().to(loss_mask_T.device)
    idx_T = torch.repeat_interleave(torch.arange(lens_S.numel(), device=loss_mask_T.device), lens_S)
    n_S = torch.zeros(lens_S.numel(), device=loss_mask_T.device).index_add(0, idx_T, (loss_mask_T != 0).float())
    return n_S, idx_T


def normalizer_count(loss_mask_T: torch.Tensor, cu_seqlens_S1: torch.Tensor, mode: str = "token-mean"):
    """This micro-batch's share of the normalizer (0-d fp32 tensor, no host sync): trained tokens for
    token-mean, trained sequences otherwise. Sum it over micro-batches and ranks (all-reduce) for the global one."""
    _check_mode(mode)
    if mode == "token-mean":
        return (loss_mask_T != 0).sum().float()
    n_S, _ = _seq_token_counts(loss_mask_T, cu_seqlens_S1)
    return (n_S > 0).sum().float()


def aggregate(weights: TokenWeights, cu_seqlens_S1: torch.Tensor, mode: str = "token-mean",
              normalizer: float | torch.Tensor | None = None) -> tuple[TokenWeights, torch.Tensor | float]:
    """Apply a loss aggregation: returns (weights with the per-token scale folded into loss_mask, normalizer).

    normalizer: the global value (sum of `normalizer_count` over the global batch); None uses this
    micro-batch's own count, which is right only when it is the whole batch.
    """
    _check_mode(mode)
    if normalizer is None:
        normalizer = normalizer_count(weights.loss_mask_T, cu_seqlens_S1, mode)
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


# ----------------------------------------------------------------------------------------- reference loss


def policy_loss_reference(logp_T, old_logp_T, advantages_T, sft_weight_T, pg_weight_T, off_policy_T, loss_mask_T,
                          *, eps_low=0.2, eps_high=0.2, luffy_gamma=0.1, entropy_T=None, entropy_coef=0.0,
                          normalizer=None) -> torch.Tensor:
    """Plain-torch per-token loss of the fused kernel (module docstring), differentiable in logp_T.

    old_logp_T None means one update per rollout batch: old = logp.detach() (r = 1).
    normalizer None means sum(loss_mask); a zero normalizer is taken as 1.
    """
    logp_T = logp_T.float()
    old_T = logp_T.detach() if old_logp_T is None else old_logp_T.float()
    adv_T = advantages_T.float()
    ratio_T = torch.exp(logp_T - old_T)
    pg_on_T = -torch.minimum(ratio_T * adv_T, ratio_T.clamp(1 - eps_low, 1 + eps_high) * adv_T)
    pi_T = torch.exp(logp_T)
    pg_off_T = -(pi_T / (pi_T + luffy_gamma)) * adv_T
    pg_T = torch.where(off_policy_T.bool(), pg_off_T, pg_on_T)
    loss_T = sft_weight_T.float() * (-logp_T) + pg_weight_T.float() * pg_T
    if entropy_T is not None and entropy_coef != 0:
        loss_T = loss_T - entropy_coef * entropy_T.float()
    mask_T = loss_mask_T.float()
    norm = mask_T.sum() if normalizer is None else torch.as_tensor(normalizer, dtype=torch.float32)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)  # an empty batch has loss 0, as the kernel
    return (mask_T * loss_T).sum() / norm
