"""Crash anywhere, then resume: seeded SIGKILLs of real `ceiling sft` / `ceiling rl` processes, a second process
on a locked run, and reward workers killed mid-run.

Each run is `engine.cli.main([...])` in a process forked from a forkserver that has already imported the
engine (a fresh interpreter would spend most of the time importing torch and transformers); the process is
killed with SIGKILL, from outside at a seeded random moment (mid-step, mid-validation, mid-checkpoint) or
from inside at a chosen point of the checkpoint write. After every kill:
  - the newest checkpoint that verifies is the one the resumed run starts from,
  - at most `checkpoint_every` logged steps are lost,
  - the resumed run finishes and its losses equal an uninterrupted run's, bit for bit (CPU).
The cases tried are printed (`pytest -s`) and asserted.
"""

import json
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from engine.data.tokenizer import build_char_tokenizer
from engine.rundir.checkpoint import verify_checkpoint

pytestmark = pytest.mark.slow

SEED = 20261129
EVERY = 2  # checkpoint interval of both runs (steps)
SFT_STEPS, RL_STEPS = 6, 4


def _child(argv: list[str], log_path: str, inject: tuple[str, int] | None) -> None:
    """Runs in the forked process: `ceiling ARGV` with stdout/stderr to `log_path`, optionally killing itself
    (SIGKILL) at the n-th call of a checkpoint-writing function."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(name, None)  # an earlier in-process test's rendezvous port must not be shared
    import torch

    torch.set_num_threads(1)
    from engine import cli
    from engine.rundir import checkpoint

    if inject is not None:
        name, n = inject
        owner = checkpoint._ChecksumStream if name == "_ChecksumStream.write" else checkpoint
        attr = name.split(".")[-1]
        real, calls = getattr(owner, attr), [0]

        def deadly(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(owner, attr, deadly)
    code = cli.main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@pytest.fixture(scope="module")
def forkserver():
    """A forkserver with the engine imported, started without TRITON_INTERPRET (the CPU torch loss path)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["engine.cli", "engine.sft.trainer", "engine.rl.trainer", "engine.reward",
                                "engine.pipeline", "engine.sweep.cli", "engine.evaluate", "engine.analysis.cli"])
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        warm = ctx.Process(target=os.getpid)
        warm.start()
        warm.join()
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    return ctx


class Run:
    """One `ceiling` process; `log` is its stdout+stderr."""

    def __init__(self, ctx, argv, log: Path, inject=None):
        self.log = log
        log.write_text("")  # a kill may come before the child opens it
        self.proc = ctx.Process(target=_child, args=(argv, str(log), inject))
        self.proc.start()

    def wait(self, timeout=120) -> int:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, f"still running after {timeout}s: {self.log.read_text()[-2000:]}"
        return self.proc.exitcode

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _model_json(tmp: Path) -> str:
    path = tmp / "model.json"
    path.write_text(json.dumps(dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=len(build_char_tokenizer()),
                                    max_position_embeddings=512, tie_word_embeddings=True)))
    return str(path)


def sft_config(tmp: Path) -> Path:
    path = tmp / "sft.yaml"
    path.write_text(f"""
run: {{name: sft, output_dir: {tmp / 'runs'}, device: cpu, progress: false, log_every: 1}}
model: {{config: {_model_json(tmp)}, tokenizer: char}}
data:
  synthetic: {{num_train: 32, num_val: 4, num_rl: 0, num_eval: 0}}
  max_seq_len: 192
sft: {{steps: {SFT_STEPS}, global_batch_size: 4, micro_batch_tokens: 800, lr: 3.0e-3, warmup_steps: 1, val_every: 3,
      checkpoint_every: {EVERY}, keep_checkpoints: 2, export_hf: false}}
""")
    return path


