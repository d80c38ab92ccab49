"""Robust sigmoidal fits of RL gain against RL compute: the Plasticity-Ceiling model.

Model (the paper's Section 4), x in EFLOPs of RL compute since the branch checkpoint:

    gain(x) = C0 + (A - C0) / (1 + (C_mid / (x + 1e-10))^B)

A is the asymptotic gain, PL_rl = A, and the ceiling is A_post = P_sft + PL_rl. C_mid is the compute at
half the gain and B the steepness. C0 is the gain at x = 0, fixed at 0 (the anchor) unless `free_c0`.

Procedure (Appendix D, made precise):

1. Split by index: train = [S, S+K), held-out = [S+K, n); points before S are unused.
   K defaults to floor(0.85 * (n - S)), i.e. 85% of the points from S on.
2. Plain fit: bounded least squares (`curve_fit`, method='trf', maxfev 10000) from
   B=1, C_mid=median(x), A=max(y), C0=min(y) within
   B in [0.01, 100]; C_mid in [0.1 min(x>0), 2 max(x)]; A in max(y) +/- h; C0 in min(y) +/- h,
   where h = range(y)/2. Degenerate bounds are made valid: min(x) = 0 (the anchor) is skipped by taking
   the smallest positive x, a flat curve (range 0) gets h = FLAT_HALF_WIDTH, and p0 is clipped into the box.
3. Least trimmed squares (when `lts_alpha` is set): h = floor(n alpha), or n when h < #params.
   From the same p0, exactly 50 concentration steps: keep the h points with the smallest squared residuals
   under the current parameters, refit them without bounds (method='lm', warm start, maxfev 5000), and adopt
   the refit as best and current if the sum of the h smallest squared residuals over all n points improved;
   otherwise (or if the refit raised) restart from best + N(0, 0.01^2), one `default_rng(42)` per LTS run,
   no draw after the last step.
4. Outlier rejection (always on): up to 3 rounds over the train points. Fit the unflagged points (LTS or
   plain), take residuals r of all train points, M = 0.6745 (r - median r) / MAD (MAD 0 counts as 1),
   flag |M| > threshold; flags are rebuilt each round; stop when they repeat. The final fit uses the
   unflagged train points.
5. Metrics: R^2 and RMSE on the final fitted points (under LTS only the h kept points); RMSE and R^2 on
   the held-out points. No held-out points: the train values are reported. One held-out point, or
   held-out points with zero variance: R^2 is None.

Degenerate inputs never crash: too few points or NaN raise `FitError` with the reason; a flat curve, a
collapse to large negative gains, parameters stuck at a bound and an extrapolated C_mid are reported in
`FitResult.warnings`.
"""

from __future__ import annotations

import math
import warnings as _warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit, leastsq

from engine.errors import CeilingError

EPS = 1e-10  # keeps (C_mid / x) finite at the anchor x = 0
FLAT_HALF_WIDTH = 0.5  # half-width of the A/C0 bounds when y has zero range (units of y)
COLLAPSE_GAIN = -10.0  # a gain below this (points) is reported as a collapse
MAD_SCALE = 0.6745  # makes the modified z-score comparable to a standard normal z
PARAM_NAMES = ("A", "C_mid", "B", "C0")


class FitError(CeilingError):
    """A fit cannot be made from these points or options; the message says why."""


@dataclass(frozen=True)
class FitConfig:
    """Options of one fit; the CLI flags map onto these one to one."""

    train_start: int = 0
    """S: index of the first train point (earlier points are unused)."""
    train_points: int | None = None
    """K: number of train points; None means floor(0.85 * (n - S))."""
    outlier_threshold: float = 2.5
    """Flag train points whose modified z-score of the residual exceeds this."""
    lts_alpha: float | None = None
    """Trimmed fraction kept by least trimmed squares (e.g. 0.75 or 0.85); None fits plainly."""
    free_c0: bool = False
    """Fit C0 (the gain at x = 0) instead of fixing it at 0."""
    lts_steps: int = 50
    """Concentration steps per LTS run."""
    seed: int = 42
    """Seed of the LTS restart noise."""
    outlier_rounds: int = 3
    """Maximum rounds of outlier flagging."""

    def __post_init__(self):
        if self.train_start < 0:
            raise FitError(f"--train-start must be >= 0, got {self.train_start}")
        if self.train_points is not None and self.train_points < 1:
            raise FitError(f"--train-points must be >= 1, got {self.train_points}")
        if not self.outlier_threshold > 0:
            raise FitError(f"--outlier-threshold must be > 0, got {self.outlier_threshold}")
        if self.lts_alpha is not None and not 0 < self.lts_alpha <= 1:
            raise FitError(f"--lts-alpha must be in (0, 1], got {self.lts_alpha}")

    @property
    def n_params(self) -> int:
        return 4 if self.free_c0 else 3


