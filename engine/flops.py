"""The compute ledger: training FLOPs by the paper's Appendix C, and MFU.

Forward FLOPs per token of a dense decoder (Appendix C.1), with S the mean sequence length:

    F(S) = 2 [ L (3 H H_ff + 2 H (H + D_kv)) + 2 V H ] + 4 S L H,    D_kv = n_kv_heads * head_dim

(3 H H_ff: the SwiGLU MLP; 2 H (H + D_kv): the Q, O and K, V projections; 2 V H: embedding and
LM head; 4 S L H: attention scores and values.) head_dim is H / n_heads unless the config sets it;
Q, O and the attention term use H as the paper writes them.

Training costs, in forward-token units multiplied by F(S) (Appendix C.2-C.3):

    SFT          3 x tokens                               (forward + backward)
    DAPO         K B_gen G S  +  3 B_train G S            (K generation rounds of dynamic sampling)
    GRPO         4 B G S                                  (generation 1x + update 3x)
    LUFFY, SRFT  4 [ (B G) S_on + (B N) S_off ]           (N off-policy expert traces per prompt)
    UPT          B [ G S_on + 3 (N_on S_on + N_off S_off) ]    (Eq. 26; Eq. 27 sums it over steps)

UPT's N_on and N_off are per-prompt means of what its gate trains, not of what is generated: every prompt
generates G on-policy samples (the B G S_on term); a prompt the gate sends to RL trains its G samples
(N_on += G / B), a prompt sent to SFT trains only its expert trajectory (N_off += n_expert / B). The trainer
drops the untrained sequences before packing and passes the trained ones' tokens to `rl_step_flops`.

`sft_step_flops` / `rl_step_flops` take the real token counts of a step, so a trainer logs
cumulative EFLOPs from real lengths (`FlopsLedger`); the closed forms above are `sft_flops`,
`dapo_flops`, `grpo_flops`, `luffy_flops` and `upt_flops`.

MFU = achieved FLOP/s / peak, with the achieved FLOPs counted by `mfu_step_flops` (6 x matmul
parameters per token + causal attention from the real sequence lengths; no embedding lookup), not F(S). `PEAK_BF16_FLOPS` holds nominal dense bf16 peaks; `peak_flops` matches
the device's name against it and always prefers an explicit override in TFLOP/s (set one for CPUs,
for which there is no entry, and for any device not in the table; note that the measured matmul
ceiling is usually 70-80% of the nominal peak, so nominal-peak MFU understates kernel efficiency).

    ceiling flops sft --model-config qwen2.5-7b --batch-size 512 --mean-seq-len 3771 --steps 360
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.errors import CeilingError

EXA = 1e18
MODEL_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "models"

# Nominal dense bf16 peak FLOP/s (no sparsity), matched by substring of the lower-cased device name,
# first match wins (so more specific names come first). The Ascend figure is the vendor's nominal one.
PEAK_BF16_FLOPS: dict[str, float] = {
    "h100 pcie": 756e12,
    "h100": 989e12,  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    "h800": 989e12,
    "h200": 989e12,
    "gh200": 989e12,
    "a100": 312e12,
    "a800": 312e12,
    "l40s": 362e12,
    "910b": 313e12,  # Ascend 910B (approximate; differs across 910B variants)
}


@dataclass(frozen=True)
class ModelDims:
    """The model sizes the FLOPs formula needs (HF config field names in the docstrings)."""

    hidden: int  # hidden_size (H)
    ffn: int  # intermediate_size (H_ff)
    layers: int  # num_hidden_layers (L)
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    vocab: int  # vocab_size (V)
    head_dim: int  # head_dim, else hidden_size // num_attention_heads

    @property
    def kv_dim(self) -> int:
        """D_kv = n_kv_heads * head_dim."""
        return self.kv_heads * self.head_dim


def load_model_config(source: str | Path) -> dict[str, Any]:
    """Read a `config.json` given as a file, a model dir, or a name in configs/models (e.g. 'qwen2.5-7b')."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file() and (MODEL_CONFIG_DIR / f"{source}.json").is_file():
        path = MODEL_CONFIG_DIR / f"{source}.json"
    if not path.is_file():
        raise CeilingError(
            f"model config: {source} is not a config.json, a model dir, or a name in {MODEL_CONFIG_DIR}"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CeilingError(f"model config {path}:{exc.lineno}: bad JSON: {exc.msg}") from exc


def model_dims(cfg: Any) -> ModelDims:
    """`ModelDims` from an HF config object, a dict, a `ModelDims`, or a path/name (`load_model_config`)."""
    if isinstance(cfg, ModelDims):
        return cfg
    if isinstance(cfg, (str, Path)):
        cfg = load_model_config(cfg)
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    if get("text_config") is not None:  # multimodal wrappers keep the LM sizes here
        return model_dims(get("text_config"))
    values = {}
    for name in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    ):
        value = get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CeilingError(f"model config: field {name!r} must be a positive integer, got {value!r}")
        values[name] = value
    kv_heads = get("num_key_value_heads") or values["num_attention_heads"]
    head_dim = get("head_dim") or values["hidden_size"] // values["num_attention_heads"]
    return ModelDims(
        values["hidden_size"],
        values["intermediate_size"],
        values["num_hidden_layers"],
        values["num_attention_heads"],
        int(kv_heads),
        values["vocab_size"],
        int(head_dim),
    )


