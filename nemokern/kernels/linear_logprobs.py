"""Log-probs (and entropy) of targets from hidden states and the LM-head weight, never holding the
[N, V] logits: Triton kernels + a chunked torch reference.

Both implementations produce the partial statistics of nemokern.kernels.logprobs (merged by its
`combine_stats`), for a weight that holds vocabulary ids [vocab_start, vocab_start + V): the whole
head, or one tensor-parallel shard of it.

Triton design (GPU):
- forward: one kernel tiles tokens x vocabulary; each program owns BLOCK_N tokens and a contiguous
  range of vocabulary tiles, computes every logits tile with tl.dot over H (bf16 in, fp32
  accumulation) and folds it into online max / sum-exp / entropy statistics. Vocabulary ranges are
  split across programs so small N still fills the GPU; the splits are merged like shards.
  Nothing of size N x V is ever written.
- backward: the vocabulary is walked in chunks (_BWD_CHUNK_BYTES of d(logits) each); one kernel
  recomputes the logits tiles of a chunk with tl.dot and writes d(logits) (input dtype) for it;
  two cuBLAS GEMMs then give dweight for those rows (complete, no accumulation) and add the chunk's
  share of dhidden. Why not one fused kernel: dhidden [N, H] and dweight [V, H] each need a sum over
  the other axis of the tile grid; fusing means fp32 atomics into [N, H] and [V, H] buffers (the
  latter 2 GB at V = 128k, H = 4096, and ~0.5 TB of atomic traffic with 128-wide tiles), or a
  two-kernel split that recomputes logits twice (10 instead of 8 N*H*V FLOPs) and still needs an
  [BLOCK, H] fp32 accumulator per program, far beyond registers at H = 4096. A bf16 d(logits)
  chunk of a few hundred MB is cheaper and runs the two big products at cuBLAS speed.
Registers and spills per kernel: `python -m nemokern.kernels._aot --resources OUT.json` on a GPU,
or `--cc 90` through ptxas on any machine (recorded: bench/results/*/resources.json and
bench/results/2026-11-30-ptxas-resources/).
CPU reference: forward in chunks of tokens (each chunk's logits [C, V] are computed, reduced to
statistics and dropped); backward recomputes the logits in vocabulary chunks [N, Vc] and shares
the GPU path's GEMM skeleton (`backward_by_vocab_chunks`). Only per-row statistics are saved.
"""

import torch
import triton
import triton.language as tl

from . import interpreting
from ._rounding import cast_to
from .logprobs import (
    block_dlogits_torch,
    block_stats_torch,
    dlogits_tile,
    online_softmax_step,
    row_chunk,
)

# Logits elements per chunk on the CPU path: the backward's 32 MB of fp32 keep its GEMMs as fast
# as one big GEMM; the forward's GEMM (fewer columns per row) needs ~1000-row chunks for that,
# 128 MB at V = 32000 (timings: bench/results/2026-11-30-cpu-notes-from-kernel-comments.md).
_TORCH_CHUNK_ELEMENTS = 1 << 23
_TORCH_FWD_CHUNK_ELEMENTS = 1 << 25
_BWD_CHUNK_BYTES = 256 << 20  # d(logits) chunk of the GPU backward


# ----------------------------------------------------------------------------- torch reference


def scaled_logits(a, b_t, inv_t, scratch):
    """(a @ b_t) / T as float32, the GEMM written into the leading elements of `scratch`, a
    buffer reused across chunks (a fresh block per chunk would cost page faults). Valid until the
    next call with the same scratch."""
    out = scratch[: a.shape[0] * b_t.shape[1]].view(a.shape[0], b_t.shape[1])
    z = torch.mm(a, b_t, out=out).float()
    return z if inv_t == 1.0 else z.mul_(inv_t)


def linear_stats_torch(hidden, weight, targets, inv_t, vocab_start=0, with_entropy=True):
    """hidden [N, H], weight [Vs, H], targets [N] global ids -> parts [1, N, 4] float32."""
    n, v = hidden.shape[0], weight.shape[0]
    out = torch.empty(n, 4, dtype=torch.float32, device=hidden.device)
    step = row_chunk(n, v, _TORCH_FWD_CHUNK_ELEMENTS)
    scratch = hidden.new_empty(min(n, step) * v)
    for i in range(0, n, step):
        z = scaled_logits(hidden[i : i + step], weight.t(), inv_t, scratch)
        out[i : i + step] = block_stats_torch(z, targets[i : i + step], vocab_start, with_entropy)
    return out.unsqueeze(0)


