"""RL with verifiable rewards on the packed fused-loss path: GRPO, DAPO_d, DAPO_dc, LUFFY, SRFT, UPT.

    ceiling rl configs/rl-tiny.yaml                       # CPU: DAPO_dc from the tiny SFT checkpoint
    ceiling rl configs/rl-tiny.yaml --set rl.algorithm=luffy
    torchrun --nproc-per-node 8 -m engine.cli rl configs/rl-dapo_dc-qwen2.5-7b.yaml

One step = one rollout batch:
  1. Rollout. Generation rounds of `gen_batch` prompts x `n_samples` (G) samples; every rank generates
     its slice of the round on its own rollout copy of the policy (no collectives inside generate), and
     math-verify scores the answers. DAPO's dynamic sampling drops groups whose rewards are all equal
     and runs rounds until `train_batch` groups are kept or `max_gen_rounds` is reached (K rounds).
  2. Sequences. Each kept group gives its G on-policy samples; LUFFY/SRFT/UPT add `n_expert` expert
     trajectories of the same prompt (off-policy, scored by the reward like any response).
  3. Weights. engine/rl/algorithms.py turns rewards into advantages and per-sequence weights; sequences no
     weight trains (UPT's gate) are dropped before packing. engine/rl/update.py makes each packed
     micro-batch one call of `engine.losses.linear_policy_loss` at the sampling temperature (SRFT's entropy
     weights and the KL gradient taken from that same forward).
  4. Update. `mini_batches` optimizer updates per rollout batch. With one (the paper's setting),
     old_logp = logp.detach() and no extra forward runs; otherwise old log-probs are recomputed once.
     After the update the full weights are copied into the rollout model (weight sync); the hf backend on
     one rank in fp32 generates with the policy module itself, so there is nothing to copy.
Compute is logged by the paper's Appendix C from the real token counts (generation, update, expert).
Every `eval_every` steps, pass@1 (temperature 0.7, `eval_samples` samples per prompt) on held-out prompts
is logged and appended to `<run>/eval_curve.json`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from engine import flops as flops_lib
from engine.config import RLJobConfig
from engine.data.layouts import load_prompt_rows
from engine.data.packing import collate_packed, pack_for_ranks
from engine.data.sft_dataset import encode_prompts, encode_texts
from engine.data.tokenizer import end_of_turn_id, model_tokenizer
from engine.distributed import all_reduce_sum, compute_dtype, init_distributed
from engine.errors import CeilingError
from engine.evaluate import (
    ScoredSample,
    eval_seed,
    generation_records,
    summarize_by_source,
    summarize_samples,
)
from engine.fit_loop import FitLoop
from engine.losses import linear_policy_loss
from engine.models import PackedCausalLM, build_model
from engine.models.hf_checkpoint import export_model
from engine.reward import Reward, RewardStats
from engine.rl.algorithms import ALGORITHMS, RLBatch, SeqWeights, WeightParams, sequence_weights
from engine.rl.normalizers import loss_normalizers
from engine.rl.rollouts import EvalOutcome, Prompt, RolloutStep, rl_prompt_files
from engine.rl.sampling import Group, dynamic_sampling
from engine.rl.update import LossSettings, MicroBatchLoss
from engine.rollout import SamplingParams, build_rollout, check_weight_version
from engine.rundir.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resume_latest,
    save_checkpoint,
)
from engine.rundir.files import write_json_atomic
from engine.rundir.generations import write_generations
from engine.rundir.metrics import make_run_dir
from engine.training import DataOrder, build_optimizer, build_policy, guarded_step

log = logging.getLogger("ceiling")
FLOPS_FAMILY = {"grpo": "grpo", "dapo_d": "dapo", "dapo_dc": "dapo", "luffy": "luffy", "srft": "srft", "upt": "upt"}


@dataclass
class Seq:
    """One training sequence: prompt + response tokens, loss on the response."""

    ids: list[int]
    loss_mask: list[int]
    reward: float
    group: int
    is_expert: bool
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    @property
    def n_response(self) -> int:
        return sum(self.loss_mask)


class RLTrainer(FitLoop):
    label, history_key, eval_key, shown = "RL", "eval_history", "eval/pass@1", ("rollout/reward_mean", "eval/pass@1")

    def __init__(self, job: RLJobConfig):
        self.job, self.cfg = job, job.rl
        self.spec = ALGORITHMS[self.cfg.algorithm]
        self.loss_settings = LossSettings.for_run(self.cfg, self.spec)
        self.reward = Reward.of(job.reward, self.spec.reward_mode)
        self.info = init_distributed(job.run.device)
        self.run_dir = make_run_dir(job.run.output_dir, job.run.name, job if self.info.is_main else None)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tokenizer = model_tokenizer(job.model)
        self.prompts, self.eval_prompts = self._load_prompts()
        # The rollout backend first: vLLM sizes its memory from what is free before FSDP allocates.
        self.rollout = build_rollout(job.rollout, job.model, self.tokenizer, self.info, workdir=self.run_dir,
                                     seed=job.run.seed, max_model_len=self.cfg.max_prompt_len + self.cfg.max_new_tokens,
                                     hf_batch_size=self.cfg.rollout_batch_size)
        self.weight_version = 0  # bumped by every sync; every rollout output must carry the current one
        self.model, self.model_config = build_policy(job.model, job.run.seed, self.info, job.fsdp, job.kernels)
        if self.rollout.backend == "hf" and not isinstance(self.model, FSDPModule):
            self.rollout.share(self.model)  # one rank in fp32: generate with the policy, nothing to sync
        if self.cfg.init_checkpoint:
            init = Path(self.cfg.init_checkpoint)
            if (init / "latest").is_file():  # a checkpoints/ root: take its newest checkpoint (verified on load)
                init = init / (init / "latest").read_text().strip()
            load_checkpoint(init, self.model)
            log.info("policy initialised from %s", init)
        total_updates = self.cfg.steps * self.cfg.mini_batches
        self.optimizer, self.scheduler = build_optimizer(self.model, self.cfg, total_updates)
        dtype = compute_dtype(self.info.device, job.model.dtype)
        self.reference = None
        if self.cfg.kl_coef > 0:  # the frozen initial policy, for the KL term
            reference = build_model(path=job.model.path, config=job.model.config, dtype=dtype,
                                    seed=job.run.seed).to(self.info.device)
            if self.cfg.init_checkpoint:  # the policy RL starts from, streamed in buckets (no full fp32 copy)
                from engine.rollout.weight_sync import copy_full_weights
                copy_full_weights(self.model, reference, job.rollout.bucket_bytes)
            self.reference = PackedCausalLM(reference).eval().requires_grad_(False)
        self.order = DataOrder(len(self.prompts), job.run.seed)
        self.step = 0
        self.state = {"cursor": 0, "exaflops": 0.0, "eval_history": []}
        self.peak = flops_lib.peak_flops(self.info.device, job.run.peak_tflops)

    # ------------------------------------------------------------ data
    def _load_prompts(self) -> tuple[list[Prompt], list[Prompt]]:
        prompts_path, eval_path = rl_prompt_files(self.job, self.run_dir, self.info.is_main)
        train = self._encode(prompts_path, "rl.prompts_path", need_expert=self.spec.uses_expert)
        evals = self._encode(eval_path, "rl.eval_path", need_expert=False) if eval_path else []
        if self.cfg.eval_max_prompts is not None:
            evals = evals[: self.cfg.eval_max_prompts]
        return train, evals

    def _encode(self, path, setting: str, need_expert: bool) -> list[Prompt]:
        rows = load_prompt_rows(path, self.job.data.fields, setting)
        ids = encode_prompts([r.messages for r in rows], self.tokenizer)
        eot = end_of_turn_id(self.tokenizer)
        experts = encode_texts([r.response or "" for r in rows], self.tokenizer)
        out, too_long = [], 0
        for row, p, e in zip(rows, ids, experts):
            if need_expert and not row.response:
                raise CeilingError(f"{setting} {path}: row {row.id!r} has no expert trajectory (`response`, LUFFY's "
                                   f"`target`, or data.fields.response), which rl.algorithm={self.cfg.algorithm} needs")
            if len(p) > self.cfg.max_prompt_len:
                too_long += 1
                continue
            expert = (list(e) + [eot])[: self.cfg.max_new_tokens] if row.response else None
            out.append(Prompt(row, list(p), expert))
        if too_long:
            log.warning("%s: %d of %d prompts are longer than rl.max_prompt_len=%d and were skipped",
                        path, too_long, len(rows), self.cfg.max_prompt_len)
        if not out:
            raise CeilingError(f"{path}: no usable prompts")
        return out

    # ------------------------------------------------------------ rollout
    def _generate(self, prompts: list[Prompt], params: SamplingParams, keep_text: bool
                  ) -> tuple[list[list[ScoredSample]], RewardStats, dict[str, float]]:
        """Each rollout group (a rank, or a tensor-parallel group of ranks) samples and scores its slice of `prompts`;
        returns every prompt's samples in order (texts only with `keep_text`), the reward's counts, and the
        seconds spent generating and scoring."""
        rank, world = self.rollout.data_parallel
        mine = prompts[rank::world]
        t0 = time.perf_counter()
        outputs = self.rollout.generate([p.ids for p in mine], params) if mine else []
        check_weight_version(outputs, self.weight_version)
        t1 = time.perf_counter()
        rows = [p.row for p, outs in zip(mine, outputs) for _ in outs]
        scores, stats = self.reward.score([o.text for outs in outputs for o in outs], [r.answer for r in rows],
                                          [r.data_source for r in rows], [r.extra_info for r in rows])
        it = iter(scores)
        local = [[ScoredSample(o.text if keep_text else "", len(o.response_ids()), o.finish_reason, next(it),
                               o.response_ids()) for o in outs] for outs in outputs]
        timing = {"rollout": t1 - t0, "reward": time.perf_counter() - t1}
        if world == 1:
            return local, stats, timing
        gathered = [None] * self.info.world_size
        dist.all_gather_object(gathered, (local, stats, timing))
        gathered = gathered[::self.info.world_size // world]  # one answer per tensor-parallel group
        merged: list[list[ScoredSample] | None] = [None] * len(prompts)
        total = RewardStats()
        for r, (samples, st, _) in enumerate(gathered):
            for j, s in enumerate(samples):
                merged[r + j * world] = s
            total = total + st
        return merged, total, timing

    def _round(self, k: int, step: RolloutStep) -> list[Group]:
        idx = self.order.take(self.state["cursor"], self.cfg.gen_batch)
        self.state["cursor"] += self.cfg.gen_batch
        prompts = [self.prompts[i] for i in idx]
        seed = self.job.run.seed * 1_000_003 + self.step * 1_009 + k * 10 + self.rollout.data_parallel[0]
        # no rollout logprobs: the update recomputes old_logp when it needs them (mini_batches > 1)
        params = SamplingParams(self.cfg.temperature, self.cfg.top_p, self.cfg.max_new_tokens, self.cfg.n_samples, seed,
                                logprobs=False)
        samples, stats, timing = self._generate(prompts, params, keep_text=step.dump)
        step.add_round(prompts, samples, stats, timing)
        return [Group([s.score.reward for s in group], payload=(p, group)) for p, group in zip(prompts, samples)]

    def _sequences(self, groups: list[Group]) -> list[Seq]:
        if self.spec.uses_expert:
            self._score_experts([g.payload[0] for g in groups])
        seqs = []
        for g, group in enumerate(groups):
            prompt, samples = group.payload
            for sample in samples:
                resp = sample.response_ids
                seqs.append(Seq(prompt.ids + resp, [0] * len(prompt.ids) + [1] * len(resp), sample.score.reward, g,
                                False))
            if self.spec.uses_expert:
                for _ in range(self.cfg.n_expert):
                    e = prompt.expert_ids
                    seqs.append(Seq(prompt.ids + e, [0] * len(prompt.ids) + [1] * len(e), prompt.expert_reward, g, True))
        return [s for s in seqs if s.n_response > 0 or s.is_expert]

    def _score_experts(self, prompts: list[Prompt]) -> None:
        """Score expert trajectories like any response (once per prompt); rank 0 scores, the others receive."""
        todo = list({id(p): p for p in prompts if p.expert_reward is None}.values())
        if not todo:
            return
        scores = None
        if self.info.is_main:
            texts = [self.tokenizer.decode(p.expert_ids, skip_special_tokens=True) for p in todo]
            results, stats = self.reward.score(texts, [p.row.answer for p in todo], [p.row.data_source for p in todo],
                                               [p.row.extra_info for p in todo])
            stats.warn("expert trajectories")
            scores = [r.reward for r in results]
        if self.info.world_size > 1:
            box = [scores]
            dist.broadcast_object_list(box, src=0)
            scores = box[0]
        for p, r in zip(todo, scores):
            p.expert_reward = r

    # ------------------------------------------------------------ update
    def _micro_batches(self, seqs: list[Seq]):
        plan = pack_for_ranks([len(s.ids) for s in seqs], self.cfg.micro_batch_tokens, self.info.world_size)
        for local in plan[self.info.rank]:
            if not local:  # keeps FSDP collectives in step on a rank with no work
                yield [], collate_packed([[0, 0]], [[0, 0]], [-1])
            else:
                yield local, collate_packed([seqs[i].ids for i in local], [seqs[i].loss_mask for i in local], local)

    @torch.no_grad()
    def _logprobs(self, seqs: list[Seq], model, attr: str) -> None:
        """Per-token log-probs of each sequence's targets under `model` (old policy or reference)."""
        for local, batch in self._micro_batches(seqs):
            batch = batch.to(self.info.device)
            mask = (batch.labels != -100).float()
            loss_fn = partial(linear_policy_loss, targets=batch.labels.clamp(min=0), advantages=torch.zeros_like(mask),
                              loss_mask=mask, temperature=self.cfg.temperature)
            out = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, loss_fn)
            bounds = batch.cu_seqlens.tolist()
            for j, i in enumerate(local):
                setattr(seqs[i], attr, out.logp[bounds[j]:bounds[j + 1]].clone())

    def _update(self, seqs: list[Seq], seq_w: SeqWeights) -> dict[str, float]:
        """One optimizer update on `seqs` (whole groups). seq_w.sft_weight_S is completed in place with the
        weights the update used (SRFT's entropy weights, the SFT normaliser); engine/rl/update.py."""
        cfg, world, dev = self.cfg, self.info.world_size, self.info.device
        norms = loss_normalizers([s.n_response for s in seqs], seq_w, cfg.aggregation, cfg.sft_norm, cfg.norm_tokens)
        sums = {k: torch.zeros((), device=dev) for k in ("loss", "entropy", "tokens", "clip_low", "clip_high",
                                                          "pg_tokens", "kl", "stats_tokens")}
        micro_losses, used_sft = [], []
        self.model.train()
        mbs = list(self._micro_batches(seqs))
        for n, (local, batch) in enumerate(mbs):
            if isinstance(self.model, FSDPModule):
                self.model.set_requires_gradient_sync(n == len(mbs) - 1)
            batch = batch.to(dev)
            response_T = batch.labels != -100
            sub = seq_w.select(local)
            facts = [(seqs[i].reward, seqs[i].is_expert) for i in local]
            if not local:  # the dummy micro-batch of a rank without work: one untrained sequence
                response_T = torch.zeros_like(response_T)
                sub, facts = SeqWeights(*(torch.zeros(1, dtype=t.dtype) for t in (
                    seq_w.advantages_S, seq_w.sft_weight_S, seq_w.pg_weight_S, seq_w.off_policy_S,
                    seq_w.trained_S))), [(0.0, False)]
            old = torch.cat([seqs[i].old_logp for i in local]).to(dev) if cfg.mini_batches > 1 and local else None
            ref = torch.cat([seqs[i].ref_logp for i in local]).to(dev) if self.reference is not None and local \
                else (torch.zeros(response_T.numel(), device=dev) if self.reference is not None else None)
            # Host syncs (engine/rl/update.py): the per-sequence values reach the device in one non-blocking copy
            # and every sum stays there until the step ends; only the fused loss's compaction may read the device.
            loss_fn = MicroBatchLoss(sub, torch.tensor([f[0] for f in facts]), torch.tensor([f[1] for f in facts]),
                                     batch.cu_seqlens, response_T, batch.labels.clamp(min=0), norms,
                                     self.loss_settings, old_logp_T=old, ref_logp_T=ref)
            out = self.model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, loss_fn)
            (out.loss * world).backward()
            if local:
                used_sft.append((local, loss_fn.sft_weight_S))
            sums["loss"] += out.loss.detach()
            for k, v in loss_fn.token_stats(out).items():
                sums[k] += v
            micro_losses.append(([int(i) for i in local], out.loss.detach()))
        if used_sft:  # back to the host once per update, after the last micro-batch
            seq_w.sft_weight_S[[i for local, _ in used_sft for i in local]] = \
                torch.cat([w for _, w in used_sft]).to(seq_w.sft_weight_S)
        loss = sums.pop("loss")
        grad_norm, lr = guarded_step(self.model, self.optimizer, self.scheduler, cfg.grad_clip, loss, micro_losses,
                                     self.step + 1, self.ckpt_root, self.info.rank)
        for v in sums.values():
            all_reduce_sum(v)
        tokens, pg = sums["tokens"].clamp(min=1), sums["pg_tokens"].clamp(min=1)
        dims = flops_lib.model_dims(self.model_config)
        out = {"train/loss": loss / world, "train/grad_norm": grad_norm, "train/lr": lr,
               "train/entropy": sums["entropy"] / tokens, "train/clip_frac_low": sums["clip_low"] / pg,
               "train/clip_frac_high": sums["clip_high"] / pg,
               # the no-grad LM-head pass of SRFT / KL (engine/rl/update.py): not in the paper's compute
               "compute/stats_pass_flops": 2.0 * dims.vocab * dims.hidden * sums["stats_tokens"]}
        if self.reference is not None:
            out["train/kl"] = sums["kl"] / tokens
        return out

    def sync_rollout(self) -> None:
        """Collective: stream the policy into the rollout backend bucket by bucket, verified, as a new version."""
        self.weight_version += 1
        self.rollout.sync_weights(self.model, self.weight_version)

    # ------------------------------------------------------------ one step
    def train_step(self) -> dict[str, object]:
        cfg = self.cfg
        step = RolloutStep(dump=self._dumps(self.step + 1))
        t0 = time.perf_counter()
        result = dynamic_sampling(partial(self._round, step=step), cfg.train_batch, cfg.max_gen_rounds,
                                  filter_groups=self.spec.dynamic_sampling, on_unfilled=cfg.on_unfilled)
        if not result.filled and self.spec.dynamic_sampling:
            log.warning("step %d: dynamic sampling kept %d of %d groups in %d rounds; training on the short batch",
                        self.step + 1, len(result.groups), cfg.train_batch, result.num_rounds)
        t1 = time.perf_counter()
        seqs = self._sequences(result.groups)
        batch = RLBatch(torch.tensor([s.reward for s in seqs], dtype=torch.float32),
                        torch.tensor([s.group for s in seqs], dtype=torch.long),
                        torch.tensor([s.is_expert for s in seqs], dtype=torch.bool))
        seq_w = sequence_weights(self.spec, batch, WeightParams(upt_gamma=cfg.upt_gamma, adv_eps=cfg.adv_eps,
                                                                 adv_std=cfg.adv_std))
        n_gated = len({s.group for s, t in zip(seqs, seq_w.trained_S.tolist()) if t and s.is_expert})
        keep = [i for i, t in enumerate(seq_w.trained_S.tolist()) if t]  # UPT's gate: only trained ones are packed
        seqs, seq_w = [seqs[i] for i in keep], seq_w.select(keep)
        if not seqs:  # every group had equal rewards in every round: nothing to learn from this batch
            log.warning("step %d: no informative group in %d rounds; update skipped (raise rl.max_gen_rounds "
                        "or rl.gen_batch if this persists)", self.step + 1, result.num_rounds)
        else:  # rollout lifecycle: generate -> sleep -> update -> sync -> wake
            self.rollout.sleep()
        if cfg.mini_batches > 1:
            self._logprobs(seqs, self.model, "old_logp")
        if self.reference is not None:
            self._logprobs(seqs, self.reference, "ref_logp")
        metrics: dict[str, object] = {"rollout/skipped": int(not seqs)}
        groups = sorted({s.group for s in seqs})
        stats_flops = 0.0
        for chunk in range(cfg.mini_batches if seqs else 0):  # whole groups per mini-batch: advantages are per group
            chosen = set(groups[chunk::cfg.mini_batches])
            idx = [i for i, s in enumerate(seqs) if s.group in chosen]
            metrics.update(self._update([seqs[i] for i in idx], seq_w.select(idx)))
            stats_flops += metrics.pop("compute/stats_pass_flops")
        metrics["compute/stats_pass_flops"] = stats_flops
        t2 = time.perf_counter()
        if seqs:
            self.sync_rollout()
            self.rollout.wake()
        self.step += 1
        # Compute by Appendix C (Eq. 26-27 for UPT) from the real lengths: generation (all rounds), and the
        # sequences the update trains (the gate's N_on on-policy / N_off expert for UPT).
        on_policy = [s for s in seqs if not s.is_expert]
        update_tokens = sum(len(s.ids) for s in on_policy)
        expert_tokens = sum(len(s.ids) for s in seqs if s.is_expert)
        n_gen = result.num_generated * cfg.n_samples
        mean_seq_len = (step.gen_tokens + update_tokens + expert_tokens) / max(n_gen + len(seqs), 1)
        step_flops = flops_lib.rl_step_flops(
            FLOPS_FAMILY[cfg.algorithm], self.model_config, mean_seq_len=mean_seq_len, gen_tokens=step.gen_tokens,
            update_tokens=update_tokens, offpolicy_tokens=expert_tokens)
        self.state["exaflops"] += step_flops / 1e18
        step.stats.warn(f"RL step {self.step}")
        if step.dump and self.info.is_main:
            kept = {id(g.payload[1]) for g in result.groups}
            write_generations(self.run_dir / "generations" / f"step_{self.step:08d}.jsonl",
                              step.records(self.step, kept, self.weight_version - bool(seqs), self.tokenizer),
                              cfg.dump_max_rows)
        all_rewards = [r for g in result.groups for r in g.rewards]
        metrics.update({
            **step.metrics(),
            "rollout/kept_reward_mean": sum(all_rewards) / max(len(all_rewards), 1),
            "rollout/pass_rate": sum(max(g.rewards) > 0 for g in result.groups) / max(len(result.groups), 1),
            "rollout/kept_group_frac": result.kept_fraction,
            "rollout/num_rounds": result.num_rounds,
            "rollout/groups": len(result.groups),
            "rollout/filled": int(result.filled),
            "compute/gen_tokens": step.gen_tokens, "compute/update_tokens": update_tokens,
            "compute/expert_tokens": expert_tokens, "compute/gen_seqs": n_gen, "compute/new_tokens": step.new_tokens,
            "rollout/sft_prompts": n_gated if cfg.algorithm == "upt" else None,
            "time/rollout_s": step.rollout_s, "time/reward_s": step.reward_s,
            "time/update_s": t2 - t1, "time/step_s": time.perf_counter() - t0,
            # as SFT's: tokens trained per second of the update; and tokens generated per second of rollout
            "perf/tokens_per_s": (update_tokens + expert_tokens) / max(t2 - t1, 1e-9),
            "perf/rollout_tokens_per_s": step.new_tokens / max(step.rollout_s, 1e-9),
            "compute/step_flops": step_flops, "compute/exaflops": self.state["exaflops"],
        })
        return metrics

    def _dumps(self, step: int) -> bool:
        """Whether step `step` (and the evaluation after it) writes its generations."""
        every = self.cfg.dump_generations
        return bool(every) and step % every == 0

    # ------------------------------------------------------------ evaluation
    def evaluate(self, samples: int | None = None) -> EvalOutcome:
        """pass@1 (the fraction of `samples`, default `eval_samples`, samples per prompt that count as solved), pass@k
        and maj@k, truncation and lengths on the eval prompts, generated by the run's rollout backend with the weights
        it holds now and scored by the run's reward."""
        cfg = self.cfg
        params = SamplingParams(cfg.eval_temperature, 1.0, cfg.max_new_tokens, samples or cfg.eval_samples,
                                seed=eval_seed(self.job.run.seed), logprobs=False)
        dump = bool(cfg.dump_generations) and self.info.is_main
        per_prompt, stats, _ = self._generate(self.eval_prompts, params, keep_text=bool(cfg.dump_generations))
        stats.warn(f"evaluation at RL step {self.step}")
        rows = [p.row for p in self.eval_prompts]
        records = generation_records("eval", self.step, rows, [self.tokenizer.decode(p.ids) for p in self.eval_prompts],
                                     per_prompt, self.weight_version) if dump else []
        return EvalOutcome(summarize_samples(per_prompt), summarize_by_source(per_prompt, [r.data_source for r in rows]),
                           records)

    def _record_eval(self) -> dict[str, object]:
        t0 = time.perf_counter()
        outcome = self.evaluate()
        seconds = time.perf_counter() - t0
        scores = {k: v for k, v in outcome.metrics.items() if k.startswith(("pass@", "maj@"))}
        self.state["eval_history"].append({
            "step": self.step, "rl_exaflops": self.state["exaflops"], **scores, "backend": self.rollout.backend,
            "seconds": round(seconds, 3), "truncated_frac": outcome.metrics.get("truncated_frac"),
            **({"by_source": {s: m["pass@1"] for s, m in outcome.by_source.items()}} if outcome.by_source else {})})
        if self.info.is_main:
            write_json_atomic(self.run_dir / "eval_curve.json", self.state["eval_history"])
            if outcome.records:
                write_generations(self.run_dir / "generations" / f"eval_step_{self.step:08d}.jsonl", outcome.records,
                                  self.cfg.dump_max_rows)
        return {**{f"eval/{k}": v for k, v in outcome.metrics.items()},
                **{f"eval/{s}/{k}": v for s, m in outcome.by_source.items() for k, v in m.items()
                   if k.startswith(("pass@", "maj@"))},
                "compute/exaflops": self.state["exaflops"], "time/eval_s": seconds}

    # ------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        path = save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, self.scheduler, self.state)
        prune_checkpoints(self.ckpt_root, self.cfg.keep_checkpoints, set())
        return path

    def maybe_resume(self) -> None:
        state = resume_latest(self.ckpt_root, self.model, self.optimizer, self.scheduler, self.job.run.on_bad_checkpoint)
        if state is not None:
            log.info("resumed RL from %s (step %d)", state.pop("path"), state["step"])
            self.step = state.pop("step")
            self.state.update(state)

    # ------------------------------------------------------------ the loop (engine/fit_loop.py)
    def bar_name(self) -> str:
        return f"rl:{self.cfg.algorithm}"

    def start(self, metrics) -> None:
        self.sync_rollout()
        if self.step == 0 and self.cfg.eval_every and self.eval_prompts:
            metrics.log(0, self._record_eval())  # the starting point of the branch's curve

    def finished(self) -> bool:
        return self.step >= self.cfg.steps or self._budget_spent()

    def step_record(self) -> dict[str, object]:
        """One step; its metrics on `log_every` steps, evaluations and the last; evaluated on `eval_every`."""
        cfg = self.cfg
        record = self.train_step()
        last = self.finished()
        if self.eval_prompts and cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
            record.update(self._record_eval())
        return record if self.step % self.job.run.log_every == 0 or last or "eval/pass@1" in record else {}

    def _budget_spent(self) -> bool:
        return self.cfg.max_exaflops is not None and self.state["exaflops"] >= self.cfg.max_exaflops

    def finish(self) -> dict[str, object]:
        summary = {"steps": self.step, "exaflops": self.state["exaflops"], "eval_history": self.state["eval_history"],
                   "stopped": self.state.get("stopped"), "checkpoint": str(latest_checkpoint(self.ckpt_root)),
                   "rollout_backend": self.rollout.backend, "reward": self.reward.describe(),
                   "eval_prompts": len(self.eval_prompts)}
        if self.cfg.export_hf:  # collective: every rank gathers its shards
            summary["hf_dir"] = str(export_model(self.model, self.run_dir / "hf", self.tokenizer, self.job.model.path))
        if self.info.is_main:
            write_json_atomic(self.run_dir / "rl_summary.json", summary)
        return summary


def run_rl(job: RLJobConfig, stop_after_step: int | None = None) -> dict[str, object]:
    trainer = RLTrainer(job)
    try:
        return trainer.fit(stop_after_step)
    finally:
        trainer.rollout.close()  # a vLLM engine is shut down here, not at interpreter exit
