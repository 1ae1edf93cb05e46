#!/usr/bin/env bash
# Runs the interpreted kernel tests and the sm_80/sm_90 ahead-of-time compiles under another
# Triton version (default 3.6.0, the GPU machine's), without touching the active environment:
# that Triton (and a numpy its interpreter works with) go to a side directory put first on
# PYTHONPATH. Needs the package registry once for the download.
#   bash bench/triton_side_check.sh [TRITON_VERSION]
# Triton 3.6's interpreter turns scalar kernel arguments into 1-element numpy arrays, which
# numpy >= 2.4 refuses to convert with int(): hence numpy < 2.4 beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:-3.6.0}"
SIDE="${TRITON_SIDE_DIR:-/tmp/nemokern-triton-$VERSION}"
if [[ ! -d "$SIDE/triton" ]]; then
    python -m pip install -q --no-deps --target "$SIDE" "triton==$VERSION" "numpy<2.4"
fi
export PYTHONPATH="$SIDE${PYTHONPATH:+:$PYTHONPATH}"
python -c "import triton, numpy; print('triton', triton.__version__, 'numpy', numpy.__version__)"
python -m nemokern.kernels._aot
python -m pytest -q -p no:cacheprovider tests/test_logprobs.py tests/test_linear_logprobs.py \
    tests/test_linear_policy_loss.py tests/test_policy_loss_cublas.py tests/test_sequence_kl.py \
    tests/test_reward_head.py tests/test_aot.py
