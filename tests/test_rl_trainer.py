"""RL end to end on CPU: every algorithm runs, metrics and checkpoints are written, resume is exact."""

import json

import pytest
import torch

from engine.config import DataConfig, ModelConfig, RLConfig, RLJobConfig, RunConfig, SFTConfig, SFTJobConfig
from engine.data.synthetic import SyntheticTaskConfig
from engine.data.tokenizer import build_char_tokenizer
from engine.distributed import destroy_distributed
from engine.errors import DataError
from engine.rl.trainer import RLTrainer, run_rl
from engine.rundir.metrics import read_metrics
from engine.sft.trainer import run_sft

TASK = dict(num_train=2000, num_val=16, num_rl=64, num_eval=8, min_ops=1, max_ops=3, max_digits=1, seed=3)


pytestmark = pytest.mark.usefixtures("trainer_env")  # tests/conftest.py


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A tiny model taught the answer format by a short SFT run (RL needs some correct samples)."""
    root = tmp_path_factory.mktemp("sft")
    model = root / "model.json"
    model.write_text(json.dumps(dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=len(build_char_tokenizer()), max_position_embeddings=256,
                                     tie_word_embeddings=True)))
    job = SFTJobConfig(
        run=RunConfig(name="sft", output_dir=str(root), progress=False, device="cpu"),
        model=ModelConfig(config=str(model), tokenizer="char"),
        data=DataConfig(synthetic=SyntheticTaskConfig(**TASK), max_seq_len=160),
        sft=SFTConfig(steps=120, global_batch_size=32, micro_batch_tokens=4096, lr=5e-3, warmup_steps=5, val_every=0,
                      checkpoint_every=0, export_hf=False),
    )
    import os

    env = os.environ.pop("TRITON_INTERPRET", None)
    try:
        run_sft(job)
    finally:
        destroy_distributed()
        if env is not None:
            os.environ["TRITON_INTERPRET"] = env
    return root, str(model)


def rl_job(tmp_path, sft_run, algorithm, name="rl", **rl):
    root, model = sft_run
    base = dict(algorithm=algorithm, init_checkpoint=str(root / "sft" / "checkpoints"), steps=2, train_batch=3,
                gen_batch=4, n_samples=4, n_expert=1, max_gen_rounds=2, max_prompt_len=96, max_new_tokens=24,
                micro_batch_tokens=512, lr=1e-3, eval_every=2, eval_samples=1, checkpoint_every=1)
    base.update(rl)
    return RLJobConfig(
        run=RunConfig(name=name, output_dir=str(tmp_path), progress=False, device="cpu"),
        model=ModelConfig(config=model, tokenizer="char"),
        data=DataConfig(synthetic=SyntheticTaskConfig(**TASK)),
        rl=RLConfig(**base),
    )


@pytest.mark.parametrize("algorithm", ["grpo", "dapo_d", "dapo_dc", "luffy", "srft", "upt"])
def test_algorithm_runs_end_to_end(tmp_path, sft_run, algorithm):
    summary = run_rl(rl_job(tmp_path, sft_run, algorithm))
    records = read_metrics(tmp_path / "rl" / "metrics.jsonl")
    steps = [r for r in records if "rollout/reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert 1 <= r["rollout/num_rounds"] <= (2 if algorithm.startswith("dapo") else 1)
        assert r["compute/step_flops"] > 0 and 0 <= r["rollout/reward_mean"] <= 1
        if not r["rollout/skipped"]:
            assert r["train/loss"] is not None and r["train/grad_norm"] is not None
            assert 0 <= r["train/clip_frac_low"] <= 1 and r["train/entropy"] > 0
            # rates as SFT's: tokens trained per second of the update; generated (response) tokens per rollout second
            trained = r["compute/update_tokens"] + r["compute/expert_tokens"]
            assert r["perf/tokens_per_s"] * r["time/update_s"] == pytest.approx(trained, rel=1e-3)
        assert r["perf/rollout_tokens_per_s"] * r["time/rollout_s"] == pytest.approx(r["compute/new_tokens"], rel=1e-3)
        assert 0 < r["compute/new_tokens"] < r["compute/gen_tokens"]  # prompts are not generated tokens
    assert any(not r["rollout/skipped"] for r in steps), "no step trained: the fixture model never answered right"
    evals = [r["eval/pass@1"] for r in records if "eval/pass@1" in r]
    assert len(evals) == 2 and all(0 <= p <= 1 for p in evals)  # before training and at the end
    assert summary["exaflops"] > 0 and (tmp_path / "rl" / "checkpoints" / "latest").is_file()
    curve = json.loads((tmp_path / "rl" / "eval_curve.json").read_text())
    assert [c["step"] for c in curve] == [0, 2]


def test_resume_is_exact(tmp_path, sft_run):
    run_rl(rl_job(tmp_path / "a", sft_run, "dapo_dc", steps=3, eval_every=0))
    destroy_distributed()
    assert run_rl(rl_job(tmp_path / "b", sft_run, "dapo_dc", steps=3, eval_every=0), stop_after_step=2) == \
        {"stopped_at": 2}
    destroy_distributed()
    run_rl(rl_job(tmp_path / "b", sft_run, "dapo_dc", steps=3, eval_every=0))

    def losses(path):
        return {r["step"]: (r["train/loss"], r["rollout/reward_mean"]) for r in read_metrics(path / "rl" / "metrics.jsonl")
                if "rollout/reward_mean" in r}

    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_mini_batches_and_kl(tmp_path, sft_run):
    """Two updates per rollout batch recompute old log-probs; a KL term to the initial policy is logged."""
    trainer = RLTrainer(rl_job(tmp_path, sft_run, "grpo", steps=1, mini_batches=2, train_batch=4, kl_coef=0.1,
                               eval_every=0))
    trainer.fit()
    rec = [r for r in read_metrics(tmp_path / "rl" / "metrics.jsonl") if "rollout/reward_mean" in r][-1]
    assert rec["train/kl"] is not None and rec["train/kl"] >= 0
    assert trainer.scheduler.last_epoch == 2  # two optimizer updates


def test_weight_sync_matches_policy(tmp_path, sft_run):
    trainer = RLTrainer(rl_job(tmp_path, sft_run, "grpo", steps=1, eval_every=0))
    trainer.fit()
    policy = {k.replace("hf.", "", 1): v for k, v in trainer.model.state_dict().items()}
    for name, p in trainer.rollout.model.state_dict().items():
        torch.testing.assert_close(p, policy[name].full_tensor() if hasattr(policy[name], "full_tensor")
                                   else policy[name])


@pytest.mark.parametrize("algorithm", ["grpo", "luffy", "srft", "upt"])
def test_update_gradient_matches_plain_transformers(tmp_path, sft_run, algorithm, monkeypatch):
    """The trainer's gradient (packed micro-batches, fused LM-head loss, per-token weights, global token-mean)
    equals the gradient of the textbook loss: a plain transformers forward per sequence, log_softmax of the
    full logits and the per-token formula of engine.rl.algorithms.policy_loss_reference."""
    import engine.rl.trainer as rl_trainer
    from engine.rl.algorithms import SeqWeights, policy_loss_reference, to_tokens

    trainer = RLTrainer(rl_job(tmp_path, sft_run, algorithm, steps=1, eval_every=0, micro_batch_tokens=256,
                               upt_gamma=0.3))
    trainer.sync_rollout()
    seen = {}

    def no_step(model, *args):  # keep the gradient, skip the optimizer step
        seen["grads"] = {n.replace("hf.", "", 1): p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                         for n, p in model.named_parameters() if p.grad is not None}
        return torch.tensor(0.0), 0.0

    update = trainer._update

    def spy(seqs, seq_w):
        seen["seqs"], seen["weights"] = seqs, seq_w
        return update(seqs, seq_w)

    monkeypatch.setattr(rl_trainer, "guarded_step", no_step)
    monkeypatch.setattr(trainer, "_update", spy)
    trainer.train_step()
    seqs, w = seen["seqs"], seen["weights"]
    assert len({s.group for s in seqs}) > 1 and len(seqs) * max(len(s.ids) for s in seqs) > 256  # several micro-batches

    reference = trainer.rollout.model  # the synced copy of the same weights, as a plain HF model
    reference.config._attn_implementation = "eager"
    reference.train().requires_grad_(True).zero_grad()
    normalizer = sum(s.n_response for s, t in zip(seqs, w.trained_S.tolist()) if t)
    for i, s in enumerate(seqs):
        ids = torch.tensor([s.ids])
        logp_T = torch.log_softmax(reference(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        response_T = torch.tensor(s.loss_mask[1:])  # token t predicts ids[t + 1]
        one = SeqWeights(*(t[i:i + 1] for t in (w.advantages_S, w.sft_weight_S, w.pg_weight_S, w.off_policy_S,
                                                 w.trained_S)))
        tw = to_tokens(one, torch.tensor([0, len(logp_T)]), response_T)
        loss = policy_loss_reference(logp_T, None, tw.advantages_T, tw.sft_weight_T, tw.pg_weight_T, tw.off_policy_T,
                                     tw.loss_mask_T, eps_low=trainer.loss_settings.eps_low,
                                     eps_high=trainer.loss_settings.eps_high, luffy_gamma=trainer.cfg.luffy_gamma,
                                     normalizer=normalizer)
        loss.backward()
    expected = dict(reference.named_parameters())
    assert seen["grads"].keys() <= expected.keys()
    for name, grad in seen["grads"].items():
        torch.testing.assert_close(grad, expected[name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_malformed_prompt_file_names_file_and_line(tmp_path, sft_run):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?"}\n')
    job = rl_job(tmp_path, sft_run, "grpo", prompts_path=str(bad))
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: .*answer"):
        RLTrainer(job)


def test_stop_when_ends_a_branch_and_resume_respects_it(tmp_path, sft_run):
    job = rl_job(tmp_path, sft_run, "grpo", steps=4, eval_every=1, checkpoint_every=0)
    rule = lambda history: "enough" if len(history) >= 3 else None  # noqa: E731  (evals at steps 0, 1, 2)
    summary = RLTrainer(job).fit(stop_when=rule)
    assert summary["steps"] == 2 and summary["stopped"] == {"step": 2, "reason": "enough"}
    destroy_distributed()
    again = RLTrainer(job).fit()  # started again: the stopped branch is not continued
    assert again["steps"] == 2


def test_max_exaflops_ends_the_run_at_its_compute_budget(tmp_path, sft_run):
    """The sweep's matched-compute runs: RL stops at the first step whose cumulative compute reaches the budget,
    evaluates and checkpoints there, and a restart does not train past it."""
    two = RLTrainer(rl_job(tmp_path, sft_run, "grpo", name="two", steps=2, eval_every=0)).fit()
    destroy_distributed()
    budget = two["exaflops"] * 1.001  # just past two steps: the third step crosses it
    job = rl_job(tmp_path, sft_run, "grpo", name="budget", steps=8, eval_every=5, checkpoint_every=0,
                 max_exaflops=budget)
    summary = RLTrainer(job).fit()
    assert summary["steps"] == 3 and summary["exaflops"] >= budget
    assert [e["step"] for e in summary["eval_history"]] == [0, 3]  # the budget's end is evaluated
    destroy_distributed()
    assert RLTrainer(job).fit()["steps"] == 3  # resumed: the budget is spent, nothing more is trained
    with pytest.raises(ValueError, match="max_exaflops"):
        RLConfig(max_exaflops=0.0)


def test_ceiling_stop_rule_on_a_saturating_curve():

    from engine.analysis.early_stop import ceiling_stop_rule

    rule = ceiling_stop_rule(tol=0.5, patience=3)
    history, reason = [], None
    for i in range(40):  # pass@1 rises from 20% towards 50% along a sigmoid in compute
        x = 0.5 * i
        history.append({"step": i, "rl_exaflops": x, "pass@1": (20 + 30 / (1 + (4.0 / (x + 1e-10)) ** 2)) / 100})
        reason = rule(history)
        if reason:
            break
    assert reason is not None and "ceiling settled" in reason
    assert 6 <= len(history) < 40  # stopped early, after the minimum number of points
    assert abs(float(reason.split("A_post ")[1].split()[0]) - 50.0) < 1.5
