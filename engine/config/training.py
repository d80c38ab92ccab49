"""The training sections: `sft:` (optimisation, batching, validation, checkpoints of SFT) and `rl:` (the RL
algorithm, its rollouts, optimisation and evaluation: the paper's Section 3 / Appendix B).

Every field's docstring is its documentation; `__post_init__` rejects bad values with the field's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class SFTConfig:
    """Optimisation, batching, validation and checkpointing of SFT."""

    steps: int = 100
    """Optimizer steps (with `until`: the cap; the LR schedule always spans `steps`)."""
    until: Literal["steps", "mild", "severe"] = "steps"
    """Stop before `steps` once the validation loss has reached this sub-phase (engine/analysis/phases.py) for
    `until_patience` validations in a row: 'severe' trains through Stable and Mild into over-fitting, so a
    sweep has a checkpoint of every sub-phase to branch from. 'steps': run all `steps`."""
    until_patience: int = 2
    """Validations in a row at or past the `until` sub-phase (a single spike of the loss is not over-fitting)."""
    global_batch_size: int = 512
    """Sequences per optimizer step, summed over all ranks (the paper uses 512)."""
    micro_batch_tokens: int = 16384
    """Token budget of one packed micro-batch (per rank)."""
    lr: float = 1e-5
    """Peak learning rate."""
    min_lr_ratio: float = 0.0
    """Cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables clipping; the norm is still logged)."""
    val_every: int = 50
    """Validation loss every N steps (and at the last step); 0 disables."""
    checkpoint_every: int = 100
    """Checkpoint every N steps (and at the last step); 0 keeps only the final one."""
    keep_checkpoints: int = 3
    """Newest checkpoints kept on disk (the min-val-loss checkpoint is always kept)."""
    save_best: bool = True
    """Checkpoint every new minimum of the validation loss."""
    subphase_d1: float = 0.02
    """Stable sub-phase: L <= (1 + d1) L_min."""
    subphase_d2: float = 0.10
    """Severe sub-phase: L >= (1 + d2) L_min."""
    subphase_window: int = 1
    """Sub-phases are judged on the mean of this many neighbouring validations (centered for a finished run,
    trailing online: `until` and the log). Use 3 when the loss jitters between validations by more than d2."""
    export_hf: bool = True
    """Write the final model as an HF directory `<run>/hf/`."""
    token_store_dir: str | None = None
    """Where tokenized data is stored once and reused by every rank and run (engine/data/token_store.py);
    default `<run.output_dir>/token_store`."""

    def __post_init__(self):
        for name in ("steps", "global_batch_size", "micro_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"sft.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.lr < 1.0:
            raise ValueError(f"sft.lr must be in (0, 1), got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"sft.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("warmup_steps", "val_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"sft.{name} must be >= 0, got {getattr(self, name)}")
        if self.until != "steps" and not self.val_every:
            raise ValueError(f"sft.until={self.until!r} needs validations: set sft.val_every > 0")
        if self.subphase_window < 1:
            raise ValueError(f"sft.subphase_window must be >= 1, got {self.subphase_window}")
        if self.until_patience < 1:
            raise ValueError(f"sft.until_patience must be >= 1, got {self.until_patience}")
        if not 0 < self.subphase_d1 < self.subphase_d2:
            raise ValueError("sft: need 0 < subphase_d1 < subphase_d2")


@dataclass
class RLConfig:
    """The RL algorithm, rollout, optimisation and evaluation (the paper's Section 3 / Appendix B)."""

    algorithm: Literal["grpo", "dapo_d", "dapo_dc", "luffy", "srft", "upt"] = "dapo_dc"
    init_checkpoint: str | None = None
    """A checkpoint dir (e.g. an SFT run's checkpoints/step_N) whose model weights start RL."""
    prompts_path: str | list[str] | None = None
    """RL prompts with reference answers (and the expert trajectory for LUFFY/SRFT/UPT), in any layout
    engine/data/layouts.py reads (verl's openr1.parquet as it is); default: the synthetic task's rl split."""
    eval_path: str | list[str] | None = None
    """Held-out prompts with answers (e.g. a MATH-500-layout file); default: the synthetic task's eval split."""
    steps: int = 100
    """Rollout batches (each gives `mini_batches` optimizer updates)."""
    max_exaflops: float | None = None
    """End the run once its cumulative RL compute (Appendix C) reaches this many EFLOPs, evaluated and
    checkpointed; `steps` stays the upper bound. The sweep gives its matched-compute baselines this budget."""
    train_batch: int = 64
    """Groups (prompts) per update batch."""
    gen_batch: int = 64
    """Prompts per generation round."""
    n_samples: int = 8
    """On-policy samples per prompt (G)."""
    n_expert: int = 1
    """Expert trajectories per prompt for LUFFY/SRFT/UPT (LUFFY/SRFT: 7 + 1; UPT: 8 on-policy, and 1 expert only
    for prompts its gate sends to SFT)."""
    max_gen_rounds: int = 10
    """DAPO dynamic sampling: most generation rounds per step (RETU: max_num_gen_batches=10)."""
    on_unfilled: Literal["error", "train-short"] = "train-short"
    """DAPO: when `max_gen_rounds` rounds keep fewer than `train_batch` groups: "error" stops (RETU's choice,
    set in the 7B presets), "train-short" warns and updates on the short batch (the default, so that small and
    CPU runs do not stop)."""
    temperature: float = 1.0
    """Sampling temperature of the training rollouts; the loss divides the logits by it too (RETU, map §8)."""
    top_p: float = 1.0
    max_prompt_len: int = 1024
    max_new_tokens: int = 8192
    micro_batch_tokens: int = 16384
    """Token budget of one packed micro-batch per rank."""
    mini_batches: int = 1
    """Optimizer updates per rollout batch; 1 skips the old-logprob forward."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm"] = "token-mean"
    """How the RL loss terms are normalised (engine/rl/algorithms.py): the paper's text says token-mean; RETU's
    DAPO launcher is in effect seq-mean-token-mean (one sequence per micro-batch); the UPT-repo's LUFFY/SRFT/UPT
    runs are token-sum-norm (sum / 8192 per GPU, averaged over 8 GPUs: norm_tokens 65536). Map §2."""
    norm_tokens: float | None = None
    """token-sum-norm: the constant divisor of the summed RL loss of a mini-batch (over all ranks)."""
    sft_norm: Literal["expert-token-mean", "shared"] = "expert-token-mean"
    """SFT terms on expert trajectories (SRFT's w1, UPT's gate): a token mean over the expert tokens of the
    mini-batch (the UPT-repo's compute_sft_pure_loss), or "shared": under the RL normaliser."""
    lr: float = 1e-6
    min_lr_ratio: float = 1.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0
    eps_low: float | None = None
    """Clip range override; default: the algorithm's (0.2; DAPO_dc 0.2/0.28; LUFFY/SRFT/UPT no clip: 1 / .inf,
    the UPT-repo's loss_remove_clip)."""
    eps_high: float | None = None
    clip_ratio_c: float | None = None
    """Dual-clip bound for negative advantages (verl); default: the algorithm's (DAPO_dc 10, RETU's launcher;
    others none). .inf disables it."""
    adv_std: bool | None = None
    """Divide group-centred rewards by the group std; default: the algorithm's (GRPO/DAPO yes; LUFFY/SRFT/UPT
    no, the UPT-repo's grpo_use_std=False)."""
    luffy_gamma: float = 0.1
    upt_gamma: float = 0.0
    """UPT: a prompt uses SFT on its expert trajectory when its mean reward <= upt_gamma."""
    adv_eps: float = 1e-6
    entropy_coef: float = 0.0
    """Entropy bonus (0.001 in the UPT-repo's LUFFY/SRFT/UPT scripts, 0 in RETU's DAPO)."""
    kl_coef: float = 0.0
    """KL to the initial policy (0 in the paper)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
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
    export_hf: bool = True
    """Write the final policy as an HF directory `<run>/hf/` (safetensors, config, tokenizer and chat template)."""
    dump_generations: int = 0
    """Write every Nth step's rollouts, and every evaluation's samples, to `<run>/generations/*.jsonl` (prompt,
    response, reference answer, reward and its reason, finish reason, weight version, data source); 0: off."""
    dump_max_rows: int = 512
    """At most this many rows per generations file (the first ones: the file of a step or an evaluation)."""

    def __post_init__(self):
        for name in ("steps", "train_batch", "gen_batch", "n_samples", "max_gen_rounds", "max_prompt_len",
                     "max_new_tokens", "micro_batch_tokens", "mini_batches", "rollout_batch_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"rl.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.n_expert, self.eval_every, self.checkpoint_every, self.dump_generations) < 0:
            raise ValueError("rl.n_expert, eval_every, checkpoint_every and dump_generations must be >= 0")
        if self.dump_max_rows < 1:
            raise ValueError(f"rl.dump_max_rows must be >= 1, got {self.dump_max_rows}")
        if self.mini_batches > self.train_batch:
            raise ValueError("rl.mini_batches cannot exceed rl.train_batch")
        if self.micro_batch_tokens < self.max_prompt_len + self.max_new_tokens + 1:
            raise ValueError(f"rl.micro_batch_tokens ({self.micro_batch_tokens}) must hold the longest sequence "
                             f"(max_prompt_len + max_new_tokens + 1 = {self.max_prompt_len + self.max_new_tokens + 1})")
        if self.algorithm in ("luffy", "srft", "upt") and self.n_expert < 1:
            raise ValueError(f"rl.algorithm={self.algorithm} needs rl.n_expert >= 1")
        if not self.temperature > 0:
            raise ValueError(f"rl.temperature must be > 0 (the loss divides the logits by it), got {self.temperature}")
        if self.aggregation == "token-sum-norm" and not (self.norm_tokens or 0) > 0:
            raise ValueError("rl.aggregation=token-sum-norm needs rl.norm_tokens > 0")
        if self.max_exaflops is not None and not self.max_exaflops > 0:
            raise ValueError(f"rl.max_exaflops must be > 0 (or null), got {self.max_exaflops}")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ValueError(f"rl.clip_ratio_c must be > 1 (.inf: off), got {self.clip_ratio_c}")
