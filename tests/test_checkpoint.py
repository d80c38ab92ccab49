"""Checkpoints: manifest and checksums, fsync before every rename, verification and fallback on resume,
a dangling `latest`, a full disk during a save, and the run-directory lock.

The first three failures of issue #16 each have a test here that fails on the code before it:
a truncated shard (was a raw EOFError), a dangling `latest` (was a silent restart from step 0) and the
missing fsyncs (files and directories were never fsynced before the renames).
"""

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from engine.errors import CheckpointError
from engine.rundir import checkpoint as ckpt
from engine.rundir.checkpoint import latest_checkpoint, resume_latest, save_checkpoint, verify_checkpoint
from engine.rundir.run_lock import RunLockError, acquire_run_lock, release_run_lock

ROOT = Path(__file__).resolve().parents[1]


def _state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (step + 1))
    return model, opt, sched


def _train(model, opt, sched, steps=1):
    for _ in range(steps):
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def two_checkpoints(tmp_path):
    """step_1 and step_2 under tmp/ckpt, and the weights each holds."""
    model, opt, sched = _state(0)
    weights = {}
    for step in (1, 2):
        _train(model, opt, sched)
        save_checkpoint(tmp_path / "ckpt", step, model, opt, sched, {"data_position": 8 * step})
        weights[step] = _weights(model)
    return tmp_path / "ckpt", weights


def test_manifest_lists_every_file_with_size_and_crc(two_checkpoints):
    root, _ = two_checkpoints
    path = root / "step_00000002"
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk == [".metadata", "__0_0.distcp", "extra.pt", "trainer_state.json"]
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "crc32": zlib.crc32(data)}, name
    assert verify_checkpoint(path) == []
    assert (root / "latest").read_text() == "step_00000002"
    assert not list(root.glob("*.tmp"))


def test_files_and_directories_are_fsynced_before_the_renames(tmp_path, monkeypatch):
    """Fails on the old code: it fsynced neither its own files nor any directory."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(Path(src).resolve()), str(Path(dst).resolve())))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    model, opt, sched = _state(0)
    root = (tmp_path / "ckpt").resolve()
    save_checkpoint(root, 3, model, opt, sched, {})
    tmp, final = str(root / "step_00000003.tmp"), str(root / "step_00000003")
    publish = events.index(("replace", tmp, final))
    synced_before = {path for kind, path, *_ in events[:publish] if kind == "fsync"}
    for name in (".metadata.tmp", "__0_0.distcp", "extra.pt", "trainer_state.json", "manifest.json"):
        assert f"{tmp}/{name}" in synced_before, name  # DCP writes `.metadata.tmp`, fsyncs, renames it
    assert tmp in synced_before  # the directory entries of the files
    latest = events.index(("replace", str(root / "latest.tmp"), str(root / "latest")))
    assert publish < latest
    between = [path for kind, path, *_ in events[publish:latest] if kind == "fsync"]
    assert str(root) in between and str(root / "latest.tmp") in between  # the rename, then the pointer's contents
    assert events[-1] == ("fsync", str(root))  # the pointer's rename


def test_truncated_shard_falls_back_to_the_previous_checkpoint(two_checkpoints, caplog):
    """Fails on the old code: a raw EOFError from torch's unpickler, and nothing named the file."""
    root, weights = two_checkpoints
    with open(root / "step_00000002" / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)
    model, opt, sched = _state(1)
    with caplog.at_level(logging.WARNING, logger="ceiling"):
        state = resume_latest(root, model, opt, sched)
    assert state["step"] == 1 and state["data_position"] == 8
    for k, v in _weights(model).items():
        torch.testing.assert_close(v, weights[1][k], rtol=0, atol=0)
    assert "__0_0.distcp: 1000 bytes, the manifest says" in caplog.text
    assert (root / "step_00000002.bad").is_dir() and not (root / "step_00000002").exists()
    assert (root / "latest").read_text() == "step_00000001"


