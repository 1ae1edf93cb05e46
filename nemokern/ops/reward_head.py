"""Public op reward_head: rewards [B, K] from the last token's hidden state of each sequence.

Validation, backend dispatch and autograd; the math lives in nemokern/kernels/reward_head.py.
"""

import math
import numbers

import torch
from torch.autograd.function import once_differentiable

from nemokern.kernels import reward_head as _k
from nemokern.ops import _checks
from nemokern.ops._dispatch import backend_for, device_guard

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def reward_head(hidden, last_index, norm_weight, head_weight, head_bias=None, *, eps=1e-5):
    """RMSNorm(hidden[last]) @ head_weight.T + head_bias, normalising only the B gathered rows.

    Args:
        hidden: trunk output before the final norm, [B, T, H], or packed [N, H]. float32,
            bfloat16 or float16.
        last_index: [B] integer: the position of each sequence's last token, in [0, T) (row b
            of hidden) or, packed, in [0, N) (distinct rows).
        norm_weight: the final RMSNorm weight [H] (model.norm.weight).
        head_weight: [K, H]. K = 1 for a Bradley-Terry reward, 9 for the SteerLM attributes;
            for the Nemotron-Reward-HF layout (reward = logit of token 0) pass lm_head.weight[:1].
        head_bias: optional [K].
        eps: RMSNorm epsilon (Llama-3.1: 1e-5).

    Returns:
        rewards [B, K], always float32. The norm reproduces transformers' LlamaRMSNorm rounding
        (fp32 math, cast to hidden's dtype, times the weight in the promoted dtype); the
        projection accumulates in fp32 and is not rounded to hidden's dtype, which keeps the
        reward differences that Bradley-Terry losses see free of bf16 rounding.
        Differentiable w.r.t. hidden, norm_weight, head_weight and head_bias (gradients in each
        input's dtype; hidden's gradient is zero outside the gathered rows).

    Checking last_index costs one host synchronisation.
    """
    _check(hidden, last_index, norm_weight, head_weight, head_bias, eps)
    backend = backend_for(hidden, norm_weight, head_weight)
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    norm_weight, head_weight = norm_weight.contiguous(), head_weight.contiguous()
    if head_bias is not None:
        head_bias = head_bias.contiguous()
    return _RewardHead.apply(
        hidden,
        last_index.long().contiguous(),
        norm_weight,
        head_weight,
        head_bias,
        float(eps),
        backend,
    )


class _RewardHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, last_index, norm_weight, head_weight, head_bias, eps, backend):
        with device_guard(hidden.device):
            out, saved = _k.forward(
                backend, hidden, last_index, norm_weight, head_weight, head_bias, eps
            )
        # not hidden itself: the saved rows [B, H] let the caller free it after the forward
        ctx.save_for_backward(last_index, norm_weight, head_weight, head_bias, *saved)
        ctx.hidden_shape, ctx.eps, ctx.backend = hidden.shape, eps, backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        last_index, norm_weight, head_weight, head_bias, *saved = ctx.saved_tensors
        hidden_shape = ctx.hidden_shape if ctx.needs_input_grad[0] else None
        with device_guard(norm_weight.device):
            d_hidden, d_nw, d_w, d_bias = _k.backward(
                ctx.backend,
                grad_out,
                saved,
                hidden_shape,
                last_index,
                norm_weight,
                head_weight,
                head_bias,
                ctx.eps,
            )
        return d_hidden, None, d_nw, d_w, d_bias, None, None


def _check(hidden, last_index, norm_weight, head_weight, head_bias, eps):
    named = {
        "hidden": hidden,
        "last_index": last_index,
        "norm_weight": norm_weight,
        "head_weight": head_weight,
    }
    if head_bias is not None:
        named["head_bias"] = head_bias
    _checks.tensors("reward_head", named, _FLOAT_DTYPES, set(named) - {"last_index"})
    if hidden.dim() not in (2, 3):
        raise ValueError(
            f"reward_head: hidden has shape {tuple(hidden.shape)}; pass [B, T, H] or packed [N, H]"
        )
    H = hidden.shape[-1]
    if norm_weight.shape != (H,):
        raise ValueError(
            f"reward_head: norm_weight has shape {tuple(norm_weight.shape)}, "
            f"expected [H] = ({H},) from hidden"
        )
    if head_weight.dim() != 2 or head_weight.shape[1] != H or head_weight.shape[0] < 1:
        raise ValueError(
            f"reward_head: head_weight has shape {tuple(head_weight.shape)}, "
            f"expected [K, H] with H = {H} (for one row of lm_head: weight[:1])"
        )
    K = head_weight.shape[0]
    if head_bias is not None and head_bias.shape != (K,):
        raise ValueError(
            f"reward_head: head_bias has shape {tuple(head_bias.shape)}, expected [K] = ({K},)"
        )
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"reward_head: eps must be a real number (e.g. 1e-5), got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"reward_head: eps={eps!r} must be a finite number >= 0")
    _check_last_index(hidden, last_index)


def _check_last_index(hidden, last_index):
    integer = not (
        last_index.dtype.is_floating_point
        or last_index.dtype.is_complex
        or last_index.dtype == torch.bool
    )
    if last_index.dim() != 1 or not integer:
        raise ValueError(
            f"reward_head: last_index must be an integer tensor [B], got shape "
            f"{tuple(last_index.shape)} dtype {last_index.dtype}"
        )
    packed = hidden.dim() == 2
    if not packed and last_index.numel() != hidden.shape[0]:
        raise ValueError(
            f"reward_head: last_index has {last_index.numel()} entries but hidden "
            f"[B, T, H] has B = {hidden.shape[0]}"
        )
    bound = hidden.shape[0] if packed else hidden.shape[1]
    what = "N (packed rows)" if packed else "T"
    if last_index.numel() == 0:
        return
    # one host sync for both checks: a bad index would otherwise read out of bounds in the kernel
    out_of_range = ((last_index < 0) | (last_index >= bound)).any()
    duplicate = torch.zeros((), dtype=torch.bool, device=last_index.device)
    if packed and last_index.numel() > 1:
        s = last_index.sort().values
        duplicate = (s[1:] == s[:-1]).any()
    if bool(out_of_range | duplicate):
        if bool(out_of_range):
            bad = last_index[(last_index < 0) | (last_index >= bound)][:5].tolist()
            raise IndexError(
                f"reward_head: last_index holds {bad} outside [0, {what} = {bound}); "
                "it must index each sequence's last token"
            )
        raise ValueError(
            "reward_head: last_index repeats a row of packed hidden; every sequence "
            "needs its own last token"
        )
