"""The study sections: `pipeline:` (when `ceiling run` switches from SFT to RL), `sweep:` (the branches, baselines
and scenes of `ceiling sweep`) and `corpus:` (the text `ceiling pretrain` trains the tiny base on).

Every field's docstring is its documentation; `__post_init__` rejects bad values with the field's name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from engine.data.synthetic import SyntheticTaskConfig

BASELINES = ("luffy", "srft", "upt")
"""The synchronized SFT-RL baselines the sweep compares with (each an `rl.algorithm`)."""


@dataclass
class PipelineConfig:
    """When SFT hands over to RL."""

    switch: str = "stable"
    """'stable', 'min_val_loss' or 'step:N'."""
    patience: int = 2
    """stable: validations after the first plateau point that must stay within (1 + d1) L_min."""
    eval_samples: int = 4
    """Samples per eval prompt for the base-model pass@1 (RL's own evaluations use rl.eval_samples)."""

    def __post_init__(self):
        if self.switch not in ("stable", "min_val_loss") and not re.fullmatch(r"step:[1-9]\d*", self.switch):
            raise ValueError(f"pipeline.switch must be 'stable', 'min_val_loss' or 'step:N', got {self.switch!r}")
        if self.patience < 1 or self.eval_samples < 1:
            raise ValueError("pipeline.patience and pipeline.eval_samples must be >= 1")


@dataclass
class SceneSpec:
    """One scene: the synthetic task with a different train-set size or difficulty, or your own files."""

    name: str = "default"
    """Directory name under runs/<name>/ (letters, digits, '-', '_', '.')."""
    num_train: int | None = None
    """Override of data.synthetic.num_train."""
    difficulty_mix: Literal["uniform", "easy", "hard"] | None = None
    """Override of data.synthetic.difficulty_mix."""
    baselines: bool = True
    """Run sweep.baselines in this scene (off: only the SFT checkpoints' RL branches and pure RL)."""
    pure_rl: bool = True
    """Run pure RL from the base model in this scene (its RL and eval sets are those of every scene, so one
    scene is enough)."""
    branches: int | None = None
    """Override of sweep.branches for this scene."""
    train_path: str | list[str] | None = None
    """On files: the scene's SFT data (default data.train_path); e.g. openr1.parquet, or a subset of it."""
    val_path: str | list[str] | None = None
    """On files: the scene's validation rows (default data.val_path)."""
    prompts_path: str | list[str] | None = None
    """On files: the scene's RL prompts (default rl.prompts_path)."""
    eval_path: str | list[str] | None = None
    """On files: the held-out set that scores the base, the SFT checkpoints and the RL branches (default
    rl.eval_path)."""

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"sweep.scenes: bad scene name {self.name!r}")
        if self.num_train is not None and self.num_train < 1:
            raise ValueError(f"sweep.scenes[{self.name}].num_train must be >= 1, got {self.num_train}")
        if self.branches is not None and self.branches < 1:
            raise ValueError(f"sweep.scenes[{self.name}].branches must be >= 1, got {self.branches}")


