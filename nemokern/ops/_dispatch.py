"""Backend choice for every public op. Must never import model, parallel, data or train.

Rule (architecture.md): CUDA tensors -> Triton kernel; CPU tensors -> torch reference.
NEMOKERN_BACKEND=triton|torch forces one (tests force triton on the CPU under TRITON_INTERPRET=1).
"""
import contextlib
import os

import torch

from nemokern.kernels import interpreting as triton_interpreting

BACKENDS = ("triton", "torch")


def backend_for(*tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op whose inputs are `tensors`."""
    forced = os.environ.get("NEMOKERN_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(
                f"NEMOKERN_BACKEND={forced!r} is not a backend; use one of {BACKENDS} or unset it"
            )
        if forced == "triton" and not triton_interpreting() and not all(t.is_cuda for t in tensors):
            raise ValueError(
                "NEMOKERN_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 set before nemokern "
                "is imported (Triton kernels only run on CUDA tensors otherwise)"
            )
        return forced
    return "triton" if all(t.is_cuda for t in tensors) else "torch"


def check_tensors(op: str, named: dict, float_dtypes=(), float_names=()):
    """Errors a user can cause with tensor arguments, named: each value must be a tensor on the
    device of the first one; those in float_names must have one of float_dtypes."""
    first_name, first = next(iter(named.items()))
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on "
                             f"{first.device}; move them to one device")
        if name in float_names and t.dtype not in float_dtypes:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; use one of {tuple(float_dtypes)}")


def device_guard(device):
    """Context making `device` the current CUDA device while kernels launch (no-op off CUDA).

    Triton launches on the *current* device and its current stream, not on the tensors' device:
    with inputs on cuda:1 and cuda:0 current (a reference model on a second GPU) a kernel would
    run on the wrong GPU, racing the stream that produced its inputs or faulting. Every op's
    forward and backward run their kernels under this guard."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
