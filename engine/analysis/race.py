"""Early stopping that compares the RL branches of a sweep: stop the branches that are clearly losing.

A sweep user needs the best branch and its ceiling, not every branch's ceiling. The per-branch rule
(engine/analysis/early_stop.py) stops a branch once its own predicted ceiling settles; this rule also stops a
branch as soon as its ceiling is confidently below the best branch's, and keeps the per-branch rule as one input.

The rule, at a decision point, from the curves seen so far (nothing else):

    every branch b: refit its points so far (anchor (0, 0) = the checkpoint's evaluation, all train points, the
        outlier rejection of `FitConfig`; `early_stop.refit_points`) -> A_b = A_post, s_b = its standard error
        from the fit's covariance (`findings.a_post_se`); effective error e_b = sqrt(s_b^2 + se_floor^2) (the
        covariance alone knows neither the evaluation noise a fit cannot see on a few points nor the sigmoid's
        misfit when a curve changes shape). b is identified when it has at least `min_points` points, the refit
        gives a ceiling (fit converged, C_mid <= 10x the compute seen) with a finite s_b, most of the rise is
        in the data (the fit at the last point has reached at least `min_rise` of its gain PL_rl: a branch
        still rising has only an extrapolated ceiling), and its RL gain is measurable: |PL_rl| = |A_b - P_sft|
        >= k e_b (not a flat start)
    optimistic ceiling U_b = A_b + k e_b, pessimistic ceiling L_b = A_b - k e_b
    leader: the identified branch with the highest L_b among the branches not stopped as dominated (running,
        settled or done with their plan)
    verdict of a running branch b, in this order:
      stop "plan"       its last point is at (or past) its planned compute
      stop "settled"    the per-branch rule (`early_stop.stable_at`, `CompareConfig.branch`) is stable at one of
                        its refits; its ceiling is the prediction at the first stable refit
      run  "leader"     b is the leader
      run  "not identified" / "too early"   no identified ceiling yet, or less than `min_fraction` of its plan
                        spent: a branch whose ceiling is not identified is never stopped for being behind
      stop "dominated"  U_b < L_leader and A_b < A_leader - margin
      run  "contender"  otherwise: within `margin` of the leader, or the bounds overlap
    a branch stopped at an earlier decision point (passed back in `stopped`) keeps its verdict.

Defaults (`CompareConfig()`): k 1, se_floor 1 point, margin 1 point, min_points 6, min_fraction 0, min_rise 0.8, and the
per-branch rule's defaults (tol 1, patience 3, min points 6, min fraction 0.55). They were tuned on the paper's
five released scenes with leave-one-scene-out (benchmarks/bench_early_stop.py, which also measures the rule
under evaluation noise; numbers in benchmarks/RESULTS.md).

A stopped branch is never resumed. Stopping is final by design: `decide_branches` returns a branch's earlier
stop verdict unchanged, so one bad refit of the leader later on cannot make a sweep restart a branch it has
already given up (and whose compute it would have to pay again to catch up). The replay lists, in
`RaceResult.revisit`, the dominated branches whose stop the final curves no longer support (their optimistic
ceiling at the stop is not below the picked branch's final pessimistic ceiling), for a user who wants to resume
one by hand.

How a live sweep calls it (`sweep.early_stop: compare`). Branches advance side by side in slices of compute:
slice j ends for a running branch when it has spent j x delta of RL compute (or its plan, if less) and has been
evaluated there. A decision point is the moment every running branch has ended slice j. There, call

    verdicts = decide_branches(curves, plans, config, stopped=previous_stops, cache=cache)

  curves          {branch_id: [(x, y), ...]}: every branch of the sweep, stopped or finished ones with the curve
                  they ended with; x = RL compute since the branch's checkpoint (any unit, the same for all
                  branches and plans), y = the evaluation (pass@1 in points, e.g. 100 x pass@1); the first point
                  is the checkpoint's own evaluation at x = 0 (P_sft), the others in compute order
  plans           {branch_id: planned RL compute of the branch}, same unit as x (a sweep that plans in steps passes
                  planned_steps x the compute per step measured so far)
  previous_stops  {branch_id: Verdict} of the branches already stopped (`{b: v for b, v in verdicts.items() if
                  v.stop}` from the previous decision point); `BranchRace` keeps it for you
  cache           one `early_stop.RefitCache` for the whole sweep, so each prefix is fitted once

then stop the branches whose verdict is `stop` (their compute is what they spent up to this decision point) and
run the others for one more slice. The rule is a pure function of these arguments: no point beyond a branch's
last evaluation can change a verdict. Every evaluation can be a decision point (delta -> 0), which is what the
replay does: `replay_race(scene)` interleaves the scene's branches by compute, as a sweep running them side by
side would, and makes a decision point at every evaluation of any branch; a branch stopped at decision point c
has used min(c, its plan) of compute. With `every=D` the decision points are the multiples of D instead.

    from engine.analysis.race import BranchRace, CompareConfig, replay_race
    race = BranchRace({"ckpt360": 220.0, "ckpt720": 230.0})      # planned compute per branch
    verdicts = race.decide({"ckpt360": [(0, 70.7), (3.1, 72.0), ...], "ckpt720": [(0, 73.3), ...]})
    verdicts["ckpt360"].stop, verdicts["ckpt360"].reason
    result = replay_race(load_scene("general.json"))               # the rule over a finished scene
    result.decision.ok, result.decision.saved, result.markdown()

CLI: `ceiling fit DATA.json --early-stop [--rule compare|branch] [--k K] [--se-floor S] [--margin M]
[--compare-min-points N] [--compare-min-fraction F]` plus the per-branch rule's flags.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.analysis.early_stop import (
    EarlyStopConfig,
    EarlyStopResult,
    Refit,
    RefitCache,
    SweepDecision,
    decide,
    stable_at,
)
from engine.analysis.fit import FitConfig, FitError

RUN, STOP = "run", "stop"
DOMINATED, SETTLED, PLAN = "dominated", "settled", "plan"
LEADER, CONTENDER, NOT_IDENTIFIED, TOO_EARLY = "leader", "contender", "not identified", "too early"


@dataclass(frozen=True)
class CompareConfig:
    """The comparing rule (see the module docstring); the CLI flags map onto these one to one."""

    k: float = 1.0
    """Width of the bounds, in effective standard errors: U = A_post + k e, L = A_post - k e."""
    se_floor: float = 1.0
    """Points combined in quadrature with the fit's standard error of A_post (evaluation noise, model misfit)."""
    margin: float = 1.0
    """A branch whose A_post is within this many points of the leader's is never stopped as dominated."""
    min_points: int = 6
    """Points (anchor included) before a branch's ceiling takes part in comparisons."""
    min_fraction: float = 0.0
    """No branch is stopped as dominated before it has spent this fraction of its plan."""
    min_rise: float = 0.8
    """A ceiling takes part in comparisons only once the fit has this share of its gain in the data (at the last
    point); 0.5 is the half-rise, x = C_mid."""
    branch: EarlyStopConfig | None = field(default_factory=EarlyStopConfig)
    """The per-branch rule that also stops a branch (its ceiling settled); None: only dominance and the plan."""
    fit: FitConfig = field(default_factory=FitConfig)
    """Options of every refit."""

    def __post_init__(self):
        if not (self.k >= 0 and math.isfinite(self.k)):
            raise FitError(f"--k must be a finite number >= 0, got {self.k}")
        if not (self.se_floor >= 0 and math.isfinite(self.se_floor)):
            raise FitError(f"--se-floor must be a finite number >= 0, got {self.se_floor}")
        if not self.margin >= 0:
            raise FitError(f"--margin must be >= 0, got {self.margin}")
        if self.min_points < 5:
            raise FitError(f"--compare-min-points must be >= 5 (a 3-parameter fit with a degree of freedom "
                           f"and the anchor), got {self.min_points}")
        if not 0 <= self.min_fraction <= 1:
            raise FitError(f"--compare-min-fraction must be in [0, 1], got {self.min_fraction}")
        if not 0 <= self.min_rise < 1:
            raise FitError(f"--min-rise must be in [0, 1), got {self.min_rise}")

    @property
    def refit_min_points(self) -> int:
        return min(self.min_points, self.branch.min_points) if self.branch else self.min_points


