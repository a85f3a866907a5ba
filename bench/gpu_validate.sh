#!/usr/bin/env bash
# fastdp's GPU validation: one command, at most 9 minutes on one H100/H200, stages time-boxed, summary printed last.
#
# Where it runs: the device tool's GPU machine (Python 3.12, torch 2.11+cu130, Triton 3.6, nvcc 13.0,
# compute-sanitizer; no package registry), in the repository root of a copy of the working tree of the checkout the
# session was started in (so this script must be committed or present there). fastdp is built there with its CUDA
# kernels; the three wheels the image lacks (dp-accounting, dm-tree, opacus: ../shared/gpu/whl) travel in .gpu/,
# a folder git ignores that the call carries. Once, in that checkout's root:
#
#     echo /.gpu/ >> .git/info/exclude; cp -r ../shared/gpu .gpu
#
# then, through the device tool:
#
#     run(command="bash bench/gpu_validate.sh", carry=[".gpu"], timeout_s=500)
#     run(command="STAGES='norms step' BUDGET=170 bash bench/gpu_validate.sh", carry=[".gpu"], timeout_s=200)  # rerun
#
# Device time is 15 minutes in all, the machine's cold start (1-3 minutes) and idle waits included, and no machine
# starts with under 4 minutes left: the first run's BUDGET (470 s) leaves room for one rerun at once, while the
# machine is warm; size it from status's budget_left_s (BUDGET = budget_left_s - 60, timeout_s 30 s more).
#
# (WHEELS=<folder> names another wheel folder; a shared/gpu/whl inside the checkout travels without carry.)
# Without a GPU: `bash bench/gpu_validate.sh --dry-run` runs the Python stages on the CPU at tiny sizes (Triton in its
# interpreter), which tests/test_gpu_validate.py does so that this script cannot rot; its numbers mean nothing.
#
# Stages in this order; each runs under its own timeout (its maximum, cut to what is left of BUDGET seconds), so one
# hang costs that stage only. The maxima add up to about BUDGET: correctness first, then the targets, then the
# slower checks, which a short budget cuts first:
#   build       fastdp._C with its CUDA kernels (sm_90), in the background from the start
#   tests       the GPU tests of the Triton kernels and backends, while the build runs (TF32 off: exact asserts)
#   tests_cuda  once built: the CUDA kernels' tests, the engine on the triton and cuda backends (TF32 off)
#   norms       each WRN-40-4 conv layer: per-example norm vs its bf16 weight gradient       target <= 1.0x
#   step        WRN-16-4 batch 256 bf16 step: non-private, Opacus, fastdp per backend,       target <= 1.25x
#               with kernel launches per step
#   noisy       the fused noisy step vs device-to-device copy bandwidth                      target >= 80%
#   audit       python -m fastdp.audit --quick --scenario one-step on the cuda and triton backends
#   sanitizer   compute-sanitizer memcheck of every kernel on tiny shapes (bench/gpu_validate.py smoke)
# pytest prints its slowest tests (--durations), so that a first run shows where the time goes.
# Output: the summary (stage exits, PASS/FAIL per target, test counts) last on stdout and in $OUT/summary.txt; all
# logs in $OUT/log.txt; each Python stage's results in $OUT/<stage>.json. bench/gpu_validate.py holds those stages.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; fi
PY=${PYTHON:-python3}
O=${OUT:-/tmp/fastdp-gpu-validate}
LOGS=$(mktemp -d)
mkdir -p "$O"
: > "$O/log.txt"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/fastdp-triton-cache}
export PYTHONPATH="$PWD/bench/plugins${PYTHONPATH:+:$PYTHONPATH}"  # -p tf32_off
BUDGET=${BUDGET:-470}
SLACK=1
if [ "$DRY" = 1 ]; then
  # Triton's interpreter on a shared CPU (CI's) runs the tiny stages slower than a GPU runs the real ones
  BUDGET=${BUDGET_DRY:-780}  # under the test's 900 s
  SLACK=3
  STAGES=${STAGES:-"norms step noisy sanitizer"}
  DRYARG=(--dry-run)
else
  STAGES=${STAGES:-"tests tests_cuda norms step noisy audit sanitizer"}
  DRYARG=()
fi

left() { echo $((BUDGET - SECONDS)); }
note() { echo "[+${SECONDS}s] $*" | tee -a "$LOGS/stages"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

# boxed <max seconds> <name> cmd...: run under timeout min(max, left - 15); the log goes to $LOGS/<name>.log
boxed() {
  local max=$(($1 * SLACK)) name=$2
  shift 2
  local t=$(($(left) - 15))
  if [ "$t" -gt "$max" ]; then t=$max; fi
  if [ "$t" -lt 15 ]; then
    note "SKIP $name (budget spent)"
    return 0
  fi
  note "START $name (timeout ${t}s)"
  local start=$SECONDS
  timeout -k 5 "$t" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  local how="rc=$rc"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then how="TIMEOUT after ${t}s"; fi
  note "END $name $how ($((SECONDS - start))s)"
  { echo "===== $name ($how)"; cat "$LOGS/$name.log"; } >>"$O/log.txt"
  return 0
}

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p tf32_off -rf --timeout 60 --maxfail 30 --durations=8)

