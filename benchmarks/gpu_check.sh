#!/usr/bin/env bash
# The GPU check in one call, at most 8 minutes on one H100 (torch, triton, transformers and pytest installed; no
# network needed):
#   bash benchmarks/gpu_check.sh              OUT=folder LONG=1 EXTRA=1 DRY_RUN=1 bash benchmarks/gpu_check.sh
# Steps, each with its own time limit, its exit status recorded in $OUT/steps.txt and the script going on when
# one fails (a step that would start past the deadline is skipped and recorded as such):
#   versions                                                           ~5 s
#   build: pip install -e . with the CUDA extension for this GPU's SM  ~45 s   (limit BUILD_TIMEOUT=150)
#   GPU tests: pytest -m gpu, one process per test (the self-test      ~140 s  (limit PYTEST_TIMEOUT=200)
#     against the float64 reference per dtype, a model on the GPU)
#   tuner: kobattr tune for the Llama-7B and BERT-base shapes at 512,  ~90 s   (limit TUNE_TIMEOUT=100 each)
#     4k and 16k (every primitive); the cache lands in $OUT/cache
#   kobattr bench with the tuned winners (KOBATTR_TUNE=1), bfloat16:   ~150 s  (limit BENCH_TIMEOUT=120 each)
#     attnresln_n full maps at 4k and 16k; the FF maps (atbffresln / atblnffres) whole at 512 and their last
#     FF_ROWS=16 rows at 4k and 16k; each beside SDPA forward and the bf16 GEMM rate on the same shapes
# LONG=1 adds 64k to the attention and FF-rows runs (about 2 more minutes); EXTRA=1 then runs the older studies
# (gpu_bench.py, gpu_profile.py with ncu, gpu_sweep.py, ff_memory.py), outside the 8-minute budget.
# DEADLINE (seconds, default 470; 580 with LONG=1) bounds the whole run. DRY_RUN=1 prints each step's command and runs nothing.
# Everything lands in $OUT (default benchmarks/results/gpu_check_<date>), each step as it finishes, so a run cut
# short keeps what it found: steps.txt, versions.txt, build.log, info.txt, pytest_gpu.txt, tune_*.txt,
# bench_*.txt and bench_*.json, cache/tuning.json; with ARCHIVE=file.tar.gz also packed into that one file after
# every step (on the device tool: OUT=/tmp/gc ARCHIVE=$OUT/gpu_check.tar.gz bash benchmarks/gpu_check.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check_$(date -u +%Y-%m-%d)}
LONG=${LONG:-0} EXTRA=${EXTRA:-0} DRY_RUN=${DRY_RUN:-0}
DEADLINE=${DEADLINE:-$([ "$LONG" = 1 ] && echo 580 || echo 470)}
FF_ROWS=${FF_ROWS:-16}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 KOBATTR_CACHE_DIR="$OUT/cache"
status=0
started=$(date +%s)
elapsed() { echo $(( $(date +%s) - started )); }
note() { echo "== [$(elapsed) s] $*" | tee -a "$OUT/steps.txt"; }

# step NAME LIMIT LOG COMMAND...: run COMMAND with output to $OUT/LOG (and the terminal), within LIMIT seconds and
# what is left of DEADLINE; record its exit status; never stop the script
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local left=$(( DEADLINE - $(elapsed) ))
  if [ "$left" -lt 15 ]; then note "$name: skipped, $left s left of the ${DEADLINE} s deadline"; status=1; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  note "$name (limit $limit s): $*"
  if [ "$DRY_RUN" = 1 ]; then return; fi
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note "$name: TIMED OUT after $limit s" || note "$name: exit $rc"
  [ "$rc" = 0 ] || status=1
  pack
}
# ARCHIVE=file.tar.gz: $OUT packed into one file after every step (the device tool brings back only a few files)
pack() { [ -z "${ARCHIVE:-}" ] || tar czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")"; }

KOBATTR="python -P -m kobattr.cli"  # -P: the root's kernels/ would hide Hugging Face's kernels package

note "gpu_check into $OUT (LONG=$LONG EXTRA=$EXTRA DEADLINE=$DEADLINE s)"
if [ "$DRY_RUN" != 1 ]; then
  { nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
    python -P -c "import sys, torch, triton, transformers; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print('transformers', transformers.__version__)"
    command -v nvcc && nvcc --version | tail -1; } > "$OUT/versions.txt" 2>&1
  cat "$OUT/versions.txt"
