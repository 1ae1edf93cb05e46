"""Benchmarks: nemokern.ops.logprobs / linear_logprobs against eager PyTorch, torch.compile of the
same, and (GPU, where installed) Liger-Kernel's fused linear cross-entropy.

    python -m pytest bench/test_bench_logprobs.py --benchmark-enable        # CPU, CI-sized
    python -m pytest -m gpu bench/test_bench_logprobs.py --benchmark-enable  # GPU, real shapes

CPU targets: every 8th is ignore_index (RLHF masks the prompt tokens, usually far more than 1 in
8), except in the "no ignored targets" group. GPU targets: none ignored, so that the roofline
fractions count only work really done. Every benchmark is one training step's worth of work:
forward and backward (the grad w.r.t. logits, or hidden and weight), except the "fwd" groups
(reference / old-policy log-probs need no grad). extra_info: `bytes` for the logits op
(nemokern's DRAM traffic: read logits in forward; read logits and write dlogits in backward;
per-row scalars ignored), `flops` for the linear op
(model FLOPs: 2*N*H*V forward, 6*N*H*V forward + backward; nemokern also recomputes the logits in
backward, the recipe's 8*N*H*V, recorded as `flops_with_recompute`), and peak extra memory.
"""

import pytest
import torch
from common import IGNORE, bench_linear, compiled, logprobs_eager, run_benchmark

from nemokern.ops import logprobs

# ---------------------------------------------------------------- logits op


def _bench_logits(benchmark, impl, n, vocab, dtype, device, rounds, backward, ignore_every=8):
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, vocab, device=device, generator=g) * 2).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=device, generator=g)
    if ignore_every:
        targets[::ignore_every] = IGNORE
    logits.requires_grad_(backward)
    fn = {"nemokern": logprobs, "eager": logprobs_eager}.get(impl) or compiled(logprobs_eager)

    def step():
        if not backward:
            with torch.no_grad():
                return fn(logits, targets)
        (grad,) = torch.autograd.grad(fn(logits, targets).sum(), logits)
        return grad

    es = logits.element_size()
    info = {"bytes": n * vocab * es * (3 if backward else 1)} if impl == "nemokern" else {}
    run_benchmark(benchmark, step, device, rounds, shape=f"N={n} V={vocab} {dtype}", **info)


IMPLS = ["nemokern", "eager", "compiled"]


@pytest.mark.benchmark(group="logprobs fwd+bwd (CPU, N=2048 V=32000 fp32)")
@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_cpu(benchmark, impl):
    _bench_logits(benchmark, impl, 2048, 32000, torch.float32, "cpu", 5, backward=True)


@pytest.mark.benchmark(group="logprobs fwd (CPU, N=2048 V=32000 fp32)")
@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_fwd_cpu(benchmark, impl):
    _bench_logits(benchmark, impl, 2048, 32000, torch.float32, "cpu", 5, backward=False)


@pytest.mark.gpu
@pytest.mark.benchmark(group="logprobs fwd+bwd (GPU, N=16384 V=128256 bf16)")
@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_gpu(benchmark, impl):
    _bench_logits(
        benchmark, impl, 16384, 128256, torch.bfloat16, "cuda", 20, backward=True, ignore_every=0
    )


@pytest.mark.gpu
@pytest.mark.benchmark(group="logprobs fwd (GPU, N=16384 V=128256 bf16)")
@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_fwd_gpu(benchmark, impl):
    _bench_logits(
        benchmark, impl, 16384, 128256, torch.bfloat16, "cuda", 20, backward=False, ignore_every=0
    )


# ---------------------------------------------------------------- linear op


@pytest.mark.benchmark(group="linear_logprobs fwd+bwd (CPU, N=4096 H=1024 V=32000 fp32)")
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_cpu(benchmark, impl):
    bench_linear(benchmark, impl, 4096, 1024, 32000, torch.float32, "cpu", 5, backward=True)


@pytest.mark.benchmark(
    group="linear_logprobs fwd+bwd (CPU, N=4096 H=1024 V=32000 fp32, no ignored targets)"
)
@pytest.mark.parametrize("impl", ["nemokern", "eager"])
def test_linear_logprobs_cpu_all_counted(benchmark, impl):
    bench_linear(
        benchmark, impl, 4096, 1024, 32000, torch.float32, "cpu", 5, backward=True, ignore_every=0
    )


@pytest.mark.benchmark(group="linear_logprobs fwd, no grad (CPU, N=4096 H=1024 V=32000 fp32)")
@pytest.mark.parametrize("impl", ["nemokern", "eager"])
def test_linear_logprobs_fwd_cpu(benchmark, impl):
    """Reference and old-policy log-probs (REINFORCE): no backward follows."""
    bench_linear(benchmark, impl, 4096, 1024, 32000, torch.float32, "cpu", 5, backward=False)


@pytest.mark.gpu
@pytest.mark.benchmark(group="linear_logprobs fwd+bwd (GPU, N=16384 H=4096 V=128256 bf16)")
@pytest.mark.parametrize("impl", IMPLS + ["liger"])
def test_linear_logprobs_gpu(benchmark, impl):
    bench_linear(
        benchmark,
        impl,
        16384,
        4096,
        128256,
        torch.bfloat16,
        "cuda",
        10,
        backward=True,
        ignore_every=0,
    )


@pytest.mark.gpu
@pytest.mark.benchmark(group="linear_logprobs fwd (GPU, N=16384 H=4096 V=128256 bf16)")
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_fwd_gpu(benchmark, impl):
    bench_linear(
        benchmark,
        impl,
        16384,
        4096,
        128256,
        torch.bfloat16,
        "cuda",
        10,
        backward=False,
        ignore_every=0,
    )
