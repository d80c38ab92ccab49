"""RL algorithms as per-token weights for the one fused loss (`engine.losses.linear_policy_loss`).

Every algorithm of the paper (RETU, arXiv 2512.11470, Section 3 / Appendix B) is a choice of per-token
tensors for the fused loss, which computes per token t (logits divided by the sampling temperature T)

    loss_t = sft_weight_t * (-logp_t) + pg_weight_t * PG_t - entropy_coef * H_t
    PG_t   = -min(r A_t, clip(r, 1 - eps_low, 1 + eps_high) A_t),  r = exp(logp_t - old_logp_t)   on-policy
             and, with a dual-clip bound c and A_t < 0, min(PG_t, -c A_t)
    PG_t   = -(pi_t / (pi_t + gamma)) A_t,  pi_t = exp(logp_t)  (behaviour prob 1, no clip)   off_policy_t
    loss   = sum_t loss_mask_t * loss_t / normalizer

This module decides those tensors from per-sequence facts (reward, group id, expert or on-policy) in pure
steps, none of which knows about rollout, ranks or the model:

    1. advantages   adv_S = spec.advantage_fn(batch, params)            one value per sequence
    2. weights      SeqWeights = spec.weight_fn(batch, adv_S, params)   sft / pg / off-policy / trained
    3. tokens       TokenWeights = to_tokens(seq, cu_seqlens, response_mask_T)
    4. normalisers  engine.rl.normalizers: loss_normalizers(...), scale_expert_sft(...), aggregate(...)

The reference code is mapped in shared/notes/reference-code-map.md ("map §n" below): RETU (LINs-lab/RETU,
DAPO_dc), and the UPT-repo (TsinghuaC3I/Unify-Post-Training, `hpt/verl/verl/mix_src/`) for LUFFY, SRFT and
UPT. Every default below follows that code; each choice is a field of `WeightParams` / `AlgorithmSpec`.

Advantages (group = the samples of one prompt; map §1):
    GRPO   A_i = (R_i - mean_g R) / (std_g R + eps) over the group's on-policy samples; std is the unbiased
           (n-1) estimate, as torch.std / verl. `adv_std=False` gives A_i = R_i - mean_g R.
           A group of one has mean 0 and std 1, so A = R / (1 + eps) (R without std), as verl and the UPT-repo.
    LUFFY  A_i = R_i - mean_g R over the mixed group (on-policy + expert), no std (map §4: grpo_use_std=False).
    SRFT   same as LUFFY (its off-policy expert term uses it; its on-policy terms take no advantage).
    UPT    R_i - mean_g R over the on-policy samples, no std (map §6: train.sh:107).

Weights per sequence (pos = on-policy with R == 1, the UPT-repo's `correct_answer_mask`; neg = the others):

    | algorithm   | sequences     | sft_weight | pg_weight | off_policy | trained              |
    |-------------|---------------|------------|-----------|------------|----------------------|
    | SFT         | expert        | 1          | 0         | no         | yes (on-policy: no)  |
    | GRPO / DAPO | on-policy     | 0          | 1         | no         | yes (expert: error)  |
    | LUFFY       | on-policy     | 0          | 1         | no         | yes                  |
    |             | expert        | 0          | 1         | yes        | yes                  |
    | SRFT        | expert        | w1(H_i)    | 1         | yes        | yes                  |
    |             | pos           | w2(H_i)    | 0         | no         | yes                  |
    |             | neg           | -1         | 0         | no         | yes                  |
    | UPT         | gate SFT      | 1 (expert) | 0         | no         | expert only          |
    |             | gate RL       | 0          | 1         | no         | on-policy only       |

SRFT (map §5): w1 = 0.5 exp(-H_i), w2 = 0.1 exp(H_i), stop-gradient, with H_i the mean entropy of sequence i's
own response tokens under the current policy, taken from the training forward (UPT-repo mix_actor.py:349-353).
The fused loss needs its weights before it runs, so `engine.rl.update` computes H_i from a no-grad LM-head pass
on the hidden states of the same training forward and fills `srft_sft_weights(...)` in; until then
`sequence_weights("srft")` leaves NaN in those rows (`AlgorithmSpec.entropy_weights`).

UPT gate (per prompt; map §6): p = mean reward of the prompt's on-policy samples; p <= gamma -> SFT on its
expert trajectory (its on-policy samples are not trained), else RL on its on-policy samples (its expert
trajectory is not trained). gamma defaults to 0 (SFT only when every rollout fails), the UPT-repo's
switch_gate=0. A prompt with no on-policy samples counts as p = 0. Untrained sequences are dropped before
packing, so neither the update nor the compute count (Eq. 26-27) sees them.

Clipping: the UPT-repo runs LUFFY, SRFT and UPT with `loss_remove_clip=True` (map §4-6), i.e. PG = -A r;
their specs say so with eps_low = 1 and eps_high = inf (clip(r, 0, inf) = r for r > 0). Dual-clip bound c
(verl compute_policy_loss_vanilla, map §1): DAPO_dc 10 (RETU launcher); None (off) for the others (the
UPT-repo's compute_policy_loss has none).

Loss normalisers (one per loss term), token aggregation and the KL term live in `engine.rl.normalizers`.

Shapes: _S one value per sequence, _T per packed token, _S1 = S + 1 boundaries (cu_seqlens).
`policy_loss_reference` is the plain-torch per-token loss above, used by tests as ground truth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

__all__ = [
    "ALGORITHMS", "AlgorithmSpec", "RLBatch", "SeqWeights", "TokenWeights", "WeightParams", "group_mean_advantages",
    "grpo_advantages", "group_stats", "policy_loss_reference", "sequence_weights", "sft_weights", "srft_sft_weights",
    "to_device", "to_tokens", "token_seq_index", "token_weights", "upt_sft_gate",
]



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

    upt_gamma: float = 0.0
    """UPT: SFT when the prompt's mean on-policy reward p <= upt_gamma."""
    adv_eps: float = 1e-6
    """GRPO: (R - mean) / (std + adv_eps)."""
    adv_std: bool | None = None
    """Divide group-centred rewards by the group std; None: the algorithm's choice (`AlgorithmSpec.adv_std`)."""

    def __post_init__(self):
        if not math.isfinite(self.upt_gamma):
            raise ValueError(f"upt_gamma must be finite, got {self.upt_gamma}")
        if self.adv_eps < 0:
            raise ValueError(f"adv_eps must be >= 0, got {self.adv_eps}")


