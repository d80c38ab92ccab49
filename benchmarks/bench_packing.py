"""Packing benchmark: the paper's SFT889K scale, 889K sequence lengths (lognormal, mean ~3.8K tokens).

    .venv/bin/python benchmarks/bench_packing.py [--n 889000] [--budget 16384] [--ranks 8] [--no-record]

Times first-fit-decreasing packing of every sequence under the micro-batch budget, and the
token-balanced assignment of the micro-batches to ranks. The C++ extension (`engine._packing`) and
the pure-Python fallback run on the same lengths; their outputs must be identical. Prints a table and
appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np

from engine.data import packing


def lognormal_lengths(n: int, mean: float, sigma: float, cap: int, seed: int = 0) -> list[int]:
    mu = np.log(mean) - sigma**2 / 2  # so that E[length] = mean before capping
    return np.random.default_rng(seed).lognormal(mu, sigma, n).clip(1, cap).astype(np.int64).tolist()


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=889_000)
    ap.add_argument("--mean", type=float, default=3800.0)
    ap.add_argument("--sigma", type=float, default=0.8)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()

    lengths = lognormal_lengths(args.n, args.mean, args.sigma, args.budget)
    rows = []
    results = {}
    impls = [("python", packing.ffd_pack_py, packing.balance_py)]
    if packing.native_available():
        impls.insert(0, ("c++", packing._native.ffd_pack, packing._native.balance))
    for name, ffd, bal in impls:
        bins, t_pack = timed(ffd, lengths, args.budget)
        tokens = [sum(lengths[i] for i in b) for b in bins]
        tokens += [0] * (-len(tokens) % args.ranks)
        assignment, t_bal = timed(bal, tokens, args.ranks)
        loads = [sum(tokens[i] for i in r) for r in assignment]
        results[name] = (bins, assignment)
        fill = sum(lengths) / (len(bins) * args.budget)
        rows.append((name, t_pack, t_bal, len(bins), fill, (max(loads) - min(loads)) / max(loads)))
    if len(results) == 2:
        assert results["c++"] == results["python"], "C++ and Python packers disagree"

    header = "| impl | pack (s) | balance (s) | micro-batches | fill | rank imbalance |"
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r[0]} | {r[1]:.3f} | {r[2]:.4f} | {r[3]} | {r[4]:.4f} | {r[5]:.2e} |" for r in rows]
    table = "\n".join(lines)
    mean_len = sum(lengths) / len(lengths)
    title = (f"### Packing: {args.n} sequences, mean {mean_len:.0f} tokens (lognormal sigma {args.sigma}), "
             f"budget {args.budget}, {args.ranks} ranks")
    meta = (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, numpy {np.__version__}; one thread; outputs identical: "
            f"{'yes' if len(results) == 2 else 'n/a (no C++ extension)'}")
    print(title)
    print(meta)
    print(table)
    if not args.no_record:
        path = Path(__file__).resolve().parent / "RESULTS.md"
        with path.open("a") as f:
            f.write(f"\n{title}\n\n{meta}\n\n{table}\n")


if __name__ == "__main__":
    main()
