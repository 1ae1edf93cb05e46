"""Triton kernels (one file per op) and their torch references. Knows nothing of models."""

import os

from ._rms_norm import rms_norm, rms_norm_terms  # noqa: F401 (the one RMSNorm formula)


def interpreting() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
