"""What a run leaves for its user, and that every number is what its label says: the pipeline's base row is the base
weights on the `hf` backend at one rank (where the RL trainer generates with the policy itself), `ceiling eval` of
an RL checkpoint reproduces the run's logged pass@1, the report names weights and backend per row, generations are
dumped with their scores, truncation and lengths are logged, the final model loads, pass@k and maj@k are right."""

import json
import math

import pytest
import torch

from engine.cli import main
from engine.config import (
    DataConfig,
    ModelConfig,
    PipelineConfig,
    RLConfig,
    RolloutConfig,
    RunConfig,
    RunJobConfig,
    SFTConfig,
)
from engine.data.synthetic import SyntheticTaskConfig
from engine.pass_at_k import ProblemSamples, default_ks, maj_at_k, pass_at_k, summarize
from engine.pipeline import Pipeline
from engine.rundir.generations import read_generations
from engine.rundir.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("trainer_env")  # tests/conftest.py

BASE = "configs/models/tiny-base"  # the shipped pretrained base: ~10% pass@1 on the demo's task (README)
TASK = dict(num_train=800, num_val=32, num_rl=64, num_eval=48, min_ops=2, max_ops=3, max_digits=1, seed=0)


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, module_trainer_env):
    """`ceiling run` in miniature from the shipped base, on the transformers backend at one rank: there the RL
    trainer generates with the policy module itself, which it loads with the SFT checkpoint."""
    root = tmp_path_factory.mktemp("runs")
    job = RunJobConfig(
        run=RunConfig(name="r", output_dir=str(root), progress=False, device="cpu", seed=0),
        model=ModelConfig(path=BASE, tokenizer="char"),
        data=DataConfig(synthetic=SyntheticTaskConfig(**TASK), max_seq_len=256),
        sft=SFTConfig(steps=120, global_batch_size=32, micro_batch_tokens=4096, lr=3e-3, min_lr_ratio=0.5,
                      warmup_steps=10, val_every=40, checkpoint_every=40, export_hf=False),
        rl=RLConfig(algorithm="dapo_dc", steps=2, train_batch=4, gen_batch=8, n_samples=4, max_gen_rounds=2,
                    max_prompt_len=128, max_new_tokens=48, micro_batch_tokens=4096, lr=1e-4, eval_every=2,
                    eval_samples=2, checkpoint_every=1, rollout_batch_size=64, dump_generations=1, dump_max_rows=20),
        rollout=RolloutConfig(backend="hf"),
        pipeline=PipelineConfig(switch="step:120", eval_samples=2),
    )
    state = Pipeline(job).run()
    return root / "r", state


