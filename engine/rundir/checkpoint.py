"""Checkpoints: torch.distributed.checkpoint (sharded, reshardable), verified, written atomically; HF export.

    runs/<name>/checkpoints/step_00000120/   model + optimizer shards (DCP), trainer_state.json, extra.pt,
                                             manifest.json (every file's size and crc32)
    runs/<name>/checkpoints/latest           the name of the newest complete checkpoint

Writing. A checkpoint is written into `step_N.tmp/`. The crc32 of every shard is computed while DCP
writes it (a checksumming stream under DCP's file writer), those of `trainer_state.json` and `extra.pt`
as rank 0 writes them; every file is fsynced, then `manifest.json`, then the directory. Only then is
`step_N.tmp` renamed to `step_N` (and the parent fsynced), and `latest` replaced the same way. A crash
at any point leaves the previous checkpoint and `latest` intact; a failed write (disk full) raises a
`CheckpointError` naming the checkpoint and the reason and removes the partial directory.

Loading. `verify_checkpoint` checks every file of the manifest (size, then crc32; ranks share the
reading). `resume_latest` takes the newest checkpoint that verifies and loads; one that does not is
reported with the file and the reason and moved aside to `step_N.bad`, and resume falls back to the
next older one (`on_bad="fallback"`) or stops (`on_bad="stop"`). A `latest` naming a missing directory
is the same case. Resume never restarts from step 0 while the run has checkpoints or a `latest`:
when none verifies it is an error. `trainer_state.json` holds the step, the data position and the
validation history; `extra.pt` the LR scheduler and RNG states, loaded with `weights_only=True` (a run
directory may be shared: a crafted pickle is refused, never run). DCP saves DTensor shards with their
global layout, so a run can resume on a different number of ranks.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import shutil
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from engine.distributed import barrier
from engine.errors import CheckpointError
from engine.rundir.files import fsync_dir

log = logging.getLogger("ceiling")

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d{8})")
_CHUNK = 8 << 20  # bytes read at a time when verifying


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _gather(obj: Any) -> list[Any]:
    """`obj` from every rank (a list of one off a process group)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# ---------------------------------------------------------------- writing


class _ChecksumStream:
    """A write-only file that keeps the crc32 and size of what went through it (DCP uses write/tell/fileno).

    A failed write (disk full) is also kept in `errors`: torch.save's zip writer replaces it with an
    opaque "unexpected pos" error, and the user needs to see the real reason.
    """

    def __init__(self, raw, entry: dict[str, int], errors: list[OSError]):
        self.raw, self.entry, self.errors = raw, entry, errors

    def write(self, data) -> int:
        try:
            n = self.raw.write(data)
        except OSError as exc:
            self.errors.append(exc)
            raise
        self.entry["crc32"] = zlib.crc32(data, self.entry["crc32"])
        self.entry["size"] += memoryview(data).nbytes
        return n

    def __getattr__(self, name):  # tell, flush, fileno, close, ...
        return getattr(self.raw, name)


class _ChecksumFileSystem(FileSystem):
    """DCP's local file system, with the crc32 of each file computed as it is written."""

    def __init__(self, sums: dict[str, dict[str, int]]):
        super().__init__()
        self.sums = sums
        self.errors: list[OSError] = []

    @contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            entry = self.sums[Path(path).name] = {"size": 0, "crc32": 0}
            yield _ChecksumStream(raw, entry, self.errors)

    def rename(self, path, new_path) -> None:  # DCP writes `.metadata.tmp`, then renames it
        super().rename(path, new_path)
        if Path(path).name in self.sums:
            self.sums[Path(new_path).name] = self.sums.pop(Path(path).name)


class _ChecksumWriter(FileSystemWriter):
    def __init__(self, path: Path):
        super().__init__(path, sync_files=True)  # DCP fsyncs each file it writes
        self.sums: dict[str, dict[str, int]] = {}
        self.fs = _ChecksumFileSystem(self.sums)


def _write_file(path: Path, data: bytes) -> dict[str, int]:
    """Write and fsync `data`; returns its manifest entry."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"size": len(data), "crc32": zlib.crc32(data)}


def _replace(src: Path, dst: Path) -> None:
    """Atomic rename, made durable by fsyncing the parent directory."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def _describe(exc: BaseException) -> str:
    """One line for a failed write; the OSError inside a DCP CheckpointException (any rank) if there is one."""
    if isinstance(exc, CheckpointException) and exc.failures:
        inner = [e for e, _ in exc.failures.values()]
        exc = next((e for e in inner if isinstance(e, OSError)), inner[0])
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f" ({exc.filename})" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


