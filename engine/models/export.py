"""`ceiling export CHECKPOINT OUT`: an engine checkpoint as an HF model directory that loads as it is.

    ceiling export runs/sft-tiny OUT                              # a run directory: its latest checkpoint
    ceiling export runs/tiny/rl/checkpoints OUT                   # a checkpoints/ root: the step `latest` names
    ceiling export runs/tiny/rl/checkpoints/step_00000030 OUT --dtype bfloat16 --max-shard-gb 2
    ceiling export CKPT OUT --model-config configs/models/tiny-qwen2.json --tokenizer char   # outside a run dir

The checkpoint (torch.distributed.checkpoint, written at any world size) is verified against its manifest
(`verify_checkpoint`: a damaged one is an error naming the file and why), loaded into the model its run's
config.yaml names (`load_checkpoint_model`), and written by `export_model` (engine/models/hf_checkpoint.py, as
the trainers write `<run>/hf`): safetensors files of at most `--max-shard-gb` GB (5 by default, the shard size of
the Hub's model repos and of transformers 4's `save_pretrained`; transformers 5's is 50GB) with
`model.safetensors.index.json` when there are several, config.json (its `dtype` the export's), generation_config.json
(`eos_token_id`: the end-of-turn token and the tokenizer's eos, so that `generate` and vLLM stop at the end of an
assistant turn) and the tokenizer with its chat template (the run's `model.chat_template` when it set one). The
directory appears atomically; an existing one is replaced only if it holds nothing but an export's files and is not
the model's own source.

dtype: `--dtype`, else bfloat16 when the model's config.json says bfloat16 (`dtype` or `torch_dtype`), else
float32. The weights are loaded in fp32 (the master copy the trainer saves) and cast once at the write.

The full model is built on the CPU (peak memory: the fp32 model plus one output file). Under a process group
(a trainer's) every rank must call `export_checkpoint`: the verification, the load and the write are collective.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

from engine.errors import CeilingError, CheckpointError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_GB = 5.0
# Files an export writes (besides *.safetensors); an existing OUT holding others is not replaced.
HF_DIR_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "vocab.json",
                "merges.txt", "added_tokens.json", "tokenizer.model")


def resolve_checkpoint(path: str | Path) -> Path:
    """The step directory `path` means: itself, the one a `checkpoints/` root's `latest` names, or the run
    directory's `checkpoints/` latest."""
    from engine.rundir.checkpoint import MANIFEST, latest_checkpoint

    path = Path(path)
    if any((path / name).exists() for name in (".metadata", MANIFEST, "trainer_state.json")):
        return path
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (root / "latest").is_file():
        found = latest_checkpoint(root)
        if found is None:
            raise CheckpointError(f"{root / 'latest'} names {(root / 'latest').read_text().strip()!r}, which is not "
                                  f"a complete checkpoint under {root}")
        return found
    runs = sorted(str(p) for p in path.iterdir() if (p / "checkpoints").is_dir()) if path.is_dir() else []
    hint = f" (a pipeline run: export one of {', '.join(runs)})" if runs else ""
    raise CeilingError(f"{path}: not a checkpoint (step_N with .metadata), a checkpoints/ directory with a `latest` "
                       f"file, or a run directory holding one{hint}")


def default_dtype(config_file: str | Path) -> torch.dtype:
    """bfloat16 when the model's config.json says so (`dtype`, or transformers 4's `torch_dtype`), else float32."""
    config = json.loads(Path(config_file).read_text())
    return torch.bfloat16 if (config.get("dtype") or config.get("torch_dtype")) == "bfloat16" else torch.float32


