#!/usr/bin/env bash
# Everything a GPU check needs, in one go (docs: README "Tests"; docs/gpu-check.md): install, the
# never-run paths, the benchmarks of new code, then the re-measurements, and a summary. Stages run
# in that order, each under its own time limit and all under one budget, and write their files as
# they go, so a run cut short still leaves usable results.
#
#   bash bench/gpu_check.sh [OUTDIR]      OUTDIR defaults to bench/results/gpu_check
#   GPU_CHECK_BUDGET=540                  seconds for the whole run (stages past it are skipped):
#                                         one 10-minute command with a minute to spare
#   GPU_CHECK_TAR=FILE                    after every stage, OUTDIR (weights left out) as FILE.tgz,
#                                         so a killed command still returns what finished
#   GPU_CHECK_DRY=1                       CPU dry run: every stage walks with small shapes (no
#                                         install, GPU tests and benchmarks collected only, a
#                                         tiny demo, the 2-process CPU all-reduce, two CPU
#                                         benchmarks run), every limit and the budget x5
#                                         (GPU_CHECK_DRY_SCALE): a loaded CI machine's seconds are
#                                         no GPU's, and the walk, not its speed, is checked
#
# Assumes python3 with CUDA torch, triton, pybind11, setuptools, transformers, safetensors, pytest,
# pytest-benchmark and pytest-timeout; downloads nothing. Files in OUTDIR: log.txt (everything,
# with versions, every test's name and outcome as it ends), tests-progress.jsonl (one record per
# test as it ends: stage, test, outcome, seconds), bench-progress.jsonl (every benchmark's record
# as soon as it has run), bench-*.json and generate.json (--benchmark-json, written at the end of
# their stage), all-reduce-cuda.{json,md}, demo/ (the trainers: summary.json, metrics.jsonl per
# trainer), tune-policy.json and policy_loss_paths.json (linear_policy_loss's measured path table:
# copy it to nemokern/kernels/ to use it), summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu_check}"
DRY="${GPU_CHECK_DRY:-0}"
SCALE=1
[[ "$DRY" == 1 ]] && SCALE="${GPU_CHECK_DRY_SCALE:-5}"
BUDGET="${GPU_CHECK_BUDGET:-$((540 * SCALE))}"
TAR="${GPU_CHECK_TAR:-}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/log.txt"
: > "$LOG"
export PYTHONUNBUFFERED=1
export NEMOKERN_BENCH_LOG="$OUT/bench-progress.jsonl" NEMOKERN_TEST_LOG="$OUT/tests-progress.jsonl"
: > "$NEMOKERN_BENCH_LOG"
: > "$NEMOKERN_TEST_LOG"
START=$SECONDS
declare -a SUMMARY=()

# stage NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, budget left), log it, note its status.
# pytest inside gets a per-test timeout 30 s below that (PYTEST_ADDOPTS: start-up and collection
# fit in the rest), so a hung test is reported by name before the stage is killed.
stage() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local t=$((limit < left ? limit : left))
    if ((t < 40)); then
        echo "== $name: SKIPPED (budget spent)" | tee -a "$LOG"
        SUMMARY+=("| $name | skipped (budget) | 0 |")
        return 0
    fi
    local t0=$SECONDS
    echo "== $name (limit ${t}s, at ${t0}s)" | tee -a "$LOG"
    NEMOKERN_TEST_STAGE="$name" PYTEST_ADDOPTS="--timeout=$((t - 30))" \
        timeout -k 10 "$t" "$@" >> "$LOG" 2>&1
    local rc=$?
    local status="ok"
    ((rc == 124 || rc == 137)) && status="TIMED OUT"
    ((rc != 0 && rc != 124 && rc != 137)) && status="failed (rc $rc)"
    echo "== $name: $status in $((SECONDS - t0))s" | tee -a "$LOG"
    SUMMARY+=("| $name | $status | $((SECONDS - t0)) |")
    [[ -n "$TAR" ]] && tar czf "$TAR.tmp" -C "$OUT" --exclude='*.safetensors' --exclude='*.bin' \
        --exclude='*.pt' . 2> /dev/null && mv "$TAR.tmp" "$TAR"
    return 0
}

