"""Writing token stores: a streaming array writer, and the sharded build (tokenize shards, then one writer).

    build_token_store([train_path], tokenizer, 4096, "truncate", out_dir, workers=4)   # 4 processes
    write_token_store(out_dir, [(input_ids, loss_mask), ...])                          # ready samples

Format and layout: engine/data/token_store.py, which opens stores and coordinates ranks. A shard is the same
three arrays (offsets from 0) plus stats.json (per-file DatasetStats) in `<out>.shards*/shard<k>/`; `assemble`
concatenates them with the offsets rebased, so the store does not depend on the shard count.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from engine.data.layouts import FieldMap, parse_sft_row
from engine.data.row_shards import Piece, iter_piece_rows, plan_shards
from engine.data.sft_dataset import CHUNK_ROWS, DatasetStats, iter_tokenized, report_stats
from engine.errors import DataError

log = logging.getLogger("ceiling")

FORMAT_VERSION = 1
FILES = {"tokens": ("tokens.i32", np.int32), "mask": ("mask.u8", np.uint8), "offsets": ("offsets.i64", np.int64)}
COPY_BYTES = 1 << 24  # buffer of the shard concatenation
SHARD_CHUNK_ROWS = 256  # rows tokenized at a time: ~1M tokens of Python ints (~150 MB) at SFT889K's lengths


# ---------------------------------------------------------------- writing


class _ArrayWriter:
    """Appends samples to tokens.i32, mask.u8 and offsets.i64 in `folder`, one chunk at a time."""

    def __init__(self, folder: Path):
        self.files = {name: open(folder / file, "wb") for name, (file, _) in FILES.items()}  # noqa: SIM115
        self.num_samples, self.num_tokens = 0, 0
        np.zeros(1, dtype=np.int64).tofile(self.files["offsets"])

    def add(self, ids_list: Sequence[Sequence[int]], masks_list: Sequence[Sequence[int]]) -> None:
        n = len(ids_list)
        lengths = np.fromiter(map(len, ids_list), dtype=np.int64, count=n)
        bad = np.flatnonzero((lengths == 0) | (lengths != np.fromiter(map(len, masks_list), np.int64, count=n)))
        if bad.size:
            raise DataError(f"sample {self.num_samples + bad[0]}: input_ids and loss_mask must be equal-length "
                            "non-empty lists")
        total = int(lengths.sum())
        ids = np.fromiter(itertools.chain.from_iterable(ids_list), dtype=np.int64, count=total)
        out_of_range = np.flatnonzero((ids < 0) | (ids > np.iinfo(np.int32).max))
        if out_of_range.size:
            i = int(np.searchsorted(np.cumsum(lengths), out_of_range[0], side="right"))
            raise DataError(f"sample {self.num_samples + i}: token ids must fit in int32")
        mask = np.fromiter(itertools.chain.from_iterable(masks_list), dtype=np.int64, count=total)
        self.files["tokens"].write(ids.astype(np.int32).tobytes())
        self.files["mask"].write((mask != 0).astype(np.uint8).tobytes())
        self.files["offsets"].write((np.cumsum(lengths) + self.num_tokens).tobytes())
        self.num_samples += n
        self.num_tokens += total

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def publish(tmp: Path, out_dir: Path, num_samples: int, num_tokens: int, meta: dict) -> Path:
    """Give the complete arrays in `tmp` their meta.json and rename `tmp` to `out_dir` (atomic)."""
    if num_samples == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{out_dir}: no samples to store")
    (tmp / "meta.json").write_text(json.dumps({"format": FORMAT_VERSION, "num_samples": num_samples,
                                               "num_tokens": num_tokens, **meta}, indent=1))
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished the same store first: keep theirs
        if not (out_dir / "meta.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def write_token_store(
    out_dir: str | Path, samples: Iterable[tuple[Sequence[int], Sequence[int]]], meta: dict | None = None
) -> Path:
    """Write (input_ids, loss_mask) pairs as a store at `out_dir` (atomically: built beside it, then renamed).

    Streams: memory stays one chunk of samples, however many samples there are.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = _ArrayWriter(tmp)
    try:
        it = iter(samples)
        while chunk := list(itertools.islice(it, CHUNK_ROWS)):
            writer.add([s[0] for s in chunk], [s[1] for s in chunk])
    except BaseException:
        writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    writer.close()
    return publish(tmp, out_dir, writer.num_samples, writer.num_tokens, meta or {})


# ---------------------------------------------------------------- building: shards, then one writer


class BuildFailed(DataError):
    """Another shard (process or rank) of the same build failed; `message` is its error."""

    def __init__(self, message: str):
        super().__init__(f"token store build failed: {message}")
        self.message = message

    def __reduce__(self):  # pickled back from a pool worker with its original message
        return BuildFailed, (self.message,)


def abort_message(abort: tuple[str, str] | None) -> str | None:
    """The error of another shard's failed build, if any: `<key>.failed`, or a `rank*.failed` in the work dir."""
    if abort is None:
        return None
    failed, work = Path(abort[0]), Path(abort[1])
    for path in (failed, *sorted(work.glob("rank*.failed"))):
        try:
            return path.read_text()
        except FileNotFoundError:
            continue
    return None