def rl_config(tmp: Path, reward_workers: int = 0, steps: int = RL_STEPS) -> Path:
    path = tmp / "rl.yaml"
    path.write_text(f"""
run: {{name: rl, output_dir: {tmp / 'runs'}, device: cpu, progress: false, log_every: 1}}
model: {{config: {_model_json(tmp)}, tokenizer: char}}
data:
  synthetic: {{num_train: 8, num_val: 4, num_rl: 32, num_eval: 4, max_digits: 1, seed: 3}}
rl: {{algorithm: luffy, steps: {steps}, train_batch: 2, gen_batch: 2, n_samples: 2, n_expert: 1, max_gen_rounds: 1,
     max_prompt_len: 96, max_new_tokens: 8, micro_batch_tokens: 512, lr: 1.0e-3, eval_every: 0,
     checkpoint_every: {EVERY}, keep_checkpoints: 2}}
reward: {{workers: {reward_workers}}}
""")
    return path


def metrics(run_dir: Path) -> dict[int, dict]:
    """The last record logged for each step (a resumed run logs the steps after its checkpoint again)."""
    out: dict[int, dict] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["step"], {}).update(rec)
    return out


def _numbers(recs: dict[int, dict], keys: tuple[str, ...]) -> dict[int, tuple]:
    return {s: tuple(r.get(k) for k in keys) for s, r in recs.items() if s > 0}


def newest_verified(ckpt_root: Path) -> int:
    for path in sorted(ckpt_root.glob("step_????????"), reverse=True):
        if path.is_dir() and not verify_checkpoint(path):
            return int(path.name[5:])
    return 0


def _kill_at_random(run: Run, run_dir: Path, rng: random.Random, steps: int, step_s: float) -> str:
    """SIGKILL once step `s` (seeded) is logged plus a seeded fraction of a step; returns what happened."""
    target = rng.randint(1, steps - 1)
    delay = rng.random() * step_s
    deadline = time.monotonic() + 120
    while run.proc.is_alive() and time.monotonic() < deadline:
        if max(metrics(run_dir), default=0) >= target:
            time.sleep(delay)
            break
        time.sleep(0.002)
    if not run.proc.is_alive():
        run.wait()
        return f"finished before the kill at step {target}"
    os.kill(run.proc.pid, signal.SIGKILL)
    run.wait()
    return f"killed {delay * 1000:.0f} ms after step {target}"


def _crash(ctx, argv, run_dir: Path, log: Path, how, rng, steps, step_s) -> tuple[str, int]:
    """One run killed as `how` says; checks what is left and returns (what happened, newest good checkpoint)."""
    if how == "random":
        run = Run(ctx, argv, log)
        what = _kill_at_random(run, run_dir, rng, steps, step_s)
    else:
        run = Run(ctx, argv, log, inject=how)
        code = run.wait()
        what = f"killed itself at call {how[1]} of {how[0]}"
        assert code == -signal.SIGKILL, f"{how}: the injected kill never fired (exit {code}): {run.output[-3000:]}"
    done = max(metrics(run_dir), default=0)
    ckpt = newest_verified(run_dir / "checkpoints")
    assert done - ckpt <= EVERY, f"{what}: {done} steps logged but the newest good checkpoint is step {ckpt}"
    return what, ckpt


def _check_resumed(what: str, out: str, ckpt: int, killed: bool = True) -> None:
    """The run after a crash starts from the newest checkpoint that verifies, taking over the dead run's lock."""
    if ckpt:
        assert re.search(rf"resumed (RL )?from \S*step_{ckpt:08d}", out), f"{what}: expected step {ckpt}:\n{out}"
    else:
        assert "resumed" not in out, f"{what}: no checkpoint was complete, yet:\n{out}"
    if killed:
        assert "taking over a stale run lock" in out, f"{what}: the dead run's lock was not taken over:\n{out}"


def _finish(ctx, argv, run_dir: Path, log: Path, what: str, ckpt: int, keys, reference) -> None:
    resumed = Run(ctx, argv, log)
    assert resumed.wait() == 0, f"{what}: resume failed:\n{resumed.output[-4000:]}"
    _check_resumed(what, resumed.output, ckpt, killed="finished" not in what)
    assert _numbers(metrics(run_dir), keys) == reference, f"{what}: resumed run differs from the uninterrupted one"


