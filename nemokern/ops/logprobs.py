"""Public log-prob ops: `logprobs` (from logits) and `linear_logprobs` (fused with the LM head,
optionally over vocab-parallel shards). Validation, temperature, ignore_index, entropy, dispatch
and autograd live here; the math lives in nemokern.kernels.logprobs / linear_logprobs.

Must never import nemokern.parallel, model, data, train or cli: tp_group is a plain
torch.distributed process group.

Conventions shared by both ops:
- z = logits / temperature; logp = z[target] - logsumexp(z) (float32);
  entropy = -sum_v p_v log p_v of softmax(z) (float32).
- Positions whose target == ignore_index give logp = 0 AND entropy = 0, and no gradient.
- Gradients flow from both outputs in one backward pass; a second derivative raises (the
  backward is not itself differentiable) rather than returning a wrong one.
- A nan logit in a counted row gives a nan log-prob and nan gradients in that row, as eager
  PyTorch does; ignored rows give 0 and a zero gradient whatever they hold. linear_logprobs
  runs its GEMMs on the counted rows only (one host sync to find them), so ignored prompt
  tokens cost no FLOPs and nan/inf hidden states there touch nothing.
- Targets outside [0, V) (other than ignore_index) raise ValueError. The check costs one small
  reduction and, on a GPU, one host sync per call; NEMOKERN_CHECK_TARGETS=0 skips it (and, with
  tp_group, the fixed-size all_gather that checks N, shard sizes and targets first). Unchecked,
  the Triton kernels never read out of bounds: `logprobs` returns NaN for such a row and
  `linear_logprobs` returns -logsumexp (the target logit counts as 0).
"""
import math
import numbers
import os

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..kernels import linear_logprobs as _linear
from ..kernels import logprobs as _logits
from ._dispatch import backend_for, device_guard


# ----------------------------------------------------------------------------- validation

def _inv_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number (e.g. 0.7), got "
                        f"{type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return 1.0 / float(temperature)


def _flat_targets(targets, lead_shape, what):
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an int64 tensor of token ids, got {got}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"targets has shape {tuple(targets.shape)} but {what} needs "
                         f"{tuple(lead_shape)} (one target id per position)")
    return targets.reshape(-1).to(torch.int64).contiguous()


def _checks_enabled():
    return os.environ.get("NEMOKERN_CHECK_TARGETS", "1") != "0"


def _check_targets(targets, vocab, ignore_index):
    if not _checks_enabled():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets[{i}] (flattened) = {int(targets[i])} is outside the vocabulary "
                         f"[0, {vocab}) and is not ignore_index={ignore_index}; fix the ids or "
                         f"mark the position with ignore_index")


def _check_float(name, t):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")


def _upstream(grad, valid, keep_none=False):
    """Upstream grad as contiguous float32, zero on ignored rows (None -> zeros, or None with
    keep_none: the torch path skips the entropy term's passes when it gets no gradient)."""
    if grad is None:
        if keep_none:
            return None
        return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    return torch.where(valid, grad.float(), torch.zeros((), device=grad.device)).contiguous()


# ----------------------------------------------------------------------------- logits op

class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, inv_t, ignore_index, with_entropy):
        backend = backend_for(logits)
        with device_guard(logits.device):
            if backend == "triton":
                parts = _logits.logprobs_stats_triton(logits, targets, inv_t, ignore_index)
            else:
                parts = _logits.logprobs_stats_torch(logits, targets, inv_t, with_entropy)
        valid = targets != ignore_index
        logp, norm, entropy = _logits.combine_stats(parts, valid)
        ctx.save_for_backward(logits, targets, norm, entropy)
        ctx.inv_t, ctx.ignore_index, ctx.backend = inv_t, ignore_index, backend
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        logits, targets, norm, entropy = ctx.saved_tensors
        valid = targets != ctx.ignore_index
        g_lp = _upstream(g_lp, valid)
        g_ent = _upstream(g_ent, valid, keep_none=ctx.backend == "torch")
        with device_guard(logits.device):
            if ctx.backend == "triton":
                grad = _logits.logprobs_backward_triton(logits, targets, norm, entropy, g_lp,
                                                        g_ent, ctx.inv_t, ctx.ignore_index)
            else:
                grad = _logits.logprobs_backward_torch(logits, targets, norm, entropy, g_lp, g_ent,
                                                       ctx.inv_t)
        return grad, None, None, None, None


