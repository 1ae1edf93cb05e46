#!/usr/bin/env bash
# Everything a GPU check needs, in one go (../shared/docs/gpu.md): install, GPU tests, benchmarks
# with the two ceilings, and a markdown table. Assumes python3 with CUDA torch, triton, pybind11,
# setuptools, transformers, safetensors, pytest, pytest-benchmark; downloads nothing.
#   bash bench/gpu_check.sh [OUTDIR]     (default: bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
mkdir -p "$OUT"
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
STAMP="$(date -u +%Y-%m-%d)-${GPU}"
python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -1
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/$STAMP-versions.txt"
python3 -m pytest -m gpu -q tests 2>&1 | tee "$OUT/$STAMP-tests.txt" || true
python3 -m pytest -m gpu bench --benchmark-enable --benchmark-json="$OUT/$STAMP.json" -q 2>&1 | tail -5 || true
python3 bench/report.py "$OUT/$STAMP.json" > "$OUT/$STAMP.md" && cat "$OUT/$STAMP.md"
