"""Token store: SFT data tokenized once into flat files, shared by every rank and every later run.

    store = open_token_store([train_path], tokenizer, max_seq_len=4096, overlong="truncate",
                             root="runs/token_store")   # rank 0 tokenizes (with progress), others wait
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
(its backend JSON, chat template, end-of-turn id), `max_seq_len` and `overlong`. Editing the data or
switching tokenizer gives a new key, hence a fresh store; anything else reuses the old one.

Memory: samples are read with `os.preadv` into small buffers, never mapped, so a rank's resident memory
does not grow as training walks the dataset (the OS page cache keeps hot data, shared by all ranks). Per
sample, 16 bytes stay resident (offsets, lengths, loss counts): 14 MB for 889K rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from engine.data.packing import IGNORE_INDEX, PackedBatch
from engine.data.sft_dataset import DatasetStats, iter_sft_rows, iter_tokenized, report_stats
from engine.data.tokenizer import end_of_turn_id
from engine.errors import DataError

log = logging.getLogger("ceiling")

FORMAT_VERSION = 1
FILES = {"tokens": ("tokens.i32", np.int32), "mask": ("mask.u8", np.uint8), "offsets": ("offsets.i64", np.int64)}
WAIT_LOG_S = 60.0  # how often a waiting rank says it is still waiting


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


def store_key(paths: Sequence[str | Path], tokenizer, max_seq_len: int, overlong: str) -> str:
    """Content hash naming the store of these files tokenized this way (first 24 hex digits)."""
    h = hashlib.sha256(f"v{FORMAT_VERSION}|{max_seq_len}|{overlong}|{tokenizer_fingerprint(tokenizer)}".encode())
    for path in paths:
        h.update(file_digest(path).encode())
    return h.hexdigest()[:24]


# ---------------------------------------------------------------- writing


def write_token_store(
    out_dir: str | Path, samples: Iterable[tuple[Sequence[int], Sequence[int]]], meta: dict | None = None
) -> Path:
    """Write (input_ids, loss_mask) pairs as a store at `out_dir` (atomically: built beside it, then renamed).

    Streams: memory stays one sample plus the offsets, however many samples there are.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        offsets = _write_arrays(tmp, samples)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if len(offsets) == 1:
        shutil.rmtree(tmp)
        raise DataError(f"{out_dir}: no samples to store")
    np.asarray(offsets, dtype=np.int64).tofile(tmp / FILES["offsets"][0])
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, "num_samples": len(offsets) - 1,
                                               "num_tokens": offsets[-1], **(meta or {})}, indent=1))
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished the same store first: keep theirs
        if not (out_dir / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_arrays(tmp: Path, samples) -> list[int]:
    offsets = [0]
    with open(tmp / FILES["tokens"][0], "wb") as ft, open(tmp / FILES["mask"][0], "wb") as fm:
        for i, (ids, mask) in enumerate(samples):
            ids_a, mask_a = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int64)
            if ids_a.ndim != 1 or ids_a.size == 0 or ids_a.shape != mask_a.shape:
                raise DataError(f"sample {i}: input_ids and loss_mask must be equal-length non-empty lists")
            if ids_a.min() < 0 or ids_a.max() > np.iinfo(np.int32).max:
                raise DataError(f"sample {i}: token ids must fit in int32")
            ft.write(ids_a.astype(np.int32).tobytes())
            fm.write((mask_a != 0).astype(np.uint8).tobytes())
            offsets.append(offsets[-1] + ids_a.size)
    return offsets


def _tokenized_samples(paths, tokenizer, max_seq_len: int, overlong: str, stats: DatasetStats, progress: bool):
    """Stream (ids, mask) from every file, merging per-file stats into `stats` and reporting each file."""
    from tqdm import tqdm

    for path in paths:
        file_stats = DatasetStats()
        with tqdm(desc=f"tokenize {Path(path).name}", unit=" rows", disable=not progress, mininterval=5) as bar:
            for chunk, chunk_stats in iter_tokenized(iter_sft_rows(path), tokenizer, max_seq_len, overlong):
                file_stats.merge(chunk_stats)
                bar.update(chunk_stats.num_rows)
                bar.set_postfix(tokens=f"{file_stats.num_tokens:.3g}")
                for s in chunk:
                    yield s.input_ids, s.loss_mask
        report_stats(path, file_stats, max_seq_len, overlong)
        stats.merge(file_stats)