def test_bit_flip_is_caught_by_the_checksum_and_stop_policy_stops(two_checkpoints):
    root, _ = two_checkpoints
    shard = root / "step_00000002" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    assert verify_checkpoint(shard.parent) == ["__0_0.distcp: crc32 mismatch (the contents changed after the write)"]
    with pytest.raises(CheckpointError, match=r"step_00000002 is damaged: __0_0.distcp: crc32 mismatch.*"
                                              r"run.on_bad_checkpoint=fallback"):
        resume_latest(root, *_state(1), on_bad="stop")
    assert (root / "step_00000002").is_dir()  # stop leaves everything where it was


def test_dangling_latest_falls_back_never_to_step_0(two_checkpoints, caplog):
    """Fails on the old code: a `latest` naming a missing directory restarted training from step 0."""
    root, weights = two_checkpoints
    shutil.rmtree(root / "step_00000002")
    model, opt, sched = _state(1)
    with caplog.at_level(logging.WARNING, logger="ceiling"):
        state = resume_latest(root, model, opt, sched)
    assert state["step"] == 1
    assert "latest names step_00000002, which does not exist" in caplog.text
    with pytest.raises(CheckpointError, match="names step_00000002, which does not exist"):
        (root / "latest").write_text("step_00000002")
        resume_latest(root, *_state(1), on_bad="stop")
    shutil.rmtree(root / "step_00000001")
    with pytest.raises(CheckpointError, match=r"no checkpoint under .* verifies.*Refusing to start again from step 0"):
        resume_latest(root, *_state(1))


def test_damaged_manifest_and_missing_file_are_named(two_checkpoints):
    root, _ = two_checkpoints
    (root / "step_00000001" / "extra.pt").unlink()
    assert verify_checkpoint(root / "step_00000001") == ["extra.pt: missing"]
    (root / "step_00000002" / "manifest.json").write_text('{"files": {"x": {"size": "big"}}}')
    assert "manifest.json: unreadable" in verify_checkpoint(root / "step_00000002")[0]
    with pytest.raises(CheckpointError, match=r"step_00000002 is damaged: manifest.json: unreadable.*"
                                              r"step_00000001 is damaged: extra.pt: missing"):
        resume_latest(root, *_state(1))


class _WritesMarker:
    """Unpickling it calls open(marker, "w"): code chosen by whoever wrote the file, run by whoever loads it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_extra_pt_is_refused_and_never_run(two_checkpoints, tmp_path, caplog):
    """Fails on the code before issue #21: extra.pt was read with torch.load(weights_only=False), so a file
    planted in a shared run directory ran its code in every process that resumed from it."""
    root, weights = two_checkpoints
    path = root / "step_00000002"
    marker = tmp_path / "code-ran"
    real = torch.load(path / "extra.pt", weights_only=True)
    torch.save({"scheduler": real["scheduler"], "rng": real["rng"], "payload": _WritesMarker(marker)},
               path / "extra.pt")
    data = (path / "extra.pt").read_bytes()  # whoever can write the file can rewrite the manifest too
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["extra.pt"] = {"size": len(data), "crc32": zlib.crc32(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert verify_checkpoint(path) == []
    model, opt, sched = _state(1)
    untouched = _weights(model)
    with pytest.raises(CheckpointError, match=r"extra.pt: refused: it names \S*open, which unpickling would call"):
        ckpt.load_checkpoint(path, model, opt, sched)
    assert not marker.exists()
    for k, v in _weights(model).items():  # refused before anything was loaded
        assert torch.equal(v, untouched[k])
    with caplog.at_level(logging.WARNING, logger="ceiling"):
        state = resume_latest(root, model, opt, sched)  # the planted checkpoint is set aside, step 1 resumes
    assert state["step"] == 1 and not marker.exists() and "extra.pt: refused" in caplog.text
    for k, v in _weights(model).items():
        torch.testing.assert_close(v, weights[1][k], rtol=0, atol=0)
    torch.load(root / "step_00000002.bad" / "extra.pt", weights_only=False)  # the old read: the payload runs
    assert marker.exists()


def test_resume_restores_scheduler_and_rng_exactly(tmp_path):
    model, opt, sched = _state(0)
    _train(model, opt, sched, steps=3)
    save_checkpoint(tmp_path / "ckpt", 3, model, opt, sched, {})
    lr, epoch = sched.get_last_lr(), sched.last_epoch
    next_draw = torch.rand(5)
    model2, opt2, sched2 = _state(7)
    torch.manual_seed(123)
    assert resume_latest(tmp_path / "ckpt", model2, opt2, sched2)["step"] == 3
    assert sched2.get_last_lr() == lr and sched2.last_epoch == epoch
    assert torch.equal(torch.rand(5), next_draw)
    for k, v in _weights(model2).items():
        torch.testing.assert_close(v, _weights(model)[k], rtol=0, atol=0)


def test_interrupted_write_is_ignored_and_removed(two_checkpoints):
    root, _ = two_checkpoints
    (root / "step_00000003.tmp").mkdir()
    (root / "step_00000003.tmp" / "__0_0.distcp").write_bytes(b"partial")
    state = resume_latest(root, *_state(1))
    assert state["step"] == 2 and not (root / "step_00000003.tmp").exists()


def test_fresh_run_has_nothing_to_resume(tmp_path):
    assert resume_latest(tmp_path / "none", *_state(0)) is None
    (tmp_path / "empty").mkdir()
    assert resume_latest(tmp_path / "empty", *_state(0)) is None


class _BudgetFile:
    """A file whose writes fail with ENOSPC once the disk's byte budget is spent."""

    def __init__(self, raw, disk):
        self.raw, self.disk = raw, disk

    def write(self, data):
        n = memoryview(data).nbytes
        if n > self.disk.left:
            self.disk.left = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.left -= n
        return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()


