"""Our RL losses against plain-torch ports of the code the paper ran (shared/notes/reference-code-map.md).

The ports below are written from reading the reference code (cited file:line at the commits of the map:
UPT-repo = TsinghuaC3I/Unify-Post-Training ae332f5, verl = volcengine/verl b178a3c). They work on padded
[B, L] tensors from full [B, L, V] logits, as the reference does; ours runs the packed fused path
(`engine.rl.update.MicroBatchLoss` -> `engine.losses.linear_policy_loss`) on hidden states and the LM-head
weight. Loss values and gradients with respect to both must agree.
"""

import json
import math

import pytest
import torch

from engine import flops
from engine.losses import linear_policy_loss
from engine.rl.algorithms import RLBatch, sequence_weights
from engine.rl.normalizers import loss_normalizers
from engine.rl.update import LossSettings, MicroBatchLoss

L_PAD = 16  # the reference's padded response length (8192 in its runs)


@pytest.fixture(autouse=True)
def torch_loss_path(monkeypatch):
    """The loss's plain-PyTorch elementwise path (fast on CPU); tests/test_linear_loss.py checks that the Triton
    kernels agree with it."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


# ----------------------------------------------------------------------------------------- reference ports


def _masked_mean(x, mask, axis=None):
    """verl_F.masked_mean (UPT-repo hpt/verl/verl/utils/torch_functional.py:107-109)."""
    return (x * mask).sum(axis=axis) / mask.sum(axis=axis)


def ref_logp_entropy(logits_BLV, targets_BL, temperature):
    """dp_actor._forward_micro_batch: logits / T, log-prob of the target, entropy_from_logits
    (UPT-repo hpt/verl/verl/workers/actor/dp_actor.py:100-103,136-139; torch_functional.py:95-99)."""
    z = logits_BLV / temperature
    logp = torch.log_softmax(z, -1).gather(-1, targets_BL[..., None])[..., 0]
    pd = torch.softmax(z, -1)
    entropy = torch.logsumexp(z, -1) - (pd * z).sum(-1)
    return logp, entropy


def ref_grpo_advantage(scores_B, index, use_std, eps=1e-6):
    """compute_grpo_outcome_advantage (UPT-repo hpt/verl/verl/trainer/ppo/core_algos.py:130-158)."""
    groups = {}
    for i, g in enumerate(index):
        groups.setdefault(g, []).append(float(scores_B[i]))
    out = scores_B.clone().float()
    for i, g in enumerate(index):
        vals = torch.tensor(groups[g])
        mean, std = (torch.tensor(0.0), torch.tensor(1.0)) if len(vals) == 1 else (vals.mean(), torch.std(vals))
        out[i] = (out[i] - mean) / (std + eps) if use_std else out[i] - mean
    return out


def ref_luffy_pg(old_log_prob, log_prob, advantages, eos_mask, prefix_mask):
    """compute_token_on_off_policy_loss with the LUFFY script's flags: on_policy_reshape no_reshape,
    loss_remove_clip=True, off_policy_reshape p_div_p_0.1, no off-policy clips, loss_remove_token_mean=True
    (UPT-repo mix_src/mix_core_alg.py:125-129,155,165-167,170-193,229,235-236,254-255)."""
    ratio = torch.exp(log_prob - old_log_prob)
    on_pg_losses = -advantages * ratio
    off_ratio = torch.exp(log_prob)
    off_ratio = off_ratio / (off_ratio + 0.1)
    off_pg_losses = -advantages * off_ratio
    prefix = prefix_mask.float()
    pg_losses = off_pg_losses * prefix + on_pg_losses * (1 - prefix)
    return (pg_losses * eos_mask).sum() / eos_mask.shape[-1]


def ref_srft_pg(log_prob, advantages, eos_mask, prefix_mask, on_coef, correct):
    """compute_token_on_off_policy_srft_loss with srft_type="paper", loss_remove_clip=True,
    loss_remove_token_mean=True (UPT-repo mix_src/mix_core_alg.py:560-574,586,590-593,612-613,649,655-656,674-675)."""
    on_adv = torch.where(correct[:, None].expand_as(advantages), on_coef.view(-1, 1).expand_as(advantages),
                         torch.tensor(-1.0).expand_as(advantages))
    on_pg_losses = -on_adv * log_prob
    off_ratio = torch.exp(log_prob)
    off_pg_losses = -advantages * (off_ratio / (off_ratio + 0.1))
    prefix = prefix_mask.float()
    pg_losses = off_pg_losses * prefix + on_pg_losses * (1 - prefix)
    return (pg_losses * eos_mask).sum() / eos_mask.shape[-1]


def ref_actor_loss(algo, logits_BLV, targets_BL, mask_BL, prefix_BL, old_log_prob, advantages_BL, scores_B,
                   entropy_coeff, temperature):
    """One micro-batch of MixActor.update_policy (UPT-repo mix_src/mix_actor.py): LUFFY = "off_policy" branch
    (:167-193), SRFT = "srft" branch (:349-400), UPT = "sft" branch (:135-165, sft_loss_coef 1), then the
    entropy bonus (:436,460). Returns the loss before the 1/grad_accum scale (grad_accum = 1 in the runs)."""
    log_prob, entropy = ref_logp_entropy(logits_BLV, targets_BL, temperature)
    mask = mask_BL.float()
    if algo == "luffy":
        pg_loss = ref_luffy_pg(old_log_prob, log_prob, advantages_BL, mask, prefix_BL)
    elif algo == "srft":
        h_coef = _masked_mean(entropy, mask, axis=-1).detach()
        sft_coef, on_coef = 0.5 * torch.exp(-h_coef), 0.1 * torch.exp(h_coef)
        off = prefix_BL.any(-1)
        sft_loss = _masked_mean(-(log_prob * sft_coef.view(-1, 1))[off], mask[off])
        correct = scores_B == 1
        pg_loss = sft_loss + ref_srft_pg(log_prob, advantages_BL, mask, prefix_BL, on_coef, correct)
    else:  # upt
        off = prefix_BL.any(-1)
        sft_loss = _masked_mean(-log_prob[off], mask[off])
        on = ~off
        ratio = torch.exp(log_prob[on] - old_log_prob[on])  # core_algos.compute_policy_loss, no clip
        pg_loss = (-advantages_BL[on] * ratio * mask[on]).sum() / mask.shape[-1]
        if not torch.isnan(sft_loss):
            pg_loss = sft_loss + pg_loss
    return pg_loss - entropy_coeff * _masked_mean(entropy, mask)


def ref_policy_loss_vanilla(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c):
    """verl compute_policy_loss_vanilla with token-mean aggregation (verl/trainer/ppo/core_algos.py:1210-1242)."""
    neg_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return _masked_mean(pg_losses, response_mask)


# ----------------------------------------------------------------------------------------- a random batch


def random_batch(algo, seed, H=12, V=29):
    """A UPT-repo-style micro-batch: prompts with 3 on-policy rows + 1 expert row (LUFFY/SRFT), or gated rows
    (UPT: a prompt's on-policy rows, or its expert row alone). Responses only (prompt tokens never reach the loss)."""
    g = torch.Generator().manual_seed(seed)
    if algo == "upt":
        rows = [(0, False), (0, False), (0, False), (1, True), (2, False), (2, False), (2, False)]
    else:
        rows = [(p, e) for p in range(2) for e in (False, False, False, True)]
    B = len(rows)
    lens = torch.randint(3, L_PAD + 1, (B,), generator=g).tolist()
    hidden_BLH = torch.randn(B, L_PAD, H, generator=g)
    weight_VH = torch.randn(V, H, generator=g) * 0.7
    targets_BL = torch.randint(0, V, (B, L_PAD), generator=g)
    mask_BL = torch.arange(L_PAD)[None] < torch.tensor(lens)[:, None]
    expert_B = torch.tensor([e for _, e in rows])
    scores_B = torch.randint(0, 2, (B,), generator=g).float()
    if algo == "upt":  # the gate: prompt 1 had 0/8 correct (SFT), prompts 0 and 2 some correct (RL)
        scores_B[3] = 1.0
        scores_B[0], scores_B[4] = 1.0, 0.0
    prefix_BL = expert_B[:, None] & mask_BL
    with torch.no_grad():
        logp_now, _ = ref_logp_entropy(hidden_BLH @ weight_VH.T, targets_BL, 1.0)
    # old log-probs a bit off the current ones (a second mini-batch update): ratios roughly in [0.5, 2]
    old_BL = logp_now + 0.7 * (torch.rand(B, L_PAD, generator=g) - 0.5)
    return dict(rows=rows, lens=lens, hidden_BLH=hidden_BLH, weight_VH=weight_VH, targets_BL=targets_BL,
                mask_BL=mask_BL, expert_B=expert_B, scores_B=scores_B, prefix_BL=prefix_BL, old_BL=old_BL)


def ours(algo, d, hidden_BLH, weight_VH, entropy_coef, temperature):
    """The same batch through our packed path: RLBatch -> weights -> normalisers -> MicroBatchLoss."""
    lens, B = d["lens"], len(d["rows"])
    pack = lambda x: torch.cat([x[b, :lens[b]] for b in range(B)])  # noqa: E731
    batch = RLBatch(d["scores_B"], torch.tensor([p for p, _ in d["rows"]]), d["expert_B"])
    seq_w = sequence_weights(algo, batch)
    assert bool(seq_w.trained_S.all())  # the UPT batch holds only rows its gate trains
    norms = loss_normalizers(lens, seq_w, "token-sum-norm", norm_tokens=L_PAD)
    cu = torch.tensor([0] + lens).cumsum(0)
    settings = LossSettings(eps_low=1.0, eps_high=math.inf, entropy_coef=entropy_coef, temperature=temperature,
                            aggregation="token-sum-norm", entropy_weights=algo == "srft")
    loss_fn = MicroBatchLoss(seq_w, batch.rewards_S, batch.is_expert_S, cu, torch.ones(cu[-1], dtype=torch.bool),
                             pack(d["targets_BL"]), norms, settings, old_logp_T=pack(d["old_BL"]))
    return loss_fn(pack(hidden_BLH), weight_VH).loss


@pytest.mark.parametrize("algo", ["luffy", "srft", "upt"])
@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_policy_losses_match_the_reference(algo, seed):
    """LUFFY, SRFT and UPT: loss and gradients (w.r.t. every token's hidden state and the LM head) equal the
    UPT-repo's actor loss on a micro-batch, at a sampling temperature and with the 0.001 entropy bonus."""
    d = random_batch(algo, seed)
    T, coef = 0.7, 0.001
    h_ref = d["hidden_BLH"].clone().requires_grad_(True)
    w_ref = d["weight_VH"].clone().requires_grad_(True)
    index = [p for p, _ in d["rows"]]
    if algo == "upt":  # advantages over the surviving on-policy groups (no std); the expert row's is unused
        adv_B = ref_grpo_advantage(d["scores_B"], index, use_std=False)
    else:  # LUFFY / SRFT: plain grpo over the mixed group, grpo_use_std=False (mix_trainer.py:1144-1158)
        adv_B = ref_grpo_advantage(d["scores_B"], index, use_std=False)
    adv_BL = adv_B[:, None] * d["mask_BL"].float()
    expected = ref_actor_loss(algo, h_ref @ w_ref.T, d["targets_BL"], d["mask_BL"], d["prefix_BL"], d["old_BL"],
                              adv_BL, d["scores_B"], coef, T)
    expected.backward()
    h = d["hidden_BLH"].clone().requires_grad_(True)
    w = d["weight_VH"].clone().requires_grad_(True)
    got = ours(algo, d, h, w, coef, T)
    got.backward()
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-6)