@dataclass
class SweepConfig:
    """Which branches and baselines the sweep runs, how it evaluates, and live early stopping."""

    branches: int = 3
    """SFT checkpoints that start an RL branch (min-val-loss always one; see `branch_rule`)."""
    branch_rule: Literal["spread", "subphase"] = "spread"
    """How the branches are chosen: spread evenly over the validations, or one per SFT sub-phase present in
    the order Stable (the min-val-loss step), Mild (the middle of its span), Adaptive (its middle), Severe (the
    last validation), then spread to fill `branches` (the paper's RQ2 compares switch points by sub-phase)."""
    matched_compute: bool = True
    """Pure RL and the baselines of a scene get the sequential paradigm's compute: SFT up to the min-val-loss
    checkpoint plus the RL branch from it (they run after that branch, with `rl.max_exaflops`)."""
    baselines: list[Literal["luffy", "srft", "upt"]] = field(default_factory=lambda: list(BASELINES))
    """Synchronized SFT-RL baselines, each an RL run from the base model with that rl.algorithm."""
    eval_samples: int = 2
    """Samples per eval prompt for the pass@1 of the base model and each SFT checkpoint."""
    sft_eval_every: int = 0
    """pass@1 of the SFT checkpoints whose step is a multiple of this, besides the base model and the branches'
    (0: of every checkpoint). With `sft.until` and frequent validations most checkpoints only serve to
    place the sub-phases; evaluating each would cost more than the SFT."""
    early_stop: bool | Literal["off", "branch", "compare"] = "off"
    """'branch' (or true): stop an RL branch once its own predicted ceiling settles (ceiling_stop_rule).
    'compare': the branches of a scene run side by side in slices (`race_slices`) and, between slices, every
    branch whose optimistic ceiling is below the leader's pessimistic one stops (engine/analysis/race.py); the
    leader and its contenders run on until their ceiling settles or their plan ends (engine/sweep/race.py)."""
    race_slices: int = 5
    """compare: the slices the RL plan (`rl.steps`) is cut into; each ends on an evaluation."""
    race_k: float | None = None
    """compare (None: the rule's tuned default, engine/analysis/race.py RaceConfig): standard errors on each side of A_post that make a branch's bounds."""
    race_margin: float | None = None
    """compare (None: the tuned default): points added to the leader's lower bound (> 0 also stops branches that could win by less)."""
    race_min_points: int | None = None
    """compare (None: the tuned default): evaluations (the start included) before a branch's fit can bound it."""
    tol: float | None = None
    """The per-branch rule (None: its tuned default, engine/analysis/early_stop.py EarlyStopConfig, or in
    'compare' RaceConfig().per_branch): A_post must move less than `tol` points ..."""
    patience: int | None = None
    """... over the last `patience` refits ..."""
    min_points: int | None = None
    """... after at least `min_points` evaluations ..."""
    min_fraction: float | None = None
    """... and not before this fraction of `rl.steps` (tuned on the paper's curves: benchmarks/RESULTS.md)."""
    scenes: list[SceneSpec] = field(default_factory=lambda: [SceneSpec()])
    """Scenes (variants of data.synthetic, or each on its own files); >= 3 gives the min-val-loss / A_post
    correlation."""

    def __post_init__(self):
        if isinstance(self.early_stop, bool):  # the older spelling: true meant the per-branch rule
            self.early_stop = "branch" if self.early_stop else "off"
        if self.race_slices < 1 or (self.race_k or 0) < 0 or (self.race_min_points or 5) < 5:
            raise ValueError("sweep: need race_slices >= 1, race_k >= 0 and race_min_points >= 5 (a fit has 3 parameters)")
        if self.branches < 1 or self.eval_samples < 1:
            raise ValueError("sweep.branches and sweep.eval_samples must be >= 1")
        if self.sft_eval_every < 0:
            raise ValueError(f"sweep.sft_eval_every must be >= 0, got {self.sft_eval_every}")
        if (self.tol is not None and self.tol <= 0) or (self.patience or 1) < 1 or (self.min_points or 1) < 1 \
                or not 0 <= (self.min_fraction or 0) <= 1:
            raise ValueError("sweep: need tol > 0, patience >= 1, min_points >= 1 and 0 <= min_fraction <= 1")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"sweep.baselines has duplicates: {self.baselines}")
        if not self.scenes:
            raise ValueError("sweep.scenes must name at least one scene")
        names = [s.name for s in self.scenes]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep.scenes: duplicate names {names}")


@dataclass
class PretrainCorpusConfig:
    """The pretraining text: arithmetic facts and direct answers, disjoint from the task's held-out problems."""

    task: SyntheticTaskConfig = field(default_factory=SyntheticTaskConfig)
    """The task whose levels the direct-answer problems follow and whose eval, rl and val problems they avoid
    (set it as in the sweep's or the demo's `data.synthetic`)."""
    num_direct: int = 20000
    """Direct-answer problems (prompt -> \\boxed{answer})."""
    num_val: int = 500
    """Held-out direct-answer problems for the validation loss."""
    fact_max_value: int = 40
    """Facts a+b and a-b for 0 <= a <= this and 1 <= b <= 9 (b <= a for '-'); 0 disables facts."""
    fact_repeats: int = 2
    """Copies of each fact in the corpus."""
    seed: int = 7
    """Seed of the corpus (problems and wording)."""

    def __post_init__(self):
        for name in ("num_direct", "num_val", "fact_max_value", "fact_repeats", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"corpus.{name} must be an integer >= 0, got {value!r}")
        if self.num_direct < 1:
            raise ValueError("corpus.num_direct must be >= 1")