@dataclass(frozen=True)
class Verdict:
    """What a branch does after a decision point, and why (the numbers are the branch's state there)."""

    action: str  # RUN or STOP
    kind: str  # stop: DOMINATED, SETTLED, PLAN; run: LEADER, CONTENDER, NOT_IDENTIFIED, TOO_EARLY
    reason: str
    a_post: float | None = None  # the latest refit's A_post (None: no identified ceiling)
    se: float | None = None  # its effective standard error e (fit SE and se_floor combined)
    x: float = 0.0  # compute of the branch's last evaluation
    progress: float = 0.0  # x / plan
    n_points: int = 0  # points seen, anchor included
    estimate: float | None = None  # the ceiling a stop leaves: settled: the first stable prediction; else a_post

    @property
    def stop(self) -> bool:
        return self.action == STOP

    def to_dict(self) -> dict:
        f = _finite
        return {"action": self.action, "kind": self.kind, "reason": self.reason, "A_post": f(self.a_post),
                "se": f(self.se), "x": self.x, "progress": self.progress, "n_points": self.n_points,
                "estimate": f(self.estimate)}


@dataclass(frozen=True)
class _State:
    refits: list[Refit]
    x: float
    progress: float
    n: int
    a: float | None  # identified A_post for comparisons (None: not identified)
    e: float | None
    note: str  # why not identified
    settled: Refit | None  # the first stable refit of the per-branch rule