def build_token_store(paths: Sequence[str | Path], tokenizer, max_seq_len: int, overlong: str, out_dir: str | Path,
                      progress: bool = True) -> Path:
    """Tokenize `paths` with the chat template (engine.data.sft_dataset) into a store at `out_dir`."""
    stats = DatasetStats()
    t0 = time.perf_counter()
    samples = _tokenized_samples(paths, tokenizer, max_seq_len, overlong, stats, progress)
    meta = {"sources": [str(p) for p in paths], "max_seq_len": max_seq_len, "overlong": overlong}
    out = write_token_store(out_dir, samples, meta)
    seconds = time.perf_counter() - t0
    meta_file = out / "meta.json"
    full = json.loads(meta_file.read_text())
    full.update(stats=stats.__dict__, num_rows=stats.num_rows, build_seconds=seconds)
    meta_file.write_text(json.dumps(full, indent=1))
    log.info("token store %s: %d samples, %d tokens in %.1fs (%.3g tokens/s)", out, stats.num_samples,
             stats.num_tokens, seconds, stats.num_tokens / max(seconds, 1e-9))
    return out


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
        """Per-sample loss targets (mask[1:] summed), in one streaming pass over mask.u8."""
        out = np.empty(len(self), dtype=np.int32)
        step = 1 << 16
        for lo in range(0, len(self), step):
            hi = min(lo + step, len(self))
            start, end = int(self.offsets_N1[lo]), int(self.offsets_N1[hi])
            mask = self._read(self._fd_mask, np.uint8, start, end).astype(np.int64)
            csum = np.concatenate([[0], np.cumsum(mask)])
            starts, ends = self.offsets_N1[lo:hi] - start, self.offsets_N1[lo + 1:hi + 1] - start
            out[lo:hi] = csum[ends] - csum[starts + 1]  # excludes each sample's first token
        return out

    def __len__(self) -> int:
        return len(self.lengths_N)

    def __del__(self):
        for fd in (getattr(self, "_fd_tokens", None), getattr(self, "_fd_mask", None)):
            if fd is not None:
                os.close(fd)

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


def _broadcast(value):
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def open_token_store(paths: Sequence[str | Path], tokenizer, max_seq_len: int, overlong: str, root: str | Path,
                     progress: bool = True, wait_timeout_s: float = 7 * 24 * 3600) -> TokenStore:
    """The store of `paths` under `root`, built by rank 0 if missing; every rank returns a reader.

    Ranks other than 0 wait for the store directory by polling the file system (not a collective, so a
    tokenization longer than the process-group timeout is fine); a failed build leaves `<key>.failed`
    holding the error, which the waiting ranks raise.
    """
    root = Path(root)
    key = None
    if _rank() == 0:
        key = store_key(paths, tokenizer, max_seq_len, overlong)
        (root / f"{key}.failed").unlink(missing_ok=True)  # before the others can look for it
    key = _broadcast(key)
    out, failed = root / key, root / f"{key}.failed"
    if _rank() == 0:
        if not (out / "meta.json").is_file():
            log.info("tokenizing %s into token store %s", ", ".join(map(str, paths)), out)
            try:
                build_token_store(paths, tokenizer, max_seq_len, overlong, out, progress=progress)
            except BaseException as exc:
                root.mkdir(parents=True, exist_ok=True)
                failed.write_text(f"{type(exc).__name__}: {exc}")
                raise
        else:
            log.info("reusing token store %s", out)
    else:
        t0 = last = time.monotonic()
        while not (out / "meta.json").is_file():
            if failed.is_file():
                raise DataError(f"rank 0 failed to build token store {out}: {failed.read_text()}")
            if time.monotonic() - t0 > wait_timeout_s:
                raise DataError(f"timed out after {wait_timeout_s:.0f}s waiting for rank 0 to build {out}")
            if time.monotonic() - last > WAIT_LOG_S:
                log.info("rank %d: waiting for rank 0 to build token store %s", _rank(), out)
                last = time.monotonic()
            time.sleep(0.5)
    return TokenStore(out)