def _tokenize_shard(folder: Path, pieces: list[Piece], num_files: int, tokenizer, max_seq_len: int, overlong: str,
                    label: str, progress: bool, abort: tuple[str, str] | None = None,
                    fields: FieldMap | None = None) -> None:
    """Tokenize the rows of `pieces` into arrays in `folder`, plus stats.json (per-file DatasetStats).

    Memory: one chunk of rows and its tokens. Between chunks it stops if another shard failed (`abort`).
    """
    from tqdm import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    per_file = [DatasetStats() for _ in range(num_files)]
    writer = _ArrayWriter(folder)
    try:
        with tqdm(desc=f"tokenize {label}", unit=" rows", disable=not progress, mininterval=5) as bar:
            for piece in pieces:
                rows = (parse_sft_row(where, row, fields) for where, row in iter_piece_rows(piece))
                while batch := list(itertools.islice(rows, SHARD_CHUNK_ROWS)):
                    ((chunk, stats),) = iter_tokenized(batch, tokenizer, max_seq_len, overlong)
                    if (message := abort_message(abort)) is not None:
                        raise BuildFailed(message)
                    writer.add([s.input_ids for s in chunk], [s.loss_mask for s in chunk])
                    per_file[piece.file_index].merge(stats)
                    bar.update(stats.num_rows)
                    bar.set_postfix(tokens=f"{writer.num_tokens:.3g}")
    finally:
        writer.close()
    (folder / "stats.json").write_text(json.dumps([s.__dict__ for s in per_file]))


def _shard_job(args) -> int:
    _tokenize_shard(*args)
    return 0


def run_shards(work: Path, shards: list[list[Piece]], mine: Sequence[int], workers: int, num_files: int,
                tokenizer, max_seq_len: int, overlong: str, progress: bool, abort=None,
                fields: FieldMap | None = None) -> None:
    """Tokenize shards `mine` into `work/shard<k>/`: in this process, or in a pool of `workers` processes.

    The pool is spawned (the Rust tokenizer's threads do not survive a fork) and terminated on the first
    failure, whose exception is raised here with its message (file:line) intact.
    """
    jobs = [(work / f"shard{k}", shards[k], num_files, tokenizer, max_seq_len, overlong,
             f"shard {k + 1}/{len(shards)}", progress and k == mine[0], abort, fields) for k in mine]
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            _tokenize_shard(*job)
        return
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
    try:
        for _ in pool.imap_unordered(_shard_job, jobs):
            pass
        pool.close()
    except BaseException:
        pool.terminate()  # the other shards stop at once
        raise
    finally:
        pool.join()


def assemble(work: Path, num_shards: int, paths: Sequence[str | Path], out_dir: Path, meta: dict,
              max_seq_len: int, overlong: str, t0: float) -> Path:
    """Check the per-file stats, then concatenate the shards (offsets rebased) into the store, atomically."""
    per_file = [DatasetStats() for _ in paths]
    for k in range(num_shards):
        for f, stats in enumerate(json.loads((work / f"shard{k}" / "stats.json").read_text())):
            per_file[f].merge(DatasetStats(**stats))
    total = DatasetStats()
    for path, stats in zip(paths, per_file):
        report_stats(path, stats, max_seq_len, overlong)  # raises on a file with no usable row
        total.merge(stats)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if num_shards == 1:
        os.replace(work / "shard0", tmp)
        (tmp / "stats.json").unlink()
    else:
        tmp.mkdir(parents=True)
        with ExitStack() as files:
            out = {name: files.enter_context(open(tmp / file, "wb")) for name, (file, _) in FILES.items()}
            base = 0
            np.zeros(1, dtype=np.int64).tofile(out["offsets"])
            for k in range(num_shards):
                shard = work / f"shard{k}"
                for name in ("tokens", "mask"):
                    with open(shard / FILES[name][0], "rb") as src:
                        shutil.copyfileobj(src, out[name], COPY_BYTES)
                offsets = np.fromfile(shard / FILES["offsets"][0], dtype=np.int64)
                (offsets[1:] + base).tofile(out["offsets"])
                base += int(offsets[-1])
    seconds = time.perf_counter() - t0
    meta = {**meta, "stats": total.__dict__, "num_rows": total.num_rows, "build_seconds": seconds}
    out = publish(tmp, out_dir, total.num_samples, total.num_tokens, meta)
    log.info("token store %s: %d samples, %d tokens in %.1fs (%.3g tokens/s, %d shards)", out, total.num_samples,
             total.num_tokens, seconds, total.num_tokens / max(seconds, 1e-9), num_shards)
    return out


def store_meta(paths, max_seq_len: int, overlong: str, fields: FieldMap | None = None) -> dict:
    return {"sources": [str(p) for p in paths], "max_seq_len": max_seq_len, "overlong": overlong,
            "layout": json.loads((fields or FieldMap()).key())}


def build_token_store(paths: Sequence[str | Path], tokenizer, max_seq_len: int, overlong: str, out_dir: str | Path,
                      progress: bool = True, workers: int = 1, fields: FieldMap | None = None) -> Path:
    """Tokenize `paths` with the chat template (engine.data.sft_dataset) into a store at `out_dir`.

    `workers` > 1 tokenizes that many contiguous row shards in parallel processes; the store is the same
    byte for byte.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    shards = plan_shards(list(paths), workers)
    work = out_dir.with_name(f"{out_dir.name}.shards{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        run_shards(work, shards, range(len(shards)), workers, len(paths), tokenizer, max_seq_len, overlong,
                    progress, fields=fields)
        return assemble(work, len(shards), paths, out_dir, store_meta(paths, max_seq_len, overlong, fields), max_seq_len,
                         overlong, t0)
    finally:
        shutil.rmtree(work, ignore_errors=True)
