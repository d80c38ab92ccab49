"""Early stopping of an RL branch once its ceiling is determined: refit after each evaluation, stop when stable.

A sweep pays for every RL evaluation it runs. Once the predicted ceiling A_post no longer moves, the rest of
the branch only confirms it. After each evaluation i (in compute order, the anchor (0, 0) counted as point 0):

    if i + 1 >= min_points:  a_i = A_post of fit_points(points[0..i]), all of them train points (no held-out),
                             with the outlier rejection and options of `FitConfig`
    a refit that raises FitError or whose ceiling is not identified (C_mid > 10x the compute seen, or
    non-finite parameters) gives no a_i
    stop at the first i where
      - the branch has spent at least `min_fraction` of its planned RL compute (`progress`), and
      - the last `patience` refits, together with every refit within the last `span` fraction of the compute
        seen, all gave an a_i and max(a) - min(a) <= tol

The reference is the branch run to the end and fitted as the ceiling table does (`fit_branch` with the
default 85% split), and the error is |a_stop - A_post(reference)|. Compute saved = 1 - x_stop / x_last, with x
the RL EFLOPs since the branch checkpoint; a replayed branch's plan is the branch as it was run.

What a sweep user decides from it is which SFT checkpoint to switch at: `decide(results)` takes the branch
with the best A_post at the stop (the full fit for a branch that never stopped) and checks it against the
branch with the best full-branch A_post (right when within `margin` = 1 point of it).

The defaults (tol 1.0, patience 3, min_points 6, min_fraction 0.55, span 0) were tuned on the paper's five
released scenes with leave-one-scene-out; benchmarks/bench_early_stop.py makes the table and says what the
rule can and cannot reach (benchmarks/RESULTS.md).

    from engine.analysis import OnlineCeilingMonitor, replay_branch
    mon = OnlineCeilingMonitor(p_sft=69.15)            # a live branch: call after each evaluation
    if mon.update(rl_exaflops, overall - 69.15, progress=step / planned_steps):   # True once stable (sticky)
        stop_branch(); ceiling = mon.stop_prediction
    res = replay_branch(scene.branch(360))              # the same monitor over a finished branch
    res.points_used, res.saved, res.a_post_stop, res.error
    decide(replay_scene(scene)).ok                     # the same best branch as the full sweep?

This rule sees one branch at a time; `race.decide` compares the branches of a scene and takes it as its
per-branch input (`refit` and `stable_at` are shared).

CLI: `ceiling fit DATA.json --early-stop --per-branch [--tol T] [--patience K] [--min-points M]
[--min-fraction F] [--span S] [--out DIR]` (without --per-branch: the comparing rule, `race_replay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from engine.analysis.fit import FitConfig, FitError, FitResult, fit_branch, fit_points
from engine.analysis.report import identified


@dataclass(frozen=True)
class EarlyStopConfig:
    """When a branch's ceiling counts as determined; the CLI flags map onto these one to one."""

    tol: float = 1.0
    """Largest spread (max - min, accuracy points) of the predicted A_post values in the stable window."""
    patience: int = 3
    """Number of consecutive successful refits whose predictions must agree within `tol`."""
    min_points: int = 6
    """Points (anchor included) before the first refit: the 3-parameter fit needs 4, plus a margin."""
    min_fraction: float = 0.55
    """No stop before this fraction of the branch's planned RL compute (0: no floor)."""
    span: float = 0.0
    """The stable window also holds every refit within the last `span` fraction of the compute seen (0: off)."""

    def __post_init__(self):
        if not self.tol >= 0:
            raise FitError(f"--tol must be >= 0, got {self.tol}")
        if self.patience < 1:
            raise FitError(f"--patience must be >= 1, got {self.patience}")
        if self.min_points < 2:
            raise FitError(f"--min-points must be >= 2, got {self.min_points}")
        if not 0 <= self.min_fraction <= 1:
            raise FitError(f"--min-fraction must be in [0, 1], got {self.min_fraction}")
        if not 0 <= self.span < 1:
            raise FitError(f"--span must be in [0, 1), got {self.span}")


@dataclass(frozen=True)
class Refit:
    """One evaluation of the replay: its index (anchor = 0), compute, predicted A_post (None: no valid fit)."""

    index: int
    x: float
    a_post: float | None
    note: str = ""  # why there is no prediction: too few points, fit failed, ceiling not identified
    progress: float | None = None  # fraction of the planned RL compute spent at this evaluation

    def to_dict(self) -> dict:
        return {"index": self.index, "x": self.x, "a_post": self.a_post, "note": self.note, "progress": self.progress}


