#!/usr/bin/env bash
# One-shot GPU check for a lent CUDA machine (see DEVELOPERS.md): build the CUDA extension, run the real
# CUDA/Triton tests, run the op benchmarks on the GPU. Logs and results go to $OUT (or ./gpu-check-out).
# Each stage has its own time limit; a failed build stops the script early.
set -u
OUT=${OUT:-$PWD/gpu-check-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
BUILD_S=${BUILD_S:-240}; TEST_S=${TEST_S:-150}; BENCH_S=${BENCH_S:-170}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
nvcc --version | tail -1; nproc
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} timeout $BUILD_S \
  $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1
rc=$?; echo "== build rc=$rc in $(( $(date +%s) - t0 )) s"
if [ $rc -ne 0 ]; then grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1; fi
$PY -m minitron.info 2>&1 | tee "$OUT/info.txt"
t0=$(date +%s)
timeout $TEST_S $PY -m pytest -q -n ${XDIST:-6} -p no:cacheprovider tests/gpu tests/kernels \
  --junitxml="$OUT/junit.xml" >"$OUT/tests.log" 2>&1
echo "== tests rc=$? in $(( $(date +%s) - t0 )) s"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | head -60
# BENCH_FILTERS: ';'-separated case-id substrings (default: every case of the chosen benchmarks)
filters=(); IFS=';' read -ra fs <<<"${BENCH_FILTERS:-}"; for f in "${fs[@]}"; do [ -n "$f" ] && filters+=(--filter "$f"); done
t0=$(date +%s)
timeout $BENCH_S $PY -m benchmarks --device cuda --only ${BENCH_ONLY:-kl,fused_linear_kl,importance,slicing} \
  --inprocess --no-plots --repeats ${REPEATS:-20} --max-time ${MAX_TIME:-4} --results-dir "$OUT/bench" "${filters[@]}" ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
echo "== bench rc=$? in $(( $(date +%s) - t0 )) s"
tail -5 "$OUT/bench.log"
