"""nemokern.parallel.all_reduce: the shared-memory backend across 2, 3 and 4 CPU processes (gloo).

Each test starts the ranks as separate processes (tests/all_reduce_worker.py, env:// like torchrun)
and reuses that one process group for many checks, because starting a process that imports torch
costs seconds. Also: every test checks that no /dev/shm workspace is left behind.
"""

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from helpers import free_port, run_script_ranks
from nemokern import _C
from nemokern.parallel import all_reduce as _front  # noqa: F401 (the function; module below)
from nemokern.parallel.all_reduce import SHM_PREFIX, cleanup_stale_segments

ar = sys.modules["nemokern.parallel.all_reduce"]

WORKER = Path(__file__).with_name("all_reduce_worker.py")
SHM = Path("/dev/shm")


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
    results = run_script_ranks(WORKER, world, scenario, env=_env(**env), timeout=timeout)
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
    port = free_port()
    before = _segments()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        str(WORKER),
        "timeout",
    ]
    p = subprocess.run(
        cmd, env=_env(NEMOKERN_ALLREDUCE_TIMEOUT=1), capture_output=True, text=True, timeout=240
    )
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


def _aged(path, seconds=3600):
    """Back-date a file's mtime: the cleanup leaves segments younger than its grace period."""
    past = time.time() - seconds
    os.utime(path, (past, past))


def _hold_lock(path):
    """A live process (another pid, as a creator in another container would be) holding the
    creator's flock on `path`; returns once the lock is taken."""
    code = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_stale_segment_cleanup_judges_liveness_by_lock_not_pid():
    # pids in names mean nothing across pid namespaces: a name may carry a live pid of an
    # unrelated process (here our own) while its creator is dead, or a dead pid while its
    # creator lives in another namespace. Only the creator's flock tells.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = SHM / f"{SHM_PREFIX}{os.getpid()}_0rphan"  # live pid, nobody holds the lock
    held = SHM / f"{SHM_PREFIX}{dead.pid}_4e1d"  # dead pid, a live holder
    young = SHM / f"{SHM_PREFIX}{dead.pid}_y0un6"  # unlocked, but just created
    for p in (orphan, held, young):
        p.write_bytes(b"x")
    _aged(orphan)
    _aged(held)
    holder = _hold_lock(held)
    try:
        removed = cleanup_stale_segments()
        assert orphan.name in removed and not orphan.exists(), "a dead creator's segment stays"
        assert held.exists() and held.name not in removed, "a live creator's segment was removed"
        assert young.exists(), "a segment younger than the grace period was removed"
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
        assert held.name in cleanup_stale_segments() and not held.exists()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        for p in (orphan, held, young):
            p.unlink(missing_ok=True)