def logprobs(logits, targets, *, temperature=1.0, ignore_index=-100, return_entropy=False):
    """Log-probability of each target token under softmax(logits / temperature).

    logits [..., V] any float dtype, targets [...] int64 -> logp [...] float32 (0 where
    target == ignore_index); with return_entropy, (logp, entropy [...] float32, 0 where ignored).
    Differentiable w.r.t. logits through both outputs. Never allocates an [..., V] float32
    temporary (CUDA: one Triton pass over V forward, one backward; CPU: row chunks).
    """
    _check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    inv_t = _inv_temperature(temperature)
    ignore_index = int(ignore_index)
    flat_t = _flat_targets(targets, logits.shape[:-1], "logits[..., V]")
    if flat_t.device != logits.device:
        raise ValueError(f"targets is on {flat_t.device} but logits on {logits.device}")
    vocab = logits.shape[-1]
    _check_targets(flat_t, vocab, ignore_index)
    x = logits.reshape(-1, vocab)
    if x.stride(-1) != 1:
        x = x.contiguous()
    logp, entropy = _LogProbs.apply(x, flat_t, inv_t, ignore_index, return_entropy)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp


# ----------------------------------------------------------------------------- linear op

def _kept_rows(valid):
    """Indices of the rows that count (target != ignore_index), or None when every row does.

    The linear op runs its GEMMs on these rows only: in RLHF the prompt tokens are ignored, often
    half of a packed batch, and their logits would be computed (twice) for nothing. One host sync.
    """
    n_kept = int(valid.sum())
    return None if n_kept == valid.numel() else valid.nonzero().squeeze(1)


def _scatter_rows(x, rows, n):
    """x [n_kept, ...] -> [n, ...] with zeros on the rows not kept."""
    if rows is None:
        return x
    return x.new_zeros((n,) + tuple(x.shape[1:])).index_copy_(0, rows, x)


_FINGERPRINT_MOD = 8388593  # a prime below 2**23: products of two residues fit in int64


def _targets_fingerprint(targets):
    """A position-weighted checksum of the target ids (an int in [0, _FINGERPRINT_MOD))."""
    p = _FINGERPRINT_MOD
    pos = torch.arange(1, targets.numel() + 1, device=targets.device) % p
    return int(((targets % p) * pos % p).sum() % p)


def _check_same_call(targets, n_kept, group, shard):
    """Fixed-size exchange BEFORE the variable-size one: every rank's (shard size, N, kept
    rows, targets fingerprint), 4 int64 per rank in one all_gather, compared on every rank.

    The statistics exchange that follows has N rows per rank; ranks with different N would
    mismatch that collective itself (gloo or NCCL may abort the process or hang inside it,
    before any message), so N travels first in a collective whose size cannot differ. Unequal
    shards (a tensor_split of an unpadded vocabulary) would look for targets at the wrong
    columns, and different targets would merge statistics of different tokens. Every rank sees
    every header, so every rank raises the same ValueError.
    """
    n = targets.numel()
    header = torch.tensor([shard, n, n_kept, _targets_fingerprint(targets)], dtype=torch.int64,
                          device=targets.device)
    headers = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(headers, header, group=group)
    sizes, ns, kept, prints = torch.stack(headers).cpu().T.tolist()
    if any(x != n for x in ns):
        raise ValueError(f"linear_logprobs: the ranks of tp_group passed different numbers of "
                         f"tokens {ns} (this rank, {dist.get_rank(group)}: {n}); vocab-parallel "
                         f"ranks must see the same tokens and targets")
    if any(x != shard for x in sizes):
        raise ValueError(f"linear_logprobs: the ranks of tp_group hold vocabulary shards of "
                         f"sizes {sizes}; every rank needs an equal shard [V / tp, H] (pad the "
                         f"vocabulary to a multiple of tp, as Megatron does)")
    if any(x != kept[0] for x in kept) or any(x != prints[0] for x in prints):
        raise ValueError(f"linear_logprobs: the ranks of tp_group passed different targets "
                         f"(counted positions per rank: {kept}); vocab-parallel ranks must see "
                         f"the same tokens and targets")


