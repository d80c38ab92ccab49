"""Comparing the RL branches of one scene while they run: stop a branch once it cannot win.

A sweep user wants the best branch and its ceiling, not every branch's ceiling. At each decision point every
branch is fitted on all the points it has seen (`early_stop.refit`) and its ceiling is bounded with the
standard error of the fit's asymptote (`findings.a_post_se`), floored at `min_se`:

    s_b     = max(SE_b, min_se)
    lower_b = A_post_b - k s_b            upper_b = A_post_b + k s_b
    leader  = the bounded branch with the highest lower bound
    stop b ("dominated") when upper_b < lower_leader + margin, once b has run min_fraction of its plan

A branch is bounded when its fit succeeds on at least `min_points` evaluations, the ceiling is identified
(C_mid within 10x the compute seen) and SE <= max_se. An unbounded branch (a flat start, a failed fit, a
huge SE) is never stopped by the comparison, and neither is the leader, whatever the margin. A negative margin keeps branches that are a little beaten; a positive one would also stop branches
that could win by less than `margin` points. The leader and the branches within reach run on until the
per-branch rule (`early_stop.stable_at` over a refit after every evaluation, `per_branch`; for the leader
not before `leader_floor` of its plan) or their plan ends them. `min_se` is there because the fit's SE trusts the sigmoid: early in a branch it is often 0.1
point while the ceiling still moves by several.

The rule is a pure function of the curves seen so far, shared by the replay (`race_replay`) and the live
sweep:

    decide(curves, plans, config=None) -> dict[str, Decision]
      curves[b]  branch b's evaluations in compute order, [(rl_compute, score), ...]; the first is its start
                 (compute 0, score P_sft); scores in points, compute in any one unit
      plans[b]   the RL compute branch b is planned to run (the same unit)
      Decision   .action: "continue" | "stop" | "done"; .why: leader, contender, unbounded, early (beaten
                 but under min_fraction) | dominated, settled | plan; .reason: a sentence for the log;
                 .a_post, .se (the fit's), .lower, .upper (None when unbounded); .settled_at: the index of
                 the evaluation at which the per-branch rule fired (the branch should end there)
    pick(decisions, max_se) -> the branch to report: the best A_post among those not dominated (preferring
                 the sure ones: settled, ran the plan, or SE <= max_se)

The live sweep advances every branch whose action is "continue" by one slice of compute, then calls decide
again with all the curves, stopped branches included: their frozen curves still count. When the leader's
bound falls, a dominated branch can get "continue" back, and the sweep resumes it from its checkpoint (on
the released scenes this happens; `race_replay` counts it). A branch settled at the per-branch floor comes
back the same way when it becomes the leader before `leader_floor`; otherwise a settled branch stays
settled: its curve no longer changes.

    from engine.analysis.race import decide, pick
    d = decide({"62": [(0.0, 68.56), (3.9, 68.2), ...], "124": [...]}, {"62": 175.4, "124": 213.6})
    d["62"].action, d["62"].reason

Fits are cached by value in the process, so a scheduler may call decide with the whole history each time.
The replay: `ceiling fit DATA.json --early-stop` (race_replay.py). The defaults were chosen on the paper's
five released scenes (benchmarks/bench_early_stop.py; the leave-one-scene-out result and the noise test are
in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np

from engine.analysis.early_stop import EarlyStopConfig, Refit, refit, stable_at
from engine.analysis.findings import a_post_se
from engine.analysis.fit import FitConfig, FitError

CONTINUE, STOP, DONE = "continue", "stop", "done"
MAX_SE = 10.0  # points: a larger SE leaves a branch unbounded, and `pick` passes it over while it can


@dataclass(frozen=True)
class RaceConfig:
    """When a branch counts as beaten; the `ceiling fit --early-stop` flags map onto these."""

    k: float = 1.0
    """Standard errors on each side of A_post that make the bounds."""
    min_se: float = 2.0
    """Floor on the SE (points) in the bounds: a partial curve never pins its ceiling better than this."""
    margin: float = -0.5
    """Points added to the leader's lower bound before comparing (< 0 keeps branches a little beaten)."""
    min_fraction: float = 0.3
    """No branch is stopped by the comparison before it has run this fraction of its plan."""
    min_points: int = 6
    """Evaluations (the start included) before a branch's fit can bound it."""
    max_se: float = MAX_SE
    """A larger SE (points) leaves a branch unbounded; `pick` prefers the branches under it."""
    per_branch: EarlyStopConfig | None = field(default_factory=lambda: EarlyStopConfig(min_fraction=0.65))
    """The per-branch rule that ends the branches still running (None: they run to their plan). Its floor is
    higher than the per-branch mode's 0.55: under evaluation noise the best branch of s1K, which rises only
    after about 55% of its plan, is otherwise settled before the rise (benchmarks/RESULTS.md)."""
    leader_floor: float = 0.8
    """The per-branch rule does not end the leader before this fraction of its plan (when higher than the
    rule's own floor): the leader is the branch the sweep picks, and under evaluation noise a late riser settled
    at the per-branch floor is often picked below its ceiling (benchmarks/RESULTS.md)."""
    fit: FitConfig = field(default_factory=FitConfig)

    def __post_init__(self):
        if not (self.k >= 0 and self.min_se >= 0):
            raise FitError(f"--k and --min-se must be >= 0, got {self.k}, {self.min_se}")
        if not math.isfinite(self.margin):
            raise FitError(f"--margin must be finite, got {self.margin}")
        if not 0 <= self.min_fraction <= 1:
            raise FitError(f"--race-min-fraction must be in [0, 1], got {self.min_fraction}")
        if not 0 <= self.leader_floor <= 1:
            raise FitError(f"--leader-floor must be in [0, 1], got {self.leader_floor}")
        if self.min_points < 5:
            raise FitError(f"min_points must be >= 5 (3 parameters, a degree of freedom and the start), "
                           f"got {self.min_points}")
        if not self.max_se > 0:
            raise FitError(f"max_se must be > 0, got {self.max_se}")


