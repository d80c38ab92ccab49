"""`sweep.early_stop: compare` (engine/sweep/race.py): a scene's RL branches in slices, the comparing rule between
rounds, the branch records and the compute table; then a real two-worker sweep through it."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import SceneSpec, dump_config
from engine.sweep.items import Sweep
from engine.sweep.race import slice_steps
from engine.sweep.report import compute_table
from tests.test_sweep import tiny_sweep

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("trainer_env")  # tests/conftest.py

STEPS, EF_PER_STEP = 12, 1e-7


def race_sweep(tmp_path, **sweep):
    cfg = tiny_sweep(tmp_path, **({"early_stop": "compare", "branches": 2, "race_slices": 4, "race_k": 1.0,
                                   "race_min_points": 5, "scenes": [SceneSpec(pure_rl=False, baselines=False)],
                                   "patience": 3, "min_points": 6, "min_fraction": 0.9}
                                  | sweep))
    cfg.rl.steps, cfg.rl.eval_every = STEPS, 1
    return Sweep(cfg)


def score(branch: int, step: int) -> float:
    """pass@1 in [0, 1] of a branch after `step` RL steps: branch 4 plateaus near 12%, branch 8 rises to 60%."""
    top, mid = (0.07, 1.5) if branch == 4 else (0.55, 3.0)
    return 0.05 + top / (1 + math.exp(-(step - mid)))


def run_slice(sweep: Sweep, name: str, upto: int) -> None:
    """What a slice item records (`Sweep.run_rl`), for a branch whose evaluations follow `score`."""
    branch = int(name.split("/")[2])
    history = [{"step": s, "rl_exaflops": s * EF_PER_STEP, "pass@1": score(branch, s)} for s in range(upto + 1)]
    sweep.rundir.publish_done(name, {"rl": {"algorithm": "dapo_dc", "init_step": branch, "dir": f"rl_{branch}",
                                            "steps": upto, "planned_steps": STEPS, "exaflops": upto * EF_PER_STEP,
                                            "stopped": None, "budget": None, "eval_history": history,
                                            "rollout_backend": "hf"}})


def test_slices_are_listed_round_by_round_and_a_beaten_branch_stops(tmp_path):
    sweep = race_sweep(tmp_path)
    history = [{"step": s, "val_loss": 1 / s, "exaflops": s * 1e-8} for s in (4, 8)]
    sweep.rundir.publish_done("default/sft", {"sft": {"steps": 8, "exaflops": 8e-8, "best": history[1],
                                                      "val_history": history}, "branches": [4, 8]})
    sweep.rundir.publish_done("default/sft_eval", {"sft_pass1": {"0": 1.0, "4": 5.0, "8": 5.0}, "n_eval": 8})
    assert slice_steps(STEPS, 1, 4) == 3 and slice_steps(10, 4, 4) == 4  # whole evaluations per slice

    rounds = 0
    while True:
        items = {i.name: i for i in sweep.items()}
        ready = [n for n, i in items.items() if not sweep.rundir.is_done(n) and all(map(sweep.rundir.is_done, i.deps))]
        slices = [n for n in ready if re.fullmatch(r"default/rl/\d+/r\d+", n)]
        if not slices:
            break
        rounds += 1
        assert {n.rsplit("/", 1)[1] for n in slices} == {f"r{rounds}"}  # one round at a time
        for name in slices:
            b, r = int(name.split("/")[2]), int(name.rsplit("r", 1)[1])
            target = sweep.race("default").slice_target(b, r)
            assert "to step" in items[name].note and target <= STEPS
            run_slice(sweep, name, target)
    # the branch records wait on nothing now: the race is over
    assert all(sweep.rundir.is_done(d) for d in items["default/rl/4"].deps)
    for b in (4, 8):
        sweep.rundir.publish_done(f"default/rl/{b}", sweep.run_item(f"default/rl/{b}"))

    state = sweep.state()
    st = state["scenes"]["default"]
    loser, winner = st["rl"]["rl/4"], st["rl"]["rl/8"]
    assert winner["steps"] == STEPS and winner["stopped"] is None and winner["race"]["why"] in ("plan", "settled")
    assert loser["steps"] < STEPS and "dominated" in loser["stopped"]["reason"], loser["race"]
    assert st["race"]["picked"] == "8" and st["race"]["rounds"][0] == [4, 8] and 4 not in st["race"]["rounds"][-1]
    assert state["done"] == ["default/sft", "default/sft_eval", "default/rl/4", "default/rl/8"]  # slices folded in

    table = compute_table(sweep.job, state)
    rows = {r.split("|")[1].strip(): r.split("|") for r in table.splitlines()[2:]}
    spent = {k: float(v[3]) for k, v in rows.items() if k != "default/sft_eval"}
    full = {k: float(v[4]) for k, v in rows.items() if k != "default/sft_eval"}
    assert spent["**total**"] == pytest.approx(sum(v for k, v in spent.items() if k != "**total**"), rel=1e-3)
    assert full["default/rl/4"] == pytest.approx(STEPS * EF_PER_STEP * 1e9, rel=1e-3)  # extrapolated to the plan
    assert spent["default/rl/4"] < full["default/rl/4"] and spent["default/rl/8"] == full["default/rl/8"]


def test_a_slice_outside_the_race_is_refused(tmp_path):
    sweep = race_sweep(tmp_path)
    history = [{"step": 4, "val_loss": 0.5, "exaflops": 4e-8}]
    sweep.rundir.publish_done("default/sft", {"sft": {"steps": 4, "exaflops": 4e-8, "best": history[0],
                                                      "val_history": history}, "branches": [4]})
    with pytest.raises(ValueError, match="not in the race"):
        sweep.race("default").slice_target(4, 2)
    with pytest.raises(RuntimeError, match="not over"):
        sweep.race("default").branch_record(4)


SCRIPTED_EVAL = """
# Loaded by every process of the test's sweep (PYTHONPATH): an RL evaluation returns tests/test_sweep_race.py's
# `score` for its branch, the earlier of the scene's two SFT checkpoints playing branch 4 (the loser), so that
# one branch loses clearly. Training, rollouts, checkpoints, slices and workers are the real ones.
import json
import math

