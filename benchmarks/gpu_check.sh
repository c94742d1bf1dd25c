#!/usr/bin/env bash
# One command for a GPU machine (torch, triton, transformers and pytest installed; no network needed):
#   bash benchmarks/gpu_check.sh            OUT=folder QUICK=1 bash benchmarks/gpu_check.sh
# Records the versions it finds, builds kobattr with its CUDA extension (--no-build-isolation --no-deps, for
# this GPU's SM version unless KOBATTR_CUDA_ARCHS says otherwise), runs `kobattr selftest --device cuda`
# (every implementation against the float64 reference on every block structure and attention feature; one
# process per implementation group and dtype, in parallel, so that Triton's compiles share the CPU cores),
# the GPU benchmark, the pair-kernel profile (benchmarks/gpu_profile.py, and ncu's stall reasons where ncu is
# installed), the GPU tests, the key-split sweep and the FF peak memory on the GPU; everything lands
# in $OUT, each step as it finishes, so a run cut short keeps what it found.
# QUICK=1 keeps to float32/bfloat16 self-tests and benchmark sizes 4k, 16k and 64k (a few minutes in all).
set -uo pipefail
cd "$(dirname "$0")/.."
# python -P: the repository root stays off sys.path, where its kernels/ folder would hide Hugging Face's `kernels`
# package that transformers >= 5.25 imports.
OUT=${OUT:-benchmarks/results/gpu_check}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
status=0
started=$(date +%s)
step() { echo "== [$(( $(date +%s) - started )) s] $*" | tee -a "$OUT/steps.txt"; }

step versions
{ nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
  python -P -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('transformers', transformers.__version__)"
  command -v nvcc && nvcc --version | tail -1; } > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

step build
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
export KOBATTR_CUDA_ARCHS=${KOBATTR_CUDA_ARCHS:-${arch:-80;90}}
if ! KOBATTR_BUILD_CUDA=1 timeout ${BUILD_TIMEOUT:-600} python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  echo "build failed (see build.log); the CUDA extension will be reported unavailable" | tee -a "$OUT/steps.txt"; status=1
fi
python -P -m kobattr.cli info > "$OUT/info.txt" 2>&1
grep -i -A3 "cuda\|backend" "$OUT/info.txt" | head -20

step selftest
dtypes=$([ "$QUICK" = 1 ] && echo "float32 bfloat16" || echo "float32 float16 bfloat16")
groups=""  # Triton compiles per dtype: one process each; the compiled implementations share one
for dtype in $dtypes; do groups="$groups triton:$dtype"; done
groups="$groups cuda,torch:$(echo $dtypes | tr ' ' ,)"
for group in $groups; do
  names=${group%%:*} which=${group#*:}
  tag="${names//,/_}_${which//,/_}"
  ( timeout ${SELFTEST_TIMEOUT:-900} python -P -m kobattr.cli selftest --device cuda --verbose --backends "$names" \
      --dtypes "$which" --json "$OUT/selftest_$tag.json" > "$OUT/selftest_$tag.txt" 2>&1
    echo $? > "$OUT/selftest_$tag.rc" ) &
done
wait
for rc in "$OUT"/selftest_*.rc; do
  tag=$(basename "$rc" .rc)
  echo "-- $tag (exit $(cat "$rc"))"; sed -n '/^kobattr selftest on/,$p' "${rc%.rc}.txt"
  [ "$(cat "$rc")" = 0 ] || { status=1; grep -m5 "FAIL\|Error" "${rc%.rc}.txt"; }
done

step benchmark
sizes=$([ "$QUICK" = 1 ] && echo "4096 16384 65536" || echo "1024 4096 16384 65536")
timeout ${BENCH_TIMEOUT:-900} python benchmarks/gpu_bench.py --sizes $sizes --torch-max 16384 \
  --max-seconds ${BENCH_SECONDS:-5} 2>&1 | tee "$OUT/gpu_bench.txt"
cp benchmarks/results/gpu_*.json "$OUT/" 2>/dev/null

step "pair-kernel profile (where the time goes; ncu stall reasons where ncu is installed)"
timeout ${PROFILE_TIMEOUT:-300} python benchmarks/gpu_profile.py 2>&1 | tee "$OUT/gpu_profile.txt"
cp benchmarks/results/gpu_profile_*.json "$OUT/" 2>/dev/null
ncu=$(command -v ncu || ls "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" 2> /dev/null)
if [ -n "$ncu" ]; then
  for layer in llama-7b bert-base; do
    timeout ${NCU_TIMEOUT:-300} "$ncu" --target-processes all --kernel-name regex:_attention_pairs_kernel --launch-skip 1 \
      --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats --section MemoryWorkloadAnalysis \
      python benchmarks/gpu_profile.py --once $layer > "$OUT/ncu_pairs_$layer.txt" 2>&1
    tail -60 "$OUT/ncu_pairs_$layer.txt"
  done
else
  echo "ncu not found: no stall reasons" | tee -a "$OUT/steps.txt"
fi

step "pytest (gpu tests)"
timeout ${PYTEST_TIMEOUT:-900} python -P -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/pytest_gpu.txt"
[ "${PIPESTATUS[0]}" = 0 ] || [ "${PIPESTATUS[0]}" = 5 ] || status=1  # 5: no test selected

step "key-split sweep"
timeout ${SWEEP_TIMEOUT:-600} python benchmarks/gpu_sweep.py 2>&1 | tee "$OUT/gpu_sweep.txt"

step "FF peak memory on the GPU (atblnffres, Llama-7B-shaped layer, one query block)"
timeout ${FF_TIMEOUT:-600} python benchmarks/ff_memory.py --rows first --cuda 16384 65536 2>&1 | tee "$OUT/ff_memory_gpu.txt"
timeout ${FF_TIMEOUT:-600} python benchmarks/ff_memory.py --rows last --cuda 4096 16384 2>&1 | tee -a "$OUT/ff_memory_gpu.txt"

step "done, status $status"
exit $status
