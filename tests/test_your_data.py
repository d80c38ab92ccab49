"""The paper's workflow on a practitioner's own files, through the commands a user types: SFT on LUFFY's
openr1.parquet layout, RL from it (GRPO, and LUFFY with its experts from `target`), `ceiling run`, evaluation on a
MATH-500-layout file, a reward function of one's own (one that raises and one that hangs do not stop the run),
metrics per data source, and the example sweep on files. No data settings anywhere: the layouts are recognised."""

import json
import logging
import os
from pathlib import Path

import pytest

from engine.cli import main
from engine.data.synthetic import SyntheticTaskConfig
from engine.rundir.generations import read_generations
from engine.rundir.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("trainer_env")  # tests/conftest.py

ROOT = Path(__file__).resolve().parent.parent
BASE = str(ROOT / "configs" / "models" / "tiny-base")
TASK = SyntheticTaskConfig(num_train=200, num_val=16, num_rl=16, num_eval=12)  # sizes; the rest: configs/tiny.yaml

REWARD = '''
import time


def compute_score(data_source, solution_str, ground_truth, extra_info):
    """Rewards length (the engine never would), fails on row 1, hangs on row 2."""
    index = (extra_info or {}).get("index")
    if index == 1:
        raise ValueError("boom on row 1")
    if index == 2:
        time.sleep(60)
    return {"score": len(solution_str) / 100, "acc": solution_str.rstrip().endswith("}")}
'''


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


SMALL = ("run.progress=false", f"model.path={BASE}")
SMALL_RL = ("rl.steps=1", "rl.train_batch=4", "rl.gen_batch=16", "rl.n_samples=2", "rl.max_gen_rounds=1",
            "rl.max_new_tokens=32", "rl.eval_every=1", "rl.eval_samples=2", "rl.checkpoint_every=1",
            "rl.dump_generations=1")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, module_trainer_env):
    """A working directory where `ceiling data runs/openr1-tiny` wrote the example files (small), as the README's
    commands expect them."""
    path = tmp_path_factory.mktemp("work")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(path)
        assert main(["data", "runs/openr1-tiny", "--config", str(ROOT / "configs" / "tiny.yaml")] + sets(
            *(f"data.synthetic.{k}={getattr(TASK, k)}" for k in ("num_train", "num_val", "num_rl", "num_eval")))) == 0
        yield path


@pytest.fixture(scope="module")
def readme_run(workdir):
    """The README's first two commands on the example files, shortened: `ceiling sft configs/sft-openr1-tiny.yaml`
    (SFT on openr1.parquet's `target`), then `ceiling rl configs/rl-openr1-tiny.yaml` (GRPO from it)."""
    assert main(["sft", str(ROOT / "configs" / "sft-openr1-tiny.yaml")] + sets(
        *SMALL, "sft.steps=10", "sft.global_batch_size=16", "sft.val_every=5", "sft.checkpoint_every=5")) == 0
    assert main(["rl", str(ROOT / "configs" / "rl-openr1-tiny.yaml")] + sets(*SMALL, *SMALL_RL, "rl.algorithm=grpo")) == 0
    return workdir / "runs"


def test_sft_reads_openr1_parquet_with_no_settings(readme_run):
    run = readme_run / "openr1-sft"
    summary = json.loads((run / "sft_summary.json").read_text())
    assert summary["train_rows"] == TASK.num_train and [h["step"] for h in summary["val_history"]] == [5, 10]
    metas = [json.loads(p.read_text()) for p in (readme_run / "token_store").glob("*/meta.json")]
    assert sorted(m["sources"] for m in metas) == [["runs/openr1-tiny/openr1-valid.parquet"],
                                                  ["runs/openr1-tiny/openr1.parquet"]]
    assert all("layout_version" in m["layout"] for m in metas)  # how rows were read is part of the store's key


def test_rl_on_openr1_parquet_evaluated_on_math500(readme_run):
    run = readme_run / "openr1-rl"
    records = read_metrics(run / "metrics.jsonl")
    step = next(r for r in records if "rollout/reward_mean" in r)
    assert {"rollout/synthetic-2op/reward_mean", "rollout/synthetic-3op/reward_mean"} <= set(step)
    evals = [r for r in records if "eval/pass@1" in r]
    assert len(evals) == 2 and all("eval/pass@2" in r and "eval/maj@2" in r for r in evals)
    curve = json.loads((run / "eval_curve.json").read_text())
    assert [c["step"] for c in curve] == [0, 1] and "pass@2" in curve[-1]
    assert (run / "hf" / "model.safetensors").is_file()  # the RL model, exported for serving


def test_luffy_takes_its_experts_from_target(readme_run, tmp_path):
    assert main(["rl", str(ROOT / "configs" / "rl-openr1-tiny.yaml")] + sets(
        *SMALL, *SMALL_RL, "rl.algorithm=luffy", f"run.output_dir={tmp_path}", "rl.export_hf=false")) == 0
    step = next(r for r in read_metrics(tmp_path / "openr1-rl" / "metrics.jsonl") if "rollout/reward_mean" in r)
    assert step["compute/expert_tokens"] > 0  # LUFFY trains on `target` beside the model's own samples


