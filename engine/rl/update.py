"""One micro-batch of the RL policy update: its per-token weights and the fused loss, as the `loss_fn(h, w)`
that the packed model calls with its hidden states and LM-head weight.

    loss_fn = MicroBatchLoss(seq_w, rewards_S, is_expert_S, batch.cu_seqlens, response_T, targets_T, norms, settings)
    out = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, loss_fn)
    loss_fn.sft_weight_S   # the per-sequence sft weights the update used (SRFT's, after the SFT normaliser)

Why a callable and not precomputed weights: two weights depend on the policy at the moment of the update, and
the reference takes them from the training forward itself:
  - SRFT's w1 = 0.5 exp(-H_i), w2 = 0.1 exp(H_i), H_i the mean entropy of sequence i's response tokens
    (UPT-repo `hpt/verl/verl/mix_src/mix_actor.py:349-353`), recomputed in every micro-batch;
  - the KL term's gradient kl_coef dk/dlogp at the current logp of each mini-batch (`fold_kl`); the rollout /
    old logp is stale after the first of several mini-batch updates.
The fused loss computes its gradients inside its forward, so it needs every weight before it runs. The
callable therefore first runs a no-grad LM-head pass (`linear_policy_loss` under torch.no_grad: logp and
entropy of the response tokens from the same hidden states, never [T, V] logits), derives the weights, then
runs the training call. Both passes read the same hidden states, so the weights are exactly those of the
training forward. The extra pass costs 2 V H FLOPs per response token (`stats_tokens` counts them; the
trainer logs them apart from the paper's compute, which has no such term) and runs only for SRFT or KL.

Logits are divided by the sampling temperature in both passes (`LossSettings.temperature`), as RETU does in its
training and old-logprob forwards (map §8), so the loss optimises the policy that sampled.

Host syncs. A micro-batch's loss runs between the forward and backward of every micro-batch, so nothing in it
waits for the device: the per-sequence values reach the device in one non-blocking copy (`to_device`), the
token -> sequence index is sized by the known token count (`token_seq_index`), normalisers are Python numbers
filled in on the device, and the metric sums (`token_stats`) stay on the device until the step ends. What
remains is the fused loss's own choice (`LossSettings.compact`, engine/losses.py "Host syncs": "nonzero", the
default on CUDA, reads the trained-token count once per call; "mask" reads nothing) and, in
`engine.rl.normalizers`, the per-sequence counts of SRFT's entropy mean and of seq-mean-token-mean
(`repeat_interleave` without an output size). tests/test_rl_host_syncs.py counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.losses import PolicyLossOutput, linear_policy_loss
from engine.rl.algorithms import (
    AlgorithmSpec,
    SeqWeights,
    srft_sft_weights,
    to_device,
    to_tokens,
    token_seq_index,
)
from engine.rl.normalizers import (
    AGGREGATIONS,
    LossNormalizers,
    aggregate,
    entropy_coef_scale,
    fold_kl,
    kl_estimate,
    per_sequence_mean,
    scale_expert_sft,
)

__all__ = ["LossSettings", "MicroBatchLoss"]


@dataclass(frozen=True)
class LossSettings:
    """The scalar settings of the policy loss (from `RLConfig` and the algorithm's spec)."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    clip_ratio_c: float | None = None  # dual clip for A < 0 (verl compute_policy_loss_vanilla); None: off
    luffy_gamma: float = 0.1
    entropy_coef: float = 0.0
    temperature: float = 1.0
    aggregation: str = "token-mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_weights: bool = False  # SRFT: sft weights from each sequence's entropy in the training forward
    compact: str = "auto"  # how the fused loss skips untrained tokens (engine/losses.py, "Host syncs")

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation {self.aggregation!r}; choose one of {AGGREGATIONS}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(f"clip_ratio_c must be > 1 (or None), got {self.clip_ratio_c}")
        if self.compact not in ("auto", "nonzero", "mask"):
            raise ValueError(f"compact must be 'auto', 'nonzero' or 'mask', got {self.compact!r}")

    @classmethod
    def for_run(cls, cfg, spec: AlgorithmSpec) -> LossSettings:
        """A run's settings from its `RLConfig`: the config's overrides, else the algorithm's clip range and
        dual-clip bound (an infinite bound is none)."""
        c = spec.clip_ratio_c if cfg.clip_ratio_c is None else cfg.clip_ratio_c
        return cls(eps_low=spec.eps_low if cfg.eps_low is None else cfg.eps_low,
                   eps_high=spec.eps_high if cfg.eps_high is None else cfg.eps_high,
                   clip_ratio_c=None if c is None or c == float("inf") else c, luffy_gamma=cfg.luffy_gamma,
                   entropy_coef=cfg.entropy_coef, temperature=cfg.temperature, aggregation=cfg.aggregation,
                   kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, entropy_weights=spec.entropy_weights)


class MicroBatchLoss:
    """`loss_fn(hidden_TH, weight_VH) -> PolicyLossOutput` of one packed micro-batch (see the module docstring).

    seq_w, rewards_S, is_expert_S: this micro-batch's sequences in packing order; cu_seqlens_S1, response_T
    (bool, target is a response token) and targets_T from the packed batch; norms: the mini-batch's global
    normalisers; old_logp_T / ref_logp_T: per-token log-probs of the old policy / the KL reference (or None).
    """

    def __init__(self, seq_w: SeqWeights, rewards_S: torch.Tensor, is_expert_S: torch.Tensor,
                 cu_seqlens_S1: torch.Tensor, response_T: torch.Tensor, targets_T: torch.Tensor,
                 norms: LossNormalizers, settings: LossSettings, old_logp_T: torch.Tensor | None = None,
                 ref_logp_T: torch.Tensor | None = None):
        if settings.kl_coef != 0 and ref_logp_T is None:
            raise ValueError("a KL term (kl_coef != 0) needs ref_logp_T")
        dev = response_T.device
        *weights, self.rewards_S, self.is_expert_S = to_device(dev, *seq_w.tensors(), rewards_S, is_expert_S)
        self.seq_w = SeqWeights(*weights)
        self.cu, self.response_T, self.targets_T = cu_seqlens_S1.to(dev), response_T, targets_T
        self.idx_T = token_seq_index(self.cu, response_T.numel(), dev)
        self.norms, self.s, self.old_logp_T, self.ref_logp_T = norms, settings, old_logp_T, ref_logp_T
        self.sft_weight_S: torch.Tensor | None = None
        self.stats_tokens = torch.zeros((), device=dev)
        self.kl_sum = torch.zeros((), device=dev)

    def _stats(self, hidden_TH, weight_VH):
        """No-grad logp and entropy of every response token from this forward's hidden states."""
        with torch.no_grad():
            mask_T = self.response_T.float()
            out = linear_policy_loss(hidden_TH.detach(), weight_VH.detach(), self.targets_T,
                                     advantages=torch.zeros_like(mask_T), loss_mask=mask_T,
                                     temperature=self.s.temperature, compact=self.s.compact)
        self.stats_tokens = mask_T.sum()
        return out.logp, out.entropy

    def __call__(self, hidden_TH: torch.Tensor, weight_VH: torch.Tensor) -> PolicyLossOutput:
        s, seq_w, idx_T = self.s, self.seq_w, self.idx_T
        kl = s.kl_coef != 0
        logp_T = entropy_T = None
        if s.entropy_weights or kl:
            logp_T, entropy_T = self._stats(hidden_TH, weight_VH)
        n_S = torch.zeros(seq_w.trained_S.numel(), device=idx_T.device).index_add(
            0, idx_T, (self.response_T & seq_w.trained_S[idx_T]).float())
        sft_S = seq_w.sft_weight_S.float()
        if s.entropy_weights:
            h_S = per_sequence_mean(entropy_T, self.response_T, self.cu)
            sft_S = torch.where(seq_w.trained_S, srft_sft_weights(self.rewards_S, self.is_expert_S, h_S),
                                torch.zeros_like(h_S))
        sft_S = scale_expert_sft(sft_S, seq_w, n_S, self.norms, s.aggregation)
        self.sft_weight_S = sft_S.detach()
        weights = to_tokens(replace(seq_w, sft_weight_S=sft_S), self.cu, self.response_T)
        weights, norm = aggregate(weights, self.cu, s.aggregation, normalizer=self.norms.rl)
        if kl:
            on_T = (weights.loss_mask_T != 0).float()
            weights = fold_kl(weights, logp_T, self.ref_logp_T, s.kl_coef, s.kl_estimator)
            self.kl_sum = (kl_estimate(logp_T, self.ref_logp_T, s.kl_estimator) * on_T).sum()
        return linear_policy_loss(
            hidden_TH, weight_VH, self.targets_T, old_logp=self.old_logp_T, eps_low=s.eps_low, eps_high=s.eps_high,
            luffy_gamma=s.luffy_gamma, entropy_coef=s.entropy_coef * entropy_coef_scale(self.norms),
            normalizer=norm, temperature=s.temperature, clip_ratio_c=s.clip_ratio_c, compact=s.compact,
            **weights.loss_kwargs())

    def token_stats(self, out: PolicyLossOutput) -> dict[str, torch.Tensor]:
        """This micro-batch's shares of the step's metrics, 0-d tensors on the device (no host sync): the entropy
        sum and count of the trained response tokens, the clip fractions weighted by and the count of the
        on-policy PG tokens, the KL sum and the tokens of the no-grad stats pass."""
        trained_T = self.seq_w.trained_S[self.idx_T]
        on_T = self.response_T & trained_T
        pg_T = on_T & (self.seq_w.pg_weight_S != 0)[self.idx_T] & ~self.seq_w.off_policy_S[self.idx_T]
        pg = pg_T.sum()
        return {"entropy": (out.entropy * on_T).sum(), "tokens": on_T.sum(), "clip_low": out.clip_frac_low * pg,
                "clip_high": out.clip_frac_high * pg, "pg_tokens": pg, "kl": self.kl_sum,
                "stats_tokens": self.stats_tokens}