def _unshare_pid_namespace():
    """The command prefix that runs a program as pid 1 of a new pid namespace, or None."""
    cmd = ["unshare", "--pid", "--fork", "--kill-child"]
    if os.geteuid() != 0:
        cmd.append("--map-root-user")
    try:
        probe = subprocess.run(
            cmd + ["sh", "-c", "echo $$"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return cmd if probe.returncode == 0 and probe.stdout.strip() == "1" else None


def test_segment_of_a_creator_in_another_pid_namespace():
    # A rank in a container: its pid there is 1, which is alive in every namespace, so a pid
    # test would keep its segment forever. The creator's flock tells the truth both ways.
    prefix = _unshare_pid_namespace()
    if prefix is None:
        pytest.skip("cannot create a pid namespace here (unshare)")
    code = (
        "import os, sys; from nemokern import _C; "
        "name = f'/{sys.argv[1]}{os.getpid()}_ns{sys.argv[2]}'; "
        "c = _C.ShmAllReduce(name, rank=0, world_size=2, chunk_bytes=4096, create=True, "
        "timeout_s=1.0, one_shot_max_bytes=1024); print(name, flush=True); sys.stdin.read()"
    )
    creator = subprocess.Popen(
        prefix + [sys.executable, "-c", code, SHM_PREFIX, str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    path = None
    try:
        name = creator.stdout.readline().strip()
        assert name == f"/{SHM_PREFIX}1_ns{os.getpid()}", name  # pid 1 inside its namespace
        path = SHM / name[1:]
        _aged(path)
        assert name[1:] not in cleanup_stale_segments() and path.exists(), "live creator"
        creator.kill()  # unshare --kill-child: the creator dies with it, its segment stays
        creator.wait()
        deadline = time.monotonic() + 10
        while name[1:] not in cleanup_stale_segments():
            assert time.monotonic() < deadline, "the dead creator's segment was never removed"
            time.sleep(0.1)
        assert not path.exists()
    finally:
        if creator.poll() is None:
            creator.kill()
            creator.wait()
        if path is not None:
            path.unlink(missing_ok=True)


def test_creator_holds_the_lock_until_unlink():
    name = f"/{SHM_PREFIX}{os.getpid()}_lock"
    comm = _C.ShmAllReduce(
        name,
        rank=0,
        world_size=2,
        chunk_bytes=4096,
        create=True,
        timeout_s=1.0,
        one_shot_max_bytes=1024,
    )
    path = SHM / name[1:]
    try:
        _aged(path)
        assert name[1:] not in cleanup_stale_segments() and path.exists()
    finally:
        comm.unlink()
    assert not path.exists()


def test_single_rank_and_bad_arguments_raise_clear_errors():
    name = f"/{SHM_PREFIX}{os.getpid()}_unit"
    comm = _C.ShmAllReduce(
        name,
        rank=0,
        world_size=1,
        chunk_bytes=4096,
        create=True,
        timeout_s=1.0,
        one_shot_max_bytes=1024,
    )
    try:
        x = torch.arange(5.0)
        comm.all_reduce(x.data_ptr(), x.numel(), _C.DTYPE_FLOAT32)
        assert torch.equal(x, torch.arange(5.0))  # a world of one: the sum is the input
        with pytest.raises(ValueError, match="dtype code 7"):
            comm.all_reduce(x.data_ptr(), x.numel(), 7)
        with pytest.raises(RuntimeError, match="shm_open"):
            _C.ShmAllReduce(
                name,
                rank=0,
                world_size=1,
                chunk_bytes=4096,
                create=True,
                timeout_s=1.0,
                one_shot_max_bytes=1024,
            )  # O_EXCL: name exists
        with pytest.raises(ValueError, match=f"world_size must be in 1..{_C.MAX_RANKS}"):
            _C.ShmAllReduce(
                name + "x",
                rank=0,
                world_size=_C.MAX_RANKS + 1,
                chunk_bytes=4096,
                create=True,
                timeout_s=1.0,
                one_shot_max_bytes=1024,
            )
        with pytest.raises(ValueError, match="rank 3"):
            _C.ShmAllReduce(
                name + "x",
                rank=3,
                world_size=2,
                chunk_bytes=4096,
                create=True,
                timeout_s=1.0,
                one_shot_max_bytes=1024,
            )
        with pytest.raises(RuntimeError, match="world size"):
            _C.ShmAllReduce(
                name,
                rank=1,
                world_size=2,
                chunk_bytes=4096,
                create=False,
                timeout_s=1.0,
                one_shot_max_bytes=1024,
            )
    finally:
        comm.unlink()
    assert not (SHM / name[1:]).exists()


def test_bad_environment_is_named(monkeypatch):
    from nemokern.parallel.all_reduce import max_custom_bytes

    monkeypatch.setenv("NEMOKERN_ALLREDUCE_MAX_BYTES", "lots")
    with pytest.raises(ValueError, match="NEMOKERN_ALLREDUCE_MAX_BYTES"):
        max_custom_bytes()


def _fake_extension(monkeypatch):
    """The extension as a CUDA build sees it, so that the CUDA decisions run on any build."""
    fake = types.SimpleNamespace(
        with_cuda=True,
        MAX_RANKS=_C.MAX_RANKS,
        DTYPE_FLOAT32=_C.DTYPE_FLOAT32,
        DTYPE_BFLOAT16=_C.DTYPE_BFLOAT16,
    )
    monkeypatch.setattr(ar, "_extension", lambda: fake)


@pytest.mark.parametrize("capturing", [False, True])
def test_cuda_graph_capture_sends_cuda_tensors_to_torch_distributed(monkeypatch, capturing):
    _fake_extension(monkeypatch)
    monkeypatch.delenv("NEMOKERN_CUSTOM_ALLREDUCE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    cuda = torch.device("cuda", 0)
    for dtype in (torch.float32, torch.bfloat16):
        assert ar._custom_kind(cuda, dtype, 4096) == (None if capturing else "cuda")
    # CPU tensors never ask (torch.cuda may not work at all on a CPU machine)
    monkeypatch.setattr(
        torch.cuda,
        "is_current_stream_capturing",
        lambda: pytest.fail("capture query for a CPU tensor"),
    )
    assert ar._custom_kind(torch.device("cpu"), torch.float32, 4096) == "shm"


def _fake_group(monkeypatch, world, cuda_comm=None):
    state = types.SimpleNamespace(
        world=world,
        single_host=lambda: True,
        _comms={"cuda": cuda_comm},
        comm=lambda kind, device: pytest.fail(f"{kind} workspace set up for {world} ranks"),
    )
    state.raise_if_cuda_failed = types.MethodType(ar._GroupState.raise_if_cuda_failed, state)
    monkeypatch.setattr(ar.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(ar, "_state", lambda group: state)


def test_groups_above_the_extension_rank_limit_use_torch_distributed(monkeypatch):
    monkeypatch.delenv("NEMOKERN_CUSTOM_ALLREDUCE", raising=False)
    _fake_group(monkeypatch, _C.MAX_RANKS + 1)
    assert ar._custom_comm(torch.ones(4), None) is None


def test_recorded_cuda_failure_raises_before_any_cuda_call(monkeypatch):
    class TrappedComm:  # what the extension holds after a kernel recorded a mismatch and trapped
        def raise_if_failed(self):
            raise ValueError("rank 0 reduces 100 elements ... rank 1 reduces 101 of dtype code 0")

    _fake_extension(monkeypatch)
    _fake_group(monkeypatch, 2, cuda_comm=TrappedComm())
    monkeypatch.setattr(
        torch.cuda,
        "is_current_stream_capturing",
        lambda: pytest.fail("a CUDA query after the trap"),
    )
    cuda_tensor = types.SimpleNamespace(
        is_cuda=True,
        device=torch.device("cuda", 0),
        dtype=torch.float32,
        numel=lambda: 4,
        element_size=lambda: 4,
    )
    with pytest.raises(ValueError, match="reduces 100 elements"):
        ar._custom_comm(cuda_tensor, None)


@pytest.mark.skipif(not getattr(_C, "with_cuda", False), reason="extension built without CUDA")
def test_cuda_backend_without_a_device_raises_a_clear_error():
    if _C.cuda_device_count() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        _C.CudaAllReduce(
            rank=0,
            world_size=2,
            device=0,
            buffer_bytes=1 << 20,
            timeout_s=1.0,
            one_shot_max_bytes=1 << 18,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not getattr(_C, "with_cuda", False), reason="extension built without CUDA")
def test_cuda_ipc_two_processes_share_one_gpu():
    results = run_ranks(2, "cuda", timeout=300)
    _assert_ok(results)
    assert all("OK cuda" in out for _, out in results)


@pytest.mark.gpu
@pytest.mark.skipif(not getattr(_C, "with_cuda", False), reason="extension built without CUDA")
def test_cuda_ipc_refuses_capture_and_traps_on_mismatched_sizes():
    results = run_ranks(2, "cuda_errors", timeout=120, NEMOKERN_ALLREDUCE_TIMEOUT=5)
    _assert_ok(results)
    assert all("OK capture refused" in out and "OK mismatch trapped" in out for _, out in results)


@pytest.mark.gpu
@pytest.mark.skipif(not getattr(_C, "with_cuda", False), reason="extension built without CUDA")
def test_cuda_ipc_timeout_traps_instead_of_returning_garbage():
    results = run_ranks(2, "cuda_timeout", timeout=120, NEMOKERN_ALLREDUCE_TIMEOUT=1)
    _assert_ok(results)
    assert "OK timeout trapped" in results[0][1]