def backward_by_vocab_chunks(hidden, weight, chunk_cols, dlogits_chunk, need_dh=True, need_dw=True):
    """The backward skeleton both paths share: walk the vocabulary in chunks of chunk_cols rows
    of weight; dlogits_chunk(c0, w_c) -> d(logits) [N, vc] (hidden's dtype) of that chunk.
    A chunk's dweight rows are complete after one GEMM (written straight into the result, no
    [V, H] accumulation); dhidden [N, H] accumulates in fp32. A gradient not needed (frozen LM
    head, detached hidden) is neither allocated nor computed: one GEMM per chunk less."""
    n, h = hidden.shape
    dw = torch.empty_like(weight) if need_dw else None
    dh = torch.zeros(n, h, dtype=torch.float32, device=hidden.device) if need_dh else None
    for c0 in range(0, weight.shape[0], chunk_cols):
        w_c = weight[c0 : c0 + chunk_cols]
        dz = dlogits_chunk(c0, w_c)
        if need_dw:
            torch.mm(dz.t(), hidden, out=dw[c0 : c0 + w_c.shape[0]])
        if not need_dh:
            continue
        if dh.dtype == dz.dtype:
            dh.addmm_(dz, w_c)
        else:
            dh += mm_fp32(dz, w_c)
    return (dh.to(hidden.dtype) if need_dh else None), dw


def mm_fp32(a, b):
    """a @ b [M, N] float32 from bf16/fp16 operands. On CUDA, cuBLAS writes the fp32 accumulator
    directly, so dhidden is rounded to bf16 once (as eager's single GEMM) and not once per chunk."""
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass  # torch without out_dtype: per-chunk rounding, error ~2x eager's at worst
    return (a @ b).float()


