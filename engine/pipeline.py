"""`ceiling run CONFIG`: SFT, then a validation-loss-timed switch to RL, then evaluation and a report.

    ceiling run configs/tiny.yaml          # the embedded default: CPU, a few minutes

Phases, each resumable; a finished phase is never redone (state in `<run>/pipeline.json`):
  1. sft     SFT with validation every `sft.val_every` steps (engine/sft). The switch policy decides
             when SFT ends and which checkpoint RL starts from:
               stable        (default) the first validation at which the Stable sub-phase is confirmed:
                             the last `patience` + 1 validation losses all lie within (1 + d1) of the
                             running minimum (the loss has plateaued). RL starts from the minimum-
                             validation-loss checkpoint. If SFT ends unconfirmed, that checkpoint too.
               min_val_loss  run SFT to the end; RL from the minimum-validation-loss checkpoint.
               step:N        end SFT at step N; RL from that step.
             The decision and its evidence (validation history with sub-phases) go to `switch.json`.
  2. rl      RL from the chosen checkpoint (DAPO_dc by default; engine/rl), with pass@1 evaluations.
  3. report  pass@1 of the base model (before SFT), the SFT model (the switch checkpoint) and the final
             model; `report.md` with figures; `curves.json` in the RETU format so `ceiling fit` reads it.
Layout: runs/<name>/{sft,rl}/ are ordinary SFT and RL run directories.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.checkpoint import checkpoint_name
from engine.config import DataConfig, ModelConfig, RunConfig, add_config_arguments, dump_config
from engine.distributed import destroy_distributed
from engine.rl.config import RLConfig, RLJobConfig
from engine.rl.trainer import RLTrainer
from engine.sft.trainer import SFTConfig, SFTJobConfig, SFTTrainer

log = logging.getLogger("ceiling")


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
class RunJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(config="configs/models/tiny-qwen2.json",
                                                                   tokenizer="char"))
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def stable_confirmed(losses: list[float], d1: float, patience: int) -> bool:
    """The last `patience` + 1 validation losses all lie within (1 + d1) of the minimum so far."""
    if len(losses) < patience + 1:
        return False
    return max(losses[-(patience + 1):]) <= (1 + d1) * min(losses)


class Pipeline:
    def __init__(self, job: RunJobConfig):
        self.job = job
        self.root = Path(job.run.output_dir) / job.run.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "pipeline.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {"done": []}

    def _save_state(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_path)

    def _stop_rule(self):
        policy, cfg = self.job.pipeline.switch, self.job.sft
        if policy == "stable":
            def rule(history):
                losses = [h["val_loss"] for h in history]
                if stable_confirmed(losses, cfg.subphase_d1, self.job.pipeline.patience):
                    return (f"Stable sub-phase confirmed: the last {self.job.pipeline.patience + 1} validation losses "
                            f"are within {cfg.subphase_d1:.0%} of the minimum {min(losses):.4f}")
                return None
            return rule
        if policy.startswith("step:"):
            n = int(policy.split(":")[1])
            return lambda history: f"switch step {n} reached" if history and history[-1]["step"] >= n else None
        return None

    def run_sft(self) -> None:
        job = self.job
        policy = job.pipeline.switch
        sft_cfg = job.sft
        if policy.startswith("step:"):  # validate (and checkpoint) exactly at the switch step
            n = int(policy.split(":")[1])
            if n > sft_cfg.steps:
                raise ValueError(f"pipeline.switch={policy} is beyond sft.steps={sft_cfg.steps}")
            sft_cfg = replace(sft_cfg, steps=n)
        sft_job = SFTJobConfig(run=replace(job.run, output_dir=str(self.root), name="sft"), model=job.model,
                               data=job.data, sft=sft_cfg)
        summary = SFTTrainer(sft_job).fit(stop_when=self._stop_rule())
        destroy_distributed()
        history, best = summary["val_history"], summary["best"]
        stopped = summary.get("stopped")
        if policy.startswith("step:"):
            step, reason = summary["steps"], f"policy step:{summary['steps']}"
        elif best is None:
            step, reason = summary["steps"], "no validation set: the last SFT checkpoint"
        elif policy == "stable" and stopped:
            step, reason = best["step"], stopped["reason"] + f"; RL starts from the min-val-loss step {best['step']}"
        elif policy == "stable":
            step, reason = best["step"], ("Stable sub-phase not confirmed within sft.steps; RL starts from the "
                                          f"min-val-loss step {best['step']}")
        else:
            step, reason = best["step"], f"minimum validation loss {best['val_loss']:.4f} at step {best['step']}"
        switch = {"policy": policy, "step": step, "reason": reason, "sft_steps_run": summary["steps"],
                  "sft_exaflops": summary["exaflops"], "checkpoint": str(self.root / "sft" / "checkpoints" /
                                                                        checkpoint_name(step)),
                  "val_history": history}
        (self.root / "switch.json").write_text(json.dumps(switch, indent=1))
        log.info("switch to RL: %s", reason)
        self.state["switch"] = switch

    def run_rl(self) -> None:
        job, switch = self.job, self.state["switch"]
        rl_job = RLJobConfig(run=replace(job.run, output_dir=str(self.root), name="rl"), model=job.model,
                             data=job.data, rl=replace(job.rl, init_checkpoint=switch["checkpoint"]))
        summary = RLTrainer(rl_job).fit()
        destroy_distributed()
        self.state["rl"] = {"steps": summary["steps"], "exaflops": summary["exaflops"],
                            "eval_history": summary["eval_history"]}

    def run_report(self) -> Path:
        from engine.report import write_run_report

        return write_run_report(self.job, self.root, self.state)

    def run(self, stop_after: str | None = None) -> dict:
        dump_config(self.job, self.root / "config.yaml")
        for phase, fn in (("sft", self.run_sft), ("rl", self.run_rl), ("report", self.run_report)):
            if phase in self.state["done"]:
                log.info("phase %s already done; skipped", phase)
            else:
                fn()
                self.state["done"].append(phase)
                self._save_state()
            if stop_after == phase:
                break
        return self.state


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="SFT, validation-timed switch to RL, evaluation and report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from engine.jobs import run_job

    def run(job: RunJobConfig) -> None:
        state = Pipeline(job).run()
        print(f"report: {Path(job.run.output_dir) / job.run.name / 'report.md'}  "
              f"(phases done: {', '.join(state['done'])})")

    return run_job(args, RunJobConfig, run)
