"""Backend choice for every public op. Must never import model, parallel, data or train.

Rule (architecture.md): CUDA tensors -> Triton kernel; CPU tensors -> torch reference.
NEMOKERN_BACKEND=triton|torch forces one (tests force triton on the CPU under TRITON_INTERPRET=1).
"""
import os

import torch

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


def triton_interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