def linear_backward_torch(
    hidden,
    weight,
    targets,
    norm,
    entropy,
    g_lp,
    g_ent,
    inv_t,
    vocab_start=0,
    need_dh=True,
    need_dw=True,
):
    """Returns (dhidden [N, H], dweight [Vs, H]) in the inputs' dtype (None where not needed);
    g_lp/g_ent must already be zero on ignored rows. Vocabulary chunks of about
    _TORCH_CHUNK_ELEMENTS / N columns."""
    n, v = hidden.shape[0], weight.shape[0]
    chunk_cols = row_chunk(v, n, _TORCH_CHUNK_ELEMENTS)
    scratch = hidden.new_empty(n * min(v, chunk_cols))

    def dlogits_chunk(c0, w_c):
        z = scaled_logits(hidden, w_c.t(), inv_t, scratch)
        return block_dlogits_torch(
            z, targets, norm, entropy, g_lp, g_ent, inv_t, vocab_start + c0
        ).to(hidden.dtype)

    return backward_by_vocab_chunks(hidden, weight, chunk_cols, dlogits_chunk, need_dh, need_dw)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    row0,
    col0,
    n_left,
    v_left,
    H,
    stride_h,
    stride_w,
    inv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Scaled logits z [BLOCK_N, BLOCK_V] fp32 of rows row0 + [0, BLOCK_N) x columns col0 +
    [0, BLOCK_V) (row0, col0 int64 scalars; n_left, v_left the rows and columns left from
    there); -inf outside the vocabulary.

    Registers are what limits these tiles (the accumulator alone is 128 per thread at 128 x 256
    on 8 warps), so the operands are addressed from one 64-bit base per tile plus 32-bit
    offsets, and rows/columns past the end are clamped for the loads (their values are masked
    or never stored): the loop keeps only the K mask."""
    rn = tl.arange(0, BLOCK_N)
    cn = tl.arange(0, BLOCK_V)
    ks = tl.arange(0, BLOCK_H)
    r = tl.where(rn < n_left, rn, 0)
    c = tl.where(cn < v_left, cn, 0)
    a_ptrs = h_ptr + row0 * stride_h + (r[:, None] * stride_h + ks[None, :])
    b_ptrs = w_ptr + col0 * stride_w + (c[:, None] * stride_w + ks[None, :])
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, H, BLOCK_H):
        a = tl.load(a_ptrs, mask=ks[None, :] < H - k, other=0.0)
        b = tl.load(b_ptrs, mask=ks[None, :] < H - k, other=0.0)
        if DOT_UPCAST:  # the Triton 3.9 interpreter's tl.dot returns garbage for bf16 inputs
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_H
        b_ptrs += BLOCK_H
    return tl.where(cn[None, :] < v_left, acc * inv_t, -float("inf"))


@triton.jit
def _linear_stats_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    parts_ptr,
    z_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    stride_z,
    inv_t,
    vocab_start,
    tiles_per_split,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    STORE_Z: tl.constexpr,
):
    """Program (i, j): tokens [i*BLOCK_N, ...) x vocabulary tiles of split j -> parts[j, rows].
    STORE_Z also stores every scaled logits tile into z [N, V] in z's dtype (linear_policy_loss
    turns that block into its gradient); otherwise z_ptr is never touched."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    n_left = N - pid_n * BLOCK_N
    rn = tl.arange(0, BLOCK_N)
    in_n = rn < n_left
    tgt = tl.load(tgt_ptr + row0 + rn, mask=in_n, other=-1) - vocab_start
    # A target beyond this weight (another shard's) must not match a padding column of a tile.
    tgt = tl.where(tgt < V, tgt, -1)
    cn = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_N,), -float("inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    v_first = split * tiles_per_split * BLOCK_V
    v_last = tl.minimum(v_first + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_first, v_last, BLOCK_V):
        z = _logits_tile(
            h_ptr,
            w_ptr,
            row0,
            tl.cast(v0, tl.int64),
            n_left,
            V - v0,
            H,
            stride_h,
            stride_w,
            inv_t,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
            DOT_PRECISION,
            DOT_UPCAST,
        )
        if STORE_Z:
            tl.store(
                z_ptr + row0 * stride_z + v0 + (rn[:, None] * stride_z + cn[None, :]),
                cast_to(z, z_ptr.dtype.element_ty),
                mask=in_n[:, None] & (cn[None, :] < V - v0),
            )
        m, s, t = online_softmax_step(m, s, t, z, 1)
        zt += tl.sum(tl.where(cn[None, :] == (tgt - v0).to(tl.int32)[:, None], z, 0.0), axis=1)
    out = parts_ptr + (split * N + row0 + rn) * 4
    tl.store(out + 0, m, mask=in_n)
    tl.store(out + 1, s, mask=in_n)
    tl.store(out + 2, t, mask=in_n)
    tl.store(out + 3, zt, mask=in_n)


@triton.jit
def _linear_dlogits_kernel(
    h_ptr,
    w_ptr,
    tgt_ptr,
    norm_ptr,
    ent_ptr,
    glp_ptr,
    gent_ptr,
    dz_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    stride_dz,
    inv_t,
    vocab_start,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Recompute one logits tile of a vocabulary chunk and write its d(logits) tile.

    w_ptr points at the chunk's first row, V is the chunk width, vocab_start its first global id;
    g_lp/g_ent are already zero on ignored rows, which therefore get a zero gradient."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    row0 = pid_n.to(tl.int64) * BLOCK_N
    col0 = pid_v.to(tl.int64) * BLOCK_V
    n_left = N - pid_n * BLOCK_N
    v_left = V - pid_v * BLOCK_V
    rn = tl.arange(0, BLOCK_N)
    cn = tl.arange(0, BLOCK_V)
    in_n = rn < n_left
    rows = row0 + rn
    tgt = tl.load(tgt_ptr + rows, mask=in_n, other=-1) - vocab_start
    tgt = tl.where(tgt < V, tgt - col0, -1).to(tl.int32)  # this tile's column, if any
    m = tl.load(norm_ptr + rows * 2, mask=in_n, other=float("inf"))
    log_s = tl.load(norm_ptr + rows * 2 + 1, mask=in_n, other=0.0)
    ent = tl.load(ent_ptr + rows, mask=in_n, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=in_n, other=0.0)
    g_ent = tl.load(gent_ptr + rows, mask=in_n, other=0.0)
    z = _logits_tile(
        h_ptr,
        w_ptr,
        row0,
        col0,
        n_left,
        v_left,
        H,
        stride_h,
        stride_w,
        inv_t,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
        DOT_PRECISION,
        DOT_UPCAST,
    )
    dz = dlogits_tile(
        z,
        m[:, None],
        log_s[:, None],
        ent[:, None],
        g_lp[:, None],
        g_ent[:, None],
        cn[None, :] == tgt[:, None],
    )
    tl.store(
        dz_ptr + row0 * stride_dz + col0 + (rn[:, None] * stride_dz + cn[None, :]),
        cast_to(dz * inv_t, dz_ptr.dtype.element_ty),
        mask=in_n[:, None] & (cn[None, :] < v_left),
    )


# Tile configurations per input dtype: (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages).
# 16-bit: the best of bench/results/2026-11-30-h200-tune-run2 (N = 16384, H = 4096, V = 128256 on
# an H200; 144 KiB of shared memory, within sm_80's 163 KiB). fp32 uses exact (ieee) products
# like torch's default fp32 matmul, with smaller tiles so that three stages fit on sm_80.
TILE_CONFIGS = {
    torch.bfloat16: (128, 256, 64, 8, 3),
    torch.float16: (128, 256, 64, 8, 3),
    torch.float32: (64, 64, 32, 4, 3),
}
_PRECISION = {torch.bfloat16: "tf32", torch.float16: "tf32", torch.float32: "ieee"}
TRITON_DTYPES = tuple(TILE_CONFIGS)  # what the Triton kernels take; the torch reference takes any


def check_triton_dtype(op, dtype):
    """TypeError naming `op` unless the Triton kernels take `dtype`."""
    if dtype not in TRITON_DTYPES:
        raise TypeError(
            f"{op}: the Triton kernels take hidden/weight in {TRITON_DTYPES}, got {dtype}; "
            f"cast them, or set NEMOKERN_BACKEND=torch for the (slower) torch reference"
        )


def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def linear_stats_triton(hidden, weight, targets, inv_t, vocab_start=0, with_entropy=True):
    """hidden [N, H], weight [Vs, H] (both row-contiguous, same dtype), targets [N] int64
    -> parts [S, N, 4] float32, one part per vocabulary split (entropy statistic always)."""
    check_triton_dtype("linear_logprobs", hidden.dtype)
    return stats_parts(hidden, weight, targets, inv_t, vocab_start)


def stats_parts(hidden, weight, targets, inv_t, vocab_start=0, z=None):
    """_linear_stats_kernel over every token: parts [S, N, 4]; z [N, V] (hidden's dtype) also
    receives the scaled logits when given (linear_policy_loss)."""
    n, h = hidden.shape
    bn, bv, bh, warps, stages = TILE_CONFIGS[hidden.dtype]
    n_tiles, v_tiles = max(1, triton.cdiv(n, bn)), triton.cdiv(weight.shape[0], bv)
    # Enough programs for two waves over the SMs; each split still walks many vocabulary tiles.
    splits = max(1, min(v_tiles, triton.cdiv(2 * _num_sms(hidden.device), n_tiles)))
    tiles_per_split = triton.cdiv(v_tiles, splits)
    splits = triton.cdiv(v_tiles, tiles_per_split)
    parts = torch.empty(splits, n, 4, dtype=torch.float32, device=hidden.device)
    if n == 0:
        return parts
    _linear_stats_kernel[(n_tiles, splits)](
        hidden,
        weight,
        targets,
        parts,
        hidden if z is None else z,  # never touched without STORE_Z
        n,
        weight.shape[0],
        h,
        hidden.stride(0),
        weight.stride(0),
        0 if z is None else z.stride(0),
        inv_t,
        vocab_start,
        tiles_per_split,
        BLOCK_N=bn,
        BLOCK_V=bv,
        BLOCK_H=bh,
        DOT_PRECISION=_PRECISION[hidden.dtype],
        DOT_UPCAST=interpreting(),
        STORE_Z=z is not None,
        num_warps=warps,
        num_stages=stages,
    )
    return parts


def linear_backward_triton(
    hidden,
    weight,
    targets,
    norm,
    entropy,
    g_lp,
    g_ent,
    inv_t,
    vocab_start=0,
    need_dh=True,
    need_dw=True,
):
    """(dhidden [N, H], dweight [Vs, H]), None where not needed; g_lp/g_ent [N] float32, zero on
    ignored rows (g_ent None: 0)."""
    g_ent = torch.zeros_like(g_lp) if g_ent is None else g_ent
    n, h = hidden.shape
    v = weight.shape[0]
    bn, bv, bh, warps, stages = TILE_CONFIGS[hidden.dtype]
    per_row = max(1, n) * hidden.element_size()
    chunk_cols = max(bv, (_BWD_CHUNK_BYTES // per_row) // bv * bv)
    dz = torch.empty(n, min(chunk_cols, v), dtype=hidden.dtype, device=hidden.device)

    def dlogits_chunk(c0, w_c):
        vc = w_c.shape[0]
        dz_c = dz[:, :vc]
        if n:
            _linear_dlogits_kernel[(triton.cdiv(n, bn), triton.cdiv(vc, bv))](
                hidden,
                w_c,
                targets,
                norm,
                entropy,
                g_lp,
                g_ent,
                dz_c,
                n,
                vc,
                h,
                hidden.stride(0),
                w_c.stride(0),
                dz_c.stride(0),
                inv_t,
                vocab_start + c0,
                BLOCK_N=bn,
                BLOCK_V=bv,
                BLOCK_H=bh,
                DOT_PRECISION=_PRECISION[hidden.dtype],
                DOT_UPCAST=interpreting(),
                num_warps=warps,
                num_stages=stages,
            )
        return dz_c

    return backward_by_vocab_chunks(hidden, weight, chunk_cols, dlogits_chunk, need_dh, need_dw)


# ----------------------------------------------------------------------------- entry points
# The op layer calls these two with the backend nemokern.ops chose; both implementations take the
# same arguments.


def forward(backend, hidden, weight, targets, inv_t, vocab_start, with_entropy):
    """Statistics parts [S, N, 4] of the logits hidden @ weight.T, never materialised."""
    fn = linear_stats_triton if backend == "triton" else linear_stats_torch
    return fn(hidden, weight, targets, inv_t, vocab_start, with_entropy)


def backward(
    backend,
    hidden,
    weight,
    targets,
    norm,
    entropy,
    g_lp,
    g_ent,
    inv_t,
    vocab_start,
    need_dh,
    need_dw,
):
    """(dhidden, dweight), None where not needed; g_ent None means no entropy gradient."""
    fn = linear_backward_triton if backend == "triton" else linear_backward_torch
    return fn(
        hidden,
        weight,
        targets,
        norm,
        entropy,
        g_lp,
        g_ent,
        inv_t,
        vocab_start,
        need_dh=need_dh,
        need_dw=need_dw,
    )


def _specs():
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    specs = []
    for dtype, dt in names.items():
        bn, bv, bh, warps, stages = TILE_CONFIGS[dtype]
        options = {"num_warps": warps, "num_stages": stages}
        const = {
            "BLOCK_N": bn,
            "BLOCK_V": bv,
            "BLOCK_H": bh,
            "DOT_PRECISION": _PRECISION[dtype],
            "DOT_UPCAST": False,
        }
        specs += [
            (
                _linear_stats_kernel,
                {
                    "h_ptr": f"*{dt}",
                    "w_ptr": f"*{dt}",
                    "tgt_ptr": "*i64",
                    "parts_ptr": "*fp32",
                    "z_ptr": f"*{dt}",
                    "N": "i32",
                    "V": "i32",
                    "H": "i32",
                    "stride_h": "i32",
                    "stride_w": "i32",
                    "stride_z": "i32",
                    "inv_t": "fp32",
                    "vocab_start": "i32",
                    "tiles_per_split": "i32",
                },
                {**const, "STORE_Z": store_z},
                options,
            )
            for store_z in (False, True)
        ]
        specs.append(
            (
                _linear_dlogits_kernel,
                {
                    "h_ptr": f"*{dt}",
                    "w_ptr": f"*{dt}",
                    "tgt_ptr": "*i64",
                    "norm_ptr": "*fp32",
                    "ent_ptr": "*fp32",
                    "glp_ptr": "*fp32",
                    "gent_ptr": "*fp32",
                    "dz_ptr": f"*{dt}",
                    "N": "i32",
                    "V": "i32",
                    "H": "i32",
                    "stride_h": "i32",
                    "stride_w": "i32",
                    "stride_dz": "i32",
                    "inv_t": "fp32",
                    "vocab_start": "i32",
                },
                const,
                options,
            )
        )
    return specs


AOT_SPECS = _specs()
