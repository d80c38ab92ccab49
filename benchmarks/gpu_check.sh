#!/usr/bin/env bash
# The one prepared device check, for a lent H100/H200 (torch and triton preinstalled, no network, no venv):
#   1. bf16 correctness on the GPU (tests marked gpu: the fused loss against float64 and eager bf16),
#   2. bench_losses.py: CE and GRPO at the Qwen2.5-7B and 1.5B head shapes, 16384 tokens, with every anchor
#      installed (ms, x floor, transient GiB, error against float64),
#   3. bench_sft.py: the SFT step table.
# Budget: under 8 minutes in all (each step has its own timeout). The benchmarks append to benchmarks/RESULTS.md
# of the working copy they run in; that file and the logs are copied to $OUT (the device tool brings them back:
# `diff` it against the local RESULTS.md and append the new sections).
#
# Anchors and engine imports that the device image lacks travel as wheels. Here, once, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     liger-kernel cut-cross-entropy math-verify latex2sympy2_extended antlr4-python3-runtime==4.13.2
# then run with carry [".whl"]:   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

# The kernels folder installs as `ceiling_kernels` (setup.py); without an install, a link gives it that name.
site=$(mktemp -d)
ln -s "$PWD/triton_kernels" "$site/ceiling_kernels"
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || true
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +%Y-%m-%dT%H:%MZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/device.txt"

status=0
step() {  # step NAME SECONDS CMD...: run with a timeout, log to $OUT/NAME.log, remember a failure
  local name=$1 secs=$2
  shift 2
  echo "== $name (timeout ${secs}s)"
  timeout "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name failed: rc=$rc"; status=1; }
}

step gpu_tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_linear_loss.py
step bench_losses 240 $PY benchmarks/bench_losses.py
step bench_sft 90 $PY benchmarks/bench_sft.py

cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
exit $status
