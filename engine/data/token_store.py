"""Token store: SFT data tokenized once into flat files, shared by every rank and every later run.

    store = open_token_store([train_path], tokenizer, max_seq_len=4096, overlong="truncate",
                             root="runs/token_store", workers=4)   # every rank tokenizes a shard, with 4 processes
    store.lengths_N          int32 length of every sample: all the packer needs
    store.loss_tokens_N      int32 loss targets of every sample (sum of loss_mask[1:])
    store.sample(i)          (input_ids int32[n], loss_mask uint8[n]) read from disk
    store.collate(ids)       one PackedBatch, identical to engine.data.packing.collate_packed

Layout of `<root>/<key>/` (built in a temporary directory and renamed into place when complete, so a
crash mid-build leaves nothing that looks finished):

    tokens.i32        every sample's token ids, concatenated (int32, the numpy memmap format of `np.memmap`)
    mask.u8           loss mask, 1 on trajectory tokens (uint8)
    offsets.i64       N+1 prefix sums of the sample lengths
    meta.json         the key's inputs, `DatasetStats`, format version

`key` is a sha256 over the format version, the bytes of each source file, a fingerprint of the tokenizer
(its backend JSON, chat template, end-of-turn id), `max_seq_len`, `overlong`, and how rows are read (the
`data.fields` mapping and the layout rules' version, engine/data/layouts.py). Editing the data, its mapping or
switching tokenizer gives a new key, hence a fresh store; anything else reuses the old one.

Building (engine/data/token_store_build.py): the rows are cut into `world_size x workers` contiguous shards
of about equal bytes (engine/data/row_shards.py). Each shard is tokenized into its own arrays under `<key>.shards/`, streaming
(one chunk of rows in memory), then rank 0 concatenates them with the offsets rebased. Samples keep file
and row order, so the store is byte-identical to a one-process build, and shares its key. A bad row
fails the build with its file:line on every rank: the failing shard writes its error where the others
look between chunks and while waiting.

Memory: samples are read with `os.preadv` into small buffers, never mapped, so a rank's resident memory
does not grow as training walks the dataset (the OS page cache keeps hot data, shared by all ranks). Per
sample, 16 bytes stay resident (offsets, lengths, loss counts): 14 MB for 889K rows. Opening a store reads
mask.u8 once, LOSS_COUNT_TOKENS bytes at a time, to count loss tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.data.layouts import FieldMap
from engine.data.packing import IGNORE_INDEX, PackedBatch
from engine.data.row_shards import Piece, plan_shards
from engine.data.sft_dataset import DatasetStats
from engine.data.token_store_build import (  # noqa: F401  (write_token_store: re-exported for callers)
    FILES,
    FORMAT_VERSION,
    BuildFailed,
    abort_message,
    assemble,
    build_token_store,
    run_shards,
    store_meta,
    write_token_store,
)
from engine.data.tokenizer import end_of_turn_id
from engine.errors import DataError

log = logging.getLogger("ceiling")

WAIT_LOG_S = 60.0  # how often a waiting rank says it is still waiting
LOSS_COUNT_TOKENS = 1 << 22  # mask bytes read at a time when counting loss tokens (x9 transient: int64 sums)


# ---------------------------------------------------------------- the key


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the backend tokenizer, chat template, end-of-turn id."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [
        type(tokenizer).__name__,
        backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True),
        str(tokenizer.chat_template),
        str(end_of_turn_id(tokenizer)),
        str(tokenizer.unk_token_id),
    ]
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def file_digest(path: str | Path, chunk_bytes: int = 1 << 24) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def store_key(paths: Sequence[str | Path], tokenizer, max_seq_len: int, overlong: str,
              fields: FieldMap | None = None) -> str:
    """Content hash naming the store of these files read and tokenized this way (first 24 hex digits)."""
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{max_seq_len}|{overlong}|{tokenizer_fingerprint(tokenizer)}|"
                       f"{(fields or FieldMap()).key()}".encode())
    for path in paths:
        h.update(file_digest(path).encode())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------- reading


class TokenStore:
    """Read-only view of a store directory; cheap to open on every rank."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{self.path}: not a token store (no meta.json)")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise DataError(f"{self.path}: token store format {self.meta.get('format')} != {FORMAT_VERSION}; "
                            "delete it to rebuild")
        self.offsets_N1 = np.fromfile(self.path / FILES["offsets"][0], dtype=np.int64)
        n = len(self.offsets_N1) - 1
        if n != self.meta["num_samples"] or self.offsets_N1[-1] != self.meta["num_tokens"]:
            raise DataError(f"{self.path}: offsets.i64 disagrees with meta.json (truncated store?); delete it")
        for name, (file, dtype) in FILES.items():
            want = (n + 1 if name == "offsets" else self.offsets_N1[-1]) * np.dtype(dtype).itemsize
            if (self.path / file).stat().st_size != want:
                raise DataError(f"{self.path / file}: size {(self.path / file).stat().st_size} != {want} bytes; "
                                "the store is damaged, delete it")
        self.lengths_N = np.diff(self.offsets_N1).astype(np.int32)
        self._fd_tokens = os.open(self.path / FILES["tokens"][0], os.O_RDONLY)
        self._fd_mask = os.open(self.path / FILES["mask"][0], os.O_RDONLY)
        self.loss_tokens_N = self._loss_counts()

    def _loss_counts(self) -> np.ndarray:
        """Per-sample loss targets (mask[1:] summed), in one streaming pass over mask.u8.

        Reads at most LOSS_COUNT_TOKENS mask bytes at a time (or one sample, if longer), so opening a store
        costs a fixed ~40 MB (the bytes and their int64 sums) however large it is. Reading the whole mask at
        once cost 25 bytes per token: a 1.4 GiB peak at 61M tokens, ~5.7 GB per rank per 65K samples.
        """
        out = np.empty(len(self), dtype=np.int32)
        offsets, lo = self.offsets_N1, 0
        while lo < len(self):
            hi = int(np.searchsorted(offsets, offsets[lo] + LOSS_COUNT_TOKENS, side="right")) - 1
            hi = min(max(hi, lo + 1), len(self))
            start = int(offsets[lo])
            mask = self._read(self._fd_mask, np.uint8, start, int(offsets[hi]))
            starts = offsets[lo:hi] - start  # strictly increasing: every sample has a token
            out[lo:hi] = np.add.reduceat(mask, starts, dtype=np.int64) - mask[starts]  # drop each first token
            lo = hi
        return out

    def __len__(self) -> int:
        return len(self.lengths_N)

    def __del__(self, _close=os.close):  # os.close bound now: at interpreter exit the module global may be gone
        for fd in (getattr(self, "_fd_tokens", None), getattr(self, "_fd_mask", None)):
            if fd is not None:
                _close(fd)

    @staticmethod
    def _read(fd: int, dtype, start: int, end: int) -> np.ndarray:
        buf = np.empty(end - start, dtype=dtype)
        want = buf.nbytes
        got = os.preadv(fd, [memoryview(buf).cast("B")], start * buf.itemsize) if want else 0
        if got != want:
            raise DataError(f"token store read {got} of {want} bytes at element {start}; the store is damaged")
        return buf

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int32[n], loss_mask uint8[n]) of sample `i`."""
        start, end = int(self.offsets_N1[i]), int(self.offsets_N1[i + 1])
        return self._read(self._fd_tokens, np.int32, start, end), self._read(self._fd_mask, np.uint8, start, end)

    def collate(self, ids: Sequence[int]) -> PackedBatch:
        """The samples `ids` as one flat PackedBatch (same tensors as `collate_packed`)."""
        parts = [self.sample(int(i)) for i in ids]
        tokens = np.concatenate([p[0] for p in parts]).astype(np.int64)
        mask = np.concatenate([p[1] for p in parts])
        lengths = np.asarray([len(p[0]) for p in parts], dtype=np.int64)
        cu = np.concatenate([[0], np.cumsum(lengths)])
        labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
        labels[:-1] = np.where(mask[1:] != 0, tokens[1:], IGNORE_INDEX)
        labels[cu[1:] - 1] = IGNORE_INDEX  # the last token of each sequence predicts nothing
        positions = np.arange(len(tokens)) - np.repeat(cu[:-1], lengths)
        return PackedBatch(
            input_ids=torch.from_numpy(tokens),
            position_ids=torch.from_numpy(positions),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            labels=torch.from_numpy(labels),
            sample_ids=torch.tensor([int(i) for i in ids], dtype=torch.long),
            max_seqlen=int(lengths.max()),
        )

    @property
    def stats(self) -> DatasetStats:
        return DatasetStats(**self.meta.get("stats", {}))


# ---------------------------------------------------------------- open (build once, share)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _broadcast(value):
    if _world() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _wait_for(ready, failed: Path, what: str, wait_timeout_s: float) -> None:
    """Poll the file system until `ready()` (not a collective: a build may outlast the process-group timeout)."""
    t0 = last = time.monotonic()
    while not ready():
        if (message := abort_message((str(failed), str(failed.with_suffix(".shards"))))) is not None:
            raise BuildFailed(message)
        if time.monotonic() - t0 > wait_timeout_s:
            raise DataError(f"timed out after {wait_timeout_s:.0f}s waiting for {what}")
        if time.monotonic() - last > WAIT_LOG_S:
            log.info("rank %d: waiting for %s", _rank(), what)
            last = time.monotonic()
        time.sleep(0.5)


def _error_text(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"


def _build_by_ranks(paths, shards: list[list[Piece]], tokenizer, max_seq_len: int, overlong: str, out: Path,
                    workers: int, progress: bool, wait_timeout_s: float, fields: FieldMap | None = None) -> None:
    """Every rank tokenizes `workers` consecutive shards into `<key>.shards/`; rank 0 then assembles the store.

    A rank whose shard fails writes its error to `<key>.shards/rank<r>.failed` (rank 0: `<key>.failed`);
    every other rank stops at its next chunk (or while waiting) and raises the same message.
    """
    rank, world = _rank(), _world()
    failed, work = out.with_name(f"{out.name}.failed"), out.with_name(f"{out.name}.shards")
    t0 = time.perf_counter()
    try:
        run_shards(work, shards, range(rank * workers, (rank + 1) * workers), workers, len(paths), tokenizer,
                    max_seq_len, overlong, progress, abort=(str(failed), str(work)), fields=fields)
        (work / f"rank{rank}.done").touch()
        if rank == 0:
            _wait_for(lambda: all((work / f"rank{r}.done").is_file() for r in range(world)), failed,
                      "every rank's token store shards", wait_timeout_s)
            assemble(work, len(shards), paths, out, store_meta(paths, max_seq_len, overlong, fields), max_seq_len,
                     overlong, t0)
            shutil.rmtree(work, ignore_errors=True)
    except BaseException as exc:
        if failed.is_file() and not isinstance(exc, BuildFailed):  # rank 0 failed and removed our shard dir
            raise BuildFailed(failed.read_text()) from exc
        message = exc.message if isinstance(exc, BuildFailed) else _error_text(exc)
        if rank == 0:
            failed.write_text(message)  # first: the other ranks stop on it before the shards go
            shutil.rmtree(work, ignore_errors=True)
        elif not failed.is_file():
            (work / f"rank{rank}.failed").write_text(message)
        raise


def open_token_store(paths: Sequence[str | Path], tokenizer, max_seq_len: int, overlong: str, root: str | Path,
                     progress: bool = True, workers: int = 1, wait_timeout_s: float = 7 * 24 * 3600,
                     fields: FieldMap | None = None) -> TokenStore:
    """The store of `paths` under `root`, built on first use; every rank returns a reader.

    Building: rank 0 cuts the rows into `world_size x workers` contiguous shards; each rank tokenizes its
    `workers` shards (in a pool of that many processes when > 1) and rank 0 concatenates them into the
    store, which is the same byte for byte whatever the shard count. Ranks wait by polling the file
    system (not a collective, so a build longer than the process-group timeout is fine). A failed build
    leaves `<key>.failed` holding the error (file:line for a bad row), which every rank raises.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(root)
    key, shards, error = None, None, None
    if _rank() == 0:
        try:  # a missing or unreadable file: every rank raises it, none waits at the broadcast
            key = store_key(paths, tokenizer, max_seq_len, overlong, fields)
            root.mkdir(parents=True, exist_ok=True)
            (root / f"{key}.failed").unlink(missing_ok=True)  # before the others can look for it
            shutil.rmtree(root / f"{key}.shards", ignore_errors=True)  # a crashed build's leftovers
            if _world() > 1 and not (root / key / "meta.json").is_file():
                shards = plan_shards(list(paths), _world() * workers)
        except DataError as exc:
            error = str(exc)
    key, shards, error = _broadcast((key, shards, error))
    if error is not None:
        raise DataError(error)
    out, failed = root / key, root / f"{key}.failed"
    if shards is not None:  # decided by rank 0 alone, so every rank takes part or none does
        log.info("tokenizing %s into token store %s (%d shards)", ", ".join(map(str, paths)), out, len(shards))
        _build_by_ranks(paths, shards, tokenizer, max_seq_len, overlong, out, workers, progress, wait_timeout_s, fields)
        if _rank() != 0:
            _wait_for((out / "meta.json").is_file, failed, f"rank 0 to assemble token store {out}", wait_timeout_s)
    elif (out / "meta.json").is_file():
        log.info("reusing token store %s", out)
    else:
        log.info("tokenizing %s into token store %s (%d workers)", ", ".join(map(str, paths)), out, workers)
        try:
            build_token_store(paths, tokenizer, max_seq_len, overlong, out, progress=progress, workers=workers,
                              fields=fields)
        except BaseException as exc:
            failed.write_text(_error_text(exc))
            raise
    return TokenStore(out)
