"""Load a scene of SFT and SFT-then-RL evaluation curves (the RETU JSON format) into fit data.

A scene file holds one SFT curve and, per SFT checkpoint, one RL branch (see
`shared/data/retu/README.md`). The fields this loader reads, and nothing else, are:

    benchmarks               {bench: weight}          weights n_b (problem counts), all > 0
    sft                      [{exaflops, scores, overall}, ...]   sorted by exaflops
    rl                       {"<sft_step>": [{rl_exaflops, scores, overall}, ...]}   sorted by rl_exaflops
    sft_step_cache_exaflops  {"<sft_step>": key into sft[].exaflops}   ("0" may be left out: the base model at 0)
    scene                    optional name (default: the file stem)

Math (as the paper's kit does it):

    overall      = round(sum_b score_b * n_b / sum_b n_b, 2)         recomputed and checked against `overall`
    P_sft(step)  = overall of the sft point whose exaflops == sft_step_cache_exaflops[step]
    fit data     = (0, 0) followed by (x_i, overall_i - P_sft) in compute order, with
    x_i          = round(round(c + rl_exaflops_i, 2) - c, 2),  c = sft_step_cache_exaflops[step]

Branch "0" is the base model, i.e. pure RL. Every problem raises `DataError` naming the file and the field,
for example ``general.json: rl["360"][4]: missing field 'overall'``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import DataError

# The stored `overall` is rounded to 2 decimals; a recomputed value may differ by float noise at a .xx5 tie.
OVERALL_TOLERANCE = 0.0100001


@dataclass(frozen=True)
class Branch:
    """One RL branch started from an SFT checkpoint, ready to fit.

    `x` and `y` include the anchor (0, 0) at index 0; `y` is the gain over `p_sft` in points.
    """

    sft_step: int
    sft_exaflops: float  # the checkpoint's compute (the cache key), EFLOPs
    p_sft: float  # performance at the checkpoint (the weighted overall, %)
    x: np.ndarray  # RL compute since the checkpoint, EFLOPs
    y: np.ndarray  # overall - p_sft

    @property
    def n_points(self) -> int:
        return len(self.x)


@dataclass(frozen=True)
class Scene:
    """A validated scene: benchmark weights, the SFT curve and its RL branches keyed by SFT step."""

    name: str
    path: Path | None
    benchmarks: dict[str, float]
    sft_exaflops: np.ndarray  # SFT curve compute, EFLOPs
    sft_overall: np.ndarray  # SFT curve performance, %
    branches: dict[int, Branch] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return sorted(self.branches)

    def branch(self, step: int) -> Branch:
        if step not in self.branches:
            where = self.path.name if self.path else self.name
            raise DataError(f"{where}: no RL branch for SFT step {step} (available: {self.steps})")
        return self.branches[step]


def weighted_overall(scores: dict[str, float], weights: dict[str, float]) -> float:
    """The benchmark scores averaged with `weights`, rounded to 2 decimals (before any difference)."""
    total = sum(weights.values())
    return round(sum(scores[b] * w for b, w in weights.items()) / total, 2)


def load_scene(path: str | Path) -> Scene:
    """Read and validate a scene JSON file; raise `DataError` naming the file and field on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path.name}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{path.name}: invalid JSON: nested too deeply") from None
    try:  # a `\\ud800` escape decodes to a lone surrogate, which no output file can hold
        json.dumps(raw, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{path.name}: a string holds a lone surrogate escape ({e.object[e.start]!r})") from None
    return parse_scene(raw, name=path.stem, where=path.name, path=path)


def parse_scene(raw: object, name: str = "scene", where: str = "<scene>", path: Path | None = None) -> Scene:
    """Validate an already-parsed scene object (see the module docstring for the fields)."""
    v = _Validator(where)
    top = v.mapping(raw, "")
    name = v.string(top["scene"], "scene") if "scene" in top else name
    weights = _benchmarks(v, v.field(top, "benchmarks", ""))

    sft = v.array(v.field(top, "sft", ""), "sft")
    if not sft:
        v.fail("sft", "empty list")
    sft_x, sft_y = [], []
    for i, point in enumerate(sft):
        where_i = f"sft[{i}]"
        p = v.mapping(point, where_i)
        sft_x.append(v.number(v.field(p, "exaflops", where_i), f"{where_i}.exaflops", nonneg=True))
        sft_y.append(_checked_overall(v, p, weights, where_i))
    _check_sorted(v, sft_x, "sft", "exaflops")
    sft_x_arr, sft_y_arr = np.array(sft_x), np.array(sft_y)

    cache = v.mapping(top.get("sft_step_cache_exaflops", {}), "sft_step_cache_exaflops")
    rl = v.mapping(v.field(top, "rl", ""), "rl")
    if not rl:
        v.fail("rl", "no branches")
    branches: dict[int, Branch] = {}
    for key, points in rl.items():
        step = _step_key(v, key, f'rl["{key}"]')
        if key in cache:
            c = v.number(cache[key], f'sft_step_cache_exaflops["{key}"]', nonneg=True)
        elif step == 0:
            c = 0.0  # the base model needs no cache key
        else:
            v.fail("sft_step_cache_exaflops", f"missing key '{key}' for branch rl[\"{key}\"]")
        hit = np.flatnonzero(np.abs(sft_x_arr - c) < 1e-9)
        if len(hit) == 0:
            v.fail(f'sft_step_cache_exaflops["{key}"]', f"{c} is not the exaflops of any sft point")
        p_sft = float(sft_y_arr[hit[0]])
        branches[step] = _branch(v, step, c, p_sft, points, weights, f'rl["{key}"]')
    return Scene(name, path, weights, sft_x_arr, sft_y_arr, dict(sorted(branches.items())))


def _branch(v: _Validator, step: int, c: float, p_sft: float, points: object,
            weights: dict[str, float], where: str) -> Branch:
    pts = v.array(points, where)
    if not pts:
        v.fail(where, "empty list")
    xs, ys = [0.0], [0.0]  # the anchor: no RL compute, no gain
    rl_x = []
    for i, point in enumerate(pts):
        where_i = f"{where}[{i}]"
        p = v.mapping(point, where_i)
        rx = v.number(v.field(p, "rl_exaflops", where_i), f"{where_i}.rl_exaflops", nonneg=True)
        rl_x.append(rx)
        # Round the absolute compute first, as the kit does, so x matches its grid to the cent.
        xs.append(round(round(c + rx, 2) - c, 2))
        ys.append(round(_checked_overall(v, p, weights, where_i) - p_sft, 10))
    _check_sorted(v, rl_x, where, "rl_exaflops")
    return Branch(step, c, p_sft, np.array(xs), np.array(ys))


def _benchmarks(v: _Validator, raw: object) -> dict[str, float]:
    m = v.mapping(raw, "benchmarks")
    if not m:
        v.fail("benchmarks", "empty")
    weights = {}
    for b, w in m.items():
        weights[b] = v.number(w, f'benchmarks["{b}"]')
        if weights[b] <= 0:
            v.fail(f'benchmarks["{b}"]', f"weight must be > 0, got {w}")
    return weights


def _checked_overall(v: _Validator, p: dict, weights: dict[str, float], where: str) -> float:
    scores = v.mapping(v.field(p, "scores", where), f"{where}.scores")
    for b in weights:
        if b not in scores:
            v.fail(f"{where}.scores", f"missing benchmark '{b}'")
        v.number(scores[b], f'{where}.scores["{b}"]')
    stored = v.number(v.field(p, "overall", where), f"{where}.overall")
    overall = weighted_overall(scores, weights)
    if abs(overall - stored) > OVERALL_TOLERANCE:
        v.fail(f"{where}.overall", f"stored {stored} but the weighted mean of the scores is {overall}")
    return overall


def _check_sorted(v: _Validator, values: list[float], where: str, key: str) -> None:
    for i in range(1, len(values)):
        if values[i] < values[i - 1]:
            v.fail(f"{where}[{i}].{key}", f"not sorted by compute ({values[i]} after {values[i - 1]})")


def _step_key(v: _Validator, key: str, where: str) -> int:
    try:
        step = int(key)
    except ValueError:
        v.fail(where, f"branch key must be an integer SFT step, got '{key}'")
    if step < 0:
        v.fail(where, f"SFT step must be >= 0, got {step}")
    return step


class _Validator:
    """Small helpers that raise `DataError("<file>: <field>: <problem>")`."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field_path: str, problem: str):
        prefix = f"{self.where}: {field_path}: " if field_path else f"{self.where}: "
        raise DataError(prefix + problem)

    def field(self, m: dict, key: str, where: str):
        if key not in m:
            self.fail(where, f"missing field '{key}'")
        return m[key]

    def mapping(self, x: object, where: str) -> dict:
        if not isinstance(x, dict):
            self.fail(where, f"expected an object, got {type(x).__name__}")
        return x

    def array(self, x: object, where: str) -> list:
        if not isinstance(x, list):
            self.fail(where, f"expected a list, got {type(x).__name__}")
        return x

    def string(self, x: object, where: str) -> str:
        if not isinstance(x, str):
            self.fail(where, f"expected a string, got {type(x).__name__}")
        return x

    def number(self, x: object, where: str, nonneg: bool = False) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            self.fail(where, f"expected a number, got {type(x).__name__}")
        if isinstance(x, int) and abs(x) > 1e300:  # json reads any digit string as an int; float() would overflow
            self.fail(where, f"number out of range ({str(x)[:20]}...)")
        if not math.isfinite(x):
            self.fail(where, f"not a finite number ({x})")  # json accepts NaN/Infinity literals
        if nonneg and x < 0:
            self.fail(where, f"must be >= 0, got {x}")
        return float(x)
