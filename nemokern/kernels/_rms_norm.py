"""RMSNorm as Llama-3.1 (transformers' LlamaRMSNorm) computes it: the one copy of the formula.

    n = x * rsqrt(mean(x^2) + eps)     in float32 (float64 for float64 x)
    y = weight * n.to(x.dtype)         the product in the promoted dtype of weight and x

Rounding n back to x's dtype before the weight multiply is what makes bf16 results match
transformers bit for bit. The model's RMSNorm layers and the reward head's torch reference both
call this; the reward-head Triton kernel reproduces the same roundings.
"""

import torch


def rms_norm_terms(x, weight, eps):
    """(rstd [..., 1], n [..., H] float32+, y [..., H]) of RMSNorm over the last dim of x.
    Differentiable through autograd; rstd and n are what a hand-written backward needs."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    n = xf * rstd
    return rstd, n, weight * n.to(x.dtype)


def rms_norm(x, weight, eps):
    """y = RMSNorm(x) * weight, rounded as transformers' LlamaRMSNorm."""
    return rms_norm_terms(x, weight, eps)[2]
