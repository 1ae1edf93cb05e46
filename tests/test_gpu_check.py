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


def test_benchmark_records_are_logged_as_they_finish(tmp_path):
    """NEMOKERN_BENCH_LOG (set by gpu_check.sh): each benchmark's record is appended when it has
    run, so a stage killed by its time limit keeps what finished; report.py reads the log."""
    log = tmp_path / "progress.jsonl"
    env = dict(os.environ, NEMOKERN_BENCH_LOG=str(log))
    cmd = ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
    sel = ["bench/test_bench_kl_reward.py", "-k", "sequence_kl_cpu and eager", "--benchmark-enable"]
    run = subprocess.run(cmd + sel, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    records = [json.loads(line) for line in log.read_text().splitlines()]
    names = sorted(r["name"] for r in records)
    assert names == ["test_sequence_kl_cpu[eager-abs]", "test_sequence_kl_cpu[eager-k3]"], names
    assert all(r["stats"]["median"] > 0 and r["extra_info"]["device"] for r in records)
    table = subprocess.run(
        ["python", "bench/report.py", str(log)], cwd=ROOT, capture_output=True, text=True
    )
    assert table.returncode == 0 and "test_sequence_kl_cpu[eager-k3]" in table.stdout, table