# -v: each test's name and outcome reach log.txt as it ends; -rA repeats them at the end
PYTEST=(python3 -m pytest -p no:cacheprovider -o addopts= -v -rA)
if [[ "$DRY" == 1 ]]; then
    GPU=(-m gpu --collect-only -qq)
    BENCH=(-m gpu --collect-only -qq)
else
    GPU=(-m gpu)
    BENCH=(-m gpu --benchmark-enable)
fi

stage versions 60 python3 -c "
import platform, torch, triton, transformers
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda,
      'triton', triton.__version__, 'transformers', transformers.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (CPU)')"

# (1) install, and refuse a CPU-only extension: the CUDA all-reduce tests would skip silently
if [[ "$DRY" == 1 ]]; then
    stage install 60 python3 -c "import nemokern._C as C, os
print('dry run: not installed; the CPU extension here has with_cuda =', C.with_cuda)"
else
    # sm_90 only (the GPU at hand): half the nvcc time of the default 80;90
    stage install 240 bash -c "NEMOKERN_CUDA_ARCHS='${NEMOKERN_CUDA_ARCHS:-90}' \
        python3 -m pip install --no-build-isolation --no-deps -e . && python3 -c \"
import nemokern._C as C
assert C.with_cuda, 'nemokern._C was built without CUDA (no nvcc?): the CUDA all-reduce is missing'
print('nemokern._C built with CUDA')\""
fi

# Liger-Kernel (pure Python + Triton), where its wheel was carried in .whl/ (ignored by git):
# the policy-loss benchmark's Liger column
if [[ "$DRY" != 1 ]] && compgen -G ".whl/liger_kernel-*.whl" > /dev/null; then
    stage liger 60 python3 -m pip install -q --no-deps --no-index --target /tmp/nemokern-liger \
        .whl/liger_kernel-*.whl
    export PYTHONPATH="/tmp/nemokern-liger${PYTHONPATH:+:$PYTHONPATH}"
fi

# (2) the never-run paths
# linear_policy_loss against float64 on both CUDA paths, bf16 / fp16 / fp32
stage policy-loss 150 "${PYTEST[@]}" tests/test_linear_policy_loss.py \
    tests/test_policy_loss_cublas.py "${GPU[@]}"
# the CUDA IPC all-reduce across 2 processes on the one GPU: sums, capture refusal and
# mismatched sizes, timeout (the last two trap their processes' CUDA contexts on purpose)
if [[ "$DRY" == 1 ]]; then
    stage multi-process 90 bash -c "${PYTEST[*]} tests/test_all_reduce.py ${GPU[*]} -k cuda_ipc \
        && python3 bench/bench_all_reduce.py --worlds 2 --rounds 1 --sizes 4096 \
        --out '$OUT/all-reduce-cpu'"
else
    stage multi-process 120 "${PYTEST[@]}" tests/test_all_reduce.py "${GPU[@]}" -k cuda_ipc
fi
# every trainer end to end: summary.json (per-stage seconds), metrics.jsonl (step_s, peak_mem_mb)
if [[ "$DRY" == 1 ]]; then
    stage trainers 120 python3 -c "
import dataclasses, nemokern.tools.demo as d
d.QUICK = dataclasses.replace(d.QUICK, sft_rows=32, sft_epochs=1, rm_rows=32, rm_pairs=16,
    heldout_pairs=8, rl_prompts=8, rl_steps=1, prompts_per_step=2, k=2, eval_prompts=2,
    eval_samples=2)
d.run_demo(quick=True, device='cpu', out_dir='$OUT/demo', log=print)"
else
    stage trainers 200 nemokern demo --quick --device cuda --out "$OUT/demo"
fi
# CUDA-graph decoding against eager
stage decode 90 "${PYTEST[@]}" tests/test_generate.py "${GPU[@]}"
# every other GPU test (kernels at real shapes, fp16 included; model parity; attention)
stage gpu-tests 150 "${PYTEST[@]}" tests "${GPU[@]}" --ignore=tests/test_linear_policy_loss.py \
    --ignore=tests/test_policy_loss_cublas.py --ignore=tests/test_all_reduce.py \
    --ignore=tests/test_generate.py --ignore=tests/test_demo.py

