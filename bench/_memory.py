"""Peak extra memory of one call, for the benchmarks.

CUDA: torch.cuda.max_memory_allocated around the call. CPU: the process's peak resident set
(VmHWM) is reset through /proc/self/clear_refs (Linux), then read after the call; the difference
to the resident set before the call is what the call added at its peak. Large CPU tensors are
mmap'ed and returned to the OS when freed, so this sees temporaries too; but glibc raises its
mmap threshold after such a free, so later large blocks come from the heap and, once freed, stay
resident: without malloc_trim before the call, a benchmark run after a bigger one in the same
process would see next to nothing.
"""
import ctypes
import ctypes.util
import gc

import torch


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_freed_heap():
    """Return freed heap memory to the OS (glibc malloc_trim), so that reusing it shows in RSS."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def peak_extra_bytes(fn, device="cpu"):
    """Run fn() once; return (result, peak bytes allocated above the level before the call)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    _release_freed_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    out = fn()
    return out, max(0, _status_kib("VmHWM") - base) * 1024


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
