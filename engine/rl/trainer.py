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
     trajectories of the same prompt (reward 1, off-policy).
  3. Weights. engine/rl/algorithms.py turns rewards into advantages and per-token weights, so every
     algorithm is one call of `engine.losses.linear_policy_loss` on packed micro-batches.
  4. Update. `mini_batches` optimizer updates per rollout batch. With one (the paper's setting),
     old_logp = logp.detach() and no extra forward runs; otherwise old log-probs are recomputed once.
     After the update the full weights are copied into the rollout model (weight sync).
Compute is logged by the paper's Appendix C from the real token counts (generation, update, expert).
Every `eval_every` steps, pass@1 (temperature 0.7, `eval_samples` samples per prompt) on held-out prompts
is logged and appended to `<run>/eval_curve.json`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from engine import flops as flops_lib
from engine.checkpoint import (
    full_hf_state_dict,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    resume_latest,
    save_checkpoint,
)
from engine.config import DataConfig, ModelConfig, RunConfig
from engine.data.packing import collate_packed, pack_for_ranks
from engine.data.sft_dataset import encode_prompts, encode_texts, load_prompt_rows
from engine.data.synthetic import write_task
from engine.data.tokenizer import end_of_turn_id, load_tokenizer
from engine.distributed import all_reduce_sum, barrier, compute_dtype, init_distributed
from engine.errors import CeilingError
from engine.losses import linear_policy_loss
from engine.metrics import MetricsLogger, make_run_dir, progress
from engine.models import PackedCausalLM, build_model
from engine.reward import score_responses
from engine.rl.algorithms import (
    ALGORITHMS,
    RLBatch,
    SeqWeights,
    WeightParams,
    aggregate,
    entropy_from_logprobs,
    fold_kl,
    kl_estimate,
    sequence_weights,
    to_tokens,
)
from engine.rl.sampling import Group, dynamic_sampling
from engine.rollout import SamplingParams
from engine.rollout.hf import HFRollout
from engine.training import DataOrder, build_optimizer, build_policy, guarded_step

log = logging.getLogger("ceiling")
FLOPS_FAMILY = {"grpo": "grpo", "dapo_d": "dapo", "dapo_dc": "dapo", "luffy": "luffy", "srft": "srft", "upt": "upt"}


@dataclass
class RLConfig:
    """The RL algorithm, rollout, optimisation and evaluation (the paper's Section 3 / Appendix B)."""

    algorithm: Literal["grpo", "dapo_d", "dapo_dc", "luffy", "srft", "upt"] = "dapo_dc"
    init_checkpoint: str | None = None
    """A checkpoint dir (e.g. an SFT run's checkpoints/step_N) whose model weights start RL."""
    prompts_path: str | None = None
    """RL prompts {prompt, answer, response?}; default: the synthetic task's rl split."""
    eval_path: str | None = None
    """Held-out prompts {prompt, answer}; default: the synthetic task's eval split."""
    steps: int = 100
    """Rollout batches (each gives `mini_batches` optimizer updates)."""
    train_batch: int = 64
    """Groups (prompts) per update batch."""
    gen_batch: int = 64
    """Prompts per generation round."""
    n_samples: int = 8
    """On-policy samples per prompt (G)."""
    n_expert: int = 1
    """Expert trajectories per prompt for LUFFY/SRFT/UPT (the paper: 7 + 1)."""
    max_gen_rounds: int = 3
    """DAPO dynamic sampling: most generation rounds per step."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_len: int = 1024
    max_new_tokens: int = 8192
    micro_batch_tokens: int = 16384
    """Token budget of one packed micro-batch per rank."""
    mini_batches: int = 1
    """Optimizer updates per rollout batch; 1 skips the old-logprob forward."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    lr: float = 1e-6
    min_lr_ratio: float = 1.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    eps_low: float | None = None
    """Clip range override; default: the algorithm's (0.2, DAPO_dc 0.2/0.28)."""
    eps_high: float | None = None
    luffy_gamma: float = 0.1
    upt_gamma: float = 0.0
    """UPT: a prompt uses SFT on its expert trajectory when its mean reward <= upt_gamma."""
    adv_eps: float = 1e-6
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    """KL to the initial policy (0 in the paper)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    reward_workers: int = 0
    """Processes scoring answers with math-verify (0: in-process)."""
    reward_timeout_s: float = 5.0
    rollout_batch_size: int = 64
    """Sequences per `generate` call of the transformers backend."""
    eval_every: int = 10
    """pass@1 on the eval prompts every N steps (and before the first and after the last); 0 disables."""
    eval_samples: int = 1
    """Samples per eval prompt (avg@k)."""
    eval_temperature: float = 0.7
    eval_max_prompts: int | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2

    def __post_init__(self):
        for name in ("steps", "train_batch", "gen_batch", "n_samples", "max_gen_rounds", "max_prompt_len",
                     "max_new_tokens", "micro_batch_tokens", "mini_batches", "rollout_batch_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_expert < 0 or self.reward_workers < 0 or self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("rl.n_expert, reward_workers, eval_every and checkpoint_every must be >= 0")
        if self.mini_batches > self.train_batch:
            raise ValueError("rl.mini_batches cannot exceed rl.train_batch")
        if self.micro_batch_tokens < self.max_prompt_len + self.max_new_tokens + 1:
            raise ValueError(f"rl.micro_batch_tokens ({self.micro_batch_tokens}) must hold the longest sequence "
                             f"(max_prompt_len + max_new_tokens + 1 = {self.max_prompt_len + self.max_new_tokens + 1})")
        if self.algorithm in ("luffy", "srft", "upt") and self.n_expert < 1:
            raise ValueError(f"rl.algorithm={self.algorithm} needs rl.n_expert >= 1")


@dataclass
class RLJobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(config="configs/models/tiny-qwen2.json",
                                                                   tokenizer="char"))
    data: DataConfig = field(default_factory=DataConfig)
    rl: RLConfig = field(default_factory=RLConfig)


@dataclass
class Prompt:
    id: str
    ids: list[int]
    answer: str
    expert_ids: list[int] | None  # expert trajectory + end-of-turn token


@dataclass
class Seq:
    """One training sequence: prompt + response tokens, loss on the response."""

    ids: list[int]
    loss_mask: list[int]
    reward: float
    group: int
    is_expert: bool
    logprobs: list[float] | None = None  # rollout log-probs of the response tokens (on-policy only)
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    @property
    def n_response(self) -> int:
        return sum(self.loss_mask)


class RLTrainer:
    def __init__(self, job: RLJobConfig):
        self.job, self.cfg = job, job.rl
        self.spec = ALGORITHMS[self.cfg.algorithm]
        lo, hi = self.cfg.eps_low, self.cfg.eps_high  # clip range: the config's override, else the algorithm's
        self._eps = (self.spec.eps_low if lo is None else lo, self.spec.eps_high if hi is None else hi)
        self.info = init_distributed(job.run.device)
        self.run_dir = make_run_dir(job.run.output_dir, job.run.name, job if self.info.is_main else None)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.tokenizer = load_tokenizer(job.model.tokenizer)
        self.prompts, self.eval_prompts = self._load_prompts()
        self.model, self.model_config = build_policy(job.model, job.run.seed, self.info)
        if self.cfg.init_checkpoint:
            init = Path(self.cfg.init_checkpoint)
            if (init / "latest").is_file():  # a checkpoints/ root: take its newest checkpoint
                init = latest_checkpoint(init)
            load_checkpoint(init, self.model)
            log.info("policy initialised from %s", init)
        total_updates = self.cfg.steps * self.cfg.mini_batches
        self.optimizer, self.scheduler = build_optimizer(self.model, self.cfg, total_updates)
        # The rollout runs on its own copy of the weights, as a vLLM engine would; synced after each update.
        dtype = compute_dtype(self.info.device, job.model.dtype)
        rollout_model = build_model(path=job.model.path, config=job.model.config, dtype=dtype, seed=job.run.seed)
        self.rollout = HFRollout(rollout_model.to(self.info.device), self.tokenizer, self.info.device,
                                 batch_size=self.cfg.rollout_batch_size)
        self.reference = None
        if self.cfg.kl_coef > 0:  # the frozen initial policy, for the KL term
            reference = build_model(path=job.model.path, config=job.model.config, dtype=dtype, seed=job.run.seed)
            if self.cfg.init_checkpoint:  # the reference is the policy RL starts from
                reference.load_state_dict(full_hf_state_dict(self.model))
            self.reference = PackedCausalLM(reference.to(self.info.device)).eval().requires_grad_(False)
        self.order = DataOrder(len(self.prompts), job.run.seed)
        self.step = 0
        self.state = {"cursor": 0, "exaflops": 0.0, "eval_history": []}
        self.peak = flops_lib.peak_flops(self.info.device, job.run.peak_tflops)

    # ------------------------------------------------------------ data
    def _load_prompts(self) -> tuple[list[Prompt], list[Prompt]]:
        cfg, data = self.cfg, self.job.data
        prompts_path, eval_path = cfg.prompts_path, cfg.eval_path
        if data.synthetic is not None:
            out = self.run_dir / "data"
            if self.info.is_main and not (out / "task_config.json").is_file():
                write_task(data.synthetic, out)
            barrier()
            prompts_path = prompts_path or str(out / "rl.jsonl")
            eval_path = eval_path or str(out / "eval.jsonl")
        if prompts_path is None:
            raise CeilingError("rl.prompts_path is required unless data.synthetic is set")
        train = self._encode(prompts_path, need_expert=self.spec.uses_expert)
        evals = self._encode(eval_path, need_expert=False) if eval_path else []
        if cfg.eval_max_prompts is not None:
            evals = evals[: cfg.eval_max_prompts]
        return train, evals

    def _encode(self, path: str, need_expert: bool) -> list[Prompt]:
        rows = load_prompt_rows(path)
        ids = encode_prompts([r.messages for r in rows], self.tokenizer)
        eot = end_of_turn_id(self.tokenizer)
        experts = encode_texts([r.response or "" for r in rows], self.tokenizer)
        out, too_long = [], 0
        for row, p, e in zip(rows, ids, experts):
            if need_expert and not row.response:
                raise CeilingError(f"{path}: row {row.id!r} has no 'response' (expert trajectory), which "
                                   f"rl.algorithm={self.cfg.algorithm} needs")
            if len(p) > self.cfg.max_prompt_len:
                too_long += 1
                continue
            expert = (list(e) + [eot])[: self.cfg.max_new_tokens] if row.response else None
            out.append(Prompt(row.id, list(p), row.answer, expert))
        if too_long:
            log.warning("%s: %d of %d prompts are longer than rl.max_prompt_len=%d and were skipped",
                        path, too_long, len(rows), self.cfg.max_prompt_len)
        if not out:
            raise CeilingError(f"{path}: no usable prompts")
        return out

    # ------------------------------------------------------------ rollout
    def _generate(self, prompts: list[Prompt], params: SamplingParams) -> tuple[list[list], list[list[float]], object]:
        """Each rank samples its slice of `prompts`; returns (outputs, rewards) for all prompts, in order."""
        rank, world = self.info.rank, self.info.world_size
        mine = prompts[rank::world]
        t0 = time.perf_counter()
        outputs = self.rollout.generate([p.ids for p in mine], params) if mine else []
        t1 = time.perf_counter()
        texts = [o.text for outs in outputs for o in outs]
        answers = [p.answer for p, outs in zip(mine, outputs) for _ in outs]
        scores, stats = score_responses(texts, answers, num_workers=self.cfg.reward_workers,
                                        timeout_s=self.cfg.reward_timeout_s)
        self._timing["rollout"] += t1 - t0
        self._timing["reward"] += time.perf_counter() - t1
        lite = [[(o.response_ids(), o.response_logprobs(), o.finish_reason) for o in outs] for outs in outputs]
        rewards, k = [], 0
        for outs in outputs:
            rewards.append(scores[k:k + len(outs)])
            k += len(outs)
        local = (lite, rewards, stats)
        if world == 1:
            return lite, rewards, stats
        gathered = [None] * world
        dist.all_gather_object(gathered, local)
        all_out, all_rew = [None] * len(prompts), [None] * len(prompts)
        total = None
        for r, (lo, rw, st) in enumerate(gathered):
            for j, (o, w) in enumerate(zip(lo, rw)):
                all_out[r + j * world], all_rew[r + j * world] = o, w
            total = st if total is None else total + st
        return all_out, all_rew, total

    def _round(self, k: int) -> list[Group]:
        idx = self.order.take(self.state["cursor"], self.cfg.gen_batch)
        self.state["cursor"] += self.cfg.gen_batch
        prompts = [self.prompts[i] for i in idx]
        seed = self.job.run.seed * 1_000_003 + self.step * 1_009 + k * 10 + self.info.rank
        params = SamplingParams(self.cfg.temperature, self.cfg.top_p, self.cfg.max_new_tokens, self.cfg.n_samples, seed)
        outputs, rewards, stats = self._generate(prompts, params)
        self._round_stats.append(stats)
        self._gen_tokens += sum(len(p.ids) + len(o[0]) for p, outs in zip(prompts, outputs) for o in outs)
        return [Group(rw, payload=(p, outs)) for p, outs, rw in zip(prompts, outputs, rewards)]

    def _sequences(self, groups: list[Group]) -> list[Seq]:
        seqs = []
        for g, group in enumerate(groups):
            prompt, outs = group.payload
            for (resp, lps, _), reward in zip(outs, group.rewards):
                seqs.append(Seq(prompt.ids + resp, [0] * len(prompt.ids) + [1] * len(resp), reward, g, False, lps))
            if self.spec.uses_expert:
                for _ in range(self.cfg.n_expert):
                    e = prompt.expert_ids
                    seqs.append(Seq(prompt.ids + e, [0] * len(prompt.ids) + [1] * len(e), 1.0, g, True))
        return [s for s in seqs if s.n_response > 0 or s.is_expert]

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
                              loss_mask=mask)
            out = model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, loss_fn)
            bounds = batch.cu_seqlens.tolist()
            for j, i in enumerate(local):
                setattr(seqs[i], attr, out.logp[bounds[j]:bounds[j + 1]].clone())

    def _update(self, seqs: list[Seq], seq_w: SeqWeights) -> dict[str, float]:
        cfg, world = self.cfg, self.info.world_size
        trained = seq_w.trained_S.tolist()
        if cfg.aggregation == "token-mean":
            normalizer = sum(s.n_response for s, t in zip(seqs, trained) if t)
        else:
            normalizer = sum(1 for s, t in zip(seqs, trained) if t and s.n_response)
        dev = self.info.device
        sums = {k: torch.zeros((), device=dev) for k in ("loss", "entropy", "tokens", "clip_low", "clip_high",
                                                          "pg_tokens", "kl")}
        micro_losses = []
        self.model.train()
        mbs = list(self._micro_batches(seqs))
        for n, (local, batch) in enumerate(mbs):
            self.model.set_requires_gradient_sync(n == len(mbs) - 1)
            batch = batch.to(dev)
            response_T = batch.labels != -100
            sub = SeqWeights(*(t[local] if local else t[:0] for t in (
                seq_w.advantages_S, seq_w.sft_weight_S, seq_w.pg_weight_S, seq_w.off_policy_S, seq_w.trained_S)))
            if not local:
                response_T = torch.zeros_like(response_T)
                sub = SeqWeights(*(torch.zeros(1, dtype=t.dtype) for t in (
                    seq_w.advantages_S, seq_w.sft_weight_S, seq_w.pg_weight_S, seq_w.off_policy_S, seq_w.trained_S)))
            weights = to_tokens(sub, batch.cu_seqlens, response_T)
            weights, norm = aggregate(weights, batch.cu_seqlens, cfg.aggregation, normalizer=max(normalizer, 1))
            old = torch.cat([seqs[i].old_logp for i in local]).to(dev) if local and seqs[local[0]].old_logp is not None \
                else None
            if self.reference is not None and local:
                ref = torch.cat([seqs[i].ref_logp for i in local]).to(dev)
                weights = fold_kl(weights, old, ref, cfg.kl_coef, cfg.kl_estimator)
                on = weights.loss_mask_T != 0
                sums["kl"] += (kl_estimate(old, ref, cfg.kl_estimator) * on).sum()
            loss_fn = partial(linear_policy_loss, targets=batch.labels.clamp(min=0), old_logp=old if cfg.mini_batches > 1
                              else None, eps_low=self._eps[0], eps_high=self._eps[1], luffy_gamma=cfg.luffy_gamma,
                              entropy_coef=cfg.entropy_coef, normalizer=norm, **weights.loss_kwargs())
            out = self.model(batch.input_ids, batch.position_ids, batch.cu_seqlens, batch.max_seqlen, loss_fn)
            (out.loss * world).backward()
            on_T = weights.loss_mask_T != 0
            pg_T = on_T & (weights.pg_weight_T != 0) & ~weights.off_policy_T
            sums["loss"] += out.loss.detach()
            sums["entropy"] += (out.entropy * on_T).sum()
            sums["tokens"] += on_T.sum()
            sums["clip_low"] += out.clip_frac_low * pg_T.sum()
            sums["clip_high"] += out.clip_frac_high * pg_T.sum()
            sums["pg_tokens"] += pg_T.sum()
            micro_losses.append(([int(i) for i in local], out.loss.detach()))
        loss = sums.pop("loss")
        grad_norm, lr = guarded_step(self.model, self.optimizer, self.scheduler, cfg.grad_clip, loss, micro_losses,
                                     self.step + 1, self.ckpt_root, self.info.rank)
        for v in sums.values():
            all_reduce_sum(v)
        tokens, pg = sums["tokens"].clamp(min=1), sums["pg_tokens"].clamp(min=1)
        out = {"train/loss": loss / world, "train/grad_norm": grad_norm, "train/lr": lr,
               "train/entropy": sums["entropy"] / tokens, "train/clip_frac_low": sums["clip_low"] / pg,
               "train/clip_frac_high": sums["clip_high"] / pg}
        if self.reference is not None:
            out["train/kl"] = sums["kl"] / tokens
        return out

    def sync_rollout(self) -> None:
        state = full_hf_state_dict(self.model)  # collective: every rank gathers the full weights
        dtype = next(self.rollout.model.parameters()).dtype
        self.rollout.sync_weights({k: v.to(dtype) for k, v in state.items()})

    # ------------------------------------------------------------ one step
    def train_step(self) -> dict[str, object]:
        cfg = self.cfg
        self._timing, self._round_stats, self._gen_tokens = {"rollout": 0.0, "reward": 0.0}, [], 0
        t0 = time.perf_counter()
        result = dynamic_sampling(self._round, cfg.train_batch, cfg.max_gen_rounds,
                                  filter_groups=self.spec.dynamic_sampling)
        t1 = time.perf_counter()
        seqs = self._sequences(result.groups)
        if not seqs:  # every group had equal rewards in every round: nothing to learn from this batch
            log.warning("step %d: no informative group in %d rounds; update skipped (raise rl.max_gen_rounds "
                        "or rl.gen_batch if this persists)", self.step + 1, result.num_rounds)
        on_policy = [s for s in seqs if not s.is_expert]
        lps = [lp for s in on_policy if s.logprobs for lp in s.logprobs if lp == lp]  # drop NaN (no stop logprob)
        mean_entropy = entropy_from_logprobs(torch.tensor(lps)) if lps else 0.0
        batch = RLBatch(torch.tensor([s.reward for s in seqs], dtype=torch.float32),
                        torch.tensor([s.group for s in seqs], dtype=torch.long),
                        torch.tensor([s.is_expert for s in seqs], dtype=torch.bool))
        params = WeightParams(upt_gamma=cfg.upt_gamma, mean_entropy=mean_entropy, adv_eps=cfg.adv_eps)
        if cfg.mini_batches > 1 or self.reference is not None:
            self._logprobs(seqs, self.model, "old_logp")
        if self.reference is not None:
            self._logprobs(seqs, self.reference, "ref_logp")
        metrics: dict[str, object] = {"rollout/skipped": int(not seqs)}
        groups = sorted({s.group for s in seqs})
        for chunk in range(cfg.mini_batches if seqs else 0):  # whole groups per mini-batch: advantages are per group
            keep = set(groups[chunk::cfg.mini_batches])
            part = [s for s in seqs if s.group in keep]
            idx = [i for i, s in enumerate(seqs) if s.group in keep]
            sub = RLBatch(batch.rewards_S[idx], batch.group_ids_S[idx], batch.is_expert_S[idx])
            metrics.update(self._update(part, sequence_weights(self.spec, sub, params)))
        t2 = time.perf_counter()
        if seqs:
            self.sync_rollout()
        self.step += 1
        # Compute by Appendix C from the real lengths: generation (all rounds), update, expert tokens.
        update_tokens = sum(len(s.ids) for s in on_policy)
        expert_tokens = sum(len(s.ids) for s in seqs if s.is_expert)
        step_flops = flops_lib.rl_step_flops(
            FLOPS_FAMILY[cfg.algorithm], self.model_config, mean_seq_len=self._gen_tokens / max(result.num_generated
                                                                                               * cfg.n_samples, 1),
            gen_tokens=self._gen_tokens, update_tokens=update_tokens, offpolicy_tokens=expert_tokens)
        self.state["exaflops"] += step_flops / 1e18
        stats = self._round_stats[0]
        for s in self._round_stats[1:]:
            stats = stats + s
        all_rewards = [r for g in result.groups for r in g.rewards]
        resp_lens = [s.n_response for s in on_policy]
        metrics.update({
            "rollout/reward_mean": stats.accuracy,
            "rollout/kept_reward_mean": sum(all_rewards) / max(len(all_rewards), 1),
            "rollout/pass_rate": sum(max(g.rewards) > 0 for g in result.groups) / max(len(result.groups), 1),
            "rollout/kept_group_frac": result.kept_fraction,
            "rollout/num_rounds": result.num_rounds,
            "rollout/groups": len(result.groups),
            "rollout/unparsed": stats.num_unparsed,
            "rollout/response_len_mean": sum(resp_lens) / max(len(resp_lens), 1),
            "rollout/response_len_max": max(resp_lens, default=0),
            "rollout/entropy": mean_entropy,
            "time/rollout_s": self._timing["rollout"], "time/reward_s": self._timing["reward"],
            "time/update_s": t2 - t1, "time/step_s": time.perf_counter() - t0,
            "perf/tokens_per_s": (self._gen_tokens + update_tokens + expert_tokens) / (time.perf_counter() - t0),
            "compute/step_flops": step_flops, "compute/exaflops": self.state["exaflops"],
        })
        return metrics

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> float:
        """pass@1 (mean over `eval_samples` samples per prompt) on the eval prompts."""
        cfg = self.cfg
        params = SamplingParams(cfg.eval_temperature, 1.0, cfg.max_new_tokens, cfg.eval_samples,
                                seed=self.job.run.seed + 7)
        self._timing = {"rollout": 0.0, "reward": 0.0}
        _, rewards, _ = self._generate(self.eval_prompts, params)
        flat = [r for rs in rewards for r in rs]
        return sum(flat) / max(len(flat), 1)

    def _record_eval(self) -> dict[str, object]:
        pass1 = self.evaluate()
        self.state["eval_history"].append({"step": self.step, "rl_exaflops": self.state["exaflops"], "pass@1": pass1})
        if self.info.is_main:
            (self.run_dir / "eval_curve.json").write_text(json.dumps(self.state["eval_history"], indent=1))
        return {"eval/pass@1": pass1, "compute/exaflops": self.state["exaflops"]}

    # ------------------------------------------------------------ the loop
    def save(self) -> Path:
        path = save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, self.scheduler, self.state)
        prune_checkpoints(self.ckpt_root, self.cfg.keep_checkpoints, set())
        return path

    def maybe_resume(self) -> None:
        state = resume_latest(self.ckpt_root, self.model, self.optimizer, self.scheduler)
        if state is not None:
            log.info("resumed RL from %s (step %d)", state.pop("path"), state["step"])
            self.step = state.pop("step")
            self.state.update(state)

    def fit(self, stop_after_step: int | None = None, stop_when=None) -> dict[str, object]:
        """Train to `rl.steps` (resuming if a checkpoint exists). `stop_after_step` simulates a crash.

        `stop_when(eval_history) -> str | None` is asked after each evaluation; a reason ends the branch
        there (checkpointed), e.g. `ceiling_stop_rule` once the predicted ceiling has settled.
        """
        cfg, info = self.cfg, self.info
        self.maybe_resume()
        if self.state.get("stopped"):  # an earlier run already ended this branch early
            return self._summary()
        self.sync_rollout()
        metrics = MetricsLogger(self.run_dir, tensorboard=self.job.run.tensorboard, enabled=info.is_main)
        bar = progress(cfg.steps, f"rl:{cfg.algorithm}", initial=self.step, enabled=info.is_main and self.job.run.progress)
        try:
            if self.step == 0 and cfg.eval_every and self.eval_prompts:
                metrics.log(0, self._record_eval())
            while self.step < cfg.steps:
                record = self.train_step()
                last = self.step == cfg.steps
                if self.eval_prompts and cfg.eval_every and (self.step % cfg.eval_every == 0 or last):
                    record.update(self._record_eval())
                if self.step % self.job.run.log_every == 0 or last or "eval/pass@1" in record:
                    logged = metrics.log(self.step, record)
                    bar.set_postfix({k.split("/")[1]: f"{v:.3g}" for k, v in logged.items()
                                     if k in ("rollout/reward_mean", "eval/pass@1") and v is not None})
                bar.update(1)
                reason = stop_when(self.state["eval_history"]) if stop_when and "eval/pass@1" in record else None
                if reason:
                    self.state["stopped"] = {"step": self.step, "reason": reason}
                    log.info("RL stops at step %d: %s", self.step, reason)
                if last or reason or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0):
                    self.save()
                if reason:
                    break
                if stop_after_step is not None and self.step >= stop_after_step:
                    return {"stopped_at": self.step}
        finally:
            bar.close()
            metrics.close()
        return self._summary()

    def _summary(self) -> dict[str, object]:
        summary = {"steps": self.step, "exaflops": self.state["exaflops"], "eval_history": self.state["eval_history"],
                   "stopped": self.state.get("stopped"), "checkpoint": str(latest_checkpoint(self.ckpt_root))}
        if self.info.is_main:
            (self.run_dir / "rl_summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def ceiling_stop_rule(tol: float = 0.5, patience: int = 3, min_points: int = 6):
    """A `stop_when` for RLTrainer.fit: refit the ceiling after each evaluation (engine/analysis/early_stop)
    and stop once the predicted A_post has moved less than `tol` points over the last `patience` refits.

    The gain is measured against the branch's first evaluation (its starting performance, P_sft); compute
    is the branch's RL compute. Returns a reason string when the branch should stop, else None.
    """
    from engine.analysis.early_stop import EarlyStopConfig, OnlineCeilingMonitor

    monitor: OnlineCeilingMonitor | None = None
    seen = 0

    def rule(history: list[dict]) -> str | None:
        nonlocal monitor, seen
        if monitor is None:
            if not history:
                return None
            monitor = OnlineCeilingMonitor(100 * history[0]["pass@1"], EarlyStopConfig(tol, patience, min_points))
            seen = 1
        for h in history[seen:]:
            monitor.update(h["rl_exaflops"], 100 * h["pass@1"] - monitor.p_sft)
        seen = len(history)
        if monitor.should_stop:
            return (f"ceiling settled: predicted A_post {monitor.stop_prediction:.2f} moved less than {tol} points "
                    f"over the last {patience} refits")
        return None

    return rule


def run_rl(job: RLJobConfig, stop_after_step: int | None = None) -> dict[str, object]:
    return RLTrainer(job).fit(stop_after_step)
