"""SFT sub-phases from a validation-loss series, and the min-val-loss vs. ceiling correlation.

Given validation losses L_0..L_{n-1} (in order of SFT compute) and L_min = min_i L_i:

    Stable    L_i <= (1 + d1) L_min                                  and every point between the
              first and the last such point (a brief bump inside the stable band stays Stable)
    Adaptive  every point before the first Stable point               (the loss is still falling)
    Mild      (1 + d1) L_min < L_i < (1 + d2) L_min, after the last Stable point
    Severe    L_i >= (1 + d2) L_min, after the last Stable point       (over-fitting has set in)

Defaults d1 = 0.02, d2 = 0.10 (the paper's 1.02 / 1.10 L_min bars). With `window` > 1 the rules read the
mean of that many neighbouring validations (`smooth_losses`): centered for a finished run, trailing online. The minimum itself is always Stable,
so every non-empty series has a Stable point. The rules only look at the series given, so they work
online: call `current_subphase(losses_so_far)` after each validation. Earlier labels may change as a new
minimum arrives; that is the nature of a relative bar.

`ceiling_correlation` is the Pearson correlation between each scene's minimum validation loss and its best
A_post (the paper reports a strong negative one: lower SFT loss, higher ceiling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ADAPTIVE, STABLE, MILD, SEVERE = "Adaptive", "Stable", "Mild", "Severe"
SUBPHASES = (ADAPTIVE, STABLE, MILD, SEVERE)


def _check(losses: Sequence[float], d1: float, d2: float) -> np.ndarray:
    if not 0 <= d1 < d2:
        raise ValueError(f"need 0 <= d1 < d2, got d1={d1}, d2={d2}")
    arr = np.asarray(losses, dtype=float)
    if arr.ndim != 1 or len(arr) == 0:
        raise ValueError("losses must be a non-empty 1-D sequence")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0))
    if len(bad):
        raise ValueError(f"validation loss {bad[0]} is {arr[bad[0]]}: losses must be finite and > 0")
    return arr


def smooth_losses(losses: Sequence[float], window: int = 1, centered: bool = True,
                  steps: Sequence[float] | None = None, spacing: float = 1.0) -> np.ndarray:
    """Each loss replaced by the mean of the validations within `window` validation intervals of it: centered
    (a finished run) or trailing (online, where the next validations are not known yet). Intervals are
    `spacing` steps of `steps` (default: one per position), so points replayed densely (the sweep's
    `fill_mild`) are averaged over the same span of training as the regular ones."""
    arr = np.asarray(losses, dtype=float)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if window == 1:
        return arr
    at = np.arange(len(arr), dtype=float) if steps is None else np.asarray(steps, dtype=float)
    span = (window - 1) * spacing
    lo, hi = (at - span / 2, at + span / 2) if centered else (at - span, at)
    return np.array([arr[(at >= lo[i] - 1e-9) & (at <= hi[i] + 1e-9)].mean() for i in range(len(arr))])


def classify_subphases(losses: Sequence[float], d1: float = 0.02, d2: float = 0.10, window: int = 1,
                       centered: bool = True, steps: Sequence[float] | None = None, spacing: float = 1.0) -> list[str]:
    """One label per loss: "Adaptive", "Stable", "Mild" or "Severe" (rules in the module docstring), judged on
    `smooth_losses(losses, window, centered, steps, spacing)`: a loss that jitters between validations by more
    than the bars would otherwise cross them by chance."""
    arr = smooth_losses(_check(losses, d1, d2), window, centered, steps, spacing)
    l_min = arr.min()
    stable = np.flatnonzero(arr <= (1 + d1) * l_min)
    first, last = stable[0], stable[-1]
    labels = []
    for i, loss in enumerate(arr):
        if i < first:
            labels.append(ADAPTIVE)
        elif i <= last:
            labels.append(STABLE)
        elif loss < (1 + d2) * l_min:
            labels.append(MILD)
        else:
            labels.append(SEVERE)
    return labels


def current_subphase(losses: Sequence[float], d1: float = 0.02, d2: float = 0.10, window: int = 1) -> str:
    """The sub-phase of the latest validation, judged on the series so far (for the SFT trainer's log)."""
    return classify_subphases(losses, d1, d2, window, centered=False)[-1]


def smoothed_min(losses: Sequence[float], window: int = 1, steps: Sequence[float] | None = None,
                 spacing: float = 1.0) -> tuple[int, float]:
    """The index and value of the minimum of the centered `smooth_losses`: a run's Stable point."""
    arr = smooth_losses(losses, window, True, steps, spacing)
    i = int(np.argmin(arr))
    return i, float(arr[i])


def history_subphases(history: list[dict], sft) -> list[str]:
    """The labels of an SFT run's validations (`val_history`: step, val_loss) under its `sft` config: the bars
    `subphase_d1/d2`, means over `subphase_window` intervals of `val_every` steps."""
    return classify_subphases([h["val_loss"] for h in history], sft.subphase_d1, sft.subphase_d2, sft.subphase_window,
                              steps=[h["step"] for h in history], spacing=sft.val_every or 1)


def history_min(history: list[dict], sft) -> tuple[int, float]:
    """The index in `history` and the smoothed loss of an SFT run's Stable point (`smoothed_min`)."""
    return smoothed_min([h["val_loss"] for h in history], sft.subphase_window, [h["step"] for h in history],
                        sft.val_every or 1)


def subphase_reached(losses: Sequence[float], until: str, d1: float = 0.02, d2: float = 0.10,
                     patience: int = 2, window: int = 1) -> str | None:
    """Online: why SFT may stop (`sft.until`), or None. The last `patience` validations all carry the `until`
    sub-phase or a later one ("Mild" counts "Severe"), judged on the series so far."""
    order = {ADAPTIVE: 0, STABLE: 1, MILD: 2, SEVERE: 3}
    if until not in (MILD, SEVERE):
        raise ValueError(f"until must be {MILD!r} or {SEVERE!r}, got {until!r}")
    if len(losses) < patience:
        return None
    labels = classify_subphases(losses, d1, d2, window, centered=False)[-patience:]
    if min(order[lab] for lab in labels) < order[until]:
        return None
    arr = smooth_losses(losses, window, centered=False)
    l_min, last = arr.min(), arr[-1]
    what = "val loss" if window == 1 else f"val loss (mean of the last {window})"
    return (f"{until} sub-phase reached for {patience} validation(s): {what} {last:.4f} = "
            f"{last / l_min:.3f} x the minimum {l_min:.4f} (bars {1 + d1:g} and {1 + d2:g})")


@dataclass(frozen=True)
class SubphaseSpan:
    """A run of consecutive points with one label; indices are inclusive."""

    phase: str
    start: int
    end: int


def stable_confirmed(losses: list[float], d1: float, patience: int) -> bool:
    """Online: the Stable sub-phase is confirmed once the last `patience` + 1 validation losses all lie within
    (1 + d1) of the minimum so far (the switch rule of `ceiling run`)."""
    if len(losses) < patience + 1:
        return False
    return max(losses[-(patience + 1):]) <= (1 + d1) * min(losses)


def subphase_spans(losses: Sequence[float], d1: float = 0.02, d2: float = 0.10) -> list[SubphaseSpan]:
    """The labels of `classify_subphases` as runs, e.g. for shading a plot."""
    labels = classify_subphases(losses, d1, d2)
    spans: list[SubphaseSpan] = []
    for i, label in enumerate(labels):
        if spans and spans[-1].phase == label:
            spans[-1] = SubphaseSpan(label, spans[-1].start, i)
        else:
            spans.append(SubphaseSpan(label, i, i))
    return spans


@dataclass(frozen=True)
class Correlation:
    """Pearson r between minimum validation loss and best A_post over scenes, with its two-sided p-value."""

    r: float
    p_value: float
    n: int


def ceiling_correlation(pairs: Sequence[tuple[float, float]]) -> Correlation:
    """Pearson correlation of (min validation loss, best A_post) pairs, one pair per scene.

    Needs at least 3 finite pairs and variation in both coordinates (otherwise r is undefined).
    """
    from scipy.stats import pearsonr  # scipy import is slow; only this function needs it

    arr = np.asarray(pairs, dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"pairs must be (min_val_loss, A_post) pairs, got shape {arr.shape}")
    if len(arr) < 3:
        raise ValueError(f"need at least 3 scenes for a correlation, got {len(arr)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("pairs contain NaN or inf")
    if np.ptp(arr[:, 0]) == 0 or np.ptp(arr[:, 1]) == 0:
        raise ValueError("a coordinate is constant over all pairs: the correlation is undefined")
    res = pearsonr(arr[:, 0], arr[:, 1])
    return Correlation(float(res.statistic), float(res.pvalue), len(arr))


def best_a_post(results) -> float:
    """The highest finite A_post among fit results (anything with an `A_post` attribute)."""
    values = [r.A_post for r in results if math.isfinite(r.A_post)]
    if not values:
        raise ValueError("no finite A_post among the results")
    return max(values)
