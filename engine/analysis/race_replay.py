"""A finished scene replayed as a sweep that runs its branches side by side under the comparing rule.

The replay walks `slices` equal steps of compute up to the scene's longest plan. At each decision point every
branch whose last decision was "continue" runs its evaluations up to that compute; a branch that the
per-branch rule settled inside the slice is cut back to the evaluation where it settled (the trainer stops
it there); then `race.decide` rules on all the curves seen so far. A branch's plan is the branch as released.

Reported per branch: the compute used (its last evaluation run) of its plan and why it ended (the last
decision), how often it was stopped as dominated and resumed. Per scene: the branch `race.pick` takes, the
gap of its full-branch A_post to the best full-branch A_post (right when <= `tolerance`, 1 point), the error
of the A_post it reports against its own full-branch fit, and the compute saved, 1 - used / planned.

    from engine.analysis import load_scene
    from engine.analysis.race_replay import replay_race
    res = replay_race(load_scene("tests/data/retu/s1K.json"))
    res.picked, res.best, res.ok, res.saved, res.summary()

CLI: `ceiling fit DATA.json --early-stop` (`--per-branch` for the rule that sees one branch at a time).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.analysis.fit import FitError, fit_branch
from engine.analysis.race import CONTINUE, Decision, RaceConfig, decide, pick


@dataclass
class BranchRun:
    """One branch of a replayed race: how far it ran and why it ended there."""

    sft_step: int
    plan: float  # the branch's RL compute as released
    used: float  # compute of the last evaluation it ran
    points_used: int  # evaluations run, the start included
    points_total: int
    decision: Decision  # the last one
    stops: int  # times stopped as dominated
    resumes: int  # times it came back after such a stop
    a_post_full: float | None  # A_post of the full-branch fit (the reference)

    @property
    def saved(self) -> float:
        return 1.0 - self.used / self.plan if self.plan > 0 else 0.0

    def to_dict(self) -> dict:
        return {"sft_step": self.sft_step, "plan": self.plan, "used": self.used, "saved": self.saved,
                "points_used": self.points_used, "points_total": self.points_total, "stops": self.stops,
                "resumes": self.resumes, "A_post_full": self.a_post_full} | self.decision.to_dict()


@dataclass
class RaceResult:
    """A scene replayed with its branches side by side, and the branch it picks against the full sweep's."""

    scene: str
    config: RaceConfig
    slices: int
    rows: list[BranchRun]
    picked: int | None
    best: int | None  # the branch with the best full-branch A_post
    tolerance: float  # a pick within this many points of the best counts as right
    trace: list[tuple[float, dict[int, str]]] = field(default_factory=list)  # (compute, {step: why}) per point

    def _row(self, step) -> BranchRun | None:
        return next((r for r in self.rows if r.sft_step == step), None)

    @property
    def picked_full(self) -> float | None:
        return None if self._row(self.picked) is None else self._row(self.picked).a_post_full

    @property
    def best_full(self) -> float | None:
        return None if self._row(self.best) is None else self._row(self.best).a_post_full

    @property
    def gap(self) -> float | None:
        """Points by which the picked branch's full A_post lies below the best one's (0: the same branch)."""
        if self.picked_full is None or self.best_full is None:
            return None
        return self.best_full - self.picked_full

    @property
    def ok(self) -> bool:
        return self.gap is not None and self.gap <= self.tolerance

    @property
    def error(self) -> float | None:
        """|A_post reported for the picked branch - its full-branch A_post|."""
        row = self._row(self.picked)
        if row is None or row.decision.a_post is None or row.a_post_full is None:
            return None
        return abs(row.decision.a_post - row.a_post_full)

    @property
    def used(self) -> float:
        return sum(r.used for r in self.rows)

    @property
    def planned(self) -> float:
        return sum(r.plan for r in self.rows)

    @property
    def saved(self) -> float:
        return 1.0 - self.used / self.planned if self.planned > 0 else 0.0

    def summary(self) -> str:
        if self.picked is None or self.best is None:
            return f"{self.scene}: no branch picked (no branch has an identified ceiling)."
        d = self._row(self.picked).decision
        verdict = "the same branch" if self.picked == self.best else (
            f"{self.gap:.2f} points below it: " + ("within tolerance" if self.ok else "WRONG"))
        return (f"{self.scene}: picks SFT step {self.picked} (A_post {d.a_post:.2f} +- {d.se:.2f}, full "
                f"{self.picked_full:.2f}); the full sweep's best is step {self.best} ({self.best_full:.2f}): "
                f"{verdict}; {100 * self.saved:.1f}% of the RL compute saved ({self.used:.4g} of {self.planned:.4g}).")

    def to_dict(self) -> dict:
        c = self.config
        return {"scene": self.scene, "k": c.k, "min_se": c.min_se, "margin": c.margin,
                "min_fraction": c.min_fraction, "slices": self.slices, "picked": self.picked, "best": self.best,
                "picked_full": self.picked_full, "best_full": self.best_full, "gap": self.gap, "ok": self.ok,
                "error": self.error, "used": self.used, "planned": self.planned, "saved": self.saved,
                "branches": [r.to_dict() for r in self.rows]}


