"""The sweep report's answer to the paper's three findings: a verdict per finding (engine/analysis/findings.py),
the numbers behind it with their standard errors, and the paper's figure for each redrawn from the sweep:

    <run>/finding1_paradigms.png   pass@1 against total compute: SFT-then-RL, pure RL, LUFFY/SRFT/UPT
                                   (engine/plots.py, as the sweep report's paradigms.png)
    <run>/finding2_switch.png      pass@1 after RL by the SFT sub-phase of the switch point, per scene
    <run>/finding3_scenes.png      best pass@1 after RL against the minimum SFT validation loss, per scene
    <run>/findings.json            the verdicts and their numbers
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from engine.analysis import FitResult
from engine.analysis.findings import (
    IDENTIFIED_SE,
    SMOOTH,
    SceneOutcome,
    Score,
    Verdict,
    branch_score,
    judge_paradigms,
    judge_scenes,
    judge_switch_points,
    pass1_se,
    smoothed_max,
)
from engine.analysis.phases import history_min, history_subphases
from engine.plots import A_POST_COLOR, PHASE_COLORS, SFT_COLOR, plot_paradigms
from engine.rundir.files import write_json_atomic

MARKERS = {"uniform": "o", "easy": "^", "hard": "s"}


def _label(key: str, run: dict) -> str:
    return "pure RL" if key == "rl/0" else run["algorithm"].upper()


def scene_labels(job, st: dict) -> dict[int, str]:
    history = st["sft"]["val_history"]
    labels = history_subphases(history, job.sft)
    return {h["step"]: lab for h, lab in zip(history, labels)}


def _sft_exaflops(st: dict, step: int) -> float:
    return next((h["exaflops"] for h in st["sft"]["val_history"] if h["step"] == step), 0.0)


def _fit(fits: dict, step: int) -> FitResult | None:
    fit = fits.get(step)
    return fit if isinstance(fit, FitResult) else None


def branch_scores(st: dict, fits: dict) -> dict[int, Score]:
    """Each RL branch from an SFT checkpoint: what it reaches (`branch_score`), by SFT step."""
    n = st.get("n_eval") or 1
    return {r["init_step"]: branch_score(r["eval_history"], n, _fit(fits, r["init_step"]),
                                         pass1_se(st["sft_pass1"][str(r["init_step"])], n))
            for k, r in st.get("rl", {}).items() if k.startswith("rl/") and r["init_step"] > 0 and r["eval_history"]}


def judge_study(job, state: dict, fits: dict[str, dict]) -> list[Verdict]:
    """The three verdicts. `fits[scene][sft_step]`: the branch's FitResult (or FitError) from the report."""
    verdicts = []
    paradigm_scenes = [s for s in job.sweep.scenes if any(k == "rl/0" or k.startswith("baseline/")
                                                         for k in state["scenes"][s.name].get("rl", {}))]
    for spec in paradigm_scenes[:1]:  # the first scene with pure RL or baselines is the paradigm comparison
        st = state["scenes"][spec.name]
        best = st["sft"]["best"]["step"]
        runs = st["rl"]
        if f"rl/{best}" not in runs:
            verdicts.append(Verdict("1", "inconclusive", f"no RL branch from the min-val-loss step {best}"))
            break
        n = st.get("n_eval") or 1
        seq = smoothed_max(runs[f"rl/{best}"]["eval_history"], n, offset=_sft_exaflops(st, best))
        others = {_label(k, r): smoothed_max(r["eval_history"], n) for k, r in runs.items()
                  if (k == "rl/0" or k.startswith("baseline/")) and r["eval_history"]}
        v = judge_paradigms(seq, others)
        v.reason = f"scene `{spec.name}`, each run's smoothed maximum within the matched budget: " + v.reason
        verdicts.append(v)
    if not verdicts:
        verdicts.append(Verdict("1", "inconclusive", "no scene runs pure RL or a synchronized baseline"))
    per_scene, scores = [], {s.name: branch_scores(state["scenes"][s.name], fits.get(s.name, {}))
                             for s in job.sweep.scenes}
    for spec in job.sweep.scenes:
        labels = scene_labels(job, state["scenes"][spec.name])
        branches = [(step, labels[step], sc) for step, sc in sorted(scores[spec.name].items())]
        if len(branches) >= 3:
            v = judge_switch_points(branches)
            missing = [p for p in ("Adaptive", "Mild", "Severe") if p not in labels.values()]
            if missing:
                v.reason += f" (no {'/'.join(missing)} checkpoint in this scene)"
            per_scene.append((spec.name, v))
    if per_scene:
        order = {"reproduced": 0, "inconclusive": 1, "not reproduced": 2}
        worst = max((v.verdict for _, v in per_scene), key=order.get)
        best_v = min((v.verdict for _, v in per_scene), key=order.get)
        verdict = worst if worst == best_v else "inconclusive" if worst != "not reproduced" else "not reproduced"
        verdicts.append(Verdict("2", verdict, " | ".join(f"scene `{name}`: {v.verdict}: {v.reason}"
                                                          for name, v in per_scene),
                                [dict(r, scene=name) for name, v in per_scene for r in v.rows]))
    else:
        verdicts.append(Verdict("2", "inconclusive", "no scene has 3 or more RL branches from SFT checkpoints"))
    outcomes = []
    for spec in job.sweep.scenes:
        st = state["scenes"][spec.name]
        if not scores[spec.name]:
            continue
        t = job.data.synthetic
        fitted = [f.A_post for f in fits.get(spec.name, {}).values()
                  if isinstance(f, FitResult) and math.isfinite(f.A_post)]
        # on files a scene is its rows as they are: its size is what SFT read, its mix "uniform" (not reweighted)
        size, mix = ((spec.num_train or t.num_train, spec.difficulty_mix or t.difficulty_mix) if t is not None
                     else (st["sft"].get("train_rows", 0), "uniform"))
        outcomes.append(SceneOutcome(spec.name, size, mix,
                                     history_min(st["sft"]["val_history"], job.sft)[1],
                                     max(scores[spec.name].values(), key=lambda s: s.value),
                                     max(fitted) if fitted else None))
    verdicts.append(judge_scenes(outcomes))
    return verdicts