# (3) benchmarks of new code: the ceilings, the policy loss, 8B-shaped decoding vs the bandwidth bound
if [[ "$DRY" == 1 ]]; then
    # two small CPU benchmarks for real: their records reach bench-progress.jsonl as they finish
    stage bench-new 90 "${PYTEST[@]}" bench/test_bench_kl_reward.py --benchmark-enable \
        -k "sequence_kl_cpu and eager" --benchmark-json="$OUT/bench-new.json"
    stage policy-tune 90 env TRITON_INTERPRET=1 python3 bench/tune_gpu.py --dry --only policy \
        --table "$OUT/policy_loss_paths.json" --out "$OUT/tune-policy.json"
    # collected only: the tiny shape decodes at ~0.5 s per token on a 2-core CPU in bf16
    stage generate 60 "${PYTEST[@]}" bench/test_bench_generate_gpu.py "${BENCH[@]}"
else
    stage bench-new 150 "${PYTEST[@]}" bench/test_bench_ceilings.py \
        bench/test_bench_policy_loss.py "${BENCH[@]}" --benchmark-json="$OUT/bench-new.json"
    # linear_policy_loss's two CUDA paths timed, the table of the faster written
    stage policy-tune 120 python3 bench/tune_gpu.py --only policy \
        --table "$OUT/policy_loss_paths.json" --out "$OUT/tune-policy.json"
    stage generate 200 "${PYTEST[@]}" bench/test_bench_generate_gpu.py "${BENCH[@]}" \
        --benchmark-json="$OUT/generate.json"
fi

# (4) re-measurements of what run 3 (bench/results/2026-11-30-h200.md) already has
if [[ "$DRY" != 1 ]]; then
    stage bench-rest 200 "${PYTEST[@]}" bench "${BENCH[@]}" --ignore=bench/test_bench_policy_loss.py \
        --ignore=bench/test_bench_generate_gpu.py -k "not compiled" \
        --benchmark-json="$OUT/bench-rest.json"
    stage all-reduce-bench 90 python3 bench/bench_all_reduce.py --device cuda --worlds 2 \
        --rounds 5 --sizes 4096 65536 1048576 16777216 --machine "$(python3 -c \
        'import torch; print(torch.cuda.get_device_name())')" --out "$OUT/all-reduce-cuda"
    stage bench-compiled 240 "${PYTEST[@]}" bench "${BENCH[@]}" \
        --ignore=bench/test_bench_generate_gpu.py -k "compiled or ceiling" \
        --benchmark-json="$OUT/bench-compiled.json"
fi

{
    echo "# gpu_check summary ($(date -u +%Y-%m-%d\ %H:%M) UTC, $((SECONDS - START)) s)"
    echo
    grep -m2 -E "^(python|device) " "$LOG"
    grep -m1 -E "^nemokern._C built|^dry run: not installed" "$LOG"
    echo
    echo "| stage | status | seconds |"
    echo "|---|---|---:|"
    printf '%s\n' "${SUMMARY[@]}"
    echo
    python3 bench/report.py --tests "$NEMOKERN_TEST_LOG"
    [[ -s "$OUT/demo/summary.json" ]] && { echo; python3 bench/report.py --demo "$OUT/demo"; }
    # every benchmark that finished, as it finished (the JSON files are written at a stage's end
    # only); the ceilings of the same run give each its fraction
    [[ -s "$NEMOKERN_BENCH_LOG" ]] && { echo; python3 bench/report.py "$NEMOKERN_BENCH_LOG"; }
    [[ -s "$OUT/all-reduce-cuda.md" ]] && { echo; cat "$OUT/all-reduce-cuda.md"; }
    [[ -s "$OUT/tune-policy.json" ]] && { echo; python3 -c "
import json, sys
print('linear_policy_loss paths (fwd+bwd, fraction of the matmul ceiling counting 6NHV):')
for r in json.load(open(sys.argv[1])).get('policy', []):
    print('-', r['dtype'], r['path'], r['chunk_rows'], r.get('error') or
          f\"{r['ms']:.2f} ms, {r['of_matmul']:.0%}, peak extra {r.get('peak_extra_mib', 0):.0f} MiB\")
" "$OUT/tune-policy.json"; }
} > "$OUT/summary.md" 2>&1
cat "$OUT/summary.md"
[[ -n "$TAR" ]] && tar czf "$TAR" -C "$OUT" --exclude='*.safetensors' --exclude='*.bin' \
    --exclude='*.pt' .
exit 0
