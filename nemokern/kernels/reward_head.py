"""Reward head: gather each sequence's last hidden row, RMSNorm it, project to K rewards.
Triton kernels and the torch reference.

    x = hidden[b, last_index[b]]                    (or hidden[last_index[b]] when packed)
    n = x * rsqrt(mean(x^2) + eps)                  fp32
    y = norm_weight * round_h(n)                    rounded to promote(hidden, norm_weight) dtype
    out = y @ head_weight^T + head_bias             fp32 accumulation, fp32 output [B, K]
round_h rounds to the hidden dtype: this is LlamaRMSNorm exactly (transformers computes in fp32,
casts back, then multiplies by the weight in the promoted dtype), so the head sees the features
the HF model would. Only the projection differs: it accumulates in fp32 and returns fp32 rewards
instead of rounding them to bf16.

Only the B gathered rows are ever normalised, and only they are kept for the backward (not
hidden), which writes gradient into those rows of a zero tensor shaped like hidden. Rounding
casts count as identity in the backward, as in autograd.
"""

import torch
import triton
import triton.language as tl

from ._rms_norm import rms_norm_terms
from ._rounding import cast_to, round_to

_BLOCK_H = 256
_MAX_BLOCK_K = 16


@triton.jit
def _features(row_ptr, nw_ptr, offs_h, rstd, H, ROUND_Y: tl.constexpr):
    """For one H chunk of one row: (n, round_h(n), y, norm weight), all fp32 [BLOCK_H]."""
    inside = offs_h < H
    x = tl.load(row_ptr + offs_h, mask=inside, other=0.0).to(tl.float32)
    nw = tl.load(nw_ptr + offs_h, mask=inside, other=0.0).to(tl.float32)
    n = x * rstd
    n_r = round_to(n, row_ptr.dtype.element_ty)
    y = nw * n_r
    if ROUND_Y:
        y = round_to(y, row_ptr.dtype.element_ty)
    return n, n_r, y, nw


@triton.jit
def _row_ptr(h_ptr, idx_ptr, b, stride_b, stride_t):
    return h_ptr + tl.cast(b, tl.int64) * stride_b + tl.load(idx_ptr + b).to(tl.int64) * stride_t


