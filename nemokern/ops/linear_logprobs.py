"""Public op `linear_logprobs`: `logprobs(hidden @ weight.T, targets)` without the [N, V] logits,
optionally over a vocabulary sharded across a tensor-parallel group.

Validation, dispatch, the vocab-parallel exchange and autograd; the math lives in
nemokern/kernels/linear_logprobs.py, the conventions (ignore_index, entropy, nan rows, target
checks) are those of ops/logprobs.py. The GEMMs run on the counted rows only (one host sync to
find them), so ignored prompt tokens cost no FLOPs and nan/inf hidden states there touch nothing.
tp_group is a plain torch.distributed process group; the collectives are nemokern.parallel's.
"""

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..kernels import linear_logprobs as _k
from ..kernels.logprobs import combine_stats, merge_parts
from ..parallel import all_gather, all_reduce
from . import _checks
from ._dispatch import backend_for, device_guard
from .logprobs import upstream

OP = "linear_logprobs"


def kept_rows(valid):
    """Indices of the rows that count (target != ignore_index), or None when every row does.

    The linear op runs its GEMMs on these rows only: in RLHF the prompt tokens are ignored, often
    half of a packed batch, and their logits would be computed (twice) for nothing. One host sync.
    """
    n_kept = int(valid.sum())
    return None if n_kept == valid.numel() else valid.nonzero().squeeze(1)


def scatter_rows(x, rows, n):
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


def _check_same_call(targets, n_kept, group, shard, op=OP):
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
    header = torch.tensor(
        [shard, n, n_kept, _targets_fingerprint(targets)], dtype=torch.int64, device=targets.device
    )
    sizes, ns, kept, prints = all_gather(header, group).cpu().T.tolist()
    if any(x != n for x in ns):
        raise ValueError(
            f"{op}: the ranks of tp_group passed different numbers of tokens {ns} (this rank, "
            f"{dist.get_rank(group)}: {n}); vocab-parallel ranks must see the same tokens and "
            "targets"
        )
    if any(x != shard for x in sizes):
        raise ValueError(
            f"{op}: the ranks of tp_group hold vocabulary shards of sizes {sizes}; every rank "
            "needs an equal shard [V / tp, H] (pad the vocabulary to a multiple of tp, as "
            "Megatron does)"
        )
    if any(x != kept[0] for x in kept) or any(x != prints[0] for x in prints):
        raise ValueError(
            f"{op}: the ranks of tp_group passed different targets (counted positions per rank: "
            f"{kept}); vocab-parallel ranks must see the same tokens and targets"
        )


def gather_parts(parts, rows, targets, group, shard, op=OP):
    """The vocab-parallel exchange: every rank's merged statistics (max, sum-exp, entropy sum,
    target logit) of the kept rows -> [tp, n_kept, 4] on every rank.

    Two all_gathers: the fixed-size header check (_check_same_call; skipped with
    NEMOKERN_CHECK_TARGETS=0, which leaves mismatched ranks to the backend), then the
    statistics at full length N (zeros on ignored rows). Shared with linear_policy_loss; `op`
    names the caller in the errors.
    """
    n = targets.numel()
    if _checks.targets_checked():
        _check_same_call(targets, n if rows is None else rows.numel(), group, shard, op)
    local = scatter_rows(merge_parts(parts), rows, n).contiguous()
    gathered = all_gather(local, group)
    return gathered if rows is None else gathered[:, rows]


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, targets, inv_t, ignore_index, vocab_start, tp_group, with_entropy
    ):
        backend = backend_for(hidden, weight)
        rows = kept_rows(targets != ignore_index)
        h, t = (hidden, targets) if rows is None else (hidden[rows], targets[rows])
        if t.numel() == 0:
            parts = torch.zeros(1, 0, 4, dtype=torch.float32, device=hidden.device)
        else:
            with device_guard(hidden.device):
                parts = _k.forward(backend, h, weight, t, inv_t, vocab_start, with_entropy)
        if tp_group is not None:
            # every rank holds the same targets, hence the same kept rows
            shard = weight.shape[0]
            parts = gather_parts(parts, rows, targets, tp_group, shard)
            # checked only now that the shards are known to be equal: all ranks agree on vocab
            _checks.targets_in_vocab(OP, targets, shard * parts.shape[0], ignore_index)
        logp, norm, entropy = combine_stats(parts, t != ignore_index)
        ctx.save_for_backward(hidden, weight, t, rows, norm, entropy)
        ctx.inv_t, ctx.ignore_index, ctx.backend = inv_t, ignore_index, backend
        ctx.vocab_start, ctx.tp_group = vocab_start, tp_group
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        return scatter_rows(logp, rows, n), scatter_rows(entropy, rows, n)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_lp, g_ent):
        hidden, weight, t, rows, norm, entropy = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[:2]
        kept = torch.ones_like(t, dtype=torch.bool)  # t holds the kept rows' targets only
        if rows is not None:
            g_lp, g_ent = (None if g is None else g[rows] for g in (g_lp, g_ent))
        g_lp, g_ent = upstream(g_lp, kept), upstream(g_ent, kept, keep_none=True)
        h = hidden if rows is None else hidden[rows]
        if t.numel() == 0:
            dh = torch.zeros_like(h) if need_dh else None
            dw = torch.zeros_like(weight) if need_dw else None
        else:
            with device_guard(hidden.device):
                dh, dw = _k.backward(
                    ctx.backend,
                    h,
                    weight,
                    t,
                    norm,
                    entropy,
                    g_lp,
                    g_ent,
                    ctx.inv_t,
                    ctx.vocab_start,
                    need_dh,
                    need_dw,
                )
        if ctx.tp_group is not None and dh is not None:
            # hidden is replicated across the group and each shard saw only its vocabulary:
            # the full dhidden is the sum over shards (Megatron's column-parallel input grad).
            all_reduce(dh, ctx.tp_group)
        if dh is not None:
            dh = scatter_rows(dh, rows, hidden.shape[0])
        return dh, dw, None, None, None, None, None, None


def linear_logprobs(
    hidden,
    weight,
    targets,
    *,
    temperature=1.0,
    ignore_index=-100,
    return_entropy=False,
    tp_group=None,
):
    """`logprobs(hidden @ weight.T, targets, ...)` without materialising the [..., V] logits.

    hidden [..., H], weight [V, H] (same dtype), targets [...] int64 -> logp [...] float32
    (and entropy [...] with return_entropy). With tp_group, weight is this rank's shard
    [V / tp, H] holding vocabulary ids [rank * V/tp, (rank + 1) * V/tp) (equal shards, as
    Megatron's padded vocabulary; unequal ones raise ValueError), targets are global ids and the
    same on every rank (different ones raise ValueError), hidden is replicated; every rank gets
    the full result. Forward exchanges 4 int64 per rank (N, shard size, counted rows and a targets
    checksum, checked on every rank so that mismatched ranks raise ValueError before any
    variable-size collective), then 4 floats per token; backward all-reduces dhidden of the
    counted rows once. Differentiable w.r.t. hidden and weight.
    """
    inv_t, ignore_index, flat_t, vocab_start = _checks.lm_head(
        OP, hidden, weight, targets, temperature, ignore_index, tp_group
    )
    h = hidden.reshape(-1, hidden.shape[-1])
    h = h if h.is_contiguous() else h.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    logp, entropy = _LinearLogProbs.apply(
        h, w, flat_t, inv_t, ignore_index, vocab_start, tp_group, return_entropy
    )
    logp = logp.reshape(targets.shape)
    return (logp, entropy.reshape(targets.shape)) if return_entropy else logp
