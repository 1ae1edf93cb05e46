"""Hardware ceilings measured in the same run as the kernels (GPU only): a large device-to-device
copy for bytes/s (read + write counted) and a large bf16 matmul for FLOP/s. bench/report.py
divides every kernel's bytes or FLOPs by these to report a fraction of the roofline."""

import pytest
import torch


@pytest.mark.gpu
@pytest.mark.benchmark(group="ceilings")
def test_ceiling_copy_bandwidth(benchmark):
    n = 1 << 30  # 1 GiB each way: far beyond L2
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(bytes=2 * n, ceiling="bytes", device=torch.cuda.get_device_name())


@pytest.mark.gpu
@pytest.mark.benchmark(group="ceilings")
def test_ceiling_bf16_matmul(benchmark):
    m = n = k = 8192
    a = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(k, n, dtype=torch.bfloat16, device="cuda")

    def run():
        a @ b
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(
        flops=2 * m * n * k, ceiling="flops", device=torch.cuda.get_device_name()
    )
