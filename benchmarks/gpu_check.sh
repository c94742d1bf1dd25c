#!/usr/bin/env bash
# One command for a GPU machine (torch, triton, transformers and pytest installed; no network needed):
#   bash benchmarks/gpu_check.sh            OUT=folder QUICK=1 bash benchmarks/gpu_check.sh
# Records the versions it finds, builds kobattr with its CUDA extension (--no-build-isolation --no-deps),
# runs `kobattr selftest --device cuda` (every implementation against the float64 reference on every block
# structure and attention feature), the GPU tests, and the GPU benchmark; everything lands in $OUT.
# QUICK=1 keeps to float32/bfloat16 self-tests and two benchmark sizes (a few minutes in all).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
status=0
step() { echo "== $*" | tee -a "$OUT/steps.txt"; }

step versions
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('transformers', transformers.__version__)"
  command -v nvcc && nvcc --version | tail -1; } > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

step build
if ! KOBATTR_BUILD_CUDA=1 timeout ${BUILD_TIMEOUT:-600} python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "build failed (see build.log); the CUDA extension will be reported unavailable" | tee -a "$OUT/steps.txt"; status=1
fi
python -m kobattr.cli info > "$OUT/info.txt" 2>&1

step selftest
dtypes=$([ "$QUICK" = 1 ] && echo "--dtypes float32,bfloat16" || echo "")
timeout ${SELFTEST_TIMEOUT:-900} python -m kobattr.cli selftest --device cuda --verbose $dtypes --json "$OUT/selftest.json" 2>&1 | tee "$OUT/selftest.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

if [ "$QUICK" != 1 ]; then
  step "pytest (gpu tests)"
  timeout 900 python -m pytest -q -m gpu tests 2>&1 | tail -30 | tee "$OUT/pytest_gpu.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || [ "${PIPESTATUS[0]}" = 5 ] || status=1  # 5: no test selected
fi

step benchmark
sizes=$([ "$QUICK" = 1 ] && echo "4096 16384" || echo "1024 4096 16384 65536")
timeout ${BENCH_TIMEOUT:-900} python benchmarks/gpu_bench.py --sizes $sizes 2>&1 | tee "$OUT/gpu_bench.txt"
cp benchmarks/results/gpu_*.json "$OUT/" 2>/dev/null
step "done, status $status"
exit $status