@dataclass(frozen=True)
class SeqWeights:
    """Per-sequence loss weights; `trained_S` False means the sequence contributes nothing.

    expert_sft_S marks the sequences whose sft_weight is an SFT term on an expert trajectory (SRFT's w1, UPT's
    gated SFT), which `scale_expert_sft` gives its own normaliser; None means no such sequence.
    """

    advantages_S: torch.Tensor
    sft_weight_S: torch.Tensor
    pg_weight_S: torch.Tensor
    off_policy_S: torch.Tensor
    trained_S: torch.Tensor
    expert_sft_S: torch.Tensor | None = None

    def select(self, idx) -> SeqWeights:
        """The weights of sequences `idx` (an index list or tensor); copies."""
        return SeqWeights(*(None if t is None else t[idx] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.advantages_S, self.sft_weight_S, self.pg_weight_S, self.off_policy_S, self.trained_S,
                self.expert_sft_S)

    def to(self, device: torch.device | str) -> SeqWeights:
        """The weights on `device`, in one host-to-device copy that does not wait for the device (see
        `to_device`)."""
        return SeqWeights(*to_device(device, *self.tensors()))


def to_device(device: torch.device | str, *tensors_S: torch.Tensor | None) -> list[torch.Tensor | None]:
    """1-D tensors of one length (None passes through) on `device`: the host ones in a single copy that does
    not block.

    A plain `.to(cuda)` of a host tensor is `cudaMemcpyAsync` + `cudaStreamSynchronize` (ATen's copy_kernel_cuda
    with non_blocking=False): the host waits for all queued GPU work. Here the host tensors are stacked into one
    fp32 block (exact for fp32, bools and ints below 2^24: the per-sequence weights), pinned on CUDA and copied with non_blocking=True
    (the caching host allocator keeps the pinned block until the copy has run), then cast back on the device.
    Tensors already on an accelerator are moved with `.to(device)` (a no-op on the same device)."""
    device = torch.device(device)
    if device.type == "cpu":
        return [None if t is None else t.to(device) for t in tensors_S]
    host = [t for t in tensors_S if t is not None and t.device.type == "cpu"]
    rows = iter(())
    if host:
        block = torch.stack([t.detach().to(torch.float32) for t in host])
        if device.type == "cuda":
            block = block.pin_memory()
        rows = iter(block.to(device, non_blocking=True))
    return [None if t is None else next(rows).to(t.dtype) if t.device.type == "cpu" else t.to(device)
            for t in tensors_S]


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
                    eps: float = 1e-6, use_std: bool = True) -> torch.Tensor:
    """GRPO: (R - mean_g) / (std_g + eps) (or R - mean_g without std) over the members (default all) of each
    group; 0 for non-members. A group of one member has mean 0, std 1: A = R / (1 + eps), as verl.

    rewards_S [S] float, group_ids_S [S] int (any ids; equal id = same prompt) -> advantages_S [S] fp32.
    """
    mean_S, std_S, count_S = group_stats(rewards_S, group_ids_S, member_S)
    single = count_S == 1
    mean_S = torch.where(single, torch.zeros_like(mean_S), mean_S)
    adv_S = rewards_S.float() - mean_S
    if use_std:
        adv_S = adv_S / (torch.where(single, torch.ones_like(std_S), std_S) + eps)
    return adv_S if member_S is None else torch.where(member_S, adv_S, torch.zeros_like(adv_S))


