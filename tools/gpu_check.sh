#!/usr/bin/env bash
# The one-shot GPU check for a lent CUDA machine (docs/gpu/README.md): the single script a session runs there,
# through the device tool that copies the repository (plus the ignored .whl/ folder) to the GPU machine.
#
#   1. environment: GPU, torch/Triton/nvcc versions; stops cleanly ("no GPU", exit 3) without a CUDA device
#   2. wheels: liger-kernel, trl, accelerate from .whl/ (tools/fetch_gpu_wheels.sh, run beforehand on a machine
#      with a package index; the GPU machine has none) into /tmp/site, put first on PYTHONPATH
#   3. build the CUDA extension in place (a failed build stops the script)
#   4. tests: pytest tests/gpu tests/kernels (real CUDA C++ and compiled Triton against fp64 references)
#   5. benchmarks on the GPU: slicing (every default case) and importance (group_size=1 cases + block influence)
#
# Everything stays under a total wall-clock budget (TOTAL_S, default 470 s, under the 8 minutes a session
# gives it); each step has its own limit as well, cut to what is left of the total, so a hang cannot eat the
# budget. At most 8 files are written, all directly in $OUT with plain names:
#   summary.txt build.log wheels.log tests.log junit.xml bench.log bench.jsonl bench.md
#
# Usage: bash tools/gpu_check.sh [--dry-run]      (--dry-run: print the steps and their limits, run nothing)
# Knobs (environment): OUT, PYTHON, TOTAL_S, BUILD_S, TEST_S, BENCH_S, XDIST (pytest-xdist workers; 0 = off),
#   TESTS (pytest paths), TEST_ARGS (extra pytest arguments), BENCH_ONLY, BENCH_FILTERS (';'-separated case-id substrings; any match runs),
#   BENCH_PROVIDERS, REPEATS, MAX_TIME, BENCH_ARGS, TORCH_CUDA_ARCH_LIST, MAX_JOBS.
set -u
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-470}
BUILD_S=${BUILD_S:-150}; TEST_S=${TEST_S:-130}; BENCH_S=${BENCH_S:-210}
TESTS=${TESTS:-tests/gpu tests/kernels tests/ops/test_hidden_loss.py tests/ops/test_kl_vocab_size.py tests/ops/test_grouped_importance.py tests/ops/test_slicing_3d.py}
# the CPU emulations of the CUDA kernels (tests/gpu/test_*_emulated.py) already run on CPU machines: not here
TEST_ARGS=${TEST_ARGS:--k "not emulated"}
BENCH_ONLY=${BENCH_ONLY:-slicing,importance}
BENCH_FILTERS=${BENCH_FILTERS:-gather_slices;compact_;group_size=1,mask=False;block_influence}
BENCH_PROVIDERS=${BENCH_PROVIDERS:-minitron-cuda,minitron-triton,torch-index_select,torch-eager}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
# limit NAME DEFAULT_S: the step's limit, cut to the time left (minus 5 s for the wrap-up)
limit() {
  local l; l=$(( $(left) - 5 )); [ "$2" -lt "$l" ] && l=$2
  echo $(( l > 1 ? l : 1 ))
}
# step NAME DEFAULT_S LOG CMD...: run CMD under its limit with output in LOG; echo rc and duration
step() {
  local name=$1 def=$2 log=$3; shift 3
  local lim; lim=$(limit "$name" "$def")
  if [ "$DRY" = 1 ]; then
    say "[dry-run] $name (limit ${lim} s, log $(basename "$log")): $*"
    return 0
  fi
  if [ "$(left)" -le 10 ]; then say "== $name skipped: total budget spent"; return 124; fi
  local t0; t0=$(date +%s)
  timeout --kill-after=5 "$lim" "$@" >"$log" 2>&1
  local rc=$?
  say "== $name rc=$rc in $(( $(date +%s) - t0 )) s (limit $lim s)$([ $rc -eq 124 ] && echo ': TIMED OUT')"
  return $rc
}

say "# gpu_check $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?') total budget ${TOTAL_S} s"

# 1. environment; stop cleanly without a GPU
if [ "$DRY" = 1 ]; then
  say "[dry-run] environment: nvidia-smi; $PY -c 'import torch, triton' (versions); nvcc --version; stop here (exit 3) when torch.cuda.is_available() is False"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1 | tee -a "$SUMMARY"
  (nvcc --version 2>&1 | tail -1; echo "cores $(nproc)") | tee -a "$SUMMARY"
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    say "no GPU: torch.cuda.is_available() is False here; stopping before the build (nothing else to check)"
    exit 3
  fi
fi

# 2. wheels (no package index on the GPU machine): install what .whl/ carries, no dependency resolution
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  say "== wheels: .whl/ is empty or missing (run tools/fetch_gpu_wheels.sh and carry .whl); liger/trl providers and tests will be unavailable"
else
  step wheels 60 "$OUT/wheels.log" "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "${wheels[@]}"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  if [ "$DRY" = 0 ]; then
    for mod in liger_kernel trl accelerate transformers; do
      $PY -c "import $mod; print('  import $mod', getattr($mod, '__version__', '?'))" 2>&1 | tail -1 | tee -a "$SUMMARY" "$OUT/wheels.log"
    done
  fi
fi

# 3. build the CUDA extension in place
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}
if ! step build "$BUILD_S" "$OUT/build.log" "$PY" setup.py build_ext --inplace; then
  [ "$DRY" = 0 ] && { grep -E "error|Error" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; } | tee -a "$SUMMARY"
  say "build failed: stopping"
  exit 1
fi
[ "$DRY" = 0 ] && $PY -m minitron.info 2>&1 | tail -30 | tee -a "$SUMMARY"

# 4. tests (pytest-xdist when the machine has it)
xdist=()
if [ "${XDIST:-6}" != 0 ] && $PY -c "import xdist" >/dev/null 2>&1; then xdist=(-n "${XDIST:-6}"); fi
# shellcheck disable=SC2086
eval "test_args=($TEST_ARGS)"
step tests "$TEST_S" "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider "${xdist[@]}" "${test_args[@]}" $TESTS \
  --junitxml="$OUT/junit.xml"
[ "$DRY" = 0 ] && grep -E "^(FAILED|ERROR)|passed|failed|error" "$OUT/tests.log" | tail -40 | tee -a "$SUMMARY"

# 5. benchmarks (results under /tmp, copied to two plain files)
filters=()
IFS=';' read -ra fs <<<"$BENCH_FILTERS"
for f in "${fs[@]}"; do [ -n "$f" ] && filters+=(--filter "$f"); done
rm -rf /tmp/gpu-check-bench
# shellcheck disable=SC2086
step bench "$BENCH_S" "$OUT/bench.log" "$PY" -m benchmarks --device cuda --only "$BENCH_ONLY" --inprocess --no-plots \
  --providers "$BENCH_PROVIDERS" --repeats "${REPEATS:-20}" --max-time "${MAX_TIME:-3}" \
  --results-dir /tmp/gpu-check-bench "${filters[@]}" ${BENCH_ARGS:-}
if [ "$DRY" = 0 ]; then
  for f in /tmp/gpu-check-bench/*.jsonl; do cp "$f" "$OUT/bench.jsonl"; done
  for f in /tmp/gpu-check-bench/*-latest.md; do cp "$f" "$OUT/bench.md"; done
  grep -E "^\[|machine limits" "$OUT/bench.log" | tail -60 | tee -a "$SUMMARY"
fi
say "# done in $(( $(date +%s) - START )) s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
