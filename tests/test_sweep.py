"""`ceiling sweep`: branch selection, the plan, and a tiny sweep run end to end by two `--worker` processes
(items as child processes) that a plain in-process `ceiling sweep` then resumes without redoing work."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.analysis import load_scene
from engine.cli import main as cli_main
from engine.config import (
    DataConfig,
    ModelConfig,
    RLConfig,
    RunConfig,
    SceneSpec,
    SFTConfig,
    SweepConfig,
    SweepJobConfig,
    dump_config,
)
from engine.data.synthetic import SyntheticTaskConfig
from engine.data.tokenizer import build_char_tokenizer
from engine.errors import ConfigError
from engine.sweep.cli import item_command
from engine.sweep.items import Sweep, select_branches, select_branches_by_subphase, sft_eval_steps
from engine.sweep.report import sft_end

pytestmark = pytest.mark.usefixtures("trainer_env")  # tests/conftest.py


def test_select_branches_spreads_and_keeps_best():
    steps = [50, 100, 150, 200, 250, 300]
    assert select_branches(steps, 300, 3) == [50, 150, 300]
    assert select_branches(steps, 100, 3) == [50, 100, 300]  # min-val-loss replaces its nearest pick
    assert select_branches(steps, 200, 1) == [200]
    assert select_branches(steps, 100, 10) == steps
    assert 250 in select_branches(steps, 250, 2)


def test_select_branches_by_subphase_takes_one_per_phase_then_spreads():
    steps = [25, 50, 75, 100, 125, 150, 175, 200]
    labels = ["Adaptive", "Adaptive", "Adaptive", "Stable", "Stable", "Mild", "Mild", "Severe"]
    assert select_branches_by_subphase(steps, labels, 100, 4) == [50, 100, 150, 200]
    assert select_branches_by_subphase(steps, labels, 100, 2) == [100, 150]  # best, then Mild (the paper's two)
    assert select_branches_by_subphase(steps, labels, 100, 3) == [50, 100, 150]  # then Adaptive
    no_overfit = ["Adaptive"] * 6 + ["Stable"] * 2
    assert select_branches_by_subphase(steps, no_overfit, 200, 3) == [25, 75, 200]  # best, mid-Adaptive, spread


def test_sft_eval_measures_the_base_the_branches_and_every_nth_checkpoint():
    record = {"sft": {"val_history": [{"step": s} for s in range(10, 131, 10)]}, "branches": [30, 70, 130]}
    assert sft_eval_steps(record, 50) == [0, 30, 50, 70, 100, 130]
    assert sft_eval_steps(record, 0) == [0] + list(range(10, 131, 10))  # 0: every checkpoint


def test_the_report_says_how_sft_ended_and_which_subphases_it_lacks():
    stopped = {"target": "severe", "cap": 500, "stopped": {"step": 130, "reason": "Severe sub-phase reached"}}
    assert sft_end({"until": stopped}, ["Adaptive", "Stable", "Mild", "Severe"]) == \
        "It stopped at step 130: Severe sub-phase reached."
    capped = sft_end({"until": {"target": "severe", "cap": 500, "stopped": None}}, ["Adaptive", "Stable"])
    assert "hit its cap of 500 steps before reaching the Severe sub-phase" in capped
    assert capped.endswith("No Mild/Severe checkpoint to branch from.")
    assert sft_end({}, ["Adaptive", "Stable", "Mild"]) == "No Severe checkpoint to branch from."  # no sft.until


def test_matched_compute_budget_and_dependencies(tmp_path):
    """Pure RL and the baselines wait for the branch from the min-val-loss checkpoint and get its total compute:
    SFT to that checkpoint plus the branch's RL."""
    sweep = Sweep(tiny_sweep(tmp_path, baselines=["luffy", "upt"]))
    deps = {i.name: i.deps for i in sweep.items()}
    assert deps["default/rl/0"] == deps["default/baseline/upt"] == ("default/sft",)
    history = [{"step": s, "val_loss": v, "exaflops": 1e-7 * s} for s, v in ((4, 0.9), (8, 0.5), (12, 0.6))]
    sweep.rundir.publish_done("default/sft", {"sft": {"steps": 12, "exaflops": 1.2e-6, "best": history[1],
                                                      "val_history": history}, "branches": [8, 12]})
    deps = {i.name: i.deps for i in sweep.items()}
    assert deps["default/rl/0"] == deps["default/baseline/luffy"] == ("default/sft", "default/rl/8")
    sweep.rundir.publish_done("default/rl/8", {"rl": {"algorithm": "dapo_dc", "init_step": 8, "steps": 4,
                                                      "exaflops": 2e-7, "eval_history": []}})
    budget = sweep.matched_budget("default")
    assert budget["sft_step"] == 8 and budget["exaflops"] == pytest.approx(8e-7 + 2e-7)
    assert budget["rl_step_exaflops"] == pytest.approx(5e-8)
    (tmp_path / "off").mkdir()
    off = Sweep(tiny_sweep(tmp_path / "off", matched_compute=False))
    assert {i.name: i.deps for i in off.items()}["default/rl/0"] == () and off.matched_budget("default") is None


