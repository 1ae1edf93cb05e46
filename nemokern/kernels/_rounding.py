"""Rounding helpers shared by the Triton kernels.

Triton's CPU interpreter truncates fp32 -> bf16 casts while the GPU rounds to nearest-even; the
kernels round through these helpers so that interpreted and compiled runs give the same bits.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """Round fp32 x to DTYPE, nearest-even, returned as fp32. bf16 by integer arithmetic: Triton's
    interpreter truncates fp32 -> bf16 casts, and the kernels must round identically everywhere."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        # NaN stays NaN: the rounding carry turns the GPU's arithmetic NaN (0x7FFFFFFF) into -0.0
        # and low-payload NaNs into inf, which would hide a diverged gradient.
        out = tl.where(x != x, float("nan"), bits.to(tl.float32, bitcast=True))
    elif DTYPE == tl.float16:
        out = x.to(tl.float16).to(tl.float32)
    else:
        out = x
    return out


@triton.jit
def cast_to(x, DTYPE: tl.constexpr):
    """fp32 x as DTYPE, rounded to nearest-even on the GPU and in the interpreter alike."""
    return round_to(x, DTYPE).to(DTYPE)