@dataclass
class FitResult:
    """A fitted branch: parameters, the derived ceiling, metrics and which points played which role."""

    A: float
    C_mid: float
    B: float
    C0: float
    P_sft: float
    r2_train: float | None
    rmse_train: float
    rmse_val: float
    r2_val: float | None
    x: np.ndarray  # all points, anchor included
    y: np.ndarray
    train: np.ndarray  # bool masks over all points
    val: np.ndarray
    flagged: np.ndarray  # train points rejected as outliers
    kept: np.ndarray  # points of the final fit that count for r2_train (LTS: the h kept ones)
    method: str  # "plain" or "lts"
    h: int | None  # LTS subset size
    outlier_rounds: int
    warnings: list[str] = field(default_factory=list)
    sft_step: int | None = None
    sft_exaflops: float | None = None

    @property
    def PL_rl(self) -> float:
        return self.A

    @property
    def A_post(self) -> float:
        return self.P_sft + self.A

    @property
    def n_train(self) -> int:
        return int(self.train.sum())

    @property
    def n_val(self) -> int:
        return int(self.val.sum())

    @property
    def n_outliers(self) -> int:
        return int(self.flagged.sum())

    def predict(self, x) -> np.ndarray:
        return sigmoid(np.asarray(x, dtype=float), self.A, self.C_mid, self.B, self.C0)

    def to_dict(self) -> dict:
        """JSON-ready summary (no NaN: undefined metrics are None)."""
        return {
            "sft_step": self.sft_step,
            "sft_exaflops": self.sft_exaflops,
            "P_sft": self.P_sft,
            "PL_rl": self.PL_rl,
            "A_post": self.A_post,
            "A": self.A,
            "C_mid": self.C_mid,
            "B": self.B,
            "C0": self.C0,
            "r2_train": self.r2_train,
            "rmse_train": self.rmse_train,
            "rmse_val": self.rmse_val,
            "r2_val": self.r2_val,
            "n_points": len(self.x),
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_outliers": self.n_outliers,
            "outlier_indices": np.flatnonzero(self.flagged).tolist(),
            "method": self.method,
            "h": self.h,
            "outlier_rounds": self.outlier_rounds,
            "warnings": list(self.warnings),
        }


