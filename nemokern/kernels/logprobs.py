"""Log-probs of target tokens (and softmax entropy) from logits: Triton kernels + torch reference.

Every implementation here reduces a block of logit rows to per-row *partial statistics*
`parts[..., 4]` of the temperature-scaled logits z = logits / T over the columns it saw:
    m  = max_v z_v                       (-inf when it saw no column)
    s  = sum_v exp(z_v - m)
    t  = sum_v exp(z_v - m) * (z_v - m)  (entropy numerator)
    zt = z_target if the target column was among them, else 0
Parts over disjoint column sets (vocabulary blocks, kernel splits, tensor-parallel shards) are
merged by `combine_stats`, the one place that turns them into
    logp = (zt - m) - log s,  entropy = log s - t / s.
Backward needs only norm = (m, log s) and entropy per row (m and log s are kept apart rather than
summed into logsumexp: at |logits| ~ 1e4 the rounding of m + log s would cost p_v its precision):
    dz_v = g_lp * ([v == target] - p_v) - g_ent * p_v * (log p_v + entropy),  dlogits = dz / T.
Rows whose target is ignore_index give logp = entropy = 0 and zero gradient.

Out-of-range targets: the public op checks them; the kernels never read out of bounds (the target
load is masked) and such a row comes out as NaN.
"""

import torch
import triton
import triton.language as tl

from ._rounding import cast_to  # bf16 rounded to nearest-even, interpreted too

# Rows per chunk of the torch reference: keeps its fp32 temporaries near 2**22 elements (16 MB)
# whatever N is, so the CPU path never holds an [N, V] fp32 tensor.
_TORCH_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- statistics


def merge_parts(parts):
    """Merge partial statistics over disjoint vocabulary parts: parts [K, N, 4] -> [N, 4]."""
    m, s, t, zt = parts.float().unbind(-1)
    big_m = m.max(dim=0).values
    # A part that saw no column has m = -inf, s = 0: its weight must be 0, not exp(nan).
    shift = torch.where(s > 0, m - big_m, torch.zeros_like(m))
    w = torch.where(s > 0, torch.exp(shift), torch.zeros_like(m))
    return torch.stack([big_m, (w * s).sum(0), (w * (t + shift * s)).sum(0), zt.sum(0)], -1)


def combine_stats(parts, valid):
    """Finish partial statistics over disjoint vocabulary parts.

    parts [K, N, 4] float32 (m, s, t, zt per part), valid [N] bool (target != ignore_index).
    Returns (logp [N], norm [N, 2] = (m, log s), entropy [N]) float32; logp and entropy are 0
    where not valid.
    """
    m, s, t, zt = merge_parts(parts).unbind(-1)
    log_s = torch.log(s)
    zero = torch.zeros_like(log_s)
    # Ignored rows get m = +inf, log s = 0: every p_v = exp(z_v - m - log s) of theirs is then
    # exactly 0 in backward, whatever their logits (the kernels may not even have read them).
    norm = torch.stack(
        [torch.where(valid, m, torch.full_like(m, float("inf"))), torch.where(valid, log_s, zero)],
        dim=-1,
    )
    logp = torch.where(valid, (zt - m) - log_s, zero)
    entropy = torch.where(valid, log_s - t / s, zero)
    return logp, norm, entropy


