"""Sequence-level KL between policy and reference log-probs: Triton kernels and the torch reference.

The public op, its checks and autograd are in nemokern/ops/sequence_kl.py.

Per token, with r = logp_ref - logp and k1 = -r:
    k1 = logp - logp_ref            d/dlogp = 1
    abs = |k1|                      d/dlogp = sign(k1), sign(0) = 0 (as torch.abs)
    k2 = 0.5 * k1^2                 d/dlogp = k1
    k3 = exp(r) - 1 - r             d/dlogp = 1 - exp(r)
Per sequence: sum of mask * estimate over its tokens, divided by sum(mask) for the masked mean
(an empty mask gives 0, not NaN) or not for the sum; the backward scales by `scale` = 1 / sum(mask)
(0 when empty) or 1. Tokens whose mask is 0 never contribute, even if their log-probs are
inf/NaN padding.

Layouts: padded [B, T] (sequence b is row b) or packed [N] (sequence b is tokens
cu_seqlens[b]:cu_seqlens[b+1]; tokens outside every sequence are ignored and get gradient 0).
One program per sequence, forward and backward: one launch each.
"""

import math

import torch
import triton
import triton.language as tl

from ._rounding import cast_to  # rounds bf16 like the GPU, interpreted too

ESTIMATORS = ("k1", "abs", "k2", "k3")
_BLOCK = 1024

# k3 = expm1(r) - r and its gradient -expm1(r) cancel catastrophically for |r| << 1, which is the
# usual regime (the policy stays near the reference). Below this |r| a degree-8 Taylor polynomial
# is exact to fp32 rounding (next term < 1e-9 relative); above it the direct formula is.
_SERIES_BELOW = tl.constexpr(0.5)


@triton.jit
def _k3_terms(lp, ref):
    """(exp(r) - 1 - r, 1 - exp(r)) for r = ref - lp, accurate for small |r| too. fp32 in/out."""
    r = ref - lp
    # expm1(r) / r = sum_k r^k / (k+1)!
    p1 = 1.0 + r * (
        1 / 2
        + r
        * (
            1 / 6
            + r
            * (
                1 / 24
                + r
                * (1 / 120 + r * (1 / 720 + r * (1 / 5040 + r * (1 / 40320 + r * (1 / 362880)))))
            )
        )
    )
    # (expm1(r) - r) / r^2 = sum_k r^k / (k+2)!
    p2 = 1 / 2 + r * (
        1 / 6
        + r
        * (
            1 / 24
            + r
            * (
                1 / 120
                + r
                * (
                    1 / 720
                    + r * (1 / 5040 + r * (1 / 40320 + r * (1 / 362880 + r * (1 / 3628800))))
                )
            )
        )
    )
    small = tl.abs(r) < _SERIES_BELOW
    e = tl.exp(r)
    value = tl.where(small, r * r * p2, e - 1.0 - r)
    grad = tl.where(small, -r * p1, 1.0 - e)
    return value, grad


@triton.jit
def _estimate(lp, ref, ESTIMATOR: tl.constexpr):
    """Per-token estimate (fp32) for ESTIMATOR = index into ESTIMATORS."""
    k1 = lp - ref
    if ESTIMATOR == 0:
        out = k1
    elif ESTIMATOR == 1:
        out = tl.abs(k1)
    elif ESTIMATOR == 2:
        out = 0.5 * k1 * k1
    else:
        out, _ = _k3_terms(lp, ref)
    return out


@triton.jit
def _estimate_grad(lp, ref, ESTIMATOR: tl.constexpr):
    """d estimate / d logp (fp32)."""
    k1 = lp - ref
    if ESTIMATOR == 0:
        out = tl.full(k1.shape, 1.0, tl.float32)
    elif ESTIMATOR == 1:
        out = tl.where(k1 > 0, 1.0, tl.where(k1 < 0, -1.0, 0.0))
    elif ESTIMATOR == 2:
        out = k1
    else:
        _, out = _k3_terms(lp, ref)
    return out


