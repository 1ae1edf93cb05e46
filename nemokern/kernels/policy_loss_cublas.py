"""linear_policy_loss's fused single-rank pass, second CUDA implementation: each token chunk's
logits by cuBLAS, one Triton kernel over that chunk, the two gradient GEMMs by cuBLAS.

Per token chunk of C rows (the same 6 N*H*V FLOPs as kernels/linear_policy_loss.py's design):
1. z = hidden_c @ weight.T by torch.mm into a reused [C, V] block in the inputs' dtype (bf16
   logits rounded as eager PyTorch rounds its own);
2. `_chunk_policy_kernel`, one program per row, reads the row twice: online statistics (max,
   sum-exp, entropy numerator, target logit) of z / T, then d(sum coef * logp)/d(logits) written
   over the row in place (nemokern.kernels.logprobs' `online_softmax_step` and `dlogits_tile`:
   no formula restated); logp and entropy follow from the statistics by `combine_stats`;
3. dhidden_c = dz @ weight and dweight += dz.T @ hidden_c (fp32 accumulator) by cuBLAS, in
   kernels/_policy_chunks.py's `by_token_chunks`, the skeleton every path of the op shares.
With importance-ratio clipping (the op's old_logprobs and clip) the coefficient of d(logits)
depends on the token's own logp (kernels/_policy_chunks.py's `ratio_terms`): the kernel then
runs twice, statistics first and d(logits) after the coefficient is formed.

Which path kernels/linear_policy_loss.py runs on a GPU (this one or its all-Triton path, which
computes the logits with tl.dot) and this path's chunk rows come from a table measured on that
GPU: `bench/tune_gpu.py --only policy --table FILE` times both and writes it; the table read here
is TABLE (a JSON file beside this module). Without the file, or for a device or dtype it does not
name, the all-Triton path runs. Speed on a GPU is unmeasured.
"""

import functools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import _policy_chunks as chunks
from ._policy_chunks import all_rows, by_token_chunks, grad_coef
from ._rounding import cast_to
from .logprobs import combine_stats, dlogits_tile, online_softmax_step

TABLE = Path(__file__).with_name("policy_loss_paths.json")
PATHS = ("triton", "cublas")  # the table's choices
# (BLOCK_V, num_warps) of the per-row kernel: logprobs' backward configuration (a row read and
# written in 4096-wide blocks); untuned.
_CONFIG = (4096, 8)