def test_quick_applies_the_configs_overrides(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    cfg = tiny_sweep(tmp_path)
    cfg.quick = ["run.name=q", "sft.steps=5", "sweep.scenes=[{name: a, num_train: 64, branches: 1}]"]
    dump_config(cfg, config)
    assert cli_main(["sweep", str(config), "--quick", "--plan"]) == 0
    plan = capsys.readouterr().out
    assert f"sweep {tmp_path / 'runs' / 'q'}" in plan and "a/sft " in plan and "default/" not in plan
    cfg.quick = []
    dump_config(cfg, config)
    assert cli_main(["sweep", str(config), "--quick", "--plan"]) == 2  # nothing to apply: a clear error


def test_sweep_config_rejects():
    with pytest.raises(ValueError, match="duplicate"):
        SweepConfig(scenes=[SceneSpec("a"), SceneSpec("a")])
    with pytest.raises(ValueError, match="branches"):
        SweepConfig(branches=0)


def tiny_sweep(tmp_path, **sweep) -> SweepJobConfig:
    model = tmp_path / "model.json"
    model.write_text(json.dumps(dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     vocab_size=len(build_char_tokenizer()), max_position_embeddings=256,
                                     tie_word_embeddings=True)))
    task = SyntheticTaskConfig(num_train=128, num_val=16, num_rl=32, num_eval=8, max_ops=2, max_digits=1, seed=1)
    return SweepJobConfig(
        run=RunConfig(name="s", output_dir=str(tmp_path / "runs"), progress=False, device="cpu"),
        model=ModelConfig(config=str(model), tokenizer="char"),
        data=DataConfig(synthetic=task, max_seq_len=160),
        sft=SFTConfig(steps=12, global_batch_size=8, micro_batch_tokens=1024, lr=3e-3, val_every=4),
        rl=RLConfig(steps=2, train_batch=2, gen_batch=4, n_samples=4, max_gen_rounds=2, max_prompt_len=96,
                    max_new_tokens=16, micro_batch_tokens=512, lr=1e-4, eval_every=1, eval_samples=1,
                    checkpoint_every=1),
        sweep=SweepConfig(**(dict(branches=1, baselines=["luffy"], eval_samples=1, early_stop=True, min_points=2,
                                  patience=1) | sweep)),
    )


