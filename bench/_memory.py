"""Timing and peak extra memory of one benchmarked call. The memory measurement is the tests'
(tests/helpers.py: peak_extra_bytes), which bench/conftest.py puts on the import path.
"""

import torch

from helpers import peak_extra_bytes

CPU_NAME = "2-core CPU, no GPU"  # the CI/developer machine; GPU runs name their GPU


def device_name(device):
    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else CPU_NAME


def run_benchmark(benchmark, fn, device, rounds, **info):
    """Time fn (synchronised on CUDA), record its peak extra memory, the device and `info`."""

    def call():
        out = fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return out

    call()  # warm up (and compile, for torch.compile)
    _, peak = peak_extra_bytes(call, device)
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1)
    benchmark.extra_info.update(peak_extra_bytes=peak, device=device_name(device), **info)