def test_srft_weights_are_per_sequence_from_the_training_forward():
    """Changing one sequence's logits changes only that sequence's SRFT weight (the batch-level estimate of
    before would move them all); the weights used are reported."""
    d = random_batch("srft", 3)
    lens = d["lens"]
    batch = RLBatch(d["scores_B"], torch.tensor([p for p, _ in d["rows"]]), d["expert_B"])
    seq_w = sequence_weights("srft", batch)
    norms = loss_normalizers(lens, seq_w, "token-sum-norm", sft_norm="shared", norm_tokens=L_PAD)
    cu = torch.tensor([0] + lens).cumsum(0)
    settings = LossSettings(eps_low=1.0, eps_high=math.inf, aggregation="token-sum-norm", entropy_weights=True)
    pack = lambda x: torch.cat([x[b, :lens[b]] for b in range(len(lens))])  # noqa: E731

    def weights(hidden_BLH):
        fn = MicroBatchLoss(seq_w, batch.rewards_S, batch.is_expert_S, cu, torch.ones(cu[-1], dtype=torch.bool),
                            pack(d["targets_BL"]), norms, settings)
        with torch.no_grad():
            fn(pack(hidden_BLH), d["weight_VH"])
        return fn.sft_weight_S

    w0 = weights(d["hidden_BLH"])
    _, ent = ref_logp_entropy(d["hidden_BLH"] @ d["weight_VH"].T, d["targets_BL"], 1.0)
    h_S = _masked_mean(ent, d["mask_BL"].float(), axis=-1)
    correct = d["scores_B"] == 1
    expected = torch.where(d["expert_B"], 0.5 * torch.exp(-h_S), torch.where(correct, 0.1 * torch.exp(h_S), -1.0))
    torch.testing.assert_close(w0, expected, rtol=1e-5, atol=1e-6)
    moved = d["hidden_BLH"].clone()
    moved[3] *= 3.0  # sharpen sequence 3's distribution (the first expert row)
    w1 = weights(moved)
    assert not torch.isclose(w1[3], w0[3])
    others = [i for i in range(len(lens)) if i != 3]
    torch.testing.assert_close(w1[others], w0[others])


