"""bench/gpu_check.sh's CPU dry run: every stage it would run on a GPU walks here with small
shapes (GPU tests and benchmarks collected, a tiny demo, the 2-process CPU all-reduce, two CPU
benchmarks), so a typo in the script, a selection that matches nothing or an import error in a
GPU test or benchmark fails CI, not GPU time."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "versions",
    "install",
    "policy-loss",
    "multi-process",
    "trainers",
    "decode",
    "gpu-tests",
    "bench-new",
    "policy-tune",
    "generate",
)


@pytest.mark.timeout(3000)
def test_gpu_check_dry_run_walks_every_stage(tmp_path):
    out_dir, tar = tmp_path / "out", tmp_path / "check.tgz"
    env = dict(os.environ, GPU_CHECK_DRY="1", GPU_CHECK_TAR=str(tar))
    # the script calls python3: this test's interpreter (its environment need not be activated)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=3000,  # the dry run's budget (540 s x 5) and a margin
    )
    log = (out_dir / "log.txt").read_text() if (out_dir / "log.txt").exists() else ""
    assert out.returncode == 0, out.stdout + out.stderr + log
    summary = (out_dir / "summary.md").read_text()
    # in this order: install, the never-run paths, then the benchmarks
    at = [summary.find(f"| {stage} | ok |") for stage in STAGES]
    assert -1 not in at and at == sorted(at), summary + log
    # every GPU test selection collected something: each never-run path by name
    for name in (
        "test_linear_policy_loss.py::test_triton_on_cuda_real_shapes[2048-4096-128256-dtype1]",
        "test_policy_loss_cublas.py::test_cublas_path_on_cuda_real_shapes",
        "test_cuda_ipc_refuses_capture_and_traps_on_mismatched_sizes",
        "test_cuda_ipc_timeout_traps_instead_of_returning_garbage",
        "test_gpu_cuda_graph_generation_equals_eager",
        "test_cuda_kernel_vs_float64_real_shape",
        "test_generate_gpu[nemokern-256]",
    ):
        assert name in log, name
    # the trainers: per-stage seconds and each trainer's step time and peak memory
    assert (out_dir / "demo" / "summary.json").exists()
    assert "| reinforce | 1 |" in summary and "Demo: sft " in summary, summary
    # two CPU benchmarks ran for real: their records reached bench-progress.jsonl and their test
    # outcomes tests-progress.jsonl as each finished, and the summary tabulates both
    records = (out_dir / "bench-progress.jsonl").read_text().splitlines()
    names = sorted(json.loads(line)["name"] for line in records)
    assert names == ["test_sequence_kl_cpu[eager-abs]", "test_sequence_kl_cpu[eager-k3]"], names
    assert "| test_sequence_kl_cpu[eager-k3] |" in summary, summary
    tests = [
        json.loads(line) for line in (out_dir / "tests-progress.jsonl").read_text().splitlines()
    ]
    assert [(t["stage"], t["outcome"]) for t in tests] == [("bench-new", "passed")] * 2, tests
    assert "| bench-new | 2 | 2 | 0 | 0 | 0 |" in summary, summary
    # linear_policy_loss's path table, written by the tuner's sweep (the all-Triton path and the
    # cuBLAS-chunk path timed) in the form the dispatch reads
    paths = json.loads((out_dir / "policy_loss_paths.json").read_text())["paths"]
    assert paths["cpu"]["float32"]["path"] in ("triton", "cublas"), paths
    assert "linear_policy_loss paths" in summary and "- float32 cublas 16 " in summary, summary
    # what comes back from a GPU machine: one archive, weights left out
    with tarfile.open(tar) as t:
        members = t.getnames()
    assert "./summary.md" in members and "./demo/summary.json" in members
    assert not [m for m in members if m.endswith(".safetensors")]


def test_gpu_tests_pass_on_fake_cuda():
    """The kernels' -m gpu tests, run on the CPU under helpers.FakeCuda at their gpu_small
    shapes: a tensor a test builds on the CPU beside CUDA ones, or a torch call whose signature
    changed, fails here instead of on a GPU (the first H200 run lost 24 of 30 tests to them)."""
    files = [
        "test_linear_policy_loss.py",
        "test_policy_loss_cublas.py",
        "test_linear_logprobs.py",
        "test_logprobs.py",
        "test_sequence_kl.py",
        "test_reward_head.py",
    ]
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts="]
        + ["-m", "gpu", "--fake-cuda"]
        + [str(ROOT / "tests" / f) for f in files],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", out.stdout).group(1))
    assert passed >= 44 and "skipped" not in out.stdout.splitlines()[-1], out.stdout[-2000:]
