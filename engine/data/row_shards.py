"""Contiguous row shards of SFT files, so several processes can tokenize one dataset in parallel.

    shards = plan_shards([a_jsonl, b_parquet], 4)     # 4 lists of Pieces, in file and row order
    for where, row in iter_piece_rows(piece): ...     # same (location, row) as files.iter_raw_rows

The files are laid end to end and cut into `n` runs of about equal bytes (JSONL: file bytes; Parquet: the
row groups' uncompressed bytes; Arrow: the record batches' bytes). A cut moves forward to the next line start
(JSONL), row-group start (Parquet) or batch start (Arrow), so every row lands in exactly one shard, and reading
shard 0, 1, ... in order gives the rows of `iter_raw_rows` over the files in order, with the same locations
(1-based line, 0-based row) and the same error messages. A shard may be empty (a cut inside a long line or a
large row group).

Planning reads each JSONL file once to count lines up to the cuts (at disk speed; no JSON is parsed).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data.files import (
    CHUNK_ROWS,
    TABLE_SUFFIXES,
    _Where,
    arrow_batches,
    iter_table_batches,
    jsonl_line_row,
    parquet_file,
)
from engine.errors import DataError

SCAN_BLOCK = 1 << 24  # bytes read at a time when counting lines


@dataclass(frozen=True)
class Piece:
    """Rows [start, end) of one file: byte offsets (JSONL), row-group indices (Parquet) or batch indices (Arrow)."""

    file_index: int
    path: str
    start: int
    end: int
    first_row: int
    """Location of the first row: its 1-based line (JSONL) or 0-based row index (Parquet, Arrow)."""

    @property
    def table(self) -> bool:
        return Path(self.path).suffix in TABLE_SUFFIXES


def _row_groups(path: Path) -> list[tuple[int, int]]:
    """(cumulative weight, first row) at the start of each row group (Arrow: batch), and once more at the end."""
    if path.suffix == ".arrow":
        sizes = [(max(b.nbytes, 1), b.num_rows) for b in arrow_batches(path)]
    else:
        meta = parquet_file(path).metadata
        sizes = [(max(meta.row_group(g).total_byte_size, 1), meta.row_group(g).num_rows)
                 for g in range(meta.num_row_groups)]
    out, weight, row = [], 0, 0
    for nbytes, nrows in sizes:
        out.append((weight, row))
        weight += nbytes
        row += nrows
    return out + [(weight, row)]


def _jsonl_line_starts(path: Path, cuts: list[int]) -> list[tuple[int, int]]:
    """(byte offset, line number) of the first line starting at or after each cut (sorted, all > 0)."""
    out, i = [], 0
    with path.open("rb") as f:
        base, lines = 0, 0  # bytes and newlines before the current block
        while i < len(cuts) and (block := f.read(SCAN_BLOCK)):
            while i < len(cuts):
                rel = max(cuts[i] - 1 - base, 0)  # the newline ending the line that holds byte cut-1
                nl = block.find(b"\n", rel) if rel < len(block) else -1
                if nl < 0:
                    break
                out.append((base + nl + 1, 1 + lines + block.count(b"\n", 0, nl + 1)))
                i += 1
            lines += block.count(b"\n")
            base += len(block)
    return out + [(base, 1 + lines)] * (len(cuts) - i)  # cuts inside the last line: empty pieces at the end


def plan_shards(paths: list[str | Path], n: int) -> list[list[Piece]]:
    """`n` shards of about equal size, each a list of Pieces, covering every row of `paths` once, in order."""
    if n < 1:
        raise ValueError(f"need at least one shard, got {n}")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    groups = {f: _row_groups(p) for f, p in enumerate(paths) if p.suffix in TABLE_SUFFIXES}
    sizes = [groups[f][-1][0] if f in groups else p.stat().st_size for f, p in enumerate(paths)]
    ends = [len(groups[f]) - 1 if f in groups else size for f, size in enumerate(sizes)]  # end position per file
    first = [0 if f in groups else 1 for f in range(len(paths))]  # location of a file's first row
    cum = [0, *itertools.accumulate(sizes)]
    local: dict[int, list[int]] = {}  # file -> cuts inside it (after its start)
    for k in range(1, n):
        c = cum[-1] * k // n
        f = bisect.bisect_right(cum, c) - 1
        if f < len(paths) and c > cum[f]:
            local.setdefault(f, []).append(c - cum[f])
    resolved = {}
    for f, cuts in local.items():
        if f in groups:
            starts = [w for w, _ in groups[f]]
            for c in cuts:
                g = bisect.bisect_left(starts, c)
                resolved[f, c] = (g, groups[f][g][1])
        else:
            resolved.update({(f, c): at for c, at in zip(cuts, _jsonl_line_starts(paths[f], cuts))})
    bounds = [(0, 0, first[0])]  # (file, position, location of the row there)
    for k in range(1, n):
        c = cum[-1] * k // n
        f = min(bisect.bisect_right(cum, c) - 1, len(paths) - 1)
        bounds.append((f, *resolved[f, c - cum[f]]) if c > cum[f] else (f, 0, first[f]))
    bounds.append((len(paths) - 1, ends[-1], 0))
    shards = []
    for (fa, pa, ra), (fb, pb, _) in zip(bounds[:-1], bounds[1:]):
        pieces = []
        for f in range(fa, fb + 1):
            start, row = (pa, ra) if f == fa else (0, first[f])
            end = pb if f == fb else ends[f]
            if end > start:
                pieces.append(Piece(f, str(paths[f]), start, end, row))
        shards.append(pieces)
    return shards


def iter_piece_rows(piece: Piece) -> Iterator[tuple[_Where, Any]]:
    """(location, decoded row) of each row in `piece`, as `files.iter_raw_rows` yields them."""
    path = Path(piece.path)
    if path.suffix == ".arrow":
        yield from iter_table_batches(path, iter(arrow_batches(path)[piece.start:piece.end]), piece.first_row)
        return
    if piece.table:
        batches = parquet_file(path).iter_batches(batch_size=CHUNK_ROWS, row_groups=range(piece.start, piece.end))
        yield from iter_table_batches(path, batches, piece.first_row)
        return
    with path.open("rb") as f:
        f.seek(piece.start)
        pos, lineno = piece.start, piece.first_row
        while pos < piece.end:
            raw = f.readline()
            if not raw:
                return
            pos += len(raw)
            yield from jsonl_line_row(path, lineno, raw)
            lineno += 1


