"""Shared benchmark harness: warm-up, CUDA-event timing (median), peak memory, tables, RESULTS.md.

    from harness import measure, print_table, append_results, environment

`measure(fn)` runs fn() `warmup` times, then `iters` timed runs (CUDA events on GPU, perf_counter on CPU)
and returns the median time in ms and, on CUDA, the peak memory allocated during one call above what was
allocated before it (minus `exclude_bytes`, e.g. the gradients the call is expected to produce). `reset()`
runs before that measured call (e.g. freeing the previous call's gradients, so they are not counted as
already allocated and then subtracted again).
`append_results` appends a markdown section to benchmarks/RESULTS.md (never rewrites it; others append too)
with the device, versions, commit and date. `ResultsStream` does the same one row at a time: header first,
then each row printed and appended (flushed) as soon as it is measured, so a run cut short by a timeout keeps
every row it finished.
"""

from __future__ import annotations

import datetime
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def environment(device: torch.device) -> dict:
    """Device, versions, commit, date: the header every results section carries."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    return dict(device=name, torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda or "-",
                commit=commit, date=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"))


def measure(fn, device: torch.device, *, warmup: int = 3, iters: int = 10, exclude_bytes: int = 0,
            reset=None) -> dict:
    """Median ms over `iters` calls after `warmup`; peak bytes above the pre-call allocation (CUDA only)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return dict(time_ms=statistics.median(times), peak_bytes=None)
    if reset is not None:
        reset()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before - exclude_bytes
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return dict(time_ms=statistics.median(times), peak_bytes=max(peak, 0))


def fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec)


def table_header(columns: list[tuple[str, str, str]]) -> str:
    return "| " + " | ".join(h for _, h, _ in columns) + " |\n" + "|" + "|".join("---" for _ in columns) + "|"


def table_row(r: dict, columns: list[tuple[str, str, str]]) -> str:
    cells = [r.get(k) if isinstance(r.get(k), str) else fmt(r.get(k), spec) for k, _, spec in columns]
    return "| " + " | ".join(cells) + " |"


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns are (key, header, format spec); missing values print as '-'."""
    return "\n".join([table_header(columns)] + [table_row(r, columns) for r in rows])


def print_table(title: str, rows: list[dict], columns) -> None:
    print(f"\n### {title}\n")
    print(format_table(rows, columns))


def append_results(title: str, env: dict, rows: list[dict], columns, notes: str = "",
                   path: Path | str = RESULTS) -> None:
    """Append one section (header with environment, notes, table) to the results file."""
    path = Path(path)
    header = ", ".join(f"{k}: {v}" for k, v in env.items())
    text = f"\n## {title}\n\n{header}\n\n" + (f"{notes}\n\n" if notes else "") + format_table(rows, columns) + "\n"
    with path.open("a") as f:
        f.write(text)


class ResultsStream:
    """A results section written as it is measured: `row(r)` prints the row and appends it to `path` at once.

    The header (title, environment, notes, column header) is printed and appended when the stream opens, so
    the file holds a well-formed (if shorter) table whenever the process stops. `path=None`: print only.
    `rows` keeps what was written, for callers that post-process or return them.
    """

    def __init__(self, title: str, env: dict | None, columns, notes: str = "", path: Path | str | None = RESULTS):
        self.columns, self.rows = columns, []
        self.path = None if path is None else Path(path)
        header = "" if env is None else ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n"
        text = f"\n## {title}\n\n{header}" + (f"{notes}\n\n" if notes else "") + table_header(columns)
        print(f"\n### {title}\n\n{header}{table_header(columns)}", flush=True)
        self._append(text + "\n")

    def _append(self, text: str) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(text)
                f.flush()

    def row(self, r: dict) -> dict:
        self.rows.append(r)
        line = table_row(r, self.columns)
        print(line, flush=True)
        self._append(line + "\n")
        return r
