"""The report of a `ceiling run`: `runs/<name>/report.md`, its figures, and `curves.json`.

    sft_val_loss.png    SFT validation loss with sub-phase shading and the switch point
    rl_curves.png       RL rollout reward and held-out pass@1 against RL steps (and compute)
    pass_at_1.png       base model vs SFT model (switch checkpoint) vs SFT-then-RL
    curves.json         the compute/performance curves in the RETU format read by `ceiling fit`.
                        Compute is in GFLOPs (units field), since a tiny run's EFLOPs would round to 0.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from engine.analysis.phases import classify_subphases
from engine.plots import GFLOPS_PER_EFLOPS, SFT_COLOR, shade_subphases
from engine.rundir.files import write_json_atomic
from engine.rundir.metrics import read_metrics


def _plot_sft(val_history, switch, d1, d2, path: Path, window: int = 1) -> None:
    steps = [h["step"] for h in val_history]
    losses = [h["val_loss"] for h in val_history]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    shade_subphases(ax, steps, classify_subphases(losses, d1, d2, window))
    ax.plot(steps, losses, "o-", color=SFT_COLOR, ms=3, label="validation loss")
    ax.axvline(switch["step"], color="#c00000", ls="--", label=f"switch checkpoint (step {switch['step']})")
    if switch["sft_steps_run"] != switch["step"]:
        ax.axvline(switch["sft_steps_run"], color="#7f7f7f", ls=":", label=f"SFT stopped (step {switch['sft_steps_run']})")
    ax.set_xlabel("SFT step")
    ax.set_ylabel("validation loss (token mean)")
    ax.set_title("SFT: validation loss and sub-phases")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_rl(records, evals, path: Path) -> None:
    train = [r for r in records if "rollout/reward_mean" in r]
    fig = Figure(figsize=(10, 3.8))
    a, b = fig.subplots(1, 2)
    a.plot([r["step"] for r in train], [r["rollout/reward_mean"] for r in train], ".-", color="#2e75b6")
    a.set_xlabel("RL step")
    a.set_ylabel("rollout reward (mean, T=1)")
    a.set_title("RL: training reward")
    b.plot([e["step"] for e in evals], [100 * e["pass@1"] for e in evals], "o-", color="#c55a11")
    b.set_xlabel("RL step")
    b.set_ylabel("held-out pass@1 (%, T=0.7)")
    b.set_title("RL: held-out pass@1")
    if evals:
        top = b.secondary_xaxis("top", functions=(lambda s: s, lambda s: s))
        top.set_xticks([e["step"] for e in evals][:: max(1, len(evals) // 4)])
        top.set_xticklabels([f"{e['rl_exaflops'] * GFLOPS_PER_EFLOPS:.3g}" for e in evals][:: max(1, len(evals) // 4)],
                            fontsize=7)
        top.set_xlabel("RL compute (GFLOPs)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plot_bars(values: dict[str, float], path: Path) -> None:
    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    bars = ax.bar(list(values), list(values.values()), color=["#a6a6a6", "#2e75b6", "#c55a11"])
    for bar, v in zip(bars, values.values()):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom")
    ax.set_ylabel("held-out pass@1 (%)")
    ax.set_title("Final pass@1")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def retu_curves(name: str, switch: dict, base: float, evals: list[dict], n_eval: int) -> dict:
    """The run as a RETU scene: SFT points (base, switch checkpoint) and one RL branch, in GFLOPs."""
    sft_x = round(switch["sft_exaflops_at_switch"] * GFLOPS_PER_EFLOPS, 2)
    sft_perf = round(100 * evals[0]["pass@1"], 2)
    point = lambda x, p: {"exaflops": x, "scores": {"synthetic": p}, "overall": p}  # noqa: E731
    rl = [{"rl_exaflops": round(e["rl_exaflops"] * GFLOPS_PER_EFLOPS, 4), "scores": {"synthetic": round(100 * e["pass@1"], 2)},
           "overall": round(100 * e["pass@1"], 2)} for e in evals[1:]]
    return {
        "scene": name, "model": "ceiling-engine run", "rl_algorithm": "see config.yaml",
        "units": {"exaflops": "cumulative SFT compute in GFLOPs (1e9 FLOPs)", "rl_exaflops": "RL compute in GFLOPs",
                  "scores": "pass@1 in percent"},
        "benchmarks": {"synthetic": n_eval},
        "sft_steps": [0, switch["step"]],
        "sft_step_cache_exaflops": {"0": 0.0, str(switch["step"]): sft_x},
        "sft": [point(0.0, round(base, 2)), point(sft_x, sft_perf)] if sft_x > 0 else [point(0.0, sft_perf)],
        "rl": {str(switch["step"]): rl},
    }


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if value is not None else "n/a"


def write_run_report(job, root: Path, state: dict) -> Path:
    switch, rl_state = state["switch"], state["rl"]
    evals = rl_state["eval_history"]
    history = switch["val_history"]
    at_switch = next((h for h in history if h["step"] == switch["step"]), None)
    switch["sft_exaflops_at_switch"] = at_switch["exaflops"] if at_switch else switch["sft_exaflops"]
    base = state.get("base", {}).get("pass@1", float("nan"))
    if history:
        _plot_sft(history, switch, job.sft.subphase_d1, job.sft.subphase_d2, root / "sft_val_loss.png",
                  job.sft.subphase_window)
    records = read_metrics(root / "rl" / "metrics.jsonl")
    _plot_rl(records, evals, root / "rl_curves.png")
    sft_p1, rl_p1 = (100 * evals[0]["pass@1"], 100 * evals[-1]["pass@1"]) if evals else (float("nan"),) * 2
    _plot_bars({"base": base, "SFT": sft_p1, "SFT+RL": rl_p1}, root / "pass_at_1.png")
    n_eval = rl_state.get("eval_prompts", 0)
    eval_set = "the synthetic task's eval split" if job.rl.eval_path is None else f"`{job.rl.eval_path}`"
    if evals:
        write_json_atomic(root / "curves.json", retu_curves(job.run.name, switch, base, evals, n_eval))
    train = [r for r in records if "rollout/reward_mean" in r]
    labels = classify_subphases([h["val_loss"] for h in history], job.sft.subphase_d1, job.sft.subphase_d2,
                                job.sft.subphase_window) if history else []
    val_rows = "\n".join(f"| {h['step']} | {h['val_loss']:.4f} | {lab} | {h['exaflops'] * GFLOPS_PER_EFLOPS:.4g} |"
                         for h, lab in zip(history, labels))
    # Wall time of the RL phase from the records' timestamps (only every `log_every`-th step is logged, so a sum
    # of the logged step times would undercount); evaluations included.
    stamps = [r["time"] for r in records if "time" in r]
    time_rl = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    backends = {"base": state.get("base", {}).get("backend"), "RL rollouts": rl_state.get("rollout_backend"),
                **{f"RL step {e['step']}": e.get("backend") for e in evals}}
    generated = ", ".join(f"{k} {v}" for k, v in backends.items())
    base_state = state.get("base", {})
    final_ckpt = rl_state.get("checkpoint", "rl/checkpoints (latest)")
    rows = [("base (before SFT)", base_state.get("weights", "?"), base_state.get("backend"), base,
             base_state.get("samples", job.pipeline.eval_samples), base_state.get("metrics", {})),
            (f"SFT (switch checkpoint, step {switch['step']})", switch["checkpoint"],
             evals[0].get("backend") if evals else None, sft_p1, job.rl.eval_samples, evals[0] if evals else {}),
            (f"SFT then RL ({rl_state['steps']} RL steps)", final_ckpt, evals[-1].get("backend") if evals else None,
             rl_p1, job.rl.eval_samples, evals[-1] if evals else {})]
    ks = sorted({k for *_, m in rows for k in m if k.startswith(("pass@", "maj@")) and k != "pass@1"},
                key=lambda k: (int(k.split("@")[1]), k.startswith("maj")))
    result_rows = "\n".join(
        f"| {label} | `{weights}` | {backend} | {p1:.2f}% ({n} per prompt) | "
        + " | ".join(f"{100 * m[k]:.2f}%" if k in m else "" for k in ks)
        + f"{' | ' if ks else ''}{_percent(m.get('truncated_frac'))} |"
        for label, weights, backend, p1, n, m in rows)
    text = f"""# Run `{job.run.name}`: SFT, then RL ({job.rl.algorithm})