from engine.rl.rollouts import EvalOutcome
from engine.rl.trainer import RLTrainer


def _scripted(self, samples=None):
    scene = self.run_dir.parent
    branches = json.loads((scene.parent / "items" / scene.name / "sft.done.json").read_text())["branches"]
    top, mid = (0.07, 1.5) if int(self.run_dir.name.rsplit("_", 1)[1]) == min(branches) else (0.55, 3.0)
    return EvalOutcome({"pass@1": 0.05 + top / (1 + math.exp(-(self.step - mid)))})


RLTrainer.evaluate = _scripted
"""


@pytest.mark.slow
def test_two_workers_race_a_clear_loser_out(tmp_path):
    """The real path: two `ceiling sweep --worker` processes run the slices as child processes, each resuming its
    branch from the last slice's checkpoint. The evaluations are scripted (SCRIPTED_EVAL, `score`) so that the
    earlier SFT checkpoint loses clearly: it is stopped as dominated before its plan, the winner runs to its
    end, every evaluation is recorded once (resumed, not redone) and the report's compute table adds up."""
    sweep = race_sweep(tmp_path)
    config = tmp_path / "sweep.yaml"
    dump_config(sweep.job, config)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SCRIPTED_EVAL)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(hook), str(ROOT)])}
    cmd = [sys.executable, "-m", "engine.cli", "sweep", str(config), "--worker", "--heartbeat", "1",
           "--stale-after", "20", "--poll", "0.5"]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
               for _ in range(2)]
    outs = [w.communicate(timeout=900)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n\n".join(o[-4000:] for o in outs)
    state = Sweep(sweep.job).state()
    st = state["scenes"]["default"]
    loser, winner = (st["rl"][f"rl/{b}"] for b in sorted(st["branches"]))
    assert len(st["branches"]) == 2
    for run in (loser, winner):
        assert [h["step"] for h in run["eval_history"]] == list(range(run["steps"] + 1))  # resumed, not redone
    assert winner["steps"] == STEPS and winner["stopped"] is None, winner["race"]
    assert loser["steps"] < STEPS and "dominated" in loser["stopped"]["reason"], loser["race"]
    assert st["race"]["picked"] == str(max(st["branches"]))
    slices = sorted((sweep.root / "items" / "default" / "rl").rglob("r*.done.json"))
    assert len(slices) == sum(len(r) for r in st["race"]["rounds"])  # each slice ran once
    report = (sweep.root / "sweep_report.md").read_text()
    assert "Branches compared while they ran" in report and "slices on" in report
    table = compute_table(sweep.job, state)
    rows = {r.split("|")[1].strip(): r.split("|") for r in table.splitlines()[2:]}
    spent = {k: float(v[3]) for k, v in rows.items() if k != "default/sft_eval"}
    full = {k: float(v[4]) for k, v in rows.items() if k != "default/sft_eval"}
    assert spent["**total**"] == pytest.approx(sum(v for k, v in spent.items() if k != "**total**"), rel=1e-3)
    lose, win = (f"default/rl/{b}" for b in sorted(st["branches"]))
    assert spent[lose] < full[lose] and spent[win] == pytest.approx(full[win], rel=1e-3)


def test_a_branch_stopped_and_needed_again_resumes_with_its_next_slice(tmp_path, monkeypatch):
    """The comparing rule may bring a stopped branch back (the leader's lower bound fell below its frozen upper
    bound): it gets a slice in that later round, which continues from where it stopped (the plan's next slice).
    The decisions are scripted here; the rule itself is tested in tests/test_analysis_race.py."""
    from engine.analysis.race import Decision
    from engine.sweep import race as race_mod

    script = {1: {"4": "continue", "8": "continue"}, 2: {"4": "stop", "8": "continue"},
              3: {"4": "continue", "8": "continue"}}

    def scripted(curves, plans, config):
        n = len(curves["8"]) - 1  # evaluations of the leader so far = its steps (eval_every 1)
        rnd = n // 3
        return {b: Decision(script.get(rnd, {}).get(b, "done"), "scripted", "scripted", None, None, False, 1.0)
                for b in curves}

    monkeypatch.setattr(race_mod, "decide", scripted)
    sweep = race_sweep(tmp_path)
    history = [{"step": s, "val_loss": 1 / s, "exaflops": s * 1e-8} for s in (4, 8)]
    sweep.rundir.publish_done("default/sft", {"sft": {"steps": 8, "exaflops": 8e-8, "best": history[1],
                                                      "val_history": history}, "branches": [4, 8]})
    race = sweep.race("default")
    for r in range(1, 5):
        rounds, final = race.rounds()
        assert final is None and len(rounds) == r
        for b in rounds[-1]:
            run_slice(sweep, race.slice_name(b, r), race.slice_target(b, r))
    rounds, final = race.rounds()
    assert rounds == [[4, 8], [4, 8], [8], [4, 8]] and final is not None
    assert race.slice_target(4, 4) == 9 and race.slice_target(8, 4) == 12  # branch 4's third slice: steps 7-9
    assert race.branch_record(4)["rl"]["race"]["slices"] == 3