def replay_race(scene, config: RaceConfig | None = None, slices: int = 20,
                reference: dict[int, float | None] | None = None, tolerance: float = 1.0) -> RaceResult:
    """Replay a finished `data.Scene` under `race.decide` (see the module docstring). `reference` maps SFT
    step -> full-branch A_post (default: `fit_branch` of each branch; the noise benchmark passes the
    noiseless one)."""
    cfg = config or RaceConfig()
    if slices < 1:
        raise FitError(f"--slices must be >= 1, got {slices}")
    names = {str(s): s for s in scene.steps}
    curves = {b: np.column_stack([scene.branch(s).x, scene.branch(s).p_sft + scene.branch(s).y])
              for b, s in names.items()}
    plans = {b: float(c[-1, 0]) for b, c in curves.items()}
    seen = dict.fromkeys(names, 1)  # evaluations run; the start is free
    stops, resumes = dict.fromkeys(names, 0), dict.fromkeys(names, 0)

    def rule():
        return decide({b: curves[b][: seen[b]] for b in names}, plans, cfg)

    decisions = rule()
    trace = [(0.0, {names[b]: d.why for b, d in decisions.items()})]
    top = max(plans.values())
    for j in range(1, slices + 1):
        until = top * j / slices
        for b in names:
            if decisions[b].action == CONTINUE:
                seen[b] = max(seen[b], int(np.searchsorted(curves[b][:, 0], until, side="right")))
        new = rule()
        cut = {b: d.settled_at + 1 for b, d in new.items() if d.settled_at is not None and d.settled_at + 1 < seen[b]}
        if cut:  # the trainer stops a branch at the evaluation where it settled, not at the end of the slice
            seen.update(cut)
            new = rule()
        for b in names:
            stops[b] += decisions[b].why != "dominated" and new[b].why == "dominated"
            resumes[b] += decisions[b].why == "dominated" and new[b].action == CONTINUE
        decisions = new
        trace.append((until, {names[b]: d.why for b, d in decisions.items()}))
        if all(d.action != CONTINUE for d in decisions.values()):
            break
    if reference is None:
        reference = {s: _full_a_post(scene.branch(s), cfg) for s in scene.steps}
    rows = [BranchRun(s, plans[b], float(curves[b][seen[b] - 1, 0]), seen[b], len(curves[b]), decisions[b],
                      stops[b], resumes[b], reference.get(s)) for b, s in names.items()]
    full = {s: v for s, v in reference.items() if v is not None and math.isfinite(v)}
    chosen = pick(decisions, cfg.max_se)
    return RaceResult(scene.name, cfg, slices, rows, None if chosen is None else names[chosen],
                      max(full, key=full.get) if full else None, tolerance, trace)


def _full_a_post(branch, cfg: RaceConfig) -> float | None:
    try:
        return fit_branch(branch, cfg.fit).A_post
    except FitError:
        return None


def race_markdown(res: RaceResult, title: str | None = None, compute_unit: str = "EFLOPs") -> str:
    """The replay as a table (one row per branch: compute used, why it ended, A_post, the reference) and the
    scene's verdict."""
    lines = [f"### {title}", ""] if title else []
    lines += [f"| SFT step | {compute_unit} used/plan | saved | ended | A_post +- SE (seen) | A_post full | "
              "stopped/resumed | why |", "| ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in res.rows:
        d = r.decision
        est = "-" if d.a_post is None else f"{d.a_post:.2f} +- {d.se:.2f}" if d.se is not None and \
            math.isfinite(d.se) else f"{d.a_post:.2f}"
        full = "-" if r.a_post_full is None else f"{r.a_post_full:.2f}"
        mark = " (picked)" if r.sft_step == res.picked else ""
        lines.append(f"| {r.sft_step}{mark} | {r.used:.1f}/{r.plan:.1f} | {100 * r.saved:.1f}% | {d.action}: {d.why} "
                     f"| {est} | {full} | {r.stops}/{r.resumes} | {d.reason} |")
    err = "" if res.error is None else f" Error of the picked branch's A_post vs. its full fit: {res.error:.2f}."
    return "\n".join(lines) + "\n\n" + res.summary() + err + "\n"