def forward_flops_per_token(model_cfg: Any, mean_seq_len: float) -> float:
    """F(S) = 2 [L (3 H H_ff + 2 H (H + D_kv)) + 2 V H] + 4 S L H."""
    d = model_dims(model_cfg)
    if mean_seq_len < 0:
        raise ValueError(f"mean_seq_len must be >= 0, got {mean_seq_len}")
    h, L = d.hidden, d.layers
    dense = L * (3 * h * d.ffn + 2 * h * (h + d.kv_dim)) + 2 * d.vocab * h
    return 2.0 * dense + 4.0 * mean_seq_len * L * h


# --- SFT --------------------------------------------------------------------------------------------


def sft_step_flops(model_cfg: Any, num_tokens: int, mean_seq_len: float) -> float:
    """FLOPs of one SFT step over `num_tokens` tokens (all tokens of the batch, prompt included): 3 F(S) T."""
    return 3.0 * forward_flops_per_token(model_cfg, mean_seq_len) * num_tokens


def sft_flops(model_cfg: Any, batch_size: int, mean_seq_len: float, steps: int) -> float:
    """FLOPs of `steps` SFT steps of `batch_size` sequences of mean length S: 3 F(S) B S steps."""
    return steps * sft_step_flops(model_cfg, batch_size * mean_seq_len, mean_seq_len)


# --- RL ---------------------------------------------------------------------------------------------

# Forward-token multiplier of off-policy (expert) tokens in the update, per algorithm.
OFFPOLICY_MULTIPLIER = {"grpo": None, "dapo": None, "luffy": 4.0, "srft": 4.0, "upt": 3.0}


def rl_step_flops(
    algo: str,
    model_cfg: Any,
    *,
    mean_seq_len: float,
    gen_tokens: int,
    update_tokens: int,
    offpolicy_tokens: int = 0,
) -> float:
    """FLOPs of one RL step from its real token counts (prompt + response tokens of each sequence).

    gen_tokens: tokens of every sequence generated this step, all dynamic-sampling rounds included.
    update_tokens: on-policy tokens in the policy update. offpolicy_tokens: expert tokens in the update
    (LUFFY/SRFT count 4x, UPT 3x; GRPO/DAPO have none). FLOPs = F(S) (gen + 3 update + m off).
    """
    if algo not in OFFPOLICY_MULTIPLIER:
        raise ValueError(f"unknown RL algorithm {algo!r}; expected one of {sorted(OFFPOLICY_MULTIPLIER)}")
    mult = OFFPOLICY_MULTIPLIER[algo]
    if mult is None and offpolicy_tokens:
        raise ValueError(f"{algo} has no off-policy tokens, got offpolicy_tokens={offpolicy_tokens}")
    units = gen_tokens + 3.0 * update_tokens + (mult or 0.0) * offpolicy_tokens
    return forward_flops_per_token(model_cfg, mean_seq_len) * units


def dapo_flops(
    model_cfg: Any,
    gen_batch_size: int,
    train_batch_size: int,
    group_size: int,
    mean_seq_len: float,
    gen_rounds: float = 1,
    steps: int = 1,
) -> float:
    """F(S) (K B_gen G S + 3 B_train G S) per step."""
    g, s = group_size, mean_seq_len
    return steps * rl_step_flops(
        "dapo",
        model_cfg,
        mean_seq_len=s,
        gen_tokens=gen_rounds * gen_batch_size * g * s,
        update_tokens=train_batch_size * g * s,
    )