@dataclass(frozen=True)
class Decision:
    """What to do with one branch after a decision point, and why (see the module docstring)."""

    action: str  # CONTINUE, STOP or DONE
    why: str
    reason: str
    a_post: float | None  # A_post of the fit of all the points seen (None: no identified ceiling)
    se: float | None  # the fit's SE of A_post (before the min_se floor)
    lower: float | None  # the bounds used (None: unbounded)
    upper: float | None
    settled_at: int | None = None

    def to_dict(self) -> dict:
        return {"action": self.action, "why": self.why, "reason": self.reason, "A_post": _finite(self.a_post),
                "SE": _finite(self.se), "lower": self.lower, "upper": self.upper, "settled_at": self.settled_at}


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


@dataclass(frozen=True)
class _Fit:
    a_post: float | None
    se: float | None
    note: str


NO_FIT = _Fit(None, None, "too few points")


@lru_cache(maxsize=1 << 14)
def _fit_cached(key: bytes, p_sft: float, fit_config: FitConfig) -> _Fit:
    points = np.frombuffer(key).reshape(-1, 2)
    fit, note = refit(points, p_sft, 0, fit_config)
    return _Fit(None, None, note) if fit is None else _Fit(fit.A_post, a_post_se(fit), "")


def _fit(curve: np.ndarray, n: int, fit_config: FitConfig) -> _Fit:
    """The fit of the first n evaluations of a (compute, score) curve, as gains over its start. A prefix is
    fitted again at every later decision point and by the per-branch rule, so fits are cached by value."""
    gains = curve[:n].copy()
    gains[:, 1] -= curve[0, 1]
    return _fit_cached(gains.tobytes(), float(curve[0, 1]), fit_config)


def _as_curve(name: str, points) -> np.ndarray:
    curve = np.asarray(points, dtype=float)
    if curve.ndim != 2 or curve.shape[1] != 2 or len(curve) == 0:
        raise FitError(f"branch {name}: a curve is a non-empty list of (compute, score) pairs")
    if curve[0, 0] != 0:
        raise FitError(f"branch {name}: the first evaluation must be the start, at compute 0 (got {curve[0, 0]:g})")
    if not np.all(np.isfinite(curve)) or np.any(np.diff(curve[:, 0]) < 0):
        raise FitError(f"branch {name}: compute must be finite and non-decreasing, scores finite")
    return curve


def settled_at(curve: np.ndarray, plan: float, rule: EarlyStopConfig, fit_config: FitConfig) -> int | None:
    """The first evaluation at which the per-branch rule stops this curve (`early_stop.stable_at` over a refit
    after every evaluation), or None. Only the refits the rule looks at are made: none before the compute
    floor but the `patience` (and `span`) window that ends at it."""
    x = curve[:, 0]
    progress = x / plan if plan > 0 else np.ones(len(x))
    first = max(int(np.searchsorted(progress, rule.min_fraction, side="left")), rule.patience - 1)
    if first >= len(curve):
        return None
    start = max(0, min(first - rule.patience + 1, int(np.searchsorted(x, (1 - rule.span) * x[first], side="left"))))
    refits = [Refit(i, float(x[i]), None, "not looked at", float(progress[i])) for i in range(start)]
    for n in range(start + 1, len(curve) + 1):
        f = _fit(curve, n, fit_config) if n >= rule.min_points else NO_FIT
        refits.append(Refit(n - 1, float(x[n - 1]), f.a_post, f.note, float(progress[n - 1])))
        if n - 1 >= first and stable_at(refits, n - 1, rule):
            return n - 1
    return None


