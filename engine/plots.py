"""The figures that several reports draw, and their shared look. The pipeline's report (engine/report.py),
the sweep's (engine/sweep/report.py), its findings (engine/sweep/findings_report.py) and `ceiling fit`
(engine/analysis/cli.py) import these, so a sub-phase or a paradigm has one color in every report.

    shade_subphases(ax, xs, labels)     validation intervals shaded Adaptive / Stable / Mild / Severe
    plot_a_post(rows, path, scene)      the ceiling A_post = P_sft + PL_rl per SFT checkpoint vs SFT compute
    plot_paradigms(st, path, title)     pass@1 vs total compute: pure SFT, SFT-then-RL, pure RL, baselines

Drawn on `Figure` objects (the Agg canvas), so no global matplotlib backend is touched.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib import colormaps
from matplotlib.figure import Figure

from engine.analysis.findings import pass1_se
from engine.analysis.report import Row, identified

PHASE_COLORS = {"Adaptive": "#dbe9f6", "Stable": "#d5f0d5", "Mild": "#fbeccb", "Severe": "#f7d4d4"}
GFLOPS_PER_EFLOPS = 1e9  # tiny runs report compute in GFLOPs: their EFLOPs would round to 0
SFT_COLOR, A_POST_COLOR = "#1f4e79", "#c55a11"
PARADIGM_COLORS = {"SFT": "#7f7f7f", "SFT-then-RL": "#c55a11", "pure RL": "#1f4e79", "LUFFY": "#7030a0",
                   "SRFT": "#00b050", "UPT": "#ff0000"}


def shade_subphases(ax, xs: list[float], labels: list[str]) -> None:
    """Shade the interval up to each validation `xs[i]` (from the previous one, or 0) by its sub-phase, and
    put every sub-phase in the legend."""
    for i, label in enumerate(labels):
        ax.axvspan(xs[i - 1] if i else 0.0, xs[i], color=PHASE_COLORS[label], lw=0)
    for label, color in PHASE_COLORS.items():
        ax.fill_between([], [], color=color, label=label)


def plot_a_post(rows: list[Row], path: Path, scene_name: str, *, unit: str = "EFLOPs",
                sft_curve: list[tuple[float, float]] | None = None,
                subphases: list[tuple[float, str]] | None = None) -> Path:
    """Per fitted branch (`engine.analysis.report.Row`): P_sft at its SFT compute and a bar up (or down) to
    A_post = P_sft + PL_rl. `sft_curve` [(compute, pass@1)] adds the pure-SFT curve, `subphases`
    [(compute, label)] the sub-phase shading. A failed fit or an unidentified ceiling is marked, not drawn."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    if subphases:
        shade_subphases(ax, [x for x, _ in subphases], [lab for _, lab in subphases])
    if sft_curve:
        ax.plot([x for x, _ in sft_curve], [p for _, p in sft_curve], "-", color=SFT_COLOR, lw=1,
                label="pure SFT pass@1")
    for r in rows:
        x, f = r.sft_exaflops, r.fit
        if f is None:
            ax.axvline(x, color="#7f7f7f", ls=":", lw=1)
            ax.annotate("fit failed", (x, 0.02), xycoords=("data", "axes fraction"), rotation=90, fontsize=7)
            continue
        ax.plot(x, f.P_sft, "o", color=SFT_COLOR, ms=4)
        if not identified(f):
            ax.annotate("ceiling n/a", (x, f.P_sft), fontsize=7, xytext=(3, 3), textcoords="offset points")
            continue
        ax.vlines(x, f.P_sft, f.A_post, color=A_POST_COLOR if f.PL_rl >= 0 else "tab:red", lw=2)
        ax.plot(x, f.A_post, "D", color=A_POST_COLOR, ms=5)
        ax.annotate(f"{f.A_post:.1f}", (x, f.A_post), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([], [], "o", color=SFT_COLOR, ms=4, label="P_sft (SFT checkpoint)")
    ax.plot([], [], "D-", color=A_POST_COLOR, label="A_post = P_sft + PL_rl")
    ax.set_xlabel(f"SFT compute ({unit})")
    ax.set_ylabel("pass@1 (%)")
    ax.set_title(f"{scene_name}: ceiling A_post = P_sft + PL_rl vs SFT compute", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _band(ax, xs, ys, n_eval: int, color, label, **kw) -> None:
    """A curve with its ±1 standard error band (the evaluation set's, engine.analysis.findings.pass1_se)."""
    ax.plot(xs, ys, marker=".", color=color, label=label, **kw)
    se = [pass1_se(y, n_eval) for y in ys]
    ax.fill_between(xs, [y - s for y, s in zip(ys, se)], [y + s for y, s in zip(ys, se)], color=color,
                    alpha=0.12, lw=0)


def plot_paradigms(st: dict, path: Path, title: str, *, best_only: bool = False) -> Path:
    """One sweep scene (`Sweep.state()["scenes"][name]`): pass@1 against total compute (SFT + RL, GFLOPs), ±1 SE.
    Pure SFT, SFT-then-RL from every checkpoint (`best_only`: from the min-val-loss one, finding 1's
    comparison), pure RL and the synchronized baselines; a dotted line marks a matched-compute budget."""
    gf, n = GFLOPS_PER_EFLOPS, st.get("n_eval") or 1
    history, best = st["sft"]["val_history"], st["sft"]["best"]["step"]
    sft_x = {0: 0.0} | {h["step"]: gf * h["exaflops"] for h in history}
    shown = [h for h in history if (not best_only or h["step"] <= best) and str(h["step"]) in st["sft_pass1"]]
    fig = Figure(figsize=(7.5, 4.3), layout="constrained")
    ax = fig.subplots()
    _band(ax, [0.0] + [sft_x[h["step"]] for h in shown],
          [st["sft_pass1"]["0"]] + [st["sft_pass1"][str(h["step"])] for h in shown], n, PARADIGM_COLORS["SFT"],
          "pure SFT" + (" (to the min-val-loss step)" if best_only else ""), ms=3)
    runs = sorted(st.get("rl", {}).items(), key=lambda kv: (kv[0].startswith("baseline/"), kv[1]["init_step"], kv[0]))
    for key, run in runs:
        step = run["init_step"]
        if key.startswith("baseline/"):
            label = run["algorithm"].upper()
            style = dict(color=PARADIGM_COLORS.get(label, "k"), lw=1.2, ls="--")
        elif step == 0:
            label, style = "pure RL", dict(color=PARADIGM_COLORS["pure RL"], lw=1.5)
        elif best_only and step != best:
            continue
        else:
            shade = colormaps["Oranges"](0.35 + 0.6 * step / max(sft_x))  # later SFT checkpoints: darker
            label = f"SFT({step})-then-RL"
            style = dict(color=PARADIGM_COLORS["SFT-then-RL"] if step == best else shade, lw=2 if step == best else 1)
        ev = run["eval_history"]
        offset = 0.0 if key.startswith("baseline/") else sft_x[step]
        _band(ax, [offset + gf * e["rl_exaflops"] for e in ev], [100 * e["pass@1"] for e in ev], n,
              label=label, **style)
        if run.get("budget"):
            ax.axvline(gf * run["budget"]["exaflops"], color="#999999", lw=0.8, ls=":")
    ax.set_xlabel("total compute (GFLOPs: SFT + RL, Appendix C)")
    ax.set_ylabel("pass@1 (%), band: ±1 SE")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
