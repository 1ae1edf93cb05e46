#!/usr/bin/env bash
# Everything a GPU check needs, in one go (docs: README "Tests"): install, the GPU
# correctness tests, the ceilings and benchmarks, register counts, multi-process checks, and a
# summary. Stages run in priority order, each under its own time limit and all under one budget,
# and write their files as they go, so a run cut short still leaves usable results.
#
#   bash bench/gpu_check.sh [OUTDIR]      OUTDIR defaults to bench/results/gpu_check
#   GPU_CHECK_BUDGET=480                  seconds for the whole run (stages past it are skipped)
#   GPU_CHECK_DRY=1                       CPU dry run: no install, collect every GPU test and
#                                         benchmark, run two CPU benchmarks and the CPU all-reduce
#                                         bench tiny, summarise
#
# Assumes python3 with CUDA torch, triton, pybind11, setuptools, transformers, safetensors, pytest
# and pytest-benchmark; downloads nothing. Files in OUTDIR: log.txt (everything, with versions),
# tests.xml, tests-trainers.xml, bench.json, bench-compiled.json, resources.json,
# all-reduce-cuda.json, generate.json, bench-progress.jsonl (every benchmark's record as soon as it
# has run: what a stage cut short by its limit had finished), summary.md.
#
# Order: correctness, then what no run has measured yet (the policy-loss kernels in `benchmarks`,
# the trainers on the GPU, decoding against the bandwidth bound), then re-measurements of what
# run 3 (bench/results/2026-11-30-h200.md) already has: multi-process, resources, compiled.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu_check}"
DRY="${GPU_CHECK_DRY:-0}"
BUDGET="${GPU_CHECK_BUDGET:-480}"
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1
export NEMOKERN_BENCH_LOG="$OUT/bench-progress.jsonl"
: > "$NEMOKERN_BENCH_LOG"
START=$SECONDS
declare -a SUMMARY=()

# stage NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, budget left), log it, note its status
stage() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local t=$((limit < left ? limit : left))
    if ((t < 15)); then
        echo "== $name: SKIPPED (budget spent)" | tee -a "$LOG"
        SUMMARY+=("| $name | skipped (budget) | 0 |")
        return 0
    fi
    local t0=$SECONDS
    echo "== $name (limit ${t}s, at ${t0}s)" | tee -a "$LOG"
    timeout -k 10 "$t" "$@" >> "$LOG" 2>&1
    local rc=$?
    local status="ok"
    ((rc == 124 || rc == 137)) && status="TIMED OUT"
    ((rc != 0 && rc != 124 && rc != 137)) && status="failed (rc $rc)"
    echo "== $name: $status in $((SECONDS - t0))s" | tee -a "$LOG"
    SUMMARY+=("| $name | $status | $((SECONDS - t0)) |")
}

PYTEST=(python3 -m pytest -p no:cacheprovider -o addopts= --timeout=300)
if [[ "$DRY" == 1 ]]; then
    GPU_SEL=(-m gpu --collect-only -q)
    TRAIN_SEL=("${GPU_SEL[@]}")
    BENCH_SEL=(-m gpu --collect-only -q)
else
    GPU_SEL=(-m gpu -q -rA --junitxml="$OUT/tests.xml")
    TRAIN_SEL=(-m gpu -q -rA --junitxml="$OUT/tests-trainers.xml")
    BENCH_SEL=(-m gpu -q --benchmark-enable)
fi

stage versions 60 python3 -c "
import platform, torch, triton, transformers
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'triton', triton.__version__, 'transformers', transformers.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)')"
if [[ "$DRY" != 1 ]]; then
    # sm_90 only (the GPU at hand): half the nvcc time of the default 80;90
    stage install 240 env NEMOKERN_CUDA_ARCHS="${NEMOKERN_CUDA_ARCHS:-90}" \
        python3 -m pip install --no-build-isolation --no-deps -e .
