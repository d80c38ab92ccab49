"""HF safetensors in and out of FSDP2-sharded parameters, so no rank ever holds the full model.

    hf = build_model(path=hf_dir, meta=True)              # parameters on the meta device: no memory
    model = PackedCausalLM(hf); apply_fsdp(model, ...)     # fully_shard works on meta parameters
    load_hf_sharded(model, hf_dir, device)                 # allocate this rank's shards, read just its rows
    save_hf_sharded(model, out_dir, tokenizer)             # each rank writes some of the files
    export_model(model, out_dir, tokenizer, source_dir)    # the same, as a model to serve (generation config)

Loading: FSDP2 shards every parameter on dim 0, so a rank's shard is a contiguous run of rows of the
tensor in the file. The safetensors layout is a little-endian u64 header length, a JSON header
({name: {dtype, shape, data_offsets}}) and the raw bytes; the rows are read with one `os.preadv` into the
shard (after a dtype cast), never mapped, so a rank's resident memory is its shards plus one tensor's rows.
Non-persistent buffers (the rotary `inv_freq`) are not in the files and are rebuilt from the config.

Saving: parameters are laid out in files of at most `max_shard_bytes`, the files dealt round-robin to the
ranks; every rank takes part in each parameter's all-gather (`DTensor.full_tensor`), and only the file's
owner keeps it until its file is written. Peak memory per rank: one file plus one full parameter. Rank 0
writes config, tokenizer and `model.safetensors.index.json`; the directory appears atomically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from engine.errors import CeilingError

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
# Module-name segments that wrappers insert between an HF module and its parameters: activation checkpointing,
# torch.compile, FSDP1. The one map from the engine's parameter names to the names HF and vLLM load.
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def hf_name(fqn: str) -> str:
    """`hf.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight` -> `model.layers.0.mlp.up_proj.weight`."""
    parts = [p for p in fqn.split(".") if p not in WRAPPER_SEGMENTS]
    if parts and parts[0] == "hf":
        parts = parts[1:]
    return ".".join(parts)


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ---------------------------------------------------------------- reading


class _SafetensorsFile:
    """Header of one .safetensors file, and reads of row ranges by `os.preadv`."""

    def __init__(self, path: Path):
        self.path = path
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            try:
                self.header = json.loads(f.read(n))
            except json.JSONDecodeError as exc:
                raise CeilingError(f"{path}: bad safetensors header: {exc}") from None
        self.header.pop("__metadata__", None)
        self.data_start = 8 + n

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor) -> None:
        """Copy rows [start, stop) of tensor `key` into `out` (any dtype: cast after the read)."""
        entry = self.header[key]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CeilingError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        shape = entry["shape"]
        row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
        item = torch.empty((), dtype=dtype).element_size()
        n_bytes = (stop - start) * row_elems * item
        buf = torch.empty(n_bytes, dtype=torch.uint8)
        if n_bytes:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                got = os.preadv(fd, [buf.numpy()], self.data_start + entry["data_offsets"][0] + start * row_elems * item)
            finally:
                os.close(fd)
            if got != n_bytes:
                raise CeilingError(f"{self.path}: tensor {key!r} is truncated (read {got} of {n_bytes} bytes)")
        out.copy_(buf.view(dtype).view(out.shape))


def _index(hf_dir: Path) -> dict[str, _SafetensorsFile]:
    """Tensor name -> the file holding it (single-file or index-sharded checkpoints)."""
    index_file = hf_dir / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        files = {name: _SafetensorsFile(hf_dir / name) for name in sorted(set(weight_map.values()))}
        return {key: files[name] for key, name in weight_map.items()}
    single = hf_dir / "model.safetensors"
    if not single.is_file():
        raise CeilingError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json (only safetensors "
                           "checkpoints can be loaded sharded)")
    file = _SafetensorsFile(single)
    return dict.fromkeys(file.header, file)


@torch.no_grad()
def load_hf_sharded(model: nn.Module, hf_dir: str | Path, device: torch.device | str = "cpu") -> None:
    """Allocate a meta-device `model` (PackedCausalLM, FSDP2-sharded or not) on `device` and fill every
    parameter from the HF dir, each rank reading only its own rows.

    Raises naming the key when the checkpoint lacks a parameter or holds it with another shape. `to_empty`
    gives each module its own new Parameter, so tied embeddings are tied again before the load.
    """
    hf_dir = Path(hf_dir)
    where = _index(hf_dir)
    hf = getattr(model, "hf", model)
    model.to_empty(device=device)
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    if tied:
        hf.get_output_embeddings().weight = hf.get_input_embeddings().weight
    for name, param in model.named_parameters():
        key = hf_name(name)
        if key not in where:
            if tied and key == "lm_head.weight":
                continue
            raise CeilingError(f"{hf_dir}: checkpoint has no tensor {key!r}")
        file = where[key]
        if list(param.shape) != file.header[key]["shape"]:
            raise CeilingError(f"{file.path}: {key!r} has shape {file.header[key]['shape']}, the model expects "
                               f"{list(param.shape)} (config.json does not match the weights?)")
        if hasattr(param, "device_mesh"):  # DTensor from fully_shard: Shard(0)
            from torch.distributed.tensor import Shard
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            if any(not isinstance(p, Shard) or p.dim != 0 for p in param.placements):
                raise CeilingError(f"{key}: only dim-0 sharded parameters can be loaded, got {param.placements}")
            local_shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                                        param.placements)
            local = param.to_local()
            target = torch.empty(local_shape, dtype=local.dtype)
            file.read_rows(key, offset[0], offset[0] + local_shape[0], target)
            local.copy_(target)  # host -> device when the shards live on an accelerator
        else:
            target = torch.empty(param.shape, dtype=param.dtype)
            file.read_rows(key, 0, param.shape[0], target)
            param.copy_(target)
    init_non_persistent_buffers(model)


@torch.no_grad()
def init_non_persistent_buffers(model: nn.Module) -> None:
    """Rebuild buffers that checkpoints do not hold (rotary inv_freq) after `to_empty`, from each module's config."""
    for name, module in model.named_modules():
        names = getattr(module, "_non_persistent_buffers_set", set())
        if not names:
            continue
        if not hasattr(module, "original_inv_freq"):
            raise CeilingError(f"{name}: cannot rebuild non-persistent buffers {sorted(names)} of "
                               f"{type(module).__name__} after a meta-device init")
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        for buf in names:
            getattr(module, buf).copy_(getattr(fresh, buf))