class _FullDisk:
    """Below the checkpoint's real write paths (DCP's shard streams and engine.rundir.checkpoint's own `open`), writes
    fail with ENOSPC once `budget` bytes are used."""

    def __init__(self, monkeypatch, budget: int):
        self.left = budget
        real_init = ckpt._ChecksumStream.__init__

        def init(stream, raw, entry, errors):
            real_init(stream, _BudgetFile(raw, self), entry, errors)

        monkeypatch.setattr(ckpt._ChecksumStream, "__init__", init)
        monkeypatch.setattr(ckpt, "open", lambda *a, **k: _BudgetFile(open(*a, **k), self), raising=False)


@pytest.mark.parametrize("budget", [0, 2000, 35_000, 10**9 - 1])
def test_full_disk_during_save_keeps_the_previous_checkpoint(two_checkpoints, monkeypatch, budget):
    root, weights = two_checkpoints
    model, opt, sched = _state(2)
    needed = sum(e["size"] for e in json.loads((root / "step_00000002" / "manifest.json").read_text())
                 ["files"].values())
    if budget == 10**9 - 1:
        budget = needed - 10  # everything but the pointer `latest`
    _FullDisk(monkeypatch, budget)
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step_00000003: No space left on device.*"
                                              r"the previous checkpoint .*step_00000002 is intact"):
        save_checkpoint(root, 3, model, opt, sched, {})
    assert not (root / "step_00000003.tmp").exists()  # the partial write is removed (space freed)
    assert (root / "latest").read_text() in ("step_00000002", "step_00000003")
    monkeypatch.undo()
    for step in (1, 2):
        assert verify_checkpoint(root / f"step_{step:08d}") == []
    state = resume_latest(root, *_state(3))
    assert state["step"] in (2, 3)  # 3 only when it was fully published before `latest` failed
    if state["step"] == 2:
        assert latest_checkpoint(root).name == "step_00000002"


