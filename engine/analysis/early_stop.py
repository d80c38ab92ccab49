"""Early stopping of an RL branch once its ceiling is determined: refit after each evaluation, stop when stable.

A sweep pays for every RL evaluation it runs. Once the predicted ceiling A_post no longer moves, the rest of
the branch only confirms it. After each evaluation i (in compute order, the anchor (0, 0) counted as point 0):

    if i + 1 >= min_points:  a_i = A_post of fit_points(points[0..i]), all of them train points (no held-out),
                             with the outlier rejection and options of `FitConfig`
    a refit that raises FitError or whose ceiling is not identified (C_mid > 10x the compute seen, or
    non-finite parameters) gives no a_i and empties the streak
    stop at the first i where the last `patience` refits all gave an a_i and max(a) - min(a) <= tol

The reference is the branch run to the end and fitted as the ceiling table does (`fit_branch` with the
default 85% split), and the error is |a_stop - A_post(reference)|. Compute saved = 1 - x_stop / x_last, with x
the RL EFLOPs since the branch checkpoint.

    from engine.analysis import OnlineCeilingMonitor, replay_branch
    mon = OnlineCeilingMonitor(p_sft=69.15)            # a live branch: call after each evaluation
    if mon.update(rl_exaflops, overall - 69.15):        # True once the ceiling is stable (and from then on)
        stop_branch(); ceiling = mon.stop_prediction
    res = replay_branch(scene.branch(360))              # the same monitor over a finished branch
    res.points_used, res.saved, res.a_post_stop, res.error

CLI: `ceiling fit DATA.json --early-stop [--tol T] [--patience K] [--min-points M] [--out DIR]`.
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

    tol: float = 0.5
    """Largest spread (max - min, accuracy points) of the last `patience` predicted A_post values."""
    patience: int = 3
    """Number of consecutive successful refits whose predictions must agree within `tol`."""
    min_points: int = 6
    """Points (anchor included) before the first refit: the 3-parameter fit needs 4, plus a margin."""

    def __post_init__(self):
        if not self.tol >= 0:
            raise FitError(f"--tol must be >= 0, got {self.tol}")
        if self.patience < 1:
            raise FitError(f"--patience must be >= 1, got {self.patience}")
        if self.min_points < 2:
            raise FitError(f"--min-points must be >= 2, got {self.min_points}")


@dataclass(frozen=True)
class Refit:
    """One evaluation of the replay: its index (anchor = 0), compute, predicted A_post (None: no valid fit)."""

    index: int
    x: float
    a_post: float | None
    note: str = ""  # why there is no prediction: too few points, fit failed, ceiling not identified

    def to_dict(self) -> dict:
        return {"index": self.index, "x": self.x, "a_post": self.a_post, "note": self.note}


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
        self._streak: list[float] = []

    @property
    def prediction(self) -> float | None:
        return self.refits[-1].a_post if self.refits else None

    @property
    def stop_prediction(self) -> float | None:
        return None if self.stop_index is None else self._refit_at(self.stop_index).a_post

    @property
    def should_stop(self) -> bool:
        return self.stop_index is not None

    def update(self, x: float, gain: float) -> bool:
        self.points.append((float(x), float(gain)))
        refit = self._refit()
        self.refits.append(refit)
        if refit.a_post is None:
            self._streak.clear()
        else:
            self._streak = [*self._streak, refit.a_post][-self.config.patience:]
        stable = (len(self._streak) == self.config.patience
                  and max(self._streak) - min(self._streak) <= self.config.tol)
        if stable and self.stop_index is None:
            self.stop_index = refit.index
        return self.should_stop

    def _refit(self) -> Refit:
        n = len(self.points)
        index, x = n - 1, self.points[-1][0]
        if n < self.config.min_points:
            return Refit(index, x, None, f"too few points ({n} < {self.config.min_points})")
        try:
            fit = fit_points(self.points, self.p_sft, replace(self.fit_config, train_start=0, train_points=n))
        except FitError as e:
            return Refit(index, x, None, f"fit failed: {e}")
        if not identified(fit):
            return Refit(index, x, None, f"ceiling not identified (C_mid = {fit.C_mid:.3g})")
        return Refit(index, x, fit.A_post)

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
    for x, gain in zip(branch.x, branch.y):
        if monitor.update(x, gain) and not to_end:
            break
    try:
        reference, reference_error = fit_branch(branch, fit_config), None
    except FitError as e:
        reference, reference_error = None, str(e)
    stop = monitor.stop_index
    x_total = float(branch.x[-1])
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
