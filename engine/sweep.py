"""`ceiling sweep CONFIG`: the paper's study in miniature on the synthetic math task.

    ceiling sweep configs/sweep-tiny.yaml                       # CPU, 2 cores: about 33 minutes
    ceiling sweep configs/sweep-tiny.yaml --set sft.steps=100 --set sweep.branches=2

Per scene (`sweep.scenes`, each a variant of `data.synthetic`), in `runs/<name>/<scene>/`:
  1. sft        SFT with a checkpoint at every validation (all kept): the sub-phases of the validation loss.
  2. sft_eval   pass@1 of the base model and of every SFT checkpoint (the pure-SFT curve, P_sft).
  3. rl/<k>     an RL branch (rl.algorithm) from `sweep.branches` SFT checkpoints spread evenly over the
                validations (the min-val-loss one always among them), and from the base model (k = 0,
                pure RL). With `sweep.early_stop`, a branch stops once its predicted ceiling settles
                (`engine.rl.trainer.ceiling_stop_rule`); the report shows compute used vs `rl.steps`.
  4. baseline/<algo>  the synchronized SFT-RL baselines (LUFFY, SRFT, UPT) from the base model.
Then the scene is written as a RETU scene (`scene.json`, compute in GFLOPs), every branch is fitted with
engine/analysis (A_post = P_sft + PL_rl), and `sweep_report.md` collects tables and figures
(engine/sweep_report.py); with >= 3 scenes, the Pearson r of min validation loss vs best A_post.
Resume: finished items are recorded in `<run>/sweep.json` and skipped; each SFT/RL run resumes from its
own checkpoints. The report is rewritten on every invocation.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from engine.checkpoint import checkpoint_name
from engine.config import DataConfig, ModelConfig, RunConfig, add_config_arguments, dump_config
from engine.data.synthetic import SyntheticTaskConfig
from engine.distributed import destroy_distributed
from engine.rl.trainer import RLConfig, RLJobConfig, RLTrainer, ceiling_stop_rule
from engine.sft.trainer import SFTConfig, SFTJobConfig, SFTTrainer

log = logging.getLogger("ceiling")
BASELINES = ("luffy", "srft", "upt")


@dataclass
class SceneSpec:
    """One scene: the synthetic task with a different train-set size or difficulty."""

    name: str = "default"
    """Directory name under runs/<name>/ (letters, digits, '-', '_', '.')."""
    num_train: int | None = None
    """Override of data.synthetic.num_train."""
    difficulty_mix: Literal["uniform", "easy", "hard"] | None = None
    """Override of data.synthetic.difficulty_mix."""
    baselines: bool = True
    """Run sweep.baselines in this scene (off: only the SFT checkpoints' RL branches and pure RL)."""

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"sweep.scenes: bad scene name {self.name!r}")
        if self.num_train is not None and self.num_train < 1:
            raise ValueError(f"sweep.scenes[{self.name}].num_train must be >= 1, got {self.num_train}")


@dataclass
class SweepConfig:
    """Which branches and baselines the sweep runs, how it evaluates, and live early stopping."""

    branches: int = 3
    """SFT checkpoints that start an RL branch (spread over the validations; min-val-loss always one)."""
    baselines: list[Literal["luffy", "srft", "upt"]] = field(default_factory=lambda: list(BASELINES))
    """Synchronized SFT-RL baselines, each an RL run from the base model with that rl.algorithm."""
    eval_samples: int = 2
    """Samples per eval prompt for the pass@1 of the base model and each SFT checkpoint."""
    early_stop: bool = False
    """Stop an RL branch once its predicted ceiling settles (ceiling_stop_rule)."""
    tol: float = 0.5
    """Early stop: A_post must move less than `tol` points ..."""
    patience: int = 3
    """... over the last `patience` refits ..."""
    min_points: int = 6
    """... after at least `min_points` evaluations."""
    scenes: list[SceneSpec] = field(default_factory=lambda: [SceneSpec()])
    """Scenes (variants of data.synthetic); >= 3 gives the min-val-loss / A_post correlation."""

    def __post_init__(self):
        if self.branches < 1 or self.eval_samples < 1:
            raise ValueError("sweep.branches and sweep.eval_samples must be >= 1")
        if self.tol <= 0 or self.patience < 1 or self.min_points < 1:
            raise ValueError("sweep: need tol > 0, patience >= 1 and min_points >= 1")
        if len(set(self.baselines)) != len(self.baselines):
            raise ValueError(f"sweep.baselines has duplicates: {self.baselines}")
        if not self.scenes:
            raise ValueError("sweep.scenes must name at least one scene")
        names = [s.name for s in self.scenes]
        if len(set(names)) != len(names):
            raise ValueError(f"sweep.scenes: duplicate names {names}")