# ---- setup: wheels, versions, fastdp importable (without the extension) at once, the extension in the background
if [ "$DRY" = 0 ]; then
  WHEELS=${WHEELS:-}
  for w in .gpu/whl shared/gpu/whl ../shared/gpu/whl; do
    if [ -z "$WHEELS" ] && compgen -G "$w/*.whl" >/dev/null; then WHEELS=$w; fi
  done
  if [ -n "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastdp-site \
      "$WHEELS"/*.whl && export PYTHONPATH="/tmp/fastdp-site:$PYTHONPATH" || note "wheel install FAILED"
  else
    note "no wheels found (.gpu/whl, shared/gpu/whl): opacus and dp-accounting must already be installed"
  fi
  { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader
    nvcc --version | tail -n 1
    "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__)"; } 2>&1 | tee -a "$LOGS/stages"
  FASTDP_SKIP_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$LOGS/install.log" 2>&1 \
    || note "install of fastdp (no extension) FAILED: $(tail -n 3 "$LOGS/install.log")"
  if want tests_cuda || want audit || want step || want noisy || want sanitizer; then
    # FASTDP_REQUIRE_EXT: a compile error fails the build instead of installing without the extension
    ( FASTDP_REQUIRE_EXT=1 FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 timeout 300 \
        "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . >"$LOGS/build.log" 2>&1
      echo "build rc=$?" >>"$LOGS/build.log" ) &
    BUILD=$!
    note "START build (background, timeout 300s)"
  fi
fi

# ---- correctness first: the Triton kernels' GPU tests need no extension, so they run during the build
if [ "$DRY" = 1 ]; then
  for s in tests tests_cuda; do if want $s; then note "SKIP $s (dry run: the CPU suite is CI's)"; fi; done
else
  want tests && boxed 100 tests "${PYTEST[@]}" tests/test_kernels_triton.py tests/test_backends.py \
    tests/test_data_augment.py --deselect tests/test_kernels_triton.py::test_kernels_compile_for_sm90
  if [ -n "${BUILD:-}" ]; then
    wait "$BUILD"
    note "END build: $(grep -E '^build rc' "$LOGS/build.log")"
    { echo "===== build"; tail -n 60 "$LOGS/build.log"; } >>"$O/log.txt"
  fi
  "$PY" -c "from fastdp import _ext, backends; print('fastdp._C cpu', _ext.cpu_available(), 'cuda', \
_ext.cuda_compiled(), 'backends', backends.available_backends(), _ext.IMPORT_ERROR or '')" 2>&1 | tee -a "$LOGS/stages"
  want tests_cuda && boxed 80 tests_cuda "${PYTEST[@]}" tests/test_kernels_cpp.py tests/test_fake_ops.py \
    tests/test_engine_kernels.py tests/test_optim.py tests/test_shifted_gram.py
fi

# ---- the targets
want norms && boxed 60 norms "$PY" bench/gpu_validate.py norms ${DRYARG[@]+"${DRYARG[@]}"}
want step && boxed 110 step "$PY" bench/gpu_validate.py step ${DRYARG[@]+"${DRYARG[@]}"}
want noisy && boxed 30 noisy "$PY" bench/gpu_validate.py noisy ${DRYARG[@]+"${DRYARG[@]}"}

# ---- the installed mechanism, audited (one scenario: the quick settings' three take minutes with a GPU's launches)
if [ "$DRY" = 1 ]; then
  if want audit; then note "SKIP audit (dry run: CI runs it on the CPU)"; fi
else
  want audit && boxed 45 audit "$PY" -m fastdp.audit --quick --scenario one-step --backend cuda --backend triton
fi

# ---- memcheck: compile every kernel first (the Triton cache), then check their accesses; without torch's caching
# allocator every tensor is its own allocation, so an access past a tensor's end is outside any allocation
if want sanitizer; then
  if [ "$DRY" = 1 ]; then
    boxed 120 sanitizer "$PY" bench/gpu_validate.py smoke --dry-run
  elif command -v compute-sanitizer >/dev/null 2>&1; then
    boxed 30 smoke "$PY" bench/gpu_validate.py smoke
    # memory accesses only: an API call's error status (an event query that says "not ready") is not one
    boxed 60 sanitizer env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
      --report-api-errors no --print-limit 20 "$PY" bench/gpu_validate.py smoke
  else
    note "SKIP sanitizer: compute-sanitizer is not on PATH"
  fi
fi

# ---- summary, last
{
  echo
  echo "==================== fastdp GPU validation summary$([ "$DRY" = 1 ] && echo ' (DRY RUN: numbers mean nothing)')"
  grep -E "START|END|SKIP|FAILED|fastdp._C|torch|NVIDIA|release" "$LOGS/stages" | grep -v "^\[.*START"
  for f in "$LOGS"/*.log; do
    name=$(basename "$f" .log)
    case $name in install | build) continue ;; esac
    grep -E "^RESULT|^SKIP|^FAIL|[0-9]+ (passed|failed)|^ERROR|ERROR SUMMARY|Traceback|VIOLATION|MISMATCH|BAD" "$f" \
      | sed "s/^/$name: /" | tail -n 60
  done
  echo "targets: $(cat "$LOGS"/*.log | grep -c '^RESULT.* PASS$') PASS, $(cat "$LOGS"/*.log | grep -c '^RESULT.* FAIL$') FAIL"
  echo "full logs: $O/log.txt; results: $O/*.json; $((SECONDS))s in all"
} | tee "$O/summary.txt"
rm -rf "$LOGS"