def ceiling(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_two_sweep_workers_end_to_end_then_resume_in_process(tmp_path, capsys):
    """The real path: two `ceiling sweep CONFIG --worker` processes share the run directory, each item runs as
    a child process; then a plain `ceiling sweep` (in-process) finds everything done and rewrites the report."""
    cfg = tiny_sweep(tmp_path)
    config = tmp_path / "sweep.yaml"
    dump_config(cfg, config)
    root = tmp_path / "runs" / "s"
    workers = [ceiling("sweep", config, "--worker", "--heartbeat", 1, "--stale-after", 20, "--poll", 0.5)
               for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(o[-4000:] for o in outs)
    ran = [line for o in outs for line in o.splitlines() if line.startswith("worker ")]
    assert len(ran) == 2 and any("report: " in o for o in outs)
    pids = {w.pid for w in workers}

    state = Sweep(cfg).state()
    st = state["scenes"]["default"]
    assert st["branches"] == [st["sft"]["best"]["step"]]
    assert set(st["sft_pass1"]) == {"0", "4", "8", "12"}  # base + every SFT checkpoint
    expected = ["default/sft", "default/sft_eval", f"default/rl/{st['branches'][0]}", "default/rl/0",
                "default/baseline/luffy"]
    assert state["done"] == expected
    assert all(st["workers"][i]["seconds"] > 0 and st["workers"][i]["pid"] in pids for i in expected)
    scene = load_scene(root / "default" / "scene.json")
    assert set(scene.branches) == {0, *st["branches"]}
    table = (root / "default" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(r.split("|")[1]) for r in rows] == [0] + st["branches"]  # one row per branch, pure RL first
    report = (root / "sweep_report.md").read_text()
    for needle in ("a_post.png", "paradigms.png", "LUFFY", "Not computed", "Early stopping, replayed",
                   "Best branch:", "## Compute: spent vs a full sweep", "| **total** |"):
        assert needle in report
    for png in ("a_post.png", "paradigms.png"):
        assert (root / "default" / png).stat().st_size > 1000
    assert not list((root / "locks").rglob("*.lock"))

    metrics = {p: p.read_text() for p in root.glob("default/*/metrics.jsonl")}
    assert len(metrics) == 4  # sft, rl_0, one branch, one baseline
    (root / "sweep_report.md").unlink()
    state = Sweep(cfg).run()  # one process, same protocol: nothing is trained or evaluated again
    assert state["done"] == expected and (root / "sweep_report.md").is_file()
    assert {p: p.read_text() for p in root.glob("default/*/metrics.jsonl")} == metrics
    assert cli_main(["sweep", str(config), "--plan"]) == 0
    plan = capsys.readouterr().out
    assert plan.count(" done ") == len(expected) and "after default/sft" in plan


def test_plan_before_anything_ran_and_a_changed_config_is_refused(tmp_path):
    cfg = tiny_sweep(tmp_path, branches=3, baselines=["luffy", "upt"])
    sweep = Sweep(cfg)
    plan = sweep.plan_text()
    lines = {line.split()[0]: line for line in plan.splitlines()[2:]}
    assert list(lines) == ["default/sft", "default/sft_eval", "default/rl/0", "default/baseline/luffy",
                           "default/baseline/upt", "default/rl/<k>"]
    assert " ready " in lines["default/sft"] and " waiting " in lines["default/sft_eval"]
    assert "3 RL branches" in lines["default/rl/<k>"]
    sweep.check_config()
    assert (tmp_path / "runs" / "s" / "config.yaml").is_file()
    Sweep(cfg).check_config()  # the same config again: fine
    with pytest.raises(ConfigError, match="sweep.branches: 3 there, 2 here"):
        Sweep(tiny_sweep(tmp_path, branches=2, baselines=["luffy", "upt"])).check_config()
    with pytest.raises(ConfigError, match="no item"):
        sweep.run_item("default/rl_x")
    with pytest.raises(ConfigError, match="not done yet"):
        sweep.run_item("default/sft_eval")


def test_slurm_flag_writes_a_checked_sbatch_script(tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    dump_config(tiny_sweep(tmp_path), config)
    assert cli_main(["sweep", str(config), "--slurm", "--workers", "3", "--gpus-per-worker", "1",
                     "--partition", "debug"]) == 0
    script = tmp_path / "runs" / "s" / "sweep.sbatch"
    assert f"sbatch {script}" in capsys.readouterr().out
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "#SBATCH --array=0-2" in text and "#SBATCH --partition=debug" in text
    exec_line = next(line for line in text.splitlines() if line.startswith("exec "))
    assert exec_line.split()[1:] == [sys.executable, "-m", "engine.cli", "sweep", str(script.parent / "config.yaml"),
                                     "--worker", "--nproc-per-node=1", "--stale-after=600", "--heartbeat=30",
                                     "--poll=10"]
    assert (script.parent / "config.yaml").is_file()  # the workers' config, checked by each of them


def test_item_command_runs_training_items_under_torchrun():
    r = Path("/r/items/x.record.json")
    tail = ["sweep", "/r/config.yaml", "--run-item"]
    assert item_command("a/sft", "/r/config.yaml", r) == [sys.executable, "-m", "engine.cli", *tail, "a/sft",
                                                          "--record", str(r)]
    assert item_command("a/rl/5", "/r/config.yaml", r, nproc_per_node=8)[:6] == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=8", "-m"]
    assert item_command("a/sft_eval", "/r/config.yaml", r, nproc_per_node=8)[:3] == [sys.executable, "-m", "engine.cli"]
    assert item_command("a/sft", "/r/config.yaml", r, launcher="srun --ntasks=1 python -m engine.cli")[:6] == [
        "srun", "--ntasks=1", "python", "-m", "engine.cli", "sweep"]


def test_a_stable_to_severe_jump_is_replayed_step_by_step_with_the_runs_own_losses(tmp_path):
    """sft.until: severe on 16 rows at a high LR over-fits within ~80 steps. With the validations from the last
    Stable one to a Severe one past the Mild ones taken out of the summary (as if the loss had jumped between two
    validations), `fill_mild` replays the gap from the last Stable checkpoint: its validations at the removed
    steps are the run's own, and every step of the gap has a checkpoint that `sft_checkpoint` finds."""
    from engine.analysis.phases import classify_subphases

    job = tiny_sweep(tmp_path, branch_rule="subphase", branches=4)
    job = dataclasses.replace(job, data=dataclasses.replace(job.data, synthetic=dataclasses.replace(
        job.data.synthetic, num_train=16, num_val=32)), sft=SFTConfig(
        steps=300, global_batch_size=8, micro_batch_tokens=1024, lr=2e-2, warmup_steps=2, val_every=4, until="severe"))
    sweep = Sweep(job)
    spec = sweep.scenes["default"]
    record = sweep.run_sft(spec)
    history = record["sft"]["val_history"]
    labels = classify_subphases([h["val_loss"] for h in history])
    assert record["sft"]["until"]["stopped"] and labels[-1] == "Severe" and "Mild" in labels
    assert record["sft"]["until"]["filled"] is None  # Mild was seen: nothing to replay
    # Every validation from the last Stable one to the first Severe one after a Mild one is taken out, and the
    # history ends there (the loss can go Severe, back to Mild, then Severe again).
    stable = max(i for i, lab in enumerate(labels) if lab == "Stable")
    severe = labels.index("Severe", labels.index("Mild"))
    removed = {h["step"]: h["val_loss"] for h in history[stable + 1:severe]}
    cut = history[:stable + 1] + [history[severe]]
    summary = {"val_history": cut, "best": record["sft"]["best"], "stopped": record["sft"]["until"]["stopped"]}
    filled = sweep.fill_mild(spec, sweep.sft_job(spec), summary)
    start, end = filled["filled"]
    assert start - 1 == max(h["step"] for h, lab in zip(history, labels) if lab == "Stable")
    assert [h["step"] for h in filled["val_history"] if start <= h["step"] <= end] == list(range(start, end + 1))
    replayed = {h["step"]: h["val_loss"] for h in filled["val_history"]}
    assert {s: replayed[s] for s in removed} == pytest.approx(removed, rel=1e-6)  # resume is exact
    assert "Mild" in classify_subphases([h["val_loss"] for h in filled["val_history"]])
    assert sweep.sft_checkpoint("default", start + 1).parent.parent.name == "sft_fill"
    assert sweep.sft_checkpoint("default", start - 1).parent.parent.name == "sft"
    with pytest.raises(ConfigError, match="no SFT checkpoint of step 3"):
        sweep.sft_checkpoint("default", 3)
    again = sweep.fill_mild(spec, sweep.sft_job(spec), summary)  # rerun (a resumed item): nothing trained again
    assert again["val_history"] == filled["val_history"]