def _check_out(out: Path, checkpoint: Path, sources: list[Path]) -> None:
    """Refuse an OUT whose replacement would delete something that is not a previous export."""
    out, checkpoint = out.resolve(), checkpoint.resolve()
    if checkpoint.is_relative_to(out) or out.is_relative_to(checkpoint):
        raise CeilingError(f"{out}: the output directory must lie outside the checkpoint {checkpoint}")
    if any(out == s.resolve() for s in sources):
        raise CeilingError(f"{out} is the model's own source directory: export somewhere else")
    if out.exists():
        if not out.is_dir():
            raise CeilingError(f"{out} exists and is not a directory")
        others = [p.name for p in out.iterdir() if p.name not in HF_DIR_FILES and p.suffix != ".safetensors"]
        if others:
            raise CeilingError(f"{out} exists and holds files an export does not write ({', '.join(sorted(others)[:5])}"
                               "): refusing to replace it; remove it or choose another directory")


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: torch.dtype | None = None,
                      max_shard_bytes: int = int(DEFAULT_MAX_SHARD_GB * 1e9), *, model_config: str | None = None,
                      tokenizer: str | None = None) -> Path:
    """Write engine checkpoint `checkpoint` (a step dir, a checkpoints/ root or a run dir) as an HF directory
    `out`; returns `out`. `model_config`/`tokenizer` as in `checkpoint_model_config` (default: the run's)."""
    from engine.data.tokenizer import model_tokenizer
    from engine.evaluate import checkpoint_model_config, load_checkpoint_model
    from engine.models import PackedCausalLM
    from engine.models.hf_checkpoint import export_model
    from engine.rundir.checkpoint import verify_checkpoint

    if max_shard_bytes <= 0:
        raise CeilingError(f"the shard size must be positive, got {max_shard_bytes} bytes")
    path = resolve_checkpoint(checkpoint)
    if problems := verify_checkpoint(path):
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    model_cfg = checkpoint_model_config(path, model_config, tokenizer)
    out = Path(out)
    _check_out(out, path, [Path(p) for p in (model_cfg.path, model_cfg.tokenizer) if p is not None])
    dtype = dtype or default_dtype(model_cfg.config or Path(model_cfg.path) / "config.json")
    tok = model_tokenizer(model_cfg)  # with the run's model.chat_template when it set one
    if tok.chat_template is None:
        raise CeilingError(f"tokenizer {model_cfg.tokenizer} has no chat template, which an exported chat model "
                           "needs: pass --tokenizer with a tokenizer directory that has one")
    with warnings.catch_warnings():  # DCP notes that it loads in one process without a process group: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        hf = load_checkpoint_model(path, model_cfg)
    return export_model(PackedCausalLM(hf), out, tok, model_cfg.path, dtype=dtype, max_shard_bytes=max_shard_bytes)


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="an engine checkpoint as an HF model directory (safetensors)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint (checkpoints/step_N), a checkpoints/ root (its latest), or a run "
                                      "directory (its checkpoints/ latest)")
    p.add_argument("out", help="the HF model directory to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights' dtype; default bfloat16 if the model's config.json says bfloat16, else float32")
    p.add_argument("--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_GB,
                   help=f"largest safetensors file in GB (10^9 bytes); default {DEFAULT_MAX_SHARD_GB:g}")
    p.add_argument("--model-config", default=None, help="HF config.json (or HF dir), for a checkpoint outside a run")
    p.add_argument("--tokenizer", default=None, help="'char' or a tokenizer directory, for a checkpoint outside a run")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.max_shard_gb <= 0:
        raise CeilingError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    checkpoint = resolve_checkpoint(args.checkpoint)
    out = export_checkpoint(checkpoint, args.out, DTYPES.get(args.dtype), int(args.max_shard_gb * 1e9),
                            model_config=args.model_config, tokenizer=args.tokenizer)
    shards = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    size_text = f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.2f} MB"
    dtype = json.loads((out / "config.json").read_text())["dtype"]
    why = "--dtype" if args.dtype else "default: bfloat16 only for a model whose config.json says bfloat16"
    index = " + model.safetensors.index.json" if len(shards) > 1 else ""
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    print(f"exported {checkpoint} -> {out}")
    print(f"  {len(shards)} safetensors file{'s' if len(shards) > 1 else ''}{index}, {size_text}, "
          f"{dtype} ({why})")
    print(f"  config.json, generation_config.json (eos_token_id {eos}), tokenizer with its chat template")
    return 0