# ---------------------------------------------------------------- figures


def plot_switch(job, state: dict, scenes: list[str], fits: dict, path: Path) -> None:
    fig = Figure(figsize=(max(4.0, 3.6 * len(scenes)), 3.8), layout="constrained")
    axes = fig.subplots(1, len(scenes), squeeze=False)[0]
    for ax, scene in zip(axes, scenes):
        st = state["scenes"][scene]
        labels, scores = scene_labels(job, st), branch_scores(st, fits.get(scene, {}))
        runs = sorted((r for k, r in st["rl"].items() if k.startswith("rl/") and r["init_step"] in scores),
                      key=lambda r: r["init_step"])
        for i, r in enumerate(runs):
            step, sc = r["init_step"], scores[r["init_step"]]
            ax.bar(i, sc.value, yerr=sc.se, color=PHASE_COLORS[labels[step]], edgecolor="#555555", capsize=3,
                   hatch="" if sc.rule == "A_post" else "//")
            ax.plot(i, st["sft_pass1"][str(step)], "_", color=SFT_COLOR, ms=14, mew=2)
            fit = _fit(fits.get(scene, {}), step)
            if fit is not None and math.isfinite(fit.A_post):
                ax.plot(i, min(fit.A_post, 100.0), "D", color=A_POST_COLOR, ms=4)
        ax.set_xticks(range(len(runs)), [f"{r['init_step']}\n{labels[r['init_step']][:5]}" for r in runs],
                      fontsize=7)
        ax.set_title(scene, fontsize=9)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("what the branch reaches (%) ±1 SE")
    handles = [Patch(facecolor=color, edgecolor="#555555", label=label) for label, color in PHASE_COLORS.items()]
    handles += [Line2D([], [], ls="", marker="_", color=SFT_COLOR, ms=10, mew=2, label="before RL (P_sft)"),
                Line2D([], [], ls="", marker="D", color=A_POST_COLOR, ms=4, label="fitted A_post"),
                Patch(facecolor="white", edgecolor="#555555", hatch="//", label="smoothed max (fit not identified)")]
    axes[0].legend(handles=handles, fontsize=6, loc="upper left")
    fig.suptitle("Finding 2: switch point (SFT step, sub-phase) vs pass@1 after the same RL", fontsize=10)
    fig.savefig(path, dpi=110)


