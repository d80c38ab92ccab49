#!/usr/bin/env bash
# The one prepared device check, for a lent H100/H200 (torch and triton preinstalled, no network, no venv).
# Steps, most important first (each row of a table is printed and appended the moment it is measured, so a
# timeout loses only the rows not reached):
#   1. bench_losses at the Qwen2.5-7B head (16384 tokens, bf16): the fused loss against the cuBLAS floor,
#      Liger, CCE, eager and torch.compile, CE and GRPO, with errors against float64        (<= 200 s)
#   2. bf16 correctness on the GPU (tests marked gpu: the fused loss against float64 and eager bf16) (<= 60 s)
#   3. bench_losses at the Qwen2.5-1.5B head, without torch.compile                           (<= 70 s)
#   4. bench_sft: Qwen2.5-0.5B, HF padded baseline, the engine, HF padding-free (Liger), 3 steps (<= 70 s)
# Budget: the whole script, started on a bare machine, ends within GPU_CHECK_BUDGET seconds (default 420, i.e.
# 7 of the 8 minutes): each step's timeout is cut to what is left, and a step with under 20 s left is skipped.
# The tables go to $OUT/RESULTS.new.md (new sections only: append them to benchmarks/RESULTS.md), logs to
# $OUT/NAME.log; both are on $OUT from their first line, so they come back however the run ends.
#
#   bash benchmarks/gpu_check.sh              # on the device (run with carry [".whl"] when wheels travel)
#   bash benchmarks/gpu_check.sh --dry-run    # on CPU: everything before the first CUDA call (tests/test_gpu_check.py)
# --dry-run does the wheel install, the `ceiling_kernels` mapping and each step's argument parsing and imports
# (bench scripts with --dry-run, pytest with --collect-only), writes no table, and makes no CUDA call.
#
# Anchors and engine imports that the device image lacks travel as wheels. Here, once, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     liger-kernel cut-cross-entropy math-verify latex2sympy2_extended antlr4-python3-runtime==4.13.2
set -uo pipefail
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-420}
DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
RESULTS_NEW="$OUT/RESULTS.new.md"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

# The kernels folder installs as `ceiling_kernels` (setup.py); without an install, a link gives it that name.
site=$(mktemp -d)
ln -s "$PWD/triton_kernels" "$site/ceiling_kernels"
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "wheels: $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || true
else
  echo "wheels: none in .whl/"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u +%Y-%m-%dT%H:%MZ
  if [ "$DRY" -eq 0 ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  $PY -c "import torch, triton, ceiling_kernels; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.version.cuda); print('ceiling_kernels from', ceiling_kernels.__path__[0])"
} 2>&1 | tee "$OUT/device.txt"
# Without a CUDA torch every step would fail on its import: say so once and stop.
if [ "$DRY" -eq 0 ] && ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  echo "== no CUDA device for $PY (torch missing or built without CUDA; set PYTHON=...): nothing run" \
    | tee -a "$OUT/device.txt"
  exit 1
fi

status=0
step() {  # step NAME SECONDS CMD...: run within min(SECONDS, budget left), log to $OUT/NAME.log
  local name=$1 secs=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START) - 5))
  [ "$secs" -le "$left" ] || secs=$left
  if [ "$secs" -lt 20 ]; then
    echo "== $name skipped: ${left}s of the ${BUDGET}s budget left"
    status=1
    return
  fi
  echo "== $name (timeout ${secs}s, $((SECONDS - START))s elapsed)"
  timeout -k 5 "$secs" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name failed: rc=$rc"; status=1; }
}

if [ "$DRY" -eq 1 ]; then
  BENCH=(--dry-run)
  PYTEST=(--collect-only)
else
  BENCH=(--results "$RESULTS_NEW")
  PYTEST=()
fi
step losses_7b 200 $PY benchmarks/bench_losses.py --model Qwen2.5-7B "${BENCH[@]}"
step gpu_tests 60 $PY -m pytest -q -m gpu -p no:cacheprovider "${PYTEST[@]}" tests/test_linear_loss.py
step losses_1p5b 70 $PY benchmarks/bench_losses.py --model Qwen2.5-1.5B --skip "torch.compile(eager)" "${BENCH[@]}"
step bench_sft 70 $PY benchmarks/bench_sft.py --model-config configs/models/qwen2.5-0.5b.json --steps 3 --warmup 1 \
  --impl "hf padded random" engine "hf padding-free" "${BENCH[@]}"

echo "== done in $((SECONDS - START))s, status $status"
exit $status
