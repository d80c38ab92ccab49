"""SFT end to end on CPU: learning, run-directory contents, exact resume, 1 vs 2 ranks, NaN guard, HF export."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from engine.config import DataConfig, ModelConfig, RunConfig, SFTConfig, SFTJobConfig
from engine.data.synthetic import SyntheticTaskConfig
from engine.data.tokenizer import build_char_tokenizer
from engine.distributed import destroy_distributed
from engine.rundir.metrics import read_metrics
from engine.sft.trainer import SFTTrainer, run_sft
from engine.training import NonFiniteError


def model_config(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "model.json"
    vocab = len(build_char_tokenizer())
    path.write_text(json.dumps(dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                    max_position_embeddings=512, tie_word_embeddings=True)))
    return str(path)


def job(tmp_path, name="t", **sft):
    base = dict(steps=6, global_batch_size=8, micro_batch_tokens=300, lr=3e-3, warmup_steps=1, val_every=2,
                checkpoint_every=3, export_hf=False)
    base.update(sft)
    return SFTJobConfig(
        run=RunConfig(name=name, output_dir=str(tmp_path / "runs"), progress=False, device="cpu"),
        model=ModelConfig(config=model_config(tmp_path), tokenizer="char"),
        data=DataConfig(synthetic=SyntheticTaskConfig(num_train=64, num_val=16, num_rl=0, num_eval=0), max_seq_len=192),
        sft=SFTConfig(**base),
    )


def losses_by_step(run_dir):
    out = {}
    for rec in read_metrics(run_dir / "metrics.jsonl"):
        if rec.get("train/loss") is not None:
            out[rec["step"]] = rec["train/loss"]  # a resumed run re-logs steps after the checkpoint: last wins
    return out


pytestmark = pytest.mark.usefixtures("trainer_env")  # tests/conftest.py


def test_sft_learns_and_writes_run_dir(tmp_path):
    trainer = SFTTrainer(job(tmp_path, steps=30, val_every=10, checkpoint_every=10, export_hf=True, lr=5e-3))
    summary = trainer.fit()
    run_dir = tmp_path / "runs" / "t"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "data" / "train.jsonl").is_file()
    records = read_metrics(run_dir / "metrics.jsonl")
    val = [r for r in records if "val/loss" in r]
    assert [r["step"] for r in val] == [10, 20, 30]
    assert val[-1]["val/loss"] < val[0]["val/loss"] < 5.0
    assert all(r["val/subphase"] in ("Adaptive", "Stable", "Mild", "Severe") for r in val)
    train = [r for r in records if "train/loss" in r]
    for key in ("train/grad_norm", "train/lr", "perf/tokens_per_s", "perf/mfu", "compute/exaflops"):
        assert key in train[-1], key
    assert train[-1]["compute/exaflops"] > train[0]["compute/exaflops"] > 0
    assert summary["best"]["step"] == 30
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000030"
    assert json.loads((run_dir / "sft_summary.json").read_text())["steps"] == 30

    # HF export round-trip: plain transformers loads it and gives the trained model's logits
    from transformers import AutoModelForCausalLM

    from engine.data.tokenizer import load_tokenizer

    hf = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    tok = load_tokenizer(run_dir / "hf")
    text = "Tom has 3 pens, buys 4 more."
    assert tok(text).input_ids == build_char_tokenizer()(text).input_ids  # whitespace survives the round trip
    ids = torch.tensor(tok.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False))
    with torch.no_grad():
        exported = hf(ids[None]).logits[0]
        trained = trainer.model(ids, torch.arange(len(ids)), torch.tensor([0, len(ids)], dtype=torch.int32),
                                len(ids), lambda h, w: h @ w.T)
    torch.testing.assert_close(exported, trained, atol=1e-4, rtol=1e-4)


def test_resume_is_exact(tmp_path):
    full = tmp_path / "full"
    run_sft(job(full))
    destroy_distributed()
    crashed = tmp_path / "crashed"
    assert run_sft(job(crashed), stop_after_step=4) == {"stopped_at": 4}  # dies after step 4; ckpt at 3
    destroy_distributed()
    run_sft(job(crashed))  # resumes from step 3 and replays 4..6
    a, b = losses_by_step(full / "runs" / "t"), losses_by_step(crashed / "runs" / "t")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert a == b  # bit-for-bit on CPU


def test_nan_guard_keeps_last_good_checkpoint(tmp_path):
    trainer = SFTTrainer(job(tmp_path, steps=4, checkpoint_every=2, val_every=0))
    trainer.fit(stop_after_step=2)

    def blow_up(module, args, output):  # a numerical blow-up in the forward of step 3
        hidden = output[0] if isinstance(output, tuple) else output
        return hidden * float("nan")

    trainer.model.layers[0].register_forward_hook(blow_up)
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3: .*sample ids") as exc:
        trainer.fit()
    assert "step_00000002" in str(exc.value)
    ckpt = tmp_path / "runs" / "t" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000002"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tmp_path, steps, stop_after):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        run_sft(job(tmp_path, steps=steps), stop_after_step=stop_after)
    finally:
        destroy_distributed()


def _run_world(world, tmp_path, steps=6, stop_after=None):
    mp.start_processes(_worker, args=(world, _free_port(), tmp_path, steps, stop_after), nprocs=world,
                       start_method="spawn")


@pytest.mark.slow
def test_two_ranks_match_one_rank_and_reshard_on_resume(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _run_world(1, one)
    _run_world(2, two, stop_after=4)  # 2 ranks, checkpoint at step 3 ...
    _run_world(1, two)  # ... resumed on 1 rank: DCP reshards the FSDP2 state
    a, b = losses_by_step(one / "runs" / "t"), losses_by_step(two / "runs" / "t")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_fsdp_options_keep_the_losses(tmp_path):
    """Selective AC (every 2nd layer), no reshard after forward, a reduce-scatter per micro-batch: same run."""
    from engine.config import FSDPConfig
    def losses(name, **fsdp):
        cfg = job(tmp_path, name=name, steps=2, val_every=0, checkpoint_every=0, micro_batch_tokens=200)
        cfg.fsdp = FSDPConfig(**fsdp)
        cfg.model.activation_checkpointing = bool(fsdp)
        trainer = SFTTrainer(cfg)
        out = [trainer.train_step() for _ in range(2)]
        layers = [type(layer).__name__ for layer in trainer.model.layers]
        destroy_distributed()
        assert all(r["train/micro_batches"] > 1 for r in out)  # gradient accumulation is exercised
        return [float(r["train/loss"]) for r in out], layers

    base, plain = losses("base")
    tuned, wrapped = losses("tuned", reshard_after_forward=False, activation_checkpointing_every=2,
                            reduce_scatter_every_micro_batch=True)
    assert tuned == pytest.approx(base, rel=1e-6, abs=1e-7)
    assert "CheckpointWrapper" not in plain[0] and "CheckpointWrapper" in wrapped[0]
    assert "CheckpointWrapper" not in wrapped[1]  # every 2nd layer only
    with pytest.raises(ValueError, match="activation_checkpointing_every must be >= 1"):
        FSDPConfig(activation_checkpointing_every=0)


def test_until_severe_stops_once_over_fitting_is_seen_and_resumes_to_the_same_end(tmp_path):
    import dataclasses

    from engine.config import DataConfig

    def overfitting_job():  # 16 training rows at a high LR: the val loss turns up within ~80 steps
        j = job(tmp_path, steps=300, val_every=4, checkpoint_every=40, lr=2e-2, warmup_steps=2, until="severe")
        return dataclasses.replace(j, data=DataConfig(synthetic=SyntheticTaskConfig(
            num_train=16, num_val=32, num_rl=0, num_eval=0), max_seq_len=192))

    summary = SFTTrainer(overfitting_job()).fit()
    stop, history = summary["stopped"], summary["val_history"]
    assert stop and summary["steps"] == stop["step"] < 300 and stop["reason"].startswith("Severe sub-phase reached")
    from engine.analysis.phases import classify_subphases, subphase_reached

    losses = [h["val_loss"] for h in history]
    assert classify_subphases(losses)[-2:] == ["Severe", "Severe"]
    assert all(subphase_reached(losses[:i], "Severe") is None for i in range(1, len(losses)))  # the first time
    assert min(history, key=lambda h: h["val_loss"])["val_loss"] * 1.1 <= history[-1]["val_loss"]
    assert (tmp_path / "runs" / "t" / "checkpoints" / "latest").read_text() == f"step_{stop['step']:08d}"
    destroy_distributed()
    again = SFTTrainer(overfitting_job()).fit()  # a finished run is not trained further
    assert again["steps"] == summary["steps"] and again["stopped"] == stop


def test_until_needs_validations():
    with pytest.raises(ValueError, match="sft.until='severe' needs validations"):
        SFTConfig(until="severe", val_every=0)
