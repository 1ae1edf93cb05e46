"""Public op `linear_policy_loss`: the REINFORCE update's loss sum_t coef_t * logp_t from hidden
states and the LM head, its gradients formed during the forward pass (the coefficients are known
before it); argument checks, dispatch, the vocab-parallel exchange and autograd. The math and the
FLOP count of the design live in nemokern/kernels/linear_policy_loss.py.

Conventions are linear_logprobs' (z = logits / T, logp float32, ignored positions count for
nothing, targets outside [0, V) raise unless NEMOKERN_CHECK_TARGETS=0); the op shares its argument
checks (_checks.lm_head), its kept-row handling and its vocab-parallel exchange.
"""

import torch
from torch.autograd.function import once_differentiable

from ..kernels import linear_policy_loss as _k
from ..kernels.logprobs import combine_stats
from ..parallel import all_reduce
from . import _checks
from ._dispatch import backend_for, device_guard
from .linear_logprobs import gather_parts, kept_rows, scatter_rows

OP = "linear_policy_loss"


class _LinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        targets,
        coef,
        old_logp,
        bounds,
        inv_t,
        ignore_index,
        vocab_start,
        tp_group,
        with_entropy,
        need_dh,
        need_dw,
        need_dc,
    ):
        backend = backend_for(hidden, weight)
        rows = kept_rows(targets != ignore_index)
        h, t = (hidden, targets) if rows is None else (hidden[rows], targets[rows])
        c = (coef if rows is None else coef[rows]).float().contiguous()
        old = None
        if old_logp is not None:
            old = (old_logp if rows is None else old_logp[rows]).float().contiguous()
        need = need_dh or need_dw
        dh = dw = None
        with device_guard(hidden.device):
            if t.numel() and tp_group is None and need:
                # one rank: the fused pass, the gradients formed from each token chunk's logits
                logp, entropy, dh, dw = _k.forward(
                    backend, h, weight, t, c, inv_t, with_entropy, need_dh, need_dw, old, bounds
                )
                terms = None if old is None else _k.ratio_terms(logp, old, c, bounds)
            else:
                if t.numel():
                    parts = _k.stats(backend, h, weight, t, inv_t, vocab_start, with_entropy)
                else:
                    parts = torch.zeros(1, 0, 4, dtype=torch.float32, device=hidden.device)
                if tp_group is not None:
                    # every rank holds the same targets, hence the same kept rows
                    shard = weight.shape[0]
                    parts = gather_parts(parts, rows, targets, tp_group, shard, op=OP)
                    _checks.targets_in_vocab(OP, targets, shard * parts.shape[0], ignore_index)
                logp, norm, entropy = combine_stats(parts, torch.ones_like(t, dtype=torch.bool))
                terms = None if old is None else _k.ratio_terms(logp, old, c, bounds)
                if t.numel() and need:
                    dh, dw = _k.backward(
                        backend,
                        h,
                        weight,
                        t,
                        norm,
                        entropy,
                        c if terms is None else terms.g_lp,
                        inv_t,
                        vocab_start,
                        need_dh,
                        need_dw,
                    )
        if need_dh:
            dh = torch.zeros_like(h) if dh is None else dh
            dh = scatter_rows(dh, rows, hidden.shape[0])
        if need_dw and dw is None:
            dw = torch.zeros_like(weight)
        # d(loss)/d(coef): logp itself, or the ratio factor (0 on ignored rows): e.g. a learned
        # baseline's gradient
        d_coef = logp if terms is None else terms.factor
        dc = scatter_rows(d_coef, rows, coef.shape[0]).to(coef.dtype) if need_dc else None
        ctx.grads, ctx.tp_group = (dh, dw, dc), tp_group
        loss = (c * logp).sum() if terms is None else terms.loss.sum()
        mean_entropy = entropy.sum() / max(1, entropy.numel())
        n = targets.shape[0]
        if terms is None:
            ratio = clipped = torch.zeros(0, device=hidden.device)
        else:
            ratio = scatter_rows(terms.ratio, rows, n)
            clipped = scatter_rows(terms.clipped, rows, n)
        ctx.mark_non_differentiable(mean_entropy, ratio, clipped)
        return loss, mean_entropy, ratio, clipped

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_entropy, g_ratio, g_clipped):
        if ctx.grads is None:
            raise RuntimeError(
                f"{OP}: backward ran twice through one forward; its gradients are formed in the "
                "forward and handed over once (call the op again instead of retain_graph=True)"
            )
        dh, dw, dc = ctx.grads
        ctx.grads = None  # the stored gradients are handed over, not kept twice
        if ctx.tp_group is not None and dh is not None:
            # hidden is replicated across the group and each shard saw only its vocabulary:
            # the full dhidden is the sum over shards (Megatron's column-parallel input grad).
            all_reduce(dh, ctx.tp_group)
        # In place, by a 0-dim fp32 factor: computed in fp32 and rounded once into the
        # gradient's dtype (exact when g_loss = 1, the usual case).
        g = g_loss.float()
        dh = None if dh is None else dh.mul_(g)
        dw = None if dw is None else dw.mul_(g)
        dc = None if dc is None else dc.mul_(g)
        return (dh, dw, None, dc) + (None,) * 10


