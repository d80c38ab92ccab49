"""Tables and figures of a scene's ceiling fits (the paper's Table 4 and its fit figures).

Table columns (Table 4 first, then diagnostics):
    SFT step | SFT EFLOPs | PL_rl | C_mid | B | P_sft | A_post | R2 train | RMSE val | R2 val | outliers
with PL_rl = A (the asymptotic RL gain) and A_post = P_sft + PL_rl. A branch whose fit failed keeps its row
with the error in the notes.

Figures (matplotlib, drawn on `Figure` objects with the Agg canvas, so no global backend is touched):
    branches.png  one panel per branch: train points, held-out points, flagged outliers, points trimmed by
                  LTS, unused points (before --train-start), and the fitted curve with its asymptote A
    a_post.png    A_post = P_sft + PL_rl per SFT checkpoint vs SFT compute (`engine.plots.plot_a_post`, shared
                  with the sweep report)
    early_stop.png  per branch, the A_post predicted after each evaluation, the stop and the full-fit A_post
                  (with early_stop.md/.json from `early_stop.replay_scene`; see `ceiling fit --early-stop`)
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.analysis.fit import FitError, FitResult

COLUMNS = ("SFT step", "SFT EFLOPs", "PL_rl", "C_mid", "B", "P_sft", "A_post",
           "R2 train", "RMSE val", "R2 val", "outliers")


@dataclass(frozen=True)
class Row:
    """One table row: the step, its compute and either a fit or the error that stopped it."""

    sft_step: int
    sft_exaflops: float
    fit: FitResult | None
    error: str | None = None

    def cells(self) -> list[str]:
        head = [str(self.sft_step), f"{self.sft_exaflops:.2f}"]
        if self.fit is None:
            return head + ["—"] * (len(COLUMNS) - 2)
        f = self.fit
        return head + [_num(f.PL_rl), _num(f.C_mid), _num(f.B), _num(f.P_sft), _num(f.A_post),
                       _num(f.r2_train, 3), _num(f.rmse_val), _num(f.r2_val, 3), str(f.n_outliers)]

    def to_dict(self) -> dict:
        base = {"sft_step": self.sft_step, "sft_exaflops": self.sft_exaflops}
        if self.fit is None:
            return base | {"error": self.error}
        return base | self.fit.to_dict()


def _num(v: float | None, digits: int = 2) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.3g}"


def rows_from(results: dict[int, FitResult | FitError], scene) -> list[Row]:
    """Table rows in SFT-step order from `fit.fit_scene` output."""
    rows = []
    for step, res in sorted(results.items()):
        c = scene.branch(step).sft_exaflops
        if isinstance(res, FitResult):
            rows.append(Row(step, c, res))
        else:
            rows.append(Row(step, c, None, str(res)))
    return rows


def markdown_table(rows: list[Row], title: str | None = None) -> str:
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "|".join(" ---: " for _ in COLUMNS) + "|")
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    notes = _notes(rows)
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _notes(rows: list[Row]) -> list[str]:
    out = []
    for r in rows:
        if r.error:
            out.append(f"- step {r.sft_step}: fit failed: {r.error}")
        elif r.fit is not None:
            out += [f"- step {r.sft_step}: {w}" for w in r.fit.warnings]
    return out


def csv_table(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    keys = ["sft_step", "sft_exaflops", "PL_rl", "C_mid", "B", "C0", "P_sft", "A_post", "r2_train",
            "rmse_train", "rmse_val", "r2_val", "n_train", "n_val", "n_outliers", "method", "error"]
    writer.writerow(keys)
    for r in rows:
        d = r.to_dict()
        writer.writerow(["" if d.get(k) is None else d.get(k) for k in keys])
    return buf.getvalue()


def write_tables(rows: list[Row], out_dir: Path, title: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "table.md", "csv": out_dir / "table.csv", "json": out_dir / "table.json"}
    paths["md"].write_text(markdown_table(rows, title))
    paths["csv"].write_text(csv_table(rows))
    paths["json"].write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    return paths


def identified(fit: FitResult) -> bool:
    """False where the ceiling is not a number to plot (non-finite, or C_mid far beyond the data)."""
    vals = (fit.A, fit.C_mid, fit.B, fit.C0)
    return all(math.isfinite(v) for v in vals) and fit.C_mid <= 10 * fit.x[fit.train].max()


def _draw_branch(ax, fit: FitResult, title: str) -> None:
    x, y = fit.x, fit.y
    fitted = fit.train & ~fit.flagged
    trimmed = fitted & ~fit.kept  # fitted points that LTS left out of its h
    unused = ~fit.train & ~fit.val
    ax.scatter(x[fit.kept], y[fit.kept], s=14, color="tab:blue", label="train", zorder=3)
    if trimmed.any():
        ax.scatter(x[trimmed], y[trimmed], s=14, facecolors="none", edgecolors="tab:blue",
                   label="trimmed (LTS)", zorder=3)
    if fit.val.any():
        ax.scatter(x[fit.val], y[fit.val], s=14, color="tab:orange", label="held-out", zorder=3)
    if fit.flagged.any():
        ax.scatter(x[fit.flagged], y[fit.flagged], s=28, marker="x", color="tab:red", label="outlier",
                   zorder=4)
    if unused.any():
        ax.scatter(x[unused], y[unused], s=10, color="0.6", label="unused", zorder=2)
    grid = np.linspace(0.0, x.max() * 1.05, 300)
    ax.plot(grid, fit.predict(grid), color="k", lw=1.2, label="fit")
    if identified(fit):
        ax.axhline(fit.A, color="k", ls=":", lw=0.8)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def plot_branches(rows: list[Row], path: Path, scene_name: str) -> Path:
    """One panel per fitted branch (gain vs. RL EFLOPs) in a grid."""
    from matplotlib.figure import Figure

    fits = [r for r in rows if r.fit is not None]
    ncols = min(4, max(1, len(fits)))
    nrows = max(1, math.ceil(len(fits) / ncols))
    fig = Figure(figsize=(3.4 * ncols, 2.7 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, r in zip(axes.flat, fits):
        f = r.fit
        warn = " (!)" if f.warnings else ""
        _draw_branch(ax, f, f"SFT step {r.sft_step} ({r.sft_exaflops:.1f} EF){warn}\n"
                            f"PL_rl={_num(f.PL_rl)}  A_post={_num(f.A_post)}  R²={_num(f.r2_train, 2)}")
    for ax in list(axes.flat)[len(fits):]:
        ax.set_visible(False)
    if fits:
        handles, labels = {}, {}
        for ax in axes.flat[: len(fits)]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
                labels[lab] = lab
        fig.legend(list(handles.values()), list(labels), loc="outside lower center", ncols=len(labels),
                   fontsize=8)
    fig.suptitle(f"{scene_name}: gain over P_sft (points) vs. RL EFLOPs since the SFT checkpoint"
                 f"   ((!) = see warnings)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---- early stopping (engine.analysis.early_stop) ------------------------------------------------------

EARLY_STOP_COLUMNS = ("SFT step", "points used/total", "{unit} used/total", "compute saved", "A_post at stop",
                      "A_post full", "abs. error", "last observed")


def early_stop_markdown(results: list, title: str | None = None, compute_unit: str = "EFLOPs") -> str:
    """The early-stop table of `early_stop.replay_scene` output, a summary line and why branches ran on.
    `compute_unit` names the scene's compute unit (a `ceiling sweep` scene is in GFLOPs)."""
    columns = [c.format(unit=compute_unit) for c in EARLY_STOP_COLUMNS]
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join(" ---: " for _ in columns) + "|")
    for r in results:
        cells = [str(r.sft_step), f"{r.points_used}/{r.n_total}", f"{r.x_stop:.1f}/{r.x_total:.1f}",
                 f"{100 * r.saved:.1f}%", _num(r.a_post_stop), _num(r.a_post_full), _num(r.error),
                 _num(r.last_observed)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", early_stop_summary(results, compute_unit)]
    notes = [f"- step {r.sft_step}: {r.why_not_stopped()}" for r in results if not r.stopped]
    notes += [f"- step {r.sft_step}: reference fit failed: {r.reference_error}" for r in results
              if r.reference_error]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def early_stop_summary(results: list, compute_unit: str = "EFLOPs") -> str:
    """One line: branches stopped, compute saved over the scene, error of the stopped ones."""
    stopped = [r for r in results if r.stopped]
    total = sum(r.x_total for r in results)
    saved = 1.0 - sum(r.x_stop for r in results) / total if total > 0 else 0.0
    errors = [r.error for r in stopped if r.error is not None]
    err = (f"|error| median {float(np.median(errors)):.2f}, max {max(errors):.2f} points" if errors
           else "no error to report")
    return (f"Stopped {len(stopped)} of {len(results)} branches early; {100 * saved:.1f}% of the scene's RL "
            f"{compute_unit} saved; {err} (A_post at the stop vs. the full-branch fit).")


def write_early_stop_tables(results: list, out_dir: Path, title: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "early_stop.md", "json": out_dir / "early_stop.json"}
    paths["md"].write_text(early_stop_markdown(results, title))
    paths["json"].write_text(json.dumps([r.to_dict() for r in results], indent=2, allow_nan=False) + "\n")
    return paths


def plot_early_stop(results: list, path: Path, scene_name: str) -> Path:
    """One panel per branch: the predicted A_post after each evaluation vs. RL EFLOPs, the observed
    performance, the stop (star and dashed line) and the full-branch A_post (horizontal line).

    The y range follows the observed performance (its lowest 5% left out) and the full-fit ceiling; a
    prediction outside it is drawn as a triangle on the edge, so one wild early refit or a collapse does not
    flatten the panel.
    """
    from matplotlib.figure import Figure

    ncols = min(4, max(1, len(results)))
    nrows = max(1, math.ceil(len(results) / ncols))
    fig = Figure(figsize=(3.4 * ncols, 2.6 * nrows + 0.7), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, r in zip(axes.flat, results):
        xs = np.array([t.x for t in r.trajectory])
        preds = np.array([np.nan if t.a_post is None else t.a_post for t in r.trajectory])
        observed = r.p_sft + r.y
        ref = [r.a_post_full] if r.a_post_full is not None and math.isfinite(r.a_post_full) else []
        # A collapse (gain -50) would flatten the panel: the range ignores the lowest 5% of the observations.
        lo = min(float(np.percentile(observed, 5)), *ref, r.p_sft) - 1.5
        hi = max(float(observed.max()), *ref, r.p_sft) + 1.5
        ax.plot(r.x, observed, ".", color="0.65", ms=3, label="observed", zorder=1)
        ok = np.isfinite(preds)
        inside = ok & (preds >= lo) & (preds <= hi)
        ax.plot(xs[ok], np.clip(preds[ok], lo, hi), color="tab:blue", lw=1.0, zorder=2)
        ax.plot(xs[inside], preds[inside], "o", color="tab:blue", ms=2.5, label="predicted A_post", zorder=3)
        for side, mask, marker in (("above", ok & (preds > hi), "^"), ("below", ok & (preds < lo), "v")):
            if mask.any():
                ax.plot(xs[mask], np.full(mask.sum(), hi if side == "above" else lo), marker, color="tab:blue",
                        ms=4, label="off scale", zorder=3)
        if ref:
            ax.axhline(ref[0], color="k", ls="-", lw=0.9, label="A_post full fit", zorder=1)
        if r.stopped:
            ax.axvline(r.x_stop, color="tab:red", ls="--", lw=0.9, zorder=1)
            ax.plot([r.x_stop], [min(max(r.a_post_stop, lo), hi)], "*", color="tab:red", ms=10,
                    label="stop", zorder=4)
            head = (f"stop {r.points_used}/{r.n_total} pts, saved {100 * r.saved:.0f}%, "
                    f"|err| {_num(r.error)}")
        else:
            head = f"never stable ({r.n_total} pts)"
        pad = 0.04 * (hi - lo)  # room for the off-scale triangles drawn on the edges
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlim(0, r.x_total * 1.03)
        ax.set_title(f"SFT step {r.sft_step}: {head}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(results):]:
        ax.set_visible(False)
    handles: dict = {}
    for ax in axes.flat[: len(results)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=len(handles),
                   fontsize=8)
    cfg = results[0].config if results else None
    rule = f" (tol {cfg.tol:g}, patience {cfg.patience}, min points {cfg.min_points})" if cfg else ""
    fig.suptitle(f"{scene_name}: predicted A_post (%) vs. RL EFLOPs, refit after each evaluation{rule}",
                 fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