fi
# (1) correctness: every kernel and op against float64 at real shapes (multi-process ones later)
stage gpu-tests 180 "${PYTEST[@]}" tests "${GPU_SEL[@]}" -k "not cuda_ipc and not demo_on_cuda"
# (2) ceilings and nemokern vs eager first; torch.compile (slow to warm up) after
stage benchmarks 200 "${PYTEST[@]}" bench "${BENCH_SEL[@]}" -k "not compiled and not generate_gpu" \
    --benchmark-json="$OUT/bench.json"
if [[ "$DRY" != 1 ]]; then
    # (3) the trainers end to end on the GPU (`nemokern demo --quick --device cuda`): every
    # trainer, the kernels under autocast, the CUDA-graph decode step
    stage trainers 240 "${PYTEST[@]}" tests/test_demo.py "${TRAIN_SEL[@]}" -k demo_on_cuda
fi
# (4) decoding an 8B-shaped model at batch 1-256 against the bandwidth bound
stage generate 300 "${PYTEST[@]}" bench/test_bench_generate_gpu.py "${BENCH_SEL[@]}" \
    --benchmark-json="$OUT/generate.json"
# (5) multi-process: 2 ranks sharing the one GPU (correctness; one GPU cannot show speed-up)
if [[ "$DRY" == 1 ]]; then
    # two small CPU benchmarks for real: their records reach bench-progress.jsonl as they finish
    stage bench-log 120 "${PYTEST[@]}" bench/test_bench_kl_reward.py -q --benchmark-enable \
        -k "sequence_kl_cpu and eager"
    stage multi-process 120 python3 bench/bench_all_reduce.py --worlds 2 --rounds 1 \
        --sizes 4096 --out "$OUT/all-reduce-cpu"
else
    # the CUDA IPC all-reduce: sums, then capture refusal, mismatched sizes and a timeout
    # (each of the last two traps its processes' CUDA contexts on purpose)
    stage multi-process 120 "${PYTEST[@]}" -q -rA tests/test_all_reduce.py -m gpu -k cuda_ipc
    stage all-reduce-bench 90 python3 bench/bench_all_reduce.py --device cuda --worlds 2 \
        --rounds 5 --sizes 4096 65536 1048576 16777216 --machine "$(python3 -c \
        'import torch; print(torch.cuda.get_device_name())')" --out "$OUT/all-reduce-cuda"
    stage resources 60 python3 -m nemokern.kernels._aot --resources "$OUT/resources.json"
    stage bench-compiled 240 "${PYTEST[@]}" bench "${BENCH_SEL[@]}" \
        -k "(compiled or ceiling) and not generate_gpu" --benchmark-json="$OUT/bench-compiled.json"
fi

{
    echo "# gpu_check summary ($(date -u +%Y-%m-%d\ %H:%M) UTC, $((SECONDS - START)) s)"
    echo
    grep -m2 -E "^(python|device) " "$LOG"
    echo
    echo "| stage | status | seconds |"
    echo "|---|---|---:|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    echo "Test outcomes:"
    grep -E "^(FAILED|ERROR) |^[0-9]+ (passed|failed|tests? collected)|(passed|failed|error).* in [0-9.]+s" "$LOG" || true
    for j in "$OUT"/bench*.json "$OUT"/generate.json; do
        [[ -s "$j" ]] && { echo; python3 bench/report.py "$j"; }
    done
    if [[ -s "$NEMOKERN_BENCH_LOG" ]] && { [[ "$DRY" == 1 ]] || grep -q "TIMED OUT" <<< "${SUMMARY[*]}"; }; then
        echo
        echo "Every benchmark that finished, as it finished (a stage timed out, or a dry run):"
        python3 bench/report.py "$NEMOKERN_BENCH_LOG"
    fi
    [[ -s "$OUT/all-reduce-cuda.md" ]] && { echo; cat "$OUT/all-reduce-cuda.md"; }
} > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
