"""RL algorithms: advantages, per-token weights, aggregation and KL against values worked out by hand."""

import math

import pytest
import torch

from engine.rl.algorithms import (
    ALGORITHMS,
    RLBatch,
    SeqWeights,
    WeightParams,
    group_mean_advantages,
    grpo_advantages,
    policy_loss_reference,
    sequence_weights,
    sft_weights,
    srft_sft_weights,
    to_tokens,
    token_weights,
    upt_sft_gate,
)
from engine.rl.normalizers import (
    aggregate,
    entropy_coef_scale,
    fold_kl,
    kl_estimate,
    loss_normalizers,
    normalizer_count,
    per_sequence_mean,
    scale_expert_sft,
)

S3 = 1 / math.sqrt(3)  # unbiased std of [1, 0, 0, 1]


def batch(rewards, groups, expert):
    return RLBatch(torch.tensor(rewards, dtype=torch.float32), torch.tensor(groups),
                   torch.tensor(expert, dtype=torch.bool))


# Toy packed batch: 3 sequences of lengths 3, 4, 2; response-target tokens marked 1.
CU = torch.tensor([0, 3, 7, 9], dtype=torch.int32)
RESP = torch.tensor([0, 1, 1, 0, 0, 1, 1, 0, 1], dtype=torch.float32)
MIXED = batch([1.0, 0.0, 1.0], [0, 0, 0], [False, False, True])  # rollout+, rollout-, expert


def close(a, b, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32),
                               atol=tol, rtol=0)


def test_grpo_group_of_four():
    adv = grpo_advantages(torch.tensor([1.0, 0, 0, 1]), torch.tensor([0, 0, 0, 0]))
    c = 0.5 / S3  # (1 - 0.5) / std = 0.8660
    close(adv, [c, -c, -c, c])