# Points inside the checkpoint write (function, n-th call): mid-shard of the first save; the second save's
# trainer_state.json (its shards written, no manifest yet); after the second save renamed `step_N.tmp` to
# `step_N` but before `latest` moved.
SAVE_POINTS = [("_ChecksumStream.write", 3), ("_write_file", 6), ("_replace", 4)]


def _reference(ctx, tmp: Path, argv, run_dir: Path, keys, steps: int) -> tuple[dict, float]:
    t0 = time.monotonic()
    run = Run(ctx, argv, tmp / "reference.log")
    assert run.wait() == 0, run.output[-4000:]
    ref = _numbers(metrics(run_dir), keys)
    assert sorted(ref) == list(range(1, steps + 1)) and all(v[0] is not None for v in ref.values())
    return ref, (time.monotonic() - t0) / steps


def _campaign(ctx, tmp_path, config_fn, command, keys, steps, save_points, n_random) -> list[str]:
    """An uninterrupted run; each save point killed once, then resumed to the end; then one run killed
    `n_random` times in a row at seeded moments (a kill may land in the resume itself), then finished."""
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    reference, step_s = _reference(ctx, ref_dir, [command, str(config_fn(ref_dir))], ref_dir / "runs" / command,
                                   keys, steps)
    rng = random.Random(f"{SEED}-{command}")
    report = []
    for i, how in enumerate(save_points):
        tmp = tmp_path / f"point{i}"
        tmp.mkdir()
        argv, run_dir = [command, str(config_fn(tmp))], tmp / "runs" / command
        what, ckpt = _crash(ctx, argv, run_dir, tmp / "crash.log", how, rng, steps, step_s)
        _finish(ctx, argv, run_dir, tmp / "resume.log", what, ckpt, keys, reference)
        report.append(f"{what}; resumed from step {ckpt}")
    tmp = tmp_path / "chain"
    tmp.mkdir()
    argv, run_dir = [command, str(config_fn(tmp))], tmp / "runs" / command
    previous = None
    for k in range(n_random):
        log = tmp / f"crash{k}.log"
        what, ckpt = _crash(ctx, argv, run_dir, log, "random", rng, steps, step_s)
        resumed = re.search(r"resumed (RL )?from \S*step_(\d{8})", log.read_text(errors="replace"))
        if previous is not None and resumed:  # (a kill may come before the resume got that far)
            assert int(resumed.group(2)) == previous[1], f"after {previous[0]}: {resumed.group(0)}"
        previous = (what, ckpt)
        report.append(f"{what}; newest good checkpoint: step {ckpt}")
    _finish(ctx, argv, run_dir, tmp / "resume.log", previous[0], previous[1], keys, reference)
    print(f"\n{command}: {len(report)} crash cases tried, {len(report)} passed (final losses equal the "
          "uninterrupted run's):\n  " + "\n  ".join(report))
    return report


def test_sft_killed_anywhere_resumes_exactly(forkserver, tmp_path):
    report = _campaign(forkserver, tmp_path, sft_config, "sft", ("train/loss", "train/grad_norm", "val/loss"),
                       SFT_STEPS, SAVE_POINTS, n_random=3)
    assert len(report) == len(SAVE_POINTS) + 3


def test_rl_killed_anywhere_resumes_exactly(forkserver, tmp_path):
    report = _campaign(forkserver, tmp_path, rl_config, "rl", ("train/loss", "rollout/reward_mean"), RL_STEPS,
                       SAVE_POINTS[-1:], n_random=2)
    assert len(report) == 1 + 2