def test_the_base_row_is_the_base_weights_on_the_hf_backend(hf_run, tmp_path):
    """The base row equals `ceiling eval` of the shipped base on the same prompts, seed and settings, to the last
    digit; it differs from the SFT row and sits near the base's measured pass@1. (It was the SFT model's score:
    the base was scored through the RL trainer's rollout, which on one fp32 rank is the policy, already holding the
    SFT checkpoint.)"""
    run, state = hf_run
    base, sft = state["base"], state["rl"]["eval_history"][0]
    assert base["backend"] == "hf" and base["weights"] == BASE and base["samples"] == 2
    out = tmp_path / "base.json"
    assert main(["eval", BASE, "--tokenizer", "char", "--benchmarks", str(run / "rl" / "data" / "eval.jsonl"),
                 "--samples", "2", "--temperature", "0.7", "--max-new-tokens", "48", "--batch-size", "64",
                 "--seed", "7", "--set", "rollout.backend=hf", "--set", "reward.mode=boxed-or-whole",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["scores"]["eval"] == base["pass@1"]
    assert 100 * sft["pass@1"] > base["pass@1"] + 5, (base, sft)  # measured: 6.25% -> 14.58% after 120 SFT steps
    assert 1.0 <= base["pass@1"] <= 25.0, base  # README: 8.5-11% on 200 prompts; here 48 prompts x 2 samples


def test_ceiling_eval_of_an_rl_checkpoint_reproduces_its_logged_pass_at_1(hf_run, tmp_path, capsys):
    """With no flags, `ceiling eval` of the RL run's last checkpoint takes the run's eval set, seed, sampling,
    reward and backend from its config.yaml and scores exactly what the run logged."""
    run, state = hf_run
    last = state["rl"]["eval_history"][-1]
    ckpt = run / "rl" / "checkpoints" / f"step_{last['step']:08d}"
    out = tmp_path / "rl.json"
    assert main(["eval", str(ckpt), "--json", str(out)]) == 0
    assert "settings from" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["scores"]["eval"] == round(100 * last["pass@1"], 2)
    assert result["metrics"]["eval"]["pass@2"] == pytest.approx(last["pass@2"])


def test_the_report_says_which_weights_and_backend_gave_each_row(hf_run):
    run, state = hf_run
    report = (run / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| base", "| SFT"))]
    assert len(rows) == 3
    assert f"`{BASE}` | hf |" in rows[0] and f"{state['base']['pass@1']:.2f}%" in rows[0]
    assert "sft/checkpoints/step_00000120` | hf |" in rows[1]
    assert f"rl/checkpoints/step_{state['rl']['steps']:08d}` | hf |" in rows[2]
    assert "| pass@2 | maj@2 |" in report and "cut at max_new_tokens" in report


def test_generations_are_dumped_with_their_scores_and_capped(hf_run):
    run, state = hf_run
    gen = run / "rl" / "generations"
    assert sorted(p.name for p in gen.iterdir()) == ["eval_step_00000000.jsonl", "eval_step_00000002.jsonl",
                                                     "step_00000001.jsonl", "step_00000002.jsonl"]
    rows = read_generations(gen / "step_00000001.jsonl")
    assert len(rows) == 21 and rows[-1]["truncated_rows"] > 0  # 20 rows, then how many were left out
    sample = rows[0]
    assert {"prompt", "response", "answer", "reward", "outcome", "reason", "finish_reason", "weight_version",
            "data_source", "round", "kept"} <= set(sample)
    assert sample["kind"] == "rollout" and sample["weight_version"] == 1 and sample["prompt"].startswith("<|im_start|>")
    assert sample["finish_reason"] in ("stop", "length") and sample["reward"] in (0.0, 1.0)
    evals = read_generations(gen / "eval_step_00000002.jsonl")
    updates = sum(not r["rollout/skipped"] for r in read_metrics(run / "rl" / "metrics.jsonl") if "rollout/skipped" in r)
    assert evals[0]["kind"] == "eval" and evals[0]["weight_version"] == 1 + updates  # the first sync, then each update


def test_truncation_and_lengths_are_logged_every_step(hf_run):
    run, _ = hf_run
    records = read_metrics(run / "rl" / "metrics.jsonl")
    steps = [r for r in records if "rollout/reward_mean" in r]
    assert steps and all(0 <= r["rollout/truncated_frac"] <= 1 for r in steps)
    assert all(0 < r["rollout/response_len_p50"] <= r["rollout/response_len_p90"] <= r["rollout/response_len_max"]
               <= 48 + 1 for r in steps)
    evals = [r for r in records if "eval/pass@1" in r]
    assert evals and all("eval/truncated_frac" in r and "eval/pass@2" in r and "eval/maj@2" in r for r in evals)


def test_the_final_model_loads_as_it_is_and_equals_the_last_checkpoint(hf_run):
    from transformers import AutoModelForCausalLM

    from engine.data.tokenizer import end_of_turn_id, load_tokenizer
    from engine.evaluate import checkpoint_model_config, load_checkpoint_model
    from engine.rollout.hf import generation_mode

    run, state = hf_run
    hf_dir = run / "hf"
    assert hf_dir.is_symlink() and (hf_dir / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = load_tokenizer(hf_dir)
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    assert end_of_turn_id(tok) in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])
    ckpt = run / "rl" / "checkpoints" / f"step_{state['rl']['steps']:08d}"
    ref = load_checkpoint_model(ckpt, checkpoint_model_config(ckpt))
    ids = torch.tensor([tok("<|im_start|>user\n1+2?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]])
    with torch.no_grad(), generation_mode(ref):  # the engine's model runs packed attention: sdpa for a plain call
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- pass@k and maj@k, by hand


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0 and pass_at_k(5, 2, 5) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    assert default_ks(1) == [1] and default_ks(6) == [1, 2, 4, 6] and default_ks(8) == [1, 2, 4, 8]


def test_maj_at_k_votes_on_answers_and_splits_ties():
    preds, correct = ["3", "3", "5", None], [True, True, False, False]
    assert maj_at_k(preds, correct, 4) == 1.0  # "3" has 2 votes of 3
    # k = 2 over the 6 pairs: {3,3} 1, {3,5} x2 tie 1/2, {3,None} x2 1, {5,None} 0 -> (1 + 1 + 2) / 6
    assert maj_at_k(preds, correct, 2) == pytest.approx(4 / 6)
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    s = summarize([ProblemSamples([1.0, 1.0, 0.0, 0.0], correct, preds),
                   ProblemSamples([0.0] * 4, [False] * 4, ["1"] * 4)])
    assert s["avg@4"] == pytest.approx(0.25) and s["pass@4"] == pytest.approx(0.5)
    assert s["maj@4"] == pytest.approx(0.5) and s["pass@1"] == pytest.approx(0.25)