def _gather_parts(parts, rows, targets, group, shard):
    """The vocab-parallel exchange: every rank's merged statistics (max, sum-exp, entropy sum,
    target logit) of the kept rows -> [tp, n_kept, 4] on every rank.

    Two all_gathers: the fixed-size header check (_check_same_call; skipped with
    NEMOKERN_CHECK_TARGETS=0, which leaves mismatched ranks to the backend), then the
    statistics at full length N (zeros on ignored rows).
    """
    n = targets.numel()
    if _checks_enabled():
        _check_same_call(targets, n if rows is None else rows.numel(), group, shard)
    local = _scatter_rows(_logits.merge_parts(parts), rows, n).contiguous()
    bufs = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(bufs, local, group=group)
    gathered = torch.stack(bufs)
    return gathered if rows is None else gathered[:, rows]


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t, ignore_index, vocab_start, tp_group,
                with_entropy):
        backend = backend_for(hidden, weight)
        if backend == "triton" and hidden.dtype not in _linear.TRITON_DTYPES:
            raise TypeError(f"linear_logprobs: the Triton kernels take hidden/weight in "
                            f"{_linear.TRITON_DTYPES}, got {hidden.dtype}; cast them, or set "
                            f"NEMOKERN_BACKEND=torch for the (slower) torch reference")
        rows = _kept_rows(targets != ignore_index)
        h, t = (hidden, targets) if rows is None else (hidden[rows], targets[rows])
        if t.numel() == 0:
            parts = torch.zeros(1, 0, 4, dtype=torch.float32, device=hidden.device)
        else:
            with device_guard(hidden.device):
                if backend == "triton":
                    parts = _linear.linear_stats_triton(h, weight, t, inv_t, vocab_start)
                else:
                    parts = _linear.linear_stats_torch(h, weight, t, inv_t, vocab_start,
                                                       with_entropy)
        if tp_group is not None:
            # every rank holds the same targets, hence the same kept rows
            shard = weight.shape[0]
            parts = _gather_parts(parts, rows, targets, tp_group, shard)
            # checked only now that the shards are known to be equal: all ranks agree on vocab
            _check_targets(targets, shard * parts.shape[0], ignore_index)
        logp, norm, entropy = _logits.combine_stats(parts, t != ignore_index)
        ctx.save_for_backward(hidden, weight, t, rows, norm, entropy)
        ctx.inv_t, ctx.ignore_index, ctx.backend = inv_t, ignore_index, backend
        ctx.vocab_start, ctx.tp_group = vocab_start, tp_group
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        return _scatter_rows(logp, rows, n), _scatter_rows(entropy, rows, n)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, t, rows, norm, entropy = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        kept = torch.ones_like(t, dtype=torch.bool)  # t holds the kept rows' targets only
        if rows is not None:
            g_lp, g_ent = (None if g is None else g[rows] for g in (g_lp, g_ent))
        g_lp = _upstream(g_lp, kept)
        g_ent = _upstream(g_ent, kept, keep_none=ctx.backend == "torch")
        h = hidden if rows is None else hidden[rows]
        if t.numel() == 0:
            dh = torch.zeros_like(h) if need_dh else None
            dw = torch.zeros_like(weight) if need_dw else None
        else:
            fn = (_linear.linear_backward_triton if ctx.backend == "triton"
                  else _linear.linear_backward_torch)
            with device_guard(hidden.device):
                dh, dw = fn(h, weight, t, norm, entropy, g_lp, g_ent, ctx.inv_t,
                            ctx.vocab_start, need_dh=need_dh, need_dw=need_dw)
        if ctx.tp_group is not None and dh is not None:
            # hidden is replicated across the group and each shard saw only its vocabulary:
            # the full dhidden is the sum over shards (Megatron's column-parallel input grad).
            dist.all_reduce(dh, group=ctx.tp_group)
        if dh is not None:
            dh = _scatter_rows(dh, rows, hidden.shape[0])
        return dh, dw, None, None, None, None, None, None


def linear_logprobs(hidden, weight, targets, *, temperature=1.0, ignore_index=-100,
                    return_entropy=False, tp_group=None):
    """`logprobs(hidden @ weight.T, targets, ...)` without materialising the [..., V] logits.

    hidden [..., H], weight [V, H] (same dtype), targets [...] int64 -> logp [...] float32
    (and entropy [...] with return_entropy). With tp_group, weight is this rank's shard
    [V / tp, H] holding vocabulary ids [rank * V/tp, (rank + 1) * V/tp) (equal shards, as
    Megatron's padded vocabulary; unequal ones raise ValueError), targets are global ids and the
    same on every rank (different ones raise ValueError), hidden is replicated; every rank gets
    the full result. Forward exchanges 4 int64 per rank (N, shard size and a targets checksum,
    checked on every rank so that mismatched ranks raise ValueError before any variable-size
    collective), then 4 floats per token; backward all-reduces dhidden of the counted rows once.
    Differentiable w.r.t. hidden and weight.
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be the LM head [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must end in H = weight.shape[1] = "
                         f"{weight.shape[1]}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one "
                        f"(usually hidden.to(weight.dtype))")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight on {weight.device}")
    if weight.shape[0] < 1:
        raise ValueError("weight has no vocabulary rows")
    inv_t = _inv_temperature(temperature)
    ignore_index = int(ignore_index)
    flat_t = _flat_targets(targets, hidden.shape[:-1], "hidden[..., H]")
    if flat_t.device != hidden.device:
        raise ValueError(f"targets is on {flat_t.device} but hidden on {hidden.device}")
    shard = weight.shape[0]
    vocab_start, vocab = 0, shard
    if tp_group is not None:
        if not dist.is_initialized():
            raise RuntimeError("tp_group given but torch.distributed is not initialised")
        vocab_start = dist.get_rank(tp_group) * shard
    else:
        _check_targets(flat_t, vocab, ignore_index)  # with tp_group: after the exchange
    h = hidden.reshape(-1, hidden.shape[-1])
    h = h if h.is_contiguous() else h.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    logp, entropy = _LinearLogProbs.apply(h, w, flat_t, inv_t, ignore_index, vocab_start,
                                          tp_group, return_entropy)
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp
