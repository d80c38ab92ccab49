"""`ceiling sweep`: branch selection, and a tiny end-to-end sweep that resumes without redoing work."""

import json

import pytest

from engine.analysis import load_scene
from engine.config import DataConfig, ModelConfig, RunConfig
from engine.data.synthetic import SyntheticTaskConfig
from engine.data.tokenizer import build_char_tokenizer
from engine.rl.trainer import RLConfig
from engine.sft.trainer import SFTConfig
from engine.sweep import SceneSpec, Sweep, SweepConfig, SweepJobConfig, select_branches

pytestmark = pytest.mark.usefixtures("trainer_env")  # tests/conftest.py


def test_select_branches_spreads_and_keeps_best():
    steps = [50, 100, 150, 200, 250, 300]
    assert select_branches(steps, 300, 3) == [50, 150, 300]
    assert select_branches(steps, 100, 3) == [50, 100, 300]  # min-val-loss replaces its nearest pick
    assert select_branches(steps, 200, 1) == [200]
    assert select_branches(steps, 100, 10) == steps
    assert 250 in select_branches(steps, 250, 2)


def test_sweep_config_rejects():
    with pytest.raises(ValueError, match="duplicate"):
        SweepConfig(scenes=[SceneSpec("a"), SceneSpec("a")])
    with pytest.raises(ValueError, match="branches"):
        SweepConfig(branches=0)


def test_tiny_sweep_end_to_end_and_resume(tmp_path):
    model = tmp_path / "model.json"
    model.write_text(json.dumps(dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=len(build_char_tokenizer()), max_position_embeddings=256,
                                     tie_word_embeddings=True)))
    task = SyntheticTaskConfig(num_train=128, num_val=16, num_rl=32, num_eval=8, max_ops=2, max_digits=1, seed=1)
    cfg = SweepJobConfig(
        run=RunConfig(name="s", output_dir=str(tmp_path / "runs"), progress=False, device="cpu"),
        model=ModelConfig(config=str(model), tokenizer="char"),
        data=DataConfig(synthetic=task, max_seq_len=160),
        sft=SFTConfig(steps=12, global_batch_size=8, micro_batch_tokens=1024, lr=3e-3, val_every=4),
        rl=RLConfig(steps=2, train_batch=2, gen_batch=4, n_samples=4, max_gen_rounds=2, max_prompt_len=96,
                    max_new_tokens=16, micro_batch_tokens=512, lr=1e-4, eval_every=1, eval_samples=1,
                    checkpoint_every=1),
        sweep=SweepConfig(branches=2, baselines=["luffy"], eval_samples=1, early_stop=True, min_points=2,
                          patience=1),
    )
    state = Sweep(cfg).run()
    root = tmp_path / "runs" / "s"
    st = state["scenes"]["default"]
    assert st["branches"] == sorted(st["branches"]) and len(st["branches"]) == 2
    assert st["sft"]["best"]["step"] in st["branches"]
    assert set(st["sft_pass1"]) == {"0", "4", "8", "12"}  # base + every SFT checkpoint
    expected = ["default/sft", "default/sft_eval"] + [f"default/rl/{s}" for s in [0] + st["branches"]] + \
        ["default/baseline/luffy"]
    assert state["done"] == expected
    scene = load_scene(root / "default" / "scene.json")
    assert set(scene.branches) <= {0, *st["branches"]} and 0 in scene.branches
    table = (root / "default" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [0] + st["branches"]  # one row per branch, pure RL first
    report = (root / "sweep_report.md").read_text()
    for needle in ("a_post.png", "paradigms.png", "LUFFY", "Not computed", "Early stopping, replayed"):
        assert needle in report
    for png in ("a_post.png", "paradigms.png"):
        assert (root / "default" / png).stat().st_size > 1000

    metrics = {p: p.read_text() for p in root.glob("default/*/metrics.jsonl")}
    assert len(metrics) == 5  # sft, rl_0, two branches, one baseline
    state = Sweep(cfg).run()  # restarted: nothing is trained or evaluated again
    assert state["done"] == expected
    assert {p: p.read_text() for p in root.glob("default/*/metrics.jsonl")} == metrics