def plot_scenes(verdict: Verdict, path: Path) -> None:
    fig = Figure(figsize=(6.2, 4.0), layout="constrained")
    ax = fig.subplots()
    for row in verdict.rows:
        sc: Score = row["score"]
        ax.errorbar(row["min_val_loss"], sc.value, yerr=sc.se, fmt=MARKERS.get(row["mix"], "o"), color=A_POST_COLOR,
                    capsize=3)
        ax.annotate(row["scene"], (row["min_val_loss"], sc.value), fontsize=7, xytext=(4, 3), textcoords="offset points")
    for mix, m in MARKERS.items():
        ax.plot([], [], m, color=A_POST_COLOR, label=f"{mix} mix")
    ax.set_xlabel("minimum SFT validation loss")
    ax.set_ylabel("the best branch's score (%) ±1 SE")
    ax.set_title("Finding 3: the minimum validation loss vs the ceiling, per scene", fontsize=10)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- markdown


def _cell(v) -> str:
    if isinstance(v, Score):
        return f"{v} ({v.rule})"
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    return "n/a" if v is None else str(v)


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def findings_markdown(job, root: Path, state: dict, fits: dict) -> str:
    """The '## Findings' section; writes the three figures and findings.json under `root`. `fits[scene][step]`:
    each branch's FitResult or FitError."""
    verdicts = judge_study(job, state, fits)
    v1, v2, v3 = verdicts
    figs = []
    paradigm = next((s.name for s in job.sweep.scenes if any(k == "rl/0" or k.startswith("baseline/")
                                                             for k in state["scenes"][s.name].get("rl", {}))), None)
    if paradigm:
        plot_paradigms(state["scenes"][paradigm], root / "finding1_paradigms.png",
                       f"Finding 1 ({paradigm}): paradigms at matched compute (dotted: the budget)", best_only=True)
        figs.append("![finding 1](finding1_paradigms.png)")
    switch_scenes = sorted({r["scene"] for r in v2.rows})
    if switch_scenes:
        plot_switch(job, state, switch_scenes, fits, root / "finding2_switch.png")
    if v3.rows:
        plot_scenes(v3, root / "finding3_scenes.png")
    write_json_atomic(root / "findings.json", [
        {"finding": v.finding, "verdict": v.verdict, "reason": v.reason,
         "rows": [{k: ({"value": x.value, "se": x.se, "rule": x.rule, "compute_eflops": x.compute} if isinstance(x, Score) else x)
                   for k, x in r.items()} for r in v.rows]} for v in verdicts])
    claims = {"1": "Sequential SFT-then-RL reaches a higher ceiling than pure RL and the synchronized methods at "
                   "matched compute.",
              "2": "Switching to RL at the SFT Stable or Mild sub-phase gives the highest ceiling; Adaptive (too "
                   "early) loses foundation, Severe overfitting loses plasticity.",
              "3": "Data scale sets the primary potential and difficulty multiplies it; the minimum SFT validation "
                   "loss predicts the ceiling across scenes."}
    figure = {"1": "\n".join(figs), "2": "![finding 2](finding2_switch.png)" if switch_scenes else "",
              "3": "![finding 3](finding3_scenes.png)" if v3.rows else ""}
    parts = [f"""## Findings

Each RL branch is scored by what it reaches (engine/analysis/findings.py `branch_score`): its fitted ceiling
A_post ± the fit's standard error where the fit is identified (SE <= {IDENTIFIED_SE:g} points, A_post in [0, 100], A not at the
fit's bound, the sigmoid's midpoint inside the compute the branch ran), else its smoothed maximum, the best mean of {SMOOTH}
consecutive evaluations ± the evaluation set's standard error of that mean (sqrt(p(1-p)/prompts), an upper bound
for any number of samples per prompt). The tables say which rule gave each number. At matched compute (finding 1)
every run is scored by its smoothed maximum within the budget, since an asymptote would leave the budget. Two
numbers differ when they are more than 2 standard errors of their difference apart.

| finding | verdict |
| --- | --- |
""" + "".join(f"| {v.finding}. {claims[v.finding]} | **{v.verdict}** |\n" for v in verdicts)]
    for v in verdicts:
        parts.append(f"### Finding {v.finding}: {v.verdict}\n\n{claims[v.finding]}\n\n**Why:** {v.reason}.\n\n"
                     f"{_table(v.rows)}\n{figure[v.finding]}\n")
    return "\n".join(parts)