def linear_policy_loss(
    hidden,
    weight,
    targets,
    coef,
    *,
    old_logprobs=None,
    clip=None,
    temperature=1.0,
    ignore_index=-100,
    tp_group=None,
    return_entropy=False,
    return_ratio=False,
):
    """sum_t coef_t * logp_t with logp = linear_logprobs(hidden, weight, targets, ...), computing
    its gradients w.r.t. hidden and weight during the forward pass (3 GEMMs instead of 4, no
    [..., V] tensor).

    hidden [..., H], weight [V, H] (same dtype), targets [...] int64, coef [...] float (any float
    dtype; its values at ignored positions are never read, nan included) -> scalar float32 loss;
    with return_entropy, (loss, mean entropy of softmax(z) over the counted positions, a float32
    scalar for metrics that carries no gradient; 0 when none counts). The REINFORCE loss (the
    masked token mean of -logp * A) is coef = -A / n_tokens. Backward returns the stored
    gradients times the incoming one (a 16-bit gradient is rounded once more unless that factor
    is a power of two); the gradients are held from the forward until then, and a second backward
    through one forward raises. Gradients are computed only for inputs that require grad when
    grad mode is on; otherwise the forward costs one GEMM. coef's gradient is logp (0 at ignored
    positions).

    Importance-ratio clipping (several updates per rollout, PPO/GRPO style): old_logprobs [...]
    float, the sampling policy's log-probs of the targets (never read at ignored positions; no
    gradient), and clip = (eps_low, eps_high), each >= 0 (inf: that side unclipped; None: no
    clipping). With r_t = exp(logp_t - old_t) the loss is then
        sum_t max(coef_t * r_t, coef_t * clip(r_t, 1 - eps_low, 1 + eps_high)),
    which for coef_t = -w_t * A_t with a weight w_t >= 0 (e.g. 1 / n_tokens) and advantage A_t
    is -sum_t w_t * min(r_t A_t, clip(r_t) A_t): the sign of coef is minus the advantage's, the
    weight carries the normalisation. A token is clipped where coef < 0 and r > 1 + eps_high,
    or coef > 0 and r < 1 - eps_low; its gradient is 0 there, coef_t * r_t * d(logp_t)
    elsewhere (at r = 1, the unclipped op's). coef's gradient is clip(r) where clipped, r
    elsewhere. return_ratio (needs old_logprobs) appends ratio [...] float32 and clipped [...]
    bool (0 and False at ignored positions; no gradient) to the results, after the entropy:
    a trainer's clip fraction is clipped.sum() / n_tokens, the low side clipped & (ratio < 1).

    tp_group: weight is this rank's vocabulary shard [V / tp, H] as in linear_logprobs (equal
    shards, the same hidden, targets, coef and old_logprobs on every rank); every rank gets the
    full loss. Forward exchanges linear_logprobs' fixed-size header (4 int64 per rank,
    mismatched ranks raise ValueError) and then 4 floats per token, all N of them, zeros on
    ignored rows (two all_gathers), and, with the statistics known only after that, costs 4
    GEMMs; backward all-reduces dhidden once.
    """
    inv_t, ignore_index, flat_t, vocab_start = _checks.lm_head(
        OP, hidden, weight, targets, temperature, ignore_index, tp_group
    )
    per_token = {"coef": coef}
    if old_logprobs is not None:
        per_token["old_logprobs"] = old_logprobs
    elif clip is not None or return_ratio:
        raise ValueError(
            f"{OP}: {'clip' if clip is not None else 'return_ratio'} needs old_logprobs, the "
            "sampling policy's log-probs of the targets (the ratio's denominator)"
        )
    _checks.tensors(OP, {"hidden": hidden, **per_token}, float_names=tuple(per_token))
    for name, x in per_token.items():
        if tuple(x.shape) != tuple(targets.shape):
            raise ValueError(
                f"{OP}: {name} has shape {tuple(x.shape)} but targets {tuple(targets.shape)}; "
                "one value per target position"
            )
    bounds = _checks.clip_bounds(OP, clip)
    h = hidden.reshape(-1, hidden.shape[-1])
    h = h if h.is_contiguous() else h.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    grad_on = torch.is_grad_enabled()
    loss, entropy, ratio, clipped = _LinearPolicyLoss.apply(
        h,
        w,
        flat_t,
        coef.reshape(-1),
        None if old_logprobs is None else old_logprobs.detach().reshape(-1),
        bounds,
        inv_t,
        ignore_index,
        vocab_start,
        tp_group,
        return_entropy,
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and coef.requires_grad,
    )
    out = (loss,) + ((entropy,) if return_entropy else ())
    if return_ratio:
        out += (ratio.view(targets.shape), clipped.view(targets.shape))
    return out if len(out) > 1 else loss