def decide(curves: dict[str, list[tuple[float, float]]], plans: dict[str, float],
           config: RaceConfig | None = None) -> dict[str, Decision]:
    """Continue, stop or done for every branch, from the curves seen so far only (see the module docstring)."""
    cfg = config or RaceConfig()
    missing = sorted(set(curves) - set(plans))
    if missing:
        raise FitError(f"no plan for branch(es) {', '.join(missing)}")
    arrays = {b: _as_curve(b, pts) for b, pts in curves.items()}
    fits = {b: _fit(c, len(c), cfg.fit) if len(c) >= cfg.min_points else NO_FIT for b, c in arrays.items()}
    notes = {b: _bound_note(f, cfg) for b, f in fits.items()}
    half = {b: cfg.k * max(f.se, cfg.min_se) for b, f in fits.items() if not notes[b]}
    bounds = {b: (fits[b].a_post - h, fits[b].a_post + h) for b, h in half.items()}
    leader = max(bounds, key=lambda b: (bounds[b][0], b)) if bounds else None
    return {b: _decide_one(b, c, float(plans[b]), fits[b], notes[b], bounds, leader, cfg)
            for b, c in arrays.items()}


def _decide_one(b, curve, plan, f, note, bounds, leader, cfg) -> Decision:
    lower, upper = bounds.get(b, (None, None))

    def make(action, why, reason, at=None):
        return Decision(action, why, reason, f.a_post, f.se, lower, upper, at)

    x = float(curve[-1, 0])
    rule = cfg.per_branch
    if rule is not None and b == leader and cfg.leader_floor > rule.min_fraction:
        rule = replace(rule, min_fraction=cfg.leader_floor)
    at = settled_at(curve, plan, rule, cfg.fit) if rule else None
    if at is not None:
        return make(STOP, "settled", f"settled: the per-branch rule stopped it at compute {curve[at, 0]:.4g} "
                                     f"({100 * curve[at, 0] / plan:.0f}% of its plan)", at)
    if x >= plan * (1 - 1e-9):
        return make(DONE, "plan", f"ran its plan ({plan:.4g})")
    if b == leader:
        return make(CONTINUE, "leader", f"leader: lower bound {lower:.2f} (A_post {f.a_post:.2f}) is the highest")
    if note:
        return make(CONTINUE, "unbounded", f"not comparable yet: {note}")
    bar = bounds[leader][0] + cfg.margin
    versus = f"branch {leader}'s lower bound {bounds[leader][0]:.2f}" + (f" {cfg.margin:+g}" if cfg.margin else "")
    if upper >= bar:
        return make(CONTINUE, "contender", f"contender: upper bound {upper:.2f} >= {versus}")
    if x < cfg.min_fraction * plan:
        return make(CONTINUE, "early", f"beaten (upper bound {upper:.2f} < {versus}) but has run less than "
                                       f"{cfg.min_fraction:g} of its plan")
    return make(STOP, "dominated", f"dominated: upper bound {upper:.2f} (A_post {f.a_post:.2f}) < {versus}")


def _bound_note(f: _Fit, cfg: RaceConfig) -> str:
    """Why a fit gives no usable bounds ("" when it does)."""
    if f.a_post is None:
        return f.note
    if not math.isfinite(f.se) or f.se > cfg.max_se:
        return f"SE of A_post {f.se:.3g} > {cfg.max_se:g}"
    return ""


def pick(decisions: dict[str, Decision], max_se: float = MAX_SE) -> str | None:
    """The branch a user would take: the best A_post among the branches not dominated, counting only the sure
    ones while there are any (None: no branch has an identified ceiling). Sure: the per-branch rule settled
    it, it ran its plan, or its SE is at most `max_se`. A settled prediction is sure because it held still over
    `patience` refits, whatever the covariance says: under evaluation noise a late riser that settled on its
    rise often has SE > 10 points, and passing it over picks a worse branch (benchmarks/RESULTS.md)."""
    cands = {b: d for b, d in decisions.items() if d.why != "dominated" and d.a_post is not None}
    sure = {b: d for b, d in cands.items() if d.why in ("settled", "plan") or (d.se is not None and d.se <= max_se)}
    cands = sure or cands
    return max(cands, key=lambda b: (cands[b].a_post, b)) if cands else None
