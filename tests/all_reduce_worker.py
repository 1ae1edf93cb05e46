"""One rank of the multi-process all-reduce tests (tests/test_all_reduce.py starts it).

Started like torchrun starts ranks (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the env), with
the scenario as argv[1]. Every rank can rebuild every rank's input from the seeds, so it checks
its result against a locally computed fixed-order reference without extra communication. Any
failed check raises, and the non-zero exit code fails the test. Prints "OK <what>" lines.
"""

import hashlib
import importlib
import os
import sys
import time
import warnings

import torch
import torch.distributed as dist

from helpers import leave_group
from nemokern.parallel import all_reduce

# the package exports the function under the module's name: fetch the module itself
ar = importlib.import_module("nemokern.parallel.all_reduce")

DTYPES = (torch.float32, torch.bfloat16)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}


def inputs(numel, dtype, world, seed, integer_valued=False):
    """Every rank's input [world, numel], identical on all ranks."""
    out = []
    for r in range(world):
        g = torch.Generator().manual_seed(seed * 1000 + r)
        if integer_valued:
            x = torch.randint(-64, 65, (numel,), generator=g).to(dtype)
        else:
            x = (torch.randn(numel, generator=g) * (1 + 3 * r)).to(dtype)
        out.append(x)
    return out


def fixed_order_sum(xs):
    """((x_0 + x_1) + x_2) + ... in fp32, rounded once to the input dtype."""
    acc = xs[0].float().clone()
    for x in xs[1:]:
        acc += x.float()
    return acc.to(xs[0].dtype)


def same_on_all_ranks(t):
    digest = hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    assert len(set(digests)) == 1, f"ranks disagree bitwise: {digests}"


def check_once(numel, dtype, seed, world, rank):
    xs = inputs(numel, dtype, world, seed)
    ref = fixed_order_sum(xs)
    got = all_reduce(xs[rank].clone())
    assert torch.equal(
        got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
        ref.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
    ), (
        f"numel={numel} {dtype}: not bitwise the fixed-order sum, max diff "
        f"{(got.double() - ref.double()).abs().max().item()}"
    )
    same_on_all_ranks(got)
    # gloo sums in its own order (and bf16 in bf16), so on random floats "equal to gloo" can only
    # mean: within both orders' rounding error of each other, and no less accurate vs float64.
    exact = sum(x.double() for x in xs)
    gloo = xs[rank].clone()
    dist.all_reduce(gloo)
    u = UNIT_ROUNDOFF[dtype]
    abs_sum = sum(x.double().abs() for x in xs)
    bound = (2 * world * u) * abs_sum + 1e-30
    assert ((got.double() - gloo.double()).abs() <= bound).all(), (
        f"numel={numel} {dtype}: far from gloo"
    )
    plain = xs[0].clone()  # the same-dtype PyTorch sum: rounds after every add for bf16
    for x in xs[1:]:
        plain = plain + x
    err_got = (got.double() - exact).abs().max().item()
    err_plain = (plain.double() - exact).abs().max().item()
    err_gloo = (gloo.double() - exact).abs().max().item()
    assert err_got <= 2 * max(err_plain, err_gloo) + 1e-30, (
        numel,
        dtype,
        err_got,
        err_plain,
        err_gloo,
    )
    # integer-valued floats sum exactly in any order: here gloo and we must agree bit for bit
    ints = inputs(numel, dtype, world, seed + 7, integer_valued=True)
    a, b = ints[rank].clone(), ints[rank].clone()
    all_reduce(a)
    dist.all_reduce(b)
    assert torch.equal(a, b), f"numel={numel} {dtype}: integer-valued sums differ from gloo"