def save_checkpoint(ckpt_root: str | Path, step: int, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
    """Write `step_N` atomically with its manifest (collective); returns its path."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / checkpoint_name(step)
    tmp = ckpt_root / (checkpoint_name(step) + ".tmp")
    if _rank() == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    writer = _ChecksumWriter(tmp)
    failure = None
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=writer)
    except (OSError, CheckpointException) as exc:
        failure = _describe(writer.fs.errors[0] if writer.fs.errors else exc)
    sums = _gather(writer.sums)
    failure = next((f for f in _gather(failure) if f), None)
    if _rank() == 0 and failure is None:
        try:
            _finish_on_rank0(ckpt_root, tmp, final, step, scheduler, state, sums)
        except OSError as exc:
            failure = _describe(exc)
    failure = _gather(failure)[0]  # rank 0's outcome
    if failure is not None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # frees what a full disk needs
        barrier()
        raise CheckpointError(f"cannot write checkpoint {final}: {failure}; the previous checkpoint "
                              f"{latest_checkpoint(ckpt_root) or '(none)'} is intact")
    barrier()
    return final


def _finish_on_rank0(ckpt_root: Path, tmp: Path, final: Path, step: int, scheduler, state: dict[str, Any],
                     sums: list[dict[str, dict[str, int]]]) -> None:
    """Rank 0: trainer files, the manifest, fsyncs, then the renames that publish the checkpoint."""
    files: dict[str, dict[str, int]] = {}
    for part in sums:
        files.update(part)
    extra = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}, extra)
    extra.seek(0)
    torch.load(extra, weights_only=True)  # what resume will read: fail at the save, not at the resume
    files["extra.pt"] = _write_file(tmp / "extra.pt", extra.getvalue())
    files["trainer_state.json"] = _write_file(tmp / "trainer_state.json",
                                              json.dumps({"step": step, **state}, indent=1).encode())
    manifest = {"format": 1, "step": step, "files": dict(sorted(files.items()))}
    _write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)
    if final.exists():  # a stale copy of this step (e.g. one a fallback moved past)
        shutil.rmtree(final)
    _replace(tmp, final)
    _write_file(ckpt_root / "latest.tmp", final.name.encode())
    _replace(ckpt_root / "latest.tmp", ckpt_root / "latest")


# ---------------------------------------------------------------- verifying and loading


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint `latest` names, if that directory exists (not verified; see `resume_latest`)."""
    pointer = Path(ckpt_root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    return path if (path / "trainer_state.json").is_file() else None


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def verify_checkpoint(path: str | Path) -> list[str]:
    """Problems with checkpoint `path` ("file: reason"), [] when every manifest entry matches (collective:
    the ranks share the crc reading). A checkpoint from before manifests is only checked for its files."""
    path = Path(path)
    problems: list[str] = []
    files: list[tuple[str, dict]] = []
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = sorted((str(k), v) for k, v in manifest["files"].items())
        if not all(isinstance(v.get("size"), int) and isinstance(v.get("crc32"), int) for _, v in files):
            raise ValueError("entries need an integer size and crc32")
    except FileNotFoundError:
        if not path.is_dir():
            problems.append("directory missing")
        elif not (path / ".metadata").is_file() or not (path / "trainer_state.json").is_file():
            problems.append(f"{MANIFEST}: missing, and so are the DCP .metadata or trainer_state.json")
        elif _rank() == 0:
            log.warning("%s has no %s (written before checkpoints had manifests): not verified", path, MANIFEST)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        problems.append(f"{MANIFEST}: unreadable ({type(exc).__name__}: {exc})")
    for i, (name, want) in enumerate(files):
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            problems.append(f"{name}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{name}: {size} bytes, the manifest says {want['size']}")
        elif i % _world() == _rank() and _crc32(file) != want["crc32"]:
            problems.append(f"{name}: crc32 mismatch (the contents changed after the write)")
    return sorted({p for part in _gather(problems) for p in part})


def load_checkpoint(path: str | Path, model, optimizer=None, scheduler=None, verify: bool = True) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and RNG in place (resume); returns the trainer state.

    The checkpoint is verified against its manifest first (`CheckpointError` naming the file and reason).
    With `optimizer=None` only the model weights are loaded (e.g. RL starting from an SFT checkpoint),
    and the RNG and scheduler are left alone.
    """
    path = Path(path)
    if verify and (problems := verify_checkpoint(path)):
        raise CheckpointError(f"checkpoint {path} is damaged: {'; '.join(problems)}")
    if optimizer is None:
        model_sd = get_model_state_dict(model)
        dcp.load({"model": model_sd}, checkpoint_id=str(path))
        set_model_state_dict(model, model_sd)
        return json.loads((path / "trainer_state.json").read_text())
    extra = _load_extra(path / "extra.pt")  # first: a refused file leaves the model and optimizer untouched
    model_sd, optim_sd = get_state_dict(model, optimizer)
    to_load = {"model": model_sd, "optim": optim_sd}
    dcp.load(to_load, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=to_load["model"], optim_state_dict=to_load["optim"])
    if scheduler is not None:
        scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    return json.loads((path / "trainer_state.json").read_text())


def _load_extra(file: Path) -> dict[str, Any]:
    """`extra.pt`: the scheduler state (plain numbers, lists, dicts) and the RNG state (a uint8 tensor).

    Read with `weights_only=True`: a full unpickle would run whatever code the file names (e.g. through
    `__reduce__`) in every process that resumes from it, and run and sweep directories are shared. Anything
    beyond tensors and plain containers is refused."""
    try:
        extra = torch.load(file, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):  # a damaged pickle
            raise CheckpointError(f"{file}: unreadable ({str(exc).splitlines()[0]})") from exc
        reason = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))  # what it would have called
        raise CheckpointError(
            f"{file}: refused: it names {reason.group(1) if reason else 'a Python object'}, which unpickling "
            "would call. extra.pt holds only the scheduler and RNG states, read with torch.load(weights_only="
            "True); this file was not written by the engine: resume only from a directory you trust"
        ) from exc
    if not (isinstance(extra, dict) and isinstance(extra.get("scheduler"), dict)
            and isinstance(extra.get("rng"), torch.Tensor) and extra["rng"].dtype == torch.uint8):
        raise CheckpointError(f"{file}: not a checkpoint's extra state (expected a dict with 'scheduler' and a "
                              "uint8 'rng' tensor)")
    return extra


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """Completed checkpoint directories, newest first."""
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def resume_latest(ckpt_root: str | Path, model, optimizer, scheduler, on_bad: str = "fallback") -> dict[str, Any] | None:
    """Restore the newest checkpoint under `ckpt_root` that verifies; its trainer state (with "step", "path").

    None only when the run has no checkpoint and no `latest` (a fresh start). A damaged checkpoint or a
    dangling `latest` is reported; `on_bad="fallback"` moves a damaged one aside (`step_N.bad`) and takes the
    next older one, `on_bad="stop"` raises `CheckpointError`. When none verifies: `CheckpointError`, never step 0.
    """
    if on_bad not in ("fallback", "stop"):
        raise ValueError(f"on_bad must be 'fallback' or 'stop', got {on_bad!r}")
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    candidates = _step_dirs(root)
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    barrier()  # every rank has listed before rank 0 moves anything
    if _rank() == 0:
        for partial in root.glob("step_*.tmp"):
            log.warning("removing %s: a checkpoint write that did not finish", partial)
            shutil.rmtree(partial, ignore_errors=True)
    problems = []
    if named and not (root / named).is_dir():
        problems.append(f"{pointer} names {named}, which does not exist")
    if not candidates and not problems:
        return None
    for path in candidates:
        if problems and on_bad == "stop":
            raise CheckpointError(f"{'; '.join(problems)}. Stopped (run.on_bad_checkpoint=stop): set "
                                  "run.on_bad_checkpoint=fallback to resume from the newest checkpoint that "
                                  "verifies, or repair or remove the damaged one")
        bad = verify_checkpoint(path)
        if not bad:
            try:
                state = load_checkpoint(path, model, optimizer, scheduler, verify=False)
                failure = None
            except (Exception, CheckpointException) as exc:  # e.g. a checkpoint from before manifests, cut short
                failure = f"cannot be loaded: {_describe(exc)}"
            bad = [f for f in _gather(failure) if f][:1]
        if not bad:
            if problems:
                log.warning("resume: %s; resuming from %s, the newest checkpoint that verifies",
                            "; ".join(problems), path.name)
                if _rank() == 0:  # `latest` names what the run now continues from
                    _write_file(root / "latest.tmp", path.name.encode())
                    _replace(root / "latest.tmp", pointer)
            state["path"] = str(path)
            return state
        problems.append(f"checkpoint {path} is damaged: {'; '.join(bad)}")
        log.error("resume: %s", problems[-1])
        if on_bad == "fallback":
            barrier()
            if _rank() == 0:
                aside = path.with_name(path.name + ".bad")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(path, aside)
                log.warning("moved %s aside to %s", path.name, aside.name)
    raise CheckpointError(f"no checkpoint under {root} verifies: {'; '.join(problems)}. Refusing to start again "
                          f"from step 0 over this run's history: restore a checkpoint, or remove {root} to start "
                          "from scratch")


def prune_checkpoints(ckpt_root: str | Path, keep_last: int, protect: set[str]) -> None:
    """Delete all but the newest `keep_last` checkpoints, never those named in `protect`."""
    if _rank() != 0 or keep_last <= 0:
        return
    for path in _step_dirs(Path(ckpt_root))[keep_last:]:
        if path.name not in protect:
            shutil.rmtree(path, ignore_errors=True)