def group_mean_advantages(rewards_S: torch.Tensor, group_ids_S: torch.Tensor,
                          member_S: torch.Tensor | None = None) -> torch.Tensor:
    """LUFFY: R - mean_g over the members (default all: the mixed on-policy + expert group), no std."""
    return grpo_advantages(rewards_S, group_ids_S, member_S, use_std=False)


def _onpolicy_grpo(batch: RLBatch, params: WeightParams, use_std: bool) -> torch.Tensor:
    return grpo_advantages(batch.rewards_S, batch.group_ids_S, ~batch.is_expert_S, eps=params.adv_eps,
                           use_std=use_std)


def _mixed_group(batch: RLBatch, params: WeightParams, use_std: bool) -> torch.Tensor:
    return grpo_advantages(batch.rewards_S, batch.group_ids_S, eps=params.adv_eps, use_std=use_std)


# ----------------------------------------------------------------------------------------- weights


def _seq_weights(adv_S, sft_S, pg_S, off_S, trained_S, expert_sft_S=None) -> SeqWeights:
    z = torch.zeros_like(adv_S)
    return SeqWeights(torch.where(trained_S, adv_S, z), torch.where(trained_S, sft_S, z),
                      torch.where(trained_S, pg_S, z), off_S & trained_S, trained_S,
                      None if expert_sft_S is None else expert_sft_S & trained_S)


def sft_weights(batch: RLBatch, adv_S: torch.Tensor, params: WeightParams) -> SeqWeights:
    """SFT: -logp on the expert sequences; on-policy sequences are not trained."""
    e = batch.is_expert_S
    return _seq_weights(torch.zeros_like(adv_S), e.float(), torch.zeros_like(adv_S), torch.zeros_like(e), e, e)


def grpo_weights(batch: RLBatch, adv_S: torch.Tensor, params: WeightParams) -> SeqWeights:
    """GRPO / DAPO: clipped PG with weight 1 on every (on-policy) sequence."""
    if bool(batch.is_expert_S.any()):
        raise ValueError("GRPO/DAPO take on-policy samples only; the batch holds expert trajectories")
    ones = torch.ones_like(adv_S)
    return _seq_weights(adv_S, torch.zeros_like(adv_S), ones, torch.zeros_like(batch.is_expert_S),
                        torch.ones_like(batch.is_expert_S))


def luffy_weights(batch: RLBatch, adv_S: torch.Tensor, params: WeightParams) -> SeqWeights:
    """LUFFY: PG on on-policy sequences, shaped off-policy PG on expert ones."""
    ones = torch.ones_like(adv_S)
    return _seq_weights(adv_S, torch.zeros_like(adv_S), ones, batch.is_expert_S.clone(),
                        torch.ones_like(batch.is_expert_S))