@triton.jit
def _token_range(cu_ptr, b, seq_len, PACKED: tl.constexpr):
    if PACKED:
        start = tl.load(cu_ptr + b).to(tl.int64)
        end = tl.load(cu_ptr + b + 1).to(tl.int64)
    else:
        start = b.to(tl.int64) * seq_len
        end = start + seq_len
    return start, end


@triton.jit
def _load_block(logp_ptr, ref_ptr, mask_ptr, off, end, BLOCK: tl.constexpr):
    """Token indices [BLOCK] from off, which of them are < end, and mask / logp / ref (fp32)."""
    idx = off + tl.arange(0, BLOCK)
    inside = idx < end
    m = tl.load(mask_ptr + idx, mask=inside, other=0).to(tl.float32)
    lp = tl.load(logp_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + idx, mask=inside, other=0.0).to(tl.float32)
    return idx, inside, m, lp, ref


@triton.jit
def _sequence_kl_fwd(
    logp_ptr,
    ref_ptr,
    mask_ptr,
    cu_ptr,
    kl_ptr,
    scale_ptr,
    seq_len,
    ESTIMATOR: tl.constexpr,
    MEAN: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    start, end = _token_range(cu_ptr, b, seq_len, PACKED)
    total = tl.zeros([BLOCK], tl.float32)
    weight = tl.zeros([BLOCK], tl.float32)
    for off in range(start, end, BLOCK):
        idx, inside, m, lp, ref = _load_block(logp_ptr, ref_ptr, mask_ptr, off, end, BLOCK)
        total += tl.where(m != 0, m * _estimate(lp, ref, ESTIMATOR), 0.0)
        weight += m
    total_sum = tl.sum(total, axis=0)
    if MEAN:
        w = tl.sum(weight, axis=0)
        w_safe = tl.where(w != 0, w, 1.0)
        kl = tl.where(w != 0, total_sum / w_safe, 0.0)  # one rounding, not two via 1 / w
        scale = tl.where(w != 0, 1.0 / w_safe, 0.0)
    else:
        kl = total_sum
        scale = 1.0
    tl.store(kl_ptr + b, kl)
    tl.store(scale_ptr + b, scale)


@triton.jit
def _sequence_kl_bwd(
    grad_kl_ptr,
    scale_ptr,
    logp_ptr,
    ref_ptr,
    mask_ptr,
    cu_ptr,
    grad_ptr,
    seq_len,
    ESTIMATOR: tl.constexpr,
    PACKED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    start, end = _token_range(cu_ptr, b, seq_len, PACKED)
    g = tl.load(grad_kl_ptr + b).to(tl.float32) * tl.load(scale_ptr + b)
    for off in range(start, end, BLOCK):
        idx, inside, m, lp, ref = _load_block(logp_ptr, ref_ptr, mask_ptr, off, end, BLOCK)
        d = tl.where(m != 0, (g * m) * _estimate_grad(lp, ref, ESTIMATOR), 0.0)
        tl.store(grad_ptr + idx, cast_to(d, grad_ptr.dtype.element_ty), mask=inside)


def _kernel_mask(mask):
    """The mask as the kernel reads it: bool reinterpreted as uint8 (no copy)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def _no_offsets(device):
    return torch.empty(0, dtype=torch.int32, device=device)


def sequence_kl_forward_triton(logp, ref, mask, cu_seqlens, estimator: int, mean: bool):
    """Triton forward. logp/ref/mask: contiguous [B, T] (cu_seqlens None) or [N] with
    cu_seqlens int32 [B+1]; mask bool/uint8/float. Returns (kl [B] fp32, scale [B] fp32)."""
    packed = cu_seqlens is not None
    n_seq = cu_seqlens.numel() - 1 if packed else logp.shape[0]
    seq_len = 0 if packed else logp.shape[1]
    kl = torch.empty(n_seq, dtype=torch.float32, device=logp.device)
    scale = torch.empty_like(kl)
    cu = cu_seqlens if packed else _no_offsets(logp.device)
    if n_seq > 0:
        _sequence_kl_fwd[(n_seq,)](
            logp,
            ref,
            _kernel_mask(mask),
            cu,
            kl,
            scale,
            seq_len,
            ESTIMATOR=estimator,
            MEAN=mean,
            PACKED=packed,
            BLOCK=_BLOCK,
        )
    return kl, scale


def sequence_kl_backward_triton(grad_kl, scale, logp, ref, mask, cu_seqlens, estimator: int):
    """Triton backward: grad w.r.t. logp (logp's shape and dtype) from grad_kl [B]."""
    packed = cu_seqlens is not None
    n_seq = scale.numel()
    seq_len = 0 if packed else logp.shape[1]
    # packed buffers may hold tokens outside every sequence: those must read 0
    grad = torch.zeros_like(logp) if packed else torch.empty_like(logp)
    cu = cu_seqlens if packed else _no_offsets(logp.device)
    if n_seq > 0:
        _sequence_kl_bwd[(n_seq,)](
            grad_kl.float().contiguous(),
            scale,
            logp,
            ref,
            _kernel_mask(mask),
            cu,
            grad,
            seq_len,
            ESTIMATOR=estimator,
            PACKED=packed,
            BLOCK=_BLOCK,
        )
    return grad


# ---------------------------------------------------------------- torch reference (CPU path)
# Same function as the kernels. The inputs are per-token scalars, so the fp32 temporaries are a few
# bytes per token: nothing here needs chunking.


def _k3_torch(lp, ref, grad):
    """k3 (grad=False) or its gradient (grad=True). float64 expm1 is exact to fp32 rounding for
    every |r| that matters (the kernel's Taylor branch is a GPU-cheap way to the same numbers)
    and, on the CPU, cheaper than the polynomial."""
    r = ref.double() - lp.double()
    e = torch.expm1(r)
    return (-e if grad else e - r).float()


def _estimate_torch(lp, ref, estimator, grad):
    k1 = lp - ref
    if estimator == 0:
        return torch.ones_like(k1) if grad else k1
    if estimator == 1:
        return torch.sign(k1) if grad else k1.abs()
    if estimator == 2:
        return k1 if grad else 0.5 * k1 * k1
    return _k3_torch(lp, ref, grad)


def _sequence_ids(cu_seqlens):
    """Sequence id (int64) of every token in [cu[0], cu[-1]), and that slice."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    start, end = int(cu_seqlens[0]), int(cu_seqlens[-1])
    return ids, slice(start, end)


def sequence_kl_forward_torch(logp, ref, mask, cu_seqlens, estimator: int, mean: bool):
    """Torch reference of sequence_kl_forward_triton (same arguments and results)."""
    m = mask.float()
    est = _estimate_torch(logp.float(), ref.float(), estimator, grad=False)
    contrib = _masked_product(est, m)
    if cu_seqlens is None:
        total, weight = contrib.sum(-1), m.sum(-1)
    else:
        n_seq = cu_seqlens.numel() - 1
        ids, span = _sequence_ids(cu_seqlens)
        total = torch.zeros(n_seq, device=logp.device).index_add_(0, ids, contrib[span])
        weight = torch.zeros(n_seq, device=logp.device).index_add_(0, ids, m[span])
    if mean:
        empty = weight == 0
        w_safe = torch.where(empty, 1.0, weight)
        return torch.where(empty, 0.0, total / w_safe), torch.where(empty, 0.0, 1 / w_safe)
    return total, torch.ones_like(total)


def sequence_kl_backward_torch(grad_kl, scale, logp, ref, mask, cu_seqlens, estimator: int):
    """Torch reference of sequence_kl_backward_triton."""
    g = grad_kl.float() * scale
    if cu_seqlens is None:
        return _token_grad(g[:, None], logp, ref, mask, estimator)
    ids, span = _sequence_ids(cu_seqlens)
    grad = torch.zeros_like(logp)
    grad[span] = _token_grad(g[ids], logp[span], ref[span], mask[span], estimator)
    return grad


def _token_grad(g_tok, logp, ref, mask, estimator):
    m = mask.float()
    d = _estimate_torch(logp.float(), ref.float(), estimator, grad=True)
    return _masked_product(d, g_tok * m).to(logp.dtype)


def _masked_product(values, m):
    """values * m, exactly 0 where m == 0 even if values is inf/NaN there (padding). The
    torch.where that guarantees it costs far more than the product on the CPU, so it only runs
    when the product is not finite."""
    out = values * m
    if not math.isfinite(out.sum().item()):  # one reduction: isfinite(out).all() costs 4 passes
        out = torch.where(m != 0, out, 0.0)
    return out


# ---------------------------------------------------------------- ahead-of-time compile specs

# ----------------------------------------------------------------------------- entry points
# The op layer calls these two with the backend nemokern.ops chose; both implementations take the
# same arguments.


def forward(backend, logp, ref, mask, cu_seqlens, estimator: int, mean: bool):
    """(kl [B] float32, scale [B]: what backward multiplies the upstream gradient by)."""
    fn = sequence_kl_forward_triton if backend == "triton" else sequence_kl_forward_torch
    return fn(logp, ref, mask, cu_seqlens, estimator, mean)


def backward(backend, grad_kl, scale, logp, ref, mask, cu_seqlens, estimator: int):
    """d logp, in logp's dtype and shape."""
    fn = sequence_kl_backward_triton if backend == "triton" else sequence_kl_backward_torch
    return fn(grad_kl, scale, logp, ref, mask, cu_seqlens, estimator)


def _aot_specs():
    specs = []

    def sig_fwd(lp, ref, mask):
        return {
            "logp_ptr": lp,
            "ref_ptr": ref,
            "mask_ptr": mask,
            "cu_ptr": "*i32",
            "kl_ptr": "*fp32",
            "scale_ptr": "*fp32",
            "seq_len": "i32",
        }

    def sig_bwd(lp, ref, mask):
        return {
            "grad_kl_ptr": "*fp32",
            "scale_ptr": "*fp32",
            "logp_ptr": lp,
            "ref_ptr": ref,
            "mask_ptr": mask,
            "cu_ptr": "*i32",
            "grad_ptr": lp,
            "seq_len": "i32",
        }

    # every constexpr variant in fp32 with a bool mask
    for est in range(len(ESTIMATORS)):
        for packed in (False, True):
            for mean in (True, False):
                specs.append(
                    (
                        _sequence_kl_fwd,
                        sig_fwd("*fp32", "*fp32", "*u8"),
                        {"ESTIMATOR": est, "MEAN": mean, "PACKED": packed, "BLOCK": _BLOCK},
                    )
                )
            specs.append(
                (
                    _sequence_kl_bwd,
                    sig_bwd("*fp32", "*fp32", "*u8"),
                    {"ESTIMATOR": est, "PACKED": packed, "BLOCK": _BLOCK},
                )
            )
    # the other dtypes the launcher passes through, on the most involved estimator (k3)
    for lp, ref, mask in (
        ("*bf16", "*bf16", "*u8"),
        ("*fp32", "*fp32", "*fp32"),
        ("*bf16", "*bf16", "*bf16"),
        ("*fp32", "*bf16", "*u8"),
        ("*fp16", "*fp16", "*fp16"),
    ):
        specs.append(
            (
                _sequence_kl_fwd,
                sig_fwd(lp, ref, mask),
                {"ESTIMATOR": 3, "MEAN": True, "PACKED": False, "BLOCK": _BLOCK},
            )
        )
        specs.append(
            (
                _sequence_kl_bwd,
                sig_bwd(lp, ref, mask),
                {"ESTIMATOR": 3, "PACKED": False, "BLOCK": _BLOCK},
            )
        )
    return specs


AOT_SPECS = _aot_specs()
