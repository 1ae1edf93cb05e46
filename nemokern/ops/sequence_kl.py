"""Public op sequence_kl: per-sequence KL to the reference policy over response tokens.

Validation, backend dispatch and autograd; the math lives in nemokern/kernels/sequence_kl.py.
"""

import torch
from torch.autograd.function import once_differentiable

from nemokern.kernels import sequence_kl as _k
from nemokern.ops import _checks
from nemokern.ops._dispatch import backend_for, device_guard

REDUCTIONS = ("mean", "sum")
_MASK_PASSTHROUGH = (torch.bool, torch.uint8, torch.float32, torch.bfloat16, torch.float16)
_LOGP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def sequence_kl(logprobs, ref_logprobs, mask, *, estimator="k1", reduction="mean", cu_seqlens=None):
    """KL(policy || reference) per sequence, from per-token log-probs, in one kernel launch.

    Args:
        logprobs: policy log-probs of the sampled tokens, [B, T], or packed [N] with cu_seqlens.
            float32, bfloat16 or float16.
        ref_logprobs: reference-policy log-probs, same shape (any of those dtypes). Treated as a
            constant: no gradient flows into it.
        mask: response-token mask, same shape. bool, or numeric 0/1 (a float mask acts as
            per-token weights: the mean divides by their sum). Masked-out tokens never contribute,
            even where their log-probs are inf/NaN padding.
        estimator: per-token estimate, with k1 = logprobs - ref_logprobs:
            "k1"  k1                                    grad 1
            "abs" |k1| (NeMo-Aligner's default)         grad sign(k1), 0 where k1 == 0 (torch.abs)
            "k2"  0.5 * k1^2                            grad k1
            "k3"  exp(-k1) - 1 + k1                     grad 1 - exp(-k1)
            k3 avoids fp32's cancellation in exp(-k1) - 1 + k1 (a Taylor polynomial for
            |k1| < 0.5 in the kernel, float64 expm1 on the CPU), so it stays accurate where the
            policy is close to the reference; plain fp32 is off by ~10% at |k1| ~ 1e-3.
        reduction: "mean" (masked mean over the sequence's tokens, NeMo-Aligner) or "sum"
            (masked sum, TRL's RLOO). A sequence with an empty mask gives 0.
        cu_seqlens: for packed inputs, [B+1] int32/int64 offsets: sequence b is tokens
            cu_seqlens[b]:cu_seqlens[b+1]. Tokens outside every sequence are ignored.

    Returns:
        [B] float32. Differentiable w.r.t. logprobs (the gradient has logprobs' dtype).
    """
    est = _check_options(estimator, reduction)
    _check_tensors(logprobs, ref_logprobs, mask, cu_seqlens)
    backend = backend_for(logprobs, ref_logprobs, mask)
    logprobs, ref_logprobs, mask = (t.contiguous() for t in (logprobs, ref_logprobs, mask))
    if mask.dtype not in _MASK_PASSTHROUGH:
        mask = mask.float()  # e.g. int64 masks from a tokenizer: a 4-byte/token copy
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    return _SequenceKL.apply(
        logprobs, ref_logprobs.detach(), mask, cu_seqlens, est, reduction == "mean", backend
    )


class _SequenceKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref, mask, cu_seqlens, estimator, mean, backend):
        with device_guard(logp.device):
            kl, scale = _k.forward(backend, logp, ref, mask, cu_seqlens, estimator, mean)
        ctx.save_for_backward(logp, ref, mask, cu_seqlens, scale)
        ctx.estimator, ctx.backend = estimator, backend
        ctx.mark_non_differentiable(scale)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        logp, ref, mask, cu_seqlens, scale = ctx.saved_tensors
        with device_guard(logp.device):
            grad = _k.backward(
                ctx.backend, grad_kl, scale, logp, ref, mask, cu_seqlens, ctx.estimator
            )
        return grad, None, None, None, None, None, None


def _check_options(estimator, reduction):
    if estimator not in _k.ESTIMATORS:
        raise ValueError(f"sequence_kl: estimator={estimator!r} is not one of {_k.ESTIMATORS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"sequence_kl: reduction={reduction!r} is not one of {REDUCTIONS}")
    return _k.ESTIMATORS.index(estimator)


def _check_tensors(logprobs, ref_logprobs, mask, cu_seqlens):
    named = {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "mask": mask}
    _checks.tensors("sequence_kl", named, _LOGP_DTYPES, ("logprobs", "ref_logprobs"))
    for name, t in named.items():
        if t.shape != logprobs.shape:
            raise ValueError(
                f"sequence_kl: {name} has shape {tuple(t.shape)} but logprobs has "
                f"{tuple(logprobs.shape)}; all three must match"
            )
    if mask.is_complex():
        raise TypeError(f"sequence_kl: mask has dtype {mask.dtype}; use bool or a real 0/1 tensor")
    if cu_seqlens is None:
        if logprobs.dim() != 2:
            raise ValueError(
                f"sequence_kl: logprobs has shape {tuple(logprobs.shape)}; pass "
                "[B, T], or packed [N] together with cu_seqlens=[B+1]"
            )
        return
    if logprobs.dim() != 1:
        raise ValueError(
            f"sequence_kl: with cu_seqlens, logprobs must be packed [N], got shape "
            f"{tuple(logprobs.shape)}; flatten it or drop cu_seqlens"
        )
    _check_cu_seqlens(cu_seqlens, logprobs)


def _check_cu_seqlens(cu, logprobs):
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError("sequence_kl: cu_seqlens must be a 1-D tensor [B+1] of sequence offsets")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"sequence_kl: cu_seqlens has dtype {cu.dtype}; use int32 or int64")
    if cu.device != logprobs.device:
        raise ValueError(
            f"sequence_kl: cu_seqlens is on {cu.device} but logprobs is on {logprobs.device}"
        )
    # one host sync: a bad offset would otherwise read out of bounds inside the kernel
    bad = (cu[0] < 0) | (cu[-1] > logprobs.numel()) | (cu[1:] < cu[:-1]).any()
    if bool(bad):
        shown = cu.tolist() if cu.numel() <= 8 else cu[:8].tolist() + ["..."]
        raise ValueError(
            f"sequence_kl: cu_seqlens={shown} must start at >= 0, be "
            f"non-decreasing and end at <= logprobs.numel() = {logprobs.numel()}"
        )