Device: {rl_state.get("device", "unknown")}. Config: `config.yaml` (resolved). SFT and RL run directories: `sft/`, `rl/`.
Rollout backend (`rollout.backend`): `{job.rollout.backend}`; what generated each number: {generated}.
Scored by: {rl_state.get("reward", "the run's reward")} (one reward for every row). Final model: `hf/` (HF directory).

## Result

Each row is the pass@1 of the weights it names, generated by the backend it names, at T={job.rl.eval_temperature}.

| model | weights | backend | held-out pass@1 | {" | ".join(ks)}{" | " if ks else ""}cut at max_new_tokens |
| --- | --- | --- | --- | {"--- | " * len(ks)}--- |
{result_rows}

![pass@1](pass_at_1.png)

Held-out set: {n_eval} prompts of {eval_set}, {job.rl.eval_samples} sample(s) each for the
SFT and RL rows (avg@k); with this many samples one standard error is about
{100 * (max(sft_p1, 1) / 100 * (1 - max(sft_p1, 1) / 100) / max(n_eval * job.rl.eval_samples, 1)) ** 0.5:.1f} points.

## SFT and the switch to RL

Policy `{switch['policy']}`: {switch['reason']}. SFT ran {switch['sft_steps_run']} of {job.sft.steps} planned steps
({switch['sft_exaflops'] * GFLOPS_PER_EFLOPS:.4g} GFLOPs); RL starts from `{switch['checkpoint']}`.
Sub-phases (offline, over the whole validation history): Stable is L <= {1 + job.sft.subphase_d1:.2f} L_min,
Mild below {1 + job.sft.subphase_d2:.2f} L_min after the last Stable point, Severe above, Adaptive before the first.

![SFT validation loss](sft_val_loss.png)

| step | val loss | sub-phase | SFT compute (GFLOPs) |
| --- | --- | --- | --- |
{val_rows}

## RL

{rl_state['steps']} steps of {job.rl.algorithm}, {job.rl.train_batch} groups x {job.rl.n_samples} samples per step,
{rl_state['exaflops'] * GFLOPS_PER_EFLOPS:.4g} GFLOPs by the paper's Appendix C, {time_rl:.0f} s of RL (wall time, evaluations included).
Mean generation rounds per step (dynamic sampling): {sum(r['rollout/num_rounds'] for r in train) / max(len(train), 1):.2f}.

![RL curves](rl_curves.png)

| RL step | pass@1 | RL compute (GFLOPs) |
| --- | --- | --- |
""" + "\n".join(f"| {e['step']} | {100 * e['pass@1']:.2f}% | {e['rl_exaflops'] * GFLOPS_PER_EFLOPS:.4g} |" for e in evals) + """

`curves.json` holds these curves in the RETU format: `ceiling fit curves.json --branch <switch step>` fits
this run's ceiling exactly as it fits the paper's (with so few points the fit is indicative only).
"""
    (root / "report.md").write_text(text)
    return root / "report.md"