@pytest.mark.parametrize("clip_ratio_c", [3.0, 10.0])
def test_dual_clip_matches_verl(clip_ratio_c):
    """linear_policy_loss(clip_ratio_c=c) = verl's compute_policy_loss_vanilla, loss and gradients, on a batch
    whose ratios reach past c with negative advantages (where the dual clip cuts the loss and its gradient)."""
    g = torch.Generator().manual_seed(7)
    T_, H, V = 64, 10, 23
    hidden = torch.randn(T_, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (T_,), generator=g)
    with torch.no_grad():
        logp = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0]
    old = logp - torch.empty(T_).uniform_(-1.5, 2.7, generator=g)  # ratios in [0.22, 15]
    adv = torch.randn(T_, generator=g)
    mask = (torch.rand(T_, generator=g) < 0.9).float()
    ratio = torch.exp(logp - old)
    assert ((ratio > clip_ratio_c) & (adv < 0) & (mask > 0)).sum() >= 3  # the dual-clip region is exercised
    h_ref, w_ref = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp = torch.log_softmax(h_ref @ w_ref.T, -1).gather(1, targets[:, None])[:, 0]
    expected = ref_policy_loss_vanilla(old, lp, adv, mask, 0.2, 0.28, clip_ratio_c)
    expected.backward()
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    got = linear_policy_loss(h, w, targets, advantages=adv, loss_mask=mask, old_logp=old, eps_low=0.2,
                             eps_high=0.28, clip_ratio_c=clip_ratio_c).loss
    got.backward()
    assert float(got.detach()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)  # per token: row t of grad_h
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-6)
    # and without the bound the loss differs there (the test can fail)
    plain = linear_policy_loss(hidden, weight, targets, advantages=adv, loss_mask=mask, old_logp=old,
                               eps_low=0.2, eps_high=0.28).loss
    assert float(plain) > float(got.detach()) + 1e-3