def stable_at(refits: list[Refit], i: int, config: EarlyStopConfig) -> bool:
    """Whether the rule stops at refit `refits[i]`, judging only refits[: i + 1] (see the module docstring).
    A refit made from fewer than `config.min_points` points counts as no prediction."""
    def valid(r: Refit) -> bool:
        return r.a_post is not None and r.index + 1 >= config.min_points

    r = refits[i]
    if not valid(r) or i + 1 < config.patience:
        return False
    if config.min_fraction > 0:
        if r.progress is None:
            raise FitError("early stop with min_fraction > 0 needs the progress of each evaluation (the fraction "
                           "of the planned RL compute spent); pass progress= or set min_fraction=0")
        if r.progress < config.min_fraction:
            return False
    window = refits[i - config.patience + 1: i + 1]
    if config.span > 0:
        window = [q for q in refits[: i + 1] if q.x >= (1 - config.span) * r.x or q in window]
    if not all(valid(q) for q in window):
        return False
    values = [q.a_post for q in window]
    return max(values) - min(values) <= config.tol


def refit(points, p_sft: float, min_points: int, fit_config: FitConfig) -> tuple[FitResult | None, str]:
    """The monitor's refit: every point seen so far is a train point. Returns the fit, or None and why not
    (too few points, the fit failed, the ceiling is not identified)."""
    n = len(points)
    if n < min_points:
        return None, f"too few points ({n} < {min_points})"
    try:
        fit = fit_points(points, p_sft, replace(fit_config, train_start=0, train_points=n))
    except FitError as e:
        return None, f"fit failed: {e}"
    if not identified(fit):
        return None, f"ceiling not identified (C_mid = {fit.C_mid:.3g})"
    return fit, ""


class OnlineCeilingMonitor:
    """Refits the ceiling after each evaluation of a live branch and says when to stop.

    `update(x, gain)` takes the RL compute since the checkpoint (EFLOPs) and the gain over P_sft (points)
    and returns True from the first evaluation at which the ceiling is stable on (the decision is sticky,
    so later updates, e.g. a replay run to the end, only extend `refits`). `prediction` is the A_post of
    the latest refit (None where it failed), `stop_prediction` the one at the stop.
    """

    def __init__(self, p_sft: float = 0.0, config: EarlyStopConfig | None = None,
                 fit_config: FitConfig | None = None, anchor: bool = True):
        self.p_sft = float(p_sft)
        self.config = config or EarlyStopConfig()
        self.fit_config = fit_config or FitConfig()
        self.points: list[tuple[float, float]] = [(0.0, 0.0)] if anchor else []
        self.refits: list[Refit] = []
        self.stop_index: int | None = None

    @property
    def prediction(self) -> float | None:
        return self.refits[-1].a_post if self.refits else None

    @property
    def stop_prediction(self) -> float | None:
        return None if self.stop_index is None else self._refit_at(self.stop_index).a_post

    @property
    def should_stop(self) -> bool:
        return self.stop_index is not None

    def update(self, x: float, gain: float, progress: float | None = None) -> bool:
        """Add an evaluation (RL EFLOPs since the checkpoint, gain over P_sft, fraction of the planned compute
        spent) and say whether the branch should stop."""
        self.points.append((float(x), float(gain)))
        self.refits.append(self._refit(progress))
        if self.stop_index is None and stable_at(self.refits, len(self.refits) - 1, self.config):
            self.stop_index = self.refits[-1].index
        return self.should_stop

    def _refit(self, progress: float | None) -> Refit:
        fit, note = refit(self.points, self.p_sft, self.config.min_points, self.fit_config)
        return Refit(len(self.points) - 1, self.points[-1][0], None if fit is None else fit.A_post, note, progress)

    def _refit_at(self, index: int) -> Refit:
        return next(r for r in self.refits if r.index == index)