def test_a_reward_of_your_own_scores_rl_and_failures_do_not_stop_the_run(readme_run, tmp_path, caplog):
    """verl's reward signature. It rewards length, so the logged rewards are its and not math-verify's; it raises
    on row 1 and hangs on row 2 (past reward.timeout_s): those score 0 with their reasons, are counted and logged,
    and the run goes on. Metrics split by the rows' data sources."""
    (tmp_path / "my_reward.py").write_text(REWARD)
    with caplog.at_level(logging.WARNING, logger="ceiling"):
        assert main(["rl", str(ROOT / "configs" / "rl-openr1-tiny.yaml")] + sets(
            *SMALL, *SMALL_RL, "rl.algorithm=grpo", "rl.eval_samples=1", f"run.output_dir={tmp_path}",
            "rl.export_hf=false", "rl.eval_path=runs/openr1-tiny/openr1-valid.parquet",
            f"reward.function={tmp_path / 'my_reward.py'}:compute_score", "reward.timeout_s=1")) == 0
    run = tmp_path / "openr1-rl"
    step = next(r for r in read_metrics(run / "metrics.jsonl") if "rollout/reward_mean" in r)
    assert step["rollout/reward_failed"] == 4  # rows 1 and 2, 2 samples each
    rows = read_generations(run / "generations" / "step_00000001.jsonl")
    assert len(rows) == TASK.num_rl * 2
    for row in rows:
        if row["prompt_id"] == "1":
            assert row["reward"] == 0 and row["outcome"] == "error" and "boom on row 1" in row["reason"]
        elif row["prompt_id"] == "2":
            assert row["reward"] == 0 and row["outcome"] == "timeout" and "timeout_s=1" in row["reason"]
        else:
            assert row["reward"] == pytest.approx(len(row["response"]) / 100) and row["outcome"] in ("correct", "wrong")
    assert "scored 0 because scoring failed (2 errors, 2 timeouts)" in caplog.text
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval/pass@1" in r]
    assert all({"eval/synthetic-2op/pass@1", "eval/synthetic-3op/pass@1"} <= set(r) for r in evals)


def test_ceiling_run_on_files(readme_run, tmp_path):
    assert main(["run", str(ROOT / "configs" / "openr1-tiny.yaml")] + sets(
        *SMALL, *SMALL_RL, f"run.output_dir={tmp_path}", "sft.steps=10", "sft.global_batch_size=16",
        "sft.val_every=5", "sft.checkpoint_every=5", "pipeline.switch=step:10", "pipeline.eval_samples=1",
        "rollout.backend=hf")) == 0
    state = json.loads((tmp_path / "openr1-run" / "pipeline.json").read_text())
    assert state["done"] == ["sft", "rl", "report"] and state["base"]["weights"] == BASE
    report = (tmp_path / "openr1-run" / "report.md").read_text()
    assert f"{TASK.num_eval} prompts of `runs/openr1-tiny/math500.jsonl`" in report
    assert (tmp_path / "openr1-run" / "hf" / "config.json").is_file()


def test_ceiling_eval_of_the_rl_model_on_a_math500_file(readme_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    dump = tmp_path / "samples.jsonl"
    assert main(["eval", "runs/openr1-rl/hf", "--benchmarks", "runs/openr1-tiny/math500.jsonl",
                 "runs/openr1-tiny/openr1-valid.parquet", "--samples", "4", "--max-new-tokens", "32",
                 "--json", str(out), "--dump", str(dump)]) == 0
    result = json.loads(out.read_text())
    assert result["counts"] == {"math500": TASK.num_eval, "openr1-valid": TASK.num_val}
    m = result["metrics"]["math500"]
    assert {"pass@2", "pass@4", "maj@2", "maj@4", "truncated_frac", "response_len_p90"} <= set(m)
    assert m["pass@1"] <= m["pass@2"] <= m["pass@4"]
    assert set(result["by_source"]) == {"(none)", "synthetic-2op", "synthetic-3op"}
    assert [p["id"] for p in result["problems"]["math500"]][:2] == ["synthetic/eval/0.json", "synthetic/eval/1.json"]
    samples = read_generations(dump)
    assert len(samples) == 4 * (TASK.num_eval + TASK.num_val) and samples[0]["answer"] is not None
    printed = capsys.readouterr().out
    assert "pass@4" in printed and "maj@4" in printed and "cut at 32 tokens" in printed


@pytest.mark.slow
def test_the_example_sweep_on_files_runs_quick_to_its_report(workdir):
    """The README's sweep on the example files: `ceiling sweep configs/sweep-openr1-tiny.yaml --quick` runs every item
    kind on them (SFT on openr1.parquet, P_sft, an RL branch, LUFFY from `target`) to its report."""
    assert main(["sweep", str(ROOT / "configs" / "sweep-openr1-tiny.yaml"), "--quick"] + sets(*SMALL)) == 0
    run = workdir / "runs" / "sweep-openr1-tiny-quick"
    report = (run / "sweep_report.md").read_text()
    assert "in miniature on your files" in report
    assert f"{TASK.num_train} SFT rows of runs/openr1-tiny/openr1.parquet" in report
    state = json.loads((run / "sweep.json").read_text())
    assert set(state["scenes"]["full"]["rl"]) == {f"rl/{state['scenes']['full']['branches'][0]}", "baseline/luffy"}
    assert os.path.isdir(run / "full" / "baseline_luffy" / "checkpoints")
