"""`ceiling run`: the switch rule, phase-level resume without redoing finished phases, report and curves."""

import json

import pytest

from engine.analysis import load_scene
from engine.analysis.phases import stable_confirmed
from engine.config import (
    DataConfig,
    ModelConfig,
    PipelineConfig,
    RLConfig,
    RunConfig,
    RunJobConfig,
    SFTConfig,
)
from engine.data.synthetic import SyntheticTaskConfig
from engine.data.tokenizer import build_char_tokenizer
from engine.errors import ConfigError
from engine.pipeline import Pipeline
from engine.rundir.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("trainer_env")  # tests/conftest.py


def test_stable_confirmed_boundaries():
    assert not stable_confirmed([1.0, 0.9], d1=0.02, patience=2)  # too few validations
    assert stable_confirmed([1.0, 0.5, 0.51, 0.5], d1=0.02, patience=2)  # 0.51 <= 1.02 * 0.5
    assert not stable_confirmed([1.0, 0.5, 0.511, 0.5], d1=0.02, patience=2)  # 0.511 > 0.51
    assert not stable_confirmed([1.0, 0.8, 0.6, 0.5], d1=0.02, patience=2)  # still falling fast
    assert stable_confirmed([1.0, 0.5, 0.55, 0.56, 0.57], d1=0.2, patience=2)  # rising but within 20%


@pytest.mark.parametrize("switch", ["stable", "min_val_loss", "step:3"])
def test_pipeline_config_accepts(switch):
    assert PipelineConfig(switch=switch).switch == switch


def test_pipeline_config_rejects(tmp_path):
    from engine.config import load_config

    path = tmp_path / "run.yaml"
    path.write_text("pipeline:\n  switch: step:0\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: pipeline: pipeline\.switch must be"):
        load_config(path, RunJobConfig)


def job(tmp_path, **pipeline):
    model = tmp_path / "model.json"
    model.write_text(json.dumps(dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=len(build_char_tokenizer()), max_position_embeddings=256,
                                     tie_word_embeddings=True)))
    task = SyntheticTaskConfig(num_train=128, num_val=16, num_rl=32, num_eval=8, max_ops=2, max_digits=1, seed=1)
    return RunJobConfig(
        run=RunConfig(name="p", output_dir=str(tmp_path / "runs"), progress=False, device="cpu"),
        model=ModelConfig(config=str(model), tokenizer="char"),
        data=DataConfig(synthetic=task, max_seq_len=160),
        sft=SFTConfig(steps=12, global_batch_size=8, micro_batch_tokens=1024, lr=3e-3, val_every=4,
                      checkpoint_every=4, export_hf=False),
        rl=RLConfig(steps=2, train_batch=2, gen_batch=4, n_samples=4, max_gen_rounds=2, max_prompt_len=96,
                    max_new_tokens=16, micro_batch_tokens=512, lr=1e-4, eval_every=1, eval_samples=1,
                    checkpoint_every=1),
        pipeline=PipelineConfig(**pipeline),
    )


def test_run_resumes_without_redoing_finished_phases(tmp_path):
    cfg = job(tmp_path, switch="step:8", eval_samples=1)
    state = Pipeline(cfg).run(stop_after="sft")  # "interrupted" after the SFT phase
    assert state["done"] == ["sft"]
    root = tmp_path / "runs" / "p"
    sft_lines = (root / "sft" / "metrics.jsonl").read_text()
    switch = json.loads((root / "switch.json").read_text())
    assert switch["step"] == 8 and switch["sft_steps_run"] == 8 and switch["checkpoint"].endswith("step_00000008")
    assert [h["step"] for h in switch["val_history"]] == [4, 8]

    state = Pipeline(cfg).run()  # started again: SFT is not redone
    assert state["done"] == ["sft", "rl", "report"]
    assert (root / "sft" / "metrics.jsonl").read_text() == sft_lines
    rl = [r for r in read_metrics(root / "rl" / "metrics.jsonl") if "eval/pass@1" in r]
    assert [r["step"] for r in rl] == [0, 1, 2]
    report = (root / "report.md").read_text()
    for needle in ("pass_at_1.png", "sft_val_loss.png", "rl_curves.png", "switch checkpoint, step 8", "base (before SFT)"):
        assert needle in report
    for png in ("pass_at_1.png", "sft_val_loss.png", "rl_curves.png"):
        assert (root / png).stat().st_size > 1000
    scene = load_scene(root / "curves.json")  # the run reads back as a RETU scene
    assert list(scene.branches) == [8] and scene.branches[8].n_points == 3  # anchor + 2 RL evaluations

    state = Pipeline(cfg).run()  # everything done: nothing reruns
    assert state["done"] == ["sft", "rl", "report"]


def test_stable_policy_switches_from_min_val_checkpoint(tmp_path):
    cfg = job(tmp_path, switch="stable", patience=1)
    cfg.sft.subphase_d1 = 0.5  # a loose plateau bar so the tiny run confirms Stable early
    cfg.sft.subphase_d2 = 0.9
    pipeline = Pipeline(cfg)
    pipeline.run(stop_after="sft")
    switch = pipeline.state["switch"]
    assert "Stable sub-phase confirmed" in switch["reason"] and switch["sft_steps_run"] < 12
    best = min(switch["val_history"], key=lambda h: h["val_loss"])
    assert switch["step"] == best["step"]