@dataclass
class EarlyStopResult:
    """A branch replayed under the stopping rule, against the same branch run to the end."""

    sft_step: int | None
    sft_exaflops: float | None
    p_sft: float
    config: EarlyStopConfig
    stop_index: int | None  # index of the stopping evaluation (anchor = 0); None: never stable
    n_total: int  # points of the branch, anchor included
    x_total: float  # RL EFLOPs of the last evaluation
    x_stop: float  # RL EFLOPs at the stop (x_total when never stable)
    a_post_stop: float | None  # predicted A_post at the stop
    reference: FitResult | None  # the default `fit_branch` of the whole branch
    reference_error: str | None
    last_observed: float  # P_sft + the last gain: the performance the branch actually ended at
    x: np.ndarray  # the branch's points, anchor included (RL EFLOPs, gain over P_sft)
    y: np.ndarray
    trajectory: list[Refit] = field(default_factory=list)  # one refit per point (replayed to the end or the stop)

    @property
    def stopped(self) -> bool:
        return self.stop_index is not None

    @property
    def points_used(self) -> int:
        return self.n_total if self.stop_index is None else self.stop_index + 1

    @property
    def saved(self) -> float:
        """Fraction of the branch's RL compute not spent (0 when never stable)."""
        return 1.0 - self.x_stop / self.x_total if self.x_total > 0 else 0.0

    @property
    def a_post_full(self) -> float | None:
        return None if self.reference is None else self.reference.A_post

    @property
    def error(self) -> float | None:
        """|A_post at the stop - A_post of the full fit| (None when either is missing)."""
        if self.a_post_stop is None or self.a_post_full is None:
            return None
        return abs(self.a_post_stop - self.a_post_full)

    def why_not_stopped(self) -> str | None:
        """For a branch that never stabilised: the state of its last refits, in words."""
        if self.stopped:
            return None
        k, refits = self.config.patience, self.trajectory
        missing = sum(r.a_post is None and not r.note.startswith("too few") for r in refits)
        count = f" ({missing} of {len(refits)} refits gave no ceiling)" if missing else ""
        if not refits or refits[-1].a_post is None:
            return "never stable: last refit: " + (refits[-1].note if refits else "none") + count
        if self.config.min_fraction >= 1:
            return "never stable: min_fraction 1 runs every branch to the end"
        tail = []
        for r in reversed(refits[-k:]):
            if r.a_post is None:
                break
            tail.append(r.a_post)
        if len(tail) < k:
            return f"never stable: only {len(tail)} valid refits in a row at the end (patience {k})" + count
        return (f"never stable: the last {k} predictions span {max(tail) - min(tail):.2f} "
                f"({min(tail):.2f}..{max(tail):.2f}) > tol {self.config.tol:g}" + count)

    def to_dict(self) -> dict:
        f = _finite
        return {
            "sft_step": self.sft_step, "sft_exaflops": self.sft_exaflops, "P_sft": self.p_sft,
            "tol": self.config.tol, "patience": self.config.patience, "min_points": self.config.min_points,
            "min_fraction": self.config.min_fraction, "span": self.config.span,
            "stopped": self.stopped, "stop_index": self.stop_index,
            "points_used": self.points_used, "points_total": self.n_total,
            "exaflops_used": self.x_stop, "exaflops_total": self.x_total, "saved": self.saved,
            "A_post_stop": f(self.a_post_stop), "A_post_full": f(self.a_post_full), "error": f(self.error),
            "last_observed": self.last_observed, "reference_error": self.reference_error,
            "reference_warnings": [] if self.reference is None else list(self.reference.warnings),
            "why_not_stopped": self.why_not_stopped(),
            "trajectory": [r.to_dict() | {"a_post": f(r.a_post)} for r in self.trajectory],
        }


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def replay_branch(branch, config: EarlyStopConfig | None = None, fit_config: FitConfig | None = None,
                  to_end: bool = True, **options) -> EarlyStopResult:
    """Replay a finished `data.Branch` through `OnlineCeilingMonitor`, point by point in compute order.

    `options` override fields of `config` (tol, patience, min_points). With `to_end` the refits go on past
    the stop, so the trajectory shows whether the prediction held; the stop itself is unchanged.
    """
    config = replace(config or EarlyStopConfig(), **options)
    fit_config = fit_config or FitConfig()
    monitor = OnlineCeilingMonitor(branch.p_sft, config, fit_config, anchor=False)  # the branch holds it
    x_total = float(branch.x[-1])
    for x, gain in zip(branch.x, branch.y):  # the plan is the branch as it was run
        if monitor.update(x, gain, progress=x / x_total if x_total > 0 else 1.0) and not to_end:
            break
    try:
        reference, reference_error = fit_branch(branch, fit_config), None
    except FitError as e:
        reference, reference_error = None, str(e)
    stop = monitor.stop_index
    return EarlyStopResult(
        sft_step=branch.sft_step, sft_exaflops=branch.sft_exaflops, p_sft=branch.p_sft, config=config,
        stop_index=stop, n_total=branch.n_points, x_total=x_total,
        x_stop=x_total if stop is None else float(branch.x[stop]), a_post_stop=monitor.stop_prediction,
        reference=reference, reference_error=reference_error,
        last_observed=float(branch.p_sft + branch.y[-1]), x=branch.x, y=branch.y, trajectory=list(monitor.refits),
    )


