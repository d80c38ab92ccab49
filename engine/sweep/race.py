"""`sweep.early_stop: compare`: a scene's RL branches run side by side in slices, and between slices the
comparing rule (engine/analysis/race.py, the same `decide` the replay `ceiling fit --early-stop` uses) stops
the branches that cannot win.

Items of a scene with branches b (SFT steps), round r = 1, 2, ...:
    <scene>/rl/<b>/r<r>   branch b's next slice: RL from its last checkpoint to `slices run x slice_steps`
                          steps of the whole plan (the LR schedule is the plan's), ending on an evaluation;
                          after every slice of round r-1 (the decision between the rounds needs them all)
    <scene>/rl/<b>        the branch's record (what the report reads): once the race is over, from its last
                          slice and the final decision (why it stopped, or that its plan ended)
Which slices round r holds is decided from the done records of round r-1 alone, so every worker that lists the
plan computes the same items; nothing but the records is shared. A branch stopped at one round and needed again
later (the leader's lower bound fell below its frozen upper bound) gets a slice in that later round and resumes
from its checkpoint (`RLTrainer.fit(pause_at=...)`); a branch that settled or ran its plan is done for good.
"""

from __future__ import annotations

import math
from dataclasses import replace

from engine.analysis.early_stop import EarlyStopConfig
from engine.analysis.race import CONTINUE, RaceConfig, decide, pick
from engine.sweep.worker import Item


def per_branch_rule(sweep) -> EarlyStopConfig:
    """The per-branch rule of the `sweep:` section: the tuned defaults of its mode ('compare': the comparing
    rule's, whose floor is higher; else EarlyStopConfig's), with the fields the section sets."""
    base = RaceConfig().per_branch if sweep.early_stop == "compare" else EarlyStopConfig()
    given = {"tol": sweep.tol, "patience": sweep.patience, "min_points": sweep.min_points,
             "min_fraction": sweep.min_fraction}
    return replace(base, **{k: v for k, v in given.items() if v is not None})


def race_config(sweep) -> RaceConfig:
    """The comparing rule from the `sweep:` section: its tuned defaults, with what the section sets."""
    given = {"k": sweep.race_k, "margin": sweep.race_margin, "min_points": sweep.race_min_points}
    return replace(RaceConfig(), per_branch=per_branch_rule(sweep), **{k: v for k, v in given.items() if v is not None})


def slice_steps(steps: int, eval_every: int, slices: int) -> int:
    """Steps per slice: a multiple of `eval_every` (each slice ends on an evaluation), `slices` of them or more."""
    every = max(eval_every, 1)
    return every * max(1, math.ceil(steps / slices / every))


GIGA_PER_EXA = 1e9  # the rule's reasons quote compute in GFLOPs, as the sweep report does


def curve(rl: dict) -> list[tuple[float, float]]:
    """A branch's evaluations so far as (RL GFLOPs, pass@1 in points): what `decide` reads."""
    return [(h["rl_exaflops"] * GIGA_PER_EXA, 100.0 * h["pass@1"]) for h in rl["eval_history"]]


def planned_gflops(rl: dict, steps: int) -> float:
    """The compute of the whole plan, at the branch's own GFLOPs per step so far."""
    return rl["exaflops"] * GIGA_PER_EXA * steps / max(rl["steps"], 1)


class Race:
    """The race of one scene over the sweep's records (`record(name) -> dict | None`)."""

    def __init__(self, scene: str, branches: list[int], record, steps: int, eval_every: int, sweep):
        self.scene, self.branches, self.record = scene, branches, record
        self.steps, self.config = steps, race_config(sweep)
        self.slice_steps = slice_steps(steps, eval_every, sweep.race_slices)

    def slice_name(self, b: int, r: int) -> str:
        return f"{self.scene}/rl/{b}/r{r}"

    def rounds(self) -> tuple[list[list[int]], dict | None]:
        """The branches of each round listed so far, and the decisions after the last round when the race is
        over (None while a round is running)."""
        rounds, running = [], list(self.branches)
        while True:
            rounds.append(running)
            recs = {b: self.record(self.slice_name(b, len(rounds))) for b in running}
            if any(rec is None for rec in recs.values()):
                return rounds, None
            decisions = self.decide(len(rounds))
            running = [b for b in self.branches if decisions[str(b)].action == CONTINUE]
            if not running:
                return rounds, decisions

    def last_record(self, b: int, upto: int) -> dict:
        """Branch b's latest slice record in rounds 1..upto."""
        for r in range(upto, 0, -1):
            rec = self.record(self.slice_name(b, r))
            if rec is not None:
                return rec["rl"]
        raise KeyError(f"{self.scene}/rl/{b}: no slice done")

    def decide(self, round_: int) -> dict:
        """The rule's decisions after round `round_`, from every branch's evaluations so far (a stopped branch's
        curve stays as it was)."""
        runs = {b: self.last_record(b, round_) for b in self.branches}
        curves = {str(b): curve(rl) for b, rl in runs.items()}
        plans = {str(b): planned_gflops(rl, self.steps) for b, rl in runs.items()}
        return decide(curves, plans, self.config)  # a branch at the end of its plan is "done" (x >= plan)

    def items(self, after: tuple[str, ...], note: str) -> list[Item]:
        """The slices listed so far and each branch's record item."""
        rounds, final = self.rounds()
        items, prev = [], after
        for r, running in enumerate(rounds, start=1):
            names = [self.slice_name(b, r) for b in running]
            items += [Item(n, prev, f"{note}: slice {r}, to step {self.pause_at(rounds, b, r)}")
                      for b, n in zip(running, names)]
            prev = tuple(names)
        listed = tuple(i.name for i in items)
        # While the race runs, a branch's record waits on the next round, which is not listed yet.
        wait = listed if final is not None else listed + (f"{self.scene}/race/r{len(rounds) + 1}",)
        items += [Item(f"{self.scene}/rl/{b}", wait, f"{note}: its record once the race is over")
                  for b in self.branches]
        return items

    def pause_at(self, rounds: list[list[int]], b: int, r: int) -> int:
        """Where branch b's slice of round r ends: its slices so far (this one included) x slice_steps."""
        return min(self.steps, sum(b in running for running in rounds[:r]) * self.slice_steps)

    def slice_target(self, b: int, r: int) -> int:
        rounds, _ = self.rounds()
        if r > len(rounds) or b not in rounds[r - 1]:
            raise ValueError(f"{self.slice_name(b, r)} is not in the race (see --plan)")
        return self.pause_at(rounds, b, r)

    def branch_record(self, b: int) -> dict:
        """The record of `<scene>/rl/<b>` once the race is over: the last slice's run, why it ended."""
        rounds, final = self.rounds()
        if final is None:
            raise RuntimeError(f"{self.scene}: the race is not over")
        rl = dict(self.last_record(b, len(rounds)))
        d = final[str(b)]
        if rl["steps"] < self.steps and not rl.get("stopped"):
            rl["stopped"] = {"step": rl["steps"], "reason": d.reason}
        rl["planned_steps"] = self.steps
        rl["race"] = {**d.to_dict(), "slices": sum(b in running for running in rounds)}
        return {"rl": rl}

    def summary(self) -> dict | None:
        """The race as the report shows it (None while it runs): rounds, final decisions, the branch picked."""
        rounds, final = self.rounds()
        if final is None:
            return None
        return {"rounds": rounds, "slice_steps": self.slice_steps, "picked": pick(final),
                "decisions": {b: d.to_dict() for b, d in final.items()}}
