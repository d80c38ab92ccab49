"""The report of a `ceiling sweep`: per scene a RETU scene, its ceiling fits, a table and two figures.

    <run>/<scene>/scene.json      the scene in the RETU format (compute in GFLOPs), read by `ceiling fit`
    <run>/<scene>/table.md        Table 4 in miniature: SFT step, sub-phase, SFT compute, P_sft, PL_rl, C_mid,
                                  B, A_post, and RL compute used vs planned (early stopping)
    <run>/<scene>/a_post.png      A_post = P_sft + PL_rl against SFT compute, shaded by SFT sub-phase
    <run>/<scene>/paradigms.png   performance against total compute: pure SFT, pure RL, SFT-then-RL, baselines
    <run>/table.md, <run>/sweep_report.md   all scenes, the early-stop replay and the branch it would pick, the
                                  compute spent per item against a full sweep (and where and how long each ran),
                                  and the min-val-loss / A_post correlation (>= 3 scenes)
A branch whose fit fails (too few points, all at x = 0) shows "n/a" and the reason; nothing crashes. The
two figures are engine/plots.py's, shared with the findings and `ceiling fit`.
"""

from __future__ import annotations

import math
from pathlib import Path

from engine.analysis import (
    FitResult,
    ceiling_correlation,
    fit_scene,
    load_scene,
    replay_scene,
)
from engine.analysis.early_stop import decide
from engine.analysis.findings import a_post_se, pass1_se
from engine.analysis.phases import SUBPHASES, history_subphases
from engine.analysis.report import early_stop_markdown, rows_from
from engine.plots import GFLOPS_PER_EFLOPS, plot_a_post, plot_paradigms
from engine.rundir.files import write_json_atomic
from engine.sweep.race import per_branch_rule


def _gf(exaflops: float, digits: int = 2) -> float:
    return round(exaflops * GFLOPS_PER_EFLOPS, digits)


def _point(p: float) -> dict:
    return {"scores": {"synthetic": round(p, 2)}, "overall": round(p, 2)}


def scene_json(name: str, st: dict) -> dict:
    """A sweep scene in the RETU format: sft = base + every SFT checkpoint, rl = {"0": pure RL, "<step>": ...}."""
    pass1 = st["sft_pass1"]
    history = [h for h in st["sft"]["val_history"] if str(h["step"]) in pass1]  # the evaluated checkpoints
    cache = {"0": 0.0} | {str(h["step"]): _gf(h["exaflops"]) for h in history}
    sft = [{"exaflops": 0.0, **_point(pass1["0"])}]
    sft += [{"exaflops": cache[str(h["step"])], **_point(pass1[str(h["step"])])} for h in history]
    rl, baselines = {}, {}
    for key, run in st.get("rl", {}).items():
        pts = [{"rl_exaflops": _gf(e["rl_exaflops"], 4), **_point(100 * e["pass@1"])} for e in run["eval_history"][1:]]
        if key.startswith("rl/") and pts:  # a branch with no evaluation after its start cannot be a RETU branch
            rl[str(run["init_step"])] = pts
        elif key.startswith("baseline/"):
            baselines[run["algorithm"]] = [{"rl_exaflops": _gf(e["rl_exaflops"], 4), **_point(100 * e["pass@1"])}
                                           for e in run["eval_history"]]
    return {
        "scene": name, "model": "ceiling-engine sweep", "rl_algorithm": "see config.yaml",
        "units": {"exaflops": "cumulative SFT compute in GFLOPs (1e9 FLOPs)", "rl_exaflops": "RL compute in GFLOPs",
                  "scores": "pass@1 in percent"},
        "benchmarks": {"synthetic": st.get("n_eval", 1)},
        "sft_steps": [0] + [h["step"] for h in history],
        "sft_step_cache_exaflops": cache,
        "sft": sft,
        "rl": dict(sorted(rl.items(), key=lambda kv: int(kv[0]))),
        "baselines": baselines,
    }