def _finite(v):
    return v if v is not None and math.isfinite(v) else None


def _state(bid, points, plan, config: CompareConfig, cache: RefitCache) -> _State:
    try:
        arr = np.asarray(points, dtype=float)
    except (TypeError, ValueError) as e:
        raise FitError(f"branch {bid!r}: points must be (x, y) pairs: {e}") from None
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) == 0:
        raise FitError(f"branch {bid!r}: points must be a non-empty list of (x, y) pairs, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise FitError(f"branch {bid!r}: a point is not finite")
    if arr[0, 0] != 0:
        raise FitError(f"branch {bid!r}: the first point must be the checkpoint's evaluation at x = 0, "
                       f"got x = {arr[0, 0]:g}")
    if np.any(np.diff(arr[:, 0]) < 0):
        raise FitError(f"branch {bid!r}: points are not in compute order")
    if plan is None or not (math.isfinite(plan) and plan > 0):
        raise FitError(f"branch {bid!r}: the plan (planned RL compute) must be a number > 0, got {plan}")
    p_sft = float(arr[0, 1])
    # Gains rounded as the scene loader rounds them (data.py), so a replay and a live sweep fit the same numbers.
    gains = np.column_stack([arr[:, 0], np.round(arr[:, 1] - p_sft, 10)])
    gains[0, 1] = 0.0
    min_refit = config.refit_min_points
    refits = []
    for n in range(1, len(gains) + 1):
        r = cache.refit(gains[:n], p_sft, config.fit, min_refit)
        refits.append(Refit(r.index, r.x, r.a_post, r.note, r.x / plan, r.se, r.rise))
    settled = None
    if config.branch is not None:
        settled = next((r for i, r in enumerate(refits) if stable_at(refits, i, config.branch)), None)
    last = refits[-1]
    a = e = None
    note = last.note
    if len(arr) < config.min_points:
        note = f"too few points for a comparison ({len(arr)} < {config.min_points})"
    elif last.a_post is not None and last.se is not None and math.isfinite(last.se):
        e = math.hypot(last.se, config.se_floor)
        if last.rise is not None and last.rise < config.min_rise:
            note = (f"still rising: {100 * last.rise:.0f}% of the fitted gain reached (comparisons from "
                    f"{100 * config.min_rise:.0f}%), the ceiling is an extrapolation")
            e = None
        elif abs(last.a_post - p_sft) < config.k * e:
            note = (f"no RL gain measurable yet (PL_rl {last.a_post - p_sft:.2f} within {config.k:g} x {e:.2f} of "
                    f"0: a flat start)")
            e = None
        else:
            a = last.a_post
    elif last.a_post is not None:
        note = "the fit's standard error of A_post is not finite"
    return _State(refits, last.x, last.x / plan, len(arr), a, e, note, settled)


def decide_branches(curves: Mapping[Hashable, Sequence[tuple[float, float]]], plans: Mapping[Hashable, float],
                    config: CompareConfig | None = None, stopped: Mapping[Hashable, Verdict] | None = None,
                    cache: RefitCache | None = None) -> dict[Hashable, Verdict]:
    """The verdict of every branch in `curves` at this decision point (see the module docstring)."""
    config = config or CompareConfig()
    cache = cache if cache is not None else RefitCache()
    stopped = {b: v for b, v in (stopped or {}).items() if v.stop}
    states = {b: _state(b, pts, plans.get(b), config, cache) for b, pts in curves.items()}
    out: dict[Hashable, Verdict] = {}

    def verdict(b, action, kind, reason, estimate=None):
        s = states[b]
        out[b] = Verdict(action, kind, reason, s.a, s.e, s.x, s.progress, s.n,
                         estimate if estimate is not None else s.a)

    for b, s in states.items():
        if b in stopped:
            out[b] = stopped[b]
        elif s.progress >= 1 - 1e-9:
            verdict(b, STOP, PLAN, f"ran its plan ({s.x:g} of {plans[b]:g})", s.refits[-1].a_post)
        elif s.settled is not None:
            r, cfg = s.settled, config.branch
            verdict(b, STOP, SETTLED, f"ceiling settled: A_post {r.a_post:.2f}, the last {cfg.patience} refits "
                    f"within tol {cfg.tol:g} at {100 * r.progress:.0f}% of the plan", r.a_post)
    pool = {b: s for b, s in states.items() if s.a is not None and not (b in out and out[b].kind == DOMINATED)}
    leader = max(pool, key=lambda b: pool[b].a - config.k * pool[b].e) if pool else None
    if leader is not None:
        lead = pool[leader]
        lower = lead.a - config.k * lead.e
    for b, s in states.items():
        if b in out:
            continue
        if b == leader:
            verdict(b, RUN, LEADER, f"leader: pessimistic ceiling {lower:.2f} (A_post {s.a:.2f} - "
                    f"{config.k:g} x {s.e:.2f})")
        elif s.a is None:
            verdict(b, RUN, NOT_IDENTIFIED, f"ceiling not identified yet: {s.note}")
        elif s.progress < config.min_fraction:
            verdict(b, RUN, TOO_EARLY, f"{100 * s.progress:.0f}% of the plan spent, comparisons from "
                    f"{100 * config.min_fraction:.0f}%")
        else:
            upper = s.a + config.k * s.e
            if upper < lower and s.a < lead.a - config.margin:
                verdict(b, STOP, DOMINATED, f"dominated by {leader}: optimistic ceiling {upper:.2f} (A_post "
                        f"{s.a:.2f} + {config.k:g} x {s.e:.2f}) < its pessimistic ceiling {lower:.2f} (A_post "
                        f"{lead.a:.2f} - {config.k:g} x {lead.e:.2f})")
            else:
                verdict(b, RUN, CONTENDER, f"contender: optimistic ceiling {upper:.2f} >= {leader}'s pessimistic "
                        f"ceiling {lower:.2f}" if upper >= lower else f"contender: A_post {s.a:.2f} within "
                        f"{config.margin:g} of {leader}'s {lead.a:.2f}")
    return out


class BranchRace:
    """`decide_branches` with its state kept for a live sweep: the plans, the stops so far and the refit cache."""

    def __init__(self, plans: Mapping[Hashable, float], config: CompareConfig | None = None):
        self.plans = dict(plans)
        self.config = config or CompareConfig()
        self.cache = RefitCache()
        self.verdicts: dict[Hashable, Verdict] = {}

    @property
    def stopped(self) -> dict[Hashable, Verdict]:
        return {b: v for b, v in self.verdicts.items() if v.stop}

    def decide(self, curves: Mapping[Hashable, Sequence[tuple[float, float]]]) -> dict[Hashable, Verdict]:
        self.verdicts = decide_branches(curves, self.plans, self.config, self.stopped, self.cache)
        return self.verdicts


@dataclass
class RaceResult:
    """A scene replayed under the comparing rule: per branch the compute used and why it stopped, and the pick."""

    scene: str
    config: CompareConfig
    results: list[EarlyStopResult]  # per branch, in SFT-step order (stop_kind / stop_reason say why it stopped)
    verdicts: dict[int, Verdict]  # the last verdict of each branch
    decision: SweepDecision
    decision_points: int
    revisit: list[int] = field(default_factory=list)  # dominated branches the final curves no longer rule out
    trace: list[tuple[float, dict[int, Verdict]]] = field(default_factory=list)  # (compute, verdicts) per point

    @property
    def saved(self) -> float:
        return self.decision.saved

    def picked_error(self) -> float | None:
        """|ceiling the stopped sweep reports for its pick - the full sweep's best A_post| (points)."""
        d = self.decision
        r = next((r for r in self.results if r.sft_step == d.picked), None)
        if r is None or d.best_full is None:
            return None
        estimate = r.a_post_stop if r.stopped else r.a_post_full
        return None if estimate is None else abs(estimate - d.best_full)

    def to_dict(self) -> dict:
        c = self.config
        return {"scene": self.scene, "rule": "compare",
                "config": {"k": c.k, "se_floor": c.se_floor, "margin": c.margin, "min_points": c.min_points,
                           "min_fraction": c.min_fraction,
                           "branch": None if c.branch is None else {
                               "tol": c.branch.tol, "patience": c.branch.patience, "min_points": c.branch.min_points,
                               "min_fraction": c.branch.min_fraction, "span": c.branch.span}},
                "decision": self.decision.to_dict() | {"picked_error": _finite(self.picked_error())},
                "decision_points": self.decision_points, "revisit": self.revisit,
                "branches": [r.to_dict() for r in self.results]}

    def markdown(self, title: str | None = None, compute_unit: str = "EFLOPs") -> str:
        def num(v):
            return "-" if v is None or not math.isfinite(v) else f"{v:.2f}"
        lines = [f"### {title}", ""] if title else []
        lines += [f"| SFT step | stopped by | points used/total | {compute_unit} used/total | compute saved | "
                  "ceiling at stop | A_post full | abs. error | why |", "|" + " ---: |" * 8 + " --- |"]
        for r in self.results:
            lines.append(f"| {r.sft_step} | {r.stop_kind} | {r.points_used}/{r.n_total} | {r.x_stop:.1f}/"
                         f"{r.x_total:.1f} | {100 * r.saved:.1f}% | {num(r.a_post_stop)} | {num(r.a_post_full)} | "
                         f"{num(r.error)} | {r.stop_reason} |")
        d = self.decision
        lines += ["", d.summary()]
        if d.picked is not None and d.best_full is not None:
            lines.append(f"The stopped sweep reports a ceiling of {num(self._estimate(d.picked))} for step {d.picked}; "
                         f"the full sweep's best A_post is {d.best_full:.2f} (|error| {num(self.picked_error())}).")
        if self.revisit:
            lines.append("Stopped as dominated, but the final curves no longer rule them out: steps "
                         + ", ".join(map(str, self.revisit)) + ".")
        lines += [f"{self.decision_points} decision points (one at every evaluation of any branch, branches "
                  "interleaved by compute)."]
        return "\n".join(lines) + "\n"

    def _estimate(self, step: int) -> float | None:
        r = next(r for r in self.results if r.sft_step == step)
        return r.a_post_stop if r.stopped else r.a_post_full


def replay_race(scene, config: CompareConfig | None = None, cache: RefitCache | None = None,
                every: float | None = None, margin: float | None = None) -> RaceResult:
    """Replay a finished `data.Scene` under the comparing rule, its branches interleaved by compute.

    Each branch's plan is the branch as it was run (its last evaluation). Decision points: every evaluation of
    any branch, or with `every` the multiples of it (and the end of the last plan). `margin` (default:
    `config.margin`) is the one `decide` judges the pick with.
    """
    config = config or CompareConfig()
    cache = cache if cache is not None else RefitCache()
    branches = {step: scene.branch(step) for step in scene.steps}
    curves = {s: np.column_stack([b.x, b.p_sft + b.y]) for s, b in branches.items()}
    curves = {s: np.vstack([[0.0, b.p_sft], c[1:]]) for (s, c), b in zip(curves.items(), branches.values())}
    plans = {s: float(b.x[-1]) for s, b in branches.items()}
    xs = sorted({float(x) for b in branches.values() for x in b.x[1:]})
    if every is not None:
        if not every > 0:
            raise FitError(f"every must be > 0, got {every}")
        last = max(plans.values())
        xs = [every * i for i in range(1, math.ceil(last / every))] + [last]
    used: dict[int, tuple[float, int]] = {}  # step -> (compute used, points used)
    verdicts: dict[int, Verdict] = {}
    trace = []
    for c in xs:
        seen = {}
        for s, arr in curves.items():
            n = used[s][1] if s in used else int(np.searchsorted(arr[:, 0], c + 1e-9, side="right"))
            seen[s] = arr[:n]
        verdicts = decide_branches(seen, plans, config, {s: verdicts[s] for s in used}, cache)
        trace.append((c, verdicts))
        for s, v in verdicts.items():
            if v.stop and s not in used:
                used[s] = (min(c, plans[s]), v.n_points)
        if len(used) == len(curves):
            break
    results = []
    for s, b in branches.items():
        v = verdicts[s]
        x_used, n_used = used.get(s, (plans[s], b.n_points))
        traj = _state(s, curves[s][:n_used], plans[s], config, cache).refits  # from the cache: no new fit
        reference, reference_error = cache.reference(b, config.fit)
        stop_index = None if v.kind == PLAN else n_used - 1
        results.append(EarlyStopResult(
            sft_step=s, sft_exaflops=b.sft_exaflops, p_sft=b.p_sft, config=config.branch or EarlyStopConfig(),
            stop_index=stop_index, n_total=b.n_points, x_total=plans[s], x_stop=x_used,
            a_post_stop=None if stop_index is None else v.estimate, reference=reference,
            reference_error=reference_error, last_observed=float(b.p_sft + b.y[-1]), x=b.x, y=b.y,
            trajectory=traj, stop_kind=v.kind, stop_reason=v.reason))
    decision = decide(results, config.margin if margin is None else margin)
    revisit = []
    pick = verdicts.get(decision.picked)
    if pick is not None and pick.a_post is not None:
        lower = pick.a_post - config.k * pick.se
        revisit = [s for s, v in verdicts.items() if v.kind == DOMINATED and v.a_post + config.k * v.se >= lower]
    return RaceResult(scene.name, config, results, verdicts, decision, len(trace), revisit, trace)