def test_second_process_on_a_running_run_is_refused(forkserver, tmp_path):
    config = sft_config(tmp_path)
    config.write_text(config.read_text().replace(f"steps: {SFT_STEPS},", "steps: 100000,"))
    first = Run(forkserver, ["sft", str(config)], tmp_path / "first.log")
    try:
        lock = tmp_path / "runs" / "sft" / "run.lock"
        deadline = time.monotonic() + 60
        while not lock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        second = Run(forkserver, ["sft", str(config)], tmp_path / "second.log")
        assert second.wait() == 2
        last = second.output.strip().splitlines()[-1]
        assert re.fullmatch(rf"error: \S+/runs/sft is in use by pid {first.proc.pid} on this host .*", last), last
        assert "Traceback" not in second.output
    finally:
        first.proc.kill()
        first.wait()


def _worker_pids(pid: int) -> list[int]:
    """Spawned reward workers among the children of `pid`."""
    kids = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the run has just ended
        return []
    for task in tasks:
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    workers = []
    for kid in kids:
        try:
            cmd = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            workers.append(kid)
    return workers


def test_reward_worker_killed_mid_run_the_run_goes_on(forkserver, tmp_path):
    """SIGKILL the reward worker at seeded moments during an RL run, two steps apart (so the rebuilt pool survives
    its rescore): every batch is rescored, and the run finishes with every step logged and the same outcomes,
    rewards and losses as a run in which nothing was killed (a lost chunk scored 0 as an error would show as
    fewer unparsed answers)."""
    steps = 6
    run = Run(forkserver, ["rl", str(rl_config(tmp_path, reward_workers=1, steps=steps))], tmp_path / "rl.log")
    rng, kills, deadline = random.Random(SEED), 0, time.monotonic() + 150
    log_path, killed_at = tmp_path / "runs" / "rl" / "metrics.jsonl", -2

    def logged() -> int:
        return len(log_path.read_text().splitlines()) if log_path.is_file() else 0

    while run.proc.is_alive() and time.monotonic() < deadline:
        workers = _worker_pids(run.proc.pid)
        if workers and logged() >= killed_at + 2:
            time.sleep(rng.random() * 0.3)
            try:
                os.kill(workers[0], signal.SIGKILL)
                # counted after the kill: steps logged during the sleep must not let the next kill land in this
                # kill's rescore (a tiny step can be shorter than the sleep)
                kills, killed_at = kills + 1, logged()
            except ProcessLookupError:
                pass
            while run.proc.is_alive() and workers[0] in _worker_pids(run.proc.pid):
                time.sleep(0.01)
        time.sleep(0.01)
    assert run.wait() == 0, run.output[-4000:]
    print(f"\nreward workers killed during the RL run: {kills}")
    assert kills >= 2
    assert "are rescored in a new pool" in run.output and "scored 0 as errors" not in run.output
    recs = metrics(tmp_path / "runs" / "rl")
    assert sorted(s for s in recs if s > 0) == list(range(1, steps + 1))
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = Run(forkserver, ["rl", str(rl_config(ref_dir, reward_workers=0, steps=steps))], ref_dir / "rl.log")
    assert ref.wait() == 0, ref.output[-4000:]
    want = metrics(ref_dir / "runs" / "rl")
    for key in ("rollout/reward_mean", "rollout/unparsed", "train/loss"):
        assert [recs[s][key] for s in range(1, steps + 1)] == [want[s][key] for s in range(1, steps + 1)], key


def test_reward_worker_killed_between_batches_is_rescored():
    """A worker that died while idle breaks the pool; the next batch is rescored in a new pool, not lost."""
    from engine import reward

    responses, answers = ["\\boxed{7}", "\\boxed{3}", "\\boxed{12}", "x"], ["7", "4", "12", "1"]
    try:
        expected = reward.score_responses(responses, answers, num_workers=1)
        os.kill(next(iter(reward._pools[1]._processes)), signal.SIGKILL)
        time.sleep(0.5)  # the pool notices the dead worker and marks itself broken
        assert reward.score_responses(responses, answers, num_workers=1) == expected
        assert expected[1].num_correct == 2 and expected[1].num_errors == 0
    finally:
        reward.shutdown_pools()
