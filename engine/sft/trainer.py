"""SFT on packed expert trajectories: FSDP2, fused LM-head loss, validation sub-phases, exact resume.

    ceiling sft configs/sft-tiny.yaml                               # CPU, one process
    torchrun --nproc-per-node 8 -m engine.cli sft configs/sft-qwen2.5-7b.yaml

Each optimizer step takes `global_batch_size` sequences (as in the paper, independent of the rank
count) in a fixed, seeded order, packs them first-fit-decreasing into micro-batches of at most
`micro_batch_tokens` tokens, spreads those over the ranks by tokens, and accumulates gradients. The
loss is the token-mean over the whole global batch: each micro-batch contributes its summed token
loss divided by the batch's loss-token count, which every rank knows from the plan, so no
communication is needed for it, and the result does not depend on how the batch was split.

Every `val_every` steps the validation loss (same token-mean) is computed and the SFT sub-phase
(Adaptive / Stable / Mild / Severe, engine/analysis/phases.py) is logged; the minimum-validation-loss
checkpoint is kept. With `sft.until: severe` (or `mild`) the run stops once that sub-phase is reached for
`sft.until_patience` validations in a row, `sft.steps` being the cap. Checkpoints hold model, optimizer,
scheduler, RNG and the data position (samples consumed), so a resumed run replays exactly the losses of an
uninterrupted one; resumed with another `global_batch_size`, the data goes on from the saved position (logged).
A non-finite loss or gradient norm stops the run before the update, names the step and the
micro-batch's sample ids, and leaves the last good checkpoint as it was.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

from engine import flops as flops_lib
from engine.analysis.phases import current_subphase, subphase_reached
from engine.config import SFTJobConfig
from engine.data.files import expand_paths
from engine.data.packing import IGNORE_INDEX, PackedBatch, collate_packed, pack_for_ranks
from engine.data.synthetic import write_task
from engine.data.token_store import TokenStore, open_token_store
from engine.data.tokenizer import model_tokenizer
from engine.distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from engine.errors import CeilingError
from engine.fit_loop import FitLoop
from engine.losses import linear_cross_entropy
from engine.models.hf_checkpoint import export_model
from engine.rundir.checkpoint import (
    latest_checkpoint,
    prune_checkpoints,
    resume_latest,
    save_checkpoint,
)
from engine.rundir.files import write_json_atomic
from engine.rundir.metrics import make_run_dir
from engine.training import DataOrder, build_optimizer, build_policy, guarded_step

log = logging.getLogger("ceiling")


def load_data(job: SFTJobConfig, tokenizer, run_dir: Path, info: DistInfo
              ) -> tuple[TokenStore, TokenStore | None, object]:
    """Train and validation token stores (built by rank 0 on first use; the synthetic task is first written
    to `<run>/data/`)."""
    data = job.data
    if data.synthetic is None and data.train_path is None:
        raise CeilingError("data: SFT needs `synthetic` or `train_path`")
    train_path, val_path = data.train_path, data.val_path
    if data.synthetic is not None:
        out = run_dir / "data"
        if info.is_main and not (out / "task_config.json").is_file():
            write_task(data.synthetic, out)
        barrier()
        train_path, val_path = str(out / "train.jsonl"), str(out / "val.jsonl")
    root = Path(job.sft.token_store_dir or Path(job.run.output_dir) / "token_store")
    progress = info.is_main and job.run.progress
    store = partial(open_token_store, tokenizer=tokenizer, max_seq_len=data.max_seq_len, overlong=data.overlong,
                    root=root, progress=progress, workers=data.tokenize_workers, fields=data.fields)
    train = store(expand_paths(train_path, "data.train_path"))
    val = store(expand_paths(val_path, "data.val_path")) if val_path else None
    return train, val, train.stats


def _dummy_batch() -> PackedBatch:
    """A one-token micro-batch with no loss token: keeps FSDP collectives in step on a rank with no work."""
    return collate_packed([[0]], [[0]], [-1])


class SFTTrainer(FitLoop):
    label, history_key, eval_key, shown = "SFT", "val_history", "val/loss", ("train/loss", "val/loss")

    def __init__(self, job: SFTJobConfig, stores: tuple[TokenStore, TokenStore | None] | None = None):
        """`stores`: ready (train, val) token stores, e.g. a benchmark's; default: built from `job.data`."""
        self.job, self.cfg = job, job.sft
        self.info = init_distributed(job.run.device)
        self.run_dir = make_run_dir(job.run.output_dir, job.run.name, job if self.info.is_main else None)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tokenizer = model_tokenizer(job.model)
        if stores is None:
            self.train, self.val, self.train_stats = load_data(job, self.tokenizer, self.run_dir, self.info)
        else:
            (self.train, self.val), self.train_stats = stores, stores[0].stats
        if self.train_stats.num_truncated or self.train_stats.num_dropped:
            log.info("train data: %d truncated, %d dropped of %d rows", self.train_stats.num_truncated,
                     self.train_stats.num_dropped, self.train_stats.num_rows)
        too_long = max(int(s.lengths_N.max()) for s in (self.train, self.val) if s is not None)
        if too_long > self.cfg.micro_batch_tokens:
            raise CeilingError(f"sft.micro_batch_tokens={self.cfg.micro_batch_tokens} is below the longest "
                               f"sample ({too_long} tokens); raise it or lower data.max_seq_len")
        self.model, self.model_config = build_policy(job.model, job.run.seed, self.info, job.fsdp, job.kernels)
        self.optimizer, self.scheduler = build_optimizer(self.model, self.cfg, self.cfg.steps)
        self.order = DataOrder(len(self.train), job.run.seed)
        self.step = 0
        self.state = {"val_history": [], "best": None, "exaflops": 0.0, "tokens": 0, "data_position": 0}
        self.peak = flops_lib.peak_flops(self.info.device, job.run.peak_tflops)

    # ------------------------------------------------------------ one micro-batch
    def _micro_batch(self, store: TokenStore, ids: list[int]) -> PackedBatch:
        return store.collate(ids) if ids else _dummy_batch()

    def _loss_sum(self, batch: PackedBatch) -> torch.Tensor:
        batch = batch.to(self.info.device)
        loss_fn = partial(linear_cross_entropy, labels=batch.labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return self.model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, loss_fn)

    # ------------------------------------------------------------ one optimizer step
    def train_step(self) -> dict[str, float]:
        ids = self.order.take(self.state["data_position"], self.cfg.global_batch_size)
        self.state["data_position"] += self.cfg.global_batch_size
        lengths = self.train.lengths_N[ids].tolist()
        plan = pack_for_ranks(lengths, self.cfg.micro_batch_tokens, self.info.world_size)
        n_loss = int(self.train.loss_tokens_N[ids].sum())  # loss tokens of the global batch
        scale = self.info.world_size / max(n_loss, 1)  # FSDP averages grads over ranks; undo, then token-mean
        mine = plan[self.info.rank]
        loss_sum = torch.zeros((), device=self.info.device)
        mb_losses = []
        self.model.train()
        for k, local in enumerate(mine):
            if isinstance(self.model, FSDPModule):
                self.model.set_requires_gradient_sync(
                    self.job.fsdp.reduce_scatter_every_micro_batch or k == len(mine) - 1)
            mb_ids = [ids[j] for j in local]
            loss = self._loss_sum(self._micro_batch(self.train, mb_ids))
            (loss * scale).backward()
            mb_losses.append((mb_ids, loss.detach()))
            loss_sum += loss.detach()
        grad_norm, lr = guarded_step(self.model, self.optimizer, self.scheduler, self.cfg.grad_clip, loss_sum,
                                     mb_losses, self.step + 1, self.ckpt_root, self.info.rank)
        self.step += 1
        tokens = sum(lengths)
        step_flops = flops_lib.sft_step_flops(self.model_config, tokens, tokens / len(ids))  # the paper's ledger
        self.state["exaflops"] += step_flops / 1e18
        self.state["tokens"] += tokens
        return {"train/loss": loss_sum / max(n_loss, 1), "train/grad_norm": grad_norm, "train/lr": lr,
                "train/loss_tokens": n_loss, "train/tokens": tokens, "train/micro_batches": len(mine),
                "compute/step_flops": step_flops, "compute/mfu_flops": flops_lib.mfu_step_flops(self.model_config, lengths)}

    # ------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> float:
        self.model.eval()
        lengths = self.val.lengths_N.tolist()
        plan = pack_for_ranks(lengths, self.cfg.micro_batch_tokens, self.info.world_size)
        total = torch.zeros((), device=self.info.device)
        for local in plan[self.info.rank]:
            total += self._loss_sum(self._micro_batch(self.val, local))
        all_reduce_sum(total)
        n_loss = int(self.val.loss_tokens_N.sum())
        return (total / max(n_loss, 1)).item()

    def _record_validation(self) -> dict[str, object]:
        val_loss = self.validate()
        history = self.state["val_history"]
        history.append({"step": self.step, "exaflops": self.state["exaflops"], "val_loss": val_loss})
        losses = [h["val_loss"] for h in history]
        phase = current_subphase(losses, self.cfg.subphase_d1, self.cfg.subphase_d2, self.cfg.subphase_window)
        history[-1]["subphase"] = phase
        is_best = val_loss <= min(losses)
        if is_best:
            self.state["best"] = {"step": self.step, "val_loss": val_loss}
        return {"val/loss": val_loss, "val/min_loss": min(losses), "val/subphase": phase, "val/is_best": is_best}

    # ------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        path = save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, self.scheduler,
                               {**self.state, "global_batch_size": self.cfg.global_batch_size})
        best = self.state["best"]
        protect = {f"step_{best['step']:08d}"} if best else set()
        prune_checkpoints(self.ckpt_root, self.cfg.keep_checkpoints, protect)
        return path

    def maybe_resume(self) -> None:
        state = resume_latest(self.ckpt_root, self.model, self.optimizer, self.scheduler, self.job.run.on_bad_checkpoint)
        if state is not None:
            log.info("resumed from %s (step %d, %.4g EFLOPs)", state.pop("path"), state["step"], state["exaflops"])
            self.step = state.pop("step")
            saved_batch = state.pop("global_batch_size", self.cfg.global_batch_size)
            if saved_batch != self.cfg.global_batch_size:  # the data goes on from the saved position either way
                log.warning("resuming with sft.global_batch_size=%d where the checkpoint used %d: the data continues "
                            "at sample %d of the seeded order", self.cfg.global_batch_size, saved_batch,
                            state["data_position"])
            self.state.update(state)

    # ------------------------------------------------------------ the loop (engine/fit_loop.py)
    def start(self, metrics) -> None:
        self._window_t, self._window_tokens = time.perf_counter(), 0  # tokens/s since the last log line

    def step_record(self) -> dict[str, object]:
        """One step; its metrics on `log_every` steps and the last, and the validation on `val_every` steps."""
        cfg = self.cfg
        out = self.train_step()
        self._window_tokens += out["train/tokens"]
        last = self.finished()
        record: dict[str, object] = {}
        if self.step % self.job.run.log_every == 0 or last:
            tokens_per_s = self._window_tokens / (time.perf_counter() - self._window_t)
            flops_per_s = out["compute/mfu_flops"] * tokens_per_s / out["train/tokens"]
            peak = self.peak * self.info.world_size if self.peak else None
            record.update(out)
            record.update({"perf/tokens_per_s": tokens_per_s,
                           "perf/mfu": flops_lib.mfu(flops_per_s, peak) if peak else None,
                           "compute/exaflops": self.state["exaflops"],
                           "data/epoch": self.state["data_position"] / len(self.train)})
            self._window_t, self._window_tokens = time.perf_counter(), 0
        if self.val is not None and cfg.val_every and (self.step % cfg.val_every == 0 or last):
            record.update(self._record_validation())
            record.setdefault("compute/exaflops", self.state["exaflops"])
        return record

    def fit(self, stop_after_step: int | None = None, stop_when=None, pause_at: int | None = None) -> dict[str, object]:
        """FitLoop.fit, with `sft.until` as a stop rule beside the caller's (the pipeline's switch)."""
        return super().fit(stop_after_step, _either(stop_when, self._until_reached), pause_at)

    def _until_reached(self, history: list[dict]) -> str | None:
        cfg = self.cfg
        if cfg.until == "steps":
            return None
        return subphase_reached([h["val_loss"] for h in history], cfg.until.capitalize(), cfg.subphase_d1,
                                cfg.subphase_d2, cfg.until_patience, cfg.subphase_window)

    def must_save(self, record: dict[str, object]) -> bool:
        return bool(record.get("val/is_best") and self.cfg.save_best)

    def finish(self) -> dict[str, object]:
        summary = {"steps": self.step, "exaflops": self.state["exaflops"], "tokens": self.state["tokens"],
                   "train_rows": self.train_stats.num_rows,
                   "stopped": self.state.get("stopped"),
                   "best": self.state["best"], "val_history": self.state["val_history"],
                   "checkpoint": str(latest_checkpoint(self.ckpt_root))}
        if self.cfg.export_hf:
            export_model(self.model, self.run_dir / "hf", self.tokenizer, self.job.model.path)
            summary["hf_dir"] = str(self.run_dir / "hf")
        if self.info.is_main:
            write_json_atomic(self.run_dir / "sft_summary.json", summary)
            best = self.state["best"]
            log.info("SFT done: %d steps, %.4g EFLOPs; min val loss %s", self.step, self.state["exaflops"],
                     f"{best['val_loss']:.4f} at step {best['step']}" if best else "n/a")
        return summary


def _either(*rules):
    """One stop rule from several: the first reason given."""
    rules = [r for r in rules if r is not None]
    return lambda history: next((reason for r in rules if (reason := r(history))), None)


def run_sft(job: SFTJobConfig, stop_after_step: int | None = None) -> dict[str, object]:
    trainer = SFTTrainer(job)
    return trainer.fit(stop_after_step)