fi

arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
export KOBATTR_CUDA_ARCHS=${KOBATTR_CUDA_ARCHS:-${arch:-80;90}}
step build "${BUILD_TIMEOUT:-150}" build.log env KOBATTR_BUILD_CUDA=1 python -m pip install --no-build-isolation --no-deps -e .
[ "$DRY_RUN" = 1 ] || { $KOBATTR info > "$OUT/info.txt" 2>&1; grep -i -A3 "cuda\|backend" "$OUT/info.txt" | head -20; }

# one process per test: Triton's compiles for each dtype then share the CPU cores
parallel=$(python -P -c "import xdist" 2>/dev/null && echo "-n 4" || echo "")
step "GPU tests" "${PYTEST_TIMEOUT:-200}" pytest_gpu.txt python -P -m pytest -q -m gpu tests -p no:cacheprovider $parallel

lengths="4096,16384" ff_lengths="4096,16384"
[ "$LONG" = 1 ] && lengths="$lengths,65536" ff_lengths="$ff_lengths,65536"
for model in llama-7b bert-base; do  # 512 too: the FF maps' whole-map bench
  step "tune $model" "${TUNE_TIMEOUT:-100}" "tune_$model.txt" $KOBATTR tune --device cuda --model $model --lengths 512,$lengths
done
[ "$DRY_RUN" = 1 ] || cp "$KOBATTR_CACHE_DIR/tuning.json" "$OUT/tuning.json" 2>/dev/null

export KOBATTR_TUNE=1  # the winners just measured (a workload the tuner has not seen is tuned first, untimed)
bench() {  # bench TAG MODEL LENGTHS METHOD [OPTIONS]
  local tag=$1 model=$2 lens=$3 method=$4; shift 4
  step "bench $tag" "${BENCH_TIMEOUT:-120}" "bench_$tag.txt" $KOBATTR bench --device cuda --model $model \
    --lengths $lens --methods $method --max-seconds 3 --json "$OUT/bench_$tag.json" "$@"
}
# in the order of the issue's goals, so that a deadline cuts the least important last
bench llama_attn llama-7b $lengths attnresln_n
bench bert_attn bert-base $lengths attnresln_n
bench llama_ff llama-7b 512 atblnffres
bench llama_ff_rows llama-7b $ff_lengths atblnffres --rows "$FF_ROWS"
bench bert_ff bert-base 512 atbffresln
bench bert_ff_rows bert-base $ff_lengths atbffresln --rows "$FF_ROWS"

if [ "$EXTRA" = 1 ]; then  # the older studies, beyond the 8-minute budget
  DEADLINE=$(( $(elapsed) + ${EXTRA_SECONDS:-1500} ))
  step "gpu_bench" 600 gpu_bench.txt python -P benchmarks/gpu_bench.py --sizes 4096 16384 --torch-max 16384 --max-seconds 3
  step "pair-kernel profile" 300 gpu_profile.txt python -P benchmarks/gpu_profile.py
  ncu=$(command -v ncu || ls "${CUDA_HOME:-/usr/local/cuda}/bin/ncu" 2> /dev/null)
  for layer in llama-7b bert-base; do
    [ -n "$ncu" ] && step "ncu $layer" 300 "ncu_pairs_$layer.txt" "$ncu" --target-processes all \
      --kernel-name regex:_attention_pairs_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis python -P benchmarks/gpu_profile.py --once $layer
  done
  step "key-split sweep" 600 gpu_sweep.txt python -P benchmarks/gpu_sweep.py
  step "FF peak memory" 600 ff_memory_gpu.txt python -P benchmarks/ff_memory.py --rows first --cuda 16384 65536
  [ "$DRY_RUN" = 1 ] || cp benchmarks/results/gpu_*.json "$OUT/" 2>/dev/null
fi

if [ "$DRY_RUN" != 1 ]; then  # the bench tables last, where the tail of the output shows them
  for f in "$OUT"/bench_*.txt; do [ -f "$f" ] && grep -v "^bench:" "$f" | grep -v "^vs SDPA" | tail -8; done
fi
note "done in $(elapsed) s, status $status"
[ "$DRY_RUN" = 1 ] || pack
exit $status
