"""Benchmarks: sequence_kl and reward_head against eager PyTorch and torch.compile.

    python -m pytest bench/test_bench_kl_reward.py --benchmark-enable        # CPU, CI-sized
    python -m pytest -m gpu bench/test_bench_kl_reward.py --benchmark-enable  # GPU, real shapes

GPU shapes are the issue's: sequence_kl at B=64, T=4096; reward_head at B=64, T=4096, H=8192,
K=9, bf16. extra_info["bytes"] is the analytic DRAM traffic of the implementation benchmarked
(bench/report.py divides it by the time); the eager reward head's count is per eager kernel.
"""

import pytest
import torch
from common import run_benchmark as _run

from nemokern.ops import reward_head, sequence_kl

EPS = 1e-5


@pytest.fixture
def one_thread():
    """CPU runs use one thread: the CI machine's 2 cores are shared, and two OpenMP threads
    contending with other processes made medians swing 100x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- sequence_kl


def kl_eager(lp, ref, mask, estimator):
    """The composite every RLHF codebase writes (NeMo-Aligner: masked mean of |k1|)."""
    k1 = lp - ref
    est = k1.abs() if estimator == "abs" else torch.exp(-k1) - 1 + k1
    m = mask.to(est.dtype)
    return (est * m).sum(-1) / m.sum(-1).clamp(min=1)


_kl_compiled = torch.compile(kl_eager, dynamic=False)


def _kl_impl(name, estimator):
    if name == "nemokern":
        return lambda lp, ref, mask: sequence_kl(lp, ref, mask, estimator=estimator)
    fn = kl_eager if name == "eager" else _kl_compiled
    return lambda lp, ref, mask: fn(lp, ref, mask, estimator)


def _bench_kl(benchmark, impl, estimator, B, T, device, rounds):
    g = torch.Generator(device=device).manual_seed(0)
    lp = -2 + torch.randn(B, T, device=device, generator=g)
    ref = lp + 0.1 * torch.randn(B, T, device=device, generator=g)
    mask = torch.rand(B, T, device=device, generator=g) < 0.8
    lp.requires_grad_()
    fn = _kl_impl(impl, estimator)

    def step():  # forward + backward, as in training
        (grad,) = torch.autograd.grad(fn(lp, ref, mask).sum(), lp)
        return grad

    # nemokern's traffic: forward reads 4 + 4 + 1 bytes/token, backward the same and writes 4
    nbytes = B * T * (9 + 13) if impl == "nemokern" else None
    info = {"bytes": nbytes} if nbytes else {}
    _run(benchmark, step, device, rounds, shape=f"B={B} T={T}", **info)


@pytest.mark.benchmark(group="sequence_kl fwd+bwd (CPU 1 thread, B=64 T=1024)")
@pytest.mark.parametrize("estimator", ["abs", "k3"])
@pytest.mark.parametrize("impl", ["nemokern", "eager", "compiled"])
def test_sequence_kl_cpu(benchmark, one_thread, impl, estimator):
    _bench_kl(benchmark, impl, estimator, 64, 1024, "cpu", rounds=50)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sequence_kl fwd+bwd (GPU, B=64 T=4096)")
@pytest.mark.parametrize("estimator", ["abs", "k3"])
@pytest.mark.parametrize("impl", ["nemokern", "eager", "compiled"])
def test_sequence_kl_gpu(benchmark, impl, estimator):
    _bench_kl(benchmark, impl, estimator, 64, 4096, "cuda", rounds=50)


# ---------------------------------------------------------------- reward_head


def reward_eager(hidden, last_index, norm_weight, head_weight, head_bias):
    """What a transformers reward model does: LlamaRMSNorm over every token, then pick the last
    token, then the head."""
    x = hidden.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)
    normed = norm_weight * normed.to(hidden.dtype)
    last = normed[torch.arange(last_index.numel(), device=hidden.device), last_index]
    return torch.nn.functional.linear(last, head_weight, head_bias)


_reward_compiled = torch.compile(reward_eager, dynamic=False)


def reward_bytes(impl, B, T, H, K, es, backward):
    """Analytic DRAM bytes, es = bytes per hidden/parameter element.
    nemokern forward: the B gathered rows, norm weight, head, and [B, K] outputs (rewards and
    the saved head_weight @ (norm_weight * n)); backward: the zero-filled hidden gradient (N*H,
    the bulk), the rows read again and their gradients written, parameters read and their
    gradients written. Eager forward, per kernel over all N*H elements: to fp32 (es + 4, none
    for fp32), pow (8), mean (4), x * rstd (8), back to the dtype (4 + es, none for fp32),
    weight * (2es). Its backward and torch.compile's fusion are not counted."""
    N, params = B * T, (H + K * H + K) * es
    fwd = B * H * es + params + B * K * 8 + B * 12
    if impl == "nemokern":
        bwd = N * H * es + 2 * B * H * es + 2 * params + B * K * 8 + B * 12
        return fwd + bwd if backward else fwd
    if impl == "eager" and not backward:
        per_element = 20 + 2 * es + (0 if es == 4 else 8 + 2 * es)
        return per_element * N * H + B * H * es + params + B * K * es
    return None


def _bench_reward(benchmark, impl, backward, B, T, H, K, dtype, device, rounds):
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(B, T, H, device=device, generator=g).to(dtype)
    last = torch.randint(0, T, (B,), device=device, generator=g)
    nw = (1 + 0.1 * torch.randn(H, device=device, generator=g)).to(dtype)
    w = (torch.randn(K, H, device=device, generator=g) / H**0.5).to(dtype)
    bias = torch.zeros(K, device=device, dtype=dtype)
    fn = {"nemokern": reward_head, "eager": reward_eager, "compiled": _reward_compiled}[impl]
    leaves = [t.requires_grad_(backward) for t in (hidden, nw, w, bias)]

    def step():
        if not backward:
            with torch.no_grad():
                return fn(hidden, last, nw, w, bias)
        out = fn(hidden, last, nw, w, bias)
        return torch.autograd.grad(out.float().sum(), leaves)

    nbytes = reward_bytes(impl, B, T, H, K, hidden.element_size(), backward)
    info = {"bytes": nbytes} if nbytes else {}
    _run(benchmark, step, device, rounds, shape=f"B={B} T={T} H={H} K={K} {dtype}", **info)


@pytest.mark.benchmark(group="reward_head (CPU 1 thread, B=8 T=512 H=1024 K=9 fp32)")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["nemokern", "eager", "compiled"])
def test_reward_head_cpu(benchmark, one_thread, impl, backward):
    _bench_reward(benchmark, impl, backward, 8, 512, 1024, 9, torch.float32, "cpu", rounds=30)


@pytest.mark.gpu
@pytest.mark.benchmark(group="reward_head (GPU, B=64 T=4096 H=8192 K=9 bf16)")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["nemokern", "eager", "compiled"])
def test_reward_head_gpu(benchmark, impl, backward):
    _bench_reward(benchmark, impl, backward, 64, 4096, 8192, 9, torch.bfloat16, "cuda", rounds=20)
