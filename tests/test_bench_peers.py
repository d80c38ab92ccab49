"""benchmarks/bench_peers.py runs (--quick, CPU) where TRL is installed (`pip install '.[peers]'`): the peer table in
benchmarks/RESULTS.md depends on it. Every SFT row trains the same weights on the same rows in the same order, so
the script itself stops unless TRL's per-step losses agree with the engine's; here the table it appends is read
back and checked: its rows, its columns, the loss agreement and the op counts."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

pytest.importorskip("trl", reason="TRL is the optional peer of this benchmark: pip install '.[peers]'")


def table(text: str, first_header: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for ln in lines[start + 2:]:
        if ln.startswith(f"| {first_header} |"):
            break
        rows.append(dict(zip(header, (c.strip() for c in ln.strip("|").split("|")), strict=True)))
    return rows


def test_bench_peers_quick(tmp_path):
    from bench_peers import COLUMNS, LOSS_TOL, OPS_COLUMNS

    results = tmp_path / "RESULTS.md"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_peers.py"), "--quick", "--results",
                          str(results)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = results.read_text()
    assert text.startswith("\n## Peers: ceiling-engine against TRL") and "trl: " in text and "torch: " in text
    main = table(text, "work")
    assert list(main[0]) == [h for _, h, _ in COLUMNS]
    assert [(r["work"], r["tool"]) for r in main] == [
        ("SFT", "ceiling-engine"), ("SFT", "TRL SFTTrainer padded"), ("SFT", "TRL SFTTrainer padding_free"),
        ("GRPO", "ceiling-engine hf"), ("GRPO", "TRL GRPOTrainer")]
    for r in main:
        assert float(r["s/step"]) > 0 and int(r["aten ops/step"].replace(",", "")) > 0
    for r in main[1:3]:  # the script checked it before reporting; the table says by how much
        assert float(r["max loss diff"]) <= LOSS_TOL and r["engine vs TRL"].endswith("x tokens/s")
    for r in main[3:]:
        assert float(r["generation s"]) > 0 and float(r["new tokens/step"]) > 0
    ops = table(text.split("aten ops of the counted step by phase")[1], "work")
    assert list(ops[0]) == [h for _, h, _ in OPS_COLUMNS] and len(ops) == len(main)
    for r in ops:
        phases = [int(r[p].replace(",", "")) for p in ("forward", "loss", "backward", "optimizer", "other")]
        assert sum(phases) == int(r["total (no generation)"].replace(",", "")) and min(phases[:4]) > 0
    assert "- SFT tokens/s at 1 thread(s) >= 1.2x TRL padded" in text
