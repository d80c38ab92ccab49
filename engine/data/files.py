"""Data files: which files a path setting names, and their rows as Python objects, streamed with their locations.

    files = expand_paths("data/openr1-*.parquet", "data.train_path")     # sorted; an error if nothing matches
    for where, row in iter_raw_rows(files[0]): ...                       # where: "file.jsonl:17" / "file:row 3"

A path setting (`data.train_path`, `rl.prompts_path`, a benchmark) is a file, a glob, a list of either, or a
directory: one written by `datasets.Dataset.save_to_disk` (its `state.json` lists its Arrow files, read in that
order) or a folder of data files (every .jsonl/.json/.parquet/.arrow in it, sorted). A `DatasetDict` saved to
disk holds one folder per split: name the split's folder (`data/gsm8k/train`). Formats, by suffix:

    .parquet          one row per record, read a batch of row groups at a time
    .arrow            Arrow IPC stream (what `save_to_disk` writes) or file, memory-mapped
    anything else     JSON Lines: one object per line, decoded line by line (a bad byte names its line)

Locations: 1-based line for JSON Lines, 0-based row for Parquet and Arrow (`_Where`), as every error names them.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import DataError

CHUNK_ROWS = 2048  # rows decoded per Parquet/Arrow batch
TABLE_SUFFIXES = (".parquet", ".arrow")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


@dataclass
class _Where:
    """Location of a raw row, for error messages."""

    path: str
    index: int  # 1-based JSONL line, or 0-based Parquet/Arrow row
    table: bool = False

    def __str__(self) -> str:
        return f"{self.path}:row {self.index}" if self.table else f"{self.path}:{self.index}"


# ---------------------------------------------------------------- which files


def expand_paths(spec: str | Path | Sequence[str | Path], setting: str = "path") -> list[Path]:
    """The data files a path setting names (see the module docstring), in order; `setting` names it in errors."""
    specs = [spec] if isinstance(spec, str | Path) else list(spec)
    if not specs:
        raise DataError(f"{setting}: names no file (an empty list)")
    out: list[Path] = []
    for item in specs:
        text = str(item)
        if glob.has_magic(text):
            matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{setting}: {text} matches no file (relative to the working directory {Path.cwd()})")
            out += matches
        elif Path(text).is_dir():
            out += _directory_files(Path(text), setting)
        elif Path(text).is_file():
            out.append(Path(text))
        else:
            where = "" if Path(text).is_absolute() else f", relative to the working directory {Path.cwd()}"
            raise DataError(f"{setting}: {text} does not exist (no such file or directory{where})")
    return out


def _directory_files(folder: Path, setting: str) -> list[Path]:
    if (folder / "dataset_dict.json").is_file():  # a DatasetDict: one saved dataset per split
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(f"{setting}: {folder} is a datasets DatasetDict with splits {splits}: name one split's "
                        f"folder, e.g. {folder / (splits[0] if splits else 'train')}")
    state = folder / "state.json"
    if state.is_file():  # datasets.Dataset.save_to_disk
        try:
            names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{state}: not a datasets save_to_disk state file ({exc!r})") from None
        files = [folder / n for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise DataError(f"{folder}: save_to_disk lists missing Arrow files {missing}")
        return files
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
    if not files:
        raise DataError(f"{setting}: {folder} holds no data file ({', '.join(DATA_SUFFIXES)}) and is not a "
                        "datasets save_to_disk directory")
    return files


# ---------------------------------------------------------------- rows


def iter_table_batches(path: Path, batches, index: int = 0) -> Iterator[tuple[_Where, Any]]:
    """(location, row) of each row in `batches` (pyarrow record batches of `path`), numbered from `index`."""
    while True:
        try:  # a damaged page or column chunk fails here, not when the file is opened
            batch = next(batches, None)
            rows = batch.to_pylist() if batch is not None else []
        except Exception as exc:
            raise DataError(f"{path}:row {index}: cannot read the data from here on: {exc}") from exc
        if batch is None:
            return
        for row in rows:
            yield _Where(str(path), index, table=True), row
            index += 1


def jsonl_line_row(path: Path, lineno: int, raw: bytes) -> Iterator[tuple[_Where, Any]]:
    """The row on one JSONL line, with its location; none for a blank line (e.g. a trailing newline)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {exc.start} of the line: "
                        f"{raw[exc.start:exc.start + 1]!r}, {exc.reason})") from None
    if not line.strip():
        return
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        if lineno == 1 and line.lstrip().startswith("["):
            raise DataError(f"{path}: a JSON array, not JSON Lines: write one object per line "
                            "(e.g. `jq -c '.[]' in.json > out.jsonl`)") from None
        raise DataError(f"{path}:{lineno}: bad JSON: {exc.msg} (column {exc.colno})") from exc
    except RecursionError:
        raise DataError(f"{path}:{lineno}: bad JSON: nested too deeply") from None
    yield _Where(str(path), lineno), row


def parquet_file(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from exc


def arrow_batches(path: Path) -> list:
    """The record batches of an Arrow IPC stream (save_to_disk) or file, memory-mapped (no copy of the data)."""
    import pyarrow as pa

    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            file = pa.ipc.open_file(source)
            return [file.get_batch(i) for i in range(file.num_record_batches)]
        return list(reader)
    except Exception as exc:
        raise DataError(f"{path}: not a readable Arrow file: {exc}") from exc


def iter_raw_rows(path: str | Path) -> Iterator[tuple[_Where, Any]]:
    """Yield (location, decoded row) from one data file (format by suffix), streaming."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".parquet":
        yield from iter_table_batches(path, parquet_file(path).iter_batches(batch_size=CHUNK_ROWS))
        return
    if path.suffix == ".arrow":
        yield from iter_table_batches(path, iter(arrow_batches(path)))
        return
    with path.open("rb") as f:  # decoded line by line, so a bad byte is reported on its own line
        for lineno, raw in enumerate(f, start=1):
            yield from jsonl_line_row(path, lineno, raw)


def iter_files_rows(paths: Sequence[str | Path]) -> Iterator[tuple[_Where, Any]]:
    """`iter_raw_rows` over several files, one after the other."""
    for path in paths:
        yield from iter_raw_rows(path)
