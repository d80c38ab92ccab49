"""benchmarks/gpu_check.sh --dry-run on CPU: everything the device check does before its first CUDA call.

The device time is scarce and the script runs there unattended, so whatever could fail without a GPU must fail
here: the argument parsing of every step (the bench scripts' choices: a renamed model, implementation or row
name is an error), the wheel discovery, the `ceiling_kernels` link, the imports of every benchmark module and of
the GPU tests (pytest --collect-only), and the model configs bench_sft reads.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.stat().st_size
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("TRITON_INTERPRET", None)  # the script sets 0 itself, as on the device
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    for step in ("losses_7b", "gpu_tests", "losses_1p5b", "bench_sft"):
        assert f"== {step} (timeout" in log and (tmp_path / f"{step}.log").exists(), step
        assert f"== {step} failed" not in log
    # Step order: the table that matters most first.
    assert log.index("== losses_7b") < log.index("== gpu_tests") < log.index("== losses_1p5b")
    device = (tmp_path / "device.txt").read_text()
    assert "ceiling_kernels from /" in device and device.rstrip().endswith("/ceiling_kernels")
    assert (tmp_path / "losses_7b.log").read_text().count("Qwen2.5-7B") == 2 * 6  # CE and GRPO x 6 rows
    assert "torch.compile" not in (tmp_path / "losses_1p5b.log").read_text()
    assert "no CUDA call made" in (tmp_path / "bench_sft.log").read_text()
    collected = (tmp_path / "gpu_tests.log").read_text()
    assert "test_bf16_gpu_error_vs_eager" in collected, collected
    assert not (tmp_path / "RESULTS.new.md").exists() and results.stat().st_size == before


def test_gpu_check_rejects_an_unknown_argument(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dryrun"], cwd=ROOT,
                         env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "usage" in out.stderr