def _n(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _smoothed(best: dict, cfg) -> str:
    if cfg.subphase_window == 1 or "smoothed_val_loss" not in best:
        return ""
    return (f" (the lowest mean of {cfg.subphase_window} neighbouring validations, {best['smoothed_val_loss']:.4f}: "
            f"sub-phases are judged on those means, `sft.subphase_window`)")


def sft_end(sft: dict, labels: list[str]) -> str:
    """How a scene's SFT ended (`sft.until`), and the sub-phases it has no checkpoint in."""
    until = sft.get("until") or {"target": "steps"}
    missing = [p for p in SUBPHASES if p not in labels]
    gap = f" No {'/'.join(missing)} checkpoint to branch from." if missing else ""
    if until["target"] == "steps":
        return gap.strip()
    filled = until.get("filled")
    if filled:
        gap = (f" The loss went from Stable to Severe between two validations, so steps {filled[0]}-{filled[1]} were "
               f"replayed from the Stable checkpoint with a validation at each (`sft_fill/`).") + gap
    if until["stopped"]:
        return f"It stopped at step {until['stopped']['step']}: {until['stopped']['reason']}.{gap}"
    return (f"**It hit its cap of {until['cap']} steps before reaching the {until['target'].capitalize()} "
            f"sub-phase**: sub-phases seen {', '.join(p for p in SUBPHASES if p in labels)}.{gap}")


def scene_table(st: dict, results: dict, subphase: dict[int, str]) -> tuple[str, list[dict]]:
    """The markdown table (one row per RL branch, pure RL first) and the same rows as dicts. P_sft and A_post
    carry one standard error (evaluation set; fit covariance)."""
    history = {h["step"]: h for h in st["sft"]["val_history"]}
    n_eval = st.get("n_eval") or 1
    lines = ["| SFT step | sub-phase | SFT compute (GFLOPs) | P_sft ± SE | PL_rl | C_mid | B | A_post ± SE | "
             "RL steps used/planned | RL compute (GFLOPs) |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows, notes = [], []
    for run in sorted((r for k, r in st.get("rl", {}).items() if k.startswith("rl/")), key=lambda r: r["init_step"]):
        step = run["init_step"]
        res = results.get(step)
        fit = res if isinstance(res, FitResult) else None
        if fit is None:
            notes.append(f"- step {step}: fit n/a: {res if res is not None else 'no RL evaluation after the start'}")
        p_sft = st["sft_pass1"][str(step)]
        p_se = pass1_se(p_sft, n_eval)
        a_se = a_post_se(fit, p_se) if fit else None
        row = {"sft_step": step, "subphase": subphase.get(step, "base"), "P_sft_se": p_se, "A_post_se": a_se,
               "sft_gflops": _gf(history[step]["exaflops"]) if step else 0.0, "P_sft": p_sft,
               "PL_rl": fit.PL_rl if fit else None, "C_mid": fit.C_mid if fit else None, "B": fit.B if fit else None,
               "A_post": fit.A_post if fit else None, "rl_steps": run["steps"], "rl_planned": run["planned_steps"],
               "rl_gflops": _gf(run["exaflops"], 4), "stopped": run["stopped"]}
        rows.append(row)
        used = f"{run['steps']}/{run['planned_steps']}" + (" (early stop)" if run["stopped"] else "")
        a_post = _n(row["A_post"]) + (f" ± {_n(a_se, 1)}" if fit else "")
        lines.append(f"| {step} | {row['subphase']} | {row['sft_gflops']:.2f} | {p_sft:.2f} ± {p_se:.1f} | "
                     f"{_n(row['PL_rl'])} | {_n(row['C_mid'], 3)} | {_n(row['B'])} | {a_post} | {used} | "
                     f"{row['rl_gflops']:.4g} |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n", rows


def write_sweep_report(job, root: Path, state: dict) -> Path:
    from engine.sweep.findings_report import findings_markdown

    sections, tables, pairs, skipped, a_posts, fits = [], [], [], [], {}, {}
    cfg, pb = job.sft, per_branch_rule(job.sweep)
    for spec in job.sweep.scenes:
        st, out = state["scenes"][spec.name], root / spec.name
        history = st["sft"]["val_history"]
        losses = [h["val_loss"] for h in history]
        labels = history_subphases(history, cfg)
        subphase = {h["step"]: lab for h, lab in zip(history, labels)}
        raw = scene_json(spec.name, st)
        write_json_atomic(out / "scene.json", raw)
        scene = load_scene(out / "scene.json") if raw["rl"] else None
        results = fit_scene(scene) if scene is not None else {}
        if scene is None:
            replay = "No RL branch to replay.\n"
        else:
            replayed = replay_scene(scene, per_branch_rule(job.sweep))
            replay = early_stop_markdown(replayed, compute_unit="GFLOPs") + "\n" + decide(replayed).summary() + "\n"
        table, rows = scene_table(st, results, subphase)
        fits[spec.name] = results
        a_posts[spec.name] = {r["sft_step"]: (r["A_post"], r["A_post_se"]) for r in rows
                              if r["A_post"] is not None and r["sft_step"] > 0}
        (out / "table.md").write_text(f"### scene `{spec.name}`\n\n{table}")
        write_json_atomic(out / "table.json", rows)
        xs = [_gf(h["exaflops"]) for h in history]
        sft_curve = [(0.0, st["sft_pass1"]["0"])] + [(x, st["sft_pass1"][str(h["step"])]) for x, h in zip(xs, history)
                                                     if str(h["step"]) in st["sft_pass1"]]
        plot_a_post(rows_from(results, scene) if scene is not None else [], out / "a_post.png", spec.name,
                    unit="GFLOPs", sft_curve=sft_curve, subphases=list(zip(xs, labels)))
        plot_paradigms(st, out / "paradigms.png", f"{spec.name}: performance vs total compute")
        tables.append(f"### scene `{spec.name}`\n\n{table}")
        fitted = [r["A_post"] for r in rows if r["A_post"] is not None and math.isfinite(r["A_post"])]
        if fitted:
            pairs.append((min(losses), max(fitted)))
        else:
            skipped.append(spec.name)
        val_rows = "\n".join(f"| {h['step']} | {h['val_loss']:.4f} | {lab} | {_gf(h['exaflops']):.2f} | "
                             f"{_n(st['sft_pass1'].get(str(h['step'])))} |" for h, lab in zip(history, labels))
        base_rows = "\n".join(f"| {r['algorithm'].upper()} | {r['steps']}/{r['planned_steps']} | "
                              f"{_gf(r['exaflops'], 4):.4g} | {100 * r['eval_history'][-1]['pass@1']:.2f} |"
                              for k, r in st.get("rl", {}).items() if k.startswith("baseline/") and r["eval_history"])
        task = replace_task(job, spec, st["sft"])
        race = race_markdown(st) if st.get("race") else ""
        sections.append(f"""## Scene `{spec.name}`

Task: {task}. SFT ran {st['sft']['steps']} steps ({_gf(st['sft']['exaflops']):.2f} GFLOPs); minimum validation
loss {st['sft']['best']['val_loss']:.4f} at step {st['sft']['best']['step']}{_smoothed(st['sft']['best'], cfg)}.
{sft_end(st['sft'], labels)} RL branches ({job.rl.algorithm}) from
SFT steps {st['branches']} and from the base model (step 0 = pure RL). pass@1 on {st.get('n_eval', '?')} eval
prompts, T={job.rl.eval_temperature}, {job.sweep.eval_samples} sample(s) each for SFT checkpoints and
{job.rl.eval_samples} for RL evaluations.

| SFT step | val loss | sub-phase | SFT compute (GFLOPs) | pass@1 (%) |
| ---: | ---: | --- | ---: | ---: |
| 0 (base) | | | 0.00 | {st['sft_pass1']['0']:.2f} |
{val_rows}

### Ceiling fits (Table 4 in miniature; `scene.json`, `table.md`)

{table}
![A_post]({spec.name}/a_post.png)
{race}
### Early stopping, replayed

Had each branch been stopped once its predicted A_post moved less than {pb.tol:g} points over
{pb.patience} refits (after at least {pb.min_points} evaluations and {pb.min_fraction:g} of its
compute), this is where it would have stopped, the share of its RL compute saved, its A_post against the fit
of the whole branch, and the branch a user would have picked:

{replay}
### Paradigms: pure SFT, pure RL, SFT-then-RL, synchronized baselines

| baseline | RL steps | RL compute (GFLOPs) | final pass@1 (%) |
| --- | ---: | ---: | ---: |
{base_rows}

![paradigms]({spec.name}/paradigms.png)
""")
    if len(pairs) >= 3:
        try:
            c = ceiling_correlation(pairs)
            corr = (f"Pearson r between min validation loss and best A_post over {c.n} scenes: r = {c.r:.3f} "
                    f"(p = {c.p_value:.3g}); the paper finds a strong negative correlation.")
        except ValueError as e:
            corr = f"Not computed: {e}."
    else:
        corr = (f"Not computed: it needs at least 3 scenes with a fitted A_post; this sweep has {len(pairs)}"
                + (f" (no fitted branch in: {', '.join(skipped)})" if skipped else "") + ".")
    (root / "table.md").write_text("\n".join(tables))
    early = (f"on (tol {pb.tol:g}, patience {pb.patience}, min points {pb.min_points}); "
             "'used/planned' shows the RL steps a branch ran of `rl.steps`") if job.sweep.early_stop != "off" else "off"
    text = f"""# Sweep `{job.run.name}`: SFT sub-phases x RL branches, Plasticity-Ceiling fits

The paper's study (arXiv 2512.11470) in miniature on {"the synthetic math task" if job.data.synthetic else "your files"}. Compute is in GFLOPs by the
paper's Appendix C. P_sft is the pass@1 of the SFT checkpoint; PL_rl the fitted asymptotic RL gain; A_post =
P_sft + PL_rl the predicted ceiling; C_mid, B the sigmoid's midpoint and steepness. Sub-phases (over the whole
validation history): Stable L <= {1 + cfg.subphase_d1:.2f} L_min, Mild below {1 + cfg.subphase_d2:.2f} L_min after
the last Stable point, Severe above, Adaptive before. Live early stopping of RL branches: {early}.
"n/a": the branch has too few usable points for the fit (the reason is listed under the table).

{findings_markdown(job, root, state, fits)}
{"".join(sections)}
## Compute: spent vs a full sweep

{compute_table(job, state)}
{picked_lines(state, a_posts)}
## Min validation loss vs best A_post

{corr}
"""
    (root / "sweep_report.md").write_text(text)
    return root / "sweep_report.md"


def compute_table(job, state: dict) -> str:
    """Per item: the compute it spent and what the item would have spent run to the end (Appendix C GFLOPs;
    evaluation is not counted), where and how long it ran; then the totals. A branch stopped early is
    extrapolated to its planned steps at its own GFLOPs per step."""
    lines = ["| item | steps used/planned | spent (GFLOPs) | full sweep (GFLOPs) | saved | ran on | wall (s) |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    spent_total = full_total = 0.0
    for name in state["done"]:
        scene, kind, *rest = name.split("/")
        st = state["scenes"][scene]
        who = st.get("workers", {}).get(name, {})
        where = f"{who.get('host', '?')} pid {who.get('pid', '?')}" if who else "?"
        if "slice_hosts" in who:  # a race branch: its slices ran as items of their own
            where = f"{len(who['slice_hosts'])} slices on {', '.join(sorted(set(who['slice_hosts'])))}"
        wall = f"{who['seconds']:.0f}" if "seconds" in who else "?"
        if kind == "sft_eval":
            lines.append(f"| {name} | | not counted | not counted | | {where} | {wall} |")
            continue
        if kind == "sft":
            steps, planned, spent = st["sft"]["steps"], job.sft.steps, _gf(st["sft"]["exaflops"], 4)
        else:
            run = st["rl"][f"{kind}/{rest[0]}"]
            steps, planned, spent = run["steps"], run["planned_steps"], _gf(run["exaflops"], 4)
        full = spent * planned / steps if steps and steps < planned else spent
        spent_total, full_total = spent_total + spent, full_total + full
        saved = f"{100 * (1 - spent / full):.1f}%" if full > 0 else "-"
        lines.append(f"| {name} | {steps}/{planned} | {spent:.4g} | {full:.4g} | {saved} | {where} | {wall} |")
    saved = f"{100 * (1 - spent_total / full_total):.1f}%" if full_total > 0 else "-"
    lines.append(f"| **total** | | {spent_total:.4g} | {full_total:.4g} | {saved} | | |")
    return "\n".join(lines) + "\n"


def picked_lines(state: dict, a_posts: dict) -> str:
    """Per scene, the branch the sweep picks: the race's pick (sweep.early_stop: compare), else the best fitted
    A_post; with A_post +- SE."""
    lines = []
    for scene, st in state["scenes"].items():
        race = st.get("race")
        fitted = {k: v for k, v in a_posts.get(scene, {}).items() if math.isfinite(v[0])}
        if race and race["picked"] is not None:
            lines.append(f"- `{scene}`: SFT step {race['picked']} (picked by the race), A_post "
                         f"{_ceiling(race['decisions'][race['picked']])}")
        elif fitted:
            step, (a, se) = max(fitted.items(), key=lambda kv: kv[1][0])
            err = f" ± {se:.2f}" if se is not None and math.isfinite(se) else ""
            lines.append(f"- `{scene}`: SFT step {step} (best fitted A_post), A_post {a:.2f}{err}")
        else:
            lines.append(f"- `{scene}`: no branch with a fitted A_post")
    return "Branch picked per scene:\n\n" + "\n".join(lines) + "\n"


def _ceiling(d: dict) -> str:
    """A decision's A_post +- SE; an SE that is not finite means the fit has not identified the ceiling."""
    if d["A_post"] is None:
        return "n/a"
    if d["SE"] is None or not math.isfinite(d["SE"]):
        return f"{d['A_post']:.2f} (not identified yet)"
    return f"{d['A_post']:.2f} ± {d['SE']:.2f}"


def race_markdown(st: dict) -> str:
    """The live race of a scene's branches (sweep.early_stop: compare): each branch's last decision, its compute
    and the branch picked with A_post +- SE."""
    race = st["race"]
    lines = ["", "### Branches compared while they ran (`sweep.early_stop: compare`)", "",
             f"Slices of {race['slice_steps']} RL steps; rounds: "
             + "; ".join(f"{r + 1}: {', '.join(map(str, bs))}" for r, bs in enumerate(race["rounds"])) + ".", "",
             "| SFT step | slices | RL steps used/planned | A_post ± SE | ended | why |", "| ---: | ---: | ---: | ---: | --- | --- |"]
    for b, d in race["decisions"].items():
        run = st["rl"][f"rl/{b}"]
        ceiling = _ceiling(d)
        lines.append(f"| {b} | {run['race']['slices']} | {run['steps']}/{run['planned_steps']} | {ceiling} | "
                     f"{d['action']} | {d['reason']} |")
    picked = race["picked"]
    if picked is None:
        lines += ["", "Picked: none (no branch has an identified ceiling)."]
    else:
        lines += ["", f"Picked: the branch from SFT step {picked}, A_post {_ceiling(race['decisions'][picked])} points."]
    return "\n".join(lines) + "\n"


def replace_task(job, spec, sft: dict | None = None) -> str:
    t = job.data.synthetic
    if t is None:
        rows = (sft or {}).get("train_rows")
        return f"{rows if rows is not None else '?'} SFT rows of {spec.train_path or job.data.train_path}"
    n = spec.num_train if spec.num_train is not None else t.num_train
    mix = spec.difficulty_mix or t.difficulty_mix
    return f"{n} SFT examples, difficulty mix {mix}, {t.min_ops}-{t.max_ops} ops, {t.max_digits}-digit operands"