def test_kl_gradient_is_taken_at_the_current_logp():
    """In a later mini-batch (old logp stale), the folded KL term's gradient is that of kl_coef * k3 at the logp
    of the training forward itself, not at the old / rollout logp."""
    g = torch.Generator().manual_seed(11)
    T_, H, V = 20, 8, 17
    hidden, weight = torch.randn(T_, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (T_,), generator=g)
    ref = torch.log_softmax(torch.randn(T_, V, generator=g), -1).gather(1, targets[:, None])[:, 0]
    with torch.no_grad():
        now = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None])[:, 0]
    old = now + 0.5 * torch.randn(T_, generator=g)
    batch = RLBatch(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([False, False]))
    seq_w = sequence_weights("grpo", batch)
    cu = torch.tensor([0, 9, 20])
    norms = loss_normalizers([9, 11], seq_w, "token-mean")
    settings = LossSettings(eps_low=1.0, eps_high=math.inf, kl_coef=0.3, kl_estimator="k3")
    resp = torch.ones(T_, dtype=torch.bool)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    MicroBatchLoss(seq_w, batch.rewards_S, batch.is_expert_S, cu, resp, targets, norms, settings, old_logp_T=old,
                   ref_logp_T=ref)(h, w).loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    lp = torch.log_softmax(h2 @ w2.T, -1).gather(1, targets[:, None])[:, 0]
    adv = torch.repeat_interleave(seq_w.advantages_S, torch.tensor([9, 11]))
    d = ref - lp
    k3 = torch.exp(d) - d - 1
    ((-adv * torch.exp(lp - old) + 0.3 * k3).sum() / 20).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-3, atol=1e-5)  # exp(ref - logp) reaches ~1e2 here
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------------- UPT compute