def test_disk_full_through_the_cli_is_one_error_line(tmp_path, monkeypatch, capsys):
    """The CLI turns the CheckpointError into `error: ...` and exit status 2 (no traceback)."""
    from engine import cli

    def run(job):
        model, opt, sched = _state(0)
        save_checkpoint(tmp_path / "ckpt", 1, model, opt, sched, {})

    monkeypatch.setattr("engine.sft.trainer.run_sft", run)
    _FullDisk(monkeypatch, 100)
    assert cli.main(["sft", str(ROOT / "configs" / "sft-tiny.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot write checkpoint") and "No space left on device" in err[-1]
    assert "Traceback" not in "\n".join(err)


# ---------------------------------------------------------------- the run-directory lock

_LOCK_SCRIPT = "import sys; from engine.rundir.run_lock import acquire_run_lock; acquire_run_lock(sys.argv[1]); print('got it')"


def _lock_in_subprocess(run_dir):
    return subprocess.run([sys.executable, "-c", _LOCK_SCRIPT, str(run_dir)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_second_process_is_refused_with_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    acquire_run_lock(run_dir)
    try:
        acquire_run_lock(run_dir)  # the same process again: fine (the pipeline runs trainers in one process)
        holder = json.loads((run_dir / "run.lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        out = _lock_in_subprocess(run_dir)
        assert out.returncode != 0 and "RunLockError" in out.stderr
        assert f"is in use by pid {os.getpid()} on this host" in out.stderr
    finally:
        release_run_lock(run_dir)
    assert not (run_dir / "run.lock").exists()
    assert _lock_in_subprocess(run_dir).stdout.strip() == "got it"  # released at its exit
    assert not (run_dir / "run.lock").exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    host = socket.gethostname()
    (run_dir / "run.lock").write_text(json.dumps({"host": host, "pid": dead.pid, "start": "1", "since": "x"}))
    with caplog.at_level(logging.WARNING, logger="ceiling"):
        acquire_run_lock(run_dir)
    try:
        assert f"taking over a stale run lock (pid {dead.pid} on {host}, which is no longer running)" in caplog.text
        assert json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        release_run_lock(run_dir)


def test_reused_pid_and_other_host(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / "run.lock"
    # our own pid, but a process start time that is not ours: the pid was reused, the holder is gone
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "-1", "since": "x"}))
    acquire_run_lock(run_dir)
    release_run_lock(run_dir)
    lock.write_text(json.dumps({"host": "node-7", "pid": 4242, "since": "2026-01-01 00:00:00"}))
    with pytest.raises(RunLockError, match=r"in use by pid 4242 on host node-7 .* remove .*run.lock"):
        acquire_run_lock(run_dir)


# ---------------------------------------------------------------- resume honours the saved data position


def test_resume_with_another_batch_size_continues_at_the_saved_data_position(tmp_path, trainer_env, caplog):
    """Fails on the old code: the data position was recomputed as step x the new batch size."""
    from engine.config import DataConfig, ModelConfig, RunConfig, SFTConfig, SFTJobConfig
    from engine.data.synthetic import SyntheticTaskConfig
    from engine.data.tokenizer import build_char_tokenizer
    from engine.distributed import destroy_distributed
    from engine.sft.trainer import SFTTrainer
    model = tmp_path / "model.json"
    model.write_text(json.dumps(dict(model_type="qwen2", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, vocab_size=len(build_char_tokenizer()),
                                     max_position_embeddings=256, tie_word_embeddings=True)))

    def job(batch):
        return SFTJobConfig(run=RunConfig(name="t", output_dir=str(tmp_path / "runs"), progress=False, device="cpu"),
                            model=ModelConfig(config=str(model), tokenizer="char"),
                            data=DataConfig(synthetic=SyntheticTaskConfig(num_train=32, num_val=4, num_rl=0, num_eval=0),
                                            max_seq_len=160),
                            sft=SFTConfig(steps=4, global_batch_size=batch, micro_batch_tokens=2000, lr=1e-3,
                                          val_every=0, checkpoint_every=2, export_hf=False))

    assert SFTTrainer(job(8)).fit(stop_after_step=2) == {"stopped_at": 2}
    destroy_distributed()
    trainer = SFTTrainer(job(4))
    with caplog.at_level(logging.WARNING, logger="ceiling"):
        trainer.maybe_resume()
    assert trainer.step == 2 and trainer.state["data_position"] == 16  # 2 steps x 8 samples, not 2 x 4
    assert "global_batch_size=4 where the checkpoint used 8: the data continues at sample 16" in caplog.text
    trainer.train_step()
    assert trainer.state["data_position"] == 20