# ---------------------------------------------------------------- writing


def _plan_files(entries: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    files: list[list[str]] = [[]]
    size = 0
    for key, n_bytes in entries:
        if files[-1] and size + n_bytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(key)
        size += n_bytes
    return files


def save_hf_sharded(model: nn.Module, out_dir: str | Path, tokenizer=None, *, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = 2 << 30) -> Path:
    """Write `model` (PackedCausalLM, FSDP2-sharded or not) as an HF directory; collective on every rank."""
    from safetensors.torch import save_file

    rank, world = _rank_world()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    params = [(hf_name(n), p) for n, p in model.named_parameters()]  # tied weights appear once, as HF saves them
    out_dtype = {key: dtype or p.dtype for key, p in params}
    entries = [(key, p.numel() * torch.empty((), dtype=out_dtype[key]).element_size()) for key, p in params]
    files = _plan_files(entries, max_shard_bytes)
    names = ["model.safetensors"] if len(files) == 1 else [
        f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    owner = {key: (i % world, i) for i, keys in enumerate(files) for key in keys}
    pending: dict[int, dict[str, torch.Tensor]] = {}
    by_key = dict(params)
    for i, keys in enumerate(files):
        for key in keys:
            param = by_key[key].detach()
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            if owner[key][0] == rank:
                pending.setdefault(i, {})[key] = full.to("cpu", out_dtype[key]).contiguous()
            del full
        if i in pending:
            save_file(pending.pop(i), str(tmp / names[i]), metadata={"format": "pt"})
    if rank == 0:
        hf = getattr(model, "hf", model)
        config = hf.config
        config.use_cache = True
        config.save_pretrained(tmp)
        config.use_cache = False
        if getattr(hf, "generation_config", None) is not None:
            hf.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(b for _, b in entries)},
                     "weight_map": {key: names[owner[key][1]] for key, _ in entries}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    if world > 1:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    if world > 1:
        dist.barrier()
    return out_dir


def export_model(model: nn.Module, out_dir: str | Path, tokenizer, source_dir: str | Path | None = None, *,
                 dtype: torch.dtype | None = None, max_shard_bytes: int = 2 << 30) -> Path:
    """`save_hf_sharded` for a model to serve: generation_config.json keeps the base's (`source_dir`'s) sampling
    defaults, with `eos_token_id` the end-of-turn token and the tokenizer's eos, so that `generate` and vLLM stop at
    the end of an assistant turn even where the tokenizer's eos is `<|endoftext|>` (Qwen base models); config.json
    names the architecture (vLLM picks its model class by it) and, with `dtype`, the dtype of the files."""
    from transformers import GenerationConfig

    from engine.data.tokenizer import stop_token_ids

    hf = getattr(model, "hf", model)
    if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
        hf.generation_config = GenerationConfig.from_pretrained(source_dir, local_files_only=True)
    hf.generation_config.eos_token_id = stop_token_ids(tokenizer)
    if hf.generation_config.pad_token_id is None:
        hf.generation_config.pad_token_id = tokenizer.pad_token_id
    if dtype is not None:
        hf.config.dtype = dtype  # config.json says what the files hold: loaders with dtype="auto" follow it
    hf.config.architectures = [type(hf).__name__]
    return save_hf_sharded(model, out_dir, tokenizer, dtype=dtype, max_shard_bytes=max_shard_bytes)