@triton.jit
def _chunk_policy_kernel(
    z_ptr,
    tgt_ptr,
    coef_ptr,
    parts_ptr,
    norm_ptr,
    V,
    stride_z,
    inv_t,
    BLOCK_V: tl.constexpr,
    STATS: tl.constexpr,
    DLOGITS: tl.constexpr,
):
    """Row `program_id` of the logits block z [C, V] (unscaled, any float dtype). STATS: its
    statistics parts (m, s, t, zt of z / T) -> parts [C, 4] float32 (a target outside [0, V)
    gives a NaN zt). DLOGITS: z's row is overwritten by coef * d(logp)/d(logits) in z's dtype,
    from this pass's statistics, or without STATS from norm [C, 2] = (m, log s)."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    tgt = tl.load(tgt_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    if STATS:
        m = -float("inf")
        s = 0.0
        t = 0.0
        for start in range(0, V, BLOCK_V):
            z = tl.load(z_row + start + cols, mask=start + cols < V, other=-float("inf"))
            m, s, t = online_softmax_step(m, s, t, z.to(tl.float32) * inv_t, 0)
        inside = (tgt >= 0) & (tgt < V)
        zt = tl.load(z_row + tl.where(inside, tgt, 0)).to(tl.float32) * inv_t
        zt = tl.where(inside, zt, float("nan"))
        tl.store(parts_ptr + row * 4 + 0, m)
        tl.store(parts_ptr + row * 4 + 1, s)
        tl.store(parts_ptr + row * 4 + 2, t)
        tl.store(parts_ptr + row * 4 + 3, zt)
        log_s = tl.log(s)
    else:
        m = tl.load(norm_ptr + row * 2)
        log_s = tl.load(norm_ptr + row * 2 + 1)
    if DLOGITS:
        coef = tl.load(coef_ptr + row)
        for start in range(0, V, BLOCK_V):
            in_v = start + cols < V
            z = tl.load(z_row + start + cols, mask=in_v, other=-float("inf"))
            dz = dlogits_tile(
                z.to(tl.float32) * inv_t, m, log_s, 0.0, coef, 0.0, start + cols == tgt
            )
            tl.store(z_row + start + cols, cast_to(dz * inv_t, z_ptr.dtype.element_ty), mask=in_v)


def _launch(z, targets, coef, parts, norm, inv_t, stats, dlogits):
    c, v = z.shape
    if c:
        block_v, warps = _CONFIG
        _chunk_policy_kernel[(c,)](
            z,
            targets,
            z if coef is None else coef,  # never read without DLOGITS
            z if parts is None else parts,  # never written without STATS
            z if norm is None else norm,  # never read with STATS
            v,
            z.stride(0),
            inv_t,
            BLOCK_V=block_v,
            STATS=stats,
            DLOGITS=dlogits,
            num_warps=warps,
        )


def chunk_policy(z, targets, coef, inv_t):
    """The kernel's fused pass over a logits block z [C, V] (row-contiguous) with targets [C]
    int64 and coef [C] float32: returns parts [1, C, 4]; z now holds
    d(sum coef * logp)/d(logits)."""
    parts = torch.empty(z.shape[0], 4, dtype=torch.float32, device=z.device)
    _launch(z, targets, coef, parts, None, inv_t, True, True)
    return parts.unsqueeze(0)


def chunk_stats(z, targets, inv_t):
    """The statistics pass alone: parts [1, C, 4]; z is left as it is."""
    parts = torch.empty(z.shape[0], 4, dtype=torch.float32, device=z.device)
    _launch(z, targets, None, parts, None, inv_t, True, False)
    return parts.unsqueeze(0)


def chunk_dlogits(z, targets, norm, coef, inv_t):
    """The d(logits) pass alone, from the rows' merged statistics norm [C, 2] (combine_stats):
    z now holds d(sum coef * logp)/d(logits)."""
    _launch(z, targets, coef, None, norm, inv_t, False, True)


def default_chunk_rows(v, element_size):
    """Rows of a chunk whose logits block is kernels/_policy_chunks.py's CHUNK_BYTES (the
    all-Triton path's block), in multiples of 128 rows where that fits."""
    rows = chunks.CHUNK_BYTES // (v * element_size)
    return max(1, rows // 128 * 128 if rows >= 128 else rows)


def linear_policy_grads_cublas(
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
    chunk_rows=None,
):
    """kernels/linear_policy_loss.py's linear_policy_grads_triton by this module's design (same
    arguments and results; the entropy is computed whatever with_entropy says), chunk_rows
    tokens per chunk (None: default_chunk_rows). The plain coefficient is known before a chunk's
    logits: one fused pass. The clipped one (old_logp) needs the chunk's log-probs first: the
    statistics pass, combine_stats, the coefficient, then the d(logits) pass."""
    n, v = hidden.shape[0], weight.shape[0]
    step = chunk_rows or default_chunk_rows(v, hidden.element_size())
    z_block = torch.empty(min(n, step), v, dtype=hidden.dtype, device=hidden.device)

    def chunk(h_c, t_c, g):
        z = torch.mm(h_c, weight.t(), out=z_block[: h_c.shape[0]])
        if old_logp is None:  # g does not depend on the log-probs
            parts = chunk_policy(z, t_c, g(None).contiguous(), inv_t)
            logp, _, entropy = combine_stats(parts, all_rows(t_c))
        else:
            logp, norm, entropy = combine_stats(chunk_stats(z, t_c, inv_t), all_rows(t_c))
            chunk_dlogits(z, t_c, norm, g(logp).contiguous(), inv_t)
        return logp, entropy, z

    g_of = grad_coef(coef, old_logp, bounds)
    return by_token_chunks(hidden, weight, targets, g_of, step, chunk, need_dh, need_dw)


# ----------------------------------------------------------------------------- dispatch table


def device_key(device):
    """The table's name for a device: the CUDA device's name, "cpu" otherwise (interpreter)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def read_table(path):
    """{device name: {dtype name: {"path": "triton"|"cublas", "chunk_rows": int, optional}}}
    from the JSON file `path` (its "paths" entry); {} when the file does not exist. A malformed
    file raises ValueError naming it and the entry."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        paths = json.loads(path.read_text())["paths"]
        entries = [(d, t, e) for d, by_dtype in paths.items() for t, e in by_dtype.items()]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path}: not a path table ({exc!r}); bench/tune_gpu.py writes one"
        ) from None
    for device, dtype, entry in entries:
        rows = entry.get("chunk_rows") if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or entry.get("path") not in PATHS
            or not (rows is None or (isinstance(rows, int) and rows > 0))
        ):
            raise ValueError(
                f"{path}: paths[{device!r}][{dtype!r}] = {entry!r}; expected "
                f'{{"path": one of {PATHS}, "chunk_rows": a positive integer (optional)}}'
            )
    return paths


def write_table(path, timings, measured):
    """Write the table of the fastest path per (device, dtype) of `timings`: dicts with device,
    dtype (a name such as "bfloat16"), path, chunk_rows (None for "triton") and seconds;
    `measured` (the run's machine, versions and shape) is kept beside it. Returns the paths."""
    paths = {}
    for t in sorted(timings, key=lambda t: t["seconds"]):
        entry = {"path": t["path"]}
        if t["path"] == "cublas":
            entry["chunk_rows"] = t["chunk_rows"]
        paths.setdefault(t["device"], {}).setdefault(t["dtype"], entry)
    Path(path).write_text(json.dumps({"measured": measured, "paths": paths}, indent=1) + "\n")
    return paths


@functools.cache
def _table():
    return read_table(TABLE)


def choose(hidden):
    """The fused-pass function the table picks for hidden's device and dtype: the cuBLAS path
    (its chunk rows bound), or None for the all-Triton path (no entry, or "triton")."""
    entry = _table().get(device_key(hidden.device), {}).get(str(hidden.dtype).split(".")[-1])
    if not entry or entry["path"] != "cublas":
        return None
    return functools.partial(linear_policy_grads_cublas, chunk_rows=entry.get("chunk_rows"))


def _specs():
    block_v, warps = _CONFIG
    return [
        (
            _chunk_policy_kernel,
            {
                "z_ptr": f"*{dt}",
                "tgt_ptr": "*i64",
                "coef_ptr": "*fp32",
                "parts_ptr": "*fp32",
                "norm_ptr": "*fp32",
                "V": "i32",
                "stride_z": "i32",
                "inv_t": "fp32",
            },
            {"BLOCK_V": block_v, "STATS": stats, "DLOGITS": dlogits},
            {"num_warps": warps},
        )
        for dt in ("bf16", "fp16", "fp32")
        for stats, dlogits in ((True, True), (True, False), (False, True))
    ]


AOT_SPECS = _specs()