def sigmoid(x: np.ndarray, A: float, C_mid: float, B: float, C0: float = 0.0) -> np.ndarray:
    """gain(x) = C0 + (A - C0) / (1 + (C_mid / (x + 1e-10))^B)."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        t = np.power(C_mid / (x + EPS), B)
        return C0 + (A - C0) / (1.0 + t)


class _Model:
    """The model on u = 1/(x + 1e-10), precomputed once per point set so each evaluation is three ufuncs.

    (C_mid / (x + eps))^B == (C_mid * u)^B. Callers run inside `np.errstate(all="ignore")`: the anchor's
    (C_mid * 1e10)^B may overflow to inf, which correctly gives a gain of C0.
    """

    def __init__(self, free_c0: bool):
        self.free_c0 = free_c0
        self.f = _f4 if free_c0 else _f3

    def full(self, p: np.ndarray) -> tuple[float, float, float, float]:
        return (p[0], p[1], p[2], p[3] if self.free_c0 else 0.0)

    def residuals(self, p: np.ndarray, u: np.ndarray, y: np.ndarray) -> np.ndarray:
        return y - self.f(u, *p)


def _f3(u, A, C_mid, B):
    return A / (1.0 + (C_mid * u) ** B)


def _f4(u, A, C_mid, B, C0):
    return C0 + (A - C0) / (1.0 + (C_mid * u) ** B)


@dataclass(frozen=True)
class _Box:
    p0: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def _start_and_bounds(x: np.ndarray, y: np.ndarray, free_c0: bool) -> _Box:
    """Initial values and the bounds of the plain fit, made valid for degenerate data (see docstring)."""
    positive = x[x > 0]
    c_lo, c_hi = 0.1 * positive.min(), 2.0 * x.max()  # min(x) is 0 at the anchor: use the first x > 0
    ymin, ymax = float(y.min()), float(y.max())
    half = 0.5 * (ymax - ymin) if ymax > ymin else FLAT_HALF_WIDTH
    lower = [ymax - half, c_lo, 0.01]
    upper = [ymax + half, c_hi, 100.0]
    p0 = [ymax, float(np.median(x)), 1.0]
    if free_c0:
        lower.append(ymin - half)
        upper.append(ymin + half)
        p0.append(ymin)
    lower_a, upper_a = np.array(lower), np.array(upper)
    return _Box(np.clip(np.array(p0), lower_a, upper_a), lower_a, upper_a)


def _plain_fit(model: _Model, x: np.ndarray, u: np.ndarray, y: np.ndarray) -> np.ndarray:
    box = _start_and_bounds(x, y, model.free_c0)
    try:
        p, _ = curve_fit(model.f, u, y, p0=box.p0, bounds=(box.lower, box.upper), method="trf",
                         maxfev=10000)
    except (RuntimeError, ValueError) as e:
        raise FitError(f"the bounded fit did not converge: {e}") from None
    return p


def _lm_refit(model: _Model, u: np.ndarray, y: np.ndarray, p0: np.ndarray) -> np.ndarray | None:
    """Unbounded Levenberg-Marquardt from p0; None where curve_fit(method='lm') would raise.

    curve_fit(method='lm') is MINPACK lmdif through `leastsq` (same tolerances, residual f - y) plus a
    covariance we do not use; calling `leastsq` directly saves a third of the time of a failing refit.
    """
    # Spelled out rather than model.f(u, *p): this runs up to 5000 times per refit.
    if model.free_c0:
        def residual(p):
            return p[3] + (p[0] - p[3]) / (1.0 + (p[1] * u) ** p[2]) - y
    else:
        def residual(p):
            return p[0] / (1.0 + (p[1] * u) ** p[2]) - y

    try:
        p, _, _, _, ier = leastsq(residual, p0, full_output=True, maxfev=5000)
    except (ValueError, TypeError, FloatingPointError):
        return None
    if ier not in (1, 2, 3, 4) or not np.all(np.isfinite(p)):
        return None
    return p


def _lts_size(n: int, alpha: float, n_params: int) -> int:
    h = int(math.floor(n * alpha))
    return n if h < n_params else h


def _lts_fit(model: _Model, x: np.ndarray, u: np.ndarray, y: np.ndarray, alpha: float, steps: int,
             seed: int) -> tuple[np.ndarray, int, int]:
    """Least trimmed squares by concentration steps; returns (best params, h, steps that improved)."""
    n = len(x)
    p0 = _start_and_bounds(x, y, model.free_c0).p0
    h = _lts_size(n, alpha, len(p0))
    rng = np.random.default_rng(seed)

    def squared(p):
        r2 = model.residuals(p, u, y) ** 2
        return np.where(np.isnan(r2), np.inf, r2)  # NaN (e.g. C_mid < 0) ranks last, never "best"

    def cost(r2):
        return float(np.partition(r2, h - 1)[:h].sum())

    best = current = p0
    best_cost = cost(squared(best))
    adopted = 0
    for step in range(steps):
        keep = np.argsort(squared(current), kind="stable")[:h]
        new = _lm_refit(model, u[keep], y[keep], current)
        new_cost = cost(squared(new)) if new is not None else math.inf
        if new_cost < best_cost:
            best, best_cost, current = new, new_cost, new
            adopted += 1
        elif step < steps - 1:  # a failed or worse refit: restart near the best with small noise
            current = best + rng.normal(0.0, 0.01, size=best.shape)
    return best, h, adopted


def _modified_z(r: np.ndarray) -> np.ndarray:
    med = np.median(r)
    mad = np.median(np.abs(r - med))
    return MAD_SCALE * (r - med) / (mad if mad > 0 else 1.0)


def _r2(y: np.ndarray, pred: np.ndarray) -> float | None:
    if len(y) < 2:
        return None
    ss_tot = float(((y - y.mean()) ** 2).sum())
    if ss_tot == 0:
        return None  # R^2 is undefined for constant targets
    return 1.0 - float(((y - pred) ** 2).sum()) / ss_tot


def _rmse(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - pred) ** 2)))


def _as_xy(points) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.asarray(points, dtype=float)
    except (TypeError, ValueError) as e:
        raise FitError(f"points must be a list of (x, y) pairs: {e}") from None
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise FitError(f"points must be a list of (x, y) pairs, got shape {arr.shape}")
    return arr[:, 0].copy(), arr[:, 1].copy()


def fit_points(points: Sequence[tuple[float, float]] | np.ndarray, p_sft: float = 0.0,
               config: FitConfig | None = None, **options) -> FitResult:
    """Fit (x, y) pairs as given (no anchor is added); `options` override fields of `config`.

    Raises `FitError` for NaN/inf values, negative x, or too few points for the parameters.
    """
    config = replace(config or FitConfig(), **options)
    x, y = _as_xy(points)
    for name, v in (("x", x), ("y", y)):
        bad = np.flatnonzero(~np.isfinite(v))
        if len(bad):
            raise FitError(f"point {bad[0]} has a non-finite {name} ({v[bad[0]]})")
    if np.any(x < 0):
        raise FitError(f"point {np.flatnonzero(x < 0)[0]} has a negative x (compute must be >= 0)")
    if not math.isfinite(p_sft):
        raise FitError(f"P_sft is not finite ({p_sft})")
    with _warnings.catch_warnings(), np.errstate(all="ignore"):
        _warnings.simplefilter("ignore", OptimizeWarning)  # pcov is unused; its warning is noise
        return _fit(x, y, float(p_sft), config)


def _split(n: int, config: FitConfig) -> tuple[np.ndarray, np.ndarray]:
    s = config.train_start
    if s >= n:
        raise FitError(f"--train-start {s} leaves no points (the branch has {n})")
    k = config.train_points if config.train_points is not None else int(math.floor(0.85 * (n - s)))
    idx = np.arange(n)
    train = (idx >= s) & (idx < s + k)
    val = idx >= s + k
    return train, val


def _fit(x: np.ndarray, y: np.ndarray, p_sft: float, config: FitConfig) -> FitResult:
    n = len(x)
    train, val = _split(n, config)
    need = config.n_params + 1  # one degree of freedom beyond the parameters
    tx, ty = x[train], y[train]
    tu = 1.0 / (tx + EPS)
    if len(tx) < need:
        raise FitError(f"too few points: {len(tx)} train points for {config.n_params} parameters "
                       f"(need at least {need}; the branch has {n} points)")
    if not np.any(tx > 0):
        raise FitError("too few points: all train points are at x = 0")
    model = _Model(config.free_c0)
    notes: list[str] = []

    def fit_subset(mask: np.ndarray) -> tuple[np.ndarray, int | None]:
        key = mask.tobytes()
        if key not in cache:  # flags may cycle between rounds; a subset's fit is deterministic
            if config.lts_alpha is not None:
                cache[key] = _lts_fit(model, tx[mask], tu[mask], ty[mask], config.lts_alpha,
                                      config.lts_steps, config.seed)
            else:
                cache[key] = _plain_fit(model, tx[mask], tu[mask], ty[mask]), None, None
        return cache[key]

    # Outlier rounds: flags are rebuilt from all train points each round; a repeat ends the loop.
    cache: dict[bytes, tuple[np.ndarray, int | None, int | None]] = {}
    flags = np.zeros(len(tx), dtype=bool)
    params, h, adopted = fit_subset(~flags)
    rounds = 1
    while True:
        new_flags = np.abs(_modified_z(model.residuals(params, tu, ty))) > config.outlier_threshold
        if np.array_equal(new_flags, flags):
            break  # `params` is already the fit of the unflagged points
        if (~new_flags).sum() < need or not np.any(tx[~new_flags] > 0):
            notes.append(f"outlier rejection would leave fewer than {need} points; flags of round "
                         f"{rounds} not applied")
            break
        flags = new_flags
        params, h, adopted = fit_subset(~flags)  # the fit of this round, or the final fit after the last round
        if rounds == config.outlier_rounds:
            notes.append(f"outlier flags did not settle in {config.outlier_rounds} rounds")
            break
        rounds += 1

    A, C_mid, B, C0 = model.full(params)
    fitted_x, fitted_y = tx[~flags], ty[~flags]
    pred = sigmoid(fitted_x, A, C_mid, B, C0)
    counted = np.ones(len(fitted_x), dtype=bool)
    if h is not None:  # under LTS only the h best-fitting points count
        counted[:] = False
        counted[np.argsort((fitted_y - pred) ** 2, kind="stable")[:h]] = True
    r2_train = _r2(fitted_y[counted], pred[counted])
    rmse_train = _rmse(fitted_y[counted], pred[counted])
    if val.any():
        vpred = sigmoid(x[val], A, C_mid, B, C0)
        rmse_val, r2_val = _rmse(y[val], vpred), _r2(y[val], vpred)
    else:
        rmse_val, r2_val = rmse_train, r2_train
        notes.append("no held-out points: rmse_val and r2_val repeat the train values")

    flagged = np.zeros(n, dtype=bool)
    flagged[np.flatnonzero(train)[flags]] = True
    kept = np.zeros(n, dtype=bool)
    kept[np.flatnonzero(train)[~flags][counted]] = True
    result = FitResult(
        A=float(A), C_mid=float(C_mid), B=float(B), C0=float(C0), P_sft=p_sft,
        r2_train=r2_train, rmse_train=rmse_train, rmse_val=rmse_val, r2_val=r2_val,
        x=x, y=y, train=train, val=val, flagged=flagged, kept=kept,
        method="lts" if h is not None else "plain", h=h, outlier_rounds=rounds,
    )
    if adopted == 0:
        notes.append("LTS: no concentration step improved on the initial values (the unbounded refits "
                     "failed or diverged); the parameters are the starting guess")
    result.warnings = notes + _diagnose(result, config)
    return result


def _diagnose(res: FitResult, config: FitConfig) -> list[str]:
    """Flags that tell a reader when the ceiling should not be taken at face value."""
    notes = []
    ty = res.y[res.train]
    if np.ptp(ty) == 0:
        notes.append("flat curve: the train gains do not vary, so C_mid and B are not identified")
    low = int(np.argmin(res.y))
    if res.y[low] < COLLAPSE_GAIN:
        notes.append(f"collapse: the gain falls to {res.y[low]:.2f} at x={res.x[low]:g}; the sigmoid cannot "
                     f"follow a decline, read PL_rl with care")
    if res.A < 0:
        notes.append(f"PL_rl = {res.A:.2f} < 0: RL lowers performance from this checkpoint")
    if res.flagged[0] and res.x[0] == 0:
        notes.append("the anchor (0, 0) was flagged as an outlier")
    if res.r2_train is not None and res.r2_train < 0.5:
        notes.append(f"poor fit: r2_train = {res.r2_train:.2f}")
    if res.C_mid > 10 * res.x[res.train].max():
        notes.append(f"ceiling not identified: C_mid = {res.C_mid:.3g} is over 10x the train compute; the fit "
                     f"behaves as a power law and A = {res.A:.4g} is meaningless")
    elif res.C_mid > res.x[res.train].max():
        notes.append(f"C_mid = {res.C_mid:.3g} lies beyond the train compute ({res.x[res.train].max():g}): "
                     f"the ceiling is an extrapolation")
    if res.method == "plain":
        fitted = res.train & ~res.flagged
        box = _start_and_bounds(res.x[fitted], res.y[fitted], config.free_c0)
        for i, name in enumerate(PARAM_NAMES[: len(box.p0)]):
            value = (res.A, res.C_mid, res.B, res.C0)[i]
            span = box.upper[i] - box.lower[i]
            if min(abs(value - box.lower[i]), abs(value - box.upper[i])) <= 1e-5 * max(span, 1e-12):
                notes.append(f"{name} = {value:.4g} sits at its bound [{box.lower[i]:.4g}, {box.upper[i]:.4g}]")
    if not all(math.isfinite(v) for v in (res.A, res.C_mid, res.B, res.C0)):
        notes.append("the fitted parameters are not finite")
    return notes


def fit_branch(branch, config: FitConfig | None = None, **options) -> FitResult:
    """Fit one `data.Branch` (anchor included); the result carries the branch's SFT step and compute."""
    res = fit_points(np.column_stack([branch.x, branch.y]), branch.p_sft, config, **options)
    res.sft_step, res.sft_exaflops = branch.sft_step, branch.sft_exaflops
    return res


def fit_scene(scene, config: FitConfig | None = None, **options) -> dict[int, FitResult | FitError]:
    """Fit every branch of a `data.Scene`; a branch that cannot be fitted maps to its `FitError`."""
    out: dict[int, FitResult | FitError] = {}
    for step in scene.steps:
        try:
            out[step] = fit_branch(scene.branch(step), config, **options)
        except FitError as e:
            out[step] = e
    return out
