"""benchmarks/bench_sft.py runs (smoke mode, CPU): the GPU throughput table depends on it.

Every row trains the same weights on the same sequences with the same objective, so their first-step losses
must agree: the engine's real train_step, HF padded (random and length-grouped) and HF padding-free.
"""

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
    rows = [[c.strip() for c in line.split("|")] for line in out.stdout.splitlines() if line.startswith("| tiny-qwen2 |")]
    assert [r[2] for r in rows] == ["hf padded random", "engine", "hf padding-free", "hf padded grouped"]  # IMPLS order
    first_losses = [float(r[-2]) for r in rows]
    assert max(first_losses) - min(first_losses) < 1e-5, first_losses
