"""The paper's three findings as tests on a sweep's measurements, each with a verdict and its reason.

RETU (arXiv 2512.11470) claims:
  1. Sequential SFT-then-RL reaches a higher ceiling than pure RL and than the synchronized SFT-RL methods
     (LUFFY, SRFT, UPT) at matched compute.
  2. Switching to RL in the SFT Stable or Mild-overfitting sub-phase gives the highest ceiling; switching in the
     Adaptive sub-phase (too early) loses foundation, and Severe overfitting loses plasticity.
  3. Data scale sets the primary potential and difficulty multiplies it; the minimum SFT validation loss
     predicts the final ceiling across scenes.

A branch's score is what it reaches (`branch_score`): its fitted ceiling A_post ± the fit's standard error
(`a_post_se`) where the fit is identified (SE <= IDENTIFIED_SE points, A_post in [0, 100], A not stuck at the fit's bound, and the
sigmoid's midpoint C_mid inside the compute the branch ran, so the asymptote is not extrapolated from a
curve's start), else its smoothed maximum: the best mean of SMOOTH consecutive evaluations, ± the evaluation set's
standard error (`pass1_se`) of that mean. A curve that peaks and falls back is read at its peak, not at its end.
At matched compute (finding 1) every run is scored by its smoothed maximum within the budget: an asymptote
would leave the budget. Two scores differ when |difference| > Z standard errors of the difference (Z = 2).

Verdicts: "reproduced", "not reproduced" (the data contradicts the claim beyond the noise) or "inconclusive"
(the differences are inside the noise, or a comparison is missing); the reason says which numbers decided.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.analysis.fit import FitResult, sigmoid

Z = 2.0  # standard errors that make a difference
IDENTIFIED_SE = 5.0  # points: a fitted A_post with a larger standard error is not read as the branch's ceiling
SMOOTH = 3  # evaluations averaged by the smoothed maximum
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


def pass1_se(p_percent: float, n_prompts: int) -> float:
    """Standard error (points) of one pass@1 evaluation on `n_prompts` prompts. The per-prompt mean of k samples
    has variance at most p(1-p) (k = 1 reaches it), so this bound holds for any number of samples."""
    p = min(max(p_percent / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(max(p * (1 - p), 0.25 / max(n_prompts, 1)) / max(n_prompts, 1))


@dataclass(frozen=True)
class Score:
    """A measured pass@1 (percent) with its standard error, and the compute at which it was measured."""

    value: float
    se: float
    compute: float = 0.0
    rule: str = "measured"  # how the value was read: "A_post", "smoothed max", "last 2"

    def minus(self, other: Score) -> tuple[float, float]:
        """The difference and its standard error (independent evaluations)."""
        return self.value - other.value, math.hypot(self.se, other.se)

    def __str__(self) -> str:
        return f"{self.value:.1f} ± {self.se:.1f}"


def final_score(history: list[dict], n_prompts: int, offset: float = 0.0, last: int = 2) -> Score:
    """Mean of the last `last` evaluations of an RL run (`eval_history`: pass@1 in [0, 1], rl_exaflops)."""
    pts = history[-last:]
    if not pts:
        raise ValueError("no evaluation")
    p = 100.0 * sum(e["pass@1"] for e in pts) / len(pts)
    return Score(p, pass1_se(p, n_prompts) / math.sqrt(len(pts)), offset + pts[-1]["rl_exaflops"], f"last {len(pts)}")


def smoothed_max(history: list[dict], n_prompts: int, offset: float = 0.0, window: int = SMOOTH) -> Score:
    """The best mean of `window` consecutive evaluations (fewer when the run has fewer), at the compute of the
    window's last one. The maximum of noisy means leans high by about one of their standard errors."""
    if not history:
        raise ValueError("no evaluation")
    w = min(window, len(history))
    means = [sum(e["pass@1"] for e in history[i:i + w]) / w for i in range(len(history) - w + 1)]
    i = int(np.argmax(means))
    p = 100.0 * means[i]
    return Score(p, pass1_se(p, n_prompts) / math.sqrt(w), offset + history[i + w - 1]["rl_exaflops"],
                 "smoothed max")


def unidentified(fit: FitResult, se: float) -> str | None:
    """Why a fit's A_post is not read as the branch's ceiling, or None when it is identified."""
    if not math.isfinite(se) or se > IDENTIFIED_SE:
        return f"A_post's SE {se:.1f} > {IDENTIFIED_SE:g}"
    if not 0.0 <= fit.A_post <= 100.0:
        return f"A_post {fit.A_post:.1f} is outside [0, 100]"
    stuck = [w for w in fit.warnings if w.startswith("A = ") and "bound" in w or "meaningless" in w]
    if stuck:
        return f"the fit's asymptote is not pinned ({stuck[0]})"
    if fit.C_mid > float(np.max(fit.x)):
        return f"the sigmoid's midpoint C_mid {fit.C_mid:.3g} lies beyond the compute run ({np.max(fit.x):.3g})"
    return None


