"""The REINFORCE loss sum_t coef_t * logp_t from hidden states and the LM head, with its gradients
w.r.t. hidden and weight formed during the forward pass, never holding the [N, V] logits: two
Triton kernels + a chunked torch reference.

The coefficients are known before the forward pass and the loss is linear in logp, so
d(loss)/dz_v = coef * ([v == target] - p_v) for z = logits / T: a row's gradient needs only the
row's softmax, which exists as soon as the row's logits over the whole vocabulary have been seen.
Counting the GEMM FLOPs in units of N*H*V (N tokens, H hidden, V vocabulary):
- linear_logprobs, then backward: 2 (logits) + 2 (recomputed in backward) + 2 (dhidden) +
  2 (dweight) = 8.
- two passes over the vocabulary inside the forward (statistics, then d(logits) chunks and the
  two gradient GEMMs): also 8, the logits GEMM runs twice because the logits are not kept.
- online over the vocabulary: dhidden = coef/T * (w_target - p @ W) accumulates like attention's
  output (rescaled as the running max grows), but dweight[v] = sum_n (...) p_nv h_n needs every
  token's final normaliser inside a sum over tokens: a second pass after all, 8 again.
- chosen, token chunks: the logits of C tokens x the whole vocabulary are computed once (2),
  reduced to the rows' statistics and turned into d(logits) in place; dhidden of those rows
  (2, complete after one GEMM over V) and dweight += d(logits)^T h (2): 6, three GEMMs, with a
  [C, V] scratch block instead of [N, V]. The price: dweight accumulates over N / C chunks, each
  reading and writing [V, H] (in fp32 for 16-bit inputs, so that it is rounded once: a [V, H]
  fp32 buffer lives during the forward): 2*C*V*H FLOPs per 8*V*H bytes, C / 4 FLOPs per byte,
  so a chunk must be wide enough for that accumulate to stay compute-bound (the GPU chunk is
  _policy_chunks.CHUNK_BYTES of logits: C = 1920 at V = 128256 bf16, 480 FLOPs per byte against
  an H200's ridge of ~200).
- vocab-parallel shards (the op's tp_group): a row's normaliser needs every shard, so no
  d(logits) can exist before the exchange of statistics. There the op runs linear_logprobs'
  statistics pass (`stats` below), its exchange, then linear_logprobs' vocabulary-chunk gradient
  pass with g_lp = coef (`backward` below): 8, no fp32 [V, H] buffer.

Importance-ratio clipping (the op's old_logprobs and clip): the per-token loss becomes
coef_t * f_t with f_t the ratio r_t = exp(logp_t - old_t), or clip(r_t) where the clip binds
(`ratio_terms`), and d(loss)/d(logp_t) = coef_t * r_t, 0 where clipped. That coefficient needs
the token's own logp, which exists once the row's statistics are merged: each token chunk's
coefficient is formed between its statistics and its d(logits), so the three GEMMs stay three
and no kernel changes (the d(logits) kernels take a per-row coefficient either way).

Entry points (the op layer passes the backend it chose): `forward` is the fused single-rank pass,
returning (logp [N], entropy [N], dhidden [N, H] or None, dweight [V, H] or None) for rows whose
targets all count (the op drops ignored rows before calling), gradients in the inputs' dtype;
`stats` and `backward` are the two halves around the vocab-parallel exchange (`stats` alone is
the no-gradient forward: one GEMM). The row statistics go through nemokern.kernels.logprobs'
`combine_stats`, the gradient through its `block_dlogits_torch` / `dlogits_tile`: no formula is
restated here.

Triton design (GPU), per token chunk: linear_logprobs' forward kernel with STORE_Z on (tl.dot
logits tiles folded into online statistics, vocabulary ranges split across programs) also stores
each scaled logits tile, in the input dtype, into the chunk block; after combine_stats a second,
elementwise kernel turns the block into d(logits) in place; cuBLAS does the two gradient GEMMs.
16-bit logits are rounded to the input dtype before d(logits) is formed, as eager PyTorch's own
bf16 logits are; the statistics (logp, entropy, the normaliser) come from the fp32 accumulators.
Tile configurations: linear_logprobs' `TILE_CONFIGS`. Speed on a GPU is unmeasured.

CPU reference, per token chunk: one GEMM into a reused scratch block, statistics from copies of
a few of its rows at a time (block_stats_torch overwrites its input), d(logits) in place by
block_dlogits_torch, then the same GEMM skeleton as the GPU (`_policy_chunks.by_token_chunks`).
Memory beyond the gradients: the block and the small copy.
"""

import torch
import triton
import triton.language as tl

