"""bench/gpu_check.sh's CPU dry run: every stage it would run on a GPU walks (collect-only) here,
so a typo in the script or an import error in a GPU test or benchmark fails CI, not GPU time."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_walks_every_stage(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1")
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = (tmp_path / "log.txt").read_text() if (tmp_path / "log.txt").exists() else ""
    assert out.returncode == 0, out.stdout + out.stderr + log
    summary = (tmp_path / "summary.md").read_text()
    for stage in ("versions", "gpu-tests", "benchmarks", "multi-process"):
        assert f"| {stage} | ok |" in summary, summary + log
    # the GPU tests and benchmarks were collected, not silently empty
    assert "test_cuda_kernel_vs_float64_real_shape" in log and "test_ceiling_copy_bandwidth" in log
    # two CPU benchmarks ran for real: their records reached bench-progress.jsonl as each
    # finished (NEMOKERN_BENCH_LOG), and the summary tabulates that log
    records = (tmp_path / "bench-progress.jsonl").read_text().splitlines()
    names = sorted(json.loads(line)["name"] for line in records)
    assert names == ["test_sequence_kl_cpu[eager-abs]", "test_sequence_kl_cpu[eager-k3]"], names
    assert "| test_sequence_kl_cpu[eager-k3] |" in summary, summary