def test_upt_compute_is_eq26_with_gate_counts():
    """The ledger's UPT step (generation of every sample + 3x the sequences the gate trains) equals Eq. 26,
    B [G S_on + 3 (N_on S_on + N_off S_off)], with N_on / N_off counted from the gate."""
    B, G, s_on, s_off = 4, 8, 300, 500
    rewards, groups, expert = [], [], []
    for p, correct in enumerate([0, 3, 0, 8]):  # prompts 0 and 2: 0/8 correct -> SFT; 1 and 3 -> RL
        rewards += [1.0] * correct + [0.0] * (G - correct) + [1.0]
        groups += [p] * (G + 1)
        expert += [False] * G + [True]
    seq = sequence_weights("upt", RLBatch(torch.tensor(rewards), torch.tensor(groups), torch.tensor(expert)))
    trained = seq.trained_S.tolist()
    upd_on = sum(s_on for t, e in zip(trained, expert) if t and not e)
    upd_off = sum(s_off for t, e in zip(trained, expert) if t and e)
    n_on, n_off = upd_on / s_on / B, upd_off / s_off / B
    assert (n_on, n_off) == (G * 2 / B, 2 / B)  # the gate's counts: 16 on-policy, 2 expert sequences trained
    gen = B * G * s_on
    mean = (gen + upd_on + upd_off) / (B * G + B * (n_on + n_off))
    got = flops.rl_step_flops("upt", "qwen2.5-7b", mean_seq_len=mean, gen_tokens=gen, update_tokens=upd_on,
                              offpolicy_tokens=upd_off)
    F = flops.forward_flops_per_token("qwen2.5-7b", mean)  # noqa: N806
    assert got == pytest.approx(B * (G * s_on + 3 * (n_on * s_on + n_off * s_off)) * F)
    assert got == pytest.approx(flops.upt_flops("qwen2.5-7b", B, G, n_on, n_off, s_on, s_off))
    every = flops.rl_step_flops("upt", "qwen2.5-7b", mean_seq_len=mean, gen_tokens=gen, update_tokens=B * G * s_on,
                                offpolicy_tokens=B * s_off)
    assert every / got > 1.5  # counting every sequence, as before, over-counts