def test_grpo_groups_interleaved_and_degenerate():
    # ids need not be contiguous or sorted; an all-equal group gives 0; a group of one has mean 0 and std 1
    # (verl, UPT-repo core_algos.py:143-145): A = R / (1 + eps)
    adv = grpo_advantages(torch.tensor([1.0, 1, 0, 1, 0, 1, 1]), torch.tensor([7, 3, 7, 3, 7, 3, 9]))
    m, s = 1 / 3, math.sqrt(((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    close(adv, [(1 - m) / s, 0, -m / s, 0, -m / s, 0, 1 / (1 + 1e-6)], tol=1e-4)
    close(grpo_advantages(torch.tensor([0.7, 1.0, 0.0]), torch.tensor([0, 1, 1]), use_std=False), [0.7, 0.5, -0.5])
    assert grpo_advantages(torch.tensor([]), torch.tensor([], dtype=torch.long)).numel() == 0


def test_grpo_members_only():
    adv = grpo_advantages(torch.tensor([1.0, 0, 1]), torch.tensor([0, 0, 0]), torch.tensor([True, True, False]))
    close(adv, [math.sqrt(0.5), -math.sqrt(0.5), 0])  # (±0.5) / 0.7071; the non-member gets 0


def test_luffy_mixed_group():
    # 3 rollouts [1, 0, 0] + 1 expert [1]: mean 0.5 over the mixed group, no std
    adv = group_mean_advantages(torch.tensor([1.0, 0, 0, 1]), torch.tensor([5, 5, 5, 5]))
    close(adv, [0.5, -0.5, -0.5, 0.5])
    seq = sequence_weights("luffy", MIXED)
    close(seq.advantages_S, [1 / 3, -2 / 3, 1 / 3])


def test_upt_gate_both_ways():
    b = batch([0.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0, 0, 0, 1, 1, 1], [False, False, True, False, False, True])
    assert upt_sft_gate(b).tolist() == [True, True, True, False, False, False]  # p = 0 -> SFT, p = 0.5 -> RL
    assert upt_sft_gate(b, gamma=0.5).tolist() == [True] * 6
    seq = sequence_weights("upt", b)
    assert seq.trained_S.tolist() == [False, False, True, True, True, False]
    close(seq.sft_weight_S, [0, 0, 1, 0, 0, 0])
    close(seq.pg_weight_S, [0, 0, 0, 1, 1, 0])
    close(seq.advantages_S, [0, 0, 0, 0.5, -0.5, 0])  # no std (UPT-repo train.sh:107 grpo_use_std=False)
    assert seq.expert_sft_S.tolist() == [False, False, True, False, False, False]
    close(sequence_weights("upt", b, WeightParams(adv_std=True)).advantages_S,
          [0, 0, 0, math.sqrt(0.5), -math.sqrt(0.5), 0])
    # a prompt without rollouts counts as p = 0
    assert upt_sft_gate(batch([1.0], [0], [True])).tolist() == [True]


def test_srft_sft_weights_per_sequence():
    # expert 0.5 exp(-H), correct rollout 0.1 exp(H), other rollouts -1; each sequence its own H
    w = srft_sft_weights(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([False, False, True, False]),
                         torch.tensor([math.log(2), 0.3, math.log(2), 0.0]))
    close(w, [0.2, -1.0, 0.25, 0.1])
    # per-sequence masked mean of a per-token value over packed sequences
    close(per_sequence_mean(torch.arange(9.0), RESP, CU), [1.5, 5.5, 8.0])


def test_token_weights_luffy():
    w = token_weights("luffy", MIXED, CU, RESP)
    a, b = 1 / 3, -2 / 3
    close(w.advantages_T, [0, a, a, 0, 0, b, b, 0, a])
    close(w.sft_weight_T, [0] * 9)
    close(w.pg_weight_T, RESP.tolist())
    assert w.off_policy_T.tolist() == [False] * 8 + [True]
    close(w.loss_mask_T, RESP.tolist())


def test_token_weights_srft():
    seq = sequence_weights("srft", MIXED)
    assert torch.isnan(seq.sft_weight_S).all()  # filled from the training forward's entropy (engine/rl/update.py)
    assert seq.expert_sft_S.tolist() == [False, False, True] and ALGORITHMS["srft"].entropy_weights
    w = token_weights("srft", MIXED, CU, RESP)
    close(w.pg_weight_T, [0] * 8 + [1])
    assert w.off_policy_T.tolist() == [False] * 8 + [True]
    close(w.loss_mask_T, RESP.tolist())


def test_token_weights_upt_rl_and_sft():
    w = token_weights("upt", MIXED, CU, RESP)  # p = 0.5 > 0: RL on the rollouts, expert untrained
    c = 0.5  # R - mean, no std
    close(w.advantages_T, [0, c, c, 0, 0, -c, -c, 0, 0])
    close(w.pg_weight_T, [0, 1, 1, 0, 0, 1, 1, 0, 0])
    close(w.sft_weight_T, [0] * 9)
    close(w.loss_mask_T, [0, 1, 1, 0, 0, 1, 1, 0, 0])
    failed = batch([0.0, 0.0, 1.0], [0, 0, 0], [False, False, True])  # p = 0: SFT on the expert only
    w = token_weights("upt", failed, CU, RESP)
    close(w.sft_weight_T, [0] * 8 + [1])
    close(w.pg_weight_T, [0] * 9)
    close(w.loss_mask_T, [0] * 8 + [1])
    assert not w.off_policy_T.any()


@pytest.mark.parametrize("name", ["grpo", "dapo_d", "dapo_dc"])
def test_token_weights_grpo_family(name):
    b = batch([1.0, 0.0, 1.0], [0, 0, 1], [False, False, False])
    w = token_weights(name, b, CU, RESP)
    c = math.sqrt(0.5)
    g1 = 1 / (1 + 1e-6)  # seq 2 is a group of one: A = R / (1 + eps), as verl
    close(w.advantages_T, [0, c, c, 0, 0, -c, -c, 0, g1])
    close(w.pg_weight_T, RESP.tolist())
    close(w.sft_weight_T, [0] * 9)
    assert not w.off_policy_T.any()
    with pytest.raises(ValueError, match="on-policy"):
        token_weights(name, MIXED, CU, RESP)


def test_sft_weights():
    seq = sft_weights(MIXED, torch.zeros(3), WeightParams())
    w = to_tokens(seq, CU, RESP)
    close(w.sft_weight_T, [0] * 8 + [1])
    close(w.loss_mask_T, [0] * 8 + [1])


def test_algorithm_registry():
    assert set(ALGORITHMS) == {"grpo", "dapo_d", "dapo_dc", "luffy", "srft", "upt"}
    assert (ALGORITHMS["dapo_dc"].eps_low, ALGORITHMS["dapo_dc"].eps_high) == (0.2, 0.28)
    assert ALGORITHMS["dapo_dc"].clip_ratio_c == 10.0  # RETU launcher
    for name in ("grpo", "dapo_d"):
        assert (ALGORITHMS[name].eps_low, ALGORITHMS[name].eps_high, ALGORITHMS[name].clip_ratio_c) == (0.2, 0.2, None)
    for name in ("luffy", "srft", "upt"):  # loss_remove_clip=True: clip(r, 0, inf) = r
        assert (ALGORITHMS[name].eps_low, ALGORITHMS[name].eps_high) == (1.0, math.inf)
        assert not ALGORITHMS[name].adv_std
    assert [n for n, s in ALGORITHMS.items() if s.dynamic_sampling] == ["dapo_d", "dapo_dc"]
    assert [n for n, s in ALGORITHMS.items() if s.uses_expert] == ["luffy", "srft", "upt"]
    with pytest.raises(ValueError, match="unknown RL algorithm"):
        sequence_weights("ppo", MIXED)


def test_aggregation_modes():
    w = token_weights("luffy", MIXED, CU, RESP)  # trained tokens per sequence: 2, 2, 1
    logp = torch.tensor([-1.0, -2, -3, -4, -5, -6, -7, -8, -9])
    sft = w.__class__(w.advantages_T, RESP.clone(), torch.zeros(9), torch.zeros(9, dtype=torch.bool), w.loss_mask_T)

    def loss(weights, norm):
        return float(policy_loss_reference(logp, None, weights.advantages_T, weights.sft_weight_T,
                                           weights.pg_weight_T, weights.off_policy_T, weights.loss_mask_T,
                                           normalizer=norm))

    tm, n = aggregate(sft, CU, "token-mean")
    assert float(n) == 5 and loss(tm, n) == pytest.approx((2 + 3 + 6 + 7 + 9) / 5)
    smtm, n = aggregate(sft, CU, "seq-mean-token-mean")
    close(smtm.loss_mask_T, [0, 0.5, 0.5, 0, 0, 0.5, 0.5, 0, 1])
    assert float(n) == 3 and loss(smtm, n) == pytest.approx((2.5 + 6.5 + 9) / 3)
    smts, n = aggregate(sft, CU, "seq-mean-token-sum")
    assert float(n) == 3 and loss(smts, n) == pytest.approx((5 + 13 + 9) / 3)
    # a global normalizer passes through; an untrained sequence is not counted
    assert aggregate(sft, CU, "token-mean", normalizer=40)[1] == 40
    upt = token_weights("upt", MIXED, CU, RESP)
    assert float(normalizer_count(upt.loss_mask_T, CU, "seq-mean-token-sum")) == 2
    assert float(normalizer_count(upt.loss_mask_T, CU, "token-mean")) == 4
    tsn, n = aggregate(sft, CU, "token-sum-norm", norm_tokens=8)  # sum / L_pad (verl seq-mean-token-sum-norm)
    assert float(n) == 8 and loss(tsn, n) == pytest.approx((2 + 3 + 6 + 7 + 9) / 8)
    with pytest.raises(ValueError):
        aggregate(sft, CU, "sum")


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(kl_estimate(logp, ref, "k1"), [math.log(2)])
    # exp(ref - logp) - (ref - logp) - 1 = 0.5 + ln 2 - 1
    close(kl_estimate(logp, ref, "k3"), [0.5 + math.log(2) - 1])
    close(kl_estimate(ref, ref, "k3"), [0.0])


@pytest.mark.parametrize("kind", ["k1", "k3"])
def test_fold_kl_gradient(kind):
    logp0 = torch.tensor([-0.5, -1.5, -2.0, -0.1])
    ref = torch.tensor([-0.7, -1.0, -2.5, -0.1])
    mask = torch.tensor([1.0, 1, 1, 0])
    w = to_tokens(sft_weights(batch([1.0], [0], [True]), torch.zeros(1), WeightParams()),
                  torch.tensor([0, 4]), mask)
    coef = 0.3
    folded = fold_kl(w, logp0, ref, coef, kind)
    x = logp0.clone().requires_grad_(True)
    policy_loss_reference(x, None, folded.advantages_T, folded.sft_weight_T, folded.pg_weight_T,
                          folded.off_policy_T, folded.loss_mask_T, normalizer=1).backward()
    y = logp0.clone().requires_grad_(True)
    ((-y + coef * kl_estimate(y, ref, kind)) * mask).sum().backward()
    close(x.grad, y.grad.tolist())
    assert fold_kl(w, logp0, ref, 0.0) is w


def test_luffy_shaping_gradient():
    pi, gamma, adv = 0.3, 0.1, 2.0
    logp = torch.tensor([math.log(pi)], requires_grad=True)
    loss = policy_loss_reference(logp, None, torch.tensor([adv]), torch.zeros(1), torch.ones(1),
                                 torch.tensor([True]), torch.ones(1), luffy_gamma=gamma)
    assert float(loss.detach()) == pytest.approx(-(pi / (pi + gamma)) * adv)
    loss.backward()
    assert float(logp.grad) == pytest.approx(-adv * gamma * pi / (pi + gamma) ** 2)  # -0.375


def test_reference_clipping():
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1])).requires_grad_(True)  # r = 1.5, 0.5, 1.1
    adv = torch.tensor([1.0, -1.0, 1.0])
    loss = policy_loss_reference(logp, old, adv, torch.zeros(3), torch.ones(3), torch.zeros(3, dtype=torch.bool),
                                 torch.ones(3), eps_low=0.2, eps_high=0.28, normalizer=1)
    assert float(loss.detach()) == pytest.approx(-1.28 + 0.8 - 1.1)  # clipped high, clipped low, unclipped
    loss.backward()
    close(logp.grad, [0.0, 0.0, -1.1])  # d(-r A)/dlogp = -r A where unclipped


