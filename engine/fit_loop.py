"""The fit loop the SFT and RL trainers share: resume, step, log, stop, checkpoint.

    class SFTTrainer(FitLoop): ...      # provides the hooks below
    trainer.fit()                       # to the end (or the stop rule's reason), resuming if it can
    trainer.fit(pause_at=8)             # one slice of the plan: to step 8, checkpointed (a sweep's race)
    trainer.fit(stop_after_step=3)      # a simulated crash after step 3 (the fault tests)

A trainer provides `step`, `state` (a dict saved in every checkpoint, holding its evaluations under
`history_key` and `stopped` once a stop rule ended it), `cfg.steps`, `cfg.checkpoint_every`, `job.run`,
`info`, `run_dir`, and the hooks `maybe_resume`, `save`, `finish` (the summary), `step_record` (one optimizer
step and the metrics to log for it, `{}` for none) and optionally `start` (before the first step), `finished`
and `must_save`. What stays in the trainers is what differs: what a step is, what an evaluation is, and
which checkpoints to keep.
"""

from __future__ import annotations

import logging

from engine.config import to_dict
from engine.rundir.metrics import MetricsLogger, progress

log = logging.getLogger("ceiling")


class FitLoop:
    label: str            # "SFT", "RL": log lines
    history_key: str      # the evaluations in `state` that `stop_when` reads
    eval_key: str         # the metric a step's record holds when it evaluated
    shown: tuple[str, ...]  # metrics on the progress bar

    def bar_name(self) -> str:
        return self.label.lower()

    def start(self, metrics: MetricsLogger) -> None:
        """Before the first step of this process (after any resume)."""

    def finished(self) -> bool:
        return self.step >= self.cfg.steps

    def must_save(self, record: dict[str, object]) -> bool:
        """A checkpoint beyond the periodic ones (SFT: a new best validation loss)."""
        return False

    def fit(self, stop_after_step: int | None = None, stop_when=None, pause_at: int | None = None) -> dict[str, object]:
        """Train to the end of the plan, resuming from the latest verified checkpoint.

        `stop_when(history) -> str | None` is asked after each evaluation; a reason ends the run there,
        checkpointed, and a later `fit` returns at once (the pipeline's switch to RL, a sweep's early stop).
        `pause_at` ends this call at that step with a checkpoint (the schedule stays the whole plan's), so a later
        `fit` goes on from there exactly. `stop_after_step` returns `{"stopped_at": step}` after that step, as a
        crash would leave it.
        """
        self.maybe_resume()
        if self.state.get("stopped") or (pause_at is not None and self.step >= pause_at):
            return self.finish()  # ended early by a stop rule, or this slice was already run: nothing to do
        main = self.info.is_main
        run = self.job.run
        metrics = MetricsLogger(self.run_dir, loggers=run.loggers, project=run.project, run_name=run.name,
                                config=to_dict(self.job) if main else None, enabled=main)
        bar = progress(self.cfg.steps, self.bar_name(), initial=self.step, enabled=main and self.job.run.progress)
        try:
            self.start(metrics)
            while not self.finished():
                record = self.step_record()
                last = self.finished() or (pause_at is not None and self.step >= pause_at)
                if record:
                    logged = metrics.log(self.step, record)
                    bar.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in logged.items()
                                     if k in self.shown and v is not None})
                bar.update(1)
                reason = stop_when(self.state[self.history_key]) if stop_when and self.eval_key in record else None
                if reason:
                    self.state["stopped"] = {"step": self.step, "reason": reason}
                    log.info("%s stops at step %d: %s", self.label, self.step, reason)
                every = self.cfg.checkpoint_every
                if last or reason or (every and self.step % every == 0) or self.must_save(record):
                    self.save()
                if reason or last:
                    break
                if stop_after_step is not None and self.step >= stop_after_step:
                    return {"stopped_at": self.step}
        finally:
            bar.close()
            metrics.close()
        return self.finish()