from . import _policy_chunks as chunks
from . import linear_logprobs as _linear
from . import policy_loss_cublas
from ._policy_chunks import (
    all_rows,
    by_token_chunks,
    grad_coef,
    ratio_terms,  # noqa: F401 (the op's loss and coef gradient)
)
from ._rounding import cast_to
from .linear_logprobs import (
    TILE_CONFIGS,
    check_triton_dtype,
    scaled_logits,
)
from .logprobs import (
    block_dlogits_torch,
    block_stats_torch,
    combine_stats,
    dlogits_tile,
    row_chunk,
)

OP = "linear_policy_loss"  # named in the errors raised here
# Logits elements per token chunk on the CPU path: 32 MB of fp32, 262 tokens at V = 32000. Wider
# chunks run the GEMMs faster on a 2-core EPYC (the three GEMMs at N = 2048, H = 1024, V = 32000:
# ~1.5-2x the time at 256 rows as at 2048), but the scratch block is the op's only memory beyond
# the gradients themselves, and this size keeps it within 1/8 of eager's extra memory.
_TORCH_CHUNK_ELEMENTS = 1 << 23
# block_stats_torch overwrites its input: it gets copies of a few rows of the chunk at a time
# (4 MB of fp32), so the chunk's logits survive for d(logits) without a second full block.
_TORCH_STATS_ELEMENTS = 1 << 20
# Elementwise d(logits) kernel: (BLOCK_N, BLOCK_V, num_warps); untuned.
_DLOGITS_CONFIG = (16, 512, 4)


# ----------------------------------------------------------------------------- torch reference


