"""pytest-benchmark wrapper of bench/bench_all_reduce.py (which starts the ranks itself).

    python -m pytest bench/test_bench_all_reduce.py --benchmark-enable

The benchmarked function is one whole multi-process run (so its time includes starting the
ranks); the numbers that matter, per-size latencies of the shared-memory path and of gloo, go to
extra_info. peak_extra_bytes is the /dev/shm workspace each rank maps, which bench/common.py
cannot see (it is not torch memory).
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("bench_all_reduce.py")
SIZES = [4 << 10, 64 << 10, 1 << 20, 16 << 20]


@pytest.mark.parametrize("world", [2, 4])
def test_bench_shm_all_reduce_vs_gloo(benchmark, tmp_path, world):
    out = tmp_path / f"all_reduce_{world}"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--worlds",
        str(world),
        "--rounds",
        "3",
        "--machine",
        "pytest run",
        "--out",
        str(out),
        "--sizes",
        *map(str, SIZES),
    ]

    def run():
        subprocess.run(cmd, check=True, capture_output=True, timeout=600)
        return json.loads(out.with_suffix(".json").read_text())

    report = benchmark.pedantic(run, rounds=1, iterations=1)
    rows = report["results"][str(world)]
    chunk = 4 << 20  # NEMOKERN_SHM_CHUNK_BYTES default: 2 parities per rank
    benchmark.extra_info.update(
        device=f"CPU ({report['cpus']} cores)",
        torch=torch.__version__,
        peak_extra_bytes=2 * chunk * world,
        latency_us={r["bytes"]: (round(r["nemokern_us"], 1), round(r["gloo_us"], 1)) for r in rows},
    )
    for r in rows:  # the custom path must never lose to gloo
        assert r["nemokern_us"] < r["gloo_us"], r


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    sys.exit(pytest.main([__file__, "--benchmark-enable"]))
