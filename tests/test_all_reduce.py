"""nemokern.parallel.all_reduce: the shared-memory backend across 2, 3 and 4 CPU processes (gloo).

Each test starts the ranks as separate processes (tests/all_reduce_worker.py, env:// like torchrun)
and reuses that one process group for many checks, because starting a process that imports torch
costs seconds. Also: every test checks that no /dev/shm workspace is left behind.
"""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemokern import _C
from nemokern.parallel.all_reduce import SHM_PREFIX, cleanup_stale_segments

WORKER = Path(__file__).with_name("all_reduce_worker.py")
SHM = Path("/dev/shm")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _segments():
    return {p.name for p in SHM.glob(SHM_PREFIX + "*")} if SHM.is_dir() else set()


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1]))
    env.pop("NEMOKERN_CUSTOM_ALLREDUCE", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_ranks(world, scenario, timeout=240, **env):
    """Start `world` ranks of the worker; return [(returncode, output)] by rank."""
    before = _segments()
    port = _free_port()
    procs = []
    for rank in range(world):
        e = _env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, **env)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), scenario], env=e,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            results.append((p.returncode, out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    leftover = _segments() - before
    assert not leftover, f"/dev/shm segments left behind: {sorted(leftover)}"
    return results


def _assert_ok(results):
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"rank {rank} exited with {rc}:\n{out[-4000:]}"


@pytest.mark.parametrize("world", [2, 3, 4])
def test_shm_all_reduce_matches_fixed_order_sum_and_gloo(world):
    results = run_ranks(world, "correctness")
    _assert_ok(results)
    for _, out in results:
        assert "OK fallbacks" in out, out


def test_works_under_torchrun():
    port = _free_port()
    before = _segments()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), str(WORKER), "timeout"]
    p = subprocess.run(cmd, env=_env(NEMOKERN_ALLREDUCE_TIMEOUT=1), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "OK timeout" in p.stdout + p.stderr
    assert not (_segments() - before)


def test_timeout_names_the_collective_three_ranks():
    results = run_ranks(3, "timeout", NEMOKERN_ALLREDUCE_TIMEOUT=1)
    _assert_ok(results)
    assert all("OK timeout" in out for _, out in results[:2])
    assert all("OK mismatch detected" in out for _, out in results)


def test_killed_rank_makes_peer_time_out_and_leaves_no_segment():
    results = run_ranks(2, "killed", NEMOKERN_ALLREDUCE_TIMEOUT=1)
    assert results[1][0] == -signal.SIGKILL, results[1]
    assert results[0][0] == 0, results[0][1][-3000:]
    assert "all_reduce" in results[0][1] and "timed out" in results[0][1]


def test_stale_segment_of_dead_creator_is_removed():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = SHM / f"{SHM_PREFIX}{dead.pid}_deadbeef"
    alive = SHM / f"{SHM_PREFIX}{os.getpid()}_cafe"
    stale.write_bytes(b"x")
    alive.write_bytes(b"x")
    try:
        removed = cleanup_stale_segments()
        assert stale.name in removed and not stale.exists()
        assert alive.exists(), "a live creator's segment must be kept"
    finally:
        for p in (stale, alive):
            p.unlink(missing_ok=True)


def test_single_rank_and_bad_arguments_raise_clear_errors():
    name = f"/{SHM_PREFIX}{os.getpid()}_unit"
    comm = _C.ShmAllReduce(name, rank=0, world_size=1, chunk_bytes=4096, create=True,
                           timeout_s=1.0, one_shot_max_bytes=1024)
    try:
        x = torch.arange(5.0)
        comm.all_reduce(x.data_ptr(), x.numel(), _C.DTYPE_FLOAT32)
        assert torch.equal(x, torch.arange(5.0))  # a world of one: the sum is the input
        with pytest.raises(ValueError, match="dtype code 7"):
            comm.all_reduce(x.data_ptr(), x.numel(), 7)
        with pytest.raises(RuntimeError, match="shm_open"):
            _C.ShmAllReduce(name, rank=0, world_size=1, chunk_bytes=4096, create=True,
                            timeout_s=1.0, one_shot_max_bytes=1024)  # O_EXCL: name exists
        with pytest.raises(ValueError, match="rank 3"):
            _C.ShmAllReduce(name + "x", rank=3, world_size=2, chunk_bytes=4096, create=True,
                            timeout_s=1.0, one_shot_max_bytes=1024)
        with pytest.raises(RuntimeError, match="world size"):
            _C.ShmAllReduce(name, rank=1, world_size=2, chunk_bytes=4096, create=False,
                            timeout_s=1.0, one_shot_max_bytes=1024)
    finally:
        comm.unlink()
    assert not (SHM / name[1:]).exists()


def test_bad_environment_is_named(monkeypatch):
    from nemokern.parallel.all_reduce import max_custom_bytes

    monkeypatch.setenv("NEMOKERN_ALLREDUCE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="NEMOKERN_ALLREDUCE_MAX_BYTES"):
        max_custom_bytes()


@pytest.mark.skipif(not getattr(_C, "with_cuda", False), reason="extension built without CUDA")
def test_cuda_backend_without_a_device_raises_a_clear_error():
    if _C.cuda_device_count() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _C.CudaAllReduce(rank=0, world_size=2, device=0, buffer_bytes=1 << 20, timeout_s=1.0,
                         one_shot_max_bytes=1 << 18)


@pytest.mark.gpu
@pytest.mark.skipif(not getattr(_C, "with_cuda", False), reason="extension built without CUDA")
def test_cuda_ipc_two_processes_share_one_gpu():
    results = run_ranks(2, "cuda", timeout=300)
    _assert_ok(results)
    assert all("OK cuda" in out for _, out in results)
