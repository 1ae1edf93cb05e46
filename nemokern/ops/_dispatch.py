"""Which implementation an op runs, and on which GPU (docs/architecture.md, "Dispatch rule").

CUDA tensors run the Triton kernel, CPU tensors the torch reference; NEMOKERN_BACKEND=triton|torch
forces one (Triton on CPU tensors needs TRITON_INTERPRET=1 before nemokern is imported).
"""

import contextlib

import torch

from nemokern import env
from nemokern.errors import EnvError
from nemokern.kernels import interpreting as triton_interpreting


def default_backend(device) -> str:
    """The backend an op on tensors of `device` runs when NEMOKERN_BACKEND does not force one."""
    forced = env.choice("NEMOKERN_BACKEND")
    if forced != "auto":
        return forced
    return "triton" if torch.device(device).type == "cuda" else "torch"


def check_forced_backend() -> None:
    """EnvError when NEMOKERN_BACKEND=triton cannot run on this machine: no CUDA and no
    TRITON_INTERPRET=1."""
    if (
        env.choice("NEMOKERN_BACKEND") == "triton"
        and not torch.cuda.is_available()
        and not triton_interpreting()
    ):
        raise EnvError(
            "NEMOKERN_BACKEND=triton needs a CUDA GPU, or TRITON_INTERPRET=1 set before "
            "nemokern is imported (the interpreter); unset it (auto) to run the torch reference"
        )


def backend_for(*tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op whose inputs are `tensors`."""
    forced = env.choice("NEMOKERN_BACKEND")
    on_cuda = all(t.is_cuda for t in tensors)
    if forced == "triton" and not on_cuda and not triton_interpreting():
        raise EnvError(
            "NEMOKERN_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 set before "
            "nemokern is imported (Triton kernels only run on CUDA tensors otherwise)"
        )
    if forced != "auto":
        return forced
    return "triton" if on_cuda else "torch"


def device_guard(device):
    """Context making `device` the current CUDA device while kernels launch (no-op off CUDA).

    Triton launches on the *current* device and its current stream, not on the tensors' device:
    with inputs on cuda:1 and cuda:0 current (a reference model on a second GPU) a kernel would
    run on the wrong GPU, racing the stream that produced its inputs or faulting. Every op's
    forward and backward run their kernels under this guard."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