def scenario_correctness(rank, world):
    comm = ar._state(None).comm("shm", None)  # WORLD: default chunk (4 MiB), one-shot up to 256 KiB
    sizes = [
        1,
        2,
        3,
        15,
        16,
        17,
        63,
        1000,
        4097,
        65537,
        65536 + world,
        262143,
        1_000_003,
        1_572_869,
    ]  # the last: 6 MiB of fp32 = two chunks of reduce-scatter + all-gather
    for dtype in DTYPES:
        for i, n in enumerate(sizes):
            check_once(n, dtype, seed=i, world=world, rank=rank)
    print(f"OK sizes fp32/bf16 up to {sizes[-1]} elements", flush=True)
    assert comm.steps > 0, "the custom path was never taken"

    # a second group with tiny chunks: many reduce-scatter/all-gather chunks on small data
    os.environ["NEMOKERN_SHM_CHUNK_BYTES"] = "4096"
    os.environ["NEMOKERN_ALLREDUCE_ONE_SHOT_BYTES"] = "1024"
    small = dist.new_group(list(range(world)))
    small_comm = ar._state(small).comm("shm", None)
    assert small_comm.chunk_bytes == 4096
    for dtype in DTYPES:
        for i, n in enumerate([5, 255, 256, 257, 1023, 1025, 4097, 30001]):
            xs = inputs(n, dtype, world, seed=100 + i)
            got = all_reduce(xs[rank].clone(), group=small)
            assert torch.equal(got, fixed_order_sum(xs)), f"chunked numel={n} {dtype}"
    print("OK chunked two-shot", flush=True)

    # flag reuse: many back-to-back calls, alternating one-shot/two-shot and sizes
    for it in range(300):
        n = (1, 37, 300, 5000)[it % 4]
        xs = inputs(n, torch.float32, world, seed=1000 + it)
        got = all_reduce(xs[rank].clone(), group=small if it % 3 == 0 else None)
        assert torch.equal(got, fixed_order_sum(xs)), f"loop iteration {it}"
    print("OK 300 calls in a loop", flush=True)

    # non-contiguous input: reduced through a copy, result written back into the view
    base = inputs(6 * 9, torch.float32, world, seed=5000)
    views = [b.view(6, 9)[:, ::2] for b in base]
    mine = base[rank].clone().view(6, 9)[:, ::2]
    all_reduce(mine)
    assert torch.equal(mine, fixed_order_sum([v.contiguous() for v in views]))
    print("OK non-contiguous", flush=True)

    # fallbacks to gloo: unsupported dtype, over the threshold, switched off
    steps = comm.steps
    for dtype in (torch.float64, torch.float16, torch.int64):
        xs = inputs(33, dtype, world, seed=6000, integer_valued=True)
        got = all_reduce(xs[rank].clone())
        assert torch.equal(got, sum(xs[1:], xs[0].clone())), f"fallback {dtype}"
    os.environ["NEMOKERN_ALLREDUCE_MAX_BYTES"] = "64"
    xs = inputs(17, torch.float32, world, seed=7000, integer_valued=True)
    assert torch.equal(all_reduce(xs[rank].clone()), fixed_order_sum(xs)), "over the threshold"
    os.environ.pop("NEMOKERN_ALLREDUCE_MAX_BYTES")
    os.environ["NEMOKERN_CUSTOM_ALLREDUCE"] = "0"
    x = torch.ones(5)
    all_reduce(x)
    assert torch.equal(x, torch.full((5,), float(world)))
    os.environ.pop("NEMOKERN_CUSTOM_ALLREDUCE")
    assert comm.steps == steps, "a fallback case went through the custom path"
    print("OK fallbacks", flush=True)

    # a workspace that cannot be set up: every rank warns and falls back together
    os.environ["NEMOKERN_SHM_CHUNK_BYTES"] = "100"
    broken = dist.new_group(list(range(world)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = all_reduce(torch.ones(7), group=broken)
    assert torch.equal(x, torch.full((7,), float(world)))
    assert any("chunk_bytes" in str(w.message) for w in caught), [str(w.message) for w in caught]
    os.environ.pop("NEMOKERN_SHM_CHUNK_BYTES")
    print("OK setup failure falls back", flush=True)


def scenario_cuda(rank, world):
    """All ranks share GPU 0 through CUDA IPC (the gpu-marked test)."""
    torch.cuda.set_device(0)
    for dtype in DTYPES:
        for i, n in enumerate([1, 3, 17, 1000, 4097, 65537, 1_000_003]):  # last: two-shot
            xs = inputs(n, dtype, world, seed=200 + i)
            got = all_reduce(xs[rank].cuda()).cpu()
            assert torch.equal(got, fixed_order_sum(xs)), f"cuda numel={n} {dtype}"
            same_on_all_ranks(got)
    buf = torch.zeros(1001, device="cuda")  # a view 4 bytes past an aligned address
    xs = inputs(1000, torch.float32, world, seed=300)
    buf[1:] = xs[rank].cuda()
    all_reduce(buf[1:])
    assert torch.equal(buf[1:].cpu(), fixed_order_sum(xs)), "misaligned output"
    for it in range(200):
        xs = inputs(333, torch.bfloat16, world, seed=400 + it)
        assert torch.equal(all_reduce(xs[rank].cuda()).cpu(), fixed_order_sum(xs)), f"loop {it}"
    comm = ar._state(None).comm("cuda", torch.device("cuda", 0))
    assert comm is not None and comm.error_code() == 0
    dist.barrier()
    print("OK cuda", flush=True)


def _assert_unreadable(t, what):
    """The result of a failed CUDA all-reduce must not be readable: its kernel trapped."""
    try:
        t.cpu()
    except RuntimeError:
        return
    raise AssertionError(f"{what} handed back its result")


def scenario_cuda_errors(rank, world):
    """CUDA path failures never hand back a result (gpu-marked test, both ranks on GPU 0)."""
    from nemokern import _C

    torch.cuda.set_device(0)
    x = torch.ones(64, device="cuda")
    all_reduce(x)  # sets the IPC workspace up
    assert torch.equal(x.cpu(), torch.full((64,), float(world)))
    comm = ar._state(None).comm("cuda", torch.device("cuda", 0))
    # capture: the front end picks torch.distributed, the extension refuses to be captured
    graph, y = torch.cuda.CUDAGraph(), torch.ones(16, device="cuda")
    refused = None
    with torch.cuda.graph(graph):
        assert ar._custom_kind(y.device, y.dtype, 64) is None, "custom path while capturing"
        try:
            comm.all_reduce(
                y.data_ptr(), y.numel(), _C.DTYPE_FLOAT32, torch.cuda.current_stream().cuda_stream
            )
        except RuntimeError as exc:
            refused = str(exc)
    assert refused and "CUDA graph" in refused, refused
    print("OK capture refused", flush=True)
    dist.barrier()
    # different sizes on the ranks: every rank's kernel traps; the result cannot be read and
    # every rank raises a ValueError naming both sizes
    z = torch.ones(100 + rank, device="cuda")
    later = torch.ones(4, device="cuda")  # allocated now: after the trap no CUDA call works
    comm.all_reduce(
        z.data_ptr(), z.numel(), _C.DTYPE_FLOAT32, torch.cuda.current_stream().cuda_stream
    )
    _assert_unreadable(z, "a mismatched CUDA all-reduce")
    assert comm.error_code() == 2
    for attempt in (comm.raise_if_failed, lambda: all_reduce(later)):
        try:
            attempt()
        except ValueError as exc:
            assert "reduces 100" in str(exc) and "101" in str(exc), str(exc)
        else:
            raise AssertionError("a recorded mismatch was not raised")
    print("OK mismatch trapped", flush=True)
    dist.barrier()
    os._exit(0)  # the CUDA context is gone: skip CUDA teardown


def scenario_cuda_timeout(rank, world):
    """The last rank skips one CUDA all-reduce: the others' kernels trap after the timeout."""
    torch.cuda.set_device(0)
    all_reduce(torch.ones(64, device="cuda"))
    comm = ar._state(None).comm("cuda", torch.device("cuda", 0))
    if rank != world - 1:
        x, later = torch.ones(64, device="cuda"), torch.ones(4, device="cuda")
        all_reduce(x)
        _assert_unreadable(x, "a timed-out CUDA all-reduce")
        assert comm.error_code() == 1
        try:
            all_reduce(later)
        except TimeoutError as exc:
            assert f"rank {world - 1}" in str(exc), str(exc)
        else:
            raise AssertionError("a recorded timeout was not raised")
        print("OK timeout trapped", flush=True)
    dist.barrier()
    os._exit(0)


def scenario_timeout(rank, world):
    """The last rank skips one all_reduce: the others must raise a TimeoutError naming it."""
    all_reduce(torch.ones(10))  # sets the workspace up (collective)
    if rank == world - 1:
        dist.barrier()  # returns once the others have seen their timeout
        print("OK skipped", flush=True)
    else:
        _expect_timeout(rank, world)
        dist.barrier()
    # ranks that disagree on the size: every rank names the problem instead of reading garbage;
    # also when one rank's size takes the one-shot path and another's the two-shot path
    # (300,000 fp32 > 256 KiB), as the CUDA kernels' first barrier must catch it too
    for sizes in ([5 + r for r in range(world)], [10] + [300_000] * (world - 1)):
        other = dist.new_group(list(range(world)))
        try:
            all_reduce(torch.ones(sizes[rank]), group=other)
        except ValueError as exc:
            msg = str(exc)
            assert "same shape and dtype" in msg and f"reduces {sizes[rank]} elements" in msg, msg
            assert any(f"reduces {n} of dtype" in msg for n in sizes if n != sizes[rank]), msg
        else:
            raise AssertionError(f"mismatched sizes {sizes} went unnoticed")
    print("OK mismatch detected", flush=True)


def _expect_timeout(rank, world):
    t0 = time.monotonic()
    try:
        all_reduce(torch.ones(10))
    except TimeoutError as exc:
        waited = time.monotonic() - t0
        assert "all_reduce" in str(exc) and f"rank {world - 1}" in str(exc), str(exc)
        assert waited < 10, f"timed out only after {waited:.1f} s"
        print(f"OK timeout after {waited:.2f} s: {exc}", flush=True)
    else:
        raise AssertionError("all_reduce returned although a rank never arrived")
    try:
        all_reduce(torch.ones(10))
    except RuntimeError as exc:
        assert "cannot be used again" in str(exc), str(exc)
    else:
        raise AssertionError("a workspace left out of step was reused")


def scenario_killed(rank, world):
    """Rank 1 dies (SIGKILL) after setup; rank 0's next all_reduce times out."""
    all_reduce(torch.ones(3))
    if rank == 1:
        os.kill(os.getpid(), 9)
    try:
        all_reduce(torch.ones(3))
    except TimeoutError as exc:
        print(f"OK {exc}", flush=True)
        os._exit(0)  # the process group's peer is dead: skip its teardown
    raise AssertionError("all_reduce returned although rank 1 was killed")


def main():
    scenario = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    globals()[f"scenario_{scenario}"](rank, world)
    ar.reset()
    leave_group()


if __name__ == "__main__":
    main()