def grpo_flops(
    model_cfg: Any, batch_size: int, group_size: int, mean_seq_len: float, steps: int = 1
) -> float:
    """F(S) 4 B G S per step."""
    tokens = batch_size * group_size * mean_seq_len
    return steps * rl_step_flops(
        "grpo", model_cfg, mean_seq_len=mean_seq_len, gen_tokens=tokens, update_tokens=tokens
    )


def luffy_flops(
    model_cfg: Any,
    batch_size: int,
    group_size: int,
    num_offpolicy: int,
    mean_seq_len_on: float,
    mean_seq_len_off: float,
    steps: int = 1,
    algo: str = "luffy",
) -> float:
    """F(S) 4 [(B G) S_on + (B N) S_off] per step (LUFFY and SRFT); S is the mean over all sequences."""
    on, off = batch_size * group_size * mean_seq_len_on, batch_size * num_offpolicy * mean_seq_len_off
    s = (on + off) / (batch_size * (group_size + num_offpolicy))
    return steps * rl_step_flops(
        algo, model_cfg, mean_seq_len=s, gen_tokens=on, update_tokens=on, offpolicy_tokens=off
    )


def upt_flops(
    model_cfg: Any,
    batch_size: int,
    group_size: int,
    num_on: int,
    num_off: int,
    mean_seq_len_on: float,
    mean_seq_len_off: float,
    steps: int = 1,
) -> float:
    """F(S) B [G S_on + 3 (N_on S_on + N_off S_off)] per step; S is the mean over all sequences counted."""
    gen = batch_size * group_size * mean_seq_len_on
    upd_on, upd_off = batch_size * num_on * mean_seq_len_on, batch_size * num_off * mean_seq_len_off
    s = (gen + upd_on + upd_off) / (batch_size * (group_size + num_on + num_off))
    return steps * rl_step_flops(
        "upt", model_cfg, mean_seq_len=s, gen_tokens=gen, update_tokens=upd_on, offpolicy_tokens=upd_off
    )


# --- ledger and MFU ---------------------------------------------------------------------------------


class FlopsLedger:
    """Cumulative training FLOPs of a run; `state_dict` goes into checkpoints so resumes keep counting."""

    def __init__(self, model_cfg: Any, total_flops: float = 0.0) -> None:
        self.dims = model_dims(model_cfg)
        self.total_flops = float(total_flops)

    @property
    def exaflops(self) -> float:
        return self.total_flops / EXA

    def add_sft_step(self, num_tokens: int, mean_seq_len: float) -> float:
        """Count one SFT step; returns its FLOPs."""
        flops = sft_step_flops(self.dims, num_tokens, mean_seq_len)
        self.total_flops += flops
        return flops

    def add_rl_step(self, algo: str, **token_counts: Any) -> float:
        """Count one RL step (`rl_step_flops` keywords); returns its FLOPs."""
        flops = rl_step_flops(algo, self.dims, **token_counts)
        self.total_flops += flops
        return flops

    def state_dict(self) -> dict[str, float]:
        return {"total_flops": self.total_flops}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total_flops = float(state["total_flops"])


def device_name(device: Any) -> str:
    """Marketing name of a device given as a torch.device or a spec ('cuda:0', 'npu', 'cpu'); other strings
    are taken as names already (e.g. 'NVIDIA H100 80GB HBM3')."""
    spec = str(device)
    kind = spec.split(":")[0]
    if kind == "cuda":
        import torch

        return torch.cuda.get_device_name(torch.device(spec))
    if kind == "npu":
        import torch

        return torch.npu.get_device_name(torch.device(spec))  # registered by torch_npu
    return spec


