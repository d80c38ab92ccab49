"""`ceiling pretrain` (engine/pretrain.py): the corpus keeps off the task's held-out problems, the command is
reproducible and exports a loadable base, and the shipped base (configs/models/tiny-base) solves part of the
task before any SFT."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.cli import main as cli_main
from engine.config import PretrainCorpusConfig
from engine.data.synthetic import SyntheticTaskConfig, task_problems
from engine.data.tokenizer import build_char_tokenizer
from engine.pretrain import build_corpus, facts
from engine.rundir.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("trainer_env")  # tests/conftest.py
ROOT = Path(__file__).resolve().parents[1]


def test_facts_are_true_and_never_negative():
    rows = facts(12)
    assert len(rows) == 13 * 9 + sum(min(a, 9) for a in range(13))
    for prompt, response in rows:
        a, op, b, c = re.fullmatch(r"(\d+)([+-])(\d+)=(\d+)\.", response).groups()
        assert prompt == f"{a}{op}{b}=?" and int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) >= 0


def test_direct_answers_avoid_the_eval_rl_and_val_problems():
    # one operation, one digit: 126 distinct problems, 120 of them taken by eval + rl + val
    task = SyntheticTaskConfig(num_train=0, num_val=40, num_rl=40, num_eval=40, min_ops=1, max_ops=1, max_digits=1)
    assert len(task_problems(task, ("eval", "rl", "val"))) == 120
    corpus = build_corpus(PretrainCorpusConfig(task=task, num_direct=4, num_val=2, fact_max_value=0))
    assert len(corpus["train"]) == 4 and len(corpus["val"]) == 2
    assert all(re.fullmatch(r"\\boxed\{\d+\}", r["response"]) for r in corpus["train"] + corpus["val"])
    with pytest.raises(ValueError, match="only 6 distinct direct-answer problems"):
        build_corpus(PretrainCorpusConfig(task=task, num_direct=5, num_val=2, fact_max_value=0))


def _pretrain(tmp_path, name):
    model = tmp_path / "model.json"
    model.write_text(json.dumps(dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=len(build_char_tokenizer()),
                                     max_position_embeddings=256, tie_word_embeddings=True)))
    export = tmp_path / f"{name}-base"
    sets = [f"run.name={name}", f"run.output_dir={tmp_path}", "run.progress=false", "run.device=cpu",
            f"model.config={model}", "corpus.num_direct=300", "corpus.num_val=20", "corpus.fact_max_value=9",
            "corpus.fact_repeats=2", "sft.steps=4", "sft.warmup_steps=0", "sft.global_batch_size=8", "sft.val_every=4", "sft.checkpoint_every=0",
            "run.log_every=1",
            f"export_dir={export}"]
    assert cli_main(["pretrain", str(ROOT / "configs" / "pretrain-tiny.yaml"), *[a for s in sets for a in ("--set", s)]]) == 0
    return export


def test_pretrain_command_is_reproducible_and_exports_a_loadable_base(tmp_path):
    from engine.models import build_model

    a, b = _pretrain(tmp_path, "a"), _pretrain(tmp_path, "b")
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    rows = (tmp_path / "a" / "data" / "train.jsonl").read_text().splitlines()
    assert len(rows) == 300 + 2 * len(facts(9))  # 300 direct answers (20 more held out) and two copies of each fact
    model = build_model(path=str(a), seed=0)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in wa.values())
    # trained, not the seeded init exported: every tensor moved, and the training loss fell
    init = build_model(config=str(tmp_path / "model.json"), seed=0).state_dict()
    moved = [k for k in wa if not torch.equal(wa[k], init[k].to(wa[k].dtype))]
    assert moved == list(wa), sorted(set(wa) - set(moved))
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "train/loss" in r]
    assert len(losses) == 4 and losses[-1] < losses[0], losses


@pytest.mark.skipif(os.environ.get("CEILING_REBUILD_BASE") != "1",
                    reason="opt-in (4-8 min on 2 cores): CEILING_REBUILD_BASE=1 pytest tests/test_pretrain.py -k rebuilds")
def test_the_pretrain_config_rebuilds_the_shipped_base(tmp_path):
    """`ceiling pretrain configs/pretrain-tiny.yaml` rebuilds configs/models/tiny-base: a base as good on the
    held-out corpus (validation loss within 0.02 nats/token; measured 0.244 rebuilt vs 0.253 shipped). Not bit
    for bit: the base was exported before AdamW went fused on CPU, and 400 steps carry a rounding difference in
    the update into other weights (80% relative difference), as any change of kernel or thread count would."""
    from dataclasses import replace

    from engine.config import DataConfig, ModelConfig, PretrainJobConfig, SFTJobConfig, load_config
    from engine.distributed import destroy_distributed
    from engine.sft.trainer import SFTTrainer

    export = tmp_path / "tiny-base"
    sets = [f"run.output_dir={tmp_path}", "run.progress=false", f"export_dir={export}"]
    assert cli_main(["pretrain", str(ROOT / "configs" / "pretrain-tiny.yaml"), *[a for s in sets for a in ("--set", s)]]) == 0
    built, shipped = load_file(export / "model.safetensors"), load_file(ROOT / "configs/models/tiny-base/model.safetensors")
    assert built.keys() == shipped.keys() and all(built[k].shape == shipped[k].shape for k in built)
    job = load_config(ROOT / "configs" / "pretrain-tiny.yaml", PretrainJobConfig)
    data = tmp_path / job.run.name / "data"
    losses = {}
    for name, path in (("built", export), ("shipped", ROOT / "configs/models/tiny-base")):
        val_job = SFTJobConfig(run=replace(job.run, output_dir=str(tmp_path / "val"), name=name, progress=False),
                               model=ModelConfig(path=str(path), tokenizer="char"),
                               data=DataConfig(train_path=str(data / "train.jsonl"), val_path=str(data / "val.jsonl"),
                                               max_seq_len=job.max_seq_len), sft=job.sft)
        try:
            losses[name] = SFTTrainer(val_job).validate()
        finally:
            destroy_distributed()
    assert abs(losses["built"] - losses["shipped"]) < 0.02, losses


def test_the_shipped_base_solves_part_of_the_task(tmp_path):
    """configs/models/tiny-base, as `ceiling pretrain configs/pretrain-tiny.yaml` wrote it: some correct direct
    answers at T=0.7 (the sweep measures it on the whole eval split), far from what SFT reaches."""
    from engine.config import EvalConfig, PretrainJobConfig, load_config
    from engine.data.synthetic import generate_task, write_jsonl
    from engine.data.tokenizer import load_tokenizer
    from engine.evaluate import Benchmark, evaluate
    from engine.models import build_model
    job = load_config(ROOT / "configs" / "pretrain-tiny.yaml", PretrainJobConfig)
    base = ROOT / job.export_dir
    assert json.loads((base / "config.json").read_text())["hidden_size"] == 128
    path = write_jsonl(generate_task(job.corpus.task)["eval"][:80], tmp_path / "eval.jsonl")
    from engine.rollout.hf import HFRollout

    tokenizer = load_tokenizer("char")
    rollout = HFRollout(build_model(path=str(base), seed=0), tokenizer, "cpu")
    result = evaluate(rollout, [Benchmark.load("eval", path, tokenizer)], EvalConfig(samples=2, max_new_tokens=24), seed=0)
    assert 2.0 <= result.scores["eval"] <= 35.0, result.scores