def replay_scene(scene, config: EarlyStopConfig | None = None, fit_config: FitConfig | None = None,
                 to_end: bool = True, **options) -> list[EarlyStopResult]:
    """`replay_branch` over every branch of a `data.Scene`, in SFT-step order."""
    return [replay_branch(scene.branch(step), config, fit_config, to_end, **options) for step in scene.steps]


@dataclass(frozen=True)
class SweepDecision:
    """The SFT checkpoint a user would switch at from an early-stopped sweep, against the full sweep's."""

    picked: int | None  # SFT step with the best A_post at the stop (full fit where the branch never stopped)
    best: int | None  # SFT step with the best full-branch A_post
    picked_full: float | None  # full-branch A_post of the picked branch
    best_full: float | None
    margin: float
    saved: float  # share of the scene's RL compute not spent
    errors: list[float]  # |A_post at the stop - full A_post| of the stopped branches

    @property
    def ok(self) -> bool:
        """The picked branch is the best one or within `margin` points of it."""
        return self.picked_full is not None and self.best_full is not None and \
            self.picked_full >= self.best_full - self.margin

    def to_dict(self) -> dict:
        errs = self.errors
        return {"picked": self.picked, "best": self.best, "picked_full": self.picked_full, "best_full": self.best_full,
                "margin": self.margin, "ok": self.ok, "saved": self.saved,
                "error_median": float(np.median(errs)) if errs else None, "error_max": max(errs) if errs else None}

    def summary(self) -> str:
        if self.picked is None or self.best is None:
            return "Best branch: not decided (no branch with a usable A_post)."
        verdict = "the same branch" if self.picked == self.best else (
            f"within {self.margin:g} point(s) of it" if self.ok else f"{self.best_full - self.picked_full:.2f} "
            f"points below it: WRONG")
        return (f"Best branch: early-stopped sweep picks SFT step {self.picked} (full A_post {self.picked_full:.2f}); "
                f"the full sweep's best is step {self.best} ({self.best_full:.2f}): {verdict}; "
                f"{100 * self.saved:.1f}% of the RL compute saved.")


def decide(results: list[EarlyStopResult], margin: float = 1.0) -> SweepDecision:
    """Which branch a user picks from `replay_scene` output, and whether the full sweep agrees."""
    estimate = {r.sft_step: (r.a_post_stop if r.stopped else r.a_post_full) for r in results}
    full = {r.sft_step: r.a_post_full for r in results if r.a_post_full is not None and math.isfinite(r.a_post_full)}
    usable = {k: v for k, v in estimate.items() if v is not None and math.isfinite(v)}
    picked = max(usable, key=usable.get) if usable else None
    best = max(full, key=full.get) if full else None
    total = sum(r.x_total for r in results)
    saved = 1.0 - sum(r.x_stop for r in results) / total if total > 0 else 0.0
    return SweepDecision(picked, best, full.get(picked), full.get(best), margin, saved,
                         [r.error for r in results if r.stopped and r.error is not None])


def ceiling_stop_rule(tol: float = 0.5, patience: int = 3, min_points: int = 6, min_fraction: float = 0.0,
                      planned_steps: int | None = None):
    """A `stop_when` for RLTrainer.fit: refit the ceiling after each evaluation (engine/analysis/early_stop)
    and stop once the predicted A_post has moved less than `tol` points over the last `patience` refits
    (and, with `min_fraction`, not before that fraction of `planned_steps`).

    The gain is measured against the branch's first evaluation (its starting performance, P_sft); compute
    is the branch's RL compute. Returns a reason string when the branch should stop, else None.
    """
    if min_fraction > 0 and not planned_steps:
        raise ValueError("ceiling_stop_rule: min_fraction > 0 needs planned_steps (rl.steps)")
    monitor: OnlineCeilingMonitor | None = None
    seen = 0

    def rule(history: list[dict]) -> str | None:
        nonlocal monitor, seen
        if monitor is None:
            if not history:
                return None
            monitor = OnlineCeilingMonitor(100 * history[0]["pass@1"], EarlyStopConfig(tol, patience, min_points,
                                                                                       min_fraction))
            seen = 1
        for h in history[seen:]:
            monitor.update(h["rl_exaflops"], 100 * h["pass@1"] - monitor.p_sft,
                           progress=h["step"] / planned_steps if planned_steps else None)
        seen = len(history)
        if monitor.should_stop:
            return (f"ceiling settled: predicted A_post {monitor.stop_prediction:.2f} moved less than {tol} points "
                    f"over the last {patience} refits")
        return None

    return rule
