"""The sweep `nemokern bench` plots: linear_logprobs forward + backward (one training step's LM
head: hidden states and weight in, log-probs out, gradients back) against the vocabulary size at a
fixed token count and against the token count at a fixed vocabulary, one benchmark per
implementation (nemokern, eager PyTorch; on GPUs also torch.compile and, where installed,
Liger-Kernel). Each records extra_info["sweep"] = {"axis", "N", "H", "V", "impl"}, which
bench/report.py --plots draws.

    python -m pytest bench/test_bench_sweep.py --benchmark-enable     # CPU
    python -m pytest -m gpu bench/test_bench_sweep.py bench/test_bench_ceilings.py \
        --benchmark-enable                                             # GPU, with the roofline
    ... --sweep quick                                                 # the smallest sizes
    nemokern bench --out DIR                                          # all of it, table, plots

CPU sizes are small (H=256; a full step on the 2-core machine takes seconds at the largest); the
GPU's are Llama-3.1-8B's head (H=4096, up to V=128256 and N=16384), bf16, nothing ignored.
"""

import pytest
import torch
from common import bench_linear

# (hidden size, dtype, rounds, vocab sizes at N_FIXED, token counts at V_FIXED, N_FIXED, V_FIXED)
SIZES = {
    "cpu": (256, torch.float32, 3, (4096, 16384, 32000), (256, 1024, 4096), 1024, 16384),
    "cpu-quick": (64, torch.float32, 2, (512, 2048), (64, 256), 128, 1024),
    "cuda": (4096, torch.bfloat16, 10, (32000, 64000, 128256), (2048, 8192, 16384), 8192, 128256),
    "cuda-quick": (1024, torch.bfloat16, 5, (32000, 128256), (1024, 4096), 2048, 32000),
}


def _points(kind):
    hs, dtype, rounds, vocabs, tokens, n_fixed, v_fixed = SIZES[kind]
    points = [("V", n_fixed, v) for v in vocabs] + [("N", n, v_fixed) for n in tokens]
    return [(axis, n, hs, v, dtype, rounds) for axis, n, v in points]


def _sweep(benchmark, device, impl, point):
    axis, n, hs, vocab, dtype, rounds = point
    gpu = device == "cuda"
    ignore_every = 0 if gpu else 8
    bench_linear(benchmark, impl, n, hs, vocab, dtype, device, rounds, True, ignore_every)
    benchmark.extra_info["sweep"] = {"axis": axis, "N": n, "H": hs, "V": vocab, "impl": impl}


def pytest_generate_tests(metafunc):
    if "point" not in metafunc.fixturenames:
        return
    device = "cuda" if metafunc.function.__name__.endswith("gpu") else "cpu"
    kind = device + ("-quick" if metafunc.config.getoption("--sweep") == "quick" else "")
    ids = [f"{a}-N{n}-V{v}" for a, n, _, v, _, _ in _points(kind)]
    metafunc.parametrize("point", _points(kind), ids=ids)


@pytest.mark.benchmark(group="sweep: linear_logprobs fwd+bwd (CPU)")
@pytest.mark.parametrize("impl", ["nemokern", "eager"])
def test_sweep_cpu(benchmark, impl, point):
    _sweep(benchmark, "cpu", impl, point)


@pytest.mark.gpu
@pytest.mark.benchmark(group="sweep: linear_logprobs fwd+bwd (GPU)")
@pytest.mark.parametrize("impl", ["nemokern", "eager", "compiled", "liger"])
def test_sweep_gpu(benchmark, impl, point):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _sweep(benchmark, "cuda", impl, point)