def branch_score(history: list[dict], n_prompts: int, fit: FitResult | None = None, p_sft_se: float = 0.0,
                 offset: float = 0.0) -> Score:
    """What an RL branch reaches: its fitted A_post ± SE when the fit is identified (`unidentified`), else its
    smoothed maximum (module docstring)."""
    if fit is not None:
        se = a_post_se(fit, p_sft_se)
        if unidentified(fit, se) is None:
            return Score(fit.A_post, se, offset + history[-1]["rl_exaflops"], "A_post")
    return smoothed_max(history, n_prompts, offset)


def a_post_se(fit: FitResult, p_sft_se: float = 0.0) -> float:
    """Standard error of A_post = P_sft + A: the asymptote's from the fit's Gauss-Newton covariance on the points
    of its final fit (inf when the fit cannot pin it down), combined with P_sft's."""
    x, y = fit.x[fit.kept], fit.y[fit.kept]
    n, k = len(x), 3
    if n <= k:
        return math.inf
    params = np.array([fit.A, fit.C_mid, fit.B])

    def f(p):
        return sigmoid(x, p[0], p[1], p[2], fit.C0)

    jac = np.empty((n, k))
    for j in range(k):
        h = 1e-6 * max(abs(params[j]), 1e-3)
        up, down = params.copy(), params.copy()
        up[j] += h
        down[j] -= h
        jac[:, j] = (f(up) - f(down)) / (2 * h)
    s2 = float(np.sum((y - f(params)) ** 2)) / (n - k)
    try:
        cov = s2 * np.linalg.inv(jac.T @ jac)
    except np.linalg.LinAlgError:
        return math.inf
    var_a = cov[0, 0]
    return math.sqrt(var_a + p_sft_se**2) if np.isfinite(var_a) and var_a >= 0 else math.inf


@dataclass
class Verdict:
    finding: str
    verdict: str
    reason: str
    rows: list[dict] = field(default_factory=list)  # the numbers behind it, for the report's table


def _beats(a: Score, b: Score) -> float:
    d, se = a.minus(b)
    return d / se if se > 0 else math.copysign(math.inf, d) if d else 0.0


def judge_paradigms(sequential: Score, others: dict[str, Score]) -> Verdict:
    """Finding 1: the sequential paradigm against each other paradigm at matched compute."""
    rows = [{"method": "SFT-then-RL", "score": sequential}] + [{"method": k, "score": v} for k, v in others.items()]
    if not others:
        return Verdict("1", INCONCLUSIVE, "no pure RL or synchronized run to compare with", rows)
    z = {k: _beats(sequential, v) for k, v in others.items()}
    worse = [k for k, v in z.items() if v < -Z]
    tied = [k for k, v in z.items() if -Z <= v <= Z]
    if worse:
        return Verdict("1", NOT_REPRODUCED, "at matched compute " + ", ".join(
            f"{k} ({others[k]}) beats SFT-then-RL ({sequential}) by {-z[k]:.1f} SE" for k in worse), rows)
    if tied:
        return Verdict("1", INCONCLUSIVE, f"SFT-then-RL ({sequential}) is within {Z:g} SE of " + ", ".join(
            f"{k} ({others[k]})" for k in tied) + (f"; it beats {', '.join(k for k in z if k not in tied)}"
                                                    if len(tied) < len(z) else ""), rows)
    return Verdict("1", REPRODUCED, f"SFT-then-RL ({sequential}) beats every other paradigm by more than {Z:g} SE "
                   f"(smallest margin: {min(z.values()):.1f} SE, against {min(z, key=z.get)})", rows)


