"""What the two CUDA paths of linear_policy_loss (kernels/linear_policy_loss.py, all-Triton, and
kernels/policy_loss_cublas.py, cuBLAS chunks) and its torch reference share: the
importance-ratio-clipped objective (`ratio_terms`, the one home of that formula), the per-chunk
d(loss)/d(logp) (`grad_coef`) and the token-chunk GEMM skeleton (`by_token_chunks`), whose GPU
logits block is CHUNK_BYTES."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .linear_logprobs import mm_fp32

CHUNK_BYTES = 512 << 20  # logits block of the GPU paths (input dtype)


class RatioTerms(NamedTuple):
    """ratio_terms' per-token results, float32 [C] (clipped: bool)."""

    ratio: torch.Tensor  # r = exp(logp - old_logp)
    factor: torch.Tensor  # f: clip(r) where clipped, else r; loss_t = coef_t * f_t
    clipped: torch.Tensor  # the clip binds: coef < 0 and r > hi, or coef > 0 and r < lo
    g_lp: torch.Tensor  # d(loss_t)/d(logp_t) = coef_t * r_t, 0 where clipped
    loss: torch.Tensor  # coef_t * f_t (0 where coef_t = 0)


def ratio_terms(logp, old_logp, coef, bounds):
    """The importance-ratio-clipped policy-gradient loss of each counted token: with
    r = exp(logp - old_logp) and bounds (lo, hi) = (1 - eps_low, 1 + eps_high),
    loss_t = max(coef_t * r_t, coef_t * clip(r_t, lo, hi)). With coef_t = -w_t * A_t (w_t >= 0)
    that is -w_t * min(r_t A_t, clip(r_t) A_t), PPO's clipped surrogate. logp, old_logp, coef
    float32 [C]. The one home of this formula: the op's loss, its coef gradient (the factor f)
    and its logits gradient (g_lp, per token chunk) all come from here."""
    lo, hi = bounds
    ratio = torch.exp(logp - old_logp)
    clipped = torch.where(coef < 0, ratio > hi, (coef > 0) & (ratio < lo))
    factor = torch.where(clipped, ratio.clamp(lo, hi), ratio)
    # a token with coef 0 contributes nothing, even at r = inf (0 * inf would be nan)
    idle = clipped | (coef == 0)
    zero = torch.zeros((), dtype=ratio.dtype, device=ratio.device)
    g_lp = torch.where(idle, zero, coef * ratio)
    loss = torch.where(coef == 0, zero, coef * factor)
    return RatioTerms(ratio, factor, clipped, g_lp, loss)


def grad_coef(coef, old_logp, bounds):
    """g(logp_c, rows) -> d(loss)/d(logp) [C] of a token chunk: coef itself, or with old_logp,
    ratio_terms' g_lp from the chunk's log-probs."""
    if old_logp is None:
        return lambda logp, sl: coef[sl]
    return lambda logp, sl: ratio_terms(logp, old_logp[sl], coef[sl], bounds).g_lp


def accumulate_fp32(acc, a, b):
    """acc += a @ b with acc float32 and a, b possibly 16-bit: one rounding of dweight at the end
    instead of one per chunk."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        try:  # cuBLAS adds the fp32 product into acc in its epilogue: no [V, H] temporary
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (TypeError, RuntimeError, NotImplementedError):
            acc += mm_fp32(a, b)
    else:
        acc.addmm_(a.float(), b.float())


def by_token_chunks(hidden, weight, targets, grad_coef, step, chunk_dlogits, need_dh, need_dw):
    """The forward both paths share: token chunks of `step` rows;
    chunk_dlogits(h_c, targets_c, g) -> (logp_c, entropy_c, d(logits)_c [C, V] in hidden's
    dtype), where g(logp_c) is the chunk's d(loss)/d(logp) (grad_coef(logp_c, rows)). dhidden
    rows are complete after one GEMM per chunk; dweight accumulates (fp32)."""
    n = hidden.shape[0]
    logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy = torch.empty_like(logp)
    dh = torch.empty_like(hidden) if need_dh else None
    dw = None
    if need_dw:
        acc_dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else None
        dw = torch.zeros_like(weight, dtype=acc_dtype)
    for i in range(0, n, step):
        sl = slice(i, i + step)
        logp[sl], entropy[sl], dz = chunk_dlogits(
            hidden[sl], targets[sl], lambda lp, sl=sl: grad_coef(lp, sl)
        )
        if need_dh:
            torch.mm(dz, weight, out=dh[sl])
        if need_dw:
            accumulate_fp32(dw, dz.t(), hidden[sl])
    if need_dw:
        dw = dw.to(weight.dtype)
    return logp, entropy, dh, dw


def all_rows(targets):
    """Every row of a chunk counted (the stats of combine_stats for a whole chunk)."""
    return torch.ones_like(targets, dtype=torch.bool)