@dataclass
class SweepJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(config="configs/models/tiny-qwen2.json",
                                                                   tokenizer="char"))
    data: DataConfig = field(default_factory=lambda: DataConfig(synthetic=SyntheticTaskConfig()))
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        if self.data.synthetic is None:
            raise ValueError("sweep: data.synthetic is required (scenes are variants of the synthetic task)")


def select_branches(steps: list[int], best: int | None, k: int) -> list[int]:
    """`k` of the validation `steps`, evenly spread (first and last included), with `best` always among them."""
    if k >= len(steps):
        return list(steps)
    idx = [round(i * (len(steps) - 1) / (k - 1)) for i in range(k)] if k > 1 else [len(steps) - 1]
    chosen = [steps[i] for i in idx]
    if best is not None and best not in chosen:
        b = steps.index(best)
        nearest = min(range(k), key=lambda j: (abs(idx[j] - b), -idx[j]))
        chosen[nearest] = best
    return sorted(set(chosen))


def _device(run: RunConfig) -> str:
    import torch

    return "cuda" if run.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


class Sweep:
    def __init__(self, job: SweepJobConfig):
        self.job = job
        self.root = Path(job.run.output_dir) / job.run.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "sweep.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"done": []}
        self.state.setdefault("scenes", {})

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_path)

    def _item(self, key: str, fn) -> None:
        if key in self.state["done"]:
            log.info("sweep: %s already done; skipped", key)
            return
        fn()
        self.state["done"].append(key)
        self._save_state()

    def scene_data(self, spec: SceneSpec) -> DataConfig:
        overrides = {k: v for k, v in (("num_train", spec.num_train), ("difficulty_mix", spec.difficulty_mix))
                     if v is not None}
        return replace(self.job.data, synthetic=replace(self.job.data.synthetic, **overrides))

    # ------------------------------------------------------------ the phases of one scene
    def run_sft(self, spec: SceneSpec, st: dict) -> None:
        job = self.job
        sft = replace(job.sft, checkpoint_every=job.sft.val_every, keep_checkpoints=0, save_best=True,
                      export_hf=False)
        sft_job = SFTJobConfig(run=replace(job.run, output_dir=str(self.root / spec.name), name="sft"),
                               model=job.model, data=self.scene_data(spec), sft=sft)
        summary = SFTTrainer(sft_job).fit()
        destroy_distributed()
        if not summary["val_history"]:
            raise ValueError("sweep: SFT recorded no validation (need sft.val_every > 0 and a val split)")
        st["sft"] = {k: summary[k] for k in ("steps", "exaflops", "best", "val_history")}
        steps = [h["step"] for h in summary["val_history"]]
        st["branches"] = select_branches(steps, summary["best"]["step"], job.sweep.branches)
        log.info("sweep %s: RL branches from SFT steps %s", spec.name, st["branches"])

    def run_sft_eval(self, spec: SceneSpec, st: dict) -> None:
        """pass@1 (%) of the base model ("0") and every SFT checkpoint, one at a time (resumable)."""
        from engine.data.tokenizer import load_tokenizer
        from engine.evaluate import evaluate_model, load_for_eval
        from engine.models import build_model

        job, sweep = self.job, self.job.sweep
        scores = st.setdefault("sft_pass1", {})
        eval_path = self.root / spec.name / "sft" / "data" / "eval.jsonl"
        ckpts = self.root / spec.name / "sft" / "checkpoints"
        device = _device(job.run)
        for step in [0] + [h["step"] for h in st["sft"]["val_history"]]:
            if str(step) in scores:
                continue
            if step == 0:
                model = build_model(path=job.model.path, config=job.model.config, seed=job.run.seed)
                model.config._attn_implementation = "sdpa"
                model, tokenizer = model.to(device).eval(), load_tokenizer(job.model.tokenizer)
            else:
                model, tokenizer = load_for_eval(ckpts / checkpoint_name(step), device=device,
                                                 model_config=job.model.path or job.model.config,
                                                 tokenizer=job.model.tokenizer or job.model.path)
            result = evaluate_model(model, tokenizer, {"eval": eval_path}, samples=sweep.eval_samples,
                                    temperature=job.rl.eval_temperature, max_new_tokens=job.rl.max_new_tokens,
                                    max_prompts=job.rl.eval_max_prompts, seed=job.run.seed, device=device)
            scores[str(step)] = result.scores["eval"]
            st["n_eval"] = result.counts["eval"]
            log.info("sweep %s: pass@1 of SFT step %d = %.2f%%", spec.name, step, scores[str(step)])
            self._save_state()

    def run_rl(self, spec: SceneSpec, st: dict, key: str, algorithm: str, init_step: int | None,
               early_stop: bool) -> None:
        job, sweep = self.job, self.job.sweep
        init = str(self.root / spec.name / "sft" / "checkpoints" / checkpoint_name(init_step)) if init_step else None
        name = f"rl_{init_step or 0}" if key.startswith("rl/") else f"baseline_{algorithm}"
        rl_job = RLJobConfig(run=replace(job.run, output_dir=str(self.root / spec.name), name=name),
                             model=job.model, data=self.scene_data(spec),
                             rl=replace(job.rl, algorithm=algorithm, init_checkpoint=init))
        rule = ceiling_stop_rule(sweep.tol, sweep.patience, sweep.min_points) if early_stop else None
        summary = RLTrainer(rl_job).fit(stop_when=rule)
        destroy_distributed()
        st.setdefault("rl", {})[key] = {"algorithm": algorithm, "init_step": init_step or 0, "dir": name,
                                        "steps": summary["steps"], "planned_steps": job.rl.steps,
                                        "exaflops": summary["exaflops"], "stopped": summary["stopped"],
                                        "eval_history": summary["eval_history"]}

    def run_scene(self, spec: SceneSpec) -> None:
        st = self.state["scenes"].setdefault(spec.name, {})
        self._item(f"{spec.name}/sft", lambda: self.run_sft(spec, st))
        self._item(f"{spec.name}/sft_eval", lambda: self.run_sft_eval(spec, st))
        for step in [0] + st["branches"]:
            self._item(f"{spec.name}/rl/{step}",
                       lambda s=step: self.run_rl(spec, st, f"rl/{s}", self.job.rl.algorithm, s,
                                                  self.job.sweep.early_stop))
        for algo in self.job.sweep.baselines if spec.baselines else []:
            self._item(f"{spec.name}/baseline/{algo}",
                       lambda a=algo: self.run_rl(spec, st, f"baseline/{a}", a, None, False))

    def run(self) -> dict:
        from engine.sweep_report import write_sweep_report

        dump_config(self.job, self.root / "config.yaml")
        for spec in self.job.sweep.scenes:
            self.run_scene(spec)
        write_sweep_report(self.job, self.root, self.state)
        return self.state


def register(subparsers) -> None:
    p = subparsers.add_parser("sweep", help="SFT checkpoints x RL branches + baselines, ceiling fits, report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from engine.cli import run_job

    def run(job: SweepJobConfig) -> None:
        state = Sweep(job).run()
        print(f"report: {Path(job.run.output_dir) / job.run.name / 'sweep_report.md'}  "
              f"({len(state['done'])} items done)")

    return run_job(args, SweepJobConfig, run)