@triton.jit
def _reward_head_fwd(
    h_ptr,
    idx_ptr,
    nw_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    rows_ptr,
    rstd_ptr,
    wn_ptr,
    stride_b,
    stride_t,
    H,
    K,
    eps,
    HAS_BIAS: tl.constexpr,
    ROUND_Y: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per sequence. Besides the rewards it stores, for the backward, the gathered
    row (so hidden need not outlive the forward), rstd, and wn[b] = head_weight @ (norm_weight * n)
    [K], which gives RMSNorm's row term mean(dL/dn * n) without a second pass over the rows."""
    b = tl.program_id(0)
    row = _row_ptr(h_ptr, idx_ptr, b, stride_b, stride_t)
    sq = tl.zeros([BLOCK_H], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(row + offs_h, mask=offs_h < H, other=0.0)
        tl.store(rows_ptr + b * H + offs_h, x, mask=offs_h < H)
        x = x.to(tl.float32)
        sq += x * x
    rstd = tl.rsqrt(tl.sum(sq, axis=0) / H + eps)
    tl.store(rstd_ptr + b, rstd)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_K, BLOCK_H], tl.float32)
        acc_wn = tl.zeros([BLOCK_K, BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            n, n_r, y, nw = _features(row, nw_ptr, offs_h, rstd, H, ROUND_Y)
            w = tl.load(
                w_ptr + offs_k[:, None] * H + offs_h[None, :],
                mask=(offs_k[:, None] < K) & (offs_h[None, :] < H),
                other=0.0,
            )
            w = w.to(tl.float32)
            acc += w * y[None, :]
            acc_wn += w * (nw * n)[None, :]
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * K + offs_k, out, mask=offs_k < K)
        tl.store(wn_ptr + b * K + offs_k, tl.sum(acc_wn, axis=1), mask=offs_k < K)


@triton.jit
def _reward_head_bwd(
    rows_ptr,
    idx_ptr,
    nw_ptr,
    w_ptr,
    g_ptr,
    rstd_ptr,
    wn_ptr,
    dh_ptr,
    dnw_ptr,
    dw_ptr,
    dbias_ptr,
    dstride_b,
    dstride_t,
    B,
    H,
    K,
    HAS_BIAS: tl.constexpr,
    ROUND_Y: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per BLOCK_H columns, looping over the B rows: every reduction over B
    (norm weight, head weight, bias) stays inside one program, so no atomics and the result is
    deterministic."""
    pid = tl.program_id(0)
    offs_h = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    inside_h = offs_h < H
    dnw = tl.zeros([BLOCK_H], tl.float32)
    for b in range(0, B):
        rstd = tl.load(rstd_ptr + b)
        n, n_r, y, nw = _features(rows_ptr + b * H, nw_ptr, offs_h, rstd, H, ROUND_Y)
        d_y = tl.zeros([BLOCK_H], tl.float32)
        c = 0.0
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            g = tl.load(g_ptr + b * K + offs_k, mask=offs_k < K, other=0.0)
            w = tl.load(
                w_ptr + offs_k[:, None] * H + offs_h[None, :],
                mask=(offs_k[:, None] < K) & inside_h[None, :],
                other=0.0,
            )
            d_y += tl.sum(g[:, None] * w.to(tl.float32), axis=0)
            c += tl.sum(g * tl.load(wn_ptr + b * K + offs_k, mask=offs_k < K, other=0.0), axis=0)
        # c / H = mean over the row of dL/dn * n, since dL/dn = (g @ W) * norm_weight
        d_x = rstd * (d_y * nw - n * (c / H))
        drow = _row_ptr(dh_ptr, idx_ptr, b, dstride_b, dstride_t)
        tl.store(drow + offs_h, cast_to(d_x, dh_ptr.dtype.element_ty), mask=inside_h)
        dnw += d_y * n_r
    tl.store(dnw_ptr + offs_h, cast_to(dnw, dnw_ptr.dtype.element_ty), mask=inside_h)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_K, BLOCK_H], tl.float32)
        dbias = tl.zeros([BLOCK_K], tl.float32)
        for b in range(0, B):
            n, n_r, y, nw = _features(
                rows_ptr + b * H, nw_ptr, offs_h, tl.load(rstd_ptr + b), H, ROUND_Y
            )
            g = tl.load(g_ptr + b * K + offs_k, mask=offs_k < K, other=0.0)
            acc += g[:, None] * y[None, :]
            dbias += g
        dw = cast_to(acc, dw_ptr.dtype.element_ty)
        tl.store(
            dw_ptr + offs_k[:, None] * H + offs_h[None, :],
            dw,
            mask=(offs_k[:, None] < K) & inside_h[None, :],
        )
        if HAS_BIAS:
            if pid == 0:
                tl.store(
                    dbias_ptr + offs_k, cast_to(dbias, dbias_ptr.dtype.element_ty), mask=offs_k < K
                )


def _layout(shape, strides):
    """(stride over sequences, stride over the index) of a hidden-shaped tensor, in elements."""
    return (0, strides[0]) if len(shape) == 2 else (strides[0], strides[1])


def _block_k(k):
    return min(_MAX_BLOCK_K, triton.next_power_of_2(k))


def round_y(hidden_dtype, norm_weight_dtype):
    """Whether LlamaRMSNorm's output y is rounded to the hidden dtype (else it stays fp32)."""
    return (
        hidden_dtype != torch.float32
        and torch.promote_types(hidden_dtype, norm_weight_dtype) == hidden_dtype
    )


def reward_head_forward_triton(hidden, last_index, norm_weight, head_weight, head_bias, eps):
    """hidden [B, T, H] or packed [N, H] (last dim contiguous), last_index int64 [B],
    norm_weight [H], head_weight [K, H], head_bias [K] or None (all contiguous).
    Returns (rewards [B, K] fp32, what the backward needs: rows [B, H], rstd [B], wn [B, K])."""
    B, (K, H) = last_index.numel(), head_weight.shape
    out = torch.empty(B, K, dtype=torch.float32, device=hidden.device)
    wn = torch.empty_like(out)
    rstd = torch.empty(B, dtype=torch.float32, device=hidden.device)
    rows = torch.empty(B, H, dtype=hidden.dtype, device=hidden.device)
    if B > 0:
        _reward_head_fwd[(B,)](
            hidden,
            last_index,
            norm_weight,
            head_weight,
            head_bias if head_bias is not None else head_weight,
            out,
            rows,
            rstd,
            wn,
            *_layout(hidden.shape, hidden.stride()),
            H,
            K,
            eps,
            HAS_BIAS=head_bias is not None,
            ROUND_Y=round_y(hidden.dtype, norm_weight.dtype),
            BLOCK_H=_BLOCK_H,
            BLOCK_K=_block_k(K),
        )
    return out, (rows, rstd, wn)


def reward_head_backward_triton(
    grad_out, saved, hidden_shape, last_index, norm_weight, head_weight, head_bias, eps
):
    """Gradients (hidden, norm_weight, head_weight, head_bias or None), each in its input's
    dtype, from grad_out [B, K]; saved is what the forward returned (eps is in rstd already).
    hidden_shape None: hidden needs no gradient (a frozen trunk); skip the N*H zero fill and
    return None for it."""
    rows, rstd, wn = saved
    B, (K, H) = last_index.numel(), head_weight.shape
    if hidden_shape is not None:
        d_hidden = torch.zeros(hidden_shape, dtype=rows.dtype, device=rows.device)
        d_dest, d_layout = d_hidden, _layout(d_hidden.shape, d_hidden.stride())
    else:  # the kernel still writes the row gradients: into a [B, H] scratch, row b at b * H
        d_hidden = None
        d_dest, d_layout = torch.empty_like(rows), (H, 0)
    d_nw = torch.empty_like(norm_weight)
    d_w = torch.empty_like(head_weight)
    d_bias = torch.empty_like(head_bias) if head_bias is not None else None
    if B == 0:
        return d_hidden, d_nw.zero_(), d_w.zero_(), None if d_bias is None else d_bias.zero_()
    _reward_head_bwd[(triton.cdiv(H, _BLOCK_H),)](
        rows,
        last_index,
        norm_weight,
        head_weight,
        grad_out.float().contiguous(),
        rstd,
        wn,
        d_dest,
        d_nw,
        d_w,
        d_bias if d_bias is not None else d_w,
        *d_layout,
        B,
        H,
        K,
        HAS_BIAS=head_bias is not None,
        ROUND_Y=round_y(rows.dtype, norm_weight.dtype),
        BLOCK_H=_BLOCK_H,
        BLOCK_K=_block_k(K),
    )
    return d_hidden, d_nw, d_w, d_bias


# ---------------------------------------------------------------- torch reference (CPU path)
# Memory-lean by construction: only the [B, H] gathered rows are ever touched in fp32.


def _row_index(hidden_shape, last_index):
    if len(hidden_shape) == 2:
        return (last_index,)
    return torch.arange(last_index.numel(), device=last_index.device), last_index


def _norm_terms(rows, norm_weight, eps):
    """(rstd [B], n [B, H], n rounded to rows' dtype, y) in float32 for rows [B, H]."""
    rstd, n, y = rms_norm_terms(rows, norm_weight, eps)
    return rstd.squeeze(-1).float(), n.float(), n.to(rows.dtype).float(), y.float()


def reward_head_forward_torch(hidden, last_index, norm_weight, head_weight, head_bias, eps):
    """Torch reference of reward_head_forward_triton (same arguments; its backward recomputes
    from the gathered rows [B, H], the one tensor it saves)."""
    rows = hidden[_row_index(hidden.shape, last_index)]
    _, _, _, y = _norm_terms(rows, norm_weight, eps)
    out = y @ head_weight.float().T
    if head_bias is not None:
        out = out + head_bias.float()
    return out, (rows,)


def reward_head_backward_torch(
    grad_out, saved, hidden_shape, last_index, norm_weight, head_weight, head_bias, eps
):
    """Torch reference of reward_head_backward_triton."""
    (rows,) = saved
    g = grad_out.float()
    rstd, n, n_r, y = _norm_terms(rows, norm_weight, eps)
    d_y = g @ head_weight.float()
    d_n = d_y * norm_weight.float()
    d_x = rstd[:, None] * (d_n - n * (d_n * n).mean(-1, keepdim=True))
    d_hidden = None
    if hidden_shape is not None:
        d_hidden = torch.zeros(hidden_shape, dtype=rows.dtype, device=rows.device)
        d_hidden[_row_index(hidden_shape, last_index)] = d_x.to(rows.dtype)
    d_bias = g.sum(0).to(head_bias.dtype) if head_bias is not None else None
    return (
        d_hidden,
        (d_y * n_r).sum(0).to(norm_weight.dtype),
        (g.T @ y).to(head_weight.dtype),
        d_bias,
    )


# ---------------------------------------------------------------- ahead-of-time compile specs

# ----------------------------------------------------------------------------- entry points
# The op layer calls these two with the backend nemokern.ops chose; both implementations take the
# same arguments.


def forward(backend, hidden, last_index, norm_weight, head_weight, head_bias, eps):
    """(rewards [B, K] float32, what backward needs instead of hidden)."""
    fn = reward_head_forward_triton if backend == "triton" else reward_head_forward_torch
    return fn(hidden, last_index, norm_weight, head_weight, head_bias, eps)


def backward(
    backend, grad_out, saved, hidden_shape, last_index, norm_weight, head_weight, head_bias, eps
):
    """(d hidden or None when hidden_shape is None, d norm_weight, d head_weight, d bias)."""
    fn = reward_head_backward_triton if backend == "triton" else reward_head_backward_torch
    return fn(grad_out, saved, hidden_shape, last_index, norm_weight, head_weight, head_bias, eps)


def _aot_specs():
    specs = []
    # (hidden, norm weight, head weight/bias) dtypes: bf16 model, fp32 model, bf16 activations
    # with fp32 parameters (mixed precision), fp16 model
    for h, p in (("*bf16", "*bf16"), ("*fp32", "*fp32"), ("*bf16", "*fp32"), ("*fp16", "*fp16")):
        ry = h != "*fp32" and p == h
        for k, has_bias in ((1, True), (9, True), (9, False)):
            const = {
                "HAS_BIAS": has_bias,
                "ROUND_Y": ry,
                "BLOCK_H": _BLOCK_H,
                "BLOCK_K": _block_k(k),
            }
            specs.append(
                (
                    _reward_head_fwd,
                    {
                        "h_ptr": h,
                        "idx_ptr": "*i64",
                        "nw_ptr": p,
                        "w_ptr": p,
                        "bias_ptr": p,
                        "out_ptr": "*fp32",
                        "rows_ptr": h,
                        "rstd_ptr": "*fp32",
                        "wn_ptr": "*fp32",
                        "stride_b": "i32",
                        "stride_t": "i32",
                        "H": "i32",
                        "K": "i32",
                        "eps": "fp32",
                    },
                    const,
                )
            )
            specs.append(
                (
                    _reward_head_bwd,
                    {
                        "rows_ptr": h,
                        "idx_ptr": "*i64",
                        "nw_ptr": p,
                        "w_ptr": p,
                        "g_ptr": "*fp32",
                        "rstd_ptr": "*fp32",
                        "wn_ptr": "*fp32",
                        "dh_ptr": h,
                        "dnw_ptr": p,
                        "dw_ptr": p,
                        "dbias_ptr": p,
                        "dstride_b": "i32",
                        "dstride_t": "i32",
                        "B": "i32",
                        "H": "i32",
                        "K": "i32",
                    },
                    const,
                )
            )
    return specs


AOT_SPECS = _aot_specs()