def test_matches_fused_loss():
    from engine import losses  # a broken import fails here, not skips
    torch.manual_seed(0)
    hidden, weight = torch.randn(9, 8), torch.randn(11, 8)
    targets = torch.randint(0, 11, (9,))
    seq = sequence_weights("srft", MIXED)
    seq = SeqWeights(seq.advantages_S, srft_sft_weights(MIXED.rewards_S, MIXED.is_expert_S, torch.tensor([0.7, 0.2, 1.1])),
                     seq.pg_weight_S, seq.off_policy_S, seq.trained_S)
    w, norm = aggregate(to_tokens(seq, CU, RESP), CU, "seq-mean-token-mean")
    old = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0] + 0.05
    out = losses.linear_policy_loss(hidden, weight, targets, old_logp=old, normalizer=norm, luffy_gamma=0.1,
                                    backend="torch", **w.loss_kwargs())
    logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0]
    ref = policy_loss_reference(logp, old, w.advantages_T, w.sft_weight_T, w.pg_weight_T, w.off_policy_T,
                                w.loss_mask_T, luffy_gamma=0.1, normalizer=norm)
    assert float(out.loss) == pytest.approx(float(ref), rel=1e-5, abs=1e-6)


def test_validation():
    with pytest.raises(ValueError):
        RLBatch(torch.tensor([1.0]), torch.tensor([0, 1]), torch.tensor([False]))
    with pytest.raises(ValueError):
        RLBatch(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0]))
    with pytest.raises(ValueError):
        WeightParams(upt_gamma=float("nan"))
    with pytest.raises(ValueError, match="norm_tokens"):
        loss_normalizers([1], sequence_weights("luffy", MIXED.__class__(*(t[:1] for t in (
            MIXED.rewards_S, MIXED.group_ids_S, MIXED.is_expert_S)))), "token-sum-norm")
    with pytest.raises(ValueError):
        to_tokens(sequence_weights("luffy", MIXED), torch.tensor([0, 9]), RESP)


