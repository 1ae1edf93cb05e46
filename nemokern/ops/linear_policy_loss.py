"""Public op `linear_policy_loss`: the REINFORCE update's loss sum_t coef_t * logp_t from hidden
states and the LM head, its gradients formed during the forward pass (the coefficients are known
before it); validation, dispatch, vocab-parallel exchange and autograd. The math and the FLOP
count of the design live in nemokern.kernels.linear_policy_loss.

Conventions are linear_logprobs' (z = logits / T, logp float32, ignored positions count for
nothing, targets outside [0, V) raise unless NEMOKERN_CHECK_TARGETS=0); the op reuses its
validators and its vocab-parallel exchange.
"""
import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..kernels import linear_logprobs as _linear
from ..kernels import linear_policy_loss as _policy
from ..kernels.logprobs import combine_stats
from ._dispatch import backend_for, device_guard
from .logprobs import (_check_float, _check_targets, _flat_targets, _gather_parts,
                       _inv_temperature, _kept_rows, _scatter_rows)

# backend -> (fused single-rank forward, statistics pass, gradients from exchanged statistics)
_IMPLS = {
    "torch": (_policy.linear_policy_grads_torch, _linear.linear_stats_torch,
              _policy.sharded_grads_torch),
    "triton": (_policy.linear_policy_grads_triton,
               lambda h, w, t, inv_t, vocab_start, with_entropy:
               _linear.linear_stats_triton(h, w, t, inv_t, vocab_start),
               _policy.sharded_grads_triton),
}


class _LinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, coef, inv_t, ignore_index, vocab_start, tp_group,
                with_entropy, need_dh, need_dw):
        backend = backend_for(hidden, weight)
        if backend == "triton" and hidden.dtype not in _linear.TRITON_DTYPES:
            raise TypeError(f"linear_policy_loss: the Triton kernels take hidden/weight in "
                            f"{_linear.TRITON_DTYPES}, got {hidden.dtype}; cast them, or set "
                            f"NEMOKERN_BACKEND=torch for the (slower) torch reference")
        fused, stats, sharded_grads = _IMPLS[backend]
        rows = _kept_rows(targets != ignore_index)
        h, t = (hidden, targets) if rows is None else (hidden[rows], targets[rows])
        c = (coef if rows is None else coef[rows]).float().contiguous()
        kept = torch.ones_like(t, dtype=torch.bool)
        need = dict(need_dh=need_dh, need_dw=need_dw)
        dh = dw = None
        with device_guard(hidden.device):
            if t.numel() == 0:
                parts = torch.zeros(1, 0, 4, dtype=torch.float32, device=hidden.device)
                if tp_group is not None:
                    parts = _gather_parts(parts, rows, targets, tp_group, weight.shape[0])
                logp, _, entropy = combine_stats(parts, kept)
            elif tp_group is None and (need_dh or need_dw):
                logp, entropy, dh, dw = fused(h, weight, t, c, inv_t, with_entropy, **need)
            else:
                parts = stats(h, weight, t, inv_t, vocab_start, with_entropy)
                if tp_group is not None:
                    shard = weight.shape[0]
                    parts = _gather_parts(parts, rows, targets, tp_group, shard)
                    _check_targets(targets, shard * parts.shape[0], ignore_index)
                logp, norm, entropy = combine_stats(parts, kept)
                if need_dh or need_dw:
                    dh, dw = sharded_grads(h, weight, t, norm, entropy, c, inv_t, vocab_start,
                                           **need)
        if need_dh:
            dh = torch.zeros_like(h) if dh is None else dh
            dh = _scatter_rows(dh, rows, hidden.shape[0])
        if need_dw and dw is None:
            dw = torch.zeros_like(weight)
        ctx.grads, ctx.tp_group = (dh, dw), tp_group
        loss = (c * logp).sum()
        mean_entropy = entropy.sum() / max(1, entropy.numel())
        ctx.mark_non_differentiable(mean_entropy)
        return loss, mean_entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_entropy):
        if ctx.grads is None:
            raise RuntimeError("linear_policy_loss: backward ran twice through one forward; its "
                               "gradients are formed in the forward and handed over once "
                               "(call the op again instead of retain_graph=True)")
        dh, dw = ctx.grads
        ctx.grads = None  # the stored gradients are handed over, not kept twice
        if ctx.tp_group is not None and dh is not None:
            # hidden is replicated across the group and each shard saw only its vocabulary:
            # the full dhidden is the sum over shards (Megatron's column-parallel input grad).
            dist.all_reduce(dh, group=ctx.tp_group)
        # In place, by a 0-dim fp32 factor: computed in fp32 and rounded once into the
        # gradient's dtype (exact when g_loss = 1, the usual case).
        g = g_loss.float()
        dh = None if dh is None else dh.mul_(g)
        dw = None if dw is None else dw.mul_(g)
        return dh, dw, None, None, None, None, None, None, None, None, None


def linear_policy_loss(hidden, weight, targets, coef, *, temperature=1.0, ignore_index=-100,
                       tp_group=None, return_entropy=False):
    """sum_t coef_t * logp_t with logp = linear_logprobs(hidden, weight, targets, ...), computing
    its gradients w.r.t. hidden and weight during the forward pass (3 GEMMs instead of 4, no
    [..., V] tensor).

    hidden [..., H], weight [V, H] (same dtype), targets [...] int64, coef [...] float (any float
    dtype; its values at ignored positions are never read, nan included) -> scalar float32 loss;
    with return_entropy, (loss, mean entropy of softmax(z) over the counted positions, a float32
    scalar for metrics that carries no gradient; 0 when none counts). The REINFORCE loss is
    coef = -advantage / n_tokens. Backward returns the stored gradients times the incoming one (a
    16-bit gradient is rounded once more unless that factor is a power of two); the gradients
    are held from the forward until then, and a second backward through one forward raises. Gradients are computed only for inputs that require grad when grad
    mode is on; otherwise the forward costs one GEMM.

    tp_group: weight is this rank's vocabulary shard [V / tp, H] as in linear_logprobs (equal
    shards, the same hidden, targets and coef on every rank); every rank gets the full loss.
    Forward exchanges 4 floats per counted token (one all_gather) and, with the statistics known
    only after it, costs 4 GEMMs; backward all-reduces dhidden once.
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
    _check_float("coef", coef)
    if tuple(coef.shape) != tuple(targets.shape):
        raise ValueError(f"coef has shape {tuple(coef.shape)} but targets {tuple(targets.shape)}; "
                         f"linear_policy_loss needs one coefficient per target position")
    if coef.device != hidden.device:
        raise ValueError(f"coef is on {coef.device} but hidden on {hidden.device}")
    vocab_start = 0
    if tp_group is not None:
        if not dist.is_initialized():
            raise RuntimeError("tp_group given but torch.distributed is not initialised")
        vocab_start = dist.get_rank(tp_group) * weight.shape[0]
    else:
        _check_targets(flat_t, weight.shape[0], ignore_index)  # with tp_group: after the exchange
    h = hidden.reshape(-1, hidden.shape[-1])
    h = h if h.is_contiguous() else h.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    grad_on = torch.is_grad_enabled()
    loss, entropy = _LinearPolicyLoss.apply(
        h, w, flat_t, coef.reshape(-1), inv_t, ignore_index, vocab_start, tp_group,
        return_entropy, grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    return (loss, entropy) if return_entropy else loss