def linear_policy_grads_torch(
    hidden,
    weight,
    targets,
    coef,
    inv_t,
    with_entropy=True,
    need_dh=True,
    need_dw=True,
    old_logp=None,
    bounds=None,
):
    """hidden [N, H], weight [V, H] (same dtype), targets [N] (all counted), coef [N] float32
    -> (logp [N], entropy [N], dhidden, dweight) of loss = sum(coef * logp), or with old_logp
    [N] float32 and bounds of sum(ratio_terms(...).loss); entropy is 0 unless with_entropy.
    Token chunks of about _TORCH_CHUNK_ELEMENTS / V rows."""
    n, v = hidden.shape[0], weight.shape[0]
    step = row_chunk(n, v, _TORCH_CHUNK_ELEMENTS)
    scratch = hidden.new_empty(min(n, step) * v)
    stats_step = row_chunk(min(n, step), v, _TORCH_STATS_ELEMENTS)
    stats_scratch = torch.empty(stats_step * v, dtype=torch.float32, device=hidden.device)

    def chunk_dlogits(h_c, t_c, g):
        z = scaled_logits(h_c, weight.t(), inv_t, scratch)
        parts = torch.cat(
            [
                block_stats_torch(
                    stats_scratch[: z[r : r + stats_step].numel()]
                    .view(-1, v)
                    .copy_(z[r : r + stats_step]),
                    t_c[r : r + stats_step],
                    0,
                    with_entropy,
                )
                for r in range(0, z.shape[0], stats_step)
            ]
        )
        logp, norm, entropy = combine_stats(parts.unsqueeze(0), all_rows(t_c))
        dz = block_dlogits_torch(z, t_c, norm, entropy, g(logp), None, inv_t)
        return logp, entropy, dz.to(hidden.dtype)

    g_of = grad_coef(coef, old_logp, bounds)
    return by_token_chunks(hidden, weight, targets, g_of, step, chunk_dlogits, need_dh, need_dw)


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _policy_dlogits_kernel(
    z_ptr,
    tgt_ptr,
    norm_ptr,
    coef_ptr,
    N,
    V,
    stride_z,
    inv_t,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """z [N, V] scaled logits -> d(sum coef * logp)/d(logits), in place, in z's dtype."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    in_n = rows < N
    mask = in_n[:, None] & (cols[None, :] < V)
    tgt = tl.load(tgt_ptr + rows, mask=in_n, other=-1)
    m = tl.load(norm_ptr + rows * 2, mask=in_n, other=float("inf"))
    log_s = tl.load(norm_ptr + rows * 2 + 1, mask=in_n, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=in_n, other=0.0)
    ptrs = z_ptr + rows[:, None] * stride_z + cols[None, :]
    z = tl.load(ptrs, mask=mask, other=-float("inf")).to(tl.float32)
    dz = dlogits_tile(
        z, m[:, None], log_s[:, None], 0.0, coef[:, None], 0.0, cols[None, :] == tgt[:, None]
    )
    tl.store(ptrs, cast_to(dz * inv_t, z_ptr.dtype.element_ty), mask=mask)


def linear_policy_grads_triton(
    hidden,
    weight,
    targets,
    coef,
    inv_t,
    with_entropy=True,
    need_dh=True,
    need_dw=True,
    old_logp=None,
    bounds=None,
):
    """The Triton path of linear_policy_grads_torch (same arguments and results; the entropy is
    computed whatever with_entropy says): token chunks whose logits block in hidden's dtype is
    about _policy_chunks.CHUNK_BYTES."""
    n, h = hidden.shape
    v = weight.shape[0]
    bn = TILE_CONFIGS[hidden.dtype][0]
    step = max(bn, chunks.CHUNK_BYTES // (v * hidden.element_size()) // bn * bn)
    z_block = torch.empty(min(n, step), v, dtype=hidden.dtype, device=hidden.device)
    dn, dv, dwarps = _DLOGITS_CONFIG

    def chunk_dlogits(h_c, t_c, g):
        c = h_c.shape[0]
        z = z_block[:c]
        parts = _linear.stats_parts(h_c, weight, t_c, inv_t, 0, z=z)
        logp, norm, entropy = combine_stats(parts, all_rows(t_c))
        g_c = g(logp).contiguous()
        _policy_dlogits_kernel[(triton.cdiv(c, dn), triton.cdiv(v, dv))](
            z, t_c, norm, g_c, c, v, z.stride(0), inv_t, BLOCK_N=dn, BLOCK_V=dv, num_warps=dwarps
        )
        return logp, entropy, z

    g_of = grad_coef(coef, old_logp, bounds)
    return by_token_chunks(hidden, weight, targets, g_of, step, chunk_dlogits, need_dh, need_dw)


# ----------------------------------------------------------------------------- entry points
# The op layer calls these with the backend nemokern.ops chose; both implementations take the
# same arguments.


def forward(
    backend,
    hidden,
    weight,
    targets,
    coef,
    inv_t,
    with_entropy,
    need_dh,
    need_dw,
    old_logp=None,
    bounds=None,
):
    """One rank, every row counted: (logp [N], entropy [N], dhidden or None, dweight or None) of
    loss = sum(coef * logp), or with old_logp [N] float32 and bounds (lo, hi) of the clipped
    ratio objective sum(ratio_terms(logp, old_logp, coef, bounds).loss), the gradients formed in
    this pass (need_dh or need_dw should hold; without either, `stats` is the cheaper
    forward)."""
    if backend == "triton":
        check_triton_dtype(OP, hidden.dtype)
        fn = policy_loss_cublas.choose(hidden) or linear_policy_grads_triton
    else:
        fn = linear_policy_grads_torch
    return fn(
        hidden,
        weight,
        targets,
        coef,
        inv_t,
        with_entropy,
        need_dh=need_dh,
        need_dw=need_dw,
        old_logp=old_logp,
        bounds=bounds,
    )


def stats(backend, hidden, weight, targets, inv_t, vocab_start, with_entropy):
    """Statistics parts [S, N, 4] of a weight holding vocabulary ids [vocab_start, ...):
    linear_logprobs' forward, for the no-gradient forward and before the vocab-parallel
    exchange."""
    if backend == "triton":
        check_triton_dtype(OP, hidden.dtype)
    return _linear.forward(backend, hidden, weight, targets, inv_t, vocab_start, with_entropy)


def backward(
    backend, hidden, weight, targets, norm, entropy, coef, inv_t, vocab_start, need_dh, need_dw
):
    """(dhidden, dweight) of sum(coef * logp) on one vocabulary shard from the merged row
    statistics (norm, entropy of combine_stats): linear_logprobs' backward with g_lp = coef, no
    entropy gradient (for the clipped objective, coef is ratio_terms' g_lp). Runs inside the
    op's forward, right after the exchange."""
    return _linear.backward(
        backend,
        hidden,
        weight,
        targets,
        norm,
        entropy,
        coef,
        None,
        inv_t,
        vocab_start,
        need_dh,
        need_dw,
    )


def _specs():
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    specs = []
    dn, dv, dwarps = _DLOGITS_CONFIG
    for dtype, dt in names.items():
        bn, bv, bh, warps, stages = TILE_CONFIGS[dtype]
        specs.append(
            (
                _policy_dlogits_kernel,
                {
                    "z_ptr": f"*{dt}",
                    "tgt_ptr": "*i64",
                    "norm_ptr": "*fp32",
                    "coef_ptr": "*fp32",
                    "N": "i32",
                    "V": "i32",
                    "stride_z": "i32",
                    "inv_t": "fp32",
                },
                {"BLOCK_N": dn, "BLOCK_V": dv},
                {"num_warps": dwarps},
            )
        )
    return specs


AOT_SPECS = _specs()