def judge_switch_points(branches: list[tuple[int, str, Score]]) -> Verdict:
    """Finding 2 in one scene: `branches` = (SFT step, sub-phase at the switch, score after RL)."""
    rows = [{"sft_step": s, "subphase": ph, "score": sc} for s, ph, sc in branches]
    good = [(s, sc) for s, ph, sc in branches if ph in ("Stable", "Mild")]
    early = [(s, sc) for s, ph, sc in branches if ph == "Adaptive"]
    late = [(s, sc) for s, ph, sc in branches if ph == "Severe"]
    if not good or not (early or late):
        return Verdict("2", INCONCLUSIVE, "needs a Stable/Mild branch and an Adaptive or Severe one to compare", rows)
    g_step, g = max(good, key=lambda t: t[1].value)
    rivals = early + late
    winners = [(s, sc) for s, sc in rivals if _beats(sc, g) > Z]
    if winners:
        s, sc = max(winners, key=lambda t: t[1].value)
        phase = "Adaptive" if (s, sc) in early else "Severe"
        return Verdict("2", NOT_REPRODUCED, f"the {phase} switch at SFT step {s} ({sc}) beats the best Stable/Mild "
                       f"switch (step {g_step}: {g}) by {_beats(sc, g):.1f} SE", rows)
    lost_early = all(_beats(g, sc) > Z for _, sc in early) if early else None
    lost_late = all(_beats(g, sc) > Z for _, sc in late) if late else None
    parts = []
    if early:
        parts.append(("Adaptive switches lose" if lost_early else "Adaptive switches are within noise of it")
                     + f" (best Adaptive {max(sc.value for _, sc in early):.1f})")
    if late:
        parts.append(("Severe switches lose" if lost_late else "Severe switches are within noise of it")
                     + f" (best Severe {max(sc.value for _, sc in late):.1f})")
    detail = f"best Stable/Mild switch: step {g_step} ({g}); " + "; ".join(parts)
    if lost_early is not False and lost_late is not False:
        return Verdict("2", REPRODUCED, detail, rows)
    return Verdict("2", INCONCLUSIVE, detail, rows)


@dataclass(frozen=True)
class SceneOutcome:
    """One scene for finding 3: its data, its minimum SFT validation loss and its best post-RL score."""

    name: str
    num_train: int
    mix: str
    min_val_loss: float
    best: Score
    a_post: float | None = None


def judge_scenes(scenes: list[SceneOutcome], r_threshold: float = -0.8) -> Verdict:
    """Finding 3: (a) more data -> higher ceiling (uniform scenes); (b) difficulty changes it at equal scale;
    (c) min val loss vs best score: Pearson r <= r_threshold across scenes. For (b) the paper's released 102K
    scenes order the SFT ceilings hard (76.9) > uniform (75.7) > easy (74.8): harder data, higher potential."""
    rows = [{"scene": s.name, "num_train": s.num_train, "mix": s.mix, "min_val_loss": s.min_val_loss,
             "score": s.best, "a_post": s.a_post} for s in scenes]
    if len(scenes) < 3:
        return Verdict("3", INCONCLUSIVE, f"needs at least 3 scenes, has {len(scenes)}", rows)
    parts, ok, bad = [], [], []
    uniform = sorted((s for s in scenes if s.mix == "uniform"), key=lambda s: s.num_train)
    if len(uniform) >= 2:
        lo, hi = uniform[0], uniform[-1]
        z = _beats(hi.best, lo.best)
        drops = [(a.name, b.name) for a, b in zip(uniform, uniform[1:]) if _beats(a.best, b.best) > Z]
        parts.append(f"scale: {' < '.join(f'{s.name} {s.best.value:.1f}' for s in uniform)} "
                     f"(largest vs smallest: {z:+.1f} SE)")
        (bad if z < -Z or drops else ok if z > Z else []).append("scale")
    by_n: dict[int, list[SceneOutcome]] = {}
    for s in scenes:
        by_n.setdefault(s.num_train, []).append(s)
    for n, group in sorted(by_n.items()):
        mixes = {s.mix: s for s in group}
        if "easy" in mixes and "hard" in mixes:  # the paper's order at 102K: hard > uniform > easy
            z = _beats(mixes["hard"].best, mixes["easy"].best)
            parts.append(f"difficulty at {n} examples: " + ", ".join(f"{s.mix} {s.best}" for s in group)
                         + f" (hard vs easy: {z:+.1f} SE)")
            (ok if z > Z else bad if z < -Z else []).append("difficulty")
    losses = np.array([s.min_val_loss for s in scenes])
    scores = np.array([s.best.value for s in scenes])
    if np.ptp(losses) > 0 and np.ptp(scores) > 0:
        r = float(np.corrcoef(losses, scores)[0, 1])
        parts.append(f"min val loss vs best score: Pearson r = {r:.2f} over {len(scenes)} scenes")
        (ok if r <= r_threshold else bad if r >= 0 else []).append("loss-predicts-ceiling")
    if bad:
        return Verdict("3", NOT_REPRODUCED, f"contradicted: {', '.join(bad)}; " + "; ".join(parts), rows)
    if "scale" in ok and "loss-predicts-ceiling" in ok:
        extra = "" if "difficulty" in ok else " (difficulty's effect is within noise)"
        return Verdict("3", REPRODUCED, "; ".join(parts) + extra, rows)
    return Verdict("3", INCONCLUSIVE, "; ".join(parts), rows)