def srft_sft_weights(rewards_S: torch.Tensor, is_expert_S: torch.Tensor, entropy_S: torch.Tensor) -> torch.Tensor:
    """SRFT's stop-gradient per-sequence sft weights from each sequence's mean token entropy H_S (nats):
    expert 0.5 exp(-H), on-policy with R == 1 0.1 exp(H), other on-policy -1 (UPT-repo mix_actor.py:350-353,
    mix_core_alg.py:559-574 with srft_type="paper")."""
    h_S = entropy_S.detach().float()
    correct = rewards_S.to(h_S.device) == 1
    return torch.where(is_expert_S.to(h_S.device), 0.5 * torch.exp(-h_S),
                       torch.where(correct, 0.1 * torch.exp(h_S), torch.full_like(h_S, -1.0)))


def srft_seq_weights(batch: RLBatch, adv_S: torch.Tensor, params: WeightParams) -> SeqWeights:
    """SRFT: w1*SFT + off-policy PG on expert, w2*SFT on positive rollouts, -1*SFT (push down) on negative.

    The entropy-dependent sft weights are NaN here; `engine.rl.update` fills them from the training forward.
    """
    e = batch.is_expert_S
    sft_S = torch.full_like(adv_S, float("nan"))
    return _seq_weights(adv_S, sft_S, e.to(adv_S.dtype), e.clone(), torch.ones_like(e), e.clone())


def upt_sft_gate(batch: RLBatch, gamma: float = 0.0) -> torch.Tensor:
    """[S] bool: True where the sequence's prompt takes the SFT branch (mean on-policy reward p <= gamma)."""
    p_S, _, _ = group_stats(batch.rewards_S, batch.group_ids_S, ~batch.is_expert_S)  # p = 0 without rollouts
    return p_S <= gamma


def upt_weights(batch: RLBatch, adv_S: torch.Tensor, params: WeightParams) -> SeqWeights:
    """UPT: per prompt, SFT on the expert trajectory (gate) or PG on the on-policy samples."""
    gate_S = upt_sft_gate(batch, params.upt_gamma)
    e = batch.is_expert_S
    trained_S = torch.where(gate_S, e, ~e)
    return _seq_weights(adv_S, e.to(adv_S.dtype), (~e).to(adv_S.dtype), torch.zeros_like(e), trained_S, e.clone())


# ----------------------------------------------------------------------------------------- registry

AdvantageFn = Callable[[RLBatch, WeightParams, bool], torch.Tensor]
WeightFn = Callable[[RLBatch, torch.Tensor, WeightParams], SeqWeights]


