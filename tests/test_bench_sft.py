"""benchmarks/bench_sft.py runs (smoke mode, CPU): the GPU throughput table depends on it."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_sft_smoke():
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the CPU torch loss path, as in training
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sft.py"), "--smoke"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| tiny-qwen2 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["engine", "transformers"]