def test_term_normalisers():
    """SFT on expert trajectories gets its own token mean, the entropy bonus a token mean under token-sum-norm
    (the UPT-repo: compute_sft_pure_loss and masked_mean(entropy) per micro-batch, the RL terms sum / 8192)."""
    failed = batch([0.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0, 0, 0, 1, 1, 1], [False, False, True, False, False, True])
    seq = sequence_weights("upt", failed)  # prompt 0 -> SFT on its expert (seq 2), prompt 1 -> RL (seqs 3, 4)
    n_tok = [4, 5, 7, 3, 2, 6]
    norms = loss_normalizers(n_tok, seq, "token-sum-norm", norm_tokens=100)
    assert (norms.rl, norms.sft, norms.entropy) == (100.0, 7.0, 12.0)
    assert entropy_coef_scale(norms) == pytest.approx(100 / 12)
    scaled = scale_expert_sft(seq.sft_weight_S, seq, torch.tensor(n_tok, dtype=torch.float32), norms, "token-sum-norm")
    close(scaled, [0, 0, 100 / 7, 0, 0, 0])  # x N_rl / N_sft: sum over its tokens / 7 after the fused / 100
    tm = loss_normalizers(n_tok, seq, "token-mean")
    assert (tm.rl, tm.sft, tm.entropy) == (12.0, 7.0, 12.0)
    smtm = loss_normalizers(n_tok, seq, "seq-mean-token-mean")
    assert (smtm.rl, smtm.sft) == (3.0, 7.0)  # 3 trained sequences
    scaled = scale_expert_sft(seq.sft_weight_S, seq, torch.tensor(n_tok, dtype=torch.float32), smtm,
                              "seq-mean-token-mean")
    close(scaled, [0, 0, 3 * 7 / 7, 0, 0, 0])  # also undoes s_t = 1 / |seq|
    shared = loss_normalizers(n_tok, seq, "token-mean", sft_norm="shared")
    assert shared.sft is None and scale_expert_sft(seq.sft_weight_S, seq, torch.ones(6), shared, "token-mean") is \
        seq.sft_weight_S