def peak_flops(device: Any, override_tflops: float | None = None) -> float | None:
    """Peak dense FLOP/s of one device for MFU: `override_tflops` (TFLOP/s, e.g. from `run.peak_tflops`)
    when given, else the `PEAK_BF16_FLOPS` entry matching the device's name, else None (CPUs, unknown
    devices: set the override)."""
    if override_tflops is not None:
        if not 0 < override_tflops < 1e6:
            raise ValueError(f"peak override is in TFLOP/s (e.g. 989 for an H100), got {override_tflops}")
        return float(override_tflops) * 1e12
    name = device_name(device).lower()
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def matmul_params(model_cfg: Any) -> int:
    """N of the MFU convention: the weights that take part in a matmul for every token.

    Per layer the Q, K, V, O projections and the SwiGLU MLP, plus the LM head (V H, counted even when tied
    to the embedding, since the head's matmul runs). The input embedding is excluded: its forward is a
    lookup, not a GEMM (counting it is the ~2VH inflation of Appendix C's F(S) when used for MFU). Norm
    weights and biases are excluded (elementwise work).
    """
    d = model_dims(model_cfg)
    q_dim = d.heads * d.head_dim
    per_layer = d.hidden * (q_dim + 2 * d.kv_dim) + q_dim * d.hidden + 3 * d.hidden * d.ffn
    return d.layers * per_layer + d.vocab * d.hidden


def mfu_step_flops(model_cfg: Any, seq_lens: Any) -> float:
    """Training FLOPs of one step for MFU, from the real sequence lengths (the convention stated here):

        6 N T  +  6 L d_q sum_i s_i^2        T = sum_i s_i, d_q = n_heads * head_dim

    6 N T: forward 2N and backward 4N per token (N = `matmul_params`). Attention: QK^T and PV cost
    2 * 2 s^2 d_q per layer forward for a full square; causal masking halves it; backward is 2x forward,
    so 3 * 2 s^2 d_q = 6 s^2 d_q per layer and sequence. This is the 6N + attention convention of PaLM /
    torchtitan with the causal half, counted from each packed sequence's length (not a mean or the
    micro-batch width); Appendix C's F(S) stays the compute ledger.
    """
    import numpy as np

    d = model_dims(model_cfg)
    s = np.asarray(seq_lens, dtype=np.float64)
    if s.size and s.min() < 0:
        raise ValueError("sequence lengths must be >= 0")
    return 6.0 * matmul_params(d) * s.sum() + 6.0 * d.layers * d.heads * d.head_dim * float((s * s).sum())


def mfu(flops_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction of `peak` (None when the peak is unknown)."""
    if peak is None:
        return None
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be > 0, got {peak}")
    return flops_per_s / peak


# --- CLI ----------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `flops sft` to the `ceiling` CLI."""
    flops = subparsers.add_parser("flops", help="training compute by the paper's Appendix C")
    flops.set_defaults(func=lambda args: _usage(flops))
    sub = flops.add_subparsers(dest="flops_command", metavar="{sft}")
    sft = sub.add_parser("sft", help="SFT compute: 3 F(S) B S per step")
    sft.add_argument(
        "--model-config",
        required=True,
        help="config.json, a model dir, or a name in configs/models (e.g. qwen2.5-7b)",
    )
    sft.add_argument("--batch-size", type=int, required=True, help="sequences per optimizer step (B)")
    sft.add_argument("--mean-seq-len", type=float, required=True, help="mean tokens per sequence (S)")
    sft.add_argument("--steps", type=int, required=True, help="optimizer steps")
    sft.add_argument("--json", action="store_true", help="print a JSON object with the key 'exaflops'")
    sft.set_defaults(func=main)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def main(args: argparse.Namespace) -> int:
    """`ceiling flops sft`: print the SFT compute in EFLOPs."""
    for name in ("batch_size", "mean_seq_len", "steps"):
        if getattr(args, name) < 0:
            raise CeilingError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    dims = model_dims(args.model_config)
    per_token = forward_flops_per_token(dims, args.mean_seq_len)
    per_step = sft_flops(dims, args.batch_size, args.mean_seq_len, 1)
    total = per_step * args.steps
    if args.json:
        print(
            json.dumps(
                {
                    "exaflops": total / EXA,
                    "exaflops_per_step": per_step / EXA,
                    "flops": total,
                    "forward_flops_per_token": per_token,
                    "model_config": str(args.model_config),
                    "batch_size": args.batch_size,
                    "mean_seq_len": args.mean_seq_len,
                    "steps": args.steps,
                    "model": asdict(dims),
                }
            )
        )
    else:
        print(
            f"SFT compute: {total / EXA:.4f} EFLOPs over {args.steps} steps "
            f"({per_step / EXA:.6f} EFLOPs/step; forward {per_token:.4e} FLOPs/token "
            f"at S={args.mean_seq_len:g})"
        )
    return 0
