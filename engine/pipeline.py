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
             Before it, the base model is scored on a rollout backend built from the base weights
             (`model.path`, or the seeded init of `model.config`), with the settings of RL's evaluations, so the
             base row is the base weights whatever the RL backend shares with the policy.
  3. report  pass@1 of the base model (before SFT), the SFT model (the switch checkpoint) and the final
             model, each with the weights and backend that produced it; `report.md` with figures; `curves.json`
             in the RETU format so `ceiling fit` reads it.
Layout: runs/<name>/{sft,rl}/ are ordinary SFT and RL run directories; runs/<name>/hf is the final model (RL's
HF directory, `rl.export_hf`).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

from engine.analysis.phases import stable_confirmed
from engine.config import (
    RLJobConfig,
    RunJobConfig,
    SFTConfig,
    SFTJobConfig,
    add_config_arguments,
    dump_config,
)
from engine.distributed import destroy_distributed
from engine.rl.trainer import RLTrainer
from engine.rundir.checkpoint import checkpoint_name
from engine.rundir.files import read_json, write_json_atomic
from engine.sft.trainer import SFTTrainer

log = logging.getLogger("ceiling")


class Pipeline:
    def __init__(self, job: RunJobConfig):
        self.job = job
        self.root = Path(job.run.output_dir) / job.run.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_path = self.root / "pipeline.json"
        self.state = read_json(self.state_path) or {"done": []}

    def _save_state(self) -> None:
        write_json_atomic(self.state_path, self.state)

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

    def sft_job(self, sft: SFTConfig) -> SFTJobConfig:
        """The SFT phase as an SFT job in `<run>/sft/`, with the run's model, data, kernels and FSDP sections."""
        job = self.job
        return SFTJobConfig(run=replace(job.run, output_dir=str(self.root), name="sft"), model=job.model,
                            data=job.data, sft=sft, kernels=job.kernels, fsdp=job.fsdp)

    def rl_job(self, init_checkpoint: str) -> RLJobConfig:
        """The RL phase as an RL job in `<run>/rl/` from `init_checkpoint`, with every section RL honours."""
        job = self.job
        return RLJobConfig(run=replace(job.run, output_dir=str(self.root), name="rl"), model=job.model,
                           data=job.data, rl=replace(job.rl, init_checkpoint=init_checkpoint), reward=job.reward,
                           rollout=job.rollout, kernels=job.kernels, fsdp=job.fsdp)

    def run_sft(self) -> None:
        job = self.job
        policy = job.pipeline.switch
        sft_cfg = job.sft
        if policy.startswith("step:"):  # validate (and checkpoint) exactly at the switch step
            n = int(policy.split(":")[1])
            if n > sft_cfg.steps:
                raise ValueError(f"pipeline.switch={policy} is beyond sft.steps={sft_cfg.steps}")
            sft_cfg = replace(sft_cfg, steps=n)
        summary = SFTTrainer(self.sft_job(sft_cfg)).fit(stop_when=self._stop_rule())
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
        write_json_atomic(self.root / "switch.json", switch)
        log.info("switch to RL: %s", reason)
        self.state["switch"] = switch

    def score_base(self, rl_job: RLJobConfig) -> dict:
        """pass@1 of the base weights on RL's eval set with RL's evaluation settings, on a backend of its own built
        from the base (closed before RL builds its own)."""
        from engine.config import EvalConfig
        from engine.data.tokenizer import model_tokenizer
        from engine.distributed import init_distributed
        from engine.evaluate import Benchmark, eval_rollout, eval_seed, evaluate
        from engine.reward import Reward
        from engine.rl.algorithms import ALGORITHMS
        from engine.rl.rollouts import rl_prompt_files

        job, rl = self.job, self.job.rl
        info = init_distributed(job.run.device)
        tokenizer = model_tokenizer(job.model)
        _, eval_path = rl_prompt_files(rl_job, self.root / "rl", info.is_main)
        cfg = EvalConfig(samples=job.pipeline.eval_samples, temperature=rl.eval_temperature,
                         max_new_tokens=rl.max_new_tokens, max_prompts=rl.eval_max_prompts,
                         max_prompt_len=rl.max_prompt_len, batch_size=rl.rollout_batch_size)
        bench = Benchmark.load("eval", eval_path, tokenizer, cfg.max_prompts, job.data.fields, cfg.max_prompt_len)
        t0 = time.perf_counter()
        rollout = eval_rollout(job.rollout, job.model, tokenizer, info, workdir=self.root / "base", seed=job.run.seed,
                               max_model_len=rl.max_prompt_len + rl.max_new_tokens, batch_size=cfg.batch_size)
        try:
            result = evaluate(rollout, [bench], cfg, seed=eval_seed(job.run.seed),
                              reward=Reward.of(job.reward, ALGORITHMS[rl.algorithm].reward_mode))
        finally:
            rollout.close()
            destroy_distributed()
        weights = job.model.path or f"the seeded ({job.run.seed}) random init of {job.model.config}"
        return {"pass@1": result.scores["eval"], "samples": cfg.samples, "backend": result.backend,
                "weights": weights, "metrics": result.metrics["eval"], "seconds": round(time.perf_counter() - t0, 3)}

    def run_rl(self) -> None:
        switch = self.state["switch"]
        rl_job = self.rl_job(switch["checkpoint"])
        if "base" not in self.state:
            self.state["base"] = self.score_base(rl_job)
            self._save_state()
        trainer = RLTrainer(rl_job)
        try:
            summary = trainer.fit()
        finally:
            trainer.rollout.close()  # frees the engine's weights and KV cache before the report phase
            destroy_distributed()
        self.state["rl"] = {"steps": summary["steps"], "exaflops": summary["exaflops"],
                            "eval_history": summary["eval_history"], "rollout_backend": summary["rollout_backend"],
                            "device": trainer.info.device.type, "checkpoint": summary["checkpoint"],
                            "reward": summary["reward"], "eval_prompts": summary["eval_prompts"]}
        if summary.get("hf_dir"):  # the final model at the run's top level
            link = self.root / "hf"
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path("rl") / "hf", target_is_directory=True)

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