def row_chunk(n_rows, n_cols, elements):
    """Rows of an [n_rows, n_cols] matrix per chunk of about `elements` elements (at least 1)."""
    return max(1, min(n_rows, elements // max(1, n_cols)))


# ----------------------------------------------------------------------------- torch reference


def _target_columns(targets, vocab_start, width):
    """Local column of each row's target in a block, and whether the block holds it."""
    local = targets - vocab_start
    inside = (local >= 0) & (local < width)
    return torch.where(inside, local, 0).unsqueeze(-1), inside


def block_stats_torch(z, targets, vocab_start=0, with_entropy=True):
    """Partial statistics of one block of scaled logits; z is overwritten (it is a scratch
    buffer: the CPU path's memory is two blocks, not a handful).

    z [C, Vb] float32 (already divided by T), targets [C] int64 global ids; the block holds
    vocabulary ids [vocab_start, vocab_start + Vb). Returns [C, 4] float32; without with_entropy
    t is left at 0 (a third fewer passes over z; the entropy that results must not be used).
    """
    col, inside = _target_columns(targets, vocab_start, z.shape[-1])
    zt = torch.where(inside, z.gather(-1, col).squeeze(-1), 0.0)
    m = z.amax(dim=-1, keepdim=True)
    z.sub_(torch.where(torch.isfinite(m), m, 0.0))
    if with_entropy:
        e = torch.exp(z)
        s = e.sum(-1)
        # e * (z - m) is 0 * -inf = nan at masked (-inf) logits; their contribution is 0.
        t = e.mul_(z).nan_to_num_(nan=0.0).sum(-1)
    else:
        s = z.exp_().sum(-1)  # in place: no second block, no page faults for one
        t = torch.zeros_like(s)
    return torch.stack([m.squeeze(-1), s, t, zt], dim=-1)


def block_dlogits_torch(z, targets, norm, entropy, g_lp, g_ent, inv_t, vocab_start=0):
    """d(loss)/d(logits) of one block; z is overwritten.

    z [C, Vb] float32 scaled logits, targets [C] global ids, norm [C, 2] / entropy [C] global row
    statistics, g_lp [C] float32 upstream grad (already zero on ignored rows), g_ent the same
    or None when entropy gets no gradient: then 3 passes over the block instead of 9.
    Returns [C, Vb] float32 (z's storage or p's).
    """
    m, log_s = norm[:, :1], norm[:, 1:]
    if g_ent is None:
        # dz_v = (g_lp [v == t] - g_lp p_v) / T with p_v = exp(z_v - m) / s: the per-row factor
        # -g_lp / (T s) (one rounding: float64 per row) is applied in the pass that makes p.
        row = (torch.exp(-log_s.double()) * g_lp.double().unsqueeze(-1) * -inv_t).float()
        dz = z.sub_(m).exp_().mul_(row)
    else:
        logp_all = z.sub_(m).sub_(log_s)
        p = torch.exp(logp_all)
        # p = 0 where coef is +-inf or nan (masked logits): their gradient is 0. A nan logit
        # (p = nan) keeps its nan gradient: a diverged model must not train on silent zeros.
        p_zero = p == 0
        coef = (
            logp_all.add_(entropy.unsqueeze(-1)).mul_(g_ent.unsqueeze(-1)).add_(g_lp.unsqueeze(-1))
        )
        dz = p.mul_(coef).masked_fill_(p_zero, 0.0).mul_(-inv_t)
    # Ignored rows (m = +inf) get exactly 0 whatever their logits hold, as the kernels never
    # read them.
    ignored = norm[:, 0] == float("inf")
    if bool(ignored.any()):
        dz[ignored] = 0.0
    col, inside = _target_columns(targets, vocab_start, z.shape[-1])
    dz.scatter_add_(-1, col, torch.where(inside, g_lp * inv_t, 0.0).unsqueeze(-1))
    return dz


def _scaled_rows(x, inv_t, scratch):
    """x / T as float32 in the leading elements of `scratch`, a buffer reused across chunks: a
    fresh block per chunk costs more in page faults than the arithmetic on it."""
    z = scratch[: x.numel()].view(x.shape)
    if x.dtype == torch.float32:
        return torch.mul(x, inv_t, out=z)
    z.copy_(x)  # to float32 first, then scale: the same roundings as x.float() * inv_t
    return z if inv_t == 1.0 else z.mul_(inv_t)


def logprobs_stats_torch(logits, targets, inv_t, ignore_index=-100, with_entropy=True):
    """logits [N, V] any float dtype, targets [N] -> parts [1, N, 4], row chunk by row chunk.
    Ignored rows are computed like the others; combine_stats discards them."""
    n, v = logits.shape
    out = torch.empty(n, 4, dtype=torch.float32, device=logits.device)
    step = row_chunk(n, v, _TORCH_CHUNK_ELEMENTS)
    scratch = torch.empty(min(n, step) * v, dtype=torch.float32, device=logits.device)
    for i in range(0, n, step):
        z = _scaled_rows(logits[i : i + step], inv_t, scratch)
        out[i : i + step] = block_stats_torch(z, targets[i : i + step], 0, with_entropy)
    return out.unsqueeze(0)


def logprobs_backward_torch(logits, targets, norm, entropy, g_lp, g_ent, inv_t, ignore_index=-100):
    """dlogits [N, V] in logits' dtype, computed row chunk by row chunk; g_ent None skips the
    entropy term's passes. Ignored rows need no ignore_index here: norm gives them zeros."""
    n, v = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    step = row_chunk(n, v, _TORCH_CHUNK_ELEMENTS)
    # fp32: the gradient's own rows are the scratch block (no copy back, no allocation)
    in_place = grad.dtype == torch.float32
    scratch = (
        None
        if in_place
        else torch.empty(min(n, step) * v, dtype=torch.float32, device=logits.device)
    )
    for i in range(0, n, step):
        sl = slice(i, i + step)
        z = _scaled_rows(logits[sl], inv_t, grad.view(-1)[i * v :] if in_place else scratch)
        dz = block_dlogits_torch(
            z,
            targets[sl],
            norm[sl],
            entropy[sl],
            g_lp[sl],
            None if g_ent is None else g_ent[sl],
            inv_t,
        )
        if dz.data_ptr() != grad[sl].data_ptr():
            grad[sl] = dz
    return grad


# ----------------------------------------------------------------------------- Triton kernels
# The two Triton helpers below are the GPU side's one copy of the statistics and gradient
# formulas; linear_logprobs' kernels call them too.


@triton.jit
def online_softmax_step(m, s, t, z, AXIS: tl.constexpr):
    """Fold a block of scaled logits z into the running (max, sum-exp, entropy numerator) of
    its rows, reducing over AXIS; -inf logits (masked columns) contribute nothing."""
    m_new = tl.maximum(m, tl.max(z, axis=AXIS))
    m_sub = tl.where(m_new > -float("inf"), m_new, 0.0)
    zc = z - tl.expand_dims(m_sub, AXIS)
    e = tl.exp(zc)
    alpha = tl.exp(m - m_sub)
    t = alpha * (t + tl.where(s > 0, m - m_sub, 0.0) * s) + tl.sum(
        tl.where(e > 0, e * zc, 0.0), axis=AXIS
    )
    s = s * alpha + tl.sum(e, axis=AXIS)
    return m_new, s, t


@triton.jit
def dlogits_tile(z, m, log_s, ent, g_lp, g_ent, is_target):
    """d(loss)/dz of scaled logits z from the row statistics (broadcast against z); p = 0
    (masked logits, ignored rows with m = +inf) gives 0, never nan; a nan logit gives nan."""
    logp_all = (z - m) - log_s
    p = tl.exp(logp_all)
    dz = tl.where(p == 0.0, 0.0, -p * (g_lp + g_ent * (logp_all + ent)))
    return tl.where(is_target, dz + g_lp, dz)


@triton.jit
def _logprobs_stats_kernel(
    x_ptr, tgt_ptr, stats_ptr, V, stride_x, inv_t, ignore_index, BLOCK_V: tl.constexpr
):
    """One program per row: a single pass over V with an online max / sum-exp / entropy sum."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    # Ignored rows load nothing (masked loads do not touch memory): prompt tokens are free.
    v_lim = tl.where(valid, V, 0)
    cols = tl.arange(0, BLOCK_V)
    m = -float("inf")
    s = 0.0
    t = 0.0
    for start in range(0, V, BLOCK_V):
        z = (
            tl.load(x_row + start + cols, mask=(start + cols) < v_lim, other=-float("inf")).to(
                tl.float32
            )
            * inv_t
        )
        m, s, t = online_softmax_step(m, s, t, z, 0)
    inside = valid & (tgt >= 0) & (tgt < V)
    zt = tl.load(x_row + tl.where(inside, tgt, 0)).to(tl.float32) * inv_t
    zt = tl.where(inside, zt, tl.where(valid, float("nan"), 0.0))
    tl.store(stats_ptr + row * 4 + 0, m)
    tl.store(stats_ptr + row * 4 + 1, s)
    tl.store(stats_ptr + row * 4 + 2, t)
    tl.store(stats_ptr + row * 4 + 3, zt)


@triton.jit
def _logprobs_backward_kernel(
    x_ptr,
    tgt_ptr,
    norm_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    dx_ptr,
    V,
    stride_x,
    stride_dx,
    inv_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    """One program per row: one more pass over V writing dlogits in the logits' dtype."""
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    m = tl.load(norm_ptr + row * 2)
    log_s = tl.load(norm_ptr + row * 2 + 1)
    ent = tl.load(ent_ptr + row)
    g_lp = tl.where(valid, tl.load(glp_ptr + row), 0.0)
    g_ent = tl.where(valid, tl.load(gent_ptr + row), 0.0)
    v_lim = tl.where(valid, V, 0)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        in_v = (start + cols) < V
        z = (
            tl.load(
                x_ptr + row * stride_x + start + cols,
                mask=(start + cols) < v_lim,
                other=-float("inf"),
            ).to(tl.float32)
            * inv_t
        )
        dz = dlogits_tile(z, m, log_s, ent, g_lp, g_ent, (start + cols) == tgt)
        tl.store(
            dx_ptr + row * stride_dx + start + cols,
            cast_to(dz * inv_t, dx_ptr.dtype.element_ty),
            mask=in_v,
        )


# One row per program. (BLOCK_V, num_warps) per kernel, from the H200 sweep in
# bench/results/2026-11-30-h200-tune-run2 (N = 16384, V = 128256 bf16): the forward streams a row
# with few warps and wide blocks, the backward (read + write) prefers 8 warps.
FWD_CONFIG = (8192, 4)
BWD_CONFIG = (4096, 8)


def logprobs_stats_triton(logits, targets, inv_t, ignore_index=-100, with_entropy=True):
    """logits [N, V] (last dim contiguous), targets [N] int64 -> parts [1, N, 4] float32 (the
    entropy statistic always: it costs the kernel nothing)."""
    n, v = logits.shape
    stats = torch.empty(n, 4, dtype=torch.float32, device=logits.device)
    if n:
        block_v, warps = FWD_CONFIG
        _logprobs_stats_kernel[(n,)](
            logits,
            targets,
            stats,
            v,
            logits.stride(0),
            inv_t,
            ignore_index,
            BLOCK_V=block_v,
            num_warps=warps,
        )
    return stats.unsqueeze(0)


def logprobs_backward_triton(logits, targets, norm, entropy, g_lp, g_ent, inv_t, ignore_index=-100):
    """dlogits [N, V] in logits' dtype; g_lp/g_ent [N] float32 contiguous (g_ent None: 0)."""
    n, v = logits.shape
    g_ent = torch.zeros_like(g_lp) if g_ent is None else g_ent
    grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n:
        block_v, warps = BWD_CONFIG
        _logprobs_backward_kernel[(n,)](
            logits,
            targets,
            norm,
            entropy,
            g_lp,
            g_ent,
            grad,
            v,
            logits.stride(0),
            grad.stride(0),
            inv_t,
            ignore_index,
            BLOCK_V=block_v,
            num_warps=warps,
        )
    return grad


# ----------------------------------------------------------------------------- entry points
# The op layer calls these two with the backend nemokern.ops chose; both implementations take the
# same arguments.


def forward(backend, logits, targets, inv_t, ignore_index, with_entropy):
    """Statistics parts [S, N, 4] of logits [N, V] (see the module docstring)."""
    fn = logprobs_stats_triton if backend == "triton" else logprobs_stats_torch
    return fn(logits, targets, inv_t, ignore_index, with_entropy)


def backward(backend, logits, targets, norm, entropy, g_lp, g_ent, inv_t, ignore_index):
    """dlogits [N, V]; g_lp [N] float32, g_ent [N] float32 or None (no entropy gradient)."""
    fn = logprobs_backward_triton if backend == "triton" else logprobs_backward_torch
    return fn(logits, targets, norm, entropy, g_lp, g_ent, inv_t, ignore_index)


def _specs():
    specs = []
    for dt in ("fp32", "bf16", "fp16"):
        specs.append(
            (
                _logprobs_stats_kernel,
                {
                    "x_ptr": f"*{dt}",
                    "tgt_ptr": "*i64",
                    "stats_ptr": "*fp32",
                    "V": "i32",
                    "stride_x": "i32",
                    "inv_t": "fp32",
                    "ignore_index": "i32",
                },
                {"BLOCK_V": FWD_CONFIG[0]},
                {"num_warps": FWD_CONFIG[1]},
            )
        )
        specs.append(
            (
                _logprobs_backward_kernel,
                {
                    "x_ptr": f"*{dt}",
                    "tgt_ptr": "*i64",
                    "norm_ptr": "*fp32",
                    "ent_ptr": "*fp32",
                    "glp_ptr": "*fp32",
                    "gent_ptr": "*fp32",
                    "dx_ptr": f"*{dt}",
                    "V": "i32",
                    "stride_x": "i32",
                    "stride_dx": "i32",
                    "inv_t": "fp32",
                    "ignore_index": "i32",
                },
                {"BLOCK_V": BWD_CONFIG[0]},
                {"num_warps": BWD_CONFIG[1]},
            )
        )
    return specs


AOT_SPECS = _specs()