@pytest.mark.usefixtures("trainer_env")
def test_upt_trainer_packs_and_counts_only_what_the_gate_trains(tmp_path):
    """End to end (random tiny model: every rollout fails, so every prompt goes to SFT): only the expert
    trajectories reach the update, and the step's compute is Eq. 26 with N_on = 0, N_off = 1."""
    from engine.config import DataConfig, ModelConfig, RewardConfig, RLConfig, RLJobConfig, RunConfig
    from engine.data.tokenizer import build_char_tokenizer
    from engine.rl.trainer import RLTrainer
    from engine.rundir.metrics import read_metrics

    model = tmp_path / "model.json"
    model.write_text(json.dumps(dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=len(build_char_tokenizer()), max_position_embeddings=256)))
    prompts = tmp_path / "prompts.jsonl"  # the third expert trajectory is wrong: the reward must say so
    rows = [("2+3=?", "5", "2+3=5. \\boxed{5}"), ("4*2=?", "8", "4*2=8. \\boxed{8}"), ("9-7=?", "2", "9-7=3. \\boxed{3}")]
    prompts.write_text("".join(json.dumps({"prompt": p, "answer": a, "response": r}) + "\n" for p, a, r in rows))
    B, G = 3, 4
    job = RLJobConfig(
        run=RunConfig(name="upt", output_dir=str(tmp_path), progress=False, device="cpu"),
        model=ModelConfig(config=str(model), tokenizer="char"),
        data=DataConfig(),
        rl=RLConfig(algorithm="upt", prompts_path=str(prompts), steps=1, train_batch=B, gen_batch=B, n_samples=G,
                    n_expert=1, max_prompt_len=96, max_new_tokens=24, micro_batch_tokens=512, eval_every=0,
                    checkpoint_every=0, entropy_coef=0.001, aggregation="token-sum-norm",
                    norm_tokens=64),
        reward=RewardConfig(mode="boxed"))
    trainer = RLTrainer(job)
    seen = []
    update = trainer._update
    trainer._update = lambda seqs, seq_w: seen.append(list(seqs)) or update(seqs, seq_w)
    trainer.fit()
    rec = [r for r in read_metrics(tmp_path / "upt" / "metrics.jsonl") if "rollout/reward_mean" in r][-1]
    assert rec["rollout/reward_mean"] == 0 and rec["rollout/sft_prompts"] == B
    packed = [s for part in seen for s in part]
    assert len(packed) == B and all(s.is_expert for s in packed)  # the 12 failed rollouts were never packed
    assert sorted(s.reward for s in packed) == [0.0, 1.0, 1.0]  # expert trajectories are scored, not assumed right
    assert rec["compute/update_tokens"] == 0 and rec["compute/expert_tokens"] == sum(len(s.ids) for s in packed)
    s_on = rec["compute/gen_tokens"] / (B * G)
    s_off = rec["compute/expert_tokens"] / B
    dims = flops.model_dims(str(model))
    assert rec["compute/step_flops"] == pytest.approx(flops.upt_flops(dims, B, G, 0, 1, s_on, s_off))
    assert rec["compute/stats_pass_flops"] == 0  # no SRFT, no KL: no extra LM-head pass


def test_loss_settings_follow_the_algorithm_unless_overridden():
    from engine.config import RLConfig
    from engine.rl.algorithms import ALGORITHMS
    s = LossSettings.for_run(RLConfig(algorithm="dapo_dc", temperature=0.7), ALGORITHMS["dapo_dc"])
    assert (s.eps_low, s.eps_high, s.clip_ratio_c, s.temperature) == (0.2, 0.28, 10.0, 0.7)
    s = LossSettings.for_run(RLConfig(algorithm="dapo_dc", clip_ratio_c=math.inf, eps_high=0.3), ALGORITHMS["dapo_dc"])
    assert (s.eps_high, s.clip_ratio_c) == (0.3, None)  # .inf turns the dual clip off
    s = LossSettings.for_run(RLConfig(algorithm="srft"), ALGORITHMS["srft"])
    assert (s.eps_low, s.eps_high, s.entropy_weights) == (1.0, math.inf, True)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        RLConfig(clip_ratio_c=1.0)
    with pytest.raises(ValueError, match="norm_tokens"):
        RLConfig(aggregation="token-sum-norm")
