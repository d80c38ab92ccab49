"""The Plasticity-Ceiling analysis: robust sigmoid fits of RL gain vs. compute, SFT sub-phases, reports.

    from engine.analysis import load_scene, fit_branch, classify_subphases
    scene = load_scene("shared/data/retu/general.json")
    res = fit_branch(scene.branch(360), lts_alpha=0.85)
    res.A_post, res.PL_rl, res.C_mid, res.B
    stop = replay_branch(scene.branch(360))        # when the branch could have stopped, at what error
    stop.points_used, stop.saved, stop.error

Modules: `data` (scene JSON -> branch fit data), `fit` (model, plain fit, LTS, outlier rejection, metrics),
`phases` (SFT sub-phases, min-val-loss/A_post correlation), `early_stop` (refit after each evaluation, stop
a branch once A_post is stable; `OnlineCeilingMonitor` for live sweeps), `report` (tables, plots), `cli`
(`ceiling fit`).
"""

from engine.analysis.data import Branch, Scene, load_scene, parse_scene, weighted_overall
from engine.analysis.early_stop import (
    EarlyStopConfig,
    EarlyStopResult,
    OnlineCeilingMonitor,
    Refit,
    replay_branch,
    replay_scene,
)
from engine.analysis.fit import FitConfig, FitError, FitResult, fit_branch, fit_points, fit_scene, sigmoid
from engine.analysis.phases import (
    Correlation,
    SubphaseSpan,
    best_a_post,
    ceiling_correlation,
    classify_subphases,
    current_subphase,
    subphase_spans,
)

__all__ = [
    "Branch", "Scene", "load_scene", "parse_scene", "weighted_overall",
    "FitConfig", "FitError", "FitResult", "fit_branch", "fit_points", "fit_scene", "sigmoid",
    "Correlation", "SubphaseSpan", "best_a_post", "ceiling_correlation", "classify_subphases",
    "current_subphase", "subphase_spans",
    "EarlyStopConfig", "EarlyStopResult", "OnlineCeilingMonitor", "Refit", "replay_branch", "replay_scene",
]
