"""Checkpoints: torch.distributed.checkpoint (sharded, reshardable), written atomically; HF export.

    runs/<name>/checkpoints/step_00000120/   model + optimizer shards (DCP), trainer_state.json, extra.pt
    runs/<name>/checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp/` and renamed once every rank has finished, so a crash
mid-write leaves the previous checkpoint intact and the partial one is ignored (and removed on the
next save). DCP saves DTensor shards with their global layout, so a run can resume on a different
number of ranks. `trainer_state.json` holds the step, the data position and the validation history;
`extra.pt` holds the LR scheduler and RNG states.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from engine.distributed import barrier
from engine.errors import CeilingError


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(ckpt_root: str | Path, step: int, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / (checkpoint_name(step) + ".tmp")
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    if _rank() == 0:
        torch.save({"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}, tmp / "extra.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))
    barrier()
    if _rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = ckpt_root / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, ckpt_root / "latest")
    barrier()
    return final


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    pointer = Path(ckpt_root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG in place (resume); returns the trainer state.

    With `optimizer=None` only the model weights are loaded (e.g. RL starting from an SFT checkpoint),
    and the RNG and scheduler are left alone.
    """
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise CeilingError(f"{path}: not a checkpoint directory (no .metadata)")
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=str(path))
        set_model_state_dict(model, model_sd)
        return json.loads((path / "trainer_state.json").read_text())
    model_sd, optim_sd = get_state_dict(model, optimizer)
    to_load = {"model": model_sd, "optim": optim_sd}
    dcp.load(to_load, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"])
    extra = torch.load(path / "extra.pt", weights_only=False)
    if scheduler is not None:
        scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    return json.loads((path / "trainer_state.json").read_text())


def resume_latest(ckpt_root: str | Path, model, optimizer, scheduler) -> dict[str, Any] | None:
    """Restore the newest checkpoint under `ckpt_root`, if any; returns its trainer state (with "step")."""
    path = latest_checkpoint(ckpt_root)
    if path is None:
        return None
    state = load_checkpoint(path, model, optimizer, scheduler)
    state["path"] = str(path)
    return state


def full_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights under HF names, on every rank: what a rollout engine loads (collective)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {_hf_key(k): v for k, v in full.items()}


def prune_checkpoints(ckpt_root: str | Path, keep_last: int, protect: set[str]) -> None:
    """Delete all but the newest `keep_last` checkpoints, never those named in `protect`."""
    if _rank() != 0 or keep_last <= 0:
        return
    done = sorted(p for p in Path(ckpt_root).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for path in done[:-keep_last]:
        if path.name not in protect:
            shutil.rmtree(path, ignore_errors=True)


def _hf_key(key: str) -> str:
    key = key.replace("._checkpoint_wrapped_module", "")
    return key[len("hf."):] if key.startswith("hf.") else key


def export_hf(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path | None:
    """Gather the full weights and write an HF directory that `from_pretrained` loads (rank 0 writes)."""
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        barrier()
        return None
    config = model.hf.config
    state = {_hf_key(k): (v.to(dtype) if dtype is not None else v) for k, v in full.items()}
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(state, strict=False, assign=True)
    fresh.tie_weights()
    missing = [name for name, p in fresh.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"export_hf: parameters missing from the state dict: {missing[:5]}")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.config.use_cache = True
    fresh.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    barrier()
    return out_dir
