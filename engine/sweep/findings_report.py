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

from engine.analysis import classify_subphases
from engine.analysis.findings import (
    SceneOutcome,
    Score,
    Verdict,
    final_score,
    judge_paradigms,
    judge_scenes,
    judge_switch_points,
)
from engine.plots import A_POST_COLOR, PHASE_COLORS, SFT_COLOR, plot_paradigms
from engine.rundir.files import write_json_atomic

MARKERS = {"uniform": "o", "easy": "^", "hard": "s"}


def _label(key: str, run: dict) -> str:
    return "pure RL" if key == "rl/0" else run["algorithm"].upper()


def scene_labels(job, st: dict) -> dict[int, str]:
    history = st["sft"]["val_history"]
    labels = classify_subphases([h["val_loss"] for h in history], job.sft.subphase_d1, job.sft.subphase_d2)
    return {h["step"]: lab for h, lab in zip(history, labels)}


def _sft_exaflops(st: dict, step: int) -> float:
    return next((h["exaflops"] for h in st["sft"]["val_history"] if h["step"] == step), 0.0)


def judge_study(job, state: dict, a_posts: dict[str, dict[int, tuple[float, float]]]) -> list[Verdict]:
    """The three verdicts. `a_posts[scene][sft_step] = (A_post, se)` from the fits (may be empty)."""
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
        seq = final_score(runs[f"rl/{best}"]["eval_history"], n, offset=_sft_exaflops(st, best))
        others = {_label(k, r): final_score(r["eval_history"], n) for k, r in runs.items()
                  if (k == "rl/0" or k.startswith("baseline/")) and r["eval_history"]}
        v = judge_paradigms(seq, others)
        v.reason = f"scene `{spec.name}`: " + v.reason
        verdicts.append(v)
    if not verdicts:
        verdicts.append(Verdict("1", "inconclusive", "no scene runs pure RL or a synchronized baseline"))
    per_scene = []
    for spec in job.sweep.scenes:
        st = state["scenes"][spec.name]
        labels, n = scene_labels(job, st), st.get("n_eval") or 1
        branches = [(r["init_step"], labels[r["init_step"]], final_score(r["eval_history"], n))
                    for k, r in sorted(st.get("rl", {}).items(), key=lambda kv: kv[1]["init_step"])
                    if k.startswith("rl/") and r["init_step"] > 0 and r["eval_history"]]
        if len(branches) >= 3:
            v = judge_switch_points(branches)
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
        n = st.get("n_eval") or 1
        scores = [final_score(r["eval_history"], n) for k, r in st.get("rl", {}).items()
                  if k.startswith("rl/") and r["init_step"] > 0 and r["eval_history"]]
        if not scores:
            continue
        t = job.data.synthetic
        fitted = [a for a, _ in a_posts.get(spec.name, {}).values() if math.isfinite(a)]
        outcomes.append(SceneOutcome(spec.name, spec.num_train or t.num_train, spec.difficulty_mix or t.difficulty_mix,
                                     min(h["val_loss"] for h in st["sft"]["val_history"]),
                                     max(scores, key=lambda s: s.value), max(fitted) if fitted else None))
    verdicts.append(judge_scenes(outcomes))
    return verdicts


# ---------------------------------------------------------------- figures


def plot_switch(job, state: dict, scenes: list[str], a_posts: dict, path: Path) -> None:
    fig = Figure(figsize=(max(4.0, 3.6 * len(scenes)), 3.8), layout="constrained")
    axes = fig.subplots(1, len(scenes), squeeze=False)[0]
    for ax, scene in zip(axes, scenes):
        st = state["scenes"][scene]
        labels, n = scene_labels(job, st), st.get("n_eval") or 1
        runs = sorted((r for k, r in st["rl"].items() if k.startswith("rl/") and r["init_step"] > 0),
                      key=lambda r: r["init_step"])
        for i, r in enumerate(runs):
            step, sc = r["init_step"], final_score(r["eval_history"], n)
            ax.bar(i, sc.value, yerr=sc.se, color=PHASE_COLORS[labels[step]], edgecolor="#555555", capsize=3)
            ax.plot(i, st["sft_pass1"][str(step)], "_", color=SFT_COLOR, ms=14, mew=2)
            a = a_posts.get(scene, {}).get(step)
            if a and math.isfinite(a[0]):
                ax.plot(i, min(a[0], 100.0), "D", color=A_POST_COLOR, ms=4)
        ax.set_xticks(range(len(runs)), [f"{r['init_step']}\n{labels[r['init_step']][:5]}" for r in runs],
                      fontsize=7)
        ax.set_title(scene, fontsize=9)
        ax.set_ylim(0, 100)
    axes[0].set_ylabel("pass@1 after RL (%) ±1 SE")
    handles = [Patch(facecolor=color, edgecolor="#555555", label=label) for label, color in PHASE_COLORS.items()]
    handles += [Line2D([], [], ls="", marker="_", color=SFT_COLOR, ms=10, mew=2, label="before RL (P_sft)"),
                Line2D([], [], ls="", marker="D", color=A_POST_COLOR, ms=4, label="fitted A_post")]
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
    ax.set_ylabel("best pass@1 after RL (%) ±1 SE")
    ax.set_title("Finding 3: the minimum validation loss vs the ceiling, per scene", fontsize=10)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- markdown


def _cell(v) -> str:
    if isinstance(v, Score):
        return str(v)
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


def findings_markdown(job, root: Path, state: dict, a_posts: dict) -> str:
    """The '## Findings' section; writes the three figures and findings.json under `root`."""
    verdicts = judge_study(job, state, a_posts)
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
        plot_switch(job, state, switch_scenes, a_posts, root / "finding2_switch.png")
    if v3.rows:
        plot_scenes(v3, root / "finding3_scenes.png")
    write_json_atomic(root / "findings.json", [
        {"finding": v.finding, "verdict": v.verdict, "reason": v.reason,
         "rows": [{k: ({"value": x.value, "se": x.se, "compute_eflops": x.compute} if isinstance(x, Score) else x)
                   for k, x in r.items()} for r in v.rows]} for v in verdicts])
    claims = {"1": "Sequential SFT-then-RL reaches a higher ceiling than pure RL and the synchronized methods at "
                   "matched compute.",
              "2": "Switching to RL at the SFT Stable or Mild sub-phase gives the highest ceiling; Adaptive (too "
                   "early) loses foundation, Severe overfitting loses plasticity.",
              "3": "Data scale sets the primary potential and difficulty multiplies it; the minimum SFT validation "
                   "loss predicts the ceiling across scenes."}
    figure = {"1": "\n".join(figs), "2": "![finding 2](finding2_switch.png)" if switch_scenes else "",
              "3": "![finding 3](finding3_scenes.png)" if v3.rows else ""}
    parts = ["""## Findings

Each finding is judged on measured pass@1 after RL: the mean of a run's last two evaluations, ± one standard
error from the evaluation set (sqrt(p(1-p)/prompts), an upper bound for any number of samples per prompt).
Two numbers differ when they are more than 2 standard errors of their difference apart. A_post (the fitted
ceiling, ± the fit's standard error) is in the tables below; a tiny branch gives its fit few points.

| finding | verdict |
| --- | --- |
""" + "".join(f"| {v.finding}. {claims[v.finding]} | **{v.verdict}** |\n" for v in verdicts)]
    for v in verdicts:
        parts.append(f"### Finding {v.finding}: {v.verdict}\n\n{claims[v.finding]}\n\n**Why:** {v.reason}.\n\n"
                     f"{_table(v.rows)}\n{figure[v.finding]}\n")
    return "\n".join(parts)