@dataclass(frozen=True)
class AlgorithmSpec:
    """One RL algorithm: its clip range and dual-clip bound, advantage, whether it uses DAPO dynamic sampling /
    expert data / per-sequence entropy weights, its reward mode, and its maps. eps_low = 1, eps_high = inf is
    "no clip"."""

    name: str
    advantage_fn: AdvantageFn
    weight_fn: WeightFn
    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_ratio_c: float | None = None
    adv_std: bool = True
    dynamic_sampling: bool = False
    uses_expert: bool = False
    entropy_weights: bool = False
    reward_mode: str = "boxed"  # engine/reward.py; the reward of the code that ran it

    def __post_init__(self):
        if not (0 <= self.eps_low <= 1 and self.eps_high >= 0):
            raise ValueError(f"{self.name}: need 0 <= eps_low <= 1 and eps_high >= 0, got "
                             f"{self.eps_low}, {self.eps_high}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(f"{self.name}: the dual-clip bound clip_ratio_c must be > 1, got {self.clip_ratio_c}")


NO_CLIP = {"eps_low": 1.0, "eps_high": math.inf}  # the UPT-repo's loss_remove_clip=True
ALGORITHMS: dict[str, AlgorithmSpec] = {
    "grpo": AlgorithmSpec("grpo", _onpolicy_grpo, grpo_weights),
    "dapo_d": AlgorithmSpec("dapo_d", _onpolicy_grpo, grpo_weights, dynamic_sampling=True),
    # RETU gpu launcher :84-85,170-172: clip 0.2 / 0.28, dual clip c = 10.
    # RETU's reward parses the whole response without a \boxed (no_format_custom_reward_fn.py:154-162); the
    # UPT-repo's (reward_impl_version=6) needs one (mix_src/entropy_math/__init__.py:1007-1010).
    "dapo_dc": AlgorithmSpec("dapo_dc", _onpolicy_grpo, grpo_weights, eps_high=0.28, clip_ratio_c=10.0,
                             dynamic_sampling=True, reward_mode="boxed-or-whole"),
    "luffy": AlgorithmSpec("luffy", _mixed_group, luffy_weights, adv_std=False, uses_expert=True, **NO_CLIP),
    "srft": AlgorithmSpec("srft", _mixed_group, srft_seq_weights, adv_std=False, uses_expert=True,
                          entropy_weights=True, **NO_CLIP),
    "upt": AlgorithmSpec("upt", _onpolicy_grpo, upt_weights, adv_std=False, uses_expert=True, **NO_CLIP),
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
    use_std = spec.adv_std if params.adv_std is None else params.adv_std
    return spec.weight_fn(batch, spec.advantage_fn(batch, params, use_std), params)


def token_seq_index(cu_seqlens_S1: torch.Tensor, num_tokens: int, device: torch.device | str) -> torch.Tensor:
    """[T] long: the sequence each packed token belongs to, without a host sync.

    `repeat_interleave` with tensor repeats must learn its output size from the device (CUDA: the repeats'
    sum read to the host) unless `output_size` is given; T is known (the batch's shape). That cu_seqlens ends
    at T is checked by `torch._assert_async` (CPU: an error at once; CUDA: a device-side assert, no sync)."""
    cu = cu_seqlens_S1.to(device)
    torch._assert_async(cu[-1] == num_tokens, f"cu_seqlens does not end at the {num_tokens} packed tokens")
    lens_S = (cu[1:] - cu[:-1]).long()
    return torch.repeat_interleave(torch.arange(lens_S.numel(), device=device), lens_S, output_size=num_tokens)


def to_tokens(seq: SeqWeights, cu_seqlens_S1: torch.Tensor, response_mask_T: torch.Tensor) -> TokenWeights:
    """Broadcast per-sequence weights onto packed tokens; loss_mask_T = response_mask_T * trained.

    response_mask_T [T]: 1 on tokens whose target is a response token (prompt tokens and each sequence's
    last token 0), i.e. `labels != -100` of the packed batch. cu_seqlens_S1 [S+1] int.
    No host sync (it runs once per micro-batch): the token count is checked with a device-side assert, and the
    token -> sequence index is sized by the known T.
    """
    if cu_seqlens_S1.numel() - 1 != seq.trained_S.numel():
        raise ValueError(f"cu_seqlens has {cu_seqlens_S1.numel() - 1} sequences, weights have {seq.trained_S.numel()}")
    device = response_mask_T.device
    idx_T = token_seq_index(cu_seqlens_S1, response_mask_T.numel(), device)
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


# ----------------------------------------------------------------------------------------- reference loss


def policy_loss_reference(logp_T, old_logp_T, advantages_T, sft_weight_T, pg_weight_T, off_policy_T, loss_mask_T,
                          *, eps_low=0.2, eps_high=0.2, luffy_gamma=0.1, entropy_T=None, entropy_coef=0.0,
                          normalizer=None, clip_ratio_c=None) -> torch.Tensor:
    """Plain-torch per-token loss of the fused kernel (module docstring), differentiable in logp_T.

    old_logp_T None means one update per rollout batch: old = logp.detach() (r = 1).
    normalizer None means sum(loss_mask); a zero normalizer is taken as 1.
    """
    logp_T = logp_T.float()
    old_T = logp_T.detach() if old_logp_T is None else old_logp_T.float()
    adv_T = advantages_T.float()
    ratio_T = torch.exp(logp_T - old_T)
    pg_on_T = -torch.minimum(ratio_T * adv_T, ratio_T.clamp(1 - eps_low, 1 + eps_high) * adv_T)
    if clip_ratio_c is not None:
        pg_on_T = torch.where(adv_T < 0, torch.minimum(pg_on_T, -clip_ratio_c * adv_T), pg_on_T)
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
